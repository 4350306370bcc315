"""The opt-in int8-activation path (``--int8-activations``): the VNNI kernels against a float64
reference of the same quantised computation, the layers' row threshold, the models within the
tolerances documented in the README, the flag and config wiring through a real server, and the
fallback to exact computation where the kernels cannot run."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from adapters.registry import FAMILIES, detect_family
from adapters.weights import native
from adapters.weights.activations import (
    MIN_ROWS,
    disable_int8_activations,
    enable_int8_activations,
)
from adapters.weights.format import QuantLayout, quantize_rowwise
from adapters.weights.layers import quantize_weight, use_native_linears
from adapters.weights.native import int8_act
from bench.int8_quality import compare, oracle_sequences
from gateway import cli
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings, load_settings
from tests.conftest import checkpoint_dir, cpu_flags, requires_reference
from tests.server import gateway_process, running_server

SUPPORTED = (
    sys.platform.startswith("linux")
    and platform.machine() == "x86_64"
    and {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"} <= cpu_flags()
    and shutil.which(os.environ.get("CC") or "cc") is not None
    and os.environ.get(native.ENV_SWITCH) != "0"
)
needs_kernel = pytest.mark.skipif(
    int8_act.library() is None or native.library() is None,
    reason="int8-activation kernels unavailable (x86-64 Linux, AVX512-VNNI and AVX512-BF16, a C "
    "compiler) or switched off with CHATGLM_GATEWAY_NATIVE=0")


def test_kernel_is_built_where_the_cpu_supports_it() -> None:
    if not SUPPORTED:
        pytest.skip("this machine lacks AVX512-VNNI/BF16 or a compiler, or the kernels are off")
    assert int8_act.library() is not None


# --------------------------------------------------------------------------- kernels


@needs_kernel
@pytest.mark.parametrize("plus128", [False, True])
def test_quantize_rows_is_round_of_x_times_127_over_max(plus128: bool) -> None:
    lib = int8_act.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 200, generator=gen) * 3).to(torch.bfloat16)
    x[4] = 0
    rows = int8_act.quantize_rows(lib, x, 256, plus128=plus128)
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax  # IEEE division (127.0 / amax is 127 * 1 / amax)
    q = (xf * torch.where(amax > 0, inv, 0.0)).round().to(torch.int32)
    assert torch.equal(rows.scale, (amax / 127.0)[:, 0])
    assert torch.equal(rows.qsum, q.sum(dim=1, dtype=torch.int32))
    values = rows.values.to(torch.int32) - (128 if plus128 else 0)
    assert torch.equal(values[:, :200], q)
    assert not values[:, 200:].any()  # the padding columns are zeros
    assert q.abs().max() == 127 and not values[4].any()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4, 64), (5, 12, 128), (37, 8, 320),
                                           (200, 8, 4096)])
def test_gemm_equals_the_float64_product_of_the_quantised_values(bits: int, m: int, n: int,
                                                                 k: int) -> None:
    """Exact int32 sums; only the fp32 scaling differs from float64.  (200 rows of 4096 columns
    span two activation tiles.)"""
    lib = int8_act.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(bits * 1000 + m + n + k)
    limit = 8 if bits == 4 else 127
    q = torch.randint(-limit, limit if bits == 4 else 128, (n, k), generator=gen,
                      dtype=torch.int8)
    scale = torch.rand(n, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    packed = native.pack_int4(q, n, k) if bits == 4 else native.pack_int8(q, n, k)
    wsum = int8_act.weight_row_sums(lib, packed) if bits == 8 else None
    if wsum is not None:
        assert torch.equal(wsum, q.sum(dim=1, dtype=torch.int32))
    rows = int8_act.quantize_rows(lib, x, k, plus128=bits == 8)
    got = int8_act.gemm(lib, rows, packed, scale, bias, wsum, torch.float32)
    ref = int8_act.reference(x, q, scale, bias)
    assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    # the bf16 output is the same fp32 value rounded once
    got16 = int8_act.gemm(lib, rows, packed, scale, bias, wsum, torch.bfloat16)
    assert torch.equal(got16, got.to(torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 216), (30, 100)])
def test_layer_switches_at_min_rows(bits: int, out_f: int, in_f: int) -> None:
    """Below ``min_rows`` a layer is exactly the weight-only one; from it on it is the quantised
    product (odd sizes padded and trimmed)."""
    gen = torch.Generator().manual_seed(out_f + in_f + bits)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(torch.bfloat16)
    bias = torch.randn(out_f, generator=gen).to(torch.bfloat16)
    layer = quantize_weight(w, str(bits), bias, kernel=True, native_kernel=True)
    x = torch.randn(8, in_f, generator=gen).to(torch.bfloat16)
    exact = layer(x)
    wrapper = torch.nn.Sequential(layer)
    assert enable_int8_activations(wrapper, min_rows=8) == 1
    assert torch.equal(layer(x[:7]), exact[:7])
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (8, out_f)
    q, scale = quantize_rowwise(w, bits)
    ref = int8_act.reference(x, q, scale.float(), bias.float())
    assert torch.equal(got, ref.float().to(torch.bfloat16)) or \
        (got.double() - ref).abs().max() <= 2**-7 * ref.abs().max()
    assert not torch.equal(got, exact)  # the activations were rounded to 8 bits
    disable_int8_activations(wrapper)
    assert torch.equal(layer(x), exact)


@needs_kernel
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 256), (30, 100)])
def test_bf16_layer_takes_its_int8_twin_from_min_rows(out_f: int, in_f: int) -> None:
    """A bf16 layer linear on the native kernel: below ``min_rows`` exactly the bf16 product;
    from it on the int8 activations times the weights quantised once per row."""
    gen = torch.Generator().manual_seed(out_f * in_f)
    linear = torch.nn.Linear(in_f, out_f).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(out_f, generator=gen))
    w, bias = linear.weight.detach().clone(), linear.bias.detach().float()
    wrapper = torch.nn.Module()
    wrapper.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"lin": linear})])
    layout = QuantLayout(layer_prefix="layers.", linears=("lin",), arithmetic=torch.float32)
    assert use_native_linears(wrapper, layout) == 1
    layer = wrapper.get_submodule("layers.0.lin")
    assert isinstance(layer, native.NativeLinear)
    x = torch.randn(8, in_f, generator=gen).to(torch.bfloat16)
    exact = layer(x)
    assert enable_int8_activations(wrapper, min_rows=8) == 1
    assert torch.equal(layer(x[:7]), exact[:7])
    got = layer(x)
    q, scale = quantize_rowwise(w.float(), 8, arithmetic=torch.float32)
    ref = int8_act.reference(x, q, scale.float(), bias)
    assert (got.double() - ref).abs().max() <= 2**-7 * ref.abs().max()
    assert not torch.equal(got, exact)  # the activations were rounded to 8 bits
    disable_int8_activations(wrapper)
    assert torch.equal(layer(x), exact)


# --------------------------------------------------------------------------- models

#: The tolerances the README documents for THUDM's tiny reference checkpoints (every position
#: quantised).  These random 2-layer models are hypersensitive: bf16 compute alone moves them
#: by about half as much (bench.int8_quality prints both).
TINY_TOP1 = 0.75
TINY_MAX_DELTA = 5.0
TINY_MEAN_DELTA = 0.5


def _bf16_model(name: str, quantize: str | None) -> torch.nn.Module:
    folder = checkpoint_dir(name)
    spec = FAMILIES[detect_family(folder)]
    model = spec.load_model(folder, spec.read_config(folder), dtype=torch.bfloat16,
                            device=torch.device("cpu"), quantize=quantize)
    assert isinstance(model, torch.nn.Module)
    return model


@requires_reference
@needs_kernel
@pytest.mark.parametrize(("name", "quantize"), [("chatglm2-6b-int8-tiny", None),
                                                ("chatglm2-6b-tiny", None),  # bf16 weights
                                                ("chatglm3-6b-tiny-safetensors", "4"),
                                                ("chatglm-6b-int4-tiny", None)])
@torch.inference_mode()
def test_model_within_documented_tolerance(name: str, quantize: str | None) -> None:
    model = _bf16_model(name, quantize)
    sequences = oracle_sequences(name)

    def logits() -> torch.Tensor:
        return torch.cat([model.forward(ids, model.new_cache(), every_position=True)
                          for ids in sequences])

    exact = logits()
    short = [ids[: MIN_ROWS - 1] for ids in sequences]
    exact_short = [model.forward(ids, model.new_cache(), every_position=True) for ids in short]
    assert enable_int8_activations(model) == 8  # 2 layers x 4 linears
    # fewer rows than MIN_ROWS: computed exactly
    for ids, want in zip(short, exact_short, strict=True):
        assert torch.equal(model.forward(ids, model.new_cache(), every_position=True), want)
    enable_int8_activations(model, min_rows=1)
    result = compare(exact, logits())
    assert result.top1 >= TINY_TOP1
    assert result.max_delta <= TINY_MAX_DELTA
    assert result.mean_delta <= TINY_MEAN_DELTA
    assert result.mean_delta > 0  # the path did run


@requires_reference
@needs_kernel
@torch.inference_mode()
def test_decode_batches_below_min_rows_stay_exact() -> None:
    """A batched decode step of fewer than MIN_ROWS sequences equals the exact one bit for bit;
    a batch of MIN_ROWS sequences takes int8 activations."""
    model = _bf16_model("chatglm2-6b-int8-tiny", None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60000, (3,), generator=gen).tolist() for _ in range(MIN_ROWS)]

    def step(batch: int) -> torch.Tensor:
        caches = [model.new_cache() for _ in range(batch)]
        for ids, cache in zip(prompts, caches, strict=False):
            model.forward(ids[:2], cache)
        return model.forward_batch([ids[2:] for ids in prompts[:batch]], caches)

    exact_small, exact_full = step(4), step(MIN_ROWS)
    enable_int8_activations(model)
    assert torch.equal(step(4), exact_small)
    assert not torch.equal(step(MIN_ROWS), exact_full)


# --------------------------------------------------------------------------- wiring


def test_cli_flag_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[models]]\nid = "a"\npath = "x"\nint8_activations = true\n\n'
                      '[[models]]\nid = "b"\npath = "y"\n')
    assert [m.int8_activations for m in load_settings(config).models] == [True, False]
    args = cli.build_parser().parse_args(["serve", "--config", str(config)])
    assert [m.int8_activations for m in cli.settings_from_args(args).models] == [True, False]
    args = cli.build_parser().parse_args(["serve", "--config", str(config),
                                          "--int8-activations"])
    assert [m.int8_activations for m in cli.settings_from_args(args).models] == [True, True]


LONG_PROMPT = ("Summarise the following notes in one sentence. The meeting began at nine; the "
               "budget was approved; the new office opens in May; everyone agreed to meet again "
               "next Tuesday to review the hiring plan and the quarterly figures. Two new "
               "engineers start in June, the cafeteria will close for repairs in July, and the "
               "annual report is due to the board before the end of August.")


def _ask(base: str) -> dict:
    """Ask a prompt longer than MIN_ROWS tokens (its prefill takes the int8 path where on);
    returns the model's /v1/models entry."""
    with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(
            model="glm", messages=[{"role": "user", "content": LONG_PROMPT}],
            temperature=0, max_tokens=8)
    assert r.usage is not None and r.usage.prompt_tokens >= MIN_ROWS
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    return dict(httpx.get(base + "/v1/models").json()["data"][0])


@requires_reference
def test_serve_with_the_flag_answers() -> None:
    """``serve --int8-activations`` loads, answers through the official client and says in
    /v1/models how many layers take int8 activations (0 where the kernels cannot run)."""
    flags = ("--dtype", "bfloat16", "--int8-activations",
             "--model", f"glm={checkpoint_dir('chatglm2-6b-int8-tiny')}")
    with gateway_process(*flags) as base:
        info = _ask(base)
    expected = 8 if int8_act.library() is not None and native.library() is not None else 0
    assert info["int8_activations_layers"] == expected, json.dumps(info)


@requires_reference
def test_without_the_kernels_the_server_still_answers(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """No AVX512-VNNI (or CHATGLM_GATEWAY_NATIVE=0): a warning, every layer exact, and the
    server serves as without the flag."""
    monkeypatch.setattr(int8_act, "library", lambda: None)
    settings = ServerSettings(models=(ModelEntry(
        id="glm", path=checkpoint_dir("chatglm2-6b-int8-tiny"), dtype="bfloat16",
        int8_activations=True),))
    with caplog.at_level(logging.WARNING), \
            running_server(create_app(settings), timeout=60, wait_ready=True) as base:
        info = _ask(base)
    assert info["int8_activations_layers"] == 0
    assert "computing exactly" in caplog.text


def test_the_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert int8_act.library.__wrapped__() is None


def test_without_the_kernels_a_model_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_act, "library", lambda: None)
    layer = quantize_weight(torch.randn(8, 64).to(torch.bfloat16), "4", None)
    assert enable_int8_activations(torch.nn.Sequential(layer)) == 0
    assert layer.int8_activations is None
