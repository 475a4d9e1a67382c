"""The compiled CPU path: the K/V store, decode attention, bfloat16 prefill attention and decode over
the quantized (KIVI), thin-key (ThinK) and host (TailorKV's top-k read) tiers in compiled kernels,
which read keys and values where they lie in the pages instead of gathering a copy per step."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.registry import register
from kvserve.kernels import cpu_library
from kvserve.kernels.paged_decode import paged_decode_cpu
from kvserve.kernels.paged_prefill import paged_prefill_cpu
from kvserve.kernels.quant_decode import quant_decode_cpu
from kvserve.kernels.sparse_decode import sparse_decode_cpu
from kvserve.kernels.store_kv import store_kv_cpu
from kvserve.kernels.thin_decode import thin_decode_cpu


@register
class CPUBackend(AttentionBackend):
    name = "cpu"
    quant_kernel = staticmethod(quant_decode_cpu)
    thin_kernel = staticmethod(thin_decode_cpu)
    host_kernel = staticmethod(sparse_decode_cpu)

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> None:
        if cpu_library.dtype_code(k_pages) is None:
            raise ValueError("the cpu attention backend needs a C++ compiler and a float32 or bfloat16 CPU cache")
        super().__init__(k_pages, v_pages, scale)

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        store_kv_cpu(k, v, self.k_pages, self.v_pages, slot_index)

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return paged_decode_cpu(q, self.k_pages, self.v_pages, tables, lens, self.scale, want_scores)

    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return paged_prefill_cpu(q, self.k_pages, self.v_pages, tables, lens, meta.prefill_query_start_loc,
                                 self.scale, meta.prefill_window_sizes)
