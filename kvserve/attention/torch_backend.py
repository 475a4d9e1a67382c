"""The CPU path: paged attention in PyTorch, vectorised over the batch (the kernels' references)."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend, AttentionMetadata
from kvserve.kernels.paged_decode import paged_decode_ref
from kvserve.kernels.paged_prefill import paged_prefill_ref
from kvserve.kernels.store_kv import store_kv_ref


class TorchBackend(AttentionBackend):
    name = "torch"

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        store_kv_ref(k, v, self.k_pages, self.v_pages, meta.slot_index[layer])
        tables = meta.block_tables[:, layer]
        lens = meta.seq_lens[:, layer]
        if not meta.has_prefill:  # the common all-decode step: no scatter needed
            out, _, scores = paged_decode_ref(q, self.k_pages, self.v_pages, tables, lens, self.scale,
                                              meta.observe_decode)
            if meta.observe_decode:
                meta.decode_scores[layer] = scores
            return out
        out = torch.empty_like(q)
        if meta.has_decode:
            rows = meta.decode_rows
            dec, _, scores = paged_decode_ref(q[meta.decode_tokens], self.k_pages, self.v_pages, tables[rows],
                                              lens[rows], self.scale, meta.observe_decode)
            out[meta.decode_tokens] = dec
            if meta.observe_decode:
                meta.decode_scores[layer] = scores
        rows = meta.prefill_rows
        pre, window = paged_prefill_ref(q[meta.prefill_tokens], self.k_pages, self.v_pages, tables[rows],
                                        lens[rows], meta.prefill_query_start_loc, self.scale,
                                        meta.prefill_windows if meta.prefill_windows is not None else 0)
        out[meta.prefill_tokens] = pre
        if window is not None:
            meta.window_scores[layer] = window
        return out
