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
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvserve.cache.page_pool import OutOfPages
from kvserve.cache.page_table import PageTable


class PrefixCache:
    def __init__(self, table: PageTable, salt: str) -> None:
        self.table = table
        self.pool = pool = table.pool
        self.block_size = table.block_size
        self._root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        # block hash -> its pages [L, Hkv] (int32), least recently used first
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.cached = torch.zeros(pool.num_pages, dtype=torch.bool)  # pages some block holds
        self.blocks_evicted = 0
        pool.evictable = self.pages_evictable
        pool.reclaim = self.evict

    def extend_hashes(self, hashes: list[bytes], tokens: Sequence[int]) -> list[bytes]:
        """Extend `hashes` (those of the first len(hashes) blocks of `tokens`) to every full block of
        `tokens`, in place; returns it."""
        bs = self.block_size
        parent = hashes[-1] if hashes else self._root
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

    def pinned(self, hashes: Sequence[bytes]) -> int:
        """Evictable pages among the cached blocks `hashes`: what attaching them takes out of reach."""
        if not hashes:
            return 0
        pages = torch.stack([self.blocks[h] for h in hashes]).long()
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
        self.table.attach(row, pages)
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

    def _touch(self, hashes: Sequence[bytes]) -> None:
        for block in reversed(hashes):
            self.blocks.move_to_end(block)

    def pages_evictable(self) -> int:
        """Pages of cached blocks that no sequence holds."""
        if not self.blocks:
            return 0
        return int((self.cached & (self.pool.refs == 1)).sum())

    def evict(self, pages_wanted: int) -> int:
        """Free least recently used blocks that no sequence holds until `pages_wanted` pages are freed
        or none is left; returns the pages freed."""
        freed = 0
        for block in list(self.blocks):
            if freed >= pages_wanted:
                break
            pages = self.blocks[block].long()
            if bool((self.pool.refs[pages] == 1).all()):
                del self.blocks[block]
                self.cached[pages.flatten()] = False
                self.pool.release(pages)
                freed += pages.numel()
                self.blocks_evicted += 1
        return freed

    def clear(self) -> int:
        """Free every block no sequence holds; returns the pages freed."""
        return self.evict(self.pool.num_pages)

    def pages(self) -> torch.Tensor:
        """Every page the cache holds (a reference each)."""
        if not self.blocks:
            return torch.zeros(0, dtype=torch.long)
        return torch.stack(list(self.blocks.values())).long().flatten()
