from __future__ import annotations

import pytest

from adapters.base import InvalidRequest, Message
from adapters.chatglm2.conversation import to_turns
from adapters.conversation import Turn, to_pairs


def m(role: str, content: str) -> Message:
    return Message(role=role, content=content)  # type: ignore[arg-type]


def test_pairs_from_alternating_history() -> None:
    conv = to_pairs([m("user", "q1"), m("assistant", "a1"), m("user", "q2")])
    assert conv.query == "q2"
    assert conv.history == (("q1", "a1"),)


def test_system_and_developer_are_prepended_to_first_user_turn_not_dropped() -> None:
    conv = to_pairs(
        [m("system", "Be brief."), m("developer", "Answer in English."),
         m("user", "q1"), m("assistant", "a1"), m("user", "q2")]
    )
    assert conv.history == (("Be brief.\nAnswer in English.\nq1", "a1"),)
    assert conv.query == "q2"
    single = to_pairs([m("system", "S"), m("user", "Q")])
    assert (single.query, single.history) == ("S\nQ", ())


def test_reject_policy_refuses_system_messages() -> None:
    with pytest.raises(InvalidRequest) as err:
        to_pairs([m("system", "S"), m("user", "Q")], policy="reject")
    assert err.value.param == "messages.[0].role"


def test_consecutive_same_role_messages_are_joined() -> None:
    conv = to_pairs([m("user", "a"), m("user", "b")])
    assert conv.query == "a\nb"


@pytest.mark.parametrize(
    "msgs",
    [[], [m("assistant", "x")], [m("user", "q"), m("assistant", "a")], [m("tool", "x")],
     [m("assistant", "a"), m("user", "q")]],
)
def test_unmappable_conversations_are_clear_errors(msgs) -> None:
    with pytest.raises(InvalidRequest):
        to_pairs(msgs)


def test_v3_turns_keep_native_roles() -> None:
    conv = to_turns([m("system", "S"), m("developer", "D"), m("user", "q"),
                     m("assistant", "a"), m("tool", '{"t": 1}')])
    assert conv.turns == (Turn("system", "S"), Turn("system", "D"), Turn("user", "q"),
                          Turn("assistant", "a"))
    assert (conv.query, conv.query_role) == ('{"t": 1}', "observation")


def test_v3_must_end_with_user_or_tool() -> None:
    with pytest.raises(InvalidRequest):
        to_turns([m("user", "q"), m("assistant", "a")])
