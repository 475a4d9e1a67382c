"""The float32 linear kernel (kernels/csrc/f32_linear.cpp) against float64 references, its bits
across batches and thread counts, and the roofline kernels (kernels/csrc/roofline.cpp).

Run natively and with KVSERVE_CPU_ISA=avx2: the kernel has an AVX-512 and an AVX2 + FMA path.
"""

from __future__ import annotations

import platform

import pytest
import torch

from kvserve.kernels import cpu_library, f32_linear, pointwise, roofline
from kvserve.model.llama import Projection

EPS32 = torch.finfo(torch.float32).eps

needs_kernel = pytest.mark.skipif(not f32_linear.available(), reason="no AVX2 + FMA build of the kernel here")

# (rows, N, K): N and K off the vector widths (8, 16) and panel widths (16, 32), K = 1, one row to 67
SHAPES = [
    pytest.param(1, 1, 1, id="1x1x1"),
    pytest.param(1, 960, 576, id="one-row-model-shape"),
    pytest.param(2, 17, 1, id="k-1"),
    pytest.param(3, 33, 5, id="n-one-past-a-panel"),
    pytest.param(7, 31, 17, id="n-one-short-of-a-panel"),
    pytest.param(13, 100, 129, id="odd"),
    pytest.param(37, 47, 200, id="row-tails-of-every-block"),
    pytest.param(67, 300, 77, id="67-rows"),
    pytest.param(40, 2100, 64, id="several-weight-chunks"),
    pytest.param(200, 70, 1536, id="units-of-rows-deep-k"),
]


def error_bound(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """What float32 may differ from float64 by, per output: a sum of K products, rounded once per
    FMA, is within K u sum_i |x_i w_i| (u = eps32 / 2, to first order), and adding the bias or
    residual rounds once more, within u |out|. We allow (K + 1) eps32 (|x| @ |W|^T + |add|): twice
    that, and still far below one product's share of the sum, which a dropped or repeated term
    (a wrong index, a padding lane) would move the output by."""
    magnitude = x.double().abs() @ weight.double().abs().t()
    if add is not None:
        magnitude = magnitude + add.double().abs()
    return (x.shape[1] + 1) * EPS32 * magnitude


def reference64(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    return f32_linear.linear_f32_ref(x.double(), weight.double(), None if add is None else add.double())


def assert_within_bound(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        add: torch.Tensor | None = None) -> None:
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    excess = (got.double() - reference64(x, weight, add)).abs() - error_bound(x, weight, add)
    assert excess.max() <= 0, f"over the bound by {excess.max()}"


def silu64(g: torch.Tensor) -> torch.Tensor:
    return g * torch.sigmoid(g)


def test_the_kernel_is_built_here() -> None:
    # CI machines are x86-64 with AVX2: the kernel, not torch's GEMM, is what the engine runs there
    if platform.machine() in ("x86_64", "AMD64") and "avx2" in cpu_library.cpu_flags():
        assert f32_linear.available()


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
@pytest.mark.parametrize("add", ["none", "bias", "residual"])
def test_linear_matches_the_float64_reference(rows: int, n: int, k: int, add: str) -> None:
    weight = torch.randn(n, k)
    x = torch.randn(rows, k)
    addend = {"none": None, "bias": torch.randn(n), "residual": torch.randn(rows, n)}[add]
    got = f32_linear.linear_f32(x, f32_linear.pack(weight), n, k, addend)
    assert got.shape == (rows, n)
    assert_within_bound(got, x, weight, addend)


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_gated_is_silu_mul_of_the_plain_product(rows: int, n: int, k: int) -> None:
    # the epilogue runs common.h's silu on the same sums as the unfused path: equal but for how the
    # compiler contracted fast_exp's steps into FMAs at the two call sites, a relative |g| eps32 / 2
    # from rounding the exponent's argument. Against float64: the sums' bound propagated through
    # silu (|silu'| <= 1.1), plus that and fast_exp's own ~2e-7 relative error.
    width = n
    weight = torch.randn(2 * width, k)
    x = torch.randn(rows, k)
    fused = f32_linear.linear_f32(x, f32_linear.pack_gated(weight), width, k, gated=True)
    plain = f32_linear.linear_f32(x, f32_linear.pack(weight), 2 * width, k)
    unfused = pointwise.silu_mul(plain)
    assert fused.shape == (rows, width) and not torch.isnan(fused).any()
    silu_error = (plain[:, :width].abs() + 8) * EPS32
    assert ((fused - unfused).abs() <= silu_error * unfused.abs()).all()
    gate, up = reference64(x, weight).chunk(2, dim=1)
    gate_bound, up_bound = error_bound(x, weight).chunk(2, dim=1)
    expected = silu64(gate) * up
    bound = 1.1 * gate_bound * up.abs() + silu64(gate).abs() * up_bound + silu_error * expected.abs()
    assert ((fused.double() - expected).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("gated", [False, True])
def test_a_rows_bits_depend_on_neither_its_batch_nor_the_thread_count(gated: bool) -> None:
    # each output is one chain of FMAs over K in order: neither the other rows of the batch (batch
    # invariance of greedy decoding, exact prompt logprobs) nor the split over threads may change a bit
    n, k = 300, 203
    weight = torch.randn(2 * n if gated else n, k)
    packed = f32_linear.pack_gated(weight) if gated else f32_linear.pack(weight)
    x = torch.randn(300, k)
    residual = None if gated else torch.randn(300, n)

    def run(first: int, rows: int) -> torch.Tensor:
        add = None if residual is None else residual[first:first + rows]
        return f32_linear.linear_f32(x[first:first + rows], packed, n, k, add, gated=gated)

    batched = run(0, 300)
    for row in (0, 5, 36, 150, 299):
        assert torch.equal(run(row, 1)[0], batched[row])
        # a batch of 37 with the row first, in the middle and last
        for offset in (0, 17, 36):
            first = min(max(row - offset, 0), 300 - 37)
            assert torch.equal(run(first, 37)[row - first], batched[row])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert torch.equal(run(0, 300), batched)
            assert torch.equal(run(36, 1)[0], batched[36])
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("gated", [False, True])
def test_padding_never_leaks(gated: bool) -> None:
    # NaN in every padding lane of the packed weights and around strided views of x and the residual:
    # a padding output stored over a real one, or a read past a row's K columns or past the last
    # row, shows as a NaN
    rows, n, k = 23, 37, 45
    weight = torch.randn(2 * n if gated else n, k)
    packed = f32_linear.pack_gated(weight) if gated else f32_linear.pack(weight)
    lanes = cpu_library.library().kv_f32_lanes()
    if gated:  # panels of [K, gate | up, lanes]: outputs past n in both halves are padding
        panels = packed.view(-1, k, 2, lanes)
        outputs = torch.arange(panels.shape[0])[:, None] * lanes + torch.arange(lanes)
        panels.permute(0, 2, 1, 3)[(outputs >= n)[:, None, None, :].expand(-1, 2, k, -1)] = float("nan")
    else:  # panels of [K, 2 lanes]: outputs past n are padding
        panels = packed.view(-1, k, 2 * lanes)
        outputs = torch.arange(panels.shape[0])[:, None] * 2 * lanes + torch.arange(2 * lanes)
        panels.permute(0, 2, 1)[(outputs >= n)[:, :, None].expand(-1, -1, k)] = float("nan")
    assert torch.isnan(packed).any() == (n % (lanes if gated else 2 * lanes) != 0)

    x = torch.randn(rows, k)
    x_buffer = torch.full((rows + 3, k + 5), float("nan"))
    x_buffer[:rows, 2:k + 2] = x
    x_view = x_buffer[:rows, 2:k + 2]
    residual = None if gated else torch.randn(rows, n)
    add_view = None
    if residual is not None:
        add_buffer = torch.full((rows + 2, n + 7), float("nan"))
        add_buffer[:rows, :n] = residual
        add_view = add_buffer[:rows, :n]
    got = f32_linear.linear_f32(x_view, packed, n, k, add_view, gated=gated)
    assert not torch.isnan(got).any()
    clean = f32_linear.pack_gated(weight) if gated else f32_linear.pack(weight)
    assert torch.equal(got, f32_linear.linear_f32(x, clean, n, k, residual, gated=gated))


@needs_kernel
def test_no_rows() -> None:
    assert f32_linear.linear_f32(torch.empty(0, 64), f32_linear.pack(torch.randn(40, 64)), 40, 64).shape == (0, 40)


@needs_kernel
@pytest.mark.parametrize("kind", ["plain", "bias", "residual", "swiglu"])
def test_projection_runs_the_kernel_on_float32_cpu_weights(kind: str) -> None:
    n, k, rows = 96, 80, 9
    weight = torch.randn(2 * n if kind == "swiglu" else n, k)
    bias = torch.randn(n) if kind == "bias" else None
    projection = Projection(weight, bias, swiglu=kind == "swiglu")
    assert projection.layout == "f32_packed"
    x = torch.randn(rows, k)
    residual = torch.randn(rows, n) if kind == "residual" else None
    got = projection(x, residual)
    if kind == "swiglu":
        assert torch.equal(got, f32_linear.linear_f32(x, f32_linear.pack_gated(weight), n, k, gated=True))
    else:
        assert_within_bound(got, x, weight, bias if residual is None else residual)


def test_roofline_ceilings_are_plausible() -> None:
    threads, lanes = cpu_library.threads(), cpu_library.library().kv_f32_lanes()
    peak, bandwidth, read = roofline.fma_peak(), roofline.copy_bandwidth(), roofline.read_bandwidth()
    # FMA throughput between one vector FMA per thread every other cycle at 1 GHz and two per cycle
    # at 6 GHz (a loop the compiler emptied reads as far more; a scalar one as far less at lanes 16)
    assert threads * 1e9 * lanes <= peak <= threads * 6e9 * 2 * 2 * lanes
    # memory: between 1 GB/s and 2 TB/s; and any core multiplies faster than memory feeds it floats
    assert 1e9 <= bandwidth <= 2e12 and 1e9 <= read <= 2e12
    assert peak > bandwidth / 4
    assert roofline.fma_peak() is peak  # measured once per process
