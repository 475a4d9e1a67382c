"""The attention backend interface: store a step's new K/V in the pages, then attend.

Each layer calls `backend.forward(layer, q, k, v, meta)` with the step's `AttentionMetadata`
(kvserve/attention/metadata.py). Sequences with exactly one new token take the decode path, the
others the prefill path; both see the same thing: every slot a head holds, minus the chunk's own
future. Decode rows of sequences that hold compressed tiers (`meta.tier_views`) attend their
full-precision pages and every tier, merged by log-sum-exp; observations cover the
full-precision pages only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.cache.host_tier import HostView
from kvserve.cache.quantized import QuantView
from kvserve.cache.thin_key import ThinView
from kvserve.cache.tier import TierView
from kvserve.kernels.paged_decode import merge_attention
from kvserve.kernels.window_queries import window_queries

TierKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # -> (out [n, Hq, D], lse [n, Hq] float32)


class AttentionBackend(ABC):
    """Stores K/V into the shared page pool and computes paged grouped-query attention.

    A backend is a set of kernels, nothing more; the steps around them are this class's, so
    every backend keeps these invariants alike:
    - `forward` stores the step's K/V before attending, so a token attends itself;
    - each kernel keeps the contract of its torch reference in kernels/ (shapes in each module's
      docstring): `store`, `decode` and `prefill` over the full-precision pages, and one kernel
      per compressed tier, `quant_kernel` (kernels/quant_decode.py), `thin_kernel`
      (kernels/thin_decode.py), `host_kernel` (kernels/sparse_decode.py), whose parts `forward`
      merges with the pages' by log-sum-exp;
    - the host tier's kernel runs where its tokens lie, in host memory, and its result returns
      to q's device.
    """

    name: ClassVar[str]
    quant_kernel: ClassVar[TierKernel]
    thin_kernel: ClassVar[TierKernel]
    host_kernel: ClassVar[TierKernel]

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> None:
        self.k_pages = k_pages
        self.v_pages = v_pages
        self.scale = scale

    @abstractmethod
    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        """k, v [T, Hkv, D] into their slots [T, Hkv]."""

    @abstractmethod
    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """paged_decode's contract: (out, lse, scores)."""

    @abstractmethod
    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """paged_prefill's contract for the step's prefill rows: (out, window_scores)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> attention output [T, Hq, D]."""
        self.store(k, v, meta.slot_index[layer])
        tables = meta.block_tables[:, layer]
        lens = meta.seq_lens[:, layer]
        if not meta.has_prefill:  # the common all-decode step: no scatter needed
            return self._decode_rows(layer, q, tables, lens, meta)
        if meta.has_decode:
            out = torch.empty_like(q)
            rows = meta.decode_rows
            out[meta.decode_tokens] = self._decode_rows(layer, q[meta.decode_tokens], tables[rows], lens[rows], meta)
            rows = meta.prefill_rows
            queries = q[meta.prefill_tokens]
            pre, window = self.prefill(queries, tables[rows], lens[rows], meta)
            out[meta.prefill_tokens] = pre
        else:  # an all-prefill step: its rows and tokens are the prefill rows and tokens, in order
            queries = q
            out, window = self.prefill(q, tables, lens, meta)
        if window is not None:
            meta.window_scores[layer] = window
        if meta.query_windows is not None:
            meta.window_queries[layer] = window_queries(queries, meta.prefill_query_start_loc, meta.query_windows)
        return out

    def _decode_rows(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
        out, lse, scores = self.decode(q, tables, lens, meta.observe_decode)
        if meta.observe_decode:
            meta.decode_scores[layer] = scores
        for view in meta.tier_views:
            index = view.batch_index.to(q.device)
            part_out, part_lse = self.attend_tier(layer, view, q[index])
            out[index], lse[index] = merge_attention(out[index], lse[index], part_out, part_lse)
        return out

    def attend_tier(self, layer: int, view: TierView, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, Hq, D] of the view's rows -> (out [n, Hq, D], lse [n, Hq]) over the tier's tokens
        of `layer`; lse is -inf where a head holds none there."""
        match view:
            case HostView():  # before ThinView, which it extends
                out, lse = self.host_kernel(q.to(view.key_view.device), view.key_max[:, layer], view.key_view,
                                            view.key_tables[:, layer], view.value_view, view.value_tables[:, layer],
                                            view.lens[:, layer], view.select, view.channels_scored, self.scale)
                return out.to(q.device), lse.to(q.device)
            case ThinView():
                return self.thin_kernel(q, view.channels[:, layer], view.key_view, view.key_tables[:, layer],
                                        view.value_view, view.value_tables[:, layer], view.lens[:, layer], self.scale)
            case QuantView():
                return self.quant_kernel(q, view.token_view, view.token_tables[:, layer], view.group_view,
                                         view.group_tables[:, layer], view.lens[:, layer], view.layout, self.scale)
        raise TypeError(f"no {self.name} kernel for {type(view).__name__}")
