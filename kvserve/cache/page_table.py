"""Per-sequence page lists: for every (sequence row, layer, KV head) a list of pages and a length.

The tensors `tables [rows, L, Hkv, max_pages]` and `lengths [rows, L, Hkv]` are persistent and
updated in place (kernels read them directly); a sequence owns one row for as long as it holds
cache. Invariants (`check_invariants`): a head of length n owns exactly ceil(n / block_size)
pages, held in the first entries of its list; every page is free or has as many owners as its
reference count. A head shares only full pages of its prefix (attached from the prefix cache, or
given to it), so appending never writes into a shared page.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvserve.cache.page_pool import PagePool


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


class PageTable:
    def __init__(self, pool: PagePool, max_rows: int, num_layers: int, kv_heads: int, max_tokens: int,
                 slots_per_page: int | None = None) -> None:
        self.pool = pool
        self.block_size = slots_per_page or pool.block_size
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.max_pages = -(-max_tokens // self.block_size)
        self.tables = torch.zeros(max_rows, num_layers, kv_heads, self.max_pages, dtype=torch.int32)
        self.lengths = torch.zeros(max_rows, num_layers, kv_heads, dtype=torch.int32)
        self._rows_free = list(range(max_rows - 1, -1, -1))
        # called with a row as it is released: the compressed tiers drop what the row holds there
        self.release_hooks: list[Callable[[int], None]] = []
        self._layer = torch.arange(num_layers)[None, :, None]
        self._head = torch.arange(kv_heads)[None, None, :]

    @property
    def rows_free(self) -> int:
        return len(self._rows_free)

    def acquire_row(self) -> int:
        return self._rows_free.pop()

    def release_row(self, row: int) -> None:
        """Return every page of the row to the pool and the row to the free list."""
        self.truncate_row(row)
        for hook in self.release_hooks:
            hook(row)
        self._rows_free.append(row)

    def truncate_row(self, row: int) -> None:
        held = _ceil_div(self.lengths[row].long(), self.block_size)
        owned = torch.arange(self.max_pages) < held[..., None]
        self.pool.release(self.tables[row][owned])
        self.tables[row].zero_()
        self.lengths[row].zero_()

    def pages_needed(self, rows: torch.Tensor, counts: torch.Tensor) -> int:
        """Pages growing each row by counts ([n], or [n, L, Hkv] per head) would take from the pool."""
        lens = self.lengths[rows].long()
        grown = lens + (counts if counts.dim() == 3 else counts[:, None, None])
        return int((_ceil_div(grown, self.block_size) - _ceil_div(lens, self.block_size)).sum())

    def append(self, rows: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Grow every head of each row by counts[i] slots, taking pages as needed.

        rows, counts: [B] int64; positions: [T] the new tokens' positions in their sequences (kept
        as slot metadata; a policy's scores of the new slots start at zero). Returns the flat slot
        index (page * block_size + offset) of each new token in every layer and head, [L, T, Hkv]
        with T = counts.sum(), tokens row by row. Raises OutOfPages (changing nothing) when short.
        """
        lens = self.lengths[rows].long()
        self._grow(rows, lens + counts[:, None, None])

        token_row = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        starts = torch.cumsum(counts, 0) - counts
        offset = torch.arange(token_row.numel()) - starts[token_row]
        pos = lens[token_row] + offset[:, None, None]  # [T, L, Hkv]
        page = self.tables[rows[token_row][:, None, None], self._layer, self._head, pos // self.block_size]
        slot = page.long() * self.block_size + pos % self.block_size
        if positions is not None:
            self.pool.slot_positions[slot] = positions[:, None, None].to(torch.int32)
            self.pool.slot_scores[slot] = 0
            self.pool.slot_aux[slot] = 0
        return slot.permute(1, 0, 2).contiguous()

    def _grow(self, rows: torch.Tensor, grown: torch.Tensor) -> None:
        """Lengthen the heads of `rows` to `grown` [n, L, Hkv], taking the pages that needs."""
        lens = self.lengths[rows].long()
        if int(grown.max()) > self.max_pages * self.block_size:
            raise ValueError("a sequence grew past the page table's capacity")
        have = _ceil_div(lens, self.block_size)
        extra = (_ceil_div(grown, self.block_size) - have).flatten()
        total = int(extra.sum())
        if total:
            pages = self.pool.allocate(total)
            head_of_page = torch.repeat_interleave(torch.arange(extra.numel()), extra)
            first = torch.cumsum(extra, 0) - extra
            index_in_head = have.flatten()[head_of_page] + torch.arange(total) - first[head_of_page]
            row_i, layer_i, head_i = torch.unravel_index(head_of_page, extra.new_empty(lens.shape).shape)
            self.tables[rows[row_i], layer_i, head_i, index_in_head] = pages
        self.lengths[rows] = grown.to(torch.int32)

    def pages_held(self, rows: torch.Tensor) -> torch.Tensor:
        """Pages each of `rows` holds across its layers and heads, [n] int64."""
        return _ceil_div(self.lengths[rows].long(), self.block_size).sum(dim=(1, 2))

    def shared_excess(self, rows: torch.Tensor, readers: torch.Tensor) -> torch.Tensor:
        """Per row, [n] float64: the sum over its pages of 1 - 1/readers[page], what counting each page
        it shares with others 1/readers instead of 1 takes off its pages held (readers >= 1 where held)."""
        pages, lens = self.batch_view(rows)
        held = torch.arange(pages.shape[-1]) < _ceil_div(lens.long(), self.block_size)[..., None]
        count = readers[pages.long()].double().clamp(min=1)
        return ((1 - 1 / count) * held).sum(dim=(1, 2, 3))

    def owned_pages(self) -> torch.Tensor:
        """Every page some list of this table owns."""
        held = _ceil_div(self.lengths.long(), self.block_size)
        return self.tables[torch.arange(self.max_pages) < held[..., None]].long()

    def slot_index(self, rows: torch.Tensor, slots: int) -> torch.Tensor:
        """Flat pool slot of every (row, layer, head, slot < slots), [n, L, Hkv, slots] (null page past a head)."""
        pages = self.tables[rows, :, :, : -(-slots // self.block_size)].long()
        flat = (pages[..., None] * self.block_size + torch.arange(self.block_size)).flatten(-2)
        return flat[..., :slots]

    def batch_view(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [B, L, Hkv, P] (P: pages of the longest head) and lengths [B, L, Hkv] of rows."""
        lens = self.lengths[rows]
        pages = max(1, int(_ceil_div(lens.max(), self.block_size)))
        return self.tables[rows, :, :, :pages], lens

    def attach(self, row: int, pages: torch.Tensor, lengths: torch.Tensor) -> None:
        """Start the empty `row` from `pages` [L, Hkv, P] with each head's `lengths` [L, Hkv] (a head's
        pages first, the null page after). The caller hands over one reference of each page to the row."""
        self.tables[row, :, :, :pages.shape[-1]] = pages
        self.lengths[row] = lengths

    def check_invariants(self, live_rows: list[int] | None = None, others: tuple[PageTable, ...] = (),
                         cached: torch.Tensor | None = None) -> None:
        """Raise AssertionError unless every page is free or held by exactly as many owners as its
        reference count: heads of this table or of `others` (the tables of compressed tiers sharing
        the pool), and `cached`, the pages the prefix cache holds."""
        rows = [r for r in range(self.tables.shape[0]) if r not in set(self._rows_free)]
        if live_rows is not None:
            assert sorted(rows) == sorted(live_rows), f"rows in use {rows} != live rows {live_rows}"
        owned = [table.owned_pages() for table in (self, *others)]
        if cached is not None:
            owned.append(cached.long().flatten())
        for table in (self, *others):
            assert int(table.lengths.max()) <= table.max_pages * table.block_size
            for r in self._rows_free:
                assert int(table.lengths[r].abs().sum()) == 0, f"free row {r} holds tokens"
        owners = torch.cat(owned)
        assert bool((owners > 0).all()), "a head owns the null page"
        pool = self.pool
        counts = torch.bincount(owners, minlength=pool.num_pages)
        free = pool.free_ids().long()
        assert free.unique().numel() == free.numel(), "a page is free twice"
        assert int(counts[free].sum()) == 0, "a free page has an owner"
        assert torch.equal(counts[1:].to(torch.int32), pool.refs[1:]), "a page's reference count is not its owners"
        assert free.numel() + int((counts[1:] > 0).sum()) == pool.capacity, (
            f"{int((counts[1:] > 0).sum())} owned + {pool.pages_free} free != {pool.capacity} pages")

    def evict(self, rows: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the slots where `keep` is False and give their pages back.

        rows: [n]; keep: [n, L, Hkv, S] bool, False beyond each head's length. Kept slots above a
        head's new length move down into the holes below it (order is not preserved: keys carry
        their RoPE, so attention does not care) with their slot metadata, then whole pages past the
        new length return to the pool. Returns (src, dst): flat indices into [n, L, Hkv, S] of every
        move, so that a caller's own per-slot tensors can follow: `t.view(-1)[dst] = t.view(-1)[src]`.
        """
        n, layers, heads, slots = keep.shape
        lens = self.lengths[rows].long()
        new_lens = keep.sum(-1)
        below = torch.arange(slots) < new_lens[..., None]
        dst = torch.nonzero((~keep & below).flatten())[:, 0]
        src = torch.nonzero((keep & ~below).flatten())[:, 0]
        # both lists run head by head in slot order, with as many holes as fillers per head: they pair up
        if dst.numel():
            head = dst // slots
            row, layer, kv_head = rows[head // (layers * heads)], (head // heads) % layers, head % heads
            pages = self.tables[row, layer, kv_head]
            src_slot, dst_slot = src % slots, dst % slots
            bs = self.block_size
            src_flat = pages.gather(1, (src_slot // bs)[:, None])[:, 0].long() * bs + src_slot % bs
            dst_flat = pages.gather(1, (dst_slot // bs)[:, None])[:, 0].long() * bs + dst_slot % bs
            for store in self.pool.slot_stores:
                store.index_copy_(0, dst_flat, store.index_select(0, src_flat))
        old_pages = _ceil_div(lens, self.block_size)
        new_pages = _ceil_div(new_lens, self.block_size)
        width = int(old_pages.max())  # no head held a page past it: the rest of the table stays as it is
        page_index = torch.arange(width)
        freed = (page_index >= new_pages[..., None]) & (page_index < old_pages[..., None])
        row_tables = self.tables[rows, :, :, :width]
        self.pool.release(row_tables[freed])
        self.tables[rows, :, :, :width] = row_tables.masked_fill(freed, 0)
        self.lengths[rows] = new_lens.to(torch.int32)
        return src, dst
