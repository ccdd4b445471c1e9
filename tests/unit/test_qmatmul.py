"""kiapi's quantized CPU kernel (``kiapi/runtime/qmatmul.c``, compiled at first use) against
NumPy on the same values: the expansion is ``scale * q + bias`` bit for bit, the products agree
to float32 rounding for 4- and 8-bit weights, group sizes 32-128, one to many rows (the kernel
for a few, the BLAS on the expansion for many), and the layers built on it (siblings sharing
one stacked matrix, a tied head) compute what the float32 layers compute."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.unit.test_dequantize import numpy_expansion, quantized_layers


@pytest.fixture(scope="module")
def mx():
    from kiapi.runtime import qmatmul
    from kiapi.runtime.mlx_import import import_mlx

    assert qmatmul.kernel() is not None, "the kernel needs a C compiler (cc), as mx.compile does"
    return import_mlx()


def quantized(mx, outputs: int, inputs: int, bits: int, group_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = mx.array(rng.standard_normal((outputs, inputs)).astype(np.float32))
    return mx.quantize(dense, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_the_expansion_is_exact(mx, bits, group_size):
    from kiapi.runtime.qmatmul import PackedMatrix

    packed, scales, biases = quantized(mx, 40, 256, bits, group_size)
    matrix = PackedMatrix(packed, scales, biases, group_size, bits)
    expected = numpy_expansion(packed, scales, biases, group_size, bits)
    assert np.array_equal(np.array(matrix.dequantized()), expected)


@pytest.fixture
def float32_products():
    """Products over many rows in float32 (the BLAS), whatever this CPU could do."""
    from kiapi.runtime import qmatmul

    qmatmul.configure("float32")
    yield
    qmatmul.configure("auto")


@pytest.fixture
def bf16(mx):
    from kiapi.runtime import qmatmul

    if not qmatmul.bf16_products():
        pytest.skip("this CPU has no AMX (or KIAPI_MATMUL_PRECISION=float32)")


def bf16_rounded(a) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float64."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 32, 33])
def test_products_agree_with_numpy(mx, bits, group_size, rows, float32_products):
    """Inputs of 96 (group 32: an odd count of 32-value blocks, the kernel's tail) or 384;
    up to KERNEL_ROWS (32) rows run the kernel (in sweeps of 8), more the BLAS on the
    expansion."""
    from kiapi.runtime.qmatmul import PackedMatrix

    inputs = 96 if group_size == 32 else 384
    packed, scales, biases = quantized(mx, 72, inputs, bits, group_size, seed=rows)
    weight = numpy_expansion(packed, scales, biases, group_size, bits).astype(np.float64)
    x = np.random.default_rng(rows).standard_normal((2, rows, inputs)).astype(np.float32)
    ours = PackedMatrix(packed, scales, biases, group_size, bits).matmul(mx.array(x))
    assert ours.shape == (2, rows, 72) and ours.dtype == mx.float32
    expected = x.astype(np.float64) @ weight.T
    scale = np.abs(x).astype(np.float64) @ np.abs(weight).T  # the sum's magnitude
    assert (np.abs(np.array(ours) - expected) <= 1e-6 * scale + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 15, 16, 31, 32, 33, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_products_agree_with_numpy_on_rounded_values(mx, bf16, rows, with_bias):
    """AMX tiles: x and W rounded to bfloat16 (ties to even), every product exact in
    float32, the sums in float32: within float32 rounding of NumPy's float64 product of the
    rounded values. Rows below, at and past the tiles' 16 and 32 (padding, partial blocks);
    96 inputs (three 32-wide tiles), 64 outputs (two 32-wide blocks)."""
    from kiapi.runtime.qmatmul import Bf16Linear, gemm_bf16

    rng = np.random.default_rng(rows)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32) if with_bias else None
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    linear = Bf16Linear(mx.array(w), None if b is None else mx.array(b))
    ours = gemm_bf16(x, linear.tiles, 64, linear.bias)
    expected = bf16_rounded(x) @ bf16_rounded(w).T + (0 if b is None else b)
    scale = np.abs(bf16_rounded(x)) @ np.abs(bf16_rounded(w)).T
    assert ours.shape == (rows, 64)
    assert (np.abs(ours - expected) <= 1e-6 * scale + 1e-6).all()
    # and not the float32 product: the rounding is really there
    assert np.abs(ours - (x.astype(np.float64) @ w.T + (0 if b is None else b))).max() > 1e-3


@pytest.mark.parametrize("rows", [1, 15, 31, 32, 33, 100])
def test_an_up_product_hands_gelu_of_its_rows_to_the_down_product_as_tiles(mx, bf16, rows):
    """An MLP in bfloat16: the up product writes GELU of its outputs, rounded, as the tiles the
    down product reads (zeros past the rows); the down product takes them as its x. The pair
    equals NumPy's GELU of the rounded up product, rounded, times the rounded down matrix."""
    from kiapi.runtime.qmatmul import Bf16Linear, gemm_bf16, gemm_bf16_gelu_rows

    rng = np.random.default_rng(rows)
    w_up = rng.standard_normal((96, 64)).astype(np.float32) * 0.3
    b_up = rng.standard_normal(96).astype(np.float32)
    w_down = rng.standard_normal((32, 96)).astype(np.float32)
    b_down = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    up = Bf16Linear(mx.array(w_up), mx.array(b_up))
    down = Bf16Linear(mx.array(w_down), mx.array(b_down))
    before = x.copy()
    gelu = gemm_bf16_gelu_rows(x, up.tiles, 96, up.bias)
    assert (gelu.rows, gelu.width) == (rows, 96) and (x == before).all()
    padded = (rows + 31) // 32 * 32
    tiles = gelu.tiles[: padded * 96].reshape(padded // 16, 96 // 32, 16, 32)
    as_rows = tiles.transpose(0, 2, 1, 3).reshape(padded, 96)  # (row, input) order
    assert (as_rows[rows:] == 0).all()  # padding rows are zeros, whatever the bias
    hidden = bf16_rounded(x) @ bf16_rounded(w_up).T + b_up
    erf = np.vectorize(math.erf)(hidden / math.sqrt(2))
    activated = bf16_rounded((hidden * 0.5 * (1 + erf)).astype(np.float32))
    got_activated = (as_rows[:rows].astype(np.uint32) << 16).view(np.float32)
    # (the polynomial erf and float32 sums may round a value to the neighbouring bfloat16)
    assert np.abs(got_activated - activated).max() <= 2e-2 * max(1.0, np.abs(activated).max())
    ours = gemm_bf16(gelu, down.tiles, 32, down.bias)
    expected = activated @ bf16_rounded(w_down).T + b_down
    assert ours.shape == (rows, 32)
    assert np.abs(ours - expected).max() <= 2e-2 * max(1.0, np.abs(expected).max())
    # and the float32 rows through the same down product give the same answer
    assert np.array_equal(
        ours, gemm_bf16(np.ascontiguousarray(got_activated), down.tiles, 32, down.bias)
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_a_prompt_chunk_expands_to_bf16_tiles(mx, bf16, bits):
    """Over KERNEL_ROWS rows a packed matrix expands into bfloat16 tiles and multiplies on
    AMX: the expansion is exact before rounding, so the product is NumPy's on the rounded
    expansion; with ``matmul_precision`` float32 the same call is the float32 product."""
    from kiapi.runtime import qmatmul
    from kiapi.runtime.qmatmul import PackedMatrix

    packed, scales, biases = quantized(mx, 96, 128, bits, 64, seed=bits)
    matrix = PackedMatrix(packed, scales, biases, 64, bits)
    weight = numpy_expansion(packed, scales, biases, 64, bits)
    x = np.random.default_rng(bits).standard_normal((40, 128)).astype(np.float32)
    ours = np.array(matrix.matmul(mx.array(x)))
    expected = bf16_rounded(x) @ bf16_rounded(weight).T
    scale = np.abs(bf16_rounded(x)) @ np.abs(bf16_rounded(weight)).T
    assert (np.abs(ours - expected) <= 1e-6 * scale + 1e-6).all()
    qmatmul.configure("float32")
    try:
        exact = np.array(matrix.matmul(mx.array(x)))
    finally:
        qmatmul.configure("auto")
    full = x.astype(np.float64) @ weight.astype(np.float64).T
    assert (np.abs(exact - full) <= 1e-6 * (np.abs(x) @ np.abs(weight).T) + 1e-6).all()
    assert np.abs(ours - full).max() > 1e-3


def test_bf16_settings_and_shapes_are_checked(mx):
    from kiapi.runtime import qmatmul

    with pytest.raises(ValueError, match="matmul precision"):
        qmatmul.configure("float16")
    assert qmatmul.bf16_shape(64, 96) and not qmatmul.bf16_shape(48, 96)
    if qmatmul.bf16_products():
        with pytest.raises(ValueError, match="AMX tiles"):
            qmatmul.Bf16Linear(mx.zeros((48, 64)))
    qmatmul.configure("float32")
    try:
        assert not qmatmul.bf16_products()
    finally:
        qmatmul.configure("auto")


def test_unsupported_quantizations_are_refused(mx):
    from kiapi.runtime import qmatmul

    assert qmatmul.supported(4, 32) and qmatmul.supported(8, 128)
    assert not qmatmul.supported(3, 32)  # values straddle words
    assert not qmatmul.supported(4, 16)  # smaller than a block
    assert not qmatmul.supported(4, 96)  # an odd number of blocks per group: not MLX's
    assert not qmatmul.supported(4, 32, mode="mxfp4")


def sibling_layers(mx):
    import mlx.nn as nn

    class Block(nn.Module):  # the names mlx-lm's attention and MLP use
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 64, bias=False)
            self.k_proj = nn.Linear(64, 32, bias=False)
            self.v_proj = nn.Linear(64, 32, bias=False)
            self.o_proj = nn.Linear(64, 64, bias=False)

    mx.random.seed(5)
    block = Block()
    nn.quantize(block, group_size=32, bits=4)
    return block


def test_siblings_share_one_product(mx):
    from mlx.utils import tree_flatten

    from kiapi.runtime import qmatmul

    block = sibling_layers(mx)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    weights = {
        n: numpy_expansion(block[n].weight, block[n].scales, block[n].biases, 32, 4) for n in names
    }
    packed = dict(qmatmul.pack_linears([(n, block[n]) for n in names]))
    x = mx.array(np.random.default_rng(1).standard_normal((1, 2, 64)).astype(np.float32))
    other = mx.array(np.random.default_rng(2).standard_normal((1, 2, 64)).astype(np.float32))
    calls = []
    shared = packed["q_proj"]._shared
    original = shared.matrix.matmul
    shared.matrix.matmul = lambda a: calls.append(a) or original(a)

    q, k, v = packed["q_proj"](x), packed["k_proj"](x), packed["v_proj"](x)
    assert len(calls) == 1  # one pass over x for the three
    assert shared._x is None and shared._y is None  # released once every sibling read x
    k_other = packed["k_proj"](other)  # another input: computed for it, not the cached one
    assert len(calls) == 2
    checks = [("q_proj", q, x), ("k_proj", k, x), ("v_proj", v, x), ("k_proj", k_other, other)]
    for name, got, inp in [*checks, ("o_proj", packed["o_proj"](x), x)]:
        expected = np.array(inp) @ weights[name].T
        assert np.abs(np.array(got) - expected).max() < 1e-4, name
    # the stacked arrays are parameters once (the first sibling's), o_proj's its own
    params = dict(tree_flatten({n: m.parameters() for n, m in packed.items()}))
    assert sorted(params) == [f"{n}.{a}" for n in ("o_proj", "q_proj") for a in
                              ("biases", "scales", "weight")]  # fmt: skip
    assert params["q_proj.weight"].shape[0] == 128


def test_a_packed_model_computes_what_the_float32_one_does(mx, float32_products):
    """The tiny model of ``test_dequantize`` (a tied head, one linear layer), packed: lookups
    stay exact, and the head runs the kernel for a few rows and MLX's quantized matmul
    (lazy) for many."""
    from kiapi.runtime.llm_engine import dequantize_for_cpu
    from kiapi.runtime.mlx_quantized import dequantized_float32
    from kiapi.runtime.qmatmul import KERNEL_ROWS, packed_modules

    for bias in (False, True):
        _, model = quantized_layers(bias)
        emb, proj = model.embed_tokens, model.proj
        table = np.array(dequantized_float32(emb.weight, emb.scales, emb.biases, 32, 4))
        weight = np.array(dequantized_float32(proj.weight, proj.scales, proj.biases, 32, 4))
        bias_value = np.array(proj.bias) if bias else 0
        assert dequantize_for_cpu(model, "packed") == "packed"
        packed_linear, packed_embedding = packed_modules()
        assert isinstance(model.proj, packed_linear)
        assert isinstance(model.embed_tokens, packed_embedding)
        for length in (1, KERNEL_ROWS + 4):
            ids = mx.array([[3, 0, 39, 7] * length][:1])[:, :length]
            rows = table[np.array(ids)]
            expected = (rows @ weight.T + bias_value)[..., :64] @ table.T
            assert np.array_equal(np.array(model.embed_tokens(ids)), rows)
            assert np.abs(np.array(model(ids)) - expected).max() < 1e-4


def test_the_packed_layout_needs_the_kernel_for_every_layer(mx):
    import mlx.nn as nn

    from kiapi.runtime.llm_engine import dequantize_for_cpu

    model = nn.Sequential(nn.Linear(64, 64))
    nn.quantize(model, group_size=32, bits=3)
    with pytest.raises(ValueError, match="kernel for every layer"):
        dequantize_for_cpu(model, "packed")
    assert dequantize_for_cpu(model) in ("rows", "columns")  # measured: float32 only


def test_a_missing_compiler_leaves_float32_weights(monkeypatch, tmp_path):
    from kiapi.runtime import qmatmul

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    qmatmul.kernel.cache_clear()
    try:
        assert qmatmul.kernel() is None
        assert not qmatmul.supported(4, 32)
    finally:
        monkeypatch.delenv("CC")
        qmatmul.kernel.cache_clear()
    assert qmatmul.kernel() is not None


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    from kiapi.runtime import qmatmul

    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(qmatmul, "SOURCE", broken)
    with pytest.raises(OSError, match="could not build"):
        qmatmul.build("cc", tmp_path / "kernels")
    assert not [p for p in (tmp_path / "kernels").rglob("*") if p.is_file()]


def test_in_place_softmax_and_gelu_write_mlxs_own_buffer(mx):
    """The embedding engine's softmax and GELU: into an evaluated intermediate's buffer,
    which MLX then reads; anything but a row-contiguous float32 array is refused."""
    from math import erf

    from kiapi.runtime.qmatmul import gelu_in_place, softmax_in_place

    values = np.random.default_rng(4).standard_normal((3, 5, 40)).astype(np.float32) * 4
    scores = mx.array(values) * 1.0  # an intermediate, evaluated below
    mx.eval(scores)
    softmax_in_place(scores, threads=1)
    expected = np.exp(values - values.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert np.abs(np.array(scores @ mx.eye(40)) - expected).max() < 1e-6

    x = mx.array(values) * 1.0
    mx.eval(x)
    gelu_in_place(x, threads=1)
    exact = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))(values.astype(np.float64))
    assert np.abs(np.array(x) - exact).max() < 1e-5

    with pytest.raises(ValueError, match="row-contiguous"):
        softmax_in_place(mx.array(values).transpose(0, 2, 1), threads=1)
    with pytest.raises(ValueError, match="float32"):
        gelu_in_place(mx.array(values).astype(mx.float16), threads=1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("added_rows", [12, 36])  # a text's position rows; a whole residual
def test_add_layer_norm_adds_rows_that_repeat_down_the_batch(mx, threads, added_rows):
    """``x = layer_norm(a + x)`` in place, a's row ``r % len(a)`` added to x's row r: one
    call normalizes every text of a batch with its position rows (or a full residual)."""
    from kiapi.runtime.qmatmul import add_layer_norm

    rng = np.random.default_rng(5)
    x = rng.standard_normal((36, 40)).astype(np.float32)
    a = rng.standard_normal((added_rows, 40)).astype(np.float32)
    gamma, beta = (rng.standard_normal(40).astype(np.float32) for _ in range(2))
    summed = x.astype(np.float64) + np.tile(a, (36 // added_rows, 1))
    mean, var = summed.mean(-1, keepdims=True), summed.var(-1, keepdims=True)
    expected = (summed - mean) / np.sqrt(var + 1e-12) * gamma + beta
    add_layer_norm(a, x, gamma, beta, 1e-12, threads)
    assert np.abs(x - expected).max() < 1e-4

    for wrong in (a[:, :39], rng.standard_normal((7, 40)).astype(np.float32), a[:0]):
        with pytest.raises(ValueError, match="cannot add"):
            add_layer_norm(np.ascontiguousarray(wrong), x, gamma, beta, 1e-12, threads)


def test_decoding_more_sequences_than_kernel_rows_stays_on_the_kernel(mx, monkeypatch):
    """A decode step of many sequences (one position each) multiplies the tied head through
    the kernel: MLX's quantized matmul is for prefill's logits, which are never read."""
    from kiapi.runtime.llm_engine import dequantize_for_cpu
    from kiapi.runtime.mlx_quantized import dequantized_float32
    from kiapi.runtime.qmatmul import KERNEL_ROWS

    _, model = quantized_layers(False)
    emb = model.embed_tokens
    table = np.array(dequantized_float32(emb.weight, emb.scales, emb.biases, 32, 4))
    dequantize_for_cpu(model, "packed")
    lazy = []
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: lazy.append(a) or None)
    x = np.random.default_rng(3).standard_normal((KERNEL_ROWS + 8, 1, 64)).astype(np.float32)
    out = model.embed_tokens.as_linear(mx.array(x))
    assert not lazy and np.abs(np.array(out) - x @ table.T).max() < 1e-4


def test_an_untied_head_leaves_prefill_logits_lazy(mx, monkeypatch):
    """An output head of its own (``lm_head``) over a prompt chunk is MLX's lazy quantized
    matmul, which mlx-lm's prefill never evaluates; one position per sequence runs the
    kernel. Both compute the same logits."""
    import mlx.nn as nn

    from kiapi.runtime import qmatmul

    class Untied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(64, 40, bias=False)

        def __call__(self, x):
            return self.lm_head(x)

    mx.random.seed(9)
    model = Untied()
    nn.quantize(model, group_size=32, bits=4)
    head = model.lm_head
    weight = numpy_expansion(head.weight, head.scales, head.biases, 32, 4)
    packed = dict(qmatmul.pack_linears([("lm_head", head)]))["lm_head"]
    eager = []
    matmul = qmatmul.PackedMatrix.matmul
    spy = lambda self, a: eager.append(a) or matmul(self, a)  # noqa: E731
    monkeypatch.setattr(qmatmul.PackedMatrix, "matmul", spy)
    chunk = np.random.default_rng(5).standard_normal((2, 30, 64)).astype(np.float32)
    logits = packed(mx.array(chunk))
    assert not eager  # nothing computed yet
    assert np.abs(np.array(logits) - chunk @ weight.T).max() < 1e-4
    step = packed(mx.array(chunk[:, -1:]))
    assert len(eager) == 1 and np.abs(np.array(step) - chunk[:, -1:] @ weight.T).max() < 1e-4


PORTABLE_PROBE = """
import numpy as np
from kiapi.runtime import qmatmul
from kiapi.runtime.mlx_import import import_mlx
from tests.unit.test_dequantize import numpy_expansion

mx = import_mlx()
assert qmatmul.kernel() is not None, qmatmul.describe()
worst = 0.0
for bits in (4, 8):
    for rows in (1, 9, 40):
        dense = mx.array(np.random.default_rng(bits).standard_normal((72, 96)).astype(np.float32))
        packed, scales, biases = mx.quantize(dense, group_size=32, bits=bits)
        weight = numpy_expansion(packed, scales, biases, 32, bits).astype(np.float64)
        x = np.random.default_rng(rows).standard_normal((rows, 96)).astype(np.float32)
        ours = qmatmul.PackedMatrix(packed, scales, biases, 32, bits).matmul(mx.array(x))
        expected = x.astype(np.float64) @ weight.T
        scale = np.abs(x).astype(np.float64) @ np.abs(weight).T + 1
        worst = max(worst, float((np.abs(np.array(ours) - expected) / scale).max()))
scores = mx.array(np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)) * 1.0
mx.eval(scores)
values = np.array(scores)
qmatmul.softmax_in_place(scores, threads=1)
reference = np.exp(values - values.max(-1, keepdims=True))
reference /= reference.sum(-1, keepdims=True)
worst = max(worst, float(np.abs(np.array(scores) - reference).max()))
print(worst)
"""


@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_builds_for_older_x86_compute_the_same(tmp_path, march):
    """The kernel's SSE2 (4 lanes, plain loops) and AVX2 (8 lanes) code, built by a C compiler
    told to target those CPUs (this machine may have AVX-512): same products and softmax."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    flags = Path("/proc/cpuinfo").read_text()
    if march == "haswell" and not all(f in flags for f in (" avx2", " fma", " bmi2")):
        pytest.skip("this CPU cannot run a Haswell build")
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do shift; [ "$a" = -march=native ] && a=-march={march}; '
        'set -- "$@" "$a"; done\n'
        'exec cc "$@"\n'
    )
    compiler.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", PORTABLE_PROBE], capture_output=True, text=True, env=env,
        cwd=root, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-6
    (library,) = (tmp_path / "cache").rglob("libkiapi_qmatmul.so")  # built there, not reused
    disassembly = subprocess.run(
        ["objdump", "-d", str(library)], capture_output=True, text=True, timeout=60
    ).stdout
    assert "zmm" not in disassembly  # no AVX-512: the target CPU was the one asked for
    assert ("ymm" in disassembly) == (march == "haswell")


def test_scratch_rows_are_reused_until_the_worker_goes_quiet():
    """A layer's intermediates: the same memory for every batch that fits it (no fresh pages
    to fault in), a larger one when a batch outgrows it, and none kept once quiet."""
    from kiapi.runtime import qmatmul
    from kiapi.runtime.mlx_engine import release_idle_memory

    first = qmatmul.scratch_rows("test_rows", 4, 8)
    assert first.shape == (4, 8) and first.flags.c_contiguous and first.dtype == np.float32
    again = qmatmul.scratch_rows("test_rows", 2, 8)
    assert again.shape == (2, 8) and np.shares_memory(first, again)
    grown = qmatmul.scratch_rows("test_rows", 16, 8)
    assert not np.shares_memory(first, grown)
    release_idle_memory()
    assert not np.shares_memory(grown, qmatmul.scratch_rows("test_rows", 2, 8))
    # between calls: kept up to a size, dropped beyond it
    kept = qmatmul.scratch_rows("test_rows", 2, 8)
    qmatmul.trim_scratch(10 * kept.nbytes)
    assert np.shares_memory(kept, qmatmul.scratch_rows("test_rows", 2, 8))
    qmatmul.trim_scratch(kept.nbytes // 2)
    assert not np.shares_memory(kept, qmatmul.scratch_rows("test_rows", 2, 8))


def test_the_kernels_buffers_start_cache_lines():
    """AMX tiles are read and written as 64-byte rows: every buffer kiapi hands the kernel
    for them starts a cache line (NumPy alone aligns to 16 bytes)."""
    from kiapi.runtime import qmatmul

    for size, dtype in [(1, np.uint16), (7, np.float32), (1000, np.uint16), (3 * 5, "float32")]:
        for _ in range(8):  # NumPy's own placement varies between allocations
            buffer = qmatmul.aligned_empty(size, dtype)
            assert buffer.ctypes.data % 64 == 0
            assert buffer.shape == (size,) and buffer.dtype == np.dtype(dtype)
            assert buffer.flags.c_contiguous and buffer.flags.writeable
    rows = qmatmul.aligned_empty((3, 5))
    assert rows.shape == (3, 5) and rows.dtype == np.float32 and rows.ctypes.data % 64 == 0
    for i in range(8):  # as placed, 16-byte aligned buffers would all start lines 1 in 4**8
        assert qmatmul.scratch(f"test_{i}", 3 + i, "uint16").ctypes.data % 64 == 0
    qmatmul.release_scratch()


def numpy_bf16_attention(q, k, v, scale, keep, causal):
    """kiapi_attention_bf16's arithmetic in NumPy: q (scaled) and k rounded to bfloat16, the
    scores' masked softmax numerators rounded to bfloat16 against v rounded, divided by their
    unrounded sum; a row that keeps nothing averages all values. (B, H, L, D) queries against
    (B, KVH, S, D) keys and values; ``keep`` (B, L, S) booleans or None."""
    batch, heads, length, _ = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    out = np.zeros(q.shape)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = bf16_rounded(q[b, h] * np.float32(scale)).astype(np.float64)
            scores = scores @ bf16_rounded(k[b, g]).astype(np.float64).T
            allowed = np.ones((length, keys), bool) if keep is None else keep[b].astype(bool)
            if causal:
                allowed &= np.arange(keys)[None, :] <= np.arange(length)[:, None] + keys - length
            for i in range(length):
                if not allowed[i].any():
                    out[b, h, i] = v[b, g].mean(axis=0)
                    continue
                p = np.where(allowed[i], np.exp(scores[i] - scores[i][allowed[i]].max()), 0.0)
                rounded = bf16_rounded(p.astype(np.float32)).astype(np.float64)
                out[b, h, i] = rounded @ bf16_rounded(v[b, g]).astype(np.float64) / p.sum()
    return out


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "keys", "dim", "causal", "masked"),
    [
        (2, 4, 4, 20, 20, 32, False, False),  # MiniLM's shape, rows not a tile's 16
        (3, 4, 4, 33, 33, 32, False, True),  # padding masks, a row that keeps nothing
        (2, 6, 2, 17, 40, 64, True, False),  # grouped heads, a prompt chunk after a cache
        (1, 2, 1, 5, 100, 128, True, False),  # keys not a multiple of 32
    ],
)
def test_bf16_attention_agrees_with_numpy_on_rounded_values(
    mx, bf16, batch, heads, kv_heads, length, keys, dim, causal, masked
):
    """Both of attention's products on AMX tiles: the same result as NumPy doing the same
    rounding (up to float32 sums and kiapi's exp), so the tiles' layouts are right; and within
    bfloat16's precision of the float32 kernel."""
    from kiapi.runtime import qmatmul

    rng = np.random.default_rng(length)
    q = rng.standard_normal((batch, heads, length, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, keys, dim)).astype(np.float32) for _ in "kv")
    keep = None
    if masked:
        keep = (rng.random((batch, length, keys)) > 0.3).astype(np.uint8)
        keep[1, 4] = 0
    strides = (heads * length * dim, length * dim, dim)
    strides += (kv_heads * keys * dim, keys * dim, dim) * 2 + strides
    sizes = (batch, heads, kv_heads, length, keys, dim)
    outs = []
    for rounded in (True, False):
        out = np.zeros_like(q)
        qmatmul.attention(q, k, v, out, sizes, strides, 0.3, causal, keep, 2, bf16=rounded)
        outs.append(out)
    expected = numpy_bf16_attention(q, k, v, 0.3, keep, causal)
    assert np.abs(outs[0] - expected).max() < 2e-3
    assert np.abs(outs[0] - outs[1]).max() < 0.05 < np.abs(expected).max()


def test_wide_vectors_are_asked_for_on_x86_only():
    """GCC on ARM refuses ``-mprefer-vector-width``: asking for it there would leave the
    machine without the kernel."""
    from kiapi.runtime.qmatmul import compile_flags

    for machine in ("x86_64", "AMD64"):
        assert "-mprefer-vector-width=512" in compile_flags(machine)
    for machine in ("aarch64", "arm64"):
        assert not any(flag.startswith("-mprefer") for flag in compile_flags(machine))
        assert "-march=native" in compile_flags(machine)
