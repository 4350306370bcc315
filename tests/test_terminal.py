"""``chatglm-gateway chat``: the prompt loop through a real pseudo-terminal, against a live
server serving fakes and in-process on the demo checkpoint; the session and the in-process
backend directly."""

from __future__ import annotations

import codecs
import io
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from adapters.base import InvalidRequest, Message
from gateway.app import create_app
from gateway.settings import ServerSettings
from gateway.terminal import (
    CLEAR_SCREEN,
    WELCOME,
    ChatError,
    ChatSession,
    GenerationOptions,
    LocalBackend,
)
from tests.fake import FakeChatModel
from tests.server import running_server

REPO = Path(__file__).resolve().parent.parent
PIECES = ("你好", "，", "我是", " ChatGLM", "！", " 😀")
ANSWER = "".join(PIECES)
PIECE_DELAY = 0.1
PROMPT = "用户："
API_KEY = "sk-terminal"


# FakeChatModel records every conversation it prepares (``.conversations``).
RecordingFake = FakeChatModel


class Terminal:
    """A child process on a pseudo-terminal: type lines, wait for text, read the exit code."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.fd = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.terminal", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True,
        )
        os.close(slave)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        #: (arrival time, text) of every read, to see the answer arrive piece by piece
        self.reads: list[tuple[float, str]] = []

    def expect(self, wanted: str, timeout: float = 20.0) -> str:
        """Read until ``wanted`` appears after what earlier calls consumed; return that span."""
        deadline = time.monotonic() + timeout
        while wanted not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {wanted!r}; the terminal shows:\n{self.text}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    assert wanted in self.text, f"exited before {wanted!r}:\n{self.text}"
                    break
                chunk = self.decoder.decode(data)
                self.reads.append((time.monotonic(), chunk))
                self.text += chunk
        cut = self.text.index(wanted) + len(wanted)
        seen, self.text = self.text[:cut], self.text[cut:]
        return seen

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode("utf-8") + b"\r")

    def exit_code(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CHATGLM_GATEWAY_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8", LANG="C.UTF-8", TERM="dumb")
    env.update(extra)
    return env


@pytest.fixture()
def terminal() -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(*args: str, **env: str) -> Terminal:
        started.append(Terminal(args, child_env(**env)))
        return started[-1]

    yield start
    for term in started:
        if term.proc.poll() is None:
            term.close()


@pytest.fixture(scope="module")
def fakes() -> dict[str, FakeChatModel]:
    return {
        "glm": RecordingFake("glm", pieces=PIECES, delay=PIECE_DELAY),
        "echo": RecordingFake("echo"),
        "picky": FakeChatModel("picky", prepare_error=InvalidRequest(
            "Tool messages are not supported by this model.", param="messages")),
    }


@pytest.fixture(scope="module")
def base_url(fakes: dict[str, FakeChatModel]) -> Iterator[str]:
    with running_server(create_app(ServerSettings(), models=fakes)) as url:
        yield f"{url}/v1"


# --------------------------------------------------------------------------- against a server


def test_chat_streams_keeps_history_clears_and_stops(
    terminal: Callable[..., Terminal], base_url: str, fakes: dict[str, RecordingFake],
) -> None:
    glm = fakes["glm"]
    term = terminal("--base-url", base_url)
    term.expect(WELCOME)
    term.expect(PROMPT)
    term.type("你好 😀")
    term.expect("glm：")  # the first model of /v1/models is the default
    reads_before = len(term.reads)
    term.expect(ANSWER)
    pieces = [(t, s) for t, s in term.reads[reads_before:] if s.strip()]
    assert len(pieces) >= 3, f"the answer came in one block: {pieces}"
    assert pieces[-1][0] - pieces[0][0] > PIECE_DELAY * 2, "the answer was not streamed"
    assert glm.conversations[-1] == [("user", "你好 😀")]

    term.expect(PROMPT)
    term.type("再说一次")
    term.expect(ANSWER)
    assert glm.conversations[-1] == [
        ("user", "你好 😀"), ("assistant", ANSWER), ("user", "再说一次"),
    ]

    term.expect(PROMPT)
    term.type("clear")
    term.expect(CLEAR_SCREEN)
    term.expect(WELCOME)
    term.expect(PROMPT)
    term.type("new topic")
    term.expect(ANSWER)
    assert glm.conversations[-1] == [("user", "new topic")]

    term.expect(PROMPT)
    term.type("stop")
    assert term.exit_code() == 0


def test_model_flag_errors_and_end_of_input(
    terminal: Callable[..., Terminal], base_url: str, fakes: dict[str, RecordingFake],
) -> None:
    term = terminal("--base-url", base_url, "--model", "picky")
    term.expect(PROMPT)
    term.type("hello")
    term.expect("error: 400: Tool messages are not supported by this model.")
    term.expect(PROMPT)  # a failed turn does not end the session
    os.write(term.fd, b"\x04")  # Ctrl-D at an empty prompt: end of input
    assert term.exit_code() == 0


def test_api_key_from_the_environment(terminal: Callable[..., Terminal]) -> None:
    echo = RecordingFake("echo", transform="reverse")
    settings = ServerSettings(api_keys=(API_KEY,))
    with running_server(create_app(settings, models={"echo": echo})) as url:
        refused = terminal("--base-url", f"{url}/v1")
        refused.expect("401: the server needs an API key (pass --api-key")
        assert refused.exit_code() == 1
        wrong = terminal("--base-url", f"{url}/v1", "--api-key", "sk-wrong-key")
        wrong.expect("401: Incorrect API key provided")
        assert wrong.exit_code() == 1

        term = terminal("--base-url", f"{url}/v1", CHATGLM_GATEWAY_API_KEY=API_KEY)
        term.expect(PROMPT)
        term.type("abc")
        term.expect("echo：cba")
        term.expect(PROMPT)
        term.type("stop")
        assert term.exit_code() == 0


def test_unknown_model_and_unreachable_server(
    terminal: Callable[..., Terminal], base_url: str,
) -> None:
    term = terminal("--base-url", base_url, "--model", "nope")
    term.expect("404: The model 'nope' does not exist")
    assert term.exit_code() == 1
    term = terminal("--base-url", "http://127.0.0.1:9/v1")
    term.expect("cannot reach http://127.0.0.1:9/v1")
    assert term.exit_code() == 1


# --------------------------------------------------------------------------- in-process checkpoint


def test_checkpoint_runs_in_process_without_a_server(
    terminal: Callable[..., Terminal], tmp_path: Path,
) -> None:
    from adapters.demo import ensure_demo_checkpoint

    folder = ensure_demo_checkpoint(tmp_path)
    term = terminal("--checkpoint", str(folder), "--max-tokens", "4", "--temperature", "0")
    term.expect(WELCOME, timeout=60)
    term.expect("is a demo model")
    term.expect(PROMPT)
    term.type("你好")
    term.expect(f"{folder.name}：")
    answer = term.expect(PROMPT)
    assert "error" not in answer
    term.type("stop")
    assert term.exit_code() == 0


# --------------------------------------------------------------------------- pieces in-process


def test_local_backend_streams_and_cancels_when_closed_early() -> None:
    fake = FakeChatModel("local", pieces=("a", "b", "c", "d"))
    backend = LocalBackend(fake, "", GenerationOptions(max_tokens=3))
    try:
        assert "".join(backend.stream([Message("user", "x")])) == "abc"  # max_tokens honoured
        stream = backend.stream([Message("user", "x")])
        assert isinstance(stream, Generator)
        assert next(stream) == "a"
        stream.close()  # like Ctrl-C: the generation is closed, not left running
        assert fake.counters.cancelled == 1 and fake.counters.active == 0
    finally:
        backend.close()
    assert fake.closed


def test_local_backend_reports_rejected_conversations() -> None:
    fake = FakeChatModel("local", prepare_error=InvalidRequest("no system role here"))
    backend = LocalBackend(fake, "", GenerationOptions())
    try:
        with pytest.raises(ChatError, match="no system role here"):
            list(backend.stream([Message("user", "x")]))
    finally:
        backend.close()


class ScriptedBackend:
    """Answers from a list; ``interrupt_after`` raises KeyboardInterrupt like Ctrl-C."""

    model_id = "scripted"
    description = "A demo model for tests"

    def __init__(self, interrupt_after: int | None = None, fail: bool = False) -> None:
        self.interrupt_after = interrupt_after
        self.fail = fail
        self.seen: list[list[tuple[str, str]]] = []

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        self.seen.append([(m.role, m.content) for m in messages])
        if self.fail:
            raise ChatError("429: busy")
        for i, piece in enumerate(["one ", "two ", "three"]):
            if self.interrupt_after is not None and i == self.interrupt_after:
                raise KeyboardInterrupt
            yield piece

    def close(self) -> None:
        raise AssertionError("the session must leave closing to its owner")


def session(backend: ScriptedBackend, lines: Sequence[str]) -> tuple[ChatSession, io.StringIO,
                                                                     io.StringIO, int]:
    feed = iter(lines)

    def read(prompt: str) -> str:
        assert prompt == f"\n{PROMPT}"
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    chat = ChatSession(backend, read=read, out=out, err=err)
    return chat, out, err, chat.run()


def test_session_keeps_a_stopped_answer_and_drops_a_failed_turn() -> None:
    backend = ScriptedBackend(interrupt_after=2)
    chat, out, _, code = session(backend, ["q1", "   ", "q2"])
    assert code == 0  # end of input
    assert "scripted：one two  [stopped]" in out.getvalue()
    assert "demo model" in out.getvalue()
    assert backend.seen == [[("user", "q1")],
                            [("user", "q1"), ("assistant", "one two "), ("user", "q2")]]

    failing = ScriptedBackend(fail=True)
    chat, out, err, code = session(failing, ["q1", "q2", "stop", "never read"])
    assert code == 0
    assert err.getvalue().count("error: 429: busy") == 2
    assert failing.seen == [[("user", "q1")], [("user", "q2")]]
    assert chat.history == []


def test_session_clear_outside_a_terminal_prints_no_escape_codes() -> None:
    backend = ScriptedBackend()
    chat, out, _, _ = session(backend, ["q1", "clear", "q2"])
    assert backend.seen[-1] == [("user", "q2")]
    assert CLEAR_SCREEN not in out.getvalue()  # StringIO is no tty
    assert out.getvalue().count(WELCOME) == 2


def test_ctrl_c_at_the_prompt_exits_130() -> None:
    def read(prompt: str) -> str:
        raise KeyboardInterrupt

    assert ChatSession(ScriptedBackend(), read=read, out=io.StringIO()).run() == 130
