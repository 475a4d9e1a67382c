"""The reference path: paged attention in PyTorch, vectorised over the batch (the kernels' references)."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.registry import register
from kvserve.kernels.paged_decode import paged_decode_ref
from kvserve.kernels.paged_prefill import paged_prefill_ref
from kvserve.kernels.quant_decode import quant_decode_ref
from kvserve.kernels.sparse_decode import sparse_decode_ref
from kvserve.kernels.store_kv import store_kv_ref
from kvserve.kernels.thin_decode import thin_decode_ref


@register
class TorchBackend(AttentionBackend):
    name = "torch"
    quant_kernel = staticmethod(quant_decode_ref)
    thin_kernel = staticmethod(thin_decode_ref)
    host_kernel = staticmethod(sparse_decode_ref)

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        store_kv_ref(k, v, self.k_pages, self.v_pages, slot_index)

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return paged_decode_ref(q, self.k_pages, self.v_pages, tables, lens, self.scale, want_scores)

    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return paged_prefill_ref(q, self.k_pages, self.v_pages, tables, lens, meta.prefill_query_start_loc,
                                 self.scale, meta.prefill_window_sizes)
