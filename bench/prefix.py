"""Time to first token across the turns of one conversation, with and without prefix reuse.

    python -m bench.prefix [--preset mid] [--mode int4] [--turns 10] [--user-tokens 150]
                           [--chats 1]

A chat client resends the whole history every turn, so without reuse turn n prefills every earlier
turn again.  The engine's prefix cache (``prefix_cache=`` of ``load_chat_model`` / ``Engine``)
keeps the finished request's KV cache and prefills only what is new.  This script runs the same
conversation (user turns of ``--user-tokens`` tokens of corpus text, answers of ``--answer-tokens``
greedy tokens with eos banned, each answer appended to the history as the client would) through a
random in-memory model served by the real engine, once per setting, and prints each turn's prompt
length, the prompt tokens it took from the cache (``cached_tokens``) and its time to first token.
With ``--chats N`` N conversations alternate turn by turn on the one engine (what a replica gets
from the conversation-affinity router): each should still find its own history in the cache.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.base import ChatRequest, Message, SamplingParams
from adapters.chat_model import TorchChatModel
from bench.common import (
    MODES,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    shape_from_args,
)
from bench.workload import (
    ANSWERS,
    NO_EOS,
    add_answers_argument,
    load_tokenizer,
    served,
    user_text,
)

logger = logging.getLogger("bench.prefix")


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft: float
    answer: str


async def one_turn(chat: TorchChatModel, messages: list[Message], max_tokens: int,
                   bias: tuple[tuple[int, float], ...] = NO_EOS) -> Turn:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias)
    start = time.perf_counter()
    prompt = chat.prepare(ChatRequest(tuple(messages), params))
    ttft = None
    parts = []
    cached = 0
    async for delta in chat.generate(prompt):
        if delta.text and ttft is None:
            ttft = time.perf_counter() - start
        parts.append(delta.text)
        if delta.usage is not None and delta.usage.prompt_tokens_details is not None:
            cached = delta.usage.prompt_tokens_details.cached_tokens
    return Turn(len(prompt.token_ids), cached,
                ttft if ttft is not None else time.perf_counter() - start, "".join(parts))


def conversations(chat: TorchChatModel, user_turns: list[list[str]], max_tokens: int,
                  bias: tuple[tuple[int, float], ...] = NO_EOS) -> list[list[Turn]]:
    """One conversation per list of user turns, alternating turn by turn: each one's turns."""
    histories: list[list[Message]] = [[] for _ in user_turns]
    turns: list[list[Turn]] = [[] for _ in user_turns]
    for i in range(max(len(t) for t in user_turns)):
        for c, messages in enumerate(histories):
            if i >= len(user_turns[c]):
                continue
            messages.append(Message(role="user", content=user_turns[c][i]))
            turn = asyncio.run(one_turn(chat, messages, max_tokens, bias))
            messages.append(Message(role="assistant", content=turn.answer))
            turns[c].append(turn)
            logger.info("chat %d turn %d: %d prompt tokens, %d cached, TTFT %.2f s", c + 1, i + 1,
                        turn.prompt_tokens, turn.cached_tokens, turn.ttft)
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--mode", choices=sorted(MODES), default="int4")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--chats", type=int, default=1,
                        help="conversations alternating turn by turn on the one engine")
    parser.add_argument("--reuse-only", action="store_true",
                        help="skip the run without prefix reuse (it re-prefills every turn: "
                        "minutes per turn with the 6b preset)")
    add_answers_argument(parser)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = shape_from_args(args)
    tokenizer = load_tokenizer(args.cache_dir)
    model = build_model(shape, args.mode)
    bias = ANSWERS[args.answers](tokenizer)
    user_turns = [[user_text(tokenizer, args.user_tokens, 11 * i + 5 * c)
                   for i in range(args.turns)] for c in range(args.chats)]
    results: dict[bool, list[list[Turn]]] = {}
    for reuse in (True,) if args.reuse_only else (False, True):
        chat = served(model, tokenizer, prefix_cache=reuse, max_running=1)
        try:
            asyncio.run(one_turn(chat, [Message(role="user", content="warm up")], 2))
            logger.info("prefix_cache=%s", reuse)
            results[reuse] = conversations(chat, user_turns, args.answer_tokens, bias)
        finally:
            chat.close()

    rows = []
    for c, chat_turns in enumerate(results[True]):
        for i, on in enumerate(chat_turns, start=1):
            off = f"{results[False][c][i - 1].ttft:.2f}" if False in results else "-"
            row = [str(i), str(on.prompt_tokens), str(on.cached_tokens), off, f"{on.ttft:.2f}"]
            rows.append(([str(c + 1)] if args.chats > 1 else []) + row)
    print(f"\n{shape.describe()}; weights {args.mode}; {machine_summary()}; user turns of "
          f"~{args.user_tokens} tokens, answers of {args.answer_tokens} tokens ({args.answers})"
          + (f"; {args.chats} chats alternating" if args.chats > 1 else "") + "\n")
    print(markdown_table(
        (["chat"] if args.chats > 1 else [])
        + ["turn", "prompt tokens", "cached tokens", "TTFT s, no reuse", "TTFT s, prefix reuse"],
        rows))
    for reuse, label in ((False, "no reuse"), (True, "prefix reuse")):
        for c, turns in enumerate(results.get(reuse, [])):
            name = f"chat {c + 1}, " if args.chats > 1 else ""
            print(f"\n{name}{label}: TTFT turn {len(turns)} / turn 1 = "
                  f"{turns[-1].ttft / turns[0].ttft:.2f}")


if __name__ == "__main__":
    main()
