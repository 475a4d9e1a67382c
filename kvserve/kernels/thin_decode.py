"""ThinK thin-key decode attention: keys that keep only some channels, values at full width.

Each (sequence, layer, KV head) keeps `n_keep` of its key channels, listed in `channels`; a thin
token is a key record of those channels and a value record of all D. A query attends with the
same channels of itself, scaled by 1/sqrt(D) of the full width (the pruned channels count as 0).

Shapes (B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim, K = n_keep):
    q               [B, Hq, D]
    channels        [B, Hkv, K] int64, ascending
    key_view        [2N, per_half, K * itemsize] uint8 (PagePool.records), value_view [.., D * itemsize]
    key_tables      [B, Hkv, Pk] int32, value_tables [B, Hkv, Pv] int32
    lens            [B, Hkv] int32, thin tokens per head (may be 0)
returns out [B, Hq, D] (zero where a head holds none) and lse [B, Hq] float32 (-inf there), to be
merged with the attention over the full-width tokens (`merge_attention`).

`thin_decode_ref` is the torch reference, `thin_decode_cpu` the compiled CPU kernel
(kernels/csrc/thin_decode.cpp) and `thin_decode` the Triton kernel.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from kvserve.kernels import cpu_library
from kvserve.kernels.quant_decode import attend_dense
from kvserve.kernels.records import list_addresses, read_records
from kvserve.kernels.tile_attention import LOG2E, record_offset, softmax_tile, store_partial


def thin_decode_ref(q: torch.Tensor, channels: torch.Tensor, key_view: torch.Tensor, key_tables: torch.Tensor,
                    value_view: torch.Tensor, value_tables: torch.Tensor, lens: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, dim = q.shape
    kv_heads, keep = channels.shape[1], channels.shape[2]
    num_pages = key_view.shape[0] // 2
    slots = max(1, int(lens.max()))
    keys = read_records(key_view, list_addresses(key_tables, slots, key_view.shape[1], num_pages)).view(q.dtype)
    values = read_records(value_view, list_addresses(value_tables, slots, value_view.shape[1], num_pages))
    # the query's kept channels, per KV head, for all the heads of its group
    group = q_heads // kv_heads
    q_thin = q.view(batch, kv_heads, group, dim).gather(-1, channels[:, :, None, :].expand(-1, -1, group, keep))
    return attend_dense(q_thin.reshape(batch, q_heads, keep), keys, values.view(q.dtype), lens, scale)


def thin_decode_cpu(q: torch.Tensor, channels: torch.Tensor, key_view: torch.Tensor, key_tables: torch.Tensor,
                    value_view: torch.Tensor, value_tables: torch.Tensor, lens: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`thin_decode_ref`'s contract by the compiled kernel; the reference where the kernels cannot take
    q's dtype or find no compiler."""
    code = cpu_library.dtype_code(q)
    if code is None or not key_view.is_cpu:
        return thin_decode_ref(q, channels, key_view, key_tables, value_view, value_tables, lens, scale)
    batch, q_heads, dim = q.shape
    q, lens, out, lse = cpu_library.decode_io(q, lens)
    channels = channels.to(torch.int64)
    channels = channels if channels.stride(2) == 1 else channels.contiguous()
    keys, key_tables = cpu_library.record_tables(key_view, key_tables)
    values, value_tables = cpu_library.record_tables(value_view, value_tables)
    cpu_library.library().kv_thin_decode(
        code, q.data_ptr(), q.stride(0), channels.data_ptr(), channels.stride(0), channels.stride(1),
        channels.shape[2], ctypes.byref(keys), ctypes.byref(values), lens.data_ptr(), lens.stride(0), lens.stride(1),
        batch, q_heads, channels.shape[1], dim, scale, out.data_ptr(), lse.data_ptr(), cpu_library.threads())
    return out, lse


@triton.jit
def _thin_decode_kernel(
    q_ptr, pool_ptr, channels_ptr, key_tables_ptr, value_tables_ptr, lens_ptr, out_ptr, lse_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ch, stride_ck,
    stride_ktb, stride_kth, stride_ktp,
    stride_vtb, stride_vth, stride_vtp,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    stride_lseb, stride_lseh,
    group, keep, num_pages, half_bytes, key_per_half, value_per_half, itemsize,
    DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (b, kv_head): the group's query heads, gathered to the kept channels, over the
    head's thin tokens, BLOCK_N at a time."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    group_idx = tl.arange(0, BLOCK_G)
    head_mask = group_idx < group
    heads = kv_head * group + group_idx
    kept = tl.arange(0, BLOCK_K)
    kept_mask = kept < keep
    chans = tl.load(channels_ptr + b * stride_cb + kv_head * stride_ch + kept * stride_ck, mask=kept_mask, other=0)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + chans[None, :] * stride_qd,
                mask=head_mask[:, None] & kept_mask[None, :], other=0.0).to(tl.float32)
    dims = tl.arange(0, DIM)
    key_table = key_tables_ptr + b * stride_ktb + kv_head * stride_kth
    value_table = value_tables_ptr + b * stride_vtb + kv_head * stride_vth

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DIM], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        index = start + tl.arange(0, BLOCK_N)
        valid = index < seq_len
        safe = tl.where(valid, index, 0)
        key_off = record_offset(key_table, safe, key_per_half, half_bytes, keep * itemsize, num_pages, stride_ktp)
        keys = tl.load(pool_ptr + key_off[:, None] // itemsize + kept[None, :],
                       mask=valid[:, None] & kept_mask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        value_off = record_offset(value_table, safe, value_per_half, half_bytes, DIM * itemsize, num_pages,
                                   stride_vtp)
        values = tl.load(pool_ptr + value_off[:, None] // itemsize + dims[None, :], mask=valid[:, None],
                         other=0.0).to(tl.float32)
        m_i, l_i, acc = softmax_tile(s, values, m_i, l_i, acc)

    store_partial(out_ptr, lse_ptr, b, heads, head_mask, dims, m_i, l_i, acc,
                  stride_ob, stride_oh, stride_od, stride_lseb, stride_lseh)


def thin_decode(q: torch.Tensor, channels: torch.Tensor, key_view: torch.Tensor, key_tables: torch.Tensor,
                value_view: torch.Tensor, value_tables: torch.Tensor, lens: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `thin_decode_ref`: same shapes and contract; both views from one pool of q's dtype."""
    batch, q_heads, dim = q.shape
    kv_heads, keep = channels.shape[1], channels.shape[2]
    if dim & (dim - 1):
        raise ValueError("the Triton kernel needs a power-of-two head_dim")
    pool = torch.as_strided(key_view, (key_view.shape[0] * key_view.stride(0),), (1,)).view(q.dtype)
    out = torch.empty(batch, q_heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=q.device)
    _thin_decode_kernel[(batch, kv_heads)](
        q, pool, channels, key_tables, value_tables, lens, out, lse,
        scale * LOG2E.value,
        *q.stride(), *channels.stride(), *key_tables.stride(), *value_tables.stride(), *lens.stride(),
        *out.stride(), *lse.stride(),
        q_heads // kv_heads, keep, key_view.shape[0] // 2, key_view.stride(0), key_view.shape[1],
        value_view.shape[1], q.element_size(),
        DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(q_heads // kv_heads)),
        BLOCK_K=max(16, triton.next_power_of_2(keep)), BLOCK_N=16,
    )
    return out, lse
