"""The thin-key page format (ThinK): each head keeps `n_keep` of its key channels.

Two record lists per head: the kept channels of each key, and each value at full width, so a
thinned token takes (n_keep + D) / 2D of a full slot. The channel index of every (row, layer,
head) is set when its first tokens are thinned and stays for the row's life.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.cache.tier import Tier, TierKey, TierSet, TierView


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

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> ThinView:
        lens = self.lengths[rows]
        tokens = int(lens.max())
        device = self.pool.storage.device
        return ThinView(batch_index, self.channels[rows].to(device), self.keys.view,
                        self.keys.lists(rows, tokens, device), self.values.view,
                        self.values.lists(rows, tokens, device), lens.to(device))


@dataclass
class ThinView(TierView):
    """kernels/thin_decode.py's arguments, with a layer axis."""

    channels: torch.Tensor  # [n, L, Hkv, K] int64, each head's kept key channels
    key_view: torch.Tensor  # [2N, per_half, K * itemsize] uint8, the pool's thin-key records
    key_tables: torch.Tensor  # [n, L, Hkv, Pk] int32
    value_view: torch.Tensor  # [2N, per_half, D * itemsize] uint8, the pool's value records
    value_tables: torch.Tensor  # [n, L, Hkv, Pv] int32
    lens: torch.Tensor  # [n, L, Hkv] int32, thin tokens per head
