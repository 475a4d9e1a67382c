"""Paged decode attention: one query token per sequence over its per-head page lists.

Shapes (B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim, P pages per head):
    q:             [B, Hq, D]
    k_pages:       [num_pages, block_size, D]   (v_pages likewise)
    block_tables:  [B, Hkv, P] int32            page ids of each head's list, in slot order
    seq_lens:      [B, Hkv] int32               tokens held by each head (>= 1)
returns
    out:           [B, Hq, D]
    lse:           [B, Hq] float32              natural log-sum-exp of each query head's logits
    scores:        with `want_scores`, (sum, max) over the G query heads of each group of the
                   probability each slot received: two [B, Hkv, P * block_size] float32 tensors,
                   zero beyond a head's length. The eviction policies read these.
Query head h attends with KV head h // G.

`paged_decode_ref` is the torch reference. `paged_decode_cpu` runs the compiled CPU kernel
(kernels/csrc/paged_decode.cpp), which reads keys and values in place from the pages instead of
gathering them. `paged_decode` is the Triton version (flash decoding), and `attention_scores` the
Triton kernel behind its scores, which a caller may also run on its own to accumulate scores in place.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvserve.kernels import cpu_library


def gather_pages(pages: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_pages, bs, D] gathered through [B, H, P] tables -> [B, H, P * bs, D]."""
    b, h, p = block_tables.shape
    # index_select copies whole pages as rows: about 3x faster on a CPU than advanced indexing
    rows = torch.index_select(pages.view(pages.shape[0], -1), 0, block_tables.reshape(-1))
    return rows.view(b, h, p * pages.shape[1], pages.shape[2])


def paged_decode_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     want_scores: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    batch, q_heads, dim = q.shape
    kv_heads = block_tables.shape[1]
    group = q_heads // kv_heads
    keys = gather_pages(k_pages, block_tables)
    values = gather_pages(v_pages, block_tables)
    slots = keys.shape[2]
    # scaling the few query rows is cheaper than scaling the [B, Hkv, G, S] logits
    logits = torch.matmul((q * scale).view(batch, kv_heads, group, dim), keys.transpose(-1, -2)).float()
    outside = torch.arange(slots, device=q.device) >= seq_lens[..., None]
    logits.masked_fill_(outside[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = logits.sub_(lse[..., None]).exp_()
    out = torch.matmul(probs.to(values.dtype), values).view(batch, q_heads, dim)
    scores = (probs.sum(2), probs.amax(2)) if want_scores else None
    return out, lse.view(batch, q_heads), scores


def paged_decode_cpu(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     want_scores: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """paged_decode_ref's contract on CPU float32/bfloat16 tensors, by the compiled kernel: one
    (sequence, KV head) pair per task, its G query heads together, the pages read where they lie."""
    batch, q_heads, dim = q.shape
    kv_heads, pages = block_tables.shape[1:]
    block_size = k_pages.shape[1]
    q, lens, out, lse = cpu_library.decode_io(q, seq_lens)
    tables = block_tables.to(torch.int32)
    tables = tables if tables.stride(2) == 1 else tables.contiguous()
    scores = None
    if want_scores:
        scores = tuple(torch.empty(batch, kv_heads, pages * block_size, dtype=torch.float32) for _ in range(2))
    if batch:
        code = cpu_library.dtype_code(q, k_pages, v_pages)
        cpu_library.library().kv_paged_decode(
            code, q.data_ptr(), q.stride(0), k_pages.data_ptr(), v_pages.data_ptr(), block_size,
            tables.data_ptr(), tables.stride(0), tables.stride(1), pages, lens.data_ptr(), lens.stride(0),
            lens.stride(1), batch, q_heads, kv_heads, dim, scale, out.data_ptr(), lse.data_ptr(),
            scores[0].data_ptr() if scores else None, scores[1].data_ptr() if scores else None, cpu_library.threads())
    return out, lse, scores


def merge_attention(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint sets of slots, from each one's out [B, Hq, D] and natural
    lse [B, Hq]: softmax-weighted by their total mass. `lse` must be finite (the first set holds
    a slot for every head); `part_lse` may be -inf (the second set is empty for that head)."""
    total = torch.logaddexp(lse, part_lse)
    merged = out.float() * (lse - total).exp()[..., None] + part_out.float() * (part_lse - total).exp()[..., None]
    return merged.to(out.dtype), total


# The kernels work in base 2 (exp2 and log2 are the fast instructions); lse is natural at the interface.
# tl.constexpr because kernels may read only constexpr globals.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# A decode program holds only G query rows, so its K/V tiles can stay small (few registers) while
# partitions of the sequence supply the parallelism.
_DECODE_BLOCK_N = 32
_MIN_PARTITION = 128
_MAX_PARTITION = 1024
_REDUCE_BLOCK_P = 16  # partitions the reduction merges per step


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def partition_size_for(rows: int, slots: int, device: torch.device) -> int:
    """Tokens per program when `rows` (sequence, KV head) pairs each span up to `slots` slots.

    Small enough that the grid covers the GPU's multiprocessors a few times over even for one long
    sequence; large enough that per-partition partial results stay a small fraction of the K/V read.
    """
    per_program = triton.cdiv(rows * slots, 4 * _multiprocessors(device))
    return min(max(triton.next_power_of_2(per_program), _MIN_PARTITION), _MAX_PARTITION)


def _group_block(group: int) -> int:
    """BLOCK_G for the G query heads a program attends together: tl.dot needs at least 16 rows."""
    return max(16, triton.next_power_of_2(group))


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot input_precision for operands of `dtype`."""
    # float32 inputs would otherwise go through TF32 tensor cores and miss the reference by ~1e-3.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_pages_ptr, v_pages_ptr, tables_ptr, lens_ptr, mid_out_ptr, mid_lse_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_kp_page, stride_kp_slot, stride_kp_d,
    stride_vp_page, stride_vp_slot, stride_vp_d,
    stride_tb, stride_th, stride_tp,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mp, stride_md,
    stride_mlb, stride_mlh, stride_mlp,
    group, dim,
    BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, kv_head, part): the G query heads of one group over slots
    [part * PARTITION, (part + 1) * PARTITION) of that head; writes normalised partial outputs and
    their log2-sum-exp2 to mid_out [B, Hq, NP, D] and mid_lse [B, Hq, NP]."""
    # int64: row offsets into strided views of per-layer buffers can pass 2**31
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    start = part * PARTITION
    if start >= seq_len:
        return
    end = tl.minimum(start + PARTITION, seq_len)

    group_idx = tl.arange(0, BLOCK_G)
    head_mask = group_idx < group
    heads = kv_head * group + group_idx
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    table = tables_ptr + b * stride_tb + kv_head * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        slot_mask = slots < end
        # int64: page * stride overflows int32 in pools beyond 2**31 elements
        page = tl.load(table + (slots // BLOCK_SIZE) * stride_tp, mask=slot_mask, other=0).to(tl.int64)
        offset = slots % BLOCK_SIZE
        kv_mask = slot_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_pages_ptr + page[:, None] * stride_kp_page + offset[:, None] * stride_kp_slot
                    + dims[None, :] * stride_kp_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(slot_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_pages_ptr + page[:, None] * stride_vp_page + offset[:, None] * stride_vp_slot
                    + dims[None, :] * stride_vp_d, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    mid = mid_out_ptr + b * stride_mb + heads[:, None] * stride_mh + part * stride_mp + dims[None, :] * stride_md
    tl.store(mid, acc / l_i[:, None], mask=head_mask[:, None] & dim_mask[None, :])
    tl.store(mid_lse_ptr + b * stride_mlb + heads * stride_mlh + part * stride_mlp, m_i + tl.log2(l_i),
             mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    mid_out_ptr, mid_lse_ptr, lens_ptr, out_ptr, lse_ptr,
    stride_mb, stride_mh, stride_mp, stride_md,
    stride_mlb, stride_mlh, stride_mlp,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    stride_lseb, stride_lseh,
    group, dim,
    PARTITION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, q_head): merges the head's partitions into out [B, Hq, D] and lse [B, Hq]."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b * stride_lb + (head // group) * stride_lh)
    num_parts = tl.cdiv(seq_len, PARTITION)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    mid = mid_out_ptr + b * stride_mb + head * stride_mh
    mid_lse = mid_lse_ptr + b * stride_mlb + head * stride_mlh

    m = tl.zeros([], tl.float32) + float("-inf")
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        part_mask = parts < num_parts
        lse = tl.load(mid_lse + parts * stride_mlp, mask=part_mask, other=float("-inf"))
        o = tl.load(mid + parts[:, None] * stride_mp + dims[None, :] * stride_md,
                    mask=part_mask[:, None] & dim_mask[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new

    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims * stride_od,
             (acc / total).to(out_ptr.dtype.element_ty), mask=dim_mask)
    tl.store(lse_ptr + b * stride_lseb + head * stride_lseh, (m + tl.log2(total)) * _LN2)


@triton.jit
def _scores_kernel(
    q_ptr, k_pages_ptr, tables_ptr, lens_ptr, lse_ptr, sum_ptr, max_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_kp_page, stride_kp_slot, stride_kp_d,
    stride_tb, stride_th, stride_tp,
    stride_lb, stride_lh,
    stride_lseb, stride_lseh,
    stride_sb, stride_sh, stride_ss,
    stride_xb, stride_xh, stride_xs,
    group, dim, num_slots,
    BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, kv_head, part): recomputes the group's probabilities on slots
    [part * PARTITION, (part + 1) * PARTITION), adds their sum to scores_sum and writes their max."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, num_slots)
    held_end = tl.minimum(end, seq_len)

    group_idx = tl.arange(0, BLOCK_G)
    head_mask = group_idx < group
    heads = kv_head * group + group_idx
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    lse2 = tl.load(lse_ptr + b * stride_lseb + heads * stride_lseh, mask=head_mask, other=0.0) * _LOG2E
    table = tables_ptr + b * stride_tb + kv_head * stride_th
    sums = sum_ptr + b * stride_sb + kv_head * stride_sh
    maxes = max_ptr + b * stride_xb + kv_head * stride_xh

    for n in range(start, held_end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        slot_mask = slots < held_end
        page = tl.load(table + (slots // BLOCK_SIZE) * stride_tp, mask=slot_mask, other=0).to(tl.int64)
        k = tl.load(k_pages_ptr + page[:, None] * stride_kp_page + (slots % BLOCK_SIZE)[:, None] * stride_kp_slot
                    + dims[None, :] * stride_kp_d, mask=slot_mask[:, None] & dim_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(head_mask[:, None] & slot_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        previous = tl.load(sums + slots * stride_ss, mask=slot_mask, other=0.0)
        tl.store(sums + slots * stride_ss, previous + tl.sum(p, 0), mask=slot_mask)
        tl.store(maxes + slots * stride_xs, tl.max(p, 0), mask=slot_mask)
    # slots the head does not hold received no probability: their sum stays, their max is 0
    for n in range(tl.maximum(start, held_end), end, BLOCK_N):
        slots = n + tl.arange(0, BLOCK_N)
        tl.store(maxes + slots * stride_xs, tl.zeros([BLOCK_N], tl.float32), mask=slots < end)


def attention_scores(q: torch.Tensor, k_pages: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, lse: torch.Tensor, scale: float, scores_sum: torch.Tensor,
                     scores_max: torch.Tensor, *, partition_size: int | None = None) -> None:
    """Per-slot decode probabilities, reduced over the query heads of each KV group, in place.

    q [B, Hq, D], k_pages [num_pages, block_size, D], block_tables [B, Hkv, P], seq_lens [B, Hkv],
    lse [B, Hq] float32 (natural, as `paged_decode` returns it). scores_sum and scores_max are
    float32 [B, Hkv, S] with S >= the longest head (strided views allowed, e.g. one layer of a
    per-layer accumulator). Slot s < seq_lens[b, h] gets scores_sum += the sum over the group of
    exp(q.k * scale - lse) and scores_max = its max; beyond the length scores_sum is left as it is
    and scores_max is set to 0. No [heads, length] matrix is materialised.
    """
    batch, q_heads, dim = q.shape
    kv_heads = block_tables.shape[1]
    group = q_heads // kv_heads
    num_slots = scores_sum.shape[2]
    partition = partition_size or partition_size_for(batch * kv_heads, num_slots, q.device)
    grid = (batch, kv_heads, triton.cdiv(num_slots, partition))
    _scores_kernel[grid](
        q, k_pages, block_tables, seq_lens, lse, scores_sum, scores_max,
        scale * _LOG2E.value,
        *q.stride(), *k_pages.stride(), *block_tables.stride(), *seq_lens.stride(), *lse.stride(),
        *scores_sum.stride(), *scores_max.stride(),
        group, dim, num_slots,
        BLOCK_SIZE=k_pages.shape[1], PARTITION=partition, BLOCK_G=_group_block(group),
        BLOCK_N=_DECODE_BLOCK_N, BLOCK_D=triton.next_power_of_2(dim), PRECISION=dot_precision(q.dtype),
    )


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, want_scores: bool = False, *,
                 partition_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Triton `paged_decode_ref` (flash decoding): same shapes and return contract.

    Each (sequence, KV head) is split along its slots into partitions of `partition_size` tokens
    (by default sized to fill the GPU); one program per partition attends the G
    query heads of the group, and a second kernel merges the partitions. The number of partitions
    comes from P, so no device-to-host copy is needed. With `want_scores`, `attention_scores`
    recomputes the probabilities from the final lse.
    """
    batch, q_heads, dim = q.shape
    kv_heads, max_pages = block_tables.shape[1:]
    group = q_heads // kv_heads
    num_slots = max_pages * k_pages.shape[1]
    partition = partition_size or partition_size_for(batch * kv_heads, num_slots, q.device)
    num_parts = triton.cdiv(num_slots, partition)
    mid_out = torch.empty(batch, q_heads, num_parts, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, q_heads, num_parts, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(dim)
    _decode_partition_kernel[(batch, kv_heads, num_parts)](
        q, k_pages, v_pages, block_tables, seq_lens, mid_out, mid_lse,
        scale * _LOG2E.value,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_tables.stride(), *seq_lens.stride(),
        *mid_out.stride(), *mid_lse.stride(),
        group, dim,
        BLOCK_SIZE=k_pages.shape[1], PARTITION=partition, BLOCK_G=_group_block(group),
        BLOCK_N=_DECODE_BLOCK_N, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype),
    )
    out = torch.empty(batch, q_heads, dim, dtype=v_pages.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=q.device)
    _decode_reduce_kernel[(batch, q_heads)](
        mid_out, mid_lse, seq_lens, out, lse,
        *mid_out.stride(), *mid_lse.stride(), *seq_lens.stride(), *out.stride(), *lse.stride(),
        group, dim,
        PARTITION=partition, BLOCK_P=_REDUCE_BLOCK_P, BLOCK_D=block_d,
    )
    scores = None
    if want_scores:
        scores_sum = torch.zeros(batch, kv_heads, num_slots, dtype=torch.float32, device=q.device)
        scores_max = torch.empty_like(scores_sum)
        attention_scores(q, k_pages, block_tables, seq_lens, lse, scale, scores_sum, scores_max,
                         partition_size=partition)
        scores = (scores_sum, scores_max)
    return out, lse, scores
