"""The GPU path: the same steps as the torch backend, with the Triton kernels of kvserve.kernels."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend, AttentionMetadata
from kvserve.kernels.paged_decode import paged_decode
from kvserve.kernels.paged_prefill import paged_prefill
from kvserve.kernels.store_kv import store_kv


class TritonBackend(AttentionBackend):
    name = "triton"

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

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        store_kv(k, v, self.k_pages, self.v_pages, meta.slot_index[layer])
        tables = meta.block_tables[:, layer]
        lens = meta.seq_lens[:, layer]
        if not meta.has_prefill:  # the common all-decode step: no scatter needed
            out, _, scores = paged_decode(q, self.k_pages, self.v_pages, tables, lens, self.scale,
                                          meta.observe_decode)
            if meta.observe_decode:
                meta.decode_scores[layer] = scores
            return out
        out = torch.empty_like(q)
        if meta.has_decode:
            rows = meta.decode_rows
            dec, _, scores = paged_decode(q[meta.decode_tokens], self.k_pages, self.v_pages, tables[rows],
                                          lens[rows], self.scale, meta.observe_decode)
            out[meta.decode_tokens] = dec
            if meta.observe_decode:
                meta.decode_scores[layer] = scores
        rows = meta.prefill_rows
        pre, window = paged_prefill(q[meta.prefill_tokens], self.k_pages, self.v_pages, tables[rows],
                                    lens[rows], meta.prefill_query_start_loc, self.scale,
                                    meta.prefill_windows if meta.prefill_windows is not None else 0,
                                    max_chunk_len=self._max_chunk_len(meta))
        out[meta.prefill_tokens] = pre
        if window is not None:
            meta.window_scores[layer] = window
        return out
