"""Constrained decoding: a grammar decides which token ids may come next, via llguidance.

Three objects, from the longest-lived to the shortest:

* :class:`~adapters.base.GrammarSpec` what a request asks for (JSON schema, any JSON object,
  regex, a choice of strings, or a Lark grammar): plain data on the model boundary.
* :class:`TokenGrammar`  one per loaded model: the model's vocabulary as llguidance sees it (the
  exact bytes of every id), the stop ids, and a small cache of compiled grammars.
  :meth:`TokenGrammar.compile` raises :class:`GrammarError` at request time, never at a step.
* :class:`GrammarMatcher` one per sequence: ``mask(row)`` sets every id the grammar forbids to
  ``-inf``; ``accept(id)`` advances it.  :meth:`TokenGrammar.mask_batch` masks several rows in one
  parallel llguidance call.

What the grammar sees, and what the user finally gets
-----------------------------------------------------
llguidance matches the exact bytes of each generated id (``Tokenizer.token_bytes``: ``▁`` is a
space, ``<0xNN>`` its raw byte, ChatGLM-6B's ``<n>``/``<|tab|>``/``<|blank_n|>`` a newline, a tab
and n spaces).  The text a client gets is ``tokenizer.decode(ids).strip()``, which differs from
those bytes in three ways, each handled here:

1. SentencePiece's decoder drops the space of the first piece (``▁{`` decodes to ``{``).  Every
   grammar is therefore wrapped as ``start: " "? <grammar>``: the model may open with its natural
   ``▁``-prefixed piece, and the space it adds is exactly the one decoding drops.
2. The families strip the answer, so a grammar's own leading or trailing whitespace does not
   reach the client: grammars are matched modulo surrounding whitespace (JSON is unaffected).
3. ChatGLM-6B's ``decode`` applies transformers' ``clean_up_tokenization`` (``" ."`` -> ``"."``,
   ``" n't"`` -> ``"n't"``, ...), which would silently rewrite text inside JSON strings.  When a
   tokenizer's decode does that (probed once, see :func:`_decode_cleans_up`), each matcher also
   bans the ids that would create such a sequence (a space before ``. , ? ! '`` or ``n't``), so
   decoded text equals the bytes the grammar checked.  This is a preference, not a constraint: a
   step where the grammar allows nothing else keeps the grammar's own mask (then decoding
   rewrites that spot; such text cannot be produced through ChatGLM-6B's decode at all).

Text a grammar forces (property names, enum values, choices) is tokenized by greedy longest
match over those exact bytes, and only that tokenization's next id is allowed (llguidance keeps
forced text canonical); so ChatGLM-6B spells a forced newline with ``<n>``, spaces with
``<|blank_n|>``.  The family's ``encode`` cannot serve: SentencePiece adds a dummy-prefix space.

The family post-processors do more than strip (ChatGLM-6B widens ``, ! : ; ?`` next to CJK,
v2/v3 replace ``[[训练时间]]``, v3 splits a first metadata line): a caller serving a grammar
should strip only.

Ids that render as nothing or are not text (image, control, role, pad ids; the unknown piece)
are llguidance "special" tokens that no grammar here can produce, and they are also cleared from
every mask; only the stop ids are let through, and only once the grammar accepts.

Why these llguidance settings: JSON is compact by default (``whitespace_flexible=False``: no
whitespace between tokens, ``,`` and ``:`` separators), as OpenAI's answers look and because a
random or weak model otherwise wanders into whitespace.  Unknown JSON-schema keywords are an
error for a strict spec (``lenient=False``; OpenAI's ``strict: true`` schemas): an answer that
ignores part of such a schema is worse than a 400.  Other specs ignore them.
In a plain regex, ``\\d`` means ``[0-9]`` (what clients mean; Rust's ``\\d`` is any Unicode digit).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import llguidance
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from adapters.base import GrammarKind, GrammarSpec

logger = logging.getLogger(__name__)

KINDS: tuple[GrammarKind, ...] = ("json_schema", "json_object", "regex", "choice", "lark")


def lark_json(schema: dict[str, Any], *, strict: bool = True) -> str:
    """A tool's argument schema embedded in a Lark grammar (llguidance's ``%json``), compact like
    the ``json_schema`` kind (``%json`` alone would allow whitespace between tokens), with its
    objects closed (:func:`closed_objects`); ``strict``: unknown keywords are an error."""
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
               "lenient": not strict}
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": options},
                                 ensure_ascii=False)


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing about others.  For a function's arguments an undeclared
    one is never wanted (OpenAI's strict mode demands the same), and left open a weak model
    invents keys without end."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed_objects(value) if key not in ("enum", "const", "required") else value
           for key, value in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: closed_objects(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message is llguidance's reason."""


class GrammarViolation(RuntimeError):
    """A matcher was given an id its grammar forbids (the mask was not applied), llguidance
    failed at a step (a resource limit; the matcher stays failed until ``reset``/``replay``), or
    a grammar allows only ids that are never generated (a Lark grammar naming a special token).
    ``rows``: the positions in a :meth:`TokenGrammar.mask_batch` call that failed."""

    def __init__(self, message: str, rows: Sequence[int] = ()):
        super().__init__(message)
        self.rows = tuple(rows)


class TokenizerLike(Protocol):
    """What this module needs of :class:`adapters.family.Tokenizer`."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


# --------------------------------------------------------------------------- vocabulary


def _non_text_ids(tokenizer: TokenizerLike) -> set[int]:
    """Ids that are not text although they may render as some: ChatGLM-6B's control pieces
    (``is_control``), ChatGLM2/3's ``special_ids`` (v3 renders its role names) and the unknown
    piece (SentencePiece shows it as `` ⁇ ``).  Ids rendering as nothing are caught separately."""
    ids: set[int] = set()
    specials = getattr(tokenizer, "special_ids", None)
    if isinstance(specials, dict):
        ids.update(int(i) for i in specials.values())
    is_control = getattr(tokenizer, "is_control", None)
    piece = getattr(tokenizer, "piece", None)
    for i in range(tokenizer.vocab_size):
        if is_control is not None and is_control(i):
            ids.add(i)
        elif piece is not None and piece(i) == "<unk>":
            ids.add(i)
    return ids


def _decode_cleans_up(tokenizer: TokenizerLike) -> bool:
    """Whether ``decode`` rewrites a space before punctuation (transformers'
    ``clean_up_tokenization``, applied by ChatGLM-6B's reference decode)."""
    probes = ("a .", "a ,", "a ?", "a !", "a 's", "do n't")
    return any(tokenizer.decode(tokenizer.encode(p)) != p for p in probes)


# Byte sequences ``clean_up_tokenization`` rewrites, slightly widened: any apostrophe after a
# space (the reference rewrites " 's", " 'm", " 've", " 're" and " ' ").
_CLEANUP_PATTERNS = (b" .", b" ?", b" !", b" ,", b" '", b" n't")
# Guard states: the longest suffix of the text so far that begins a pattern ("" = none).
_GUARD_STATES = (b"", b" ", b" n", b" n'")


def _guard_run(state: bytes, data: bytes) -> tuple[bool, int]:
    """(whether ``state + data`` completes a pattern, index of the state after ``data``)."""
    text = state + data
    banned = any(p in text for p in _CLEANUP_PATTERNS)
    for index in range(len(_GUARD_STATES) - 1, 0, -1):
        if text.endswith(_GUARD_STATES[index]):
            return banned, index
    return banned, 0


# --------------------------------------------------------------------------- bit masks

# Float table of the 8 bits of a byte: +inf where set (allowed), -inf where clear.  One
# ``index_select`` of the mask's bytes plus one ``torch.minimum`` masks a row, faster than
# shift/compare unpacking and than ``llguidance.torch.apply_token_bitmask_inplace`` (which also
# needs a long torch.compile on first use); figures in bench/README.md (``bench.grammar``).
_BYTE_BITS = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(),
    float("inf"),
    float("-inf"),
)


def _words(n: int) -> int:
    return (n + 31) // 32


def _pack(ids: Iterable[int], n: int) -> torch.Tensor:
    """An int32 bit mask of ``n`` ids (llguidance's layout: id i is bit i % 32 of word i // 32)."""
    bits = torch.zeros(_words(n) * 32, dtype=torch.uint8)
    index = torch.tensor(sorted(set(ids)), dtype=torch.long)
    if index.numel():
        bits[index] = 1
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
    packed = (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return packed.view(torch.int32).clone()


def _apply(bitmask: torch.Tensor, logits: torch.Tensor, n: int, scratch: torch.Tensor) -> None:
    """Set ``logits[:, i]`` to -inf for every id ``i < n`` whose bit is clear and for every
    ``i >= n`` (padding).  ``bitmask``: int32 ``[B, words]``; ``logits``: float32 ``[B, V]``;
    ``scratch``: float32 ``[B, 32 * words]``, preallocated (a fresh 260 KB buffer per row costs
    an mmap and page faults each step).

    NaN logits stay NaN (``torch.minimum`` propagates NaN); the sampler treats such a row as
    broken anyway."""
    torch.index_select(_BYTE_BITS, 0, bitmask.view(torch.uint8).reshape(-1).int(),
                       out=scratch.view(-1, 8))
    head = logits[:, :n]
    torch.minimum(head, scratch[:, :n], out=head)
    if logits.shape[1] > n:
        logits[:, n:] = float("-inf")


# --------------------------------------------------------------------------- compiled grammars


class CompiledGrammar:
    """A grammar checked against a model's vocabulary.  Matchers are deep copies of a pristine
    llguidance matcher built once, so a repeated schema costs microseconds, not a compile."""

    def __init__(self, spec: GrammarSpec, grammar: str, prototype: LLMatcher):
        self.spec = spec
        #: llguidance's grammar (JSON text), e.g. for logging or another process
        self.grammar = grammar
        self._prototype = prototype
        self._lock = threading.Lock()

    def new_llmatcher(self) -> LLMatcher:
        with self._lock:
            return self._prototype.deep_copy()


def _leading_space(body: dict) -> str:
    """llguidance's top-level grammar: an optional space, then ``body`` as a sub-grammar."""
    body = dict(body, name="body")
    return json.dumps({"grammars": [{"lark_grammar": 'start: " "? @body'}, body]})


def _grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of ``spec`` (not yet validated)."""
    if spec.kind in ("json_schema", "json_object"):
        text = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be a JSON object")
        options: dict[str, Any] = {"whitespace_flexible": spec.whitespace_flexible,
                                   "lenient": not spec.strict}
        if not spec.whitespace_flexible:
            options |= {"item_separator": ",", "key_separator": ":"}
        try:
            compiled = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)  # type: ignore[arg-type]
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return _leading_space(json.loads(compiled)["grammars"][0])
    if spec.kind == "regex":
        return _leading_space({"lark_grammar": f"start: /{llguidance.regex_to_lark(spec.value, 'd')}/"})
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.value)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"choice must be a JSON list of strings: {exc}") from None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise GrammarError("choice must be a non-empty JSON list of non-empty strings")
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return _leading_space({"lark_grammar": f"start: {alternatives}"})
    if spec.kind == "lark":
        return _leading_space({"lark_grammar": spec.value})
    raise GrammarError(f"unknown grammar kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- per model


class TokenGrammar:
    """A model's vocabulary for llguidance, built once per loaded model (on the loading
    thread: it walks the whole vocabulary).

    ``stop_ids``: the ids that end a generation (``FamilySpec.stop_ids``); a mask lets them
    through exactly when the grammar accepts.  ``extra_special_ids``: more ids to never allow.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        stop_ids: Iterable[int],
        *,
        extra_special_ids: Iterable[int] = (),
        cache_size: int = 64,
        threads: int | None = None,
    ):
        n = int(tokenizer.vocab_size)
        stops = sorted({int(i) for i in stop_ids if 0 <= int(i) < n})
        if not stops:
            raise ValueError(f"no stop id inside the vocabulary (0..{n - 1})")
        self.vocab_size = n
        self.stop_ids: frozenset[int] = frozenset(stops)
        special = _non_text_ids(tokenizer) | {int(i) for i in extra_special_ids} | set(stops)
        tokens: list[bytes] = []
        #: exact bytes of each text id; b"" for ids no grammar may produce
        self.token_bytes: list[bytes] = []
        for i in range(n):
            data = tokenizer.token_bytes(i)
            if data and i not in special:
                tokens.append(data)
                self.token_bytes.append(data)
            else:
                special.add(i)
                # 0xFF never starts UTF-8: llguidance's marker of a special token (its name).
                tokens.append(b"\xff" + (data if data.startswith((b"<", b"[")) else
                                         f"<|special_{i}|>".encode()))
                self.token_bytes.append(b"")
        self._special = frozenset(special)
        self.text_ids = n - len(special)
        self._longest = max(len(b) for b in self.token_bytes)
        self._by_bytes: dict[bytes, int] = {}
        for i, data in enumerate(self.token_bytes):
            if data:
                self._by_bytes.setdefault(data, i)
        self.lltokenizer = LLTokenizer(
            llguidance.TokenizerWrapper(_Wrapper(tokens, stops, sorted(special), self._tokenize)),
            n_vocab=n,
            eos_token=stops,
        )
        #: bits of the ids a mask may ever allow: text ids and the stop ids
        self.allowed_words = _pack([i for i in range(n) if i not in special] + stops, n)
        self._guard_words: torch.Tensor | None = None
        if _decode_cleans_up(tokenizer):
            self._guard_words = self._build_guard()
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._threads = threads
        self._executor: LLExecutor | None = None
        self._scratch = threading.local()  # per-thread buffers of fill_bitmask / apply_bitmask

    # ---------------------------------------------------------------- construction helpers

    def _tokenize(self, data: bytes) -> list[int]:
        """llguidance's tokenize callback (it tokenizes the bytes a grammar forces, and then
        allows only that tokenization's next id): greedy longest match over the exact bytes.
        The family's ``encode`` cannot serve: SentencePiece adds a dummy-prefix space, and
        ChatGLM-6B normalises the text first.  Bytes no id spells are dropped (with byte
        fallback every byte has an id)."""
        out: list[int] = []
        pos = 0
        while pos < len(data):
            for size in range(min(self._longest, len(data) - pos), 0, -1):
                token = self._by_bytes.get(data[pos:pos + size])
                if token is not None:
                    out.append(token)
                    pos += size
                    break
            else:
                pos += 1
        return out

    def _build_guard(self) -> torch.Tensor:
        """Per guard state, the bits of the ids that would form a ``clean_up_tokenization``
        pattern after it (state 0: patterns inside the id itself)."""
        banned: list[list[int]] = [[] for _ in _GUARD_STATES]
        # Only ids starting with these bytes behave differently after a non-empty state.
        triggers = {c for s in _GUARD_STATES[1:] for c in range(256)
                    if _guard_run(s, bytes([c])) != _guard_run(b"", bytes([c]))}
        for i, data in enumerate(self.token_bytes):
            if not data or (b" " not in data and data[0] not in triggers):
                continue
            if data[0] in triggers:
                for index, state in enumerate(_GUARD_STATES):
                    if _guard_run(state, data)[0]:
                        banned[index].append(i)
            elif _guard_run(b"", data)[0]:  # same after every state
                for ids in banned:
                    ids.append(i)
        return torch.stack([_pack(ids, self.vocab_size) for ids in banned])

    def guard_step(self, state: int, token_id: int) -> int:
        """The guard state after ``token_id`` (stop ids and specials add no text)."""
        return _guard_run(_GUARD_STATES[state], self.token_bytes[token_id])[1]

    @property
    def guards_cleanup(self) -> bool:
        """Whether matchers avoid ``clean_up_tokenization`` patterns (ChatGLM-6B)."""
        return self._guard_words is not None

    def is_special(self, token_id: int) -> bool:
        """Whether no grammar may ever produce ``token_id`` as text."""
        return token_id in self._special

    # ---------------------------------------------------------------- compiling

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec``, from a small LRU cache (clients repeat schemas).

        Raises :class:`GrammarError` for a grammar llguidance rejects (bad JSON, an unknown or
        unsupported schema keyword, a regex or Lark syntax error) or one it cannot start."""
        if not isinstance(spec, GrammarSpec) or spec.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind; expected one of {', '.join(KINDS)}")
        with self._lock:
            found = self._cache.get(spec)
            if found is not None:
                self._cache.move_to_end(spec)
                return found
        grammar = _grammar_text(spec)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")
        for message in messages:
            logger.info("grammar %s: %s", spec.kind, message)
        prototype = LLMatcher(self.lltokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise GrammarError(prototype.get_error())
        compiled = CompiledGrammar(spec, grammar, prototype)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, grammar: GrammarSpec | CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher for one sequence."""
        compiled = grammar if isinstance(grammar, CompiledGrammar) else self.compile(grammar)
        return GrammarMatcher(self, compiled)

    # ---------------------------------------------------------------- masking

    def mask_batch(self, matchers: Sequence[GrammarMatcher | None], logits: torch.Tensor) -> None:
        """Mask row ``b`` of float32 ``logits [B, V]`` with ``matchers[b]`` in place; ``None``
        rows are left alone.  The masks are computed by llguidance in parallel (one call).
        Raises :class:`GrammarViolation` (``rows``: its positions here) when a matcher failed."""
        if logits.dim() != 2 or logits.shape[0] != len(matchers):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(matchers)} matchers")
        rows = [b for b, m in enumerate(matchers) if m is not None]
        active = [m for m in matchers if m is not None]
        if not active:
            return
        guards = [m._guard for m in active]
        try:
            bitmask = self.fill_bitmask(active)
            if len(rows) == logits.shape[0]:
                self.apply_bitmask(bitmask, guards, logits)
            else:
                index = torch.tensor(rows)
                selected = logits.index_select(0, index)
                self.apply_bitmask(bitmask, guards, selected)
                logits.index_copy_(0, index, selected)
        except GrammarViolation as exc:
            raise GrammarViolation(str(exc), rows=[rows[k] for k in exc.rows]) from None

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher]) -> torch.Tensor:
        """llguidance's next-token bit masks of ``matchers`` as int32 ``[B, words]`` (several:
        one parallel call on llguidance's threads, which run without the GIL), in a buffer
        reused by the next call.  Half of :meth:`mask_batch`; an engine may run it while the
        model computes the logits."""
        for m in matchers:
            if m.grammar is not self:
                raise ValueError("a matcher of another model's TokenGrammar")
        if len(matchers) == 1:
            bitmask = matchers[0]._fill()
        else:
            bitmask = self._buffer("words", len(matchers), self.allowed_words.numel(), torch.int32)
            self._executor_or_new().unsafe_compute_mask_ptr(
                [(m._llm, k) for k, m in enumerate(matchers)],
                bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers),
            )
        failed = [k for k, m in enumerate(matchers) if m._llm.is_error()]
        if failed:
            raise GrammarViolation(matchers[failed[0]]._llm.get_error(), rows=failed)
        return bitmask

    def apply_bitmask(self, bitmask: torch.Tensor, guards: Sequence[int],
                      logits: torch.Tensor) -> None:
        """The other half of :meth:`mask_batch`: clear non-text ids from ``bitmask`` (in place),
        apply each row's clean-up guard (``GrammarMatcher.guard_state``) unless that empties the
        row, then set the cleared ids and the padding of ``logits [B, V]`` to -inf."""
        bitmask &= self.allowed_words
        if self._guard_words is not None and any(guards):
            guarded = bitmask & ~self._guard_words[torch.tensor(guards)]
            keep = guarded.any(dim=1, keepdim=True)
            bitmask.copy_(torch.where(keep, guarded, bitmask))
        empty = (~bitmask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise GrammarViolation("the grammar allows only ids that are never generated "
                                   "(special tokens)", rows=empty)
        scratch = self._buffer("floats", bitmask.shape[0], bitmask.shape[1] * 32, torch.float32)
        _apply(bitmask, logits, self.vocab_size, scratch)

    def _buffer(self, name: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A per-thread buffer of at least ``rows`` rows, reused from step to step."""
        buffer: torch.Tensor | None = getattr(self._scratch, name, None)
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty((rows, width), dtype=dtype)
            setattr(self._scratch, name, buffer)
        return buffer[:rows]

    def _executor_or_new(self) -> LLExecutor:
        """llguidance's thread pool for batched masks, made on first use."""
        if self._executor is None:
            self._executor = LLExecutor(self._threads)
        return self._executor


class _Wrapper:
    """The duck-typed tokenizer ``llguidance.TokenizerWrapper`` reads."""

    def __init__(self, tokens: list[bytes], stops: list[int], special: list[int], tokenize):
        self.tokens = tokens
        self.eos_token_id = stops[0]
        self.bos_token_id = None
        self.special_token_ids = special
        self._tokenize = tokenize

    def __call__(self, data: bytes) -> list[int]:
        return self._tokenize(data)


# --------------------------------------------------------------------------- per sequence


class GrammarMatcher:
    """The grammar state of one sequence.  Per step: ``mask(row)`` before sampling, then
    ``accept(id)`` with the sampled id.  After a recompute preemption the matcher can simply be
    kept; to rebuild one elsewhere, ``replay(generated_ids)`` on a fresh matcher."""

    def __init__(self, grammar: TokenGrammar, compiled: CompiledGrammar):
        self.grammar = grammar
        self.compiled = compiled
        self._llm = compiled.new_llmatcher()
        self._bitmask = torch.empty((1, grammar.allowed_words.numel()), dtype=torch.int32)
        self._guard = 0
        self._stopped = False  # a stop id was accepted

    def _check(self) -> None:
        if self._llm.is_error():
            raise GrammarViolation(self._llm.get_error())

    def mask(self, logits: torch.Tensor) -> None:
        """Set the ids the grammar forbids next to -inf in ``logits`` (float32, 1-D, the padded
        vocabulary: ids past the tokenizer's are always forbidden), in place."""
        if logits.dim() != 1 or logits.dtype != torch.float32:
            raise ValueError("mask() takes one float32 row")
        bitmask = self._fill()
        self._check()
        self.grammar.apply_bitmask(bitmask, [self._guard], logits.unsqueeze(0))

    def _fill(self) -> torch.Tensor:
        """llguidance's bit mask into this matcher's own buffer (errors: see ``_check``)."""
        self._llm.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        return self._bitmask

    @property
    def guard_state(self) -> int:
        """The clean-up guard's state (0 where the tokenizer needs no guard)."""
        return self._guard

    def allowed(self) -> torch.Tensor:
        """Bool ``[vocab_size]`` of the ids ``mask`` would let through now (for tests, logs)."""
        row = torch.zeros(self.grammar.vocab_size)
        self.mask(row)
        return row == 0

    def accept(self, token_id: int) -> None:
        """Advance by the sampled id.  Raises :class:`GrammarViolation` for an id the grammar
        forbids (the mask was not applied), a stop id included while the grammar is incomplete."""
        token_id = int(token_id)
        if self._stopped:
            raise GrammarViolation(f"id {token_id} after the generation ended")
        if not 0 <= token_id < self.grammar.vocab_size or (
                self.grammar.is_special(token_id) and token_id not in self.grammar.stop_ids):
            raise GrammarViolation(f"id {token_id} is never allowed by a grammar")
        if token_id in self.grammar.stop_ids and not self._llm.is_accepting():
            raise GrammarViolation(f"stop id {token_id} before the grammar is complete")
        if not self._llm.consume_token(token_id):
            raise GrammarViolation(self._llm.get_error() or f"id {token_id} is not allowed here")
        if token_id in self.grammar.stop_ids:
            self._stopped = True
        elif self.grammar.guards_cleanup:
            self._guard = self.grammar.guard_step(self._guard, token_id)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` the grammar accepts one after another from here, without
        moving (speculative decoding cuts a draft there: verifying ids the grammar forbids
        would be wasted; the masks of the verification still decide)."""
        if self._stopped or not tokens:
            return 0
        return int(self._llm.validate_tokens([int(t) for t in tokens]))

    @property
    def accepting(self) -> bool:
        """The text so far is a complete answer: a stop id is allowed now."""
        return self._stopped or self._llm.is_accepting()

    @property
    def done(self) -> bool:
        """Nothing but a stop id may follow (or one was accepted)."""
        return self._stopped or self._llm.is_stopped()

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._llm = self.compiled.new_llmatcher()
        self._guard = 0
        self._stopped = False

    def replay(self, tokens: Iterable[int]) -> None:
        """Reset, then accept ``tokens`` (the ids generated so far) one by one."""
        self.reset()
        for token in tokens:
            self.accept(token)
