"""The quantized page format (KIVI): keys per channel over groups of tokens, values per token.

Two record lists per head: one record per token (key and value codes, value scales) and one per
group of `group_size` tokens (the key scales); `QuantLayout` in kernels/quant_layout.py gives the
byte layout. Tokens arrive in whole groups, so a key group never straddles two stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.cache.tier import Tier, TierKey, TierSet, TierView
from kvserve.kernels.quant_layout import QuantLayout


@dataclass(frozen=True)
class QuantKey(TierKey):
    bits: int
    group_size: int

    def create(self, cache: TierSet) -> Tier:
        return QuantizedTier(QuantLayout(self.bits, self.group_size, cache.pool.head_dim), *cache.new_tier_args())


class QuantizedTier(Tier):
    def __init__(self, layout: QuantLayout, *args) -> None:
        super().__init__(*args)
        self.layout = layout
        self.unit = layout.group_size
        self.tokens = self.record_table(layout.token_bytes, self.max_tokens)
        self.groups = self.record_table(layout.group_bytes, -(-self.max_tokens // layout.group_size))

    def store(self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              **extra: torch.Tensor) -> None:
        g, d = self.layout.group_size, self.layout.head_dim
        token_addr, group_addr = self._extend(rows, [counts, counts // g])
        token_records, group_records = self.layout.encode(keys.reshape(-1, g, d), values.reshape(-1, g, d))
        self.tokens.write(token_addr, token_records)
        self.groups.write(group_addr, group_records)
        self.lengths[rows] += counts.to(torch.int32)

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> QuantView:
        lens = self.lengths[rows]
        tokens = int(lens.max())
        device = self.pool.storage.device
        return QuantView(batch_index, self.layout, self.tokens.view, self.tokens.lists(rows, tokens, device),
                         self.groups.view, self.groups.lists(rows, tokens // self.unit, device), lens.to(device))


@dataclass
class QuantView(TierView):
    """kernels/quant_decode.py's arguments, with a layer axis."""

    layout: QuantLayout
    token_view: torch.Tensor  # [2N, per_half, token_bytes] uint8, the pool's token records
    token_tables: torch.Tensor  # [n, L, Hkv, Pt] int32
    group_view: torch.Tensor  # [2N, per_half, group_bytes] uint8, the pool's group records
    group_tables: torch.Tensor  # [n, L, Hkv, Pg] int32
    lens: torch.Tensor  # [n, L, Hkv] int32, quantized tokens per head
