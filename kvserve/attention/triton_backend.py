"""The GPU path: the Triton kernels of kvserve.kernels, for the pages and the compressed tiers."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.registry import register
from kvserve.kernels.paged_decode import paged_decode
from kvserve.kernels.paged_prefill import paged_prefill
from kvserve.kernels.quant_decode import quant_decode
from kvserve.kernels.sparse_decode import sparse_decode_cpu
from kvserve.kernels.store_kv import store_kv
from kvserve.kernels.thin_decode import thin_decode


@register
class TritonBackend(AttentionBackend):
    name = "triton"
    quant_kernel = staticmethod(quant_decode)
    thin_kernel = staticmethod(thin_decode)
    host_kernel = staticmethod(sparse_decode_cpu)  # the host tier's tokens stay in host memory

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> None:
        super().__init__(k_pages, v_pages, scale)
        self._chunk_len_step: tuple[AttentionMetadata, int] | None = None

    def _max_chunk_len(self, meta: AttentionMetadata) -> int:
        # The prefill grid needs the longest chunk on the host; reading it waits for the device,
        # so do that once per step rather than once per layer.
        if self._chunk_len_step is None or self._chunk_len_step[0] is not meta:
            starts = meta.prefill_query_start_loc
            self._chunk_len_step = (meta, int((starts[1:] - starts[:-1]).max()))
        return self._chunk_len_step[1]

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        store_kv(k, v, self.k_pages, self.v_pages, slot_index)

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return paged_decode(q, self.k_pages, self.v_pages, tables, lens, self.scale, want_scores)

    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return paged_prefill(q, self.k_pages, self.v_pages, tables, lens, meta.prefill_query_start_loc,
                             self.scale, meta.prefill_window_sizes, max_chunk_len=self._max_chunk_len(meta))
