"""The tiny random demo checkpoint served when no model is configured.

:func:`ensure_demo_checkpoint` writes, once, a folder laid out exactly like THUDM's ChatGLM2-6B
repository (``config.json`` with THUDM's keys, ``tokenizer.model``, ``tokenizer_config.json``,
``model.safetensors`` with THUDM's tensor names), so the ordinary ChatGLM2 loader serves it and
the whole gateway can be tried without downloading anything.  The weights are random: the model
produces meaningless text.

The tokenizer is a SentencePiece BPE model trained in-process from ``demo_corpus.txt`` (text
written for this project) with the trainer and normalizer settings of THUDM's chatglm2-6b
``tokenizer.model``: identity normalization, a dummy prefix, whitespace kept as is, digits split,
byte fallback, ``<unk>``/``<s>``/``</s>`` at 0/1/2.  As in THUDM's ``tokenization_chatglm.py``,
the special ids live outside the SentencePiece model: with ``n`` pieces, ``[MASK]`` = n,
``[gMASK]`` = n+1, ``[sMASK]`` = n+2, ``sop`` = n+3, ``eop`` = n+4, and pad is ``<unk>`` (0).

Creation is atomic (built in a temporary folder inside ``cache_dir``, then renamed into place)
and idempotent: a marker file records the recipe and a SHA-256 of every file, and a folder whose
marker matches is returned untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "chatglm2-demo"
DEMO_DESCRIPTION = (
    "A tiny randomly initialised ChatGLM2-architecture demo model that produces meaningless text; "
    "serve a real checkpoint with `chatglm-gateway serve --model NAME=PATH`."
)
#: Bump the suffix (and DemoRecipe.version) whenever the recipe changes, so old caches are left alone.
DEMO_FOLDER_NAME = "chatglm2-demo-v1"
DEMO_NAME_OR_PATH = "chatglm-gateway/chatglm2-demo"
MARKER_FILE = "chatglm-gateway-demo.json"
WEIGHTS_FILE = "model.safetensors"
CORPUS_RESOURCE = "demo_corpus.txt"

#: THUDM tokenization_chatglm.py (ChatGLM2) appends these after the SentencePiece pieces, in order.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo folder's content (with the corpus text)."""

    version: int = 1
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 128
    seq_length: int = 2048
    sp_vocab_size: int = 1536
    #: THUDM pads the logits to a multiple of 64 or more (65024 for 64794 tokens).
    vocab_multiple: int = 64
    seed: int = 0
    init_std: float = 0.02

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows: the SentencePiece pieces plus THUDM's five special tokens."""
        return self.sp_vocab_size + len(SPECIAL_TOKENS)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m


DEMO_RECIPE = DemoRecipe()


# --------------------------------------------------------------------------- public entry point


def ensure_demo_checkpoint(cache_dir: Path, recipe: DemoRecipe = DEMO_RECIPE) -> Path:
    """Return ``cache_dir / "chatglm2-demo-v1"``, creating the demo checkpoint there if needed.

    A folder whose marker matches ``recipe`` and the corpus (and whose files hash as recorded) is
    returned without being touched.  Otherwise the checkpoint is built in a temporary folder in
    ``cache_dir`` and renamed into place, so concurrent callers never see a half-written folder.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / DEMO_FOLDER_NAME
    corpus = demo_corpus()
    expected = _recipe_stamp(recipe, corpus)
    if _is_valid(target, expected):
        logger.debug("demo checkpoint found at %s", target)
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER_NAME}.tmp-", dir=cache_dir))
    try:
        # mkdtemp makes the folder private (0700); the checkpoint is ordinary readable data.
        tmp.chmod(0o755)
        _write_checkpoint(tmp, recipe, corpus, expected)
        _install(tmp, target, expected)
    finally:
        # After a successful rename ``tmp`` no longer exists; otherwise drop the partial build.
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "demo checkpoint ready at %s (%.2f s): %s",
        target,
        time.perf_counter() - started,
        DEMO_DESCRIPTION,
    )
    return target


# --------------------------------------------------------------------------- the pieces


def demo_corpus() -> str:
    """The project's own training text for the demo tokenizer (shipped as package data)."""
    return resources.files("adapters").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")


def train_demo_tokenizer(corpus: str, vocab_size: int) -> bytes:
    """Train a SentencePiece BPE model on ``corpus`` (one sentence per line); return its bytes.

    The settings mirror the trainer and normalizer spec stored in THUDM's chatglm2-6b
    ``tokenizer.model`` (read from its ModelProto): BPE, identity normalization, dummy prefix,
    no whitespace folding, split digits, whitespace-only pieces, byte fallback, ids 0/1/2 for
    ``<unk>``/``<s>``/``</s>`` and no pad piece.
    """
    import sentencepiece as spm

    lines = [line for line in corpus.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        character_coverage=0.9999,
        max_sentencepiece_length=16,
        max_sentence_length=4192,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        treat_whitespace_as_suffix=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # One thread and no sampling keep the result byte-identical from run to run.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # The trainer logs every step to stderr otherwise.
        minloglevel=2,
    )
    return model.getvalue()


def demo_config(recipe: DemoRecipe = DEMO_RECIPE) -> dict:
    """``config.json`` with the key set and style of THUDM's chatglm2-6b config, tiny dims."""
    padded = recipe.padded_vocab_size
    return {
        "_name_or_path": DEMO_NAME_OR_PATH,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMModel"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        # Kept for fidelity with THUDM's folder; the gateway never imports code from a checkpoint.
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "ffn_hidden_size": recipe.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": recipe.hidden_size,
        "kv_channels": recipe.kv_channels,
        "layernorm_epsilon": 1e-05,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": recipe.multi_query_group_num,
        "num_attention_heads": recipe.num_attention_heads,
        "num_layers": recipe.num_layers,
        "original_rope": True,
        "pad_token_id": 0,
        "padded_vocab_size": padded,
        "post_layer_norm": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "quantization_bit": 0,
        "rmsnorm": True,
        "seq_length": recipe.seq_length,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        # THUDM's chatglm2-6b config carries this value; kept so the key set matches.
        "transformers_version": "4.27.1",
        "use_cache": True,
        # THUDM's chatglm2-6b config repeats the padded size here.
        "vocab_size": padded,
    }


def demo_tokenizer_config() -> dict:
    """``tokenizer_config.json`` in the style of THUDM's chatglm2-6b."""
    return {
        "name_or_path": DEMO_NAME_OR_PATH,
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }


def demo_tensors(recipe: DemoRecipe = DEMO_RECIPE) -> dict[str, torch.Tensor]:
    """Random fp16 weights under THUDM's ChatGLM2 tensor names and shapes (fixed seed)."""
    gen = torch.Generator().manual_seed(recipe.seed)
    h, ffn, v = recipe.hidden_size, recipe.ffn_hidden_size, recipe.padded_vocab_size
    qkv = h + 2 * recipe.multi_query_group_num * recipe.kv_channels

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * recipe.init_std).to(torch.float16)

    def ones(n: int) -> torch.Tensor:
        # RMSNorm scales start at one: zero-mean noise would wipe the activations out.
        return torch.ones(n, dtype=torch.float16)

    tensors = {"transformer.embedding.word_embeddings.weight": normal(v, h)}
    for i in range(recipe.num_layers):
        p = f"transformer.encoder.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(h)
        tensors[p + "self_attention.query_key_value.weight"] = normal(qkv, h)
        tensors[p + "self_attention.query_key_value.bias"] = normal(qkv)
        tensors[p + "self_attention.dense.weight"] = normal(h, h)
        tensors[p + "post_attention_layernorm.weight"] = ones(h)
        tensors[p + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, h)
        tensors[p + "mlp.dense_4h_to_h.weight"] = normal(h, ffn)
    tensors["transformer.encoder.final_layernorm.weight"] = ones(h)
    tensors["transformer.output_layer.weight"] = normal(v, h)
    # THUDM modeling_chatglm.py (v2) registers inv_freq as a persistent buffer, so real
    # checkpoints carry it: RotaryEmbedding(rotary_dim // 2) with rotary_dim = kv_channels,
    # computed in the config's torch_dtype (fp16).
    dim = recipe.kv_channels // 2
    steps = torch.arange(0, dim, 2, dtype=torch.float16)
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (steps / dim))
    return tensors


def demo_readme(recipe: DemoRecipe = DEMO_RECIPE) -> str:
    return f"""# {DEMO_MODEL_ID}

{DEMO_DESCRIPTION}

This folder was written by chatglm-gateway because no model was configured. It has the layout of
THUDM's ChatGLM2-6B repository (config.json, tokenizer.model, tokenizer_config.json, weights in
{WEIGHTS_FILE}) but tiny dimensions (hidden size {recipe.hidden_size}, {recipe.num_layers} layers,
vocabulary {recipe.vocab_size}) and random weights, so its answers are meaningless. The tokenizer is
a small SentencePiece model trained on the project's own text; it is not THUDM's tokenizer.

To serve a real model, download a ChatGLM checkpoint folder (for example THUDM/chatglm2-6b) and run:

    chatglm-gateway serve --model NAME=PATH

This folder can be deleted at any time; it is re-created when needed.
"""


# --------------------------------------------------------------------------- building and checking


def _recipe_stamp(recipe: DemoRecipe, corpus: str) -> dict:
    return {
        "model": DEMO_MODEL_ID,
        "recipe": asdict(recipe),
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_checkpoint(folder: Path, recipe: DemoRecipe, corpus: str, stamp: dict) -> None:
    from safetensors.torch import save_file

    sp_model = train_demo_tokenizer(corpus, recipe.sp_vocab_size)
    (folder / "tokenizer.model").write_bytes(sp_model)
    _write_json(folder / "config.json", demo_config(recipe))
    _write_json(folder / "tokenizer_config.json", demo_tokenizer_config())
    # THUDM's safetensors shards carry {"format": "pt"} like every transformers export.
    save_file(demo_tensors(recipe), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / "README.md").write_text(demo_readme(recipe), encoding="utf-8")
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
    # The marker goes last: a folder with a matching marker is complete.
    _write_json(folder / MARKER_FILE, {**stamp, "files": files})


def _is_valid(folder: Path, stamp: dict) -> bool:
    marker = folder / MARKER_FILE
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            return False
        if any(recorded.get(k) != v for k, v in stamp.items()):
            logger.warning("demo checkpoint at %s was made by another recipe; rebuilding", folder)
            return False
        files = recorded.get("files")
        if not isinstance(files, dict) or not files:
            return False
        return all(_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError):
        return False


def _install(tmp: Path, target: Path, stamp: dict) -> None:
    """Rename ``tmp`` to ``target``; tolerate a concurrent caller that got there first."""
    for _ in range(2):
        try:
            os.rename(tmp, target)  # atomic; fails when target exists and is not empty
            return
        except OSError:
            if _is_valid(target, stamp):
                logger.debug("another process created %s first", target)
                return
        # A stale or broken folder is in the way: move it aside (atomically) and retry.
        trash = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER_NAME}.old-", dir=target.parent))
        try:
            os.rename(target, trash / "old")
        except FileNotFoundError:
            logger.debug("%s was moved away by another process", target)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install the demo checkpoint at {target}")
