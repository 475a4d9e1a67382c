"""The host tier (TailorKV's sparsity-friendly layers): the full cache of a layer, off the device.

Keys and values at full width in a pool of their own (host memory; pinned beside a GPU in
production), outside the --kv-cache-memory budget. Each decode step reads only the tokens the
approximate score ranks highest (kernels/sparse_decode.py); `key_max` keeps max |K| per channel
of every head for that ranking, and `select`/`channels` each row's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.cache.thin_key import ThinKeyTier, ThinView
from kvserve.cache.tier import Tier, TierKey, TierSet, TierView
from kvserve.kernels.sparse_decode import sparse_decode_ref


@dataclass(frozen=True)
class HostKey(TierKey):
    def create(self, cache: TierSet) -> Tier:
        return HostTier(cache.pool.head_dim, *cache.new_tier_args(cache.host_pool))


class HostTier(ThinKeyTier):
    """A thin-key tier that keeps every channel, on the host pool."""

    def __init__(self, head_dim: int, *args) -> None:
        super().__init__(head_dim, *args)
        self.channels[:] = torch.arange(head_dim)
        self.key_max = torch.zeros(*self.shape, head_dim)
        self.select = torch.zeros(self.shape[0], dtype=torch.long)
        self.channels_scored = torch.zeros(self.shape[0], dtype=torch.long)

    def store(self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              **extra: torch.Tensor) -> None:
        keys = keys.cpu()
        super().store(rows, counts, keys, values)
        self.select[rows] = extra["select"]
        self.channels_scored[rows] = extra["channels_scored"]
        head = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten())
        key_max = self.key_max[rows]
        key_max.view(-1, key_max.shape[-1]).scatter_reduce_(
            0, head[:, None].expand(-1, keys.shape[1]), keys.abs().float(), "amax")
        self.key_max[rows] = key_max

    def release_row(self, row: int) -> None:
        super().release_row(row)
        self.key_max[row] = 0

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> TierView:
        return HostView(self, rows, batch_index)


class HostView(ThinView):
    def __init__(self, tier: HostTier, rows: torch.Tensor, batch_index: torch.Tensor) -> None:
        super().__init__(tier, rows, batch_index)
        self.key_max = tier.key_max[rows]
        self.select = tier.select[rows]
        self.channels_scored = tier.channels_scored[rows]

    def attend(self, layer: int, q: torch.Tensor, scale: float, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tier = self.tier
        out, lse = sparse_decode_ref(q.to(tier.pool.k_pages.device), self.key_max[:, layer], tier.keys.view,
                                     self.key_tables[:, layer], tier.values.view, self.value_tables[:, layer],
                                     self.lens[:, layer], self.select, self.channels_scored, scale)
        return out.to(q.device), lse.to(q.device)
