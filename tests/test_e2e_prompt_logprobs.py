"""``echo`` + ``logprobs`` end to end: real checkpoint folders on a real uvicorn server, queried
with the official ``openai`` client and with the exact requests lm-evaluation-harness's
``local-completions`` model sends for log-likelihood tasks.

The expected numbers come from the same checkpoint loaded here and fed the whole chat prompt
at once (every position's logits); ChatGLM2's are also checked against THUDM's reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from operator import itemgetter

import httpx
import openai
import pytest
import torch

from adapters.conversation import Conversation
from adapters.family import CausalLM, FamilySpec, Tokenizer
from adapters.registry import FAMILIES, detect_family
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import checkpoint_dir, oracle, requires_reference
from tests.server import running_server

pytestmark = requires_reference

MODELS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "chatglm3-6b-tiny-safetensors"]
#: ids after the query's text in each family's prompt for a one-turn query ending in "."
#: (ChatGLM-6B: [gMASK] <sop>; ChatGLM2: "\n\n答：" as <0x0A> <0x0A> 答 ：; ChatGLM3: <|assistant|>)
TAIL = {"chatglm-6b-tiny": 2, "chatglm2-6b-tiny": 4, "chatglm3-6b-tiny-safetensors": 1}


class Local:
    """A checkpoint loaded here: the ids a one-turn prompt becomes and its logprob rows."""

    def __init__(self, name: str) -> None:
        folder = checkpoint_dir(name)
        self.spec: FamilySpec = FAMILIES[detect_family(folder)]
        self.tokenizer: Tokenizer = self.spec.load_tokenizer(folder)
        self.model: CausalLM = self.spec.load_model(
            folder, self.spec.read_config(folder), dtype=torch.float32, device=torch.device("cpu"))

    def ids(self, text: str) -> list[int]:
        return self.spec.build_prompt(self.tokenizer, Conversation(query=text))[0]

    def rows(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of every position's logits, the whole prompt fed at once."""
        logits = self.model.forward(ids, self.model.new_cache(), every_position=True)
        return torch.log_softmax(logits.double(), dim=-1)

    def token(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8")


@pytest.fixture(scope="module")
def local() -> dict[str, Local]:
    return {name: Local(name) for name in MODELS}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings = ServerSettings(models=tuple(
        ModelEntry(id=name, path=checkpoint_dir(name), dtype="float32", device="cpu")
        for name in MODELS))
    with running_server(create_app(settings), timeout=120, wait_ready=True) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("name", MODELS)
def test_echo_scores_the_prompt_text(client: openai.OpenAI, local: dict[str, Local],
                                     name: str) -> None:
    text = "The capital of France is Paris."
    completion = client.completions.create(model=name, prompt=text, echo=True, logprobs=2,
                                           max_tokens=0, temperature=0)
    (choice,) = completion.choices
    assert (choice.text, choice.finish_reason) == (text, "length")
    here = local[name]
    ids = here.ids(text)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    end = len(ids) - TAIL[name]
    start = end - len(lp.tokens)
    # the tokens of the text, not the chat format's (a SentencePiece dummy prefix aside)
    assert [here.token(i) for i in ids[start:end]] == lp.tokens
    assert "".join(lp.tokens).strip() == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    rows = here.rows(ids)
    for i in range(1, len(lp.tokens)):
        position = start + i - 1  # the row that predicts the id at start + i
        got, top = lp.token_logprobs[i], lp.top_logprobs[i]
        assert got is not None and top is not None
        assert abs(got - float(rows[position, ids[start + i]])) < 1e-4
        values, alternatives = rows[position, : here.tokenizer.vocab_size].topk(2)
        for alt, value in zip(alternatives.tolist(), values.tolist(), strict=True):
            assert abs(top[here.token(alt)] - value) < 1e-4
        assert top[lp.tokens[i]] == got  # the chosen token is always listed


def test_chatglm2_prompt_logprob_matches_the_reference(client: openai.OpenAI,
                                                       local: dict[str, Local]) -> None:
    """A prompt that contains the reference prompt followed by its first greedy token: that
    token's echoed logprob and alternatives are the reference logits minus their logsumexp."""
    name = "chatglm2-6b-tiny"
    case = oracle(name)["cases"][0]
    reference_ids = case["inputs"]["input_ids"][0]
    greedy = case["greedy_new_ids"][0]
    text = case["query"] + "\n\n答：" + local[name].tokenizer.decode([greedy])
    ids = local[name].ids(text)
    assert ids[: len(reference_ids) + 1] == reference_ids + [greedy]
    completion = client.completions.create(model=name, prompt=text, echo=True, logprobs=5,
                                           max_tokens=0)
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    index = len(reference_ids) - (len(ids) - TAIL[name] - len(lp.tokens))
    assert lp.tokens[index] == local[name].token(greedy)
    lse = case["last_logits_stats"]["logsumexp"]
    want = [v - lse for v in case["last_logits_topk"]["values"][:5]]
    got = lp.token_logprobs[index]
    assert got is not None and abs(got - want[0]) < 1e-4
    top = lp.top_logprobs[index]
    assert top is not None
    alternatives = sorted(top.values(), reverse=True)
    assert len(alternatives) == 5
    for g, w in zip(alternatives, want, strict=True):
        assert abs(g - w) < 1e-4


def test_streamed_echo_carries_the_same_logprobs(client: openai.OpenAI) -> None:
    name = "chatglm3-6b-tiny-safetensors"
    whole = client.completions.create(model=name, prompt="Once upon a time", echo=True,
                                      logprobs=1, max_tokens=3, temperature=0)
    chunks = list(client.completions.create(model=name, prompt="Once upon a time", echo=True,
                                            logprobs=1, max_tokens=3, temperature=0,
                                            stream=True))
    first = chunks[0].choices[0]
    assert first.text == "Once upon a time" and first.logprobs is not None
    expected = whole.choices[0].logprobs
    assert expected is not None and expected.tokens is not None
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs
                for t in ch.logprobs.token_logprobs or []]
    assert streamed == expected.token_logprobs
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text
    assert first.logprobs.tokens == expected.tokens[: len(first.logprobs.tokens or [])]


# ---------------------------------------------------------------- lm-evaluation-harness's requests

#: (context, continuation) pairs of a small multiple-choice style log-likelihood task
ITEMS = [(f"Question: What is {a} plus {b}?\nAnswer:", f" {a + b}") for a, b in
         [(1, 2), (2, 2), (3, 4), (5, 1), (6, 3)]] + [
    ("The sky is", " blue"), ("Water freezes at zero degrees", " Celsius"),
    ("Paris is the capital of", " France"), ("One, two, three,", " four"),
    ("The opposite of hot is", " cold"), ("A cat says", " meow"), ("Bees make", " honey"),
    ("天空是", "蓝色的"), ("中国的首都是", "北京"), ("Monday comes before", " Tuesday"),
    ("The sun rises in the", " east"), ("Ice is frozen", " water"),
    ("Red, green and", " blue"), ("Dogs like to chase", " cats"),
    ("Twelve months make a", " year"),
]


def _encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int],
                                                                              list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation;
    the continuation's ids are the whole's after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _parse_logprobs(out: dict, ctxlens: list[int], generated: int) -> list[tuple[float, bool]]:
    """lm-eval ``LocalCompletionsAPI.parse_logprobs`` (``generated`` ids trail the echo)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens,
                              strict=True):
        assert ctxlen > 0
        end = len(choice["logprobs"]["token_logprobs"]) - generated
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:end]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
        greedy = all(lp == max(top.values()) for lp, top in zip(logprobs, tops, strict=True))
        res.append((sum(logprobs), greedy))
    return res


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_requests(base_url: str, local: dict[str, Local],
                                        max_tokens: int) -> None:
    """What ``local-completions`` sends (``echo``, ``logprobs`` 1, ``max_tokens`` 1,
    temperature 0, prompts as text) and how it reads the answer: the continuation's summed
    logprob and whether it was the greedy choice, equal to the model's own numbers.  ChatGLM3
    encodes the prompt's text on its own, so lm-eval's token count of the context (``/tokenize``
    without special tokens) lines up with the echoed tokens exactly."""
    name = "chatglm3-6b-tiny-safetensors"
    here = local[name]
    # the first item's continuation is the model's own greedy next token: is_greedy must hold
    context = ITEMS[0][0]
    ids = here.ids(context)
    best = int(here.rows(ids)[len(ids) - 2, : here.tokenizer.vocab_size].argmax())
    items = [(context, here.tokenizer.decode([best]))] + ITEMS[1:]
    pairs = [_encode_pair(here.tokenizer, c, x) for c, x in items]
    prompts = [here.tokenizer.decode(c + x) for c, x in pairs]
    assert len(prompts) == 20
    payload = {"model": name, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens,
               "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx.post(f"{base_url}/v1/completions", json=payload, timeout=60).json()
    results = _parse_logprobs(out, [len(c) for c, _ in pairs], generated=max_tokens)
    for (context_ids, continuation_ids), prompt, (total, greedy) in zip(pairs, prompts, results,
                                                                        strict=True):
        full = here.ids(prompt)
        end = len(full) - 1  # before <|assistant|>
        first = end - len(continuation_ids)
        assert full[first - len(context_ids):end] == context_ids + continuation_ids
        rows = here.rows(full)
        picked = [rows[p - 1, full[p]] for p in range(first, end)]
        assert math.isclose(total, float(sum(picked)), abs_tol=1e-3)
        vocab = here.tokenizer.vocab_size
        argmax = [int(rows[p - 1, :vocab].argmax()) == full[p] for p in range(first, end)]
        assert greedy == all(argmax)
    assert results[0][1] is True
    assert not all(greedy for _, greedy in results)


def test_a_scored_echo_lists_the_stop_id_that_ends_the_answer(client: openai.OpenAI) -> None:
    """vLLM's lists hold every id, the stop id too; lm-eval drops the last entry as the
    generated token, so an answer that ends at once must still leave one."""
    name = "chatglm2-6b-tiny"
    completion = client.completions.create(model=name, prompt="Hi there", echo=True, logprobs=1,
                                           max_tokens=4, logit_bias={"2": 100})  # 2: </s>
    (choice,) = completion.choices
    assert (choice.text, choice.finish_reason) == ("Hi there", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens == 1
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs
    assert lp.tokens == ["Hi", " there", ""]  # THUDM's ChatGLM2 shows </s> as ""
    last = lp.token_logprobs[-1]  # the model's own distribution: logit_bias forced it
    assert last is not None and -9999 < last < 0
