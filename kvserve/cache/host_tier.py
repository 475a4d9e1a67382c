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
from kvserve.cache.tier import Tier, TierKey, TierSet


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

    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> HostView:
        thin = super().view(rows, batch_index)
        return HostView(**vars(thin), key_max=self.key_max[rows], select=self.select[rows],
                        channels_scored=self.channels_scored[rows])


@dataclass
class HostView(ThinView):
    """kernels/sparse_decode.py's arguments, with a layer axis: a thin view of every channel, plus
    what ranks the tokens. All on the host, beside the host pool."""

    key_max: torch.Tensor  # [n, L, Hkv, D] max |K| per channel
    select: torch.Tensor  # [n] tokens attended per head
    channels_scored: torch.Tensor  # [n] channels the ranking uses
