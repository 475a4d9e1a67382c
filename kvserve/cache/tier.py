"""Compressed tiers: where a policy moves tokens out of the full-precision pages.

A sequence's cache for one (layer, KV head) is its full-precision pages (the `PageTable`) plus,
for policies that compress rather than evict, the tokens of one or more tiers: quantized (KIVI),
thin-key (ThinK), or a host copy (TailorKV's offloaded layers). Attention over a head is the
softmax over the union; the attention backend attends each tier's part with its kernel for that
tier and merges the parts by their log-sum-exp (kvserve/attention/backend.py). Tiers only store:
each step they hand attention a `TierView`, plain data its kernel reads.

Invariants every tier keeps:
- tokens enter only through `store`, oldest first, in whole `unit`s per head, and stay until the
  row is released (no eviction inside a tier);
- its record lists hold exactly what `lengths` says, in pages of its pool (the shared pool, so
  compressed bytes count against the same budget, or, for a host tier, a pool of its own);
- a released row holds no token and no page.
A tier is identified by a `TierKey` (its format and parameters); the `TierSet` makes one per key
on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvserve.cache.page_pool import OutOfPages, PagePool
from kvserve.cache.page_table import PageTable
from kvserve.cache.record_table import RecordTable


@dataclass(frozen=True)
class TierKey(ABC):
    """Names a tier format and its parameters; equal keys share one tier."""

    @abstractmethod
    def create(self, cache: TierSet) -> Tier:
        """The tier this key names, in `cache`'s pool (or its host pool)."""


@dataclass
class TierView:
    """One step's decode rows of one tier, as the tier's decode kernel reads them, layer by layer.

    A subclass holds plain data only: record views of the tier's pool, their byte layout, and
    per-row tables, lengths and parameters (the layer on axis 1 where they vary by layer), already
    on the pool's device (copied once per step, not once per layer)."""

    batch_index: torch.Tensor  # [n] rows of the step's decode batch that hold tokens in this tier


class Tier(ABC):
    unit: int = 1  # tokens per head a store must come in multiples of

    def __init__(self, pool: PagePool, max_rows: int, num_layers: int, kv_heads: int, max_tokens: int) -> None:
        self.pool = pool
        self.shape = (max_rows, num_layers, kv_heads)
        self.max_tokens = max_tokens
        self.lengths = torch.zeros(max_rows, num_layers, kv_heads, dtype=torch.int32)
        self.tables: list[RecordTable] = []

    def record_table(self, record_bytes: int, max_records: int) -> RecordTable:
        table = RecordTable(self.pool, record_bytes, *self.shape, max_records)
        self.tables.append(table)
        return table

    @abstractmethod
    def store(self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              **extra: torch.Tensor) -> None:
        """Append counts[i, l, h] tokens to each head of `rows`: keys, values [counts.sum(), D], head
        by head (row, layer, head order), oldest first. Raises OutOfPages, storing nothing, when short."""

    @abstractmethod
    def view(self, rows: torch.Tensor, batch_index: torch.Tensor) -> TierView:
        """The decode view of `rows` (sequence rows), which sit at `batch_index` of the step's decode batch."""

    def _extend(self, rows: torch.Tensor, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Grow each table by its counts ([n, L, Hkv] records), all or nothing: addresses per table."""
        needed = sum(table.pages_needed(rows, count) for table, count in zip(self.tables, counts))
        if needed > self.pool.pages_free:
            raise OutOfPages(f"a tier needs {needed} pages, {self.pool.pages_free} free")
        return [table.extend(rows, count) for table, count in zip(self.tables, counts)]

    def release_row(self, row: int) -> None:
        for table in self.tables:
            table.truncate_row(row)
        self.lengths[row] = 0

    def pages_held(self, rows: torch.Tensor) -> torch.Tensor:
        held = torch.zeros(rows.numel(), dtype=torch.long)
        for table in self.tables:
            held += table.pages_held(rows)
        return held


class TierSet:
    """The tiers in use, made on demand; the host pool for tiers that offload, made on demand too."""

    def __init__(self, table: PageTable, max_tokens: int) -> None:
        self.table = table
        self.pool = table.pool
        self.max_tokens = max_tokens
        self.tiers: dict[TierKey, Tier] = {}
        self._host_pool: PagePool | None = None

    @property
    def host_pool(self) -> PagePool:
        """As many pages as the device pool, in host memory, outside the --kv-cache-memory budget."""
        if self._host_pool is None:
            pool = self.pool
            self._host_pool = PagePool(pool.num_pages, pool.block_size, pool.head_dim, pool.dtype, "cpu")
        return self._host_pool

    def get(self, key: TierKey) -> Tier:
        if key not in self.tiers:
            self.tiers[key] = key.create(self)
        return self.tiers[key]

    def new_tier_args(self, pool: PagePool | None = None) -> tuple:
        table = self.table
        return (pool or self.pool, table.tables.shape[0], table.num_layers, table.kv_heads, self.max_tokens)

    def release_row(self, row: int) -> None:
        for tier in self.tiers.values():
            tier.release_row(row)

    def device_pages_held(self, rows: torch.Tensor) -> torch.Tensor:
        """Pages of the shared pool each row holds in the full-precision table and every tier in it."""
        held = self.table.pages_held(rows)
        for tier in self.tiers.values():
            if tier.pool is self.pool:
                held += tier.pages_held(rows)
        return held

    def device_tables(self) -> tuple[PageTable, ...]:
        return tuple(t for tier in self.tiers.values() if tier.pool is self.pool for t in tier.tables)

    def views(self, rows: torch.Tensor) -> list[TierView]:
        """Decode views of every tier where some of `rows` (the step's decode rows) hold tokens."""
        views = []
        for tier in self.tiers.values():
            present = tier.lengths[rows].flatten(1).any(-1)
            if bool(present.any()):
                index = torch.nonzero(present)[:, 0]
                views.append(tier.view(rows[index], index))
        return views
