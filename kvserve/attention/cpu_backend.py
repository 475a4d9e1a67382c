"""The compiled CPU path: the torch backend with the K/V store, decode attention and bfloat16 prefill
attention in compiled kernels, which read keys and values where they lie in the pages instead of
gathering a copy per step."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.attention.torch_backend import TorchBackend
from kvserve.kernels.paged_decode import paged_decode_cpu
from kvserve.kernels.paged_prefill import paged_prefill_cpu
from kvserve.kernels.store_kv import store_kv_cpu


class CPUBackend(TorchBackend):
    name = "cpu"

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        store_kv_cpu(k, v, self.k_pages, self.v_pages, slot_index)

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return paged_decode_cpu(q, self.k_pages, self.v_pages, tables, lens, self.scale, want_scores)

    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return paged_prefill_cpu(q, self.k_pages, self.v_pages, tables, lens, meta.prefill_query_start_loc,
                                 self.scale, meta.prefill_windows if meta.prefill_windows is not None else 0)
