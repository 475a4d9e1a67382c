"""The thin-key page format (ThinK): each head keeps `n_keep` of its key channels.

Two record lists per head: the kept channels of each key, and each value at full width, so a
thinned token takes (n_keep + D) / 2D of a full slot. The channel index of every (row, layer,
head) is set when its first tokens are thinned and stays for the row's life.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.cache.tier import Tier, TierKey, TierSet, TierView
from kvserve.kernels.thin_decode import thin_decode, thin_decode_ref


@dataclass(frozen=True)
class ThinKey(TierKey):
    keep: int  # key channels kept per head

    def create(self, cache: TierSet) -> Tier:
        return ThinKeyTier(self.keep, *cache.new_tier_args())


class ThinKeyTier(Tier):
    def __init__(self, keep: int, *args) -> None:
        super().__init__(*args)
        self.keep = keep
        size = self.pool.k_pages.element_size()
        self.keys = self.record_table(keep * size, self.max_tokens)
        self.values = self.record_table(self.pool.head_dim * size, self.max_tokens)
        self.channels = torch.zeros(*self.shape, keep, dtype=torch.long)

    def store(self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              **extra: torch.Tensor) -> None:
        if "channels" in extra:
            self.channels[rows] = extra["channels"]
        device = self.pool.storage.device  # the host tier's pool is on the host, whatever the keys' device
        keys, values = keys.to(device), values.to(device)
        key_addr, value_addr = self._extend(rows, [counts, counts])
        head_channels = self.channels[rows].flatten(0, 2).repeat_interleave(counts.flatten(), dim=0).to(device)
        dtype = self.pool.dtype
        self.keys.write(key_addr, keys.gather(1, head_channels).to(dtype).contiguous().view(torch.uint8))
        self.values.write(value_addr, values.to(dtype).contiguous().view(torch.uint8))
        self.lengths[rows] += counts.to(torch.int32)

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> TierView:
        return ThinView(self, rows, batch_index)


class ThinView(TierView):
    def __init__(self, tier: ThinKeyTier, rows: torch.Tensor, batch_index: torch.Tensor) -> None:
        self.tier = tier
        self.batch_index = batch_index
        tokens = int(tier.lengths[rows].max())
        # copied to the pool's device once per step, not once per layer
        device = tier.pool.storage.device
        self.lens = tier.lengths[rows].to(device)
        self.key_tables = tier.keys.lists(rows, tokens, device)
        self.value_tables = tier.values.lists(rows, tokens, device)
        self.channels = tier.channels[rows].to(device)

    def attend(self, layer: int, q: torch.Tensor, scale: float, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tier = self.tier
        decode = thin_decode if triton else thin_decode_ref
        return decode(q, self.channels[:, layer], tier.keys.view, self.key_tables[:, layer], tier.values.view,
                      self.value_tables[:, layer], self.lens[:, layer], scale)
