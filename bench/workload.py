"""Serving-side helpers of the benchmarks: a tokenizer, a checkpoint folder on disk, prompts, and
streams run straight against a ``ChatModel`` (no HTTP) with their timings.

The tokenizer is the demo checkpoint's self-trained SentencePiece model
(:func:`adapters.demo.ensure_demo_checkpoint`): THUDM's tokenizer files are not part of the project.
Its vocabulary is small, but the model keeps the preset's padded vocabulary (65024), so the output
layer costs what it costs in ChatGLM2-6B.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters.base import ChatRequest, Message, ModelInfo, SamplingParams
from adapters.chat_model import TorchChatModel
from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.model import ChatGLM2Model
from adapters.demo import demo_config, demo_corpus, ensure_demo_checkpoint
from adapters.family import Tokenizer
from bench.common import ModelShape

#: ChatGLM2's ``</s>``: banned with a logit bias so that every stream runs to ``max_tokens``.
EOS_ID = 2
NO_EOS: tuple[tuple[int, float], ...] = ((EOS_ID, -100.0),)
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


#: logit_bias entries a request may carry (gateway.protocol.MAX_LOGIT_BIAS), one of them NO_EOS's
_MAX_BIAS = 300


def round_trip_answers(tokenizer: Tokenizer) -> tuple[tuple[int, float], ...]:
    """A logit bias that makes a random model answer in text that tokenizes back to the ids it
    generated, as a trained model's answers do: +100 on up to 299 single-CJK-character ids that
    no merge of the tokenizer can join (no piece holds two of them side by side, or one after
    ``：`` or before a newline, ChatGLM2's template around an answer), ``</s>`` banned.

    Why: a chat client sends the answer's text back next turn and the prompt tokenizes it again.
    A trained model's answer comes back as the ids it generated, so the prefix cache serves it; a
    random model's arbitrary ids do not (on the demo tokenizer 4 of 32 random ids survive a
    decode/encode round trip, and byte pieces come back as U+FFFD), so every turn would prefill
    the previous answer again, which no real conversation does.  (Biasing it onto whole English
    words ``▁word`` is no way out: its first word follows "答：" in the next prompt and comes back
    without the ``▁``; a trained ChatGLM2 generates the word as its template tokenizes it.)"""
    pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
    chars = {p: i for i, p in enumerate(pieces) if len(p) == 1 and "\u4e00" <= p <= "\u9fff"}
    # character pairs some piece holds side by side: BPE could merge them
    pairs = {(a, b) for p in pieces for a, b in itertools.pairwise(p.replace("\u2581", ""))}
    allowed = set(chars) - {b for a, b in pairs if a == "："} - {a for a, b in pairs if b == "\n"}
    while True:  # drop the character in most mergeable pairs until none is left
        clashes = collections.Counter(c for pair in pairs if set(pair) <= allowed for c in pair)
        if not clashes:
            break
        allowed.discard(clashes.most_common(1)[0][0])
    ids = sorted(chars[c] for c in allowed)[: _MAX_BIAS - len(NO_EOS)]
    return NO_EOS + tuple((token_id, 100.0) for token_id in ids)


#: What the random model's answers are made of (``--answers``): a logit bias per choice.
ANSWERS: dict[str, Callable[[Tokenizer], tuple[tuple[int, float], ...]]] = {
    "round-trip": round_trip_answers,
    "raw": lambda tokenizer: NO_EOS,
}


def add_answers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answers", choices=sorted(ANSWERS), default="round-trip",
                        help="round-trip (default): answers in text that tokenizes back to the "
                        "generated ids, as a trained model's do (bench.workload."
                        "round_trip_answers); raw: the random model's arbitrary ids")


def demo_tokenizer_folder(cache_dir: Path) -> Path:
    return ensure_demo_checkpoint(Path(cache_dir))


def load_tokenizer(cache_dir: Path) -> Tokenizer:
    return V2_SPEC.load_tokenizer(demo_tokenizer_folder(cache_dir))


def write_checkpoint(folder: Path, shape: ModelShape, cache_dir: Path, *, seed: int = 0) -> Path:
    """A folder laid out like THUDM's chatglm2-6b repository (config.json with THUDM's keys, one
    ``model.safetensors`` with THUDM's tensor names, fp16 random weights) with the demo tokenizer.
    Reused when its config already matches."""
    cfg = shape.config
    config = demo_config() | {
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "kv_channels": cfg.kv_channels,
        "multi_query_group_num": cfg.multi_query_group_num,
        "ffn_hidden_size": cfg.ffn_hidden_size, "padded_vocab_size": cfg.padded_vocab_size,
        "vocab_size": cfg.padded_vocab_size, "seq_length": cfg.seq_length,
    }
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = demo_tokenizer_folder(cache_dir)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in ChatGLM2Model(cfg).named_parameters()}
    tensors = {}
    for name, dims in names.items():
        if name.endswith("layernorm.weight"):
            tensors[name] = torch.ones(dims, dtype=torch.float16)
        else:
            tensors[name] = torch.empty(dims, dtype=torch.float16).normal_(0, 0.02, generator=gen)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2))  # last: marks the folder complete
    return folder


def served(model: ChatGLM2Model, tokenizer: Tokenizer, model_id: str = "bench",
           **engine_options: Any) -> TorchChatModel:
    """An in-memory model served through the same ``ChatModel`` class the gateway uses."""
    info = ModelInfo(id=model_id, family="chatglm2", context_length=model.context_length)
    return TorchChatModel(info, V2_SPEC, tokenizer, model, **engine_options)


def user_text(tokenizer: Tokenizer, tokens: int, offset: int = 0) -> str:
    """About ``tokens`` tokens of natural text from the demo corpus, starting ``offset`` lines in
    (different offsets give different prompts)."""
    lines = [line for line in demo_corpus().splitlines() if line.strip()]
    out: list[str] = []
    i = offset
    while len(tokenizer.encode(" ".join(out))) < tokens:
        out.append(lines[i % len(lines)])
        i += 1
    return " ".join(out)


@dataclass(frozen=True)
class StreamResult:
    ttft: float  # seconds from the request to its first non-empty text
    total: float  # seconds from the request to its end
    tokens: int  # completion tokens


@dataclass(frozen=True)
class RunResult:
    streams: tuple[StreamResult, ...]
    wall: float

    @property
    def aggregate(self) -> float:
        """Completion tokens per second of wall time, all streams together."""
        return sum(s.tokens for s in self.streams) / self.wall

    def ttft_percentile(self, q: float) -> float:
        values = sorted(s.ttft for s in self.streams)
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def direct_stream(model: TorchChatModel, messages: list[Message],
                        params: SamplingParams) -> StreamResult:
    """One request straight through ``prepare`` / ``generate`` (what a route calls)."""
    start = time.perf_counter()
    prompt = model.prepare(ChatRequest(tuple(messages), params))
    ttft = None
    tokens = 0
    async for delta in model.generate(prompt):
        if delta.text and ttft is None:
            ttft = time.perf_counter() - start
        if delta.usage is not None:
            tokens = delta.usage.completion_tokens
    end = time.perf_counter() - start
    return StreamResult(ttft if ttft is not None else end, end, tokens)


async def direct_run(model: TorchChatModel, prompts: list[str], max_tokens: int) -> RunResult:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=NO_EOS)
    start = time.perf_counter()
    streams = await asyncio.gather(*(
        direct_stream(model, [Message(role="user", content=p)], params) for p in prompts
    ))
    return RunResult(tuple(streams), time.perf_counter() - start)
