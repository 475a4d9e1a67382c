"""Decode attention over KIVI-style quantized records (byte layout: kernels/quant_layout.py).

Shapes (B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim):
    q                   [B, Hq, D]
    token_view          [2N, per_half, token_bytes] uint8   (PagePool.records), group_view likewise
    token_tables        [B, Hkv, Pt] int32, group_tables [B, Hkv, Pg] int32
    lens                [B, Hkv] int32, quantized tokens per head (a multiple of group_size; may be 0)
returns out [B, Hq, D] (zero where a head holds none) and lse [B, Hq] float32 (-inf there), to be
merged with the attention over the full-precision residual (`merge_attention`).

`quant_decode_ref` is the torch reference, `quant_decode_cpu` the compiled CPU kernel
(kernels/csrc/quant_decode.cpp) and `quant_decode` the Triton kernel; both kernels read the codes
where they lie and de-quantize in registers.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from kvserve.kernels import cpu_library
from kvserve.kernels.quant_layout import QuantLayout
from kvserve.kernels.records import list_addresses, read_records
from kvserve.kernels.tile_attention import LOG2E, record_offset, softmax_tile, store_partial


def attend_dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] over keys, values [B, Hkv, S, D] (slots < lens [B, Hkv] valid) -> out [B, Hq, D],
    lse [B, Hq] float32; a head with no slots gives out 0 and lse -inf."""
    batch, q_heads, dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    logits = torch.matmul((q.float() * scale).view(batch, kv_heads, group, dim), keys.float().transpose(-1, -2))
    outside = torch.arange(slots, device=q.device) >= lens[..., None]
    logits.masked_fill_(outside[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = (logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp()
    # slots past a head's length may hold another format's bytes: never let them reach the sum
    values = values.float().masked_fill(outside[..., None], 0.0)
    out = torch.matmul(probs, values).view(batch, q_heads, values.shape[-1])
    return out.to(q.dtype), lse.view(batch, q_heads)


def quant_decode_ref(q: torch.Tensor, token_view: torch.Tensor, token_tables: torch.Tensor,
                     group_view: torch.Tensor, group_tables: torch.Tensor, lens: torch.Tensor,
                     layout: QuantLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_pages = token_view.shape[0] // 2
    slots = max(layout.group_size, -(-int(lens.max()) // layout.group_size) * layout.group_size)
    tokens = read_records(token_view, list_addresses(token_tables, slots, token_view.shape[1], num_pages))
    groups = read_records(group_view, list_addresses(group_tables, slots // layout.group_size,
                                                     group_view.shape[1], num_pages))
    keys, values = layout.decode(tokens, groups)
    return attend_dense(q, keys, values, lens, scale)


def quant_decode_cpu(q: torch.Tensor, token_view: torch.Tensor, token_tables: torch.Tensor,
                     group_view: torch.Tensor, group_tables: torch.Tensor, lens: torch.Tensor,
                     layout: QuantLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_decode_ref`'s contract by the compiled kernel; the reference where the kernels cannot
    take the case (no compiler, q neither float32 nor bfloat16, a head size not a multiple of 8)."""
    code = cpu_library.dtype_code(q)
    if code is None or layout.head_dim % 8 or not token_view.is_cpu:
        return quant_decode_ref(q, token_view, token_tables, group_view, group_tables, lens, layout, scale)
    batch, q_heads, dim = q.shape
    q, lens, out, lse = cpu_library.decode_io(q, lens)
    tokens, token_tables = cpu_library.record_tables(token_view, token_tables)
    groups, group_tables = cpu_library.record_tables(group_view, group_tables)
    cpu_library.library().kv_quant_decode(
        code, q.data_ptr(), q.stride(0), ctypes.byref(tokens), ctypes.byref(groups), lens.data_ptr(), lens.stride(0),
        lens.stride(1), batch, q_heads, token_tables.shape[1], dim, layout.bits, layout.group_size, scale,
        out.data_ptr(), lse.data_ptr(), cpu_library.threads())
    return out, lse


@triton.jit
def _quant_decode_kernel(
    q_ptr, pool_u8_ptr, pool_f16_ptr, token_tables_ptr, group_tables_ptr, lens_ptr, out_ptr, lse_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_ttb, stride_tth, stride_ttp,
    stride_gtb, stride_gth, stride_gtp,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    stride_lseb, stride_lseh,
    group, num_pages, half_bytes, token_per_half, group_per_half, token_bytes,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CHANNEL_GROUP: tl.constexpr, DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Program (b, kv_head): the group's query heads over the head's quantized tokens, one key
    group (GROUP_SIZE tokens) per iteration, de-quantized in registers."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    group_idx = tl.arange(0, BLOCK_G)
    head_mask = group_idx < group
    heads = kv_head * group + group_idx
    dims = tl.arange(0, DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_mask[:, None], other=0.0).to(tl.float32)
    token_table = token_tables_ptr + b * stride_ttb + kv_head * stride_tth
    group_table = group_tables_ptr + b * stride_gtb + kv_head * stride_gth

    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_BYTES: tl.constexpr = DIM * BITS // 8
    VALUE_GROUPS: tl.constexpr = DIM // CHANNEL_GROUP
    byte_of_channel = dims // PER_BYTE
    shift = ((dims % PER_BYTE) * BITS).to(tl.uint8)
    code_mask = (1 << BITS) - 1
    tokens = tl.arange(0, GROUP_SIZE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DIM], tl.float32)
    for start in range(0, seq_len, GROUP_SIZE):
        group_off = record_offset(group_table, start // GROUP_SIZE, group_per_half, half_bytes, 4 * DIM,
                                   num_pages, stride_gtp)
        k_step = tl.load(pool_f16_ptr + group_off // 2 + dims).to(tl.float32)
        k_low = tl.load(pool_f16_ptr + group_off // 2 + DIM + dims).to(tl.float32)
        token_off = record_offset(token_table, start + tokens, token_per_half, half_bytes, token_bytes,
                                   num_pages, stride_ttp)
        k_bytes = tl.load(pool_u8_ptr + token_off[:, None] + byte_of_channel[None, :])
        keys = ((k_bytes >> shift[None, :]) & code_mask).to(tl.float32) * k_step[None, :] + k_low[None, :]
        v_bytes = tl.load(pool_u8_ptr + token_off[:, None] + CODE_BYTES + byte_of_channel[None, :])
        v_group = (dims // CHANNEL_GROUP)[None, :]
        scales = pool_f16_ptr + (token_off[:, None] + 2 * CODE_BYTES) // 2
        v_step = tl.load(scales + v_group).to(tl.float32)
        v_low = tl.load(scales + VALUE_GROUPS + v_group).to(tl.float32)
        values = ((v_bytes >> shift[None, :]) & code_mask).to(tl.float32) * v_step + v_low

        s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale_log2
        m_i, l_i, acc = softmax_tile(s, values, m_i, l_i, acc)

    store_partial(out_ptr, lse_ptr, b, heads, head_mask, dims, m_i, l_i, acc,
                  stride_ob, stride_oh, stride_od, stride_lseb, stride_lseh)


def quant_decode(q: torch.Tensor, token_view: torch.Tensor, token_tables: torch.Tensor,
                 group_view: torch.Tensor, group_tables: torch.Tensor, lens: torch.Tensor,
                 layout: QuantLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quant_decode_ref`: same shapes and contract. token_view and group_view must be
    `PagePool.records` views of one pool (the kernel addresses the pool's bytes directly)."""
    batch, q_heads, dim = q.shape
    kv_heads = token_tables.shape[1]
    group = q_heads // kv_heads
    if dim & (dim - 1) or layout.group_size & (layout.group_size - 1) or layout.group_size < 16:
        raise ValueError("the Triton kernel needs a power-of-two head_dim and group_size >= 16")
    pool_u8 = torch.as_strided(token_view, (token_view.shape[0] * token_view.stride(0),), (1,))
    out = torch.empty(batch, q_heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=q.device)
    _quant_decode_kernel[(batch, kv_heads)](
        q, pool_u8, pool_u8.view(torch.float16), token_tables, group_tables, lens, out, lse,
        scale * LOG2E.value,
        *q.stride(), *token_tables.stride(), *group_tables.stride(), *lens.stride(), *out.stride(),
        *lse.stride(),
        group, token_view.shape[0] // 2, token_view.stride(0), token_view.shape[1], group_view.shape[1],
        layout.token_bytes,
        BITS=layout.bits, GROUP_SIZE=layout.group_size, CHANNEL_GROUP=layout.channel_group, DIM=dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
    )
    return out, lse
