"""The quantized page format (KIVI): keys per channel over groups of tokens, values per token.

Two record lists per head: one record per token (key and value codes, value scales) and one per
group of `group_size` tokens (the key scales); `QuantLayout` in kernels/quant_decode.py gives the
byte layout. Tokens arrive in whole groups, so a key group never straddles two stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.cache.tier import Tier, TierKey, TierSet, TierView
from kvserve.kernels.quant_decode import QuantLayout, quant_decode, quant_decode_ref


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

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> TierView:
        return QuantView(self, rows, batch_index)


class QuantView(TierView):
    def __init__(self, tier: QuantizedTier, rows: torch.Tensor, batch_index: torch.Tensor) -> None:
        self.tier = tier
        self.batch_index = batch_index
        lens = tier.lengths[rows]
        tokens = int(lens.max())
        # copied to the pool's device once per step, not once per layer
        device = tier.pool.storage.device
        self.lens = lens.to(device)
        self.token_tables = tier.tokens.lists(rows, tokens, device)
        self.group_tables = tier.groups.lists(rows, tokens // tier.unit, device)

    def attend(self, layer: int, q: torch.Tensor, scale: float, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tier = self.tier
        decode = quant_decode if triton else quant_decode_ref
        return decode(q, tier.tokens.view, self.token_tables[:, layer], tier.groups.view, self.group_tables[:, layer],
                      self.lens[:, layer], tier.layout, scale)
