"""Speculative decoding by prompt lookup: draft tokens copied from the sequence itself.

Why: one decode step reads every weight once to produce one token per sequence, so a lone
stream cannot beat the memory bandwidth bound by reading faster.  It can by checking several
tokens per weight pass.  Prompt lookup (vLLM's ``ngram`` method, llama.cpp's lookup decoding)
needs no draft model: when the last few tokens also occur earlier in the prompt or the answer,
the tokens that followed them there are a likely continuation (answers that quote or edit the
prompt: RAG, code edits, summaries, structured translations; and the loops of a weak model).

Each step, a :class:`Drafter` proposes up to ``num_speculative_tokens`` ids for its sequence; the
engine feeds ``[last, *draft]`` in one batched forward with the other sequences
(``CausalLM.forward_batch(..., every_position=True)``), which returns the logits after every fed
position, then walks those rows in order exactly as plain decoding would: row ``i`` is masked
(grammar), penalised and sampled by the sequence's own sampler, and the walk continues only
while the token picked equals draft ``i``.  The first mismatch is kept (it is what plain
decoding would have picked there); when every draft token matches, the last row gives one more
(bonus) token.  The cache is then cut back to the accepted positions.

Lossless, and why seeded sampling stays exactly reproducible: the sampler draws a categorical
sample by an exponential race (``argmax p / E`` with ``E ~ Exp(1)`` from the request's
generator), one draw per emitted token.  Drawn over the verified rows, the accepted prefix is
the sequence plain decoding draws with the same generator, so greedy *and* seeded outputs are
those of plain decoding (given equal logits), not only equal in distribution.  Seen as
speculative sampling against a one-hot draft ``t``: the race picks ``t`` with probability
``p(t)`` (accept), and conditioned on not picking it, picks ``j`` with ``p(j) / (1 - p(t))``:
the residual distribution with ``t`` removed, renormalised (Leviathan et al. 2023, Algorithm 1
with a deterministic draft).

Drafts shrink after a rejection and grow back when accepted whole, and drafting switches itself
off per sequence when too few drafted tokens are accepted (free text has few repeats), for a
number of steps that doubles each time, so a sequence that does not repeat itself pays almost
nothing.  Every decision depends on the sequence's own tokens only,
so a request's output does not depend on what it is batched with.

Predicted outputs (OpenAI's ``prediction`` field): a client that expects most of the answer
(an editor asking for a file back with one change) sends that text; its ids are a second draft
source for that request alone (:class:`PredictionLookup`), with or without ``--speculative``.
The same verification keeps it lossless: a wrong prediction costs verified rows, never a token.
"""

from __future__ import annotations

import bisect
import collections
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

#: Drafting methods by name (the ``--speculative`` flag); a row each.
METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt-lookup speculation for one model (names as vLLM's ``speculative_config``)."""

    method: Literal["ngram"] = "ngram"
    #: draft tokens verified per step (at most)
    num_speculative_tokens: int = 4
    #: the longest / shortest suffix n-gram looked up (the longest match wins)
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    #: drafting pauses when fewer than this share of the recently drafted tokens were accepted
    min_acceptance: float = 0.35
    #: decode steps of the first pause; each further pause doubles, up to ``max_pause``
    pause: int = 16
    max_pause: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; one of {METHODS}")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")


class PromptLookup:
    """The n-grams of one sequence (prompt + generated ids), indexed as they come.

    ``propose`` finds the longest suffix n-gram (``n_max`` down to ``n_min``) that also ends
    earlier, at its most recent earlier occurrence, and returns the ids that followed it there.
    A match close to the end continues into the draft itself (a repeating loop of period ``p``
    drafts the loop on, not just the ``p - 1`` ids before the end).
    """

    def __init__(self, prompt: Sequence[int], n_min: int, n_max: int):
        self.tokens = list(prompt)
        self._prompt = len(self.tokens)
        self._sizes = range(n_min, n_max + 1)
        self._last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}
        self._indexed = 0  # n-grams ending before this position are in ``_last``

    def sync(self, generated: Sequence[int]) -> None:
        """Append the sequence's generated ids not seen yet."""
        have = len(self.tokens) - self._prompt
        if len(generated) > have:
            self.tokens.extend(generated[have:])

    def propose(self, k: int) -> list[int]:
        tokens = self.tokens
        end = len(tokens)
        # Index every n-gram ending before the last position (the suffix itself must not match).
        for e in range(self._indexed, end - 1):
            for n in self._sizes:
                if e + 1 >= n:
                    self._last[n][tuple(tokens[e + 1 - n:e + 1])] = e
        self._indexed = max(self._indexed, end - 1)
        if k <= 0:
            return []
        for n in reversed(self._sizes):
            if end < n:
                continue
            found = self._last[n].get(tuple(tokens[end - n:]))
            if found is None:
                continue
            draft: list[int] = []
            for i in range(k):
                j = found + 1 + i  # j < end + i: an id of the sequence or one drafted just now
                draft.append(tokens[j] if j < end else draft[j - end])
            return draft
        return []


#: the longest draft verified for a request with a prediction: the client vouches for the text,
#: so longer drafts pay (each verified row costs far less than a decode step's weight pass)
PREDICTION_DRAFT_TOKENS = 8
#: ids in a row that continue the prediction where expected before a pause ends early: the
#: answer is back on the prediction after an edit the prediction did not foresee
PREDICTION_RESYNC = 3


class PredictionLookup:
    """The client's predicted answer as a draft source.

    A cursor marks the prediction's id expected next.  Each generated id that equals it
    *continues* the prediction and moves the cursor on.  Any other id re-anchors the cursor: the longest suffix n-gram of the
    answer (``n_max`` down to 1) that occurs in the prediction, at its first occurrence at or
    after the cursor (the answer moves forward through the prediction: after a replaced or
    dropped line it resumes a little further on, and an identical line earlier in the file,
    which may be nearer, is not where it is), else at its last occurrence before; the cursor
    goes just past it.  When none occurs the cursor stays (the answer may come back to the
    prediction there after an insertion).  Drafts are the ids from the cursor.
    """

    def __init__(self, prediction: Sequence[int], n_max: int):
        self.ids = list(prediction)
        self._sizes = range(1, n_max + 1)
        # n-gram -> the positions where it ends in the prediction, ascending; built on the first
        # re-anchoring (on the engine thread, and never for an answer that follows its prediction)
        self._index: dict[tuple[int, ...], list[int]] | None = None
        self.cursor = 0
        #: the last generated id was found in the prediction (continued it, or re-anchored)
        self.synced = True
        #: the last generated ids that continued the prediction at the cursor, in a row
        self.streak = 0
        self._seen = 0  # generated ids observed

    def observe(self, generated: Sequence[int]) -> None:
        """Follow the generated ids not observed yet."""
        ids = self.ids
        for i in range(self._seen, len(generated)):
            token = generated[i]
            if self.cursor < len(ids) and ids[self.cursor] == token:
                self.cursor += 1
                self.synced = True
                self.streak += 1
                continue
            self.streak = 0
            self.synced = self._reanchor(generated, i)
        self._seen = max(self._seen, len(generated))

    def _ends(self) -> dict[tuple[int, ...], list[int]]:
        if self._index is None:
            self._index = {}
            for n in self._sizes:
                for e in range(n - 1, len(self.ids)):
                    self._index.setdefault(tuple(self.ids[e + 1 - n:e + 1]), []).append(e)
        return self._index

    def _reanchor(self, generated: Sequence[int], last: int) -> bool:
        index = self._ends()
        for n in reversed(self._sizes):
            if last + 1 < n:
                continue
            ends = index.get(tuple(generated[last + 1 - n:last + 1]))
            if not ends:
                continue
            k = bisect.bisect_left(ends, self.cursor)
            self.cursor = (ends[k] if k < len(ends) else ends[-1]) + 1
            return True
        return False

    def propose(self, k: int) -> list[int]:
        return self.ids[self.cursor:self.cursor + k] if k > 0 else []


#: prediction ids x answer ids up to which :func:`prediction_usage` aligns the two with difflib.
#: Its cost grows with that product when the two share many short blocks (an answer that copies
#: the prediction three ids at a time with gaps: 0.1-0.2 s at 2,000 x 2,000, 3-10 s at 32k x 8k,
#: measured on the engine thread's host); an edit with few changes takes milliseconds either way.
#: Above it, a greedy in-order match counts (:func:`_in_order`).
ALIGN_BUDGET = 4_000_000


def prediction_usage(prediction: Sequence[int], generated: Sequence[int]) -> tuple[int, int]:
    """OpenAI's ``(accepted_prediction_tokens, rejected_prediction_tokens)``: "tokens in the
    prediction that appeared in the completion" and the others.  Measured as the ids the two
    share in order, as :class:`difflib.SequenceMatcher` aligns them (the longest common block,
    then the same on each side of it), not by what drafting happened to verify: an answer that
    repeats itself (a loop, an identical line) could otherwise be counted against the wrong
    copy.  A few milliseconds for a prediction of thousands of ids (its ``autojunk`` keeps
    ids frequent in the answer, spaces and newlines, from starting a block; blocks still extend
    over them); bounded by :data:`ALIGN_BUDGET`, since a client chooses the prediction and can
    steer the answer."""
    if len(prediction) * len(generated) <= ALIGN_BUDGET:
        matcher = difflib.SequenceMatcher(None, prediction, generated, autojunk=True)
        accepted = sum(block.size for block in matcher.get_matching_blocks())
    else:
        accepted = _in_order(prediction, generated)
    return accepted, len(prediction) - accepted


def _in_order(prediction: Sequence[int], generated: Sequence[int]) -> int:
    """Prediction ids the answer has in order, matched greedily: each answer id takes the
    prediction's next occurrence of it after the last one taken (a common subsequence, so at
    most difflib's count; the same on an edit that replaces, drops or inserts lines, lower when
    an inserted id occurs again further on).  O(len(answer) log len(prediction))."""
    where: dict[int, list[int]] = collections.defaultdict(list)
    for position, token in enumerate(prediction):
        where[token].append(position)
    taken, last = 0, -1
    for token in generated:
        positions = where.get(token)
        if positions:
            k = bisect.bisect_right(positions, last)
            if k < len(positions):
                taken, last = taken + 1, positions[k]
    return taken


class Drafter:
    """One sequence's drafting: its lookup index, its draft length and its switch-off state.

    Each verified position costs a little (a row more in every matmul), so drafts follow their
    own success: the first is half ``num_speculative_tokens`` long, a draft accepted whole
    doubles the next one's length (up to ``num_speculative_tokens``), a rejection cuts it to the
    ids accepted plus one; and when the
    last few verifications kept less than ``min_acceptance`` of their ids, drafting pauses.

    With a ``prediction`` (ids), it drafts from the prediction while the answer follows it and
    from the sequence itself (``prompt_lookup``, the ``--speculative`` method) otherwise; drafts
    may then be :data:`PREDICTION_DRAFT_TOKENS` long, and a pause ends early once the answer
    continues the prediction again (:data:`PREDICTION_RESYNC` ids in a row)."""

    def __init__(self, config: SpeculativeConfig, prompt: Sequence[int],
                 prediction: Sequence[int] | None = None, *, prompt_lookup: bool = True):
        self.config = config
        self.lookup = PromptLookup(prompt, config.prompt_lookup_min, config.prompt_lookup_max) \
            if prompt_lookup else None
        self.prediction = None if prediction is None \
            else PredictionLookup(prediction, config.prompt_lookup_max)
        self.longest = config.num_speculative_tokens if prediction is None \
            else max(config.num_speculative_tokens, PREDICTION_DRAFT_TOKENS)
        # of the next draft: half the longest at first (a first guess costs less when wrong)
        self.length = max(1, self.longest // 2)
        self._paused = 0  # decode steps left without drafting
        self._next_pause = config.pause
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=4)

    def propose(self, generated: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(limit, length)`` draft ids to follow ``generated`` (called once per
        decode step)."""
        prediction, lookup = self.prediction, self.lookup
        if prediction is not None:
            prediction.observe(generated)
            if self._paused > 0 and prediction.streak >= PREDICTION_RESYNC:
                self._paused = 0
        if lookup is not None:
            lookup.sync(generated)
        if self._paused > 0:
            self._paused -= 1
            if lookup is not None:
                # keep the index current (cheap) so a later lookup needs no catching up
                lookup.propose(0)
            return []
        k = min(limit, self.length)
        draft: list[int] = []
        if prediction is not None and prediction.synced:
            draft = prediction.propose(k)
        if lookup is not None:
            found = lookup.propose(0 if draft else k)  # (indexes the ids either way)
            draft = draft or found
        if not draft and prediction is not None:
            draft = prediction.propose(k)  # off the prediction: it may come back to it here
        return draft

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of one verification of ``drafted`` ids, ``accepted`` of them kept."""
        if drafted <= 0:
            return
        whole = accepted == drafted
        self.length = min(2 * self.length, self.longest) if whole \
            else accepted + 1
        self._recent.append((drafted, accepted))
        total = sum(d for d, _ in self._recent)
        kept = sum(a for _, a in self._recent)
        if len(self._recent) >= 2 and kept < self.config.min_acceptance * total:
            self._paused = self._next_pause
            self._next_pause = min(2 * self._next_pause, self.config.max_pause)
            self._recent.clear()
        elif whole:
            self._next_pause = self.config.pause  # repeats again: the next pause starts short
