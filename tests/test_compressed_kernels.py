"""The compressed page formats: quantizer round trips, record tables, and the decode kernels over
quantized (KIVI), thin-key (ThinK) and host (TailorKV) records against dense attention and, for
the Triton ones, against their torch references under the interpreter.

Pools are filled with NaN first, so a kernel reading a record no list holds shows."""

from __future__ import annotations

import pytest
import torch

from kvserve.cache.page_pool import PagePool
from kvserve.cache.record_table import RecordTable
from kvserve.kernels import cpu_library
from kvserve.kernels.paged_decode import merge_attention
from kvserve.kernels.quant_decode import attend_dense, quant_decode, quant_decode_cpu, quant_decode_ref
from kvserve.kernels.quant_layout import QuantLayout, pack, quantize, unpack
from kvserve.kernels.sparse_decode import sparse_decode_cpu, sparse_decode_ref
from kvserve.kernels.thin_decode import thin_decode, thin_decode_cpu, thin_decode_ref

SCALE = 0.2


def poisoned_pool(num_pages: int, block_size: int, head_dim: int) -> PagePool:
    pool = PagePool(num_pages, block_size, head_dim, torch.float32)
    pool.storage.fill_(float("nan"))
    return pool


def fill(table: RecordTable, counts: torch.Tensor, records: torch.Tensor) -> None:
    """Give every head of every row counts[b, h] records (rows acquired in order; one layer)."""
    rows = torch.arange(counts.shape[0])
    table.write(table.extend(rows, counts[:, None, :]), records)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_round_trip_within_half_a_step(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(50, 32, 24) * 3 + 1
    codes, step, low = quantize(x, bits, dim=1)
    assert int(codes.max()) < 2 ** bits
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    restored = codes.float() * step.float() + low.float()
    spread = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    # half a quantization step, plus the float16 rounding of the step and the minimum
    bound = spread / (2 ** bits - 1) / 2 + 2e-3 * (x.abs().amax(1, keepdim=True) + spread)
    assert bool(((restored - x).abs() <= bound).all())
    # and a full step is not within reach of a lower bit width's error: the bound is tight enough to fail
    if bits < 8:
        assert float((restored - x).abs().max()) > float((spread / (2 ** (bits + 2) - 1) / 2).min())


def test_layout_encode_decode_is_the_quantizer() -> None:
    torch.manual_seed(1)
    layout = QuantLayout(bits=4, group_size=16, head_dim=32)
    keys, values = torch.randn(3, 16, 32), torch.randn(3, 16, 32)
    tokens, groups = layout.encode(keys, values)
    assert tokens.shape == (48, layout.token_bytes) and groups.shape == (3, layout.group_bytes)
    k_hat, v_hat = layout.decode(tokens, groups.repeat_interleave(1, 0))
    codes, step, low = quantize(keys, 4, dim=1)
    assert torch.allclose(k_hat, (codes.float() * step.float() + low.float()).reshape(48, 32))
    codes, step, low = quantize(values.reshape(48, 2, 16), 4, dim=2)
    assert torch.allclose(v_hat, (codes.float() * step.float() + low.float()).reshape(48, 32))


def quantized_case(bits: int, group: int, dim: int, groups_per_head: torch.Tensor, seed: int, pages: int = 64):
    """Random K/V quantized into record lists; returns the tables' inputs and the dense de-quantized cache."""
    torch.manual_seed(seed)
    batch, kv_heads = groups_per_head.shape
    layout = QuantLayout(bits, group, dim)
    pool = poisoned_pool(pages, 8, dim)
    tokens = RecordTable(pool, layout.token_bytes, batch, 1, kv_heads, 1024)
    groups = RecordTable(pool, layout.group_bytes, batch, 1, kv_heads, 64)
    counts = groups_per_head * group
    keys, values = torch.randn(int(counts.sum()), dim) * 2, torch.randn(int(counts.sum()), dim)
    token_records, group_records = layout.encode(keys.view(-1, group, dim), values.view(-1, group, dim))
    fill(tokens, counts, token_records)
    fill(groups, groups_per_head, group_records)
    k_hat, v_hat = layout.decode(token_records, group_records)
    slots = int(counts.max())
    dense_k, dense_v = torch.zeros(batch, kv_heads, slots, dim), torch.zeros(batch, kv_heads, slots, dim)
    start = 0
    for b in range(batch):
        for h in range(kv_heads):
            n = int(counts[b, h])
            dense_k[b, h, :n], dense_v[b, h, :n] = k_hat[start:start + n], v_hat[start:start + n]
            start += n
    return layout, tokens, groups, counts.to(torch.int32), dense_k, dense_v


@pytest.mark.parametrize("bits,group,dim,q_heads", [(2, 16, 32, 6), (4, 32, 16, 4), (8, 16, 64, 3), (1, 16, 32, 2)])
def test_quant_decode_ref_and_triton_match_dense_attention(bits: int, group: int, dim: int, q_heads: int) -> None:
    groups_per_head = torch.tensor([[2, 0], [1, 3], [5, 1]])[:, : 2 if q_heads % 2 == 0 else 1]
    layout, tokens, groups, lens, dense_k, dense_v = quantized_case(bits, group, dim, groups_per_head, bits)
    q = torch.randn(groups_per_head.shape[0], q_heads, dim)
    expected_out, expected_lse = attend_dense(q, dense_k, dense_v, lens, SCALE)
    args = (q, tokens.view, tokens.tables[:, 0], groups.view, groups.tables[:, 0], lens, layout, SCALE)
    for out, lse in (quant_decode_ref(*args), quant_decode_cpu(*args), quant_decode(*args)):
        assert not torch.isnan(out).any()
        assert torch.allclose(out, expected_out, atol=1e-4)
        assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
        assert torch.allclose(lse[torch.isfinite(lse)], expected_lse[torch.isfinite(expected_lse)], atol=1e-4)
    # an empty head attends nothing
    empty = lens == 0
    if bool(empty.any()):
        group_of = q_heads // lens.shape[1]
        assert bool(torch.isinf(quant_decode_ref(*args)[1]).view(-1, lens.shape[1], group_of)[empty].all())


def thin_case(dim: int, keep: int, counts: torch.Tensor, seed: int, dtype: torch.dtype = torch.float32,
              pages: int = 64):
    torch.manual_seed(seed)
    batch, kv_heads = counts.shape
    pool = poisoned_pool(pages, 8, dim)
    key_table = RecordTable(pool, keep * dtype.itemsize, batch, 1, kv_heads, 1024)
    value_table = RecordTable(pool, dim * dtype.itemsize, batch, 1, kv_heads, 1024)
    channels = torch.stack([torch.randperm(dim)[:keep].sort().values for _ in range(batch * kv_heads)])
    channels = channels.view(batch, kv_heads, keep)
    slots = max(1, int(counts.max()))
    keys, values = (torch.randn(batch, kv_heads, slots, dim).to(dtype) for _ in range(2))
    held = torch.arange(slots) < counts[..., None]
    thin = keys.gather(-1, channels[:, :, None, :].expand(-1, -1, slots, -1))
    fill(key_table, counts, thin[held].contiguous().view(torch.uint8))
    fill(value_table, counts, values[held].contiguous().view(torch.uint8))
    return channels, key_table, value_table, keys, values


@pytest.mark.parametrize("dim,keep,q_heads,counts", [
    (32, 16, 6, [[5, 0, 17], [1, 40, 3]]), (16, 7, 4, [[33, 2], [0, 1]]), (64, 39, 9, [[20, 1, 0]])])
def test_thin_decode_equals_attention_with_pruned_channels_near_zero(dim: int, keep: int, q_heads: int,
                                                                     counts: list[list[int]]) -> None:
    counts = torch.tensor(counts)
    kv_heads = counts.shape[1]
    channels, key_table, value_table, keys, values = thin_case(dim, keep, counts, keep)
    pruned = torch.ones(counts.shape[0], kv_heads, dim, dtype=torch.bool).scatter_(-1, channels, False)
    zeroed = keys.masked_fill(pruned[:, :, None, :], 1e-5)
    q = torch.randn(counts.shape[0], q_heads, dim)
    lens = counts.to(torch.int32)
    expected_out, expected_lse = attend_dense(q, zeroed, values, lens, SCALE)
    args = (q, channels, key_table.view, key_table.tables[:, 0], value_table.view, value_table.tables[:, 0], lens,
            SCALE)
    for out, lse in (thin_decode_ref(*args), thin_decode_cpu(*args), thin_decode(*args)):
        assert not torch.isnan(out).any()
        assert torch.allclose(out, expected_out, atol=1e-4)
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], expected_lse[finite], atol=1e-4)


def bf16_bound(out: torch.Tensor) -> float:
    """A bfloat16 output's rounding: half a unit in the last place of its largest element (2^-9
    relative), twice over for the products' float32 order."""
    return float(out.abs().max()) * 2**-8


@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_tier_kernels_match_their_references_at_model_head_sizes(dim: int, dtype: torch.dtype) -> None:
    """The compiled KIVI and ThinK decode kernels against the torch references, for every bit width, over
    NaN-poisoned pools, with heads that hold nothing, one group, and several half pages of records."""
    if not cpu_library.available():
        pytest.fail("the compiled CPU kernels did not build: no C++ compiler on this machine")
    groups_per_head = torch.tensor([[0, 1, 9], [4, 0, 2]])
    q = torch.randn(2, 9, dim).to(dtype)
    group = 32 if dim % 32 == 0 else 16  # a value scale's channels must tile the head
    for bits in (1, 2, 4, 8):
        layout, tokens, groups, lens, _, _ = quantized_case(bits, group, dim, groups_per_head, bits, pages=200)
        args = (q, tokens.view, tokens.tables[:, 0], groups.view, groups.tables[:, 0], lens, layout, SCALE)
        (out, lse), (expected_out, expected_lse) = quant_decode_cpu(*args), quant_decode_ref(*args)
        assert not torch.isnan(out).any()
        # float32: the reference's products in another order (~1e-6 of values of ~1); bfloat16: its rounding
        bound = 1e-5 if dtype == torch.float32 else bf16_bound(expected_out)
        assert (out.float() - expected_out.float()).abs().max() <= bound, bits
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], expected_lse[finite], atol=1e-5)
    counts = torch.tensor([[0, 1, 75], [33, 0, 130]])  # odd lengths, several half pages of 16-64 records
    for keep in (dim // 2, dim - 3):
        channels, key_table, value_table, _, _ = thin_case(dim, keep, counts, keep, dtype, pages=200)
        args = (q, channels, key_table.view, key_table.tables[:, 0], value_table.view, value_table.tables[:, 0],
                counts.to(torch.int32), SCALE)
        (out, lse), (expected_out, expected_lse) = thin_decode_cpu(*args), thin_decode_ref(*args)
        assert not torch.isnan(out).any()
        bound = 1e-5 if dtype == torch.float32 else bf16_bound(expected_out)
        assert (out.float() - expected_out.float()).abs().max() <= bound, keep
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], expected_lse[finite], atol=1e-4)


def test_sparse_decode_attends_only_the_selected_tokens() -> None:
    dim, counts = 16, torch.tensor([[30, 9]])
    _, key_table, value_table, keys, values = thin_case(dim, dim, counts, 3)
    q = torch.randn(1, 4, dim)
    lens = counts.to(torch.int32)
    key_max = keys.abs().amax(2)
    args = (q, key_max, key_table.view, key_table.tables[:, 0], value_table.view, value_table.tables[:, 0], lens)
    # selecting at least every token and scoring on every channel is exact attention
    out, lse = sparse_decode_ref(*args, torch.tensor([64]), torch.tensor([dim]), SCALE)
    expected_out, expected_lse = attend_dense(q, keys, values, lens, SCALE)
    assert torch.allclose(out, expected_out, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)
    # selecting 4 on all channels is attention over the 4 best group-mean scores
    out, lse = sparse_decode_ref(*args, torch.tensor([4]), torch.tensor([dim]), SCALE)
    q_mean = q.view(1, 2, 2, dim).mean(2)
    approx = (keys @ q_mean[..., None])[..., 0].masked_fill(torch.arange(30) >= lens[..., None], float("-inf"))
    best = approx.topk(4, -1).indices[..., None].expand(-1, -1, -1, dim)
    expected_out, expected_lse = attend_dense(q, keys.gather(2, best), values.gather(2, best),
                                              torch.full_like(lens, 4), SCALE)
    assert torch.allclose(out, expected_out, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)


@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_sparse_decode_matches_its_reference(dim: int, dtype: torch.dtype) -> None:
    """TailorKV's host-tier read by the compiled kernel against the torch reference: heads that hold
    nothing, one token, several half pages of records; no token, one, a few on a quarter of the channels,
    more than a head holds on all of them. The scores are continuous, so both rank the same tokens first."""
    if not cpu_library.available():
        pytest.fail("the compiled CPU kernels did not build: no C++ compiler on this machine")
    counts = torch.tensor([[0, 1, 75], [33, 0, 130]])
    _, key_table, value_table, keys, values = thin_case(dim, dim, counts, 7, dtype, pages=200)
    q = torch.randn(2, 9, dim).to(dtype)
    key_max = keys.float().abs().amax(2)
    view = (key_table.view, key_table.tables[:, 0], value_table.view, value_table.tables[:, 0])
    for select, scored in ((1, 8), (4, dim // 4), (40, dim), (1000, dim // 2)):  # 1: the second row attends none
        args = (q, key_max, *view, counts.to(torch.int32), torch.tensor([select, select - 1]),
                torch.tensor([scored, scored]), SCALE)
        (out, lse), (expected_out, expected_lse) = sparse_decode_cpu(*args), sparse_decode_ref(*args)
        assert out.dtype == dtype and not torch.isnan(out).any()
        bound = 1e-5 if dtype == torch.float32 else bf16_bound(expected_out)
        assert (out.float() - expected_out.float()).abs().max() <= bound, (select, scored)
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], expected_lse[finite], atol=1e-4)


def test_merge_attention_is_attention_over_the_union() -> None:
    torch.manual_seed(5)
    q, keys, values = torch.randn(2, 4, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    full = torch.tensor([[20, 20], [20, 20]], dtype=torch.int32)
    expected_out, expected_lse = attend_dense(q, keys, values, full, SCALE)
    a_out, a_lse = attend_dense(q, keys[:, :, :12], values[:, :, :12], full - 8, SCALE)
    b_out, b_lse = attend_dense(q, keys[:, :, 12:], values[:, :, 12:], full - 12, SCALE)
    out, lse = merge_attention(a_out, a_lse, b_out, b_lse)
    assert torch.allclose(out, expected_out, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)
    empty_out, empty_lse = attend_dense(q, keys[:, :, :1], values[:, :, :1], full * 0, SCALE)
    out, lse = merge_attention(a_out, a_lse, empty_out, empty_lse)
    assert torch.allclose(out, a_out) and torch.allclose(lse, a_lse)


def test_record_table_frees_pages_per_head_and_counts_them() -> None:
    pool = PagePool(20, 4, 8, torch.float32)  # 128-byte half pages
    table = RecordTable(pool, 48, 2, 2, 2, 100)  # 2 records per half, 4 per page
    assert table.per_page == 4
    rows = torch.tensor([0, 1])
    table.extend(rows, torch.tensor([[[5, 0], [1, 4]], [[0, 0], [9, 2]]]))
    assert table.pages_held(rows).tolist() == [2 + 1 + 1, 3 + 1]
    assert pool.pages_free == pool.capacity - 8
    table.truncate_row(0)
    table.truncate_row(1)
    assert pool.pages_free == pool.capacity
