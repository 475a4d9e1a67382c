"""Per-head lists of fixed-size byte records, in pages of the shared pool.

A compressed page format (thin keys, quantized codes, their scales) stores what it keeps of a
token, or of a group of tokens, as one record of `record_bytes` bytes. A `RecordTable` is a
`PageTable` whose slots are such records: `per_page` of them fit in a page (each within one half
of it, see `PagePool.records`), and every (row, layer, KV head) owns its own list, so a format
frees real pages head by head. Records are written whole, once, and never move.

A record's address is `half * per_half + index`, where `half` is its half page in the pool's
record view; kernels compute the same address from the table, the record's index in its list
and `per_half`.
"""

from __future__ import annotations

import torch

from kvserve.cache.page_pool import PagePool
from kvserve.cache.page_table import PageTable
from kvserve.kernels.records import list_addresses, read_records, record_address


class RecordTable(PageTable):
    def __init__(self, pool: PagePool, record_bytes: int, max_rows: int, num_layers: int, kv_heads: int,
                 max_records: int) -> None:
        self.record_bytes = record_bytes
        self.view, self.per_half = pool.records(record_bytes)
        super().__init__(pool, max_rows, num_layers, kv_heads, max_records, slots_per_page=2 * self.per_half)

    @property
    def per_page(self) -> int:
        return self.block_size

    def extend(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add counts[i, l, h] records to each head of `rows` ([n] ints; counts [n, L, Hkv]); return
        the new records' addresses, [counts.sum()] head by head (row, layer, head order), oldest first.
        Raises OutOfPages (changing nothing) when the pool is short."""
        lens = self.lengths[rows].long()
        self._grow(rows, lens + counts)
        flat_counts = counts.flatten()
        head = torch.repeat_interleave(torch.arange(flat_counts.numel()), flat_counts)
        first = torch.cumsum(flat_counts, 0) - flat_counts
        index = lens.flatten()[head] + torch.arange(head.numel()) - first[head]
        row_i, layer_i, head_i = torch.unravel_index(head, counts.shape)
        return record_address(self.tables[rows[row_i], layer_i, head_i], index, self.per_half, self.pool.num_pages)

    def addresses(self, rows: torch.Tensor, records: int) -> torch.Tensor:
        """Address of records 0..records-1 of every head of `rows`, [n, L, Hkv, records] (records past
        a head's length point into the null page)."""
        return list_addresses(self.tables[rows], records, self.per_half, self.pool.num_pages)

    def lists(self, rows: torch.Tensor, records: int, device: torch.device) -> torch.Tensor:
        """The page lists of `rows` cut to the pages `records` records need, on `device`: [n, L, Hkv, P]."""
        return self.tables[rows][..., : max(1, -(-records // self.per_page))].to(device)

    def write(self, addresses: torch.Tensor, data: torch.Tensor) -> None:
        """data [M, record_bytes] uint8 into the records at `addresses` [M]."""
        self.view[addresses // self.per_half, addresses % self.per_half] = data

    def read(self, addresses: torch.Tensor) -> torch.Tensor:
        """The records at `addresses` [...], as [..., record_bytes] uint8."""
        return read_records(self.view, addresses)
