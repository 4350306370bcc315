"""The ChatGLM-6B tokenizer on ``sentencepiece`` alone, with THUDM's exact ids.

What THUDM's ``tokenization_chatglm.py`` (THUDM/chatglm-6b) adds around the unigram model
``ice_text.model``, reproduced here:

* pre-processing before SentencePiece: ``"\\n"`` -> ``<n>``, ``"\\t"`` -> ``<|tab|>``, runs of 2..80
  spaces -> ``<|blank_n|>`` (longest first, so 90 spaces are ``<|blank_80|><|blank_10|>``).  Those
  markers are user-defined pieces of the model; NFKC and the removal of leading, trailing and
  repeated whitespace come from the model's own normalizer;
* an id offset of ``num_image_tokens`` (``tokenizer_config.json``; THUDM's class default is 20000,
  the published ``ice_text.model`` of 130,344 pieces already holds them and says 0);
* decoding as ``tokenizer.decode`` of transformers 4.33 does: pad ids dropped, control pieces
  (``[gMASK]``, ``<sop>``, ``<eop>``, ...) render as nothing, the markers back to whitespace, then
  transformers' ``clean_up_tokenization`` (``" ."`` -> ``"."``, ``" n't"`` -> ``"n't"``, ...).

DELIBERATE DIFFERENCES from the reference, because user text is always text:

1. The reference splits ``<sop>``, ``<eop>``, ``[MASK]``, ``<pad>``, ``<unk>`` typed by a user into
   control ids (transformers' special-token matching) and turns a typed ``<n>``, ``<|tab|>`` or
   ``<|blank_n|>`` (even in full width, after NFKC) into whitespace ids.  Here :meth:`encode` never
   yields a control id, and a typed marker is encoded character by character as ordinary pieces.
2. The reference decodes markers by string replacement after joining pieces, so ordinary pieces
   spelling ``<n>`` also came out as a newline; here only the marker *ids* become whitespace, so
   such text decodes back to itself.

For every text without those literals, ids and decoded strings equal the reference's.
"""

from __future__ import annotations

import bisect
import logging
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from adapters.weights.checkpoint import CheckpointError, read_json

logger = logging.getLogger(__name__)

MAX_BLANK_LENGTH = 80  # THUDM SPTokenizer(max_blank_length=80)
NEWLINE_MARKER = "<n>"
TAB_MARKER = "<|tab|>"
THUDM_DEFAULT_IMAGE_TOKENS = 20000  # ChatGLMTokenizer.__init__(num_image_tokens=20000)

# A marker as the model's user-defined pieces spell it.  Longest alternatives first.
_MARKER_RE = re.compile(r"<\|blank_(?:80|[1-7][0-9]|[2-9])\|>|<\|tab\|>|<n>")
_BLANKS_RE = re.compile(f" {{2,{MAX_BLANK_LENGTH}}}")

# transformers PreTrainedTokenizerBase.clean_up_tokenization, applied by tokenizer.decode
# (clean_up_tokenization_spaces defaults to True in transformers 4.33).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

# Kinds of ids, for decoding.
_TEXT, _MARKER, _CONTROL, _UNKNOWN, _BYTE = range(5)
_UNK_SURFACE = " \u2047 "  # sentencepiece's default unk_surface


def _blank(match: re.Match[str]) -> str:
    return f"<|blank_{len(match.group())}|>"


def preprocess(text: str) -> str:
    """THUDM SPTokenizer._preprocess: newline, tab and space runs -> marker pieces."""
    text = text.replace("\n", NEWLINE_MARKER).replace("\t", TAB_MARKER)
    # Same result as THUDM's loop replacing " " * i for i = 80 .. 2: greedy runs of at most 80.
    return _BLANKS_RE.sub(_blank, text)


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _utf8_bytes_to_text(data: bytes) -> str:
    """sentencepiece's byte-piece decoding: each valid UTF-8 character is kept, every byte of an
    invalid or incomplete sequence becomes one U+FFFD."""
    out: list[str] = []
    i = 0
    while i < len(data):
        lead = data[i]
        size = 1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else (
            4 if 0xF0 <= lead < 0xF8 else 0)
        if size:
            try:
                out.append(data[i:i + size].decode("utf-8"))
                i += size
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)


class ChatGLMTokenizer:
    """ChatGLM-6B tokenizer implementing :class:`adapters.family.Tokenizer`."""

    def __init__(self, model_file: Path, num_image_tokens: int = THUDM_DEFAULT_IMAGE_TOKENS):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.offset = num_image_tokens
        size = self._sp.get_piece_size()
        #: ids below this can be decoded (image ids render as nothing, like THUDM's SPTokenizer)
        self.vocab_size = self.offset + size
        self._kind = bytearray(size)
        self._surface: list[str] = [""] * size
        self._marker_ids: set[int] = set()  # SentencePiece ids of <n>, <|tab|>, <|blank_n|>
        for i in range(size):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_control(i):
                self._kind[i] = _CONTROL
            elif self._sp.is_unknown(i):
                self._kind[i] = _UNKNOWN
            elif self._sp.is_byte(i):
                self._kind[i] = _BYTE
                self._surface[i] = chr(int(piece[3:5], 16))  # "<0xNN>"; code point = byte
            elif _MARKER_RE.fullmatch(piece):
                self._kind[i] = _MARKER
                self._marker_ids.add(i)
                self._surface[i] = self._marker_text(piece)
            else:
                self._surface[i] = piece.replace("\u2581", " ")
        self.pad_id = self._control_id("<pad>")
        self.mask_id = self._control_id("[MASK]")
        self.gmask_id = self._control_id("[gMASK]")
        self.sop_id = self._control_id("<sop>")  # bos of the answer
        self.eop_id = self._control_id("<eop>")  # eos: end of the answer
        expected_markers = 2 + MAX_BLANK_LENGTH - 1
        if len(self._marker_ids) != expected_markers:
            raise CheckpointError(
                f"{model_file}: expected {expected_markers} whitespace marker pieces "
                f"(<n>, <|tab|>, <|blank_2..80|>), found {len(self._marker_ids)}"
            )

    @staticmethod
    def _marker_text(piece: str) -> str:
        if piece == NEWLINE_MARKER:
            return "\n"
        if piece == TAB_MARKER:
            return "\t"
        return " " * int(piece[len("<|blank_"):-2])

    def _control_id(self, piece: str) -> int:
        sp_id = self._sp.piece_to_id(piece)
        if sp_id == self._sp.unk_id() or not self._sp.is_control(sp_id):
            raise CheckpointError(f"tokenizer model has no control piece {piece}")
        return sp_id + self.offset

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as user text: no control ids, typed markers stay text."""
        spans = self._literal_spans(text)
        parts: list[str] = []
        is_literal: list[bool] = []  # one flag per marker the model will see, in order
        start = 0
        for begin, end, _ in spans:
            segment = preprocess(text[start:begin])
            is_literal.extend(False for _ in _MARKER_RE.finditer(segment))
            # A real marker in place of the literal keeps SentencePiece's segmentation around
            # it as a boundary; its id is swapped for the literal's characters below.
            parts += [segment, NEWLINE_MARKER]
            is_literal.append(True)
            start = end
        segment = preprocess(text[start:])
        is_literal.extend(False for _ in _MARKER_RE.finditer(segment))
        parts.append(segment)

        ids: list[int] = []
        seen = 0
        literals = iter(spans)
        for sp_id in self._sp.encode("".join(parts)):
            if sp_id in self._marker_ids:
                literal = seen < len(is_literal) and is_literal[seen]
                seen += 1
                if literal:
                    ids.extend(self._chars_as_text(next(literals)[2]))
                    continue
            ids.append(sp_id + self.offset)
        if seen != len(is_literal):
            # The normalizer produced a marker we did not predict; it is whitespace, never a
            # control id, so the text survives with that one difference.
            logger.warning("tokenizer: %d marker pieces for %d expected in %r", seen,
                           len(is_literal), text[:80])
        return ids

    def _literal_spans(self, text: str) -> list[tuple[int, int, str]]:
        """Markers typed by the user: (start, end, text as NFKC shows it).

        SentencePiece applies NFKC before matching pieces, so a full-width ``＜ｎ＞`` is a marker
        too; we look for markers in the per-character NFKC view and map back to ``text``."""
        if text.isascii():
            return [(m.start(), m.end(), m.group()) for m in _MARKER_RE.finditer(text)]
        starts: list[int] = []
        folded: list[str] = []
        pos = 0
        for char in text:
            starts.append(pos)
            folded.append(unicodedata.normalize("NFKC", char))
            pos += len(folded[-1])
        view = "".join(folded)
        spans: list[tuple[int, int, str]] = []
        for m in _MARKER_RE.finditer(view):
            begin = bisect.bisect_right(starts, m.start()) - 1
            end = bisect.bisect_left(starts, m.end())
            if spans and begin < spans[-1][1]:
                continue
            spans.append((begin, end, "".join(folded[begin:end])))
        return spans

    def _chars_as_text(self, literal: str) -> list[int]:
        """One ordinary piece per character (or its UTF-8 byte pieces)."""
        ids: list[int] = []
        for char in literal:
            sp_id = self._sp.piece_to_id(char)
            if self._kind[sp_id] == _TEXT:
                ids.append(sp_id + self.offset)
            else:
                ids.extend(self._sp.piece_to_id(f"<0x{b:02X}>") + self.offset
                           for b in char.encode("utf-8"))
        return ids

    # ------------------------------------------------------------------ decoding

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id - self.offset

    def decode(self, ids: Sequence[int]) -> str:
        """As the reference ``tokenizer.decode(ids)`` (see the module docstring)."""
        out: list[str] = []
        pending = bytearray()
        empty = True  # sentencepiece drops the "▁" of the first piece while the text is empty
        for token_id in ids:
            if token_id == self.pad_id:
                continue  # ChatGLMTokenizer._decode filters the pad id
            sp_id = self._check(token_id)
            if sp_id < 0:
                continue  # an image token: THUDM SPTokenizer.decode drops ids below the offset
            kind = self._kind[sp_id]
            if kind == _BYTE:
                pending.append(ord(self._surface[sp_id]))
                continue
            if pending:
                out.append(_utf8_bytes_to_text(bytes(pending)))
                pending.clear()
                empty = False
            if kind == _CONTROL:
                continue
            surface = _UNK_SURFACE if kind == _UNKNOWN else self._surface[sp_id]
            # Only an ordinary piece's "▁" is dropped; a blank marker keeps all its spaces.
            if empty and kind == _TEXT and surface.startswith(" "):
                surface = surface[1:]
            if surface:
                out.append(surface)
                empty = False
        if pending:
            out.append(_utf8_bytes_to_text(bytes(pending)))
        return clean_up_tokenization("".join(out))

    def token_bytes(self, token_id: int) -> bytes:
        """UTF-8 bytes of one token on its own: "▁" as a space, a byte piece as its raw byte,
        control and image ids as nothing."""
        sp_id = self._check(token_id)
        if sp_id < 0:
            return b""
        kind = self._kind[sp_id]
        if kind == _BYTE:
            return bytes([ord(self._surface[sp_id])])
        if kind == _UNKNOWN:
            return _UNK_SURFACE.encode("utf-8")
        return self._surface[sp_id].encode("utf-8")

    def is_control(self, token_id: int) -> bool:
        """``[gMASK]``, ``<sop>``, ``<eop>``, ``<pad>``, ``</s>``, ...: never produced by :meth:`encode`."""
        sp_id = self._check(token_id)
        return sp_id >= 0 and self._kind[sp_id] == _CONTROL

    def piece(self, token_id: int) -> str:
        """The SentencePiece piece of an id (for logs and tests)."""
        sp_id = self._check(token_id)
        return f"<image_{token_id}>" if sp_id < 0 else self._sp.id_to_piece(sp_id)


def load_tokenizer(folder: Path) -> ChatGLMTokenizer:
    """The tokenizer of a ChatGLM-6B checkpoint folder (``ice_text.model`` and, if present,
    ``tokenizer_config.json`` for ``num_image_tokens``)."""
    folder = Path(folder)
    model_file = folder / "ice_text.model"
    if not model_file.is_file():
        raise CheckpointError(f"{folder} has no ice_text.model (the ChatGLM-6B tokenizer)")
    offset = THUDM_DEFAULT_IMAGE_TOKENS
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        value = read_json(config_file).get("num_image_tokens", THUDM_DEFAULT_IMAGE_TOKENS)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(
                f"{config_file}: key 'num_image_tokens' must be a non-negative integer, got {value!r}"
            )
        offset = value
    return ChatGLMTokenizer(model_file, num_image_tokens=offset)
