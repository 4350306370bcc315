"""The engine: one thread per loaded model that runs every request's generation.

The engine sees token ids only.  Each step it admits waiting requests (up to ``max_running`` and
within the KV-cache memory budget), prefills up to one chunk of new prompt tokens, then decodes
one token for every running request in a single batched forward (continuous batching: requests join
and leave between steps).  Each request keeps its own KV cache, sampler (seed, penalties),
detokenizer, post-processor and stop matcher, so a request gives the same result alone or inside a
batch.  With speculative decoding (``speculative=``) a sequence may bring drafted ids to a step:
they are verified in the same batched forward and the step can advance it by several tokens
(``adapters/runtime/speculative.py``).

Memory: a finished request's cache is kept in the :class:`PrefixCache` for the next turn of the same
conversation (a request sharing only part of it gets a copy, a running cache like any other);
that store is shrunk first when running requests need memory.  When the running
caches alone outgrow the budget, the most recently admitted request is preempted: its cache is
dropped and it waits again at the head of the queue, to be recomputed (prompt + what it generated
so far) when memory allows — vLLM's recompute preemption.  Its output is unaffected.

Results go back to the asyncio side through a callback (``deliver``) that the caller makes
thread-safe; cancellation is a flag the engine checks at every step.  A cancelled, finished or
failed request releases its cache in one place (``_finish``).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.base import (
    CompletionTokensDetails,
    Delta,
    InvalidRequest,
    Outcome,
    Overloaded,
    Prompt,
    PromptTokensDetails,
    SamplingParams,
    TokenLogprob,
    ToolCallPart,
    TopLogprob,
    Usage,
)
from adapters.family import (
    CausalLM,
    FamilySpec,
    KVCache,
    StreamPostprocessor,
    StreamsToolCalls,
    Tokenizer,
)
from adapters.runtime.detokenize import IncrementalDecoder, StopMatcher, StripText
from adapters.runtime.grammar import GrammarMatcher, GrammarViolation, TokenGrammar
from adapters.runtime.prefix_cache import PrefixCache
from adapters.runtime.prompt_logprobs import PromptScorer
from adapters.runtime.sampler import SamplerState, choose, logprob_entries
from adapters.runtime.speculative import Drafter, SpeculativeConfig, prediction_usage

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt: Prompt
    deliver: Callable[[Delta], None]
    sampler: SamplerState
    decoder: IncrementalDecoder
    post: StreamPostprocessor
    stop: StopMatcher
    #: the grammar's state (constrained decoding); it only moves with accepted tokens, so a
    #: preempted request resumes with it as it was
    matcher: GrammarMatcher | None = None
    cache: KVCache | None = None
    #: ids still to feed before decoding (prompt, or prompt + generated after a preemption)
    pending: list[int] = field(default_factory=list)
    ready: bool = False  # everything fed: the next step decodes
    generated: list[int] = field(default_factory=list)
    #: prompt tokens whose KV came from the prefix cache at the first admission
    cached: int = 0
    #: collects the prompt's logprobs during the first prefill (``prompt_logprobs``)
    scorer: PromptScorer | None = None
    #: prompt-lookup drafting (speculative decoding); None: one token per step
    drafter: Drafter | None = None
    cancelled: bool = False
    done: bool = False


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        spec: FamilySpec,
        *,
        name: str,
        grammar: TokenGrammar | None = None,
        max_running: int = 8,
        max_waiting: int = 64,
        kv_cache_bytes: int = 4 * 1024**3,
        prefix_cache: bool = True,
        prefill_chunk: int = 512,
        speculative: SpeculativeConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name
        self.grammar = grammar
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.kv_cache_bytes = kv_cache_bytes
        # Chunking and reuse need causal attention over the prompt (not ChatGLM-6B's prefix-LM).
        self.prefill_chunk = prefill_chunk if spec.causal_prompt else 0
        self.prefix = PrefixCache(kv_cache_bytes if prefix_cache and spec.causal_prompt else 0)
        self.preempted = 0  # requests preempted so far (KV budget), for logs and tests
        self.speculative = speculative
        #: speculative decoding so far: draft ids verified, and those accepted (/metrics)
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from the event loop

    @property
    def capacity(self) -> int:
        """Generations the engine holds at most: running plus waiting for a slot."""
        return self.max_running + self.max_waiting

    def check_capacity(self, generations: int = 1) -> None:
        """Raise :class:`Overloaded` (429) unless ``generations`` more fit beside those held
        now, and :class:`InvalidRequest` (400) when they could never fit."""
        if generations > self.capacity:
            raise InvalidRequest(
                f"The request asks for {generations} generations (prompts x n); model "
                f"'{self.name}' runs at most {self.capacity} at once ({self.max_running} "
                f"running + {self.max_waiting} waiting).", param="n")
        with self._cv:
            self._check_room(generations)

    def _check_room(self, generations: int) -> None:
        held = len(self._running) + len(self._waiting)
        if held + generations > self.capacity:
            raise Overloaded(
                f"Model '{self.name}' is at capacity ({held} of {self.capacity} generations "
                "running or waiting). Please retry shortly.", retry_after=1.0)

    def submit(self, prompt: Prompt, deliver: Callable[[Delta], None]) -> Sequence:
        matcher = None
        if prompt.grammar is not None:
            if self.grammar is None:
                raise RuntimeError(f"engine {self.name} has no grammar support")
            matcher = self.grammar.matcher(self.grammar.compile(prompt.grammar))
        seq = Sequence(
            prompt=prompt,
            deliver=deliver,
            sampler=SamplerState(prompt.params, self.tokenizer.vocab_size, prompt.token_ids),
            decoder=IncrementalDecoder(self.tokenizer),
            post=self._postprocessor(prompt),
            stop=StopMatcher(prompt.params.stop),
            matcher=matcher,
            drafter=self._drafter(prompt),
        )
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            # Counted with the append, under the lock: a burst can never overfill the queue.
            self._check_room(1)
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def _drafter(self, prompt: Prompt) -> Drafter | None:
        """Speculation for ``prompt``: prompt lookup when the engine speculates, and drafts from
        the request's prediction (OpenAI's Predicted Outputs) whether it does or not."""
        if self.speculative is None and prompt.prediction_ids is None:
            return None
        return Drafter(self.speculative or SpeculativeConfig(), prompt.token_ids,
                       prompt.prediction_ids, prompt_lookup=self.speculative is not None)

    def _postprocessor(self, prompt: Prompt) -> StreamPostprocessor:
        """The family's post-processing, except for an answer held to a response format: the
        grammar checked the exact text, which the family's rewrites (ChatGLM-6B's punctuation,
        ChatGLM3's metadata line) could break; it is only stripped, as every family does."""
        if prompt.grammar is not None and not prompt.tools:
            return StripText()
        return self.spec.new_postprocessor(prompt.tools)

    def cancel(self, seq: Sequence) -> None:
        """Ask the engine to drop ``seq`` at its next step (no-op when already finished)."""
        if not seq.done:
            seq.cancelled = True
            with self._cv:
                self._cv.notify()

    def counts(self) -> dict[str, int]:
        """Generations running, and waiting for a running slot (those the next step admits into
        free slots are not waiting for one); with speculative decoding (or once a request's
        prediction was drafted from), the draft ids verified and accepted so far."""
        with self._cv:
            running = len(self._running)
            free = max(self.max_running - running, 0)
            counts = {"running": running, "waiting": max(len(self._waiting) - free, 0)}
        if self.speculative is not None or self.drafted_tokens:
            counts["speculative_drafted"] = self.drafted_tokens
            counts["speculative_accepted"] = self.accepted_tokens
        return counts

    def cache_counts(self) -> dict[str, int]:
        """The KV-cache budget and what running requests plus the prefix store hold of it, and
        the prefix cache's prompt tokens looked up / reused so far (what ``/metrics`` reports as
        KV-cache usage and prefix-cache hit rate)."""
        with self._cv:
            running = sum(s.cache.nbytes for s in list(self._running) if s.cache is not None)
        return {"kv_cache_bytes": self.kv_cache_bytes,
                "kv_cache_used_bytes": running + self.prefix.nbytes,
                "prefix_cache_queried_tokens": self.prefix.queried_tokens,
                "prefix_cache_hit_tokens": self.prefix.reused_tokens}

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while self._wait_for_work():
            try:
                self._admit()
                self._step()
            except Exception:  # a fault in model code must not kill the thread or other clients
                logger.exception("engine %s: step failed; failing its running requests", self.name)
                for seq in list(self._running):
                    self._finish(seq, "error")
                self.prefix.clear()
        with self._cv:
            pending = list(self._waiting) + self._running
            self._waiting.clear()
            self._running.clear()
        for seq in pending:
            self._finish(seq, "cancelled")
        self.prefix.clear()

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not self._closed and not self._waiting and not self._running:
                self._cv.wait()
            return not self._closed

    def _admit(self) -> None:
        with self._cv:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                seq.done = True
            while self._waiting and len(self._running) < self.max_running:
                if not self._fits(self._waiting[0]):
                    break
                self._running.append(self._waiting.popleft())

    def _running_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self._running if s.cache is not None)

    def _fits(self, seq: Sequence) -> bool:
        """Admit ``seq`` only if its prompt's KV fits next to the running caches (a request alone
        is always admitted, so a long prompt can never starve); shrink the prefix store first."""
        if not self._running:
            return True
        need = (len(seq.prompt.token_ids) + len(seq.generated)) * self.model.kv_bytes_per_token
        room = self.kv_cache_bytes - self._running_bytes() - need
        if room < 0:
            return False
        self.prefix.shrink_to(room)
        return True

    def _step(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "cancelled")
        if not self._running:
            return
        filling = [s for s in self._running if not s.ready]
        decoding = [s for s in self._running if s.ready]
        # Prefill up to one chunk of prompt tokens per step, across as many new requests as fit
        # (several short prompts arriving together all start this step); a family that cannot
        # chunk (prefill_chunk 0) prefills one whole prompt per step.
        room = self.prefill_chunk
        for seq in filling:
            room -= self._prefill(seq, room if room > 0 else None)
            if room <= 0:
                break
        if decoding:
            drafts = [self._draft(s) for s in decoding]
            if any(drafts):
                self._verify(decoding, drafts)
            else:
                caches = [s.cache for s in decoding if s.cache is not None]
                last = [[s.generated[-1]] for s in decoding]
                with torch.inference_mode():
                    if len(decoding) == 1:
                        rows = self.model.forward(last[0], caches[0])[None]
                    else:
                        rows = self.model.forward_batch(last, caches)
                self._sample(decoding, rows)
        self._enforce_budget()

    def _draft(self, seq: Sequence) -> list[int]:
        """Draft ids for ``seq``'s next step (none without speculation).  Bounded so that every
        id the step could emit (the drafts and one more) stays within ``max_tokens`` and the
        context window."""
        if seq.drafter is None or seq.cache is None:
            return []
        room = min(seq.prompt.max_tokens - len(seq.generated),
                   self.model.context_length - seq.cache.length) - 1
        draft = seq.drafter.propose(seq.generated, room)
        if draft and seq.matcher is not None:
            # verifying ids the grammar forbids would be wasted work (the masks still decide)
            draft = draft[:seq.matcher.valid_prefix(draft)]
        return draft

    def _verify(self, seqs: list[Sequence], drafts: list[list[int]]) -> None:
        """One decode step that feeds each sequence its last id and its drafts (none for some)
        in one forward, then walks the rows position by position as plain decoding would (see
        adapters/runtime/speculative.py): a sequence keeps sampling while its pick equals its
        draft; its cache is then cut back to the ids it accepted."""
        fed = [[s.generated[-1], *d] for s, d in zip(seqs, drafts, strict=True)]
        caches = [s.cache for s in seqs if s.cache is not None]
        starts = [c.length for c in caches]
        with torch.inference_mode():
            rows = self.model.forward_batch(fed, caches, every_position=True)
        per_seq = rows.split([len(f) for f in fed])
        before = [len(s.generated) for s in seqs]
        accepted = [0] * len(seqs)
        walking = list(range(len(seqs)))
        for i in range(max(len(f) for f in fed)):
            if not walking:
                break
            self._sample([seqs[j] for j in walking], torch.stack([per_seq[j][i] for j in walking]))
            matched = [j for j in walking if i < len(drafts[j])
                       and len(seqs[j].generated) == before[j] + i + 1
                       and seqs[j].generated[-1] == drafts[j][i]]
            for j in matched:
                accepted[j] += 1
            walking = [j for j in matched if not seqs[j].done]
        for seq, draft, start, kept in zip(seqs, drafts, starts, accepted, strict=True):
            if seq.cache is not None:  # still running: forget the rejected drafts' positions
                seq.cache.truncate(start + 1 + kept)
            if draft and seq.drafter is not None:
                seq.drafter.record(len(draft), kept)
                self.drafted_tokens += len(draft)
                self.accepted_tokens += kept

    def _prefill(self, seq: Sequence, limit: int | None) -> int:
        """Feed up to ``limit`` (None: all) of ``seq``'s pending ids; sample its first token when
        its prompt is complete.  Returns the number of ids fed."""
        if seq.cache is None:
            # A preempted request resumes with what it generated so far (the last id is fed by
            # the next decode step, as it would have been).
            target = list(seq.prompt.token_ids) + seq.generated[:-1]
            seq.scorer = self._scorer(seq.prompt) if not seq.generated else None
            # A scored prompt reuses KV only of the ids before its span: the rows from the
            # span's first id on must be computed.
            probe = target if seq.scorer is None else target[: seq.scorer.start + 1]
            found = self.prefix.take(probe) if self.prefix.max_bytes else None
            if found is None:
                seq.cache, reused = self.model.new_cache(), 0
            else:
                seq.cache, reused = found
            if not seq.generated:  # the first admission (a recompute is not the client's)
                seq.cached = reused
            seq.pending = target[reused:]
        n = len(seq.pending) if limit is None else limit
        chunk, seq.pending = seq.pending[:n], seq.pending[n:]
        first = seq.cache.length
        every = seq.scorer is not None and seq.scorer.wants(first, len(chunk))
        with torch.inference_mode():
            if every:
                assert seq.scorer is not None
                rows = self.model.forward(chunk, seq.cache, every_position=True)
                seq.scorer.add(first, rows)
                logits = rows[-1]
            else:
                logits = self.model.forward(chunk, seq.cache)
        if not seq.pending:
            seq.ready = True
            if not seq.generated:
                self._read_prompt(seq, logits)
        return len(chunk)

    def _scorer(self, prompt: Prompt) -> PromptScorer | None:
        if not prompt.params.prompt_logprobs or prompt.scored is None:
            return None
        return PromptScorer(prompt.token_ids, prompt.scored, prompt.params.top_logprobs,
                            self.tokenizer.vocab_size, self.token_repr)

    def _read_prompt(self, seq: Sequence, last: torch.Tensor) -> None:
        """The prompt is in: deliver its logprobs (when asked), then sample the first token
        from ``last`` (the last position's logits), unless no token is wanted."""
        if seq.scorer is not None:
            scored, seq.scorer = seq.scorer.result(), None
            if scored is not None:
                seq.deliver(Delta(prompt_logprobs=scored))
        if seq.prompt.max_tokens == 0:
            self._finish(seq, "length")
        else:
            self._sample([seq], last[None])

    def _enforce_budget(self) -> None:
        """Running caches over the budget: preempt the newest requests (never the last one)."""
        while len(self._running) > 1 and self._running_bytes() > self.kv_cache_bytes:
            victim = self._running.pop()
            victim.cache, victim.ready, victim.pending = None, False, []
            self.preempted += 1
            logger.info("engine %s: KV budget exceeded, preempting a request (%d tokens so far)",
                        self.name, len(victim.generated))
            with self._cv:
                self._waiting.appendleft(victim)
        self.prefix.shrink_to(self.kv_cache_bytes - self._running_bytes())

    def _sample(self, seqs: list[Sequence], rows: torch.Tensor) -> None:
        """Advance each of ``seqs`` by one token from its row of ``rows`` (``[B, vocab]``),
        after masking the rows of sequences with a grammar (in one batched call)."""
        with torch.inference_mode():  # the rows are inference tensors: masks write in place
            self._sample_rows(seqs, rows.float().cpu())

    def _sample_rows(self, seqs: list[Sequence], rows: torch.Tensor) -> None:
        masked = rows
        matchers = [seq.matcher for seq in seqs]
        if self.grammar is not None and any(m is not None for m in matchers):
            # Logprobs report the model's own distribution: mask a copy when they are asked.
            if any(seq.prompt.params.logprobs for seq in seqs):
                masked = rows.clone()
            try:
                self.grammar.mask_batch(matchers, masked)
            except GrammarViolation as exc:
                logger.warning("engine %s: grammar failed (%s); ending those requests",
                               self.name, exc)
                failed = set(exc.rows)
                for i in sorted(failed):
                    self._finish(seqs[i], "error")
                keep = [i for i in range(len(seqs)) if i not in failed]
                seqs, rows, masked = [seqs[i] for i in keep], rows[keep], masked[keep]
        for i, seq in enumerate(seqs):
            self._advance(seq, rows[i], masked[i])

    def _advance(self, seq: Sequence, logits: torch.Tensor, masked: torch.Tensor) -> None:
        """Sample the next token of ``seq`` from ``masked`` (its grammar applied to ``logits``)
        and deliver what it adds."""
        token = choose(masked, seq.sampler)
        if seq.matcher is not None:
            seq.matcher.accept(token)
        seq.sampler.record(token)
        seq.generated.append(token)

        params = seq.prompt.params
        at_limit = len(seq.generated) >= seq.prompt.max_tokens
        ending = token in self.spec.stop_ids or (at_limit and self.spec.drop_last_token_on_length)
        if ending:
            if params.logprobs and params.ending_logprobs:
                seq.deliver(Delta(logprobs=self._logprobs(logits, token, params)))
            self._finish(seq, "stop" if token in self.spec.stop_ids else "length")
            return
        lps = self._logprobs(logits, token, params) if params.logprobs else ()
        text = seq.stop.feed(seq.post.feed(seq.decoder.push(token)))
        parts = _parts(seq.post)
        if seq.stop.stopped:
            seq.deliver(Delta(text=text, logprobs=lps, tool_call_parts=parts))
            self._finish(seq, "stop")
            return
        if at_limit:
            seq.deliver(Delta(text=text, logprobs=lps, tool_call_parts=parts))
            self._finish(seq, "length")
            return
        if text or lps or parts:
            seq.deliver(Delta(text=text, logprobs=lps, tool_call_parts=parts))

    def _finish(self, seq: Sequence, reason: Outcome) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        if seq.cache is not None and seq.ready and reason != "error":
            # The cache holds the prompt and every generated id but the last (never fed), and
            # may hold drafted ids past them when a verification step ended the request.
            held = list(seq.prompt.token_ids) + seq.generated[:-1]
            seq.cache.truncate(len(held))
            self.prefix.put(held, seq.cache, len(seq.prompt.token_ids))
        seq.cache = None  # the request's reference goes; the memory too unless kept for reuse
        if reason == "cancelled":
            return
        rest = ""
        if reason != "error" and not seq.stop.stopped:
            rest = seq.stop.feed(seq.post.feed(seq.decoder.flush()) + seq.post.finish())
            if seq.stop.stopped:
                reason = "stop"
            else:
                rest += seq.stop.flush()
        usage = Usage(prompt_tokens=len(seq.prompt.token_ids), completion_tokens=len(seq.generated),
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=seq.cached),
                      completion_tokens_details=_prediction_details(seq))
        calls = seq.post.tool_calls if reason != "error" else ()
        if calls:
            reason = "tool_calls"
        seq.deliver(Delta(text=rest, finish_reason=reason, usage=usage, tool_calls=calls,
                          tool_call_parts=_parts(seq.post) if reason != "error" else ()))

    def _logprobs(
        self, logits: torch.Tensor, token: int, params: SamplingParams
    ) -> tuple[TokenLogprob, ...]:
        chosen, top = logprob_entries(
            logits, token, params.top_logprobs, self.tokenizer.vocab_size
        )
        text, raw = self.token_repr(token)
        alternatives = []
        for alt, lp in top:
            alt_text, alt_raw = self.token_repr(alt)
            alternatives.append(TopLogprob(token=alt_text, logprob=lp, bytes=alt_raw))
        return (TokenLogprob(text, chosen, raw, tuple(alternatives)),)

    def token_repr(self, token: int) -> tuple[str, tuple[int, ...]]:
        """OpenAI's token string and bytes; a lone byte-fallback piece is shown as ``bytes:\\xNN``."""
        raw = self.tokenizer.token_bytes(token)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, tuple(raw)


def _prediction_details(seq: Sequence) -> CompletionTokensDetails | None:
    """How much of the request's prediction the answer took (None: no prediction)."""
    if seq.prompt.prediction_ids is None:
        return None
    accepted, rejected = prediction_usage(seq.prompt.prediction_ids, seq.generated)
    return CompletionTokensDetails(accepted_prediction_tokens=accepted,
                                   rejected_prediction_tokens=rejected)


def _parts(post: StreamPostprocessor) -> tuple[ToolCallPart, ...]:
    """Tool-call parts the post-processor found since the last step (families that stream
    their calls as they are generated)."""
    return post.take_parts() if isinstance(post, StreamsToolCalls) else ()
