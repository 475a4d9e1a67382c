"""The compiled CPU kernels (kernels/csrc) against their torch references.

Random inputs at awkward sizes, float32 and bfloat16; for paged decode, pools whose every slot no
page list holds is NaN (a read outside a head's list shows) and output buffers that start as NaN (an
element never written shows), as for the Triton kernels in test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from kvserve.attention.registry import create_backend
from kvserve.kernels import amx_linear, cpu_library, pointwise
from kvserve.kernels import paged_decode as decode
from kvserve.kernels import paged_prefill as prefill
from kvserve.kernels.argmax import argmax_rows, argmax_rows_ref
from kvserve.kernels.store_kv import store_kv_cpu, store_kv_ref
from tests.helpers import needs_amx
from tests.test_kernels import SCALE, assert_close, layer_view, nan_allocations  # noqa: F401 (an autouse fixture)

DTYPES = [torch.float32, torch.bfloat16]


def test_the_library_builds_here() -> None:
    # CI machines have g++: the compiled path must be what the engine runs there, not the fallback
    assert cpu_library.available()
    pages = torch.zeros(2, 16, 64)
    assert create_backend("auto", pages, pages, SCALE).name == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lens", "group", "dim"), [
    pytest.param([[1, 1], [1, 1]], 1, 64, id="length-1"),
    pytest.param([[17, 33], [5, 48], [16, 1]], 3, 64, id="ragged-heads-gqa3"),
    pytest.param([[31, 64, 2]], 4, 128, id="gqa4-head-dim-128"),
    pytest.param([[1, 2], [300, 257], [40, 3]], 4, 64, id="very-different-lengths"),
    pytest.param([[9, 40], [23, 7]], 2, 80, id="head-dim-80"),  # not a multiple of the 16 summing lanes
    pytest.param([[45, 16]], 8, 128, id="gqa8-head-dim-128"),  # bfloat16 logits on AMX: a wide B tile
    # more query heads than one block of AVX2 accumulators (8 for the logits, 6 for the values)
    pytest.param([[13, 50], [8, 1]], 10, 80, id="gqa10-head-dim-80"),
])
def test_paged_decode_cpu_matches_reference(dtype: torch.dtype, lens: list[list[int]], group: int, dim: int) -> None:
    cache, tables, lens_view = layer_view(lens, dim, dtype)
    batch, kv_heads = lens_view.shape
    q = torch.randn(batch, kv_heads * group, dim).to(dtype)
    out, lse, (sums, maxes) = decode.paged_decode_ref(q, cache.k_pages, cache.v_pages, tables, lens_view, SCALE,
                                                      want_scores=True)
    # the strided layer views of the engine's [B, L, Hkv, P] tables, as the backend passes them
    assert batch == 1 or not tables.is_contiguous()
    got_out, got_lse, (got_sums, got_maxes) = decode.paged_decode_cpu(
        q, cache.k_poisoned, cache.v_poisoned, tables, lens_view, SCALE, want_scores=True)
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32
    assert_close(got_out, out, dtype)
    assert_close(got_lse, lse, dtype)
    assert_close(got_sums, sums, dtype)
    assert_close(got_maxes, maxes, dtype)
    assert decode.paged_decode_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens_view, SCALE)[2] is None


def test_paged_decode_cpu_reads_queries_through_their_row_stride() -> None:
    # the model hands over q as a slice of the fused qkv projection
    cache, tables, lens = layer_view([[20, 3], [50, 64]], 64, torch.float32)
    qkv = torch.randn(2, 6 + 2 * 2, 64)
    q = qkv[:, :6]
    out, lse, _ = decode.paged_decode_ref(q, cache.k_pages, cache.v_pages, tables, lens, SCALE)
    got_out, got_lse, _ = decode.paged_decode_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens, SCALE)
    assert_close(got_out, out)
    assert_close(got_lse, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_cpu_takes_pages_of_32_slots(dtype: torch.dtype) -> None:
    # not the AMX tile's 16 rows: the logits of a page run 16 keys at a time, the last block masked
    block, dim, group = 32, 64, 3
    lens = torch.tensor([[70, 5], [32, 33]], dtype=torch.int32)
    pages_per_head = 3
    k_pages, v_pages = (torch.randn(20, block, dim).to(dtype) for _ in range(2))
    tables = torch.randperm(20)[: lens.numel() * pages_per_head].view(2, 2, pages_per_head).to(torch.int32)
    q = torch.randn(2, 2 * group, dim).to(dtype)
    out, lse, (sums, _) = decode.paged_decode_ref(q, k_pages, v_pages, tables, lens, SCALE, want_scores=True)
    got_out, got_lse, (got_sums, _) = decode.paged_decode_cpu(q, k_pages, v_pages, tables, lens, SCALE,
                                                              want_scores=True)
    assert_close(got_out, out, dtype)
    assert_close(got_lse, lse, dtype)
    assert_close(got_sums, sums, dtype)


def prefill_inputs(chunks: list[int], lens: list[list[int]], group: int, dim: int, dtype: torch.dtype
                   ) -> tuple:
    """A layer view holding `lens` [B][Hkv] (each chunk's own keys included) and the chunks' queries,
    a strided slice of a fused qkv projection as the model hands them over."""
    cache, tables, lens_view = layer_view(lens, dim, dtype)
    kv_heads = lens_view.shape[1]
    tokens = sum(chunks)
    qkv = torch.randn(tokens, (group + 2) * kv_heads * dim).to(dtype)
    q = qkv[:, :group * kv_heads * dim].view(tokens, group * kv_heads, dim)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(chunks).cumsum(0)])
    return cache, tables, lens_view, q, starts


@needs_amx
@pytest.mark.parametrize(("chunks", "lens", "group", "dim"), [
    pytest.param([1], [[1, 1]], 4, 64, id="single-token-prompt"),
    pytest.param([20], [[20, 20]], 1, 64, id="prompt-without-context"),
    pytest.param([2, 19, 7], [[40, 19], [19, 33], [7, 60]], 3, 64, id="context-ragged-heads-gqa3"),
    pytest.param([40, 3], [[120, 41, 40], [3, 50, 17]], 4, 128, id="gqa4-head-dim-128"),
    pytest.param([130], [[150, 135]], 1, 64, id="nine-query-tiles"),  # 8 of 16 queries and a tail of 2
    pytest.param([33, 16], [[70, 33], [16, 47]], 8, 128, id="gqa8-head-dim-128"),
])
def test_paged_prefill_cpu_matches_reference(chunks: list[int], lens: list[list[int]], group: int, dim: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache, tables, lens_view, q, starts = prefill_inputs(chunks, lens, group, dim, torch.bfloat16)
    out, _ = prefill.paged_prefill_ref(q, cache.k_pages, cache.v_pages, tables, lens_view, starts, SCALE)

    def no_fallback(*args: object) -> None:
        raise AssertionError("bfloat16 prefill without a window must run the AMX kernel")

    monkeypatch.setattr(prefill, "paged_prefill_ref", no_fallback)
    # slots no page list holds are NaN: a key read past a head's length shows
    got, window = prefill.paged_prefill_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens_view, starts, SCALE)
    assert window is None and got.dtype == torch.bfloat16
    assert_close(got, out, torch.bfloat16)


@needs_amx
def test_paged_prefill_cpu_query_does_not_depend_on_its_chunk_or_the_thread_count() -> None:
    # a query's lane, keys and summation order are its own: the same prompt prefilled in one chunk or
    # in two, on one thread or two, gives the same bits
    cache, tables, lens_view, q, _ = prefill_inputs([50], [[50, 50]], 3, 64, torch.bfloat16)
    whole, _ = prefill.paged_prefill_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens_view,
                                         torch.tensor([0, 50]), SCALE)
    tail, _ = prefill.paged_prefill_cpu(q[21:], cache.k_poisoned, cache.v_poisoned, tables, lens_view,
                                        torch.tensor([0, 29]), SCALE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread, _ = prefill.paged_prefill_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens_view,
                                                  torch.tensor([0, 50]), SCALE)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(tail, whole[21:])
    assert torch.equal(one_thread, whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_chunks_over_long_contexts_attend_as_decode_rows(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # questions after cached documents: chunks of 5 and 12 queries over heads of 64 to 200 slots
    cache, tables, lens_view, q, starts = prefill_inputs([5, 12], [[80, 90], [200, 64]], 3, 64, dtype)
    expected, _ = prefill.paged_prefill_ref(q, cache.k_pages, cache.v_pages, tables, lens_view, starts, SCALE)

    def no_fallback(*args: object) -> None:
        raise AssertionError("a short chunk over a long context must run a compiled kernel")

    monkeypatch.setattr(prefill, "paged_prefill_ref", no_fallback)
    got, window = prefill.paged_prefill_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens_view, starts, SCALE)
    assert window is None
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_cpu_observation_windows_and_float32_run_the_reference(dtype: torch.dtype) -> None:
    cache, tables, lens_view, q, starts = prefill_inputs([9, 30], [[9, 50], [64, 31]], 3, 64, dtype)
    for window in (8, 0):
        if dtype == torch.bfloat16 and not window:
            continue  # the kernel's case
        expected = prefill.paged_prefill_ref(q, cache.k_pages, cache.v_pages, tables, lens_view, starts, SCALE, window)
        got = prefill.paged_prefill_cpu(q, cache.k_pages, cache.v_pages, tables, lens_view, starts, SCALE, window)
        assert torch.equal(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None) == (window == 0)
        if window:
            assert torch.equal(got[1], expected[1])


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """One chunk's causal attention over its heads' slots in float64: q [n, Hq, D], keys and values
    [Hkv, S, D], lens [Hkv] (each head's chunk is its last n slots) -> [n, Hq, D]."""
    n, q_heads, dim = q.shape
    kv_heads, slots = keys.shape[:2]
    group = q_heads // kv_heads
    logits = torch.einsum("hgnd,hsd->hgns", q.double().transpose(0, 1).reshape(kv_heads, group, n, dim),
                          keys.double()) * SCALE
    visible = torch.arange(slots) < (lens[:, None, None, None] - n) + torch.arange(n)[:, None] + 1
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hgns,hsd->hgnd", probs, values.double()).reshape(q_heads, n, dim).transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_ref_is_attention_whatever_path_it_takes(dtype: torch.dtype) -> None:
    # a prompt in one chunk (causal), later chunks over a prefix every head holds alike, and a chunk over
    # ragged heads (masked), against float64 attention; bound: float32 rounding of sums over ~100 slots
    # (1e-5), or bfloat16's output rounding (2^-8) and probabilities (1e-2), relative to the largest output
    cache, tables, lens_view, q, starts = prefill_inputs([20, 40, 33, 9], [[20, 20], [104, 104], [97, 97],
                                                                          [50, 31]], 3, 64, dtype)
    got, _ = prefill.paged_prefill_ref(q, cache.k_pages, cache.v_pages, tables, lens_view, starts, SCALE)
    for b in range(len(starts) - 1):
        lens = lens_view[b].long()
        keys, values = (prefill.gather_pages(pages, tables[b:b + 1])[0, :, :int(lens.max())]
                        for pages in (cache.k_pages, cache.v_pages))
        expected = dense_attention(q[starts[b]:starts[b + 1]], keys, values, lens)
        bound = (1e-5 if dtype == torch.float32 else 1e-2) * float(expected.abs().max())
        assert float((got[starts[b]:starts[b + 1]].double() - expected).abs().max()) <= bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 576), (3, 17), (700, 100)])  # 700 x 100 runs on both threads
def test_rms_norm_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    wide = (torch.randn(rows, width + 5) * 3).to(dtype)
    x = wide[:, 2:width + 2]  # a strided row view
    weight = torch.randn(width).to(dtype)
    assert_close(pointwise.rms_norm(x, weight, 1e-5), pointwise.rms_norm_ref(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 1536), (5, 33), (300, 200)])
def test_silu_mul_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    gate_up = (torch.randn(rows, 2 * width) * 4).to(dtype)
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # far tails of silu
    assert_close(pointwise.silu_mul(gate_up), pointwise.silu_mul_ref(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
# 40: half of 20 angles, a tail past the 8- and 16-lane steps
@pytest.mark.parametrize(("rows", "heads", "dim"), [(1, 12, 64), (7, 5, 128), (200, 3, 32), (5, 3, 40)])
def test_rope_matches_reference(dtype: torch.dtype, rows: int, heads: int, dim: int) -> None:
    extra = 2 * dim  # trailing heads (the values) that must stay untouched
    x = torch.randn(rows, heads * dim + extra).to(dtype)
    positions = torch.randint(0, 4000, (rows,))
    angles = torch.outer(torch.arange(4096.0), torch.rand(dim // 2))[positions]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected, got = x.clone(), x.clone()
    pointwise.rope_ref_(expected, cos, sin, heads)
    pointwise.rope_(got, cos, sin, heads)
    assert_close(got, expected, dtype)
    assert torch.equal(got[:, heads * dim:], x[:, heads * dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "kv_heads", "dim"), [(1, 3, 64), (9, 2, 80), (700, 4, 16)])  # 700: both threads
def test_store_kv_cpu_matches_reference(dtype: torch.dtype, tokens: int, kv_heads: int, dim: int) -> None:
    # k and v as the model hands them over: strided slices of one fused qkv row per token
    qkv = torch.randn(tokens, (2 * kv_heads + 2 * kv_heads) * dim).to(dtype)
    k = qkv[:, 2 * kv_heads * dim:3 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, 3 * kv_heads * dim:].view(tokens, kv_heads, dim)
    pages = torch.randn(2, tokens * kv_heads // 16 + 8, 16, dim).to(dtype)
    slots = torch.randperm(pages.shape[1] * 16)[:tokens * kv_heads].view(tokens, kv_heads)
    expected, got = pages.clone(), pages.clone()
    store_kv_ref(k, v, expected[0], expected[1], slots)
    store_kv_cpu(k, v, got[0], got[1], slots)
    assert torch.equal(got, expected)
    assert not torch.equal(got, pages)


@pytest.mark.parametrize("vocab", [49152, 5, 16, 33])  # whole vector steps, a tail only, both
def test_argmax_rows_matches_torch_ties_nans_and_infinities(vocab: int) -> None:
    logits = torch.randn(12, vocab)
    logits[0, [1, vocab - 1]] = 1e9  # a tie: the first index wins
    logits[1, 0], logits[1, min(7, vocab - 1)] = 1e9, float("nan")  # NaN beats any number
    logits[2] = float("-inf")
    logits[3] = float("-inf")
    logits[3, vocab - 1] = -1e30
    logits[4, vocab - 1] = float("nan")
    logits[5] = 3.0
    expected = argmax_rows_ref(logits)
    assert torch.equal(argmax_rows(logits), expected)
    assert expected[0] == 1 and expected[5] == 0


def test_paged_decode_cpu_does_not_depend_on_the_thread_count() -> None:
    # one task per (sequence, KV head): how tasks are spread over threads cannot change a bit
    cache, tables, lens = layer_view([[40, 7], [100, 64], [3, 30]], 64, torch.float32)
    q = torch.randn(3, 6, 64)
    many = decode.paged_decode_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens, SCALE, want_scores=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = decode.paged_decode_cpu(q, cache.k_poisoned, cache.v_poisoned, tables, lens, SCALE, want_scores=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip([many[0], many[1], *many[2]], [one[0], one[1], *one[2]]):
        assert torch.equal(a, b)


@needs_amx
@pytest.mark.parametrize(("rows", "n", "k"), [
    pytest.param(1, 960, 576, id="one-row"),
    pytest.param(0, 40, 64, id="no-rows"),
    pytest.param(7, 33, 40, id="n-and-k-off-tile"),
    pytest.param(33, 100, 70, id="a-one-row-tail-block"),
    pytest.param(45, 64, 1536, id="deep"),
    pytest.param(40, 2048, 576, id="several-weight-chunks-per-thread"),
    pytest.param(300, 1100, 576, id="units-of-rows-and-weight-chunks-with-tails"),
])
@pytest.mark.parametrize("add", ["none", "bias", "residual"])
def test_amx_linear_matches_reference(rows: int, n: int, k: int, add: str) -> None:
    weight = torch.randn(n, k).bfloat16()
    wide = torch.randn(rows, k + 3).bfloat16()
    x = wide[:, 1:k + 1]  # a strided row view, as a slice of a fused projection would be
    addend = {"none": None, "bias": torch.randn(n).bfloat16(), "residual": torch.randn(rows, n).bfloat16()}[add]
    got = amx_linear.linear_bf16(x, amx_linear.pack(weight), n, k, addend)
    expected = amx_linear.linear_bf16_ref(x.float(), weight.float(), None if addend is None else addend.float())
    assert got.dtype == torch.bfloat16
    if rows:
        assert_close(got, expected, torch.bfloat16)


@needs_amx
@pytest.mark.parametrize("rows, width, k", [
    pytest.param(1, 48, 64, id="one-row"),
    pytest.param(37, 40, 33, id="width-and-k-off-tile"),
    pytest.param(40, 1536, 576, id="model-shape-several-chunks"),
    pytest.param(300, 1536, 576, id="model-shape-several-row-units"),
])
def test_amx_swiglu_epilogue_matches_the_unfused_path(rows: int, width: int, k: int) -> None:
    # the fused epilogue rounds as linear-then-silu_mul does, so the two agree to the bit; both are
    # close to torch's silu(x @ gate^T) * (x @ up^T)
    weight = torch.randn(2 * width, k).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    fused = amx_linear.linear_bf16(x, amx_linear.pack_gated(weight), width, k, gated=True)
    unfused = pointwise.silu_mul(amx_linear.linear_bf16(x, amx_linear.pack(weight), 2 * width, k))
    assert fused.shape == (rows, width)
    assert torch.equal(fused, unfused)
    assert_close(fused, pointwise.silu_mul_ref(amx_linear.linear_bf16_ref(x, weight)), torch.bfloat16)


@needs_amx
def test_amx_linear_rows_do_not_depend_on_the_batch_or_the_thread_count() -> None:
    # each output is one tile dot product over K in a fixed order: neither the other rows of the
    # batch (batch invariance of greedy decoding) nor the split over threads can change a bit
    weight = torch.randn(300, 200).bfloat16()
    packed = amx_linear.pack(weight)
    x = torch.randn(37, 200).bfloat16()
    batched = amx_linear.linear_bf16(x, packed, 300, 200)
    for row in (0, 16, 31, 36):
        assert torch.equal(amx_linear.linear_bf16(x[row:row + 1], packed, 300, 200)[0], batched[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(amx_linear.linear_bf16(x, packed, 300, 200), batched)
    finally:
        torch.set_num_threads(threads)
