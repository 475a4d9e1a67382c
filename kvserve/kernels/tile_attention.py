"""Triton helpers shared by the decode kernels over compressed records (quant_decode, thin_decode):
where a record lives, the online-softmax update of one tile, and the epilogue that writes a
partial result (out, lse) for `merge_attention`. Base-2 logits, as in paged_decode."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def record_offset(table, index, per_half, half_bytes, record_bytes, num_pages, stride_tp):
    """Byte offset in the pool of record `index` of the list whose page ids start at `table`
    (kernels/records.py gives the layout)."""
    per_page = 2 * per_half
    page = tl.load(table + (index // per_page) * stride_tp).to(tl.int64)
    within = index % per_page
    half = (within // per_half) * num_pages + page
    return half * half_bytes + (within % per_half) * record_bytes


@triton.jit
def softmax_tile(s, values, m_i, l_i, acc):
    """Fold one tile of base-2 logits s [G, N] and its values [N, D] into the running max m_i,
    sum l_i and output acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def store_partial(out_ptr, lse_ptr, b, heads, head_mask, dims, m_i, l_i, acc,
                  stride_ob, stride_oh, stride_od, stride_lseb, stride_lseh):
    """out = acc / l_i and the natural lse of each head; 0 and -inf for a head that held nothing."""
    held = l_i > 0
    out = tl.where(held[:, None], acc / tl.where(held, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    lse = tl.where(held, (m_i + tl.log2(tl.where(held, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + b * stride_lseb + heads * stride_lseh, lse, mask=head_mask)
