"""The page pool: the KV memory of the whole server, in pages of one (layer, KV head) each.

A page holds `block_size` token slots of ONE KV head of ONE layer, keys and values at full
width. Page 0 is a null page that is never handed out: padded page-table entries point at it,
so gathers through a table never read out of bounds. Every other page is either on the free
stack (reference count 0) or held by as many owners as its reference count says: (sequence, layer,
head) lists of a `PageTable`, and the prefix cache. A page held by more than one owner is shared and
read-only: nothing writes into it until all but one owner let go (see kvserve/cache/prefix_cache.py).

K and V of all pages share one buffer (all K halves, then all V halves), so a compressed page
format can view a page's two halves as raw bytes and pack fixed-size records into them
(`records`): a thin-key or quantized page frees the same memory as a full one, from one budget.

Beside K and V every slot carries a little metadata that moves with its token when a policy
compacts a head: the token's position in its sequence and two float32 scores a policy may keep
(accumulated attention, a counter). Paging it like K/V costs 12 bytes per slot (about 2% of a
float32 head_dim-64 slot) and needs no per-sequence buffers sized for the longest context.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import torch

_MADV_HUGEPAGE = 14


class OutOfPages(RuntimeError):
    pass


def host_zeros_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, in 2 MiB pages where the host is Linux with transparent huge pages on `madvise`.

    Attention reads a head's pages wherever they lie in a pool of gigabytes: with 4 KiB OS pages
    nearly every KV page costs a TLB miss, which made CPU decode attention ~1.4x slower in a 2 GB
    pool than in a small one. The advice must come before the memory is first touched."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu" and sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        start = tensor.data_ptr() & ~4095
        length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)  # advice: failure is fine
    return tensor.zero_()


class PagePool:
    def __init__(self, num_pages: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if num_pages < 2:
            raise ValueError("the pool needs at least one usable page besides the null page")
        self.num_pages = num_pages
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.storage = host_zeros_huge((2, num_pages, block_size, head_dim), dtype, torch.device(device))
        self.k_pages, self.v_pages = self.storage[0], self.storage[1]
        self.slot_positions = torch.zeros(num_pages * block_size, dtype=torch.int32, device=device)
        self.slot_scores = torch.zeros(num_pages * block_size, dtype=torch.float32, device=device)
        self.slot_aux = torch.zeros(num_pages * block_size, dtype=torch.float32, device=device)
        # a stack of free page ids: the top `pages_free` entries of `_free` are free
        self._free = torch.arange(num_pages - 1, 0, -1, dtype=torch.int32)
        self.pages_free = num_pages - 1
        self.refs = torch.zeros(num_pages, dtype=torch.int32)  # owners of each page (0: free)
        # a cache whose pages no running sequence reads gives them back on demand: how many it
        # would (`evictable`), and the call that frees at least that many pages (`reclaim`)
        self.evictable: Callable[[], int] = lambda: 0
        self.reclaim: Callable[[int], None] = lambda count: None

    @property
    def capacity(self) -> int:
        """Pages that can be handed out (the null page excluded)."""
        return self.num_pages - 1

    @property
    def pages_used(self) -> int:
        return self.capacity - self.pages_free

    @property
    def pages_available(self) -> int:
        """Pages `allocate` can hand out: the free ones and those a cache would give back."""
        return self.pages_free + self.evictable()

    @property
    def slot_stores(self) -> tuple[torch.Tensor, ...]:
        """Everything kept per slot, each viewed as [num_pages * block_size, ...]."""
        return (self.k_pages.view(-1, self.head_dim), self.v_pages.view(-1, self.head_dim),
                self.slot_positions, self.slot_scores, self.slot_aux)

    @property
    def page_bytes(self) -> int:
        return 2 * self.block_size * self.head_dim * self.k_pages.element_size()

    @property
    def half_bytes(self) -> int:
        """Bytes of one page's K (or V) half."""
        return self.page_bytes // 2

    def records(self, record_bytes: int) -> tuple[torch.Tensor, int]:
        """The pool as fixed-size byte records: a view [2 * num_pages, per_half, record_bytes] uint8
        (halves 0..N-1 are the pages' K halves, N..2N-1 their V halves) and `per_half`, the records
        one half holds. Record j of page p is `view[(j // per_half) * N + p, j % per_half]`."""
        per_half = self.half_bytes // record_bytes
        if per_half < 1:
            raise ValueError(f"a {record_bytes}-byte record does not fit in a {self.half_bytes}-byte half page")
        raw = self.storage.view(-1).view(torch.uint8)
        view = raw.as_strided((2 * self.num_pages, per_half, record_bytes), (self.half_bytes, record_bytes, 1))
        return view, per_half

    @staticmethod
    def pages_for_memory(memory_bytes: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        page_bytes = 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()
        return memory_bytes // page_bytes

    def allocate(self, count: int) -> torch.Tensor:
        """Pop `count` free page ids (int32); raises OutOfPages without taking any when short.

        The top of the stack is handed out bottom-up: from a fresh pool (or a freed run) a head's
        pages come out as ascending ids, adjacent in memory, which the CPU's prefetcher follows:
        decode attention read them 1.18x faster than the same pages in descending order. Short of free
        pages, a cache gives back what it can first."""
        if count > self.pages_free:
            self.reclaim(count - self.pages_free)
        if count > self.pages_free:
            raise OutOfPages(f"asked for {count} pages, {self.pages_free} free")
        self.pages_free -= count
        pages = self._free[self.pages_free:self.pages_free + count].flip(0)
        self.refs[pages.long()] = 1
        return pages

    def share(self, pages: torch.Tensor) -> None:
        """One more owner for each of `pages` (each held already)."""
        self.refs.index_add_(0, pages.long().flatten(), torch.ones(pages.numel(), dtype=torch.int32))

    def release(self, pages: torch.Tensor) -> None:
        """One owner fewer for each of `pages`; those left with none go back on the free stack."""
        if pages.numel() == 0:
            return
        pages = pages.long().flatten()
        shared = bool((self.refs[pages] > 1).any())
        self.refs.index_add_(0, pages, torch.full((pages.numel(),), -1, dtype=torch.int32))
        freed = pages[self.refs[pages] == 0]
        if shared:
            freed = freed.unique()  # a shared page listed by two of its owners at once is freed once
        count = freed.numel()
        # pushed in reverse, so that allocating the same count again gives the pages back in order
        self._free[self.pages_free:self.pages_free + count] = freed.to(torch.int32).flip(0)
        self.pages_free += count

    def copy(self, pages: torch.Tensor) -> torch.Tensor:
        """Private copies of `pages` (K, V and slot metadata), newly allocated, in the same shape."""
        flat = pages.long().flatten()
        fresh = self.allocate(flat.numel()).long()
        self.storage[:, fresh] = self.storage[:, flat]
        src = (flat[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        dst = (fresh[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        for store in (self.slot_positions, self.slot_scores, self.slot_aux):
            store[dst] = store[src]
        return fresh.to(torch.int32).view(pages.shape)

    def free_ids(self) -> torch.Tensor:
        return self._free[:self.pages_free]
