"""One in, one out at decode: a budget policy's decode step (score every held slot from this step's
attention, then drop each over-budget head's lowest-scoring unprotected slot) in one compiled pass
over the page tables and the pool's slot metadata, with no [n, L, Hkv, S] gathers.

Shapes (n sequences of one step, all decoding; R table rows, L layers, Hkv KV heads, P pages per
head, Bd decode rows of the step, S slots of its attention scores):
    rows, score_rows:       [n] int64   each sequence's table row, and its row in the step's scores
    rules:                  [n] int32   how each scores its slots (`DecodeScore`)
    budget:                 [n] int64   tokens a head keeps; a head holds at most budget + 1
    tail_start, tail_end:   [n] int64   positions in [tail_start, tail_end) are protected ...
    recent_after:           [n] int64   ... and so are positions above recent_after
    scores:                 L x [Bd, Hkv, S] float32   probability per slot, summed over each group
    tables:                 [R, L, Hkv, P] int32   updated in place (a page that empties is unlinked)
    lengths:                [R, L, Hkv] int32      updated in place
    k_pages, v_pages:       [num_pages, block_size, D]   a moved slot's key and value follow it
    slot_positions, slot_scores, slot_aux: [num_pages * block_size]   likewise, scores rewritten
returns
    freed:                  [F] int32   pages unlinked from the tables, for the caller to release
    evicted:                [n, L, Hkv] bool   the heads that dropped a slot

A dropped slot's hole is filled by the head's last slot, as `PageTable.evict` does. The reference
is the policies' own `act` through the policy runner's general path (TOVAPolicy, H2OPolicy): the
tests run both on the same steps and require the same slots, lengths and scores, to the bit.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

import torch

from kvserve.kernels import cpu_library


class DecodeScore(IntEnum):
    """What a one-in-one-out policy ranks its slots by at decode."""

    LAYER_MEAN = 0  # this step's probability, averaged over the layer's query heads by position (TOVA)
    GROUP_MEAN = 1  # this step's probability, averaged over the KV head's query group (TOVA, heads: group)
    ACCUMULATED = 2  # every probability the slot received so far (H2O); aux counts the queries


def decode_evict_cpu(rows: torch.Tensor, score_rows: torch.Tensor, rules: torch.Tensor, budget: torch.Tensor,
                     tail_start: torch.Tensor, tail_end: torch.Tensor, recent_after: torch.Tensor,
                     scores: list[torch.Tensor], tables: torch.Tensor, lengths: torch.Tensor, k_pages: torch.Tensor,
                     v_pages: torch.Tensor, slot_positions: torch.Tensor, slot_scores: torch.Tensor,
                     slot_aux: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled kernel (kernels/csrc/decode_evict.cpp); `available(...)` says whether it takes
    these tensors."""
    members, (layers, kv_heads) = rows.numel(), tables.shape[1:3]
    block_size, dim = k_pages.shape[1:]
    longs = [t.to(torch.int64).contiguous() for t in (rows, score_rows, budget, tail_start, tail_end, recent_after)]
    rules = rules.to(torch.int32).contiguous()
    layer_scores = [s.float().contiguous() for s in scores]
    pointers = (ctypes.c_void_p * layers)(*(s.data_ptr() for s in layer_scores))
    freed = torch.empty(members, layers, kv_heads, dtype=torch.int32)
    evicted = torch.empty(members, layers, kv_heads, dtype=torch.uint8)
    first = layer_scores[0]
    cpu_library.library().kv_decode_evict(
        members, longs[0].data_ptr(), longs[1].data_ptr(), rules.data_ptr(), *(t.data_ptr() for t in longs[2:]),
        pointers, first.stride(0), first.stride(1), tables.data_ptr(), *tables.stride()[:3], lengths.data_ptr(),
        *lengths.stride()[:2], layers, kv_heads, block_size, float(group_size), k_pages.data_ptr(), v_pages.data_ptr(),
        dim * k_pages.element_size(), slot_positions.data_ptr(), slot_scores.data_ptr(), slot_aux.data_ptr(),
        freed.data_ptr(), evicted.data_ptr(), cpu_library.threads())
    return freed[freed > 0], evicted.bool()


def available(tables: torch.Tensor, lengths: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """Whether the compiled kernel can run on this pool: built, on the CPU, every store contiguous."""
    return (cpu_library.dtype_code(k_pages, v_pages) is not None and tables.dtype == torch.int32
            and lengths.dtype == torch.int32 and all(t.is_contiguous() for t in (tables, lengths, k_pages, v_pages)))
