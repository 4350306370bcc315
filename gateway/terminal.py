"""``chatglm-gateway chat``: chat in the terminal, like THUDM's ``cli_demo.py``.

::

    chatglm-gateway chat [--base-url URL] [--api-key KEY] [--model ID]
    chatglm-gateway chat --checkpoint PATH [--dtype D] [--device D]
    (both: [--max-tokens N] [--temperature T] [--top-p P])

A prompt loop: each line is a user turn, the answer streams as it arrives, ``clear`` forgets the
conversation (and clears the screen), ``stop`` or end of input (Ctrl-D) leaves, Ctrl-C stops the
answer being written.  It talks to a running gateway with the official ``openai`` client (the
same API every other client uses), or with ``--checkpoint`` loads a checkpoint folder into this
process through ``adapters.registry`` and needs no server.

This is a command-line program: it writes to stdout/stderr itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from adapters.base import AdapterError, ChatRequest, Delta, Message, SamplingParams

if TYPE_CHECKING:
    import openai

    from adapters.base import ChatModel

logger = logging.getLogger(__name__)

#: THUDM ChatGLM2-6B cli_demo.py's welcome line, commands included.
WELCOME = "欢迎使用 ChatGLM 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
USER_LABEL = "用户"
CLEAR_COMMAND = "clear"
STOP_COMMAND = "stop"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
API_KEY_ENVS = ("CHATGLM_GATEWAY_API_KEY", "OPENAI_API_KEY")
#: Sent when no key is configured: a gateway without keys ignores it, one with keys answers 401.
NO_KEY = "no-key"
#: ANSI "erase display, cursor home" (cli_demo.py runs `clear`/`cls` in a shell instead).
CLEAR_SCREEN = "\033[2J\033[H"
#: Exit status after Ctrl-C at the prompt (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class ChatError(Exception):
    """A turn or the connection failed; the message is for the person at the terminal."""


@dataclass(frozen=True)
class GenerationOptions:
    """The sampling flags; ``None`` leaves the choice to the server (or SamplingParams)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Backend(Protocol):
    """Where answers come from: a gateway over HTTP or a model in this process."""

    model_id: str
    description: str

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        """The answer's text, piece by piece; raises :class:`ChatError` when the turn fails."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- a running gateway


class RemoteBackend:
    """A gateway (or any OpenAI-compatible server) through the official client."""

    def __init__(self, client: openai.OpenAI, model_id: str, description: str,
                 options: GenerationOptions) -> None:
        self.client = client
        self.model_id = model_id
        self.description = description
        self.options = options

    @classmethod
    def connect(cls, base_url: str, api_key: str | None, model: str | None,
                options: GenerationOptions) -> RemoteBackend:
        """Open the client and pick the model (default: the first one the server lists)."""
        import openai

        # max_retries=0: a person is waiting; a failed turn is reported at once, not in 8 s.
        client = openai.OpenAI(base_url=base_url, api_key=api_key or NO_KEY, max_retries=0)
        try:
            with _api_errors(base_url, key_given=bool(api_key)):
                cards = {card.id: card for card in client.models.list()}
                if model is not None and model not in cards:
                    card = client.models.retrieve(model)  # an alias, or a clear 404
                    cards[model] = card
        except ChatError:
            client.close()
            raise
        if not cards:
            client.close()
            raise ChatError(f"the server at {base_url} serves no models")
        model_id = model if model is not None else next(iter(cards))
        description = str(getattr(cards[model_id], "description", "") or "")
        return cls(client, model_id, description, options)

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        import openai

        wire: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        given = self.options.given()
        with _api_errors(str(self.client.base_url)):
            response = self.client.chat.completions.create(
                model=self.model_id, messages=wire, stream=True,
                max_tokens=given.get("max_tokens", openai.NOT_GIVEN),
                temperature=given.get("temperature", openai.NOT_GIVEN),
                top_p=given.get("top_p", openai.NOT_GIVEN),
            )
            # Leaving the block (also by Ctrl-C) closes the HTTP stream; the gateway then
            # cancels the generation.
            with response:
                for chunk in response:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content

    def close(self) -> None:
        self.client.close()


@contextmanager
def _api_errors(base_url: str, key_given: bool = True) -> Iterator[None]:
    """openai's exceptions -> :class:`ChatError` with the server's own message."""
    import openai

    try:
        yield
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.message
        if exc.status_code == 401:
            # Without a key the server judged the placeholder: say what is really missing.
            message = message if key_given else "the server needs an API key"
            message += " (pass --api-key or set CHATGLM_GATEWAY_API_KEY)"
        raise ChatError(f"{exc.status_code}: {message}") from exc
    except openai.APIConnectionError as exc:
        raise ChatError(f"cannot reach {base_url}: {exc.message}") from exc
    except openai.APIError as exc:  # an error event inside the stream
        raise ChatError(exc.message) from exc


# --------------------------------------------------------------------------- in-process model


class LocalBackend:
    """A model in this process, driven on a private event loop (``generate`` is async)."""

    def __init__(self, model: ChatModel, description: str, options: GenerationOptions) -> None:
        self.model = model
        self.model_id = model.info.id
        self.description = description
        self.params = SamplingParams(**options.given())
        self.loop = asyncio.new_event_loop()

    @classmethod
    def load(cls, path: Path, dtype: str, device: str,
             options: GenerationOptions) -> LocalBackend:
        from adapters.demo import DEMO_DESCRIPTION, MARKER_FILE  # imports torch: lazily
        from adapters.registry import load_chat_model

        folder = Path(path).expanduser()
        is_demo = (folder / MARKER_FILE).is_file()
        try:
            model = load_chat_model(folder.name or "local", folder, dtype=dtype, device=device,
                                    description=DEMO_DESCRIPTION if is_demo else "")
        except (AdapterError, OSError, ValueError) as err:
            raise ChatError(f"cannot load {folder}: {err}") from err
        return cls(model, model.info.description, options)

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        try:
            prompt = self.model.prepare(ChatRequest(tuple(messages), self.params))
        except AdapterError as err:
            raise ChatError(err.message) from err
        deltas = self.model.generate(prompt)
        try:
            while True:
                delta = self._next(deltas)
                if delta is None:
                    return
                if delta.text:
                    yield delta.text
                if delta.finish_reason in ("error", "cancelled"):
                    raise ChatError(f"the generation ended with '{delta.finish_reason}'")
        finally:
            # Runs the generator's own finally: the engine cancels the request.
            if isinstance(deltas, AsyncGenerator):
                self.loop.run_until_complete(deltas.aclose())

    def _next(self, deltas: AsyncIterator[Delta]) -> Delta | None:
        """One step of the async generator; on Ctrl-C the step is cancelled before the
        KeyboardInterrupt goes on, so the generator can still be closed."""

        async def step() -> Delta | None:
            try:
                return await deltas.__anext__()
            except StopAsyncIteration:
                return None

        task = self.loop.create_task(step())
        try:
            return self.loop.run_until_complete(task)
        except BaseException:
            task.cancel()
            self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            raise

    def close(self) -> None:
        self.model.close()
        self.loop.close()


# --------------------------------------------------------------------------- the prompt loop


class ChatSession:
    """The read-answer loop over one backend; the conversation lives here."""

    def __init__(self, backend: Backend, read: Callable[[str], str] = input,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.backend = backend
        self.read = read
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.history: list[Message] = []

    def run(self) -> int:
        self.welcome()
        while True:
            try:
                text = self.read(f"\n{USER_LABEL}：")
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                return INTERRUPTED
            command = text.strip()
            if command == STOP_COMMAND:
                return 0
            if command == CLEAR_COMMAND:
                self.history = []
                if self.out.isatty():
                    self.write(CLEAR_SCREEN)
                self.welcome()
                continue
            if command:
                self.turn(text)

    def turn(self, text: str) -> None:
        """One exchange; a failed turn is reported and left out of the history."""
        question = Message(role="user", content=text)
        self.write(f"\n{self.backend.model_id}：")
        answer = ""
        try:
            for piece in self.backend.stream([*self.history, question]):
                answer += piece
                self.write(piece)
        except ChatError as error:
            self.write("\n")
            print(f"error: {error}", file=self.err, flush=True)
            return
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the program; what arrived stays in the history.
            self.write(" [stopped]")
        self.write("\n")
        self.history += [question, Message(role="assistant", content=answer)]

    def welcome(self) -> None:
        self.write(WELCOME + "\n")
        if "demo" in self.backend.description.lower():
            self.write(f"(note: '{self.backend.model_id}' is a demo model with random weights: "
                       "its answers are meaningless)\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


# --------------------------------------------------------------------------- command line


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``chatglm-gateway chat``."""
    remote = parser.add_argument_group("a running gateway (default)")
    remote.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"the gateway's OpenAI base URL (default {DEFAULT_BASE_URL})")
    remote.add_argument("--api-key", help="the API key (default: $CHATGLM_GATEWAY_API_KEY, "
                        "then $OPENAI_API_KEY)")
    remote.add_argument("--model", help="the model id (default: the first in /v1/models)")
    local = parser.add_argument_group("a checkpoint in this process (no server)")
    local.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="load this ChatGLM checkpoint folder instead of using a server")
    local.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="compute dtype with --checkpoint (default auto)")
    local.add_argument("--device", default="auto",
                       help="cpu, cuda or cuda:N with --checkpoint (default auto)")
    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max-tokens", type=int, help="longest answer, in tokens")
    sampling.add_argument("--temperature", type=float, help="0 = greedy")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling mass")


def run_chat(args: argparse.Namespace) -> int:
    """Run the chat loop from parsed ``add_chat_arguments`` flags; returns the exit status."""
    options = GenerationOptions(args.max_tokens, args.temperature, args.top_p)
    backend: Backend
    try:
        if args.checkpoint is not None:
            backend = LocalBackend.load(args.checkpoint, args.dtype, args.device, options)
        else:
            api_key = args.api_key or next(
                (os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
            backend = RemoteBackend.connect(args.base_url, api_key, args.model, options)
    except ChatError as error:
        print(f"chatglm-gateway chat: {error}", file=sys.stderr)
        return 1
    try:
        _enable_line_editing()
        return ChatSession(backend).run()
    finally:
        backend.close()


def _enable_line_editing() -> None:
    """Arrow keys and history in ``input()`` where the platform has readline."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns it on)
        except ImportError:  # Windows has no readline; input() still works
            logger.debug("readline unavailable: plain input")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatglm-gateway chat",
                                     description="Chat with a ChatGLM model in the terminal.")
    add_chat_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_chat(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
