"""Constrained decoding (adapters/grammar.py): random logits + the grammar's mask + the real sampler
must give answers whose DECODED text (``tokenizer.decode(ids).strip()``, what a client gets) is
valid, on every family's vocabulary.

Vocabularies: the demo checkpoint's tokenizer trained in-test (always available; small, Chinese
only through byte fallback) and THUDM's ChatGLM-6B / ChatGLM2 / ChatGLM3 files from
``../shared/reference`` (skipped with a reason when absent).  No ``jsonschema`` package: answers
are checked with ``json.loads`` and explicit per-field checks.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass

import pytest
import torch

from adapters.base import GrammarSpec, SamplingParams
from adapters.chatglm.tokenizer import ChatGLMTokenizer
from adapters.chatglm.tokenizer import load_tokenizer as load_chatglm_tokenizer
from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer
from adapters.demo import DEMO_RECIPE, demo_corpus, train_demo_tokenizer
from adapters.runtime.detokenize import IncrementalDecoder
from adapters.runtime.grammar import (
    GrammarError,
    GrammarMatcher,
    GrammarViolation,
    TokenGrammar,
)
from adapters.runtime.sampler import SamplerState, choose
from tests.conftest import tokenizer_file


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: ChatGLMTokenizer | ChatGLM2Tokenizer
    grammar: TokenGrammar
    padded_vocab: int  # the model's logits row (THUDM configs' padded_vocab_size)

    @property
    def stops(self) -> frozenset[int]:
        return self.grammar.stop_ids


_FAMILIES: dict[str, Family] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Rows of at most 130k floats gain nothing from a second thread, and on a busy 2-core host
    torch's OpenMP workers spin-wait for the core the other process holds: this module ran 10x
    slower (70 s of CPU instead of 7) with two threads under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _family(name: str, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Built once per session: a TokenGrammar over 130k ids takes about half a second."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name == "demo":
        path = tmp_path_factory.mktemp("demo-tokenizer") / "tokenizer.model"
        path.write_bytes(train_demo_tokenizer(demo_corpus(), DEMO_RECIPE.sp_vocab_size))
        tok = ChatGLM2Tokenizer(path, "chatglm2")
        family = Family(name, tok, TokenGrammar(tok, {tok.eos_id}), DEMO_RECIPE.padded_vocab_size)
    elif name == "chatglm-6b":
        tok = load_chatglm_tokenizer(tokenizer_file("chatglm-6b", "ice_text.model").parent)
        family = Family(name, tok, TokenGrammar(tok, {tok.eop_id}), 130528)
    elif name == "chatglm2-6b":
        tok = ChatGLM2Tokenizer(tokenizer_file("chatglm2-6b", "tokenizer.model"), "chatglm2")
        family = Family(name, tok, TokenGrammar(tok, {tok.eos_id}), 65024)
    elif name == "chatglm3-6b":
        tok = ChatGLM2Tokenizer(tokenizer_file("chatglm3-6b", "tokenizer.model"), "chatglm3")
        stops = {tok.eos_id, tok.special("<|user|>"), tok.special("<|observation|>")}
        family = Family(name, tok, TokenGrammar(tok, stops), 65024)
    else:
        raise ValueError(name)
    _FAMILIES[name] = family
    return family


FAMILY_NAMES = ("demo", "chatglm-6b", "chatglm2-6b")


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family(request.param, tmp_path_factory)


@pytest.fixture
def demo(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family("demo", tmp_path_factory)


@pytest.fixture
def glm6b(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family("chatglm-6b", tmp_path_factory)


@pytest.fixture
def glm3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family("chatglm3-6b", tmp_path_factory)


# --------------------------------------------------------------------------- generation


def _ids_with_bytes(family: Family, wanted: set[bytes]) -> list[int]:
    return [i for i, b in enumerate(family.grammar.token_bytes) if b in wanted]


def generate(
    family: Family,
    spec: GrammarSpec | GrammarMatcher,
    seed: int,
    *,
    max_steps: int = 200,
    boost: dict[bytes, float] | None = None,
    stop_boost: float = 4.0,
    temperature: float = 0.0,
) -> list[int]:
    """Pick ids from random logits through the real sampler (greedy unless ``temperature``)
    until a stop id; return every id (the stop id last).  ``boost`` adds to the ids spelling
    those exact bytes (a model's prior)."""
    matcher = spec if isinstance(spec, GrammarMatcher) else family.grammar.matcher(spec)
    gen = torch.Generator().manual_seed(seed)
    state = SamplerState(SamplingParams(temperature=temperature, seed=seed),
                         family.tokenizer.vocab_size)
    bias = torch.zeros(family.padded_vocab)
    bias[sorted(family.stops)] = stop_boost
    for data, value in (boost or {}).items():
        bias[_ids_with_bytes(family, {data})] += value
    ids: list[int] = []
    for _ in range(max_steps):
        row = torch.randn(family.padded_vocab, generator=gen) * 2 + bias
        matcher.mask(row)
        token = choose(row, state)
        matcher.accept(token)
        ids.append(token)
        if token in family.stops:
            assert matcher.done
            return ids
    raise AssertionError(f"no stop id after {max_steps} steps: {family.tokenizer.decode(ids)!r}")


def answer(family: Family, ids: list[int]) -> str:
    """What the client gets: the reference decode of the generated ids (the stop id is never
    decoded by the engine), as the engine streams it, stripped.  It must equal the exact bytes
    the grammar checked."""
    assert ids[-1] in family.stops
    text = family.tokenizer.decode(ids[:-1]).strip()
    stream = IncrementalDecoder(family.tokenizer)
    assert ("".join(stream.push(i) for i in ids[:-1]) + stream.flush()).strip() == text
    exact = b"".join(family.tokenizer.token_bytes(i) for i in ids[:-1]).decode("utf-8").strip()
    assert text == exact, (text, exact)
    return text


def _whitespace_outside_strings(text: str) -> bool:
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char.isspace():
            return True
    return False


# --------------------------------------------------------------------------- JSON schema

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 10},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "city": {"enum": ["北京", "上海", "San Francisco"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                 "minItems": 1, "maxItems": 3},
        "owner": {"$ref": "#/$defs/owner"},
        "contact": {"anyOf": [{"type": "string", "maxLength": 8},
                              {"type": "integer", "minimum": 0, "maximum": 9}]},
    },
    "required": ["name", "age", "city", "tags", "owner", "contact"],
    "additionalProperties": False,
    "$defs": {
        "owner": {
            "type": "object",
            "properties": {"first": {"type": "string", "maxLength": 8},
                           "id": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["first", "id"],
            "additionalProperties": False,
        },
    },
}


def check_person(obj: object) -> None:
    assert isinstance(obj, dict)
    assert set(obj) == {"name", "age", "city", "tags", "owner", "contact"}
    assert isinstance(obj["name"], str) and 2 <= len(obj["name"]) <= 10
    age = obj["age"]
    assert isinstance(age, int) and not isinstance(age, bool) and 18 <= age <= 99
    assert obj["city"] in ("北京", "上海", "San Francisco")
    tags = obj["tags"]
    assert isinstance(tags, list) and 1 <= len(tags) <= 3
    assert all(isinstance(t, str) and len(t) <= 6 for t in tags)
    owner = obj["owner"]
    assert isinstance(owner, dict) and set(owner) == {"first", "id"}
    assert isinstance(owner["first"], str) and len(owner["first"]) <= 8
    assert type(owner["id"]) is int and 1 <= owner["id"] <= 5
    contact = obj["contact"]
    assert (isinstance(contact, str) and len(contact) <= 8) or (
        type(contact) is int and 0 <= contact <= 9)


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_answers_validate(family: Family, seed: int) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA, ensure_ascii=False))
    # seed 0 samples at temperature 1 (softmax, exponential race), the others are greedy
    text = answer(family, generate(family, spec, seed, temperature=1.0 if seed == 0 else 0.0))
    check_person(json.loads(text))
    assert not _whitespace_outside_strings(text), text  # compact by default, as OpenAI's


def test_json_object_is_any_object(family: Family) -> None:
    # A model's prior towards closing things, so a random walk ends within the step limit.
    boost = {b'"': 14.0, b"}": 13.0, b"]": 13.0}
    for seed in range(3):
        text = answer(family, generate(family, GrammarSpec("json_object"), seed, boost=boost))
        assert isinstance(json.loads(text), dict), text


def test_whitespace_flexible_json_still_validates(demo: Family) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA), whitespace_flexible=True)
    texts = [answer(demo, generate(demo, spec, seed, max_steps=400)) for seed in range(3)]
    for text in texts:
        check_person(json.loads(text))
    assert any(_whitespace_outside_strings(t) for t in texts)


# --------------------------------------------------------------------------- other grammar kinds


def test_regex(family: Family) -> None:
    spec = GrammarSpec("regex", r"\d{3}-[a-z]+")
    for seed in range(3):
        text = answer(family, generate(family, spec, seed, stop_boost=10.0))
        # \d is ASCII here, whatever digits the vocabulary has
        assert re.fullmatch(r"[0-9]{3}-[a-z]+", text), text


def test_choice_keeps_chinese_newlines_and_spaces(family: Family) -> None:
    # ChatGLM-6B encodes "\n" as <n>, runs of spaces as <|blank_n|> and "\t" as <|tab|>; the
    # emoji is four byte-fallback pieces.  The decoded choice must come back intact.
    choices = ["北京", "上海 浦东", "San Francisco", "第一行\n第二行", "a  b\tc", "深圳   市", "😀ok"]
    spec = GrammarSpec("choice", json.dumps(choices, ensure_ascii=False))
    seen = set()
    for seed in range(8):
        text = answer(family, generate(family, spec, seed))
        assert text in choices, text
        seen.add(text)
    assert len(seen) >= 3


def test_choice_prefers_the_tokenizers_own_whitespace_ids(glm6b: Family) -> None:
    """Forced text is tokenized by greedy longest match, so ChatGLM-6B's markers are used."""
    tok = glm6b.tokenizer
    spec = GrammarSpec("choice", json.dumps(["甲\n乙   丙"], ensure_ascii=False))
    ids = generate(glm6b, spec, 0)
    assert answer(glm6b, ids) == "甲\n乙   丙"
    assert 4 in ids  # <n>
    assert 130009 + 3 - 2 in ids  # <|blank_3|>
    assert tok.decode(ids[:-1]) == "甲\n乙   丙"
    # the same inside a JSON enum (where the newline is escaped)
    spec = GrammarSpec("json_schema", json.dumps({"enum": ["上海  浦东\n", "北京"]}))
    for seed in range(4):
        ids = generate(glm6b, spec, seed)
        assert json.loads(answer(glm6b, ids)) in ("上海  浦东\n", "北京")
        if 130009 in ids:  # <|blank_2|>
            break
    else:
        raise AssertionError("the enum with two spaces never came out")


LARK_CALL = r"""
start: call
call: NAME "(" args? ")"
args: NUMBER ("," NUMBER)*
NAME: /[a-z]{1,8}/
NUMBER: /[0-9]{1,3}/
"""


def test_lark(family: Family) -> None:
    spec = GrammarSpec("lark", LARK_CALL)
    for seed in range(3):
        text = answer(family, generate(family, spec, seed, boost={b")": 3.0}))
        assert re.fullmatch(r"[a-z]{1,8}\(([0-9]{1,3}(,[0-9]{1,3})*)?\)", text), text


# --------------------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("json_schema", '{"type": "foo"}'), "foo"),
        (GrammarSpec("json_schema", "[1, 2]"), "must be a JSON object"),
        (GrammarSpec("json_schema", "true"), "must be a JSON object"),
        (GrammarSpec("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
        (GrammarSpec("json_schema", '{"$ref": "#/$defs/missing"}'), "missing"),
        (GrammarSpec("regex", "(abc"), "unclosed group"),
        (GrammarSpec("lark", "start: foo"), "foo"),
        (GrammarSpec("choice", '"abc"'), "JSON list of"),
        (GrammarSpec("choice", "[]"), "non-empty"),
        (GrammarSpec("choice", '["a", 1]'), "list of"),
        (GrammarSpec("xml", "<a/>"), "unknown grammar kind"),  # type: ignore[arg-type]
    ],
)
def test_bad_grammars_fail_at_compile(demo: Family, spec: GrammarSpec, reason: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(reason)):
        demo.grammar.compile(spec)
    assert isinstance(GrammarError("x"), ValueError)  # the gateway answers ValueError with 400


def test_compiled_grammars_are_cached_lru(demo: Family) -> None:
    tok = demo.tokenizer
    grammar = TokenGrammar(tok, {tok.eos_id}, cache_size=2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    first = grammar.compile(a)
    assert grammar.compile(GrammarSpec("regex", "a+")) is first
    grammar.compile(b)
    grammar.compile(a)  # a is now the most recent
    grammar.compile(c)  # evicts b
    assert grammar.compile(a) is first
    assert grammar.matcher(a).compiled is first


def test_spec_is_plain_data() -> None:
    spec = GrammarSpec("json_schema", '{"type": "object"}', whitespace_flexible=True)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(GrammarSpec("json_schema", '{"type": "object"}', True))


# --------------------------------------------------------------------------- masks


def test_stop_ids_only_when_accepting_and_nothing_after(family: Family) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA))
    matcher = family.grammar.matcher(spec)
    stops = sorted(family.stops)
    gen = torch.Generator().manual_seed(7)
    for _ in range(200):
        allowed = matcher.allowed()
        assert bool(allowed[stops].all()) == matcher.accepting
        assert bool(allowed[stops].any()) == matcher.accepting
        if matcher.done:  # complete, nothing may follow: only the stop ids
            assert allowed.nonzero().flatten().tolist() == stops
            break
        row = torch.randn(family.padded_vocab, generator=gen)
        row[stops] = 100.0  # the model wants to stop all the time: the mask says no
        matcher.mask(row)
        token = int(row.argmax())
        assert token not in family.stops
        matcher.accept(token)
    else:
        raise AssertionError("the grammar never completed")
    matcher.accept(stops[0])
    assert matcher.done and matcher.accepting


def test_non_text_ids_are_never_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image ids (ChatGLM-6B with THUDM's default 20000 offset), control ids, the unknown piece
    and the padding of the logits row stay -inf at every step."""
    tok = ChatGLMTokenizer(tokenizer_file("chatglm-6b", "ice_text.model"))  # offset 20000
    grammar = TokenGrammar(tok, {tok.eop_id})
    family = Family("chatglm-6b+images", tok, grammar, 150528)
    never = [i for i in range(20000)] + [tok.pad_id, tok.gmask_id, tok.sop_id, tok.mask_id,
                                         20000]  # 20000: <unk>, decoded as " ⁇ "
    assert tok.piece(20000) == "<unk>" and tok.token_bytes(20000)
    assert all(grammar.is_special(i) for i in never)
    matcher = grammar.matcher(GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA["$defs"]["owner"])))
    gen = torch.Generator().manual_seed(3)
    ids: list[int] = []
    while not matcher.done:
        row = torch.randn(family.padded_vocab, generator=gen)
        row[never] = 100.0
        matcher.mask(row)
        assert torch.isneginf(row[never]).all()
        assert torch.isneginf(row[tok.vocab_size:]).all()
        ids.append(int(row.argmax()))
        matcher.accept(ids[-1])
    owner = json.loads(tok.decode(ids).strip())
    assert set(owner) == {"first", "id"} and 1 <= owner["id"] <= 5


def test_chatglm3_role_ids_are_not_text_even_when_spelled(glm3: Family) -> None:
    """ChatGLM3 decodes <|user|> (a stop id) by name; a grammar spelling "<|user|>" must get it
    from text pieces, and the role/control ids only ever come as stops."""
    tok = glm3.tokenizer
    roles = [tok.special(n) for n in ("<|system|>", "<|assistant|>", "[MASK]", "[gMASK]", "sop")]
    spec = GrammarSpec("choice", json.dumps(["<|user|>", "<|assistant|>"]))
    matcher = glm3.grammar.matcher(spec)
    ids = generate(glm3, matcher, 0, boost={b"<|user|>": 50.0, b"<|assistant|>": 50.0})
    assert not set(ids[:-1]) & (set(roles) | glm3.stops)
    assert answer(glm3, ids) in ("<|user|>", "<|assistant|>")
    # at the end every stop id of ChatGLM3 is allowed, and nothing else
    end = glm3.grammar.matcher(spec)
    end.replay(ids[:-1])
    assert end.allowed().nonzero().flatten().tolist() == sorted(glm3.stops)


def test_first_token_may_carry_the_sentencepiece_space(family: Family) -> None:
    """The model may open with "▁{" (bytes " {"), which decoding turns into "{"."""
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA))
    matcher = family.grammar.matcher(spec)
    allowed = matcher.allowed()
    spaced = [i for i in _ids_with_bytes(family, {b" {", b' {"'}) if allowed[i]]
    assert spaced, "no space-prefixed opening piece allowed"
    assert allowed[_ids_with_bytes(family, {b"{"})].any()
    ids = generate(family, matcher, 1, boost={b" {": 100.0, b' {"': 100.0})
    assert family.grammar.token_bytes[ids[0]].startswith(b" ")
    assert not family.tokenizer.decode(ids[:-1]).startswith(" ")
    check_person(json.loads(answer(family, ids)))
    # only one space: a second leading space would survive decoding (then strip) and is refused
    again = family.grammar.matcher(spec)
    again.accept(ids[0])
    assert not again.allowed()[_ids_with_bytes(family, {b" ", b" {", b' {"'})].any()


def test_replay_after_reset_gives_the_same_state(family: Family) -> None:
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA))
    matcher = family.grammar.matcher(spec)
    gen = torch.Generator().manual_seed(11)
    ids: list[int] = []
    masks: list[torch.Tensor] = []
    while not matcher.done:
        masks.append(matcher.allowed())
        row = torch.randn(family.padded_vocab, generator=gen)
        matcher.mask(row)
        ids.append(int(row.argmax()))
        matcher.accept(ids[-1])
    for k in (0, 1, len(ids) // 2, len(ids) - 1):
        fresh = family.grammar.matcher(spec)
        fresh.replay(ids[:k])
        assert torch.equal(fresh.allowed(), masks[k])
        matcher.replay(ids[:k])  # the same matcher, after a reset
        assert torch.equal(matcher.allowed(), masks[k])
        assert matcher.guard_state == fresh.guard_state
    matcher.reset()
    assert torch.equal(matcher.allowed(), masks[0])


def test_illegal_tokens_raise(demo: Family) -> None:
    tok = demo.tokenizer
    spec = GrammarSpec("regex", "ab")
    matcher = demo.grammar.matcher(spec)
    b_id = _ids_with_bytes(demo, {b"b"})[0]
    with pytest.raises(GrammarViolation):
        matcher.accept(b_id)  # "b" before "a"
    with pytest.raises(GrammarViolation):
        matcher.mask(torch.zeros(demo.padded_vocab))  # failed until reset
    matcher.reset()
    with pytest.raises(GrammarViolation, match="before the grammar is complete"):
        matcher.accept(tok.eos_id)
    matcher.reset()
    with pytest.raises(GrammarViolation, match="never allowed"):
        matcher.accept(tok.special("[gMASK]"))
    with pytest.raises(GrammarViolation, match="never allowed"):
        matcher.accept(demo.padded_vocab - 1)  # padding
    matcher.replay(_ids_with_bytes(demo, {b"a"})[:1] + [b_id])
    assert matcher.done and matcher.accepting
    matcher.accept(tok.eos_id)
    with pytest.raises(GrammarViolation, match="after the generation ended"):
        matcher.accept(b_id)


def test_mask_batch_equals_row_by_row(family: Family) -> None:
    specs = [GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA)), None,
             GrammarSpec("regex", r"\d{3}-[a-z]+"), GrammarSpec("json_object")]
    matchers = [family.grammar.matcher(s) if s else None for s in specs]
    # advance them to different states
    gen = torch.Generator().manual_seed(5)
    for steps, m in zip((5, 0, 2, 3), matchers, strict=True):
        for _ in range(steps):
            row = torch.randn(family.padded_vocab, generator=gen)
            m.mask(row)
            m.accept(int(row.argmax()))
    logits = torch.randn((len(specs), family.padded_vocab), generator=gen)
    expected = logits.clone()
    for m, row in zip(matchers, expected, strict=True):
        if m is not None:
            m.mask(row)
    family.grammar.mask_batch(matchers, logits)
    assert torch.equal(logits, expected)
    # all rows, and a single row, take the same path
    everything = [m for m in matchers if m is not None]
    rows = torch.randn((len(everything), family.padded_vocab), generator=gen)
    rows_expected = rows.clone()
    for m, row in zip(everything, rows_expected, strict=True):
        m.mask(row)
    family.grammar.mask_batch(everything, rows)
    assert torch.equal(rows, rows_expected)
    with pytest.raises(ValueError):
        family.grammar.mask_batch(everything, rows[:1])


# --------------------------------------------------------------------------- ChatGLM-6B decoding


def test_cleanup_guard_only_where_decode_rewrites(family: Family) -> None:
    assert family.grammar.guards_cleanup == (family.name == "chatglm-6b")


def test_chatglm6b_decode_never_rewrites_grammar_text(glm6b: Family) -> None:
    """ChatGLM-6B's decode turns " ." into "." (transformers' clean_up_tokenization); the
    matcher steers away from such spots so the decoded answer is the text the grammar matched."""
    spec = GrammarSpec("regex", r"[a-z]{1,4}( [a-z.,!?']{1,3}){1,4}")
    boost = {b" ": 9.0, b".": 8.0, b",": 8.0, b"?": 8.0, b"!": 8.0, b"'s": 8.0}
    for seed in range(6):
        ids = generate(glm6b, spec, seed, boost=boost, stop_boost=1.0)
        text = answer(glm6b, ids)  # asserts decode == exact bytes
        assert re.fullmatch(r"[a-z]{1,4}( [a-z.,!?']{1,3}){1,4}", text), text
    # after a space, "." is banned although the grammar allows it
    matcher = glm6b.grammar.matcher(spec)
    matcher.replay(glm6b.grammar._tokenize(b"ab "))
    allowed = matcher.allowed()
    assert not allowed[_ids_with_bytes(glm6b, {b".", b",", b"'"})].any()
    assert allowed[_ids_with_bytes(glm6b, {b"a"})].any()


def test_chatglm6b_guard_gives_way_when_the_grammar_insists(glm6b: Family) -> None:
    """Text like "a ." cannot survive ChatGLM-6B's decode; the grammar still completes."""
    ids = generate(glm6b, GrammarSpec("choice", '["x ."]'), 0)
    exact = b"".join(glm6b.grammar.token_bytes[i] for i in ids[:-1])
    assert exact.strip() == b"x ."
    assert glm6b.tokenizer.decode(ids[:-1]).strip() == "x."


def test_a_grammar_that_needs_a_special_token_fails_loudly(demo: Family) -> None:
    """A Lark grammar may name a token by id; a non-text id is still never allowed, so the
    mask raises instead of handing the sampler a row of -inf."""
    gmask = demo.tokenizer.special("[gMASK]")
    bad = demo.grammar.matcher(GrammarSpec("lark", f'start: "a" <[{gmask}]>'))
    bad.accept(_ids_with_bytes(demo, {b"a"})[0])
    with pytest.raises(GrammarViolation, match="never generated"):
        bad.mask(torch.zeros(demo.padded_vocab))
    good = demo.grammar.matcher(GrammarSpec("regex", "[a-z]+"))
    with pytest.raises(GrammarViolation) as info:
        demo.grammar.mask_batch([None, good, bad], torch.zeros((3, demo.padded_vocab)))
    assert info.value.rows == (2,)
