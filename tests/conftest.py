"""Shared test helpers.

Reference material (THUDM's tokenizer files, tiny checkpoints and what the reference code computed
on them) lives in ``../shared/reference`` next to the repository; it is never copied in.  Tests
that need it skip with a clear reason when it is absent.  ``CHATGLM_REFERENCE_DIR`` overrides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SKIP_REASON = (
    f"THUDM reference material not found at {REFERENCE} "
    "(set CHATGLM_REFERENCE_DIR to the shared/reference folder)"
)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty elsewhere): which native kernels the
    tests expect to be built."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def reference_available() -> bool:
    return (REFERENCE / "oracle").is_dir() and (REFERENCE / "checkpoints").is_dir()


requires_reference = pytest.mark.skipif(not reference_available(), reason=SKIP_REASON)


def checkpoint_dir(name: str) -> Path:
    if not reference_available():
        pytest.skip(SKIP_REASON)
    return REFERENCE / "checkpoints" / name


def chatglm2_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM2 checkpoint folder for tests that need any real one (not THUDM's numbers):
    THUDM's ``chatglm2-6b-tiny`` from the reference material, or where that is absent the
    project's own tiny ChatGLM2 folder (THUDM's layout, random weights and a SentencePiece
    tokenizer trained on the project's text; :mod:`adapters.demo`), with the reference one's
    512-token context, written under ``tmp_path_factory``."""
    if reference_available():
        return REFERENCE / "checkpoints" / "chatglm2-6b-tiny"
    from adapters.demo import DemoRecipe, ensure_demo_checkpoint

    return ensure_demo_checkpoint(tmp_path_factory.mktemp("chatglm2-tiny"),
                                  DemoRecipe(seq_length=512))


def oracle(name: str) -> dict:
    if not reference_available():
        pytest.skip(SKIP_REASON)
    with open(REFERENCE / "oracle" / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def tokenizer_file(family_dir: str, filename: str) -> Path:
    if not reference_available():
        pytest.skip(SKIP_REASON)
    return REFERENCE / "tokenizers" / family_dir / filename
