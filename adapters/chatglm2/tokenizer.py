"""ChatGLM2-6B / ChatGLM3-6B tokenizer on ``sentencepiece`` directly, with THUDM's exact ids.

THUDM's ``tokenization_chatglm.py`` (SPTokenizer) wraps a BPE SentencePiece model with byte
fallback and appends its control tokens after the ``n`` pieces of the file:
``[MASK]=n, [gMASK]=n+1, [sMASK]=n+2, sop=n+3, eop=n+4`` and, for ChatGLM3 only, the role tokens
``<|system|>, <|user|>, <|assistant|>, <|observation|>`` from ``n+5``.  They exist in code only,
so ``encode`` (plain SentencePiece) can never produce them from user text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from adapters.chatglm2.config import Version
from adapters.weights.checkpoint import CheckpointError

_COMMON_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_V3_ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_SPECIALS: dict[str, tuple[str, ...]] = {
    "chatglm2": _COMMON_SPECIALS,
    "chatglm3": _COMMON_SPECIALS + _V3_ROLE_SPECIALS,
}


class ChatGLM2Tokenizer:
    """Text <-> ids for ChatGLM2 (``version="chatglm2"``) and ChatGLM3 (``"chatglm3"``)."""

    def __init__(self, model_file: Path, version: Version):
        if version not in _SPECIALS:
            raise ValueError(f"unknown ChatGLM2 tokenizer version {version!r}")
        self.version: Version = version
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self._sp.get_piece_size()
        self.sp_size = n
        self._special_ids = {name: n + i for i, name in enumerate(_SPECIALS[version])}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        #: ids that can be decoded; the model's padded logits are wider (65024 for the 6B).
        self.vocab_size = n + len(self._special_ids)
        # THUDM SPTokenizer: pad is the sp unk id; bos/eos/pad render as "" in convert_id_to_token.
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()
        self.pad_id = self._sp.unk_id()
        self._blank_ids = {self.eos_id, self.bos_id, self.pad_id}
        # v2 renders its control tokens as "" (chatglm2-6b SPTokenizer.convert_id_to_token);
        # v3 renders them by name (chatglm3-6b SPTokenizer.convert_id_to_token).
        self._show_specials = version == "chatglm3"

    # ------------------------------------------------------------------ ids

    def special(self, name: str) -> int:
        """The id of a control token by THUDM's name (``"[gMASK]"``, ``"sop"``, ``"<|user|>"``…)."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{self.version} tokenizer has no special token {name!r}") from None

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of ``text`` (with the model's dummy prefix, as THUDM's SPTokenizer);
        never a control id: control tokens exist only past the sp pieces."""
        return list(self._sp.encode(text))

    # ------------------------------------------------------------------ text

    def _token(self, token_id: int) -> str:
        """THUDM's ``convert_id_to_token``."""
        if token_id in self._special_names:
            return self._special_names[token_id] if self._show_specials else ""
        if token_id in self._blank_ids or token_id < 0 or token_id >= self.sp_size:
            return ""
        return self._sp.id_to_piece(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """As the reference ``tokenizer.decode``: tokens joined by SentencePiece's DecodePieces,
        which keeps non-piece strings (v3 control names) verbatim and drops empty ones."""
        if not ids:
            return ""
        return self._sp.decode_pieces([self._token(int(i)) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token on its own: ``<0xNN>`` is that byte, ``▁`` is a space."""
        if 0 <= token_id < self.sp_size and self._sp.is_byte(token_id):
            return bytes([int(self._sp.id_to_piece(token_id)[3:5], 16)])
        return self._token(token_id).replace("\u2581", " ").encode("utf-8")

    def piece(self, token_id: int) -> str:
        """The reference token string of an id (``convert_ids_to_tokens``)."""
        return self._token(token_id)


def load_tokenizer(folder: Path, version: Version) -> ChatGLM2Tokenizer:
    """The tokenizer of a checkpoint folder (its ``tokenizer.model``)."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.model (ChatGLM2/3 SentencePiece file)")
    return ChatGLM2Tokenizer(path, version)
