"""Paged prefill attention: a varlen batch of query chunks, causal inside each chunk, over each
sequence's cached pages (the chunk's own K/V already stored in them).

Shapes (T flat query tokens, B sequences, other letters as in paged_decode):
    q:                [T, Hq, D]                  tokens of sequence b are rows
                                                  query_start_loc[b] : query_start_loc[b + 1]
    k_pages, v_pages: [num_pages, block_size, D]
    block_tables:     [B, Hkv, P] int32
    seq_lens:         [B, Hkv] int32              tokens held per head, this chunk included
    query_start_loc:  [B + 1] int64
Query j (0-based) of sequence b, head group h, sees slots [0, seq_lens[b, h] - n_b + j + 1),
n_b = that sequence's chunk length: new tokens are appended at the end of every head's list.
returns
    out:              [T, Hq, D]
    window_scores:    with a window (an int for every sequence, or a [B] tensor of per-sequence windows,
                      0 for none): [B, Hkv, P * block_size] float32, the probability each slot
                      received, summed over the G query heads of its group and over the last
                      min(window, n_b) queries of the chunk (SnapKV's, ThinK's and H2O's prefill
                      observation). None otherwise.

`paged_prefill_ref` is the torch reference (the CPU path for float32 and observation windows),
`paged_prefill_cpu` runs bfloat16 through the compiled AMX kernel (kernels/csrc/paged_prefill.cpp),
`paged_prefill` is the Triton version.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvserve.kernels import amx_linear, cpu_library
from kvserve.kernels.paged_decode import dot_precision, gather_pages, paged_decode_cpu, partition_size_for

# chunks of at most this many queries, over contexts at least CONTEXT_PER_QUERY times as long, attend
# as decode rows: a question after a cached document reads the document's pages where they lie
# rather than gathering a copy of them per chunk
SHORT_CHUNK = 64
CONTEXT_PER_QUERY = 4


def per_sequence_windows(window: int | torch.Tensor, batch: int) -> torch.Tensor | None:
    """The window argument as a [B] int32 tensor, or None when no sequence observes anything."""
    if isinstance(window, torch.Tensor):
        return window.to(torch.int32)
    return torch.full((batch,), window, dtype=torch.int32) if window > 0 else None


# torch's CPU flash attention runs query and key lengths that are not multiples of 32 up to 3x slower
# in bfloat16 (226 tokens, causal: 1.41 ms, 224: 0.42 ms, 256: 0.51 ms); float32 gains a little too
SDPA_ALIGN = 32
# observed queries per tile of explicit probabilities: small enough that a tile's [Hkv, G, tile, slots]
# logits stay in cache between the softmax and the products that read them
OBSERVE_TILE = 64


def _zero_pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """[1, H, n, D] -> [1, H, length, D], zeros after the n given rows."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def paged_prefill_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      scale: float, window: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, kv_heads, pages = block_tables.shape
    q_heads = q.shape[1]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    windows = per_sequence_windows(window, batch)
    window_scores = None
    if windows is not None:
        window_scores = torch.zeros(batch, kv_heads, pages * k_pages.shape[1], dtype=torch.float32, device=q.device)
        windows = windows.tolist()
    starts = query_start_loc.tolist()
    # a step holds few prefill chunks: each gets its own attention call, not padded to the longest
    for b in range(batch):
        lo, hi = starts[b], starts[b + 1]
        n = hi - lo
        lens = seq_lens[b].long()
        longest = int(lens.max())
        keys = gather_pages(k_pages, block_tables[b:b + 1])[:, :, :longest]
        values = gather_pages(v_pages, block_tables[b:b + 1])[:, :, :longest]
        queries = q[lo:hi].transpose(0, 1)[None]  # [1, Hq, n, D]
        uniform = bool((lens == longest).all())
        whole_sequence = uniform and longest == n
        width = min(windows[b], n) if windows is not None else 0
        # attention runs on queries and keys zero-padded to SDPA_ALIGN; the padding is exact: no real
        # query sees a padded key, and the padded queries' rows are dropped
        padded_n, padded_slots = -(-n // SDPA_ALIGN) * SDPA_ALIGN, -(-longest // SDPA_ALIGN) * SDPA_ALIGN
        if not whole_sequence or width:
            # visible[h, j, s]: slot s is cached for head h and not in query j's future
            first_new = (lens - n)[:, None, None]
            visible = (torch.arange(padded_slots, device=q.device)
                       < first_new + torch.arange(padded_n, device=q.device)[:, None] + 1)
        if width:
            # the observed queries' probabilities, explicitly, OBSERVE_TILE queries at a time (a tile's
            # logits stay in cache, and each tile reads only the keys its queries can see); when they
            # are the whole chunk they give the attention output too, so the chunk is not attended twice
            q_win = (queries[0, :, n - width:] * scale).view(kv_heads, group, width, -1)
            first_new_max, first_new_min = longest - n, int(lens.min()) - n
            for t0 in range(0, width, OBSERVE_TILE):
                t1 = min(width, t0 + OBSERVE_TILE)
                rows = t1 - t0
                seen = min(longest, first_new_max + n - width + t1)  # slots the tile's last query sees
                # one [Hkv, G * rows, D] x [Hkv, D, seen] product per tile: a broadcast over the group
                # would copy the keys once per query head
                tile_q = q_win[:, :, t0:t1].reshape(kv_heads, group * rows, -1)
                logits = torch.matmul(tile_q, keys[0, :, :seen].transpose(-1, -2)).float()
                logits = logits.view(kv_heads, group, rows, seen)
                # every head's every query in the tile sees the slots before `band`: only the band
                # from there to `seen` needs the causal and per-head-length mask
                band = max(0, first_new_min + n - width + t0 + 1)
                if band < seen:
                    logits[..., band:].masked_fill_(
                        ~visible[:, None, n - width + t0:n - width + t1, band:seen], float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                window_scores[b, :, :seen] += probs.sum(dim=(1, 2))
                if width == n:
                    attn = torch.bmm(probs.view(kv_heads, group * rows, seen).to(values.dtype),
                                     values[0, :, :seen])
                    out[lo + t0:lo + t1] = attn.view(q_heads, rows, -1).transpose(0, 1)
        if width == n:
            continue
        queries = _zero_pad_tokens(queries, padded_n)
        keys, values = _zero_pad_tokens(keys, padded_slots), _zero_pad_tokens(values, padded_slots)
        if whole_sequence:
            # the whole sequence is this chunk: plain causal attention, which skips the upper triangle
            attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = visible[:1, None] if uniform else visible.repeat_interleave(group, dim=0)[None]
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                  enable_gqa=True)
        out[lo:hi] = attn[0, :, :n].transpose(0, 1)
    return out, window_scores


def paged_prefill_cpu(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                      window: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`paged_prefill_ref`'s contract on the CPU: bfloat16 attention without an observation window runs
    the compiled AMX kernel (kernels/csrc/paged_prefill.cpp) where the CPU has AMX, pages hold 16
    slots and head_dim is 64 or 128; short chunks over long contexts without a window run the compiled
    decode kernel, a row per query (a query sees its head's slots but those of the chunk's later
    queries, the last slots of its head); everything else runs the reference."""
    batch, kv_heads, _ = block_tables.shape
    tokens, q_heads, dim = q.shape
    observed = per_sequence_windows(window, batch) is not None
    eligible = (q.dtype == torch.bfloat16 and k_pages.dtype == torch.bfloat16 and k_pages.shape[1] == 16
                and dim in (64, 128) and not observed and amx_linear.available())
    if eligible:
        # the kernel reads each query's dims in 32-bit pairs
        if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2:
            q = q.contiguous()
        tables = block_tables.to(torch.int32)
        tables = tables if tables.stride(2) == 1 else tables.contiguous()
        lens = seq_lens.to(torch.int32)
        starts = query_start_loc.to(torch.int64).contiguous()
        out = torch.empty(tokens, q_heads, dim, dtype=torch.bfloat16)
        if cpu_library.library().kv_paged_prefill(
                q.data_ptr(), q.stride(0), q.stride(1), k_pages.data_ptr(), v_pages.data_ptr(), tables.data_ptr(),
                tables.stride(0), tables.stride(1), lens.data_ptr(), lens.stride(0),
                lens.stride(1), starts.data_ptr(), batch, kv_heads, q_heads // kv_heads, dim, scale, out.data_ptr(),
                cpu_library.threads()):
            return out, None
    counts = query_start_loc[1:] - query_start_loc[:-1]
    if (not observed and tokens and int(counts.max()) <= SHORT_CHUNK
            and int(seq_lens.min()) >= CONTEXT_PER_QUERY * int(counts.max())):
        chunk = torch.repeat_interleave(torch.arange(batch), counts.cpu())
        later = query_start_loc[1:].cpu()[chunk] - 1 - torch.arange(tokens)  # the chunk's queries after each
        out, _, _ = paged_decode_cpu(q, k_pages, v_pages, block_tables[chunk], seq_lens[chunk] - later[:, None], scale)
        return out, None
    return paged_prefill_ref(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale, window)


@triton.jit
def _prefill_kernel(
    q_ptr, k_pages_ptr, v_pages_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, lse_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_qd,
    stride_kp_page, stride_kp_slot, stride_kp_d,
    stride_vp_page, stride_vp_slot, stride_vp_d,
    stride_tb, stride_th, stride_tp,
    stride_lb, stride_lh,
    stride_ot, stride_oh, stride_od,
    stride_lset, stride_lseh,
    group, dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, kv_head, q_tile): queries [q_tile * BLOCK_Q, (q_tile + 1) * BLOCK_Q) of chunk b
    for the G query heads of the group, online softmax over the visible slots of that KV head.
    With STORE_LSE, also writes each row's log2-sum-exp2 to lse [T, Hq]."""
    # int64: row offsets into strided views of per-layer buffers can pass 2**31
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    q_first = tl.program_id(2) * BLOCK_Q
    chunk_start = tl.load(starts_ptr + b)
    chunk_len = (tl.load(starts_ptr + b + 1) - chunk_start).to(tl.int32)
    if q_first >= chunk_len:
        return
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    context = seq_len - chunk_len

    rows = tl.arange(0, BLOCK_M)
    query = q_first + rows // group
    heads = kv_head * group + rows % group
    row_mask = (rows < BLOCK_Q * group) & (query < chunk_len)
    tokens = chunk_start + query
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    # query j sees slots [0, context + j + 1): slot 0 is visible to every row, so no row is empty
    row_end = context + query + 1
    kv_end = context + tl.minimum(q_first + BLOCK_Q, chunk_len)
    table = tables_ptr + b * stride_tb + kv_head * stride_th

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(0, kv_end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        slot_mask = slots < kv_end
        # int64: page * stride overflows int32 in pools beyond 2**31 elements
        page = tl.load(table + (slots // BLOCK_SIZE) * stride_tp, mask=slot_mask, other=0).to(tl.int64)
        offset = slots % BLOCK_SIZE
        kv_mask = slot_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_pages_ptr + page[:, None] * stride_kp_page + offset[:, None] * stride_kp_slot
                    + dims[None, :] * stride_kp_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(slots[None, :] < row_end[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_pages_ptr + page[:, None] * stride_vp_page + offset[:, None] * stride_vp_slot
                    + dims[None, :] * stride_vp_d, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + tokens * stride_lset + heads * stride_lseh, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _window_scores_kernel(
    q_ptr, k_pages_ptr, tables_ptr, lens_ptr, starts_ptr, lse_ptr, scores_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_qd,
    stride_kp_page, stride_kp_slot, stride_kp_d,
    stride_tb, stride_th, stride_tp,
    stride_lb, stride_lh,
    stride_lset, stride_lseh,
    stride_sb, stride_sh, stride_ss,
    windows_ptr, group, dim, num_slots,
    BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, kv_head, part): for slots [part * PARTITION, (part + 1) * PARTITION), the
    probability summed over the last min(windows[b], n_b) queries of chunk b and the G heads of the
    group, recomputed from their log2-sum-exp2 (lse [T, Hq]); written to scores [B, Hkv, S]."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    chunk_start = tl.load(starts_ptr + b)
    chunk_len = (tl.load(starts_ptr + b + 1) - chunk_start).to(tl.int32)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    context = seq_len - chunk_len
    width = tl.minimum(tl.load(windows_ptr + b), chunk_len)
    num_rows = width * group
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, num_slots)
    held_end = tl.minimum(end, seq_len)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    table = tables_ptr + b * stride_tb + kv_head * stride_th
    scores = scores_ptr + b * stride_sb + kv_head * stride_sh

    for n in range(start, held_end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        slot_mask = slots < held_end
        page = tl.load(table + (slots // BLOCK_SIZE) * stride_tp, mask=slot_mask, other=0).to(tl.int64)
        k = tl.load(k_pages_ptr + page[:, None] * stride_kp_page + (slots % BLOCK_SIZE)[:, None] * stride_kp_slot
                    + dims[None, :] * stride_kp_d, mask=slot_mask[:, None] & dim_mask[None, :], other=0.0)
        total = tl.zeros([BLOCK_N], tl.float32)
        # rows are (window query, group head) pairs, BLOCK_M at a time
        for r in range(0, num_rows, BLOCK_M):
            rows = r + tl.arange(0, BLOCK_M)
            row_mask = rows < num_rows
            query = chunk_len - width + rows // group
            heads = kv_head * group + rows % group
            tokens = chunk_start + query
            q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
                        + dims[None, :] * stride_qd, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            lse2 = tl.load(lse_ptr + tokens * stride_lset + heads * stride_lseh, mask=row_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            visible = row_mask[:, None] & (slots[None, :] < (context + query + 1)[:, None])
            total += tl.sum(tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0), 0)
        tl.store(scores + slots * stride_ss, total, mask=slot_mask)
    # slots the head does not hold received no probability
    for n in range(tl.maximum(start, held_end), end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        tl.store(scores + slots * stride_ss, tl.zeros([BLOCK_N], tl.float32), mask=slots < end)


_LOG2E = math.log2(math.e)
# Rows of a program's query tile are (query, group head) pairs, so one K/V tile serves the group.
# 128 rows in 8 warps is FlashAttention's usual prefill tile; ptxas reports no spills at head_dim 128.
_BLOCK_M = 128
_NUM_WARPS = 8
_WINDOW_BLOCK_N = 32


def _prefill_block_n(dim: int) -> int:
    # at head_dim 128, 64-key tiles spill registers on sm_80
    return 64 if dim <= 64 else 32


def paged_prefill(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                  window: int | torch.Tensor = 0, *,
                  max_chunk_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton `paged_prefill_ref`: same shapes and return contract.

    One program per (sequence, KV head, tile of queries) runs an online softmax over that head's
    pages; its rows are the tile's queries times the G heads of the group, which share every K/V
    tile. With `window`, the attention kernel also keeps each row's log-sum-exp and a second kernel
    recomputes the window queries' probabilities slot tile by slot tile, summing them in registers.
    `max_chunk_len` (the longest chunk) sizes the grid; without it, it is read from
    query_start_loc, which waits for the device.
    """
    tokens, q_heads, dim = q.shape
    batch, kv_heads, max_pages = block_tables.shape
    group = q_heads // kv_heads
    block_size = k_pages.shape[1]
    if max_chunk_len is None:
        max_chunk_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_m = max(_BLOCK_M, triton.next_power_of_2(group))
    block_q = block_m // group
    block_d = triton.next_power_of_2(dim)
    precision = dot_precision(q.dtype)
    windows = per_sequence_windows(window, batch)
    observe = windows is not None
    out = torch.empty(tokens, q_heads, dim, dtype=v_pages.dtype, device=q.device)
    # log2-sum-exp2 of every row, kept only for the window scores
    lse = torch.empty(tokens if observe else 1, q_heads, dtype=torch.float32, device=q.device)
    _prefill_kernel[(batch, kv_heads, triton.cdiv(max_chunk_len, block_q))](
        q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, out, lse,
        scale * _LOG2E,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_tables.stride(), *seq_lens.stride(),
        *out.stride(), *lse.stride(),
        group, dim,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=_prefill_block_n(dim),
        BLOCK_D=block_d, STORE_LSE=observe, PRECISION=precision, num_warps=_NUM_WARPS,
    )
    if not observe:
        return out, None
    num_slots = max_pages * block_size
    scores = torch.empty(batch, kv_heads, num_slots, dtype=torch.float32, device=q.device)
    partition = partition_size_for(batch * kv_heads, num_slots, q.device)
    _window_scores_kernel[(batch, kv_heads, triton.cdiv(num_slots, partition))](
        q, k_pages, block_tables, seq_lens, query_start_loc, lse, scores,
        scale * _LOG2E,
        *q.stride(), *k_pages.stride(), *block_tables.stride(), *seq_lens.stride(), *lse.stride(),
        *scores.stride(),
        windows.to(q.device), group, dim, num_slots,
        BLOCK_SIZE=block_size, PARTITION=partition, BLOCK_M=block_m, BLOCK_N=_WINDOW_BLOCK_N,
        BLOCK_D=block_d, PRECISION=precision, num_warps=_NUM_WARPS,
    )
    return out, scores
