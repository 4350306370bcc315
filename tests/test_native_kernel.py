"""The gateway's own int4 CPU kernel (adapters/weights/native): built, loaded, and computing what THUDM's
per-row int4 weights mean, through the layers the models use.

Where the kernel cannot be built (no compiler, a CPU without AVX512-BF16) the layers use torch's
kernel; the tests of the kernel itself then skip with that reason, while
``test_kernel_is_built_where_the_cpu_supports_it`` makes sure an AVX512-BF16 Linux machine with a
compiler (this project's CI) really gets it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.weights import native
from adapters.weights.format import quantize_rowwise
from adapters.weights.layers import Int4Linear, quantize_weight
from tests.conftest import cpu_flags

SUPPORTED = (
    sys.platform.startswith("linux")
    and platform.machine() == "x86_64"
    and {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags()
    and shutil.which(os.environ.get("CC") or "cc") is not None
)
SWITCHED_OFF = os.environ.get(native.ENV_SWITCH) == "0"
needs_kernel = pytest.mark.skipif(
    native.library() is None, reason="native kernels unavailable on this machine (they need "
    "x86-64 Linux, AVX512-BF16 and a C compiler) or switched off with CHATGLM_GATEWAY_NATIVE=0"
)


def test_kernel_is_built_where_the_cpu_supports_it() -> None:
    if not SUPPORTED:
        pytest.skip("this machine lacks AVX512-BF16 or a C compiler: torch's kernel is used")
    if SWITCHED_OFF:
        pytest.skip("CHATGLM_GATEWAY_NATIVE=0 in the environment")
    assert native.library() is not None


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ q.double().T) * scale.double()


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16, native.WIDEN_ONCE_ROWS + 3])
@pytest.mark.parametrize(("n", "k"), [(4, 64), (12, 128), (64, 256)])
def test_gemm_equals_the_exact_product(m: int, n: int, k: int) -> None:
    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) + 0.1
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    got = native.int4_gemm(lib, x, native.pack_int4(q, n, k), scale).double()
    ref = _reference(x, q, scale)
    # exact products, fp32 accumulation in another order: fp32 noise only
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize("m", [1, 5, 9])
def test_int8_gemm_equals_the_exact_product(m: int) -> None:
    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(m)
    n, k = 12, 192
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) + 0.1
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    packed = native.pack_int8(q, n, k)
    assert torch.equal(native.unpack_int8(packed, 4, 12), q[4:12])
    got = native.int8_gemm(lib, x, packed, scale).double()
    ref = _reference(x, q, scale)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
def test_pack_layout_is_the_documented_one() -> None:
    # wq_gemm.c: blocks of 4 rows, 64-column chunks, one 32-byte run per row, low nibble column
    # c + b, high nibble column c + 32 + b, stored as q + 8.
    n, k = 8, 128
    q = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    packed = native.pack_int4(q, n, k).view(n // 4, k // 64, 4, 32)
    u = q.to(torch.int16) + 8
    for row in (0, 5, 7):
        for chunk in range(k // 64):
            run = packed[row // 4, chunk, row % 4].to(torch.int16)
            cols = u[row, chunk * 64:(chunk + 1) * 64]
            assert torch.equal(run & 0xF, cols[:32])
            assert torch.equal(run >> 4, cols[32:])


@needs_kernel
def test_padding_is_zero_weight() -> None:
    lib = native.library()
    assert lib is not None
    q = torch.randint(-8, 8, (5, 70), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    packed = native.pack_int4(q, 8, 128)
    deq = native.int4_dequant(lib, packed, 0, 8).to(torch.int8)
    assert torch.equal(deq[:5, :70], q)
    assert not deq[5:].any() and not deq[:, 70:].any()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 256), (30, 100), (7, 64)])
@pytest.mark.parametrize("rows", [1, 6, 17])
def test_layer_equals_torch_kernel_layer(bits: int, out_f: int, in_f: int, rows: int) -> None:
    """Odd sizes are padded (N to 4, K to 64) and trimmed; the answer is torch's kernel's."""
    gen = torch.Generator().manual_seed(out_f + in_f + rows)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    bias = torch.randn(out_f, generator=gen)
    mine = quantize_weight(w, str(bits), bias, kernel=True, native_kernel=True)
    torch_kernel = quantize_weight(w, str(bits), bias, kernel=True, native_kernel=False)
    assert mine.native and not torch_kernel.native
    x = torch.randn(rows, in_f, generator=gen).to(torch.bfloat16)
    a, b = mine(x).float(), torch_kernel(x).float()
    assert a.shape == (rows, out_f)
    # both round the same fp32 sum to bf16 at the end: an ulp or so apart
    assert torch.all((a - b).abs() <= 2**-7 * b.abs().amax(dim=-1, keepdim=True))
    # and the fp32 dequantised weight is THUDM's q * scale exactly
    q, scale = quantize_rowwise(w, bits)
    assert torch.equal(mine.dequantize(), q.float() * scale.float()[:, None])


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_dequant_path_equals_kernel_path(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Used for prefill on AMX machines only; the same bf16 operands, so the same product.
    layer = quantize_weight(torch.randn(96, 192) * 0.05, str(bits), kernel=True,
                            native_kernel=True)
    assert layer.native
    monkeypatch.setattr("adapters.weights.layers._DEQUANT_CHUNK_ELEMENTS", 192 * 32)  # several chunks
    x = torch.randn(40, 192, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    via_gemm = layer._dequant_matmul(x)
    assert via_gemm is not None
    via_kernel = layer._kernel_matmul(x)
    assert torch.all((via_gemm - via_kernel).abs() <= 2**-7 * via_kernel.abs().amax())


@needs_kernel
def test_groupwise_and_float32_layers_do_not_take_it() -> None:
    grouped = quantize_weight(torch.randn(64, 256), "int4-g128", kernel=True)
    exact = quantize_weight(torch.randn(64, 256), "4", kernel=False)
    assert isinstance(grouped, Int4Linear) and not grouped.native
    assert isinstance(exact, Int4Linear) and not exact.native
    with pytest.raises(ValueError, match="per-row"):
        q, scales = quantize_rowwise(torch.randn(64, 256), 4)
        Int4Linear(q, torch.ones(64, 2), group_size=128, kernel=True, native_kernel=True)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@needs_kernel
def test_compiled_once_into_the_cache(tmp_path: Path) -> None:
    code = "from adapters.weights import native; print(native.library() is not None)"
    env = {"CHATGLM_GATEWAY_CACHE": str(tmp_path)}
    first = _run(code, env)
    assert first.stdout.strip() == "True", first.stderr
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    second = _run(code, env)
    assert second.stdout.strip() == "True", second.stderr
    assert list((tmp_path / "kernels").glob("*")) == built  # no temp files left behind
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_switched_off_by_the_environment(tmp_path: Path) -> None:
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from adapters.weights import native; print(native.library() is None)")
    done = _run(code, {"CHATGLM_GATEWAY_NATIVE": "0", "CHATGLM_GATEWAY_CACHE": str(tmp_path)})
    assert done.stdout.strip() == "True", done.stderr
    assert "CHATGLM_GATEWAY_NATIVE=0" in done.stderr
    assert not (tmp_path / "kernels").exists()


def test_no_compiler_falls_back_with_a_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CHATGLM_GATEWAY_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="adapters.weights.native"):
            assert native.library() is None
        assert "unavailable" in caplog.text or "x86-64" in caplog.text
        # the int4 layers still work, on torch's kernel
        layer = quantize_weight(torch.randn(16, 64), "4", kernel=True)
        assert isinstance(layer, Int4Linear) and not layer.native
        assert layer(torch.randn(2, 64).to(torch.bfloat16)).shape == (2, 16)
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 9])
@pytest.mark.parametrize(("n", "k"), [(4, 32), (20, 96), (64, 256)])
def test_bf16_gemm_equals_the_exact_product(m: int, n: int, k: int) -> None:
    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(m + n * k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    got = native.bf16_gemm(lib, x, native.pack_bf16(w, n, k)).double()
    ref = x.double() @ w.double().T
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize(("out_f", "in_f"), [(65, 48), (128, 64)])
def test_native_linear_computes_what_the_bf16_linear_does(out_f: int, in_f: int) -> None:
    gen = torch.Generator().manual_seed(out_f)
    linear = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen))
    x = torch.randn(2, 3, in_f, generator=gen).to(torch.bfloat16)
    b = linear(x).float()
    layer = native.NativeLinear.replacing(linear)  # consumes `linear` (its weight is repacked)
    assert isinstance(layer, native.NativeLinear)
    a = layer(x).float()
    assert a.shape == b.shape == (2, 3, out_f)
    assert torch.all((a - b).abs() <= 2**-7 * b.abs().amax())


def test_native_linear_replaces_only_bf16_cpu_linears() -> None:
    fp32 = torch.nn.Linear(64, 8, bias=False)
    fp16 = torch.nn.Linear(64, 8).to(torch.float16)
    assert native.NativeLinear.replacing(fp32) is fp32
    assert native.NativeLinear.replacing(fp16) is fp16


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(8, 64), (36, 96), (64, 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bf16_linear_with_bias_equals_the_exact_product(n: int, k: int,
                                                        out_dtype: torch.dtype) -> None:
    """The bf16 linear (every linear of a bf16 model): x . w^T + bias against float64, for row
    counts on both of the kernel's loops, rounded once to bf16 where asked."""
    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(29, k, generator=gen).to(torch.bfloat16)
    got = native.bf16_linear(lib, x, native.pack_bf16(w, n, k), bias, out_dtype)
    ref = x.double() @ w.double().T + bias.double()
    if out_dtype == torch.float32:
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    else:  # one rounding of a sum within fp32 noise of the exact one: at most 1 bf16 ulp off
        assert torch.all((got.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-5 * ref.abs().max())


def _rows_alone_and_together(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """Every row of ``layer(x)`` has the bits of that row passed alone and of every slice of the
    rows containing it (the few-row and many-row loops, every block tail)."""
    together = layer(x)
    for i in range(x.shape[0]):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1]), i
    for start, stop in ((0, 3), (2, 9), (5, 6), (1, x.shape[0])):
        assert torch.equal(layer(x[start:stop]), together[start:stop]), (start, stop)


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "4", "8"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(fmt: str) -> None:
    """Batch invariance at the kernel: decode rows (1 row), batches (a few), prefill chunks (many)
    all give a row the same bits, for every weight format (oneDNN's bf16 GEMM does not, at this
    width)."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(40, 1000, generator=gen) * 0.05
    bias = torch.randn(40, generator=gen)
    layer: torch.nn.Module
    if fmt == "bf16":
        linear = torch.nn.Linear(1000, 40).to(torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(bias)
        layer = native.NativeLinear.replacing(linear)
        assert isinstance(layer, native.NativeLinear)
    else:
        layer = quantize_weight(w, fmt, bias.to(torch.bfloat16), kernel=True, native_kernel=True)
        assert layer.native
    x = torch.randn(native.WIDEN_ONCE_ROWS + 7, 1000, generator=gen).to(torch.bfloat16)
    _rows_alone_and_together(layer, x)


@needs_kernel
@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (4, 4), (8, 1)])
def test_decode_attention_equals_torch_over_caches_of_different_lengths(heads: int,
                                                                         groups: int) -> None:
    from adapters.chatglm2.model import decode_attention as torch_decode_attention

    gen = torch.Generator().manual_seed(heads * 10 + groups)
    hd, layers, layer = 64, 3, 1
    lengths = [1, 7, 40]  # after this step; capacities differ from lengths
    caps = [4, 16, 64]
    storages = [torch.randn(layers, 2, groups, c, hd, generator=gen).to(torch.bfloat16)
                for c in caps]
    b = len(lengths)
    q = torch.randn(b, 1, heads, hd, generator=gen).to(torch.bfloat16)
    k = torch.randn(b, 1, groups, hd, generator=gen).to(torch.bfloat16)
    v = torch.randn(b, 1, groups, hd, generator=gen).to(torch.bfloat16)
    lib = native.library()
    assert lib is not None
    got = native.decode_attention(lib, native.DecodeBatch(storages, lengths), layer, q, k, v)
    for i, (kv, n) in enumerate(zip(storages, lengths, strict=True)):
        # the new key/value landed at position n - 1 of this layer, nothing else moved
        assert torch.equal(kv[layer, 0, :, n - 1], k[i, 0])
        assert torch.equal(kv[layer, 1, :, n - 1], v[i, 0])
        expected = torch_decode_attention(q[i:i + 1], kv[layer, 0, :, :n].unsqueeze(0),
                                          kv[layer, 1, :, :n].unsqueeze(0), None)
        # fp32 inside (the native kernel hands its value products the softmax numerators in
        # bf16, as torch's bf16 flash attention does), rounded to bf16 once: about an ulp apart
        assert torch.allclose(got[i].float(), expected[0].float(), rtol=2**-7, atol=2**-7)


@needs_kernel
def test_attention_bits_do_not_depend_on_head_blocks_threads_or_chunks() -> None:
    """The kernel attends the heads of a KV group together (8 at a time, fewer when a step has
    too few blocks for the threads) and 16 keys at a time: an odd number of heads per group, a
    head size of 16 mod 32 and lengths around the blocks give every query the same bits whether
    it is a decode step with 1 or 32 threads or one query of a prefill chunk, and stay close to
    float64 attention."""
    gen = torch.Generator().manual_seed(7)
    heads, groups, hd, cap = 22, 2, 80, 40
    lengths = [1, 2, 15, 16, 17, 33, 40]
    storage = torch.randn(1, 2, groups, cap, hd, generator=gen).to(torch.bfloat16)
    q = torch.randn(len(lengths), 1, heads, hd, generator=gen).to(torch.bfloat16)
    lib = native.library()
    assert lib is not None
    threads = torch.get_num_threads()

    def decode(n_threads: int) -> torch.Tensor:
        torch.set_num_threads(n_threads)
        try:
            storages = [storage.clone() for _ in lengths]
            k = torch.stack([s[0, 0, :, n - 1] for s, n in zip(storages, lengths, strict=True)])
            v = torch.stack([s[0, 1, :, n - 1] for s, n in zip(storages, lengths, strict=True)])
            return native.decode_attention(lib, native.DecodeBatch(storages, lengths), 0, q,
                                           k.unsqueeze(1), v.unsqueeze(1))[:, :, 0]
        finally:
            torch.set_num_threads(threads)

    one, many = decode(1), decode(32)
    assert torch.equal(one, many)
    chunk = native.prefill_attention(lib, storage, 0, q[:, 0], torch.tensor(lengths))
    assert torch.equal(chunk, one)
    keys, values = storage[0, 0].double(), storage[0, 1].double()
    for i, n in enumerate(lengths):
        per_group = heads // groups
        for h in range(heads):
            g = h // per_group
            weights = torch.softmax(q[i, 0, h].double() @ keys[g, :n].T / hd**0.5, -1)
            expected = weights @ values[g, :n]
            assert torch.allclose(one[i, h].double(), expected, rtol=2**-6, atol=2**-7), (n, h)


@needs_kernel
def test_batched_decode_equals_solo_decode_exactly() -> None:
    """bf16 on the native kernels: every row's arithmetic is independent of the batch, so a
    sequence decodes to the same logits alone or with others (greedy outputs cannot diverge)."""
    from adapters.chatglm2.config import ChatGLM2Config
    from adapters.chatglm2.model import ChatGLM2Model

    cfg = ChatGLM2Config(
        padded_vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4,
        kv_channels=32, multi_query_attention=True, multi_query_group_num=2,
        ffn_hidden_size=192, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True,
        post_layer_norm=True, layernorm_epsilon=1e-5, seq_length=256, eos_token_id=2,
        pad_token_id=0, torch_dtype="bfloat16", apply_residual_connection_post_layernorm=False,
    )
    torch.manual_seed(0)
    model = ChatGLM2Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.to(torch.bfloat16)
    model.finish_loading(torch.bfloat16, torch.device("cpu"))
    assert isinstance(model.transformer.output_layer, native.NativeLinear)
    prompts = [[5, 6, 7], list(range(10, 60)), [9]]
    solo = [model.new_cache() for _ in prompts]
    batched = [model.new_cache() for _ in prompts]
    for p, a, b in zip(prompts, solo, batched, strict=True):
        model.forward(p, a)
        model.forward(p, b)
    for step in range(70):  # past the caches' first reallocation (64 positions)
        ids = [[30 + step + i] for i in range(len(prompts))]
        rows = model.forward_batch(ids, batched)
        for i, cache in enumerate(solo):
            assert torch.equal(rows[i], model.forward(ids[i], cache)), (step, i)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_path_rounds_once_like_the_generic_path(bits: int) -> None:
    # forward's one-call path (bias and bf16 rounding in the kernel) must give the bits of the
    # generic path: fp32 product, + fp32 bias, one rounding to bf16.
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(36, 128, generator=gen) * 0.05
    bias = torch.randn(36, generator=gen).to(torch.bfloat16)
    layer = quantize_weight(w, str(bits), bias, kernel=True, native_kernel=True)
    x = torch.randn(3, 2, 128, generator=gen).to(torch.bfloat16)
    generic = (layer._kernel_matmul(x.reshape(6, 128)) + bias.float()).to(torch.bfloat16)
    assert torch.equal(layer(x), generic.reshape(3, 2, 36))


@needs_kernel
def test_elementwise_ops_reproduce_torchs_bf16_arithmetic() -> None:
    """Norm, SwiGLU and rotary as one call each give the bf16 values torch's ops give (they round
    at the same points); the norm's fp32 sum may differ in order, so at most rare 1-ulp steps."""
    from adapters.chatglm2.model import RMSNorm, apply_rotary, rope_table

    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 4096, generator=gen) * 3).to(torch.bfloat16)
    norm = RMSNorm(4096, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(4096, generator=gen) + 0.5)
    got, expected = native.rms_norm(lib, x, norm.weight, 1e-5), norm(x)
    differ = got != expected
    assert differ.float().mean() < 1e-3
    assert torch.all((got.float() - expected.float()).abs()[differ]
                     <= 2**-7 * expected.float().abs()[differ])

    h = (torch.randn(3, 2 * 1376, generator=gen) * 4).to(torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(native.swiglu(lib, h), torch.nn.functional.silu(gate) * up)

    heads, hd = 6, 64
    rope = rope_table(100, hd, 1.0, torch.bfloat16, torch.device("cpu"))[10:17].unsqueeze(0)
    mixed = torch.randn(2, 7, (heads + 2) * hd, generator=gen).to(torch.bfloat16)
    rotated = mixed.clone()
    native.rotary_(lib, rotated, heads, hd, rope)
    q = mixed[..., : heads * hd].reshape(2, 7, heads, hd)
    assert torch.equal(rotated[..., : heads * hd].reshape(2, 7, heads, hd), apply_rotary(q, rope))
    assert torch.equal(rotated[..., heads * hd:], mixed[..., heads * hd:])  # values untouched


@needs_kernel
def test_output_layer_is_packed_without_a_second_copy() -> None:
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    storage = linear.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 64).to(torch.bfloat16)
    expected = linear(x).float()
    layer = native.NativeLinear.replacing(linear)
    assert isinstance(layer, native.NativeLinear)
    assert layer.packed.untyped_storage().data_ptr() == storage
    assert torch.all((layer(x).float() - expected).abs() <= 2**-7 * expected.abs().amax())
