"""The prefix cache: blocks of tokens whose K/V stay in the pool after their request, so that the
next request starting with the same tokens skips their prefill (automatic prefix caching).

A block is `block_size` tokens, and its K/V are exactly one page in every (layer, KV head): a page
holds one head's `block_size` tokens. Blocks are keyed by a hash chain, as in vLLM: a block's hash
covers its tokens and its parent's hash, so every token before it, and the first block's parent is
a salt naming the model and dtype. A request can reuse its first k blocks when all k are cached.

The cache holds one reference on each page of its blocks (kvserve/cache/page_pool.py). A block whose
pages no sequence holds besides the cache is evictable: when the pool is short it frees cached
blocks least recently used first, before it would fail an allocation, so cached blocks go before
any running sequence is preempted. Of a chain touched together, the earliest block is the most
recent, so a chain is evicted from its tail and its head stays reachable.

Shared pages are read-only. A sequence whose policy never acts (`Policy.ever_acts`) shares its
cached prefix with the cache and other such sequences for its whole life: it only appends, into
pages of its own past its full prefix pages. A sequence whose policy acts (evicts, compacts, moves
tokens into a tier, writes slot scores) never shares a page: it starts from copies of the cached
pages and gives the cache copies of its own (`private`).

Beside blocks, the cache keeps compressed prefixes: the pages a policy left of a prompt prefix, each
head with its own length, under a key naming the prefix and the policy. Requests that attach one
share its full pages and copy each head's partial last page, the one they would append to; a
compressed prefix is evicted like a block, when no sequence holds its pages.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.cache.page_pool import OutOfPages
from kvserve.cache.page_table import PageTable


@dataclass
class CompressedPrefix:
    """What a policy kept of a prompt prefix: per (layer, KV head) its pages and length."""

    pages: torch.Tensor  # [L, Hkv, P] int32, the null page past each head's own
    lengths: torch.Tensor  # [L, Hkv] int32
    owned: torch.Tensor  # [N] int64: the pages it holds, each once
    tokens: int  # the prefix's tokens (positions 0 .. tokens - 1), before compression


class PrefixCache:
    def __init__(self, table: PageTable, salt: str) -> None:
        self.table = table
        self.pool = pool = table.pool
        self.block_size = table.block_size
        self._root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        # block hash -> its pages [L, Hkv] (int32), least recently used first
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.compressed: OrderedDict[bytes, CompressedPrefix] = OrderedDict()  # key -> it, least recent first
        self.cached = torch.zeros(pool.num_pages, dtype=torch.bool)  # pages some block holds
        self.blocks_evicted = 0
        pool.evictable = self.pages_evictable
        pool.reclaim = self.evict

    def extend_hashes(self, hashes: list[bytes], tokens: Sequence[int], salt: str | None = None) -> list[bytes]:
        """Extend `hashes` (those of the first len(hashes) blocks of `tokens`) to every full block of
        `tokens`, in place; returns it. A `salt` (a request's `cache_salt`) starts a chain of its own,
        which only requests with the same salt match."""
        bs = self.block_size
        root = self._root if salt is None else hashlib.blake2b(self._root + salt.encode(), digest_size=16).digest()
        parent = hashes[-1] if hashes else root
        for start in range(len(hashes) * bs, len(tokens) // bs * bs, bs):
            parent = hashlib.blake2b(parent + array("q", tokens[start:start + bs]).tobytes(), digest_size=16).digest()
            hashes.append(parent)
        return hashes

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many of the leading blocks `hashes` names are cached."""
        for i, block in enumerate(hashes):
            if block not in self.blocks:
                return i
        return len(hashes)

    def pinned(self, hashes: Sequence[bytes] = (), compressed: bytes | None = None) -> int:
        """Evictable pages among the cached blocks `hashes` or of the compressed prefix `compressed`:
        what attaching them takes out of reach."""
        if compressed is not None:
            pages = self.compressed[compressed].owned
        elif hashes:
            pages = torch.stack([self.blocks[h] for h in hashes]).long()
        else:
            return 0
        return int((self.pool.refs[pages] == 1).sum())

    def attach(self, row: int, hashes: Sequence[bytes], private: bool) -> None:
        """Start the empty `row` from the cached blocks `hashes` (leading, all cached): sharing their
        pages, or with `private`, copies of them. Raises OutOfPages, changing nothing, when the copies
        do not fit."""
        pages = torch.stack([self.blocks[h] for h in hashes])  # [k, L, Hkv]
        self.pool.share(pages)  # the row's reference, or a pin while they are copied
        if private:
            try:
                copies = self.pool.copy(pages)
            except OutOfPages:
                self.pool.release(pages)
                raise
            self.pool.release(pages)
            pages = copies
        # every head's first k pages, full ones
        self.table.attach(row, pages.permute(1, 2, 0), torch.full(pages.shape[1:], len(hashes) * self.block_size))
        self._touch(hashes)

    def insert(self, row: int, first: int, hashes: Sequence[bytes], private: bool) -> None:
        """Cache blocks first.. of `row` (its heads hold them whole and unchanged, in page order), whose
        hashes are `hashes`: their pages shared with the row, or with `private`, copies. Blocks cached
        already are left as they are; copies that do not fit are not made (caching is best effort)."""
        fresh = [(first + i, h) for i, h in enumerate(hashes) if h not in self.blocks]
        if fresh:
            index = torch.tensor([i for i, _ in fresh])
            pages = self.table.tables[row][:, :, index].permute(2, 0, 1)  # [n, L, Hkv]
            if private:
                try:
                    pages = self.pool.copy(pages)
                except OutOfPages:
                    return
            else:
                self.pool.share(pages)
            for (_, block), block_pages in zip(fresh, pages):
                self.blocks[block] = block_pages.clone()
            self.cached[pages.long().flatten()] = True
        self._touch(hashes)

    def store_compressed(self, key: bytes, row: int, tokens: int) -> None:
        """Cache what `row` holds, a compressed prefix of `tokens` tokens, under `key` (kept as it is
        when one is cached already). The cache takes a reference of each page; the row keeps its own."""
        if key in self.compressed:
            return
        pages, lengths = self.table.batch_view(torch.tensor([row]))
        pages, lengths = pages[0].clone(), lengths[0].clone()
        held = torch.arange(pages.shape[-1]) < -(-lengths.long() // self.block_size)[..., None]
        owned = pages[held].long()
        self.pool.share(owned)
        self.cached[owned] = True
        self.compressed[key] = CompressedPrefix(pages.masked_fill(~held, 0), lengths, owned, tokens)

    def attach_compressed(self, row: int, key: bytes) -> int:
        """Start the empty `row` from the compressed prefix `key`: its full pages shared, each head's
        partial last page copied (the row appends there). Returns the tokens it stands for; raises
        OutOfPages, changing nothing, when the copies do not fit."""
        entry = self.compressed[key]
        self.pool.share(entry.owned)
        partial = entry.lengths % self.block_size != 0
        last = (entry.lengths.long() - 1).clamp(min=0) // self.block_size
        pages = entry.pages.clone()
        if bool(partial.any()):
            originals = pages.gather(-1, last[..., None])[..., 0][partial]
            try:
                copies = self.pool.copy(originals)
            except OutOfPages:
                self.pool.release(entry.owned)
                raise
            self.pool.release(originals)
            column = pages.gather(-1, last[..., None])[..., 0]
            column[partial] = copies
            pages.scatter_(-1, last[..., None], column[..., None])
        self.table.attach(row, pages, entry.lengths)
        self.compressed.move_to_end(key)
        return entry.tokens

    def _touch(self, hashes: Sequence[bytes]) -> None:
        for block in reversed(hashes):
            self.blocks.move_to_end(block)

    def pages_evictable(self) -> int:
        """Pages of cached blocks and compressed prefixes that no sequence holds."""
        if not self.blocks and not self.compressed:
            return 0
        return int((self.cached & (self.pool.refs == 1)).sum())

    def evict(self, pages_wanted: int) -> int:
        """Free least recently used blocks, then compressed prefixes, that no sequence holds until
        `pages_wanted` pages are freed or none is left; returns the pages freed."""
        freed = 0
        for entries in (self.blocks, self.compressed):
            for key in list(entries):
                if freed >= pages_wanted:
                    return freed
                entry = entries[key]
                pages = entry.owned if isinstance(entry, CompressedPrefix) else entry.long().flatten()
                if bool((self.pool.refs[pages] == 1).all()):
                    del entries[key]
                    self.cached[pages] = False
                    self.pool.release(pages)
                    freed += pages.numel()
                    self.blocks_evicted += 1
        return freed

    def clear(self) -> int:
        """Free every block no sequence holds; returns the pages freed."""
        return self.evict(self.pool.num_pages)

    def pages(self) -> torch.Tensor:
        """Every page the cache holds (a reference each)."""
        held = [p.long().flatten() for p in self.blocks.values()] + [c.owned for c in self.compressed.values()]
        return torch.cat(held) if held else torch.zeros(0, dtype=torch.long)
