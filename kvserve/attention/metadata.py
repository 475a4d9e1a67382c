"""What one step tells attention, and what attention reports back to the policies.

A step runs one flat batch of T tokens from B sequences: decode tokens (one new token for a
sequence) and prefill chunks (several). The model runner builds `AttentionMetadata` once per step;
every layer's `AttentionBackend.forward` reads it.

Observations (what compression policies ask for) are computed only when the metadata asks:
- `observe_decode`: for decode rows, per slot, the probability summed and maxed over the query
  heads of each KV group -> `decode_scores[layer] = (sum, max)`, each [Bd, Hkv, S] float32;
- `prefill_windows` ([Bp] ints, 0 for none): for each prefill row, the probabilities of its last
  `prefill_windows[row]` queries of the chunk, summed over them and over the group
  -> `window_scores[layer]`, [Bp, Hkv, S] float32.
- `query_windows` ([Bp] ints, 0 for none): for each prefill row, its chunk's last
  `query_windows[row]` queries themselves (after RoPE), right-aligned and zero-padded
  -> `window_queries[layer]`, [Bp, W, Hq, D] float32 (kernels/window_queries.py).
S = P * block_size; entries at or beyond a head's length are zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.cache.tier import TierView


@dataclass
class AttentionMetadata:
    block_tables: torch.Tensor  # [B, L, Hkv, P] int32, P = pages of the longest head in the batch
    seq_lens: torch.Tensor  # [B, L, Hkv] int32, tokens held per head after this step's append
    slot_index: torch.Tensor  # [L, T, Hkv] int64, flat page * block_size + offset of each new token
    decode_rows: torch.Tensor  # [Bd] int64, batch rows with one new token
    decode_tokens: torch.Tensor  # [Bd] int64, their token index in the flat batch
    prefill_rows: torch.Tensor  # [Bp] int64, batch rows with a chunk of several tokens
    prefill_tokens: torch.Tensor  # [Tp] int64, those rows' token indices, row by row
    prefill_query_start_loc: torch.Tensor  # [Bp + 1] int64, offsets into prefill_tokens
    observe_decode: bool = False
    prefill_windows: torch.Tensor | None = None  # [Bp] int64, queries each prefill row observes
    query_windows: torch.Tensor | None = None  # [Bp] int64, queries each prefill row reports
    tier_views: list[TierView] = field(default_factory=list)  # compressed tiers of decode rows
    decode_scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by layer
    window_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer

    def to(self, device: torch.device) -> AttentionMetadata:
        """The step's index tensors on the pool's device (built on the host by the runner)."""
        if device.type == "cpu":
            return self
        for name in ("block_tables", "seq_lens", "slot_index", "decode_rows", "decode_tokens", "prefill_rows",
                     "prefill_tokens", "prefill_query_start_loc", "prefill_windows", "query_windows"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    @property
    def has_decode(self) -> bool:
        return self.decode_rows.numel() > 0

    @property
    def has_prefill(self) -> bool:
        return self.prefill_rows.numel() > 0

    @property
    def prefill_window_sizes(self) -> torch.Tensor | int:
        """`prefill_windows` as the prefill kernels take it: 0 when no row observes."""
        return self.prefill_windows if self.prefill_windows is not None else 0
