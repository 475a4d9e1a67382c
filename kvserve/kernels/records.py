"""Addressing of fixed-size byte records in the page pool (the compressed page formats).

The pool's storage viewed as records is `[2 * num_pages, per_half, record_bytes]` uint8: rows
0..N-1 are the pages' K halves, N..2N-1 their V halves. A head's list of pages holds
`2 * per_half` records per page, the first `per_half` in the K half. Record j of a list lives in
page `pages[j // (2 * per_half)]`, and its address (a row of the flattened view) is
`half * per_half + j % per_half` with `half = ((j % (2 * per_half)) // per_half) * N + page`.
"""

from __future__ import annotations

import torch


def record_address(pages: torch.Tensor, index: torch.Tensor, per_half: int, num_pages: int) -> torch.Tensor:
    """pages [..., P] int (a head's page list), index [...] records in it -> addresses [...] int64."""
    per_page = 2 * per_half
    page = pages.gather(-1, (index // per_page).expand(pages.shape[:-1]).unsqueeze(-1))[..., 0].long()
    within = index % per_page
    return ((within // per_half) * num_pages + page) * per_half + within % per_half


def list_addresses(tables: torch.Tensor, records: int, per_half: int, num_pages: int) -> torch.Tensor:
    """Addresses of records 0..records-1 of every list in tables [..., P], [..., records]."""
    index = torch.arange(records, device=tables.device)
    pages = tables[..., : max(1, -(-records // (2 * per_half)))]
    pages = pages.unsqueeze(-2).expand(*pages.shape[:-1], records, pages.shape[-1])
    return record_address(pages, index, per_half, num_pages)


def read_records(view: torch.Tensor, addresses: torch.Tensor) -> torch.Tensor:
    """view [2N, per_half, R] uint8 (PagePool.records); addresses [...] -> [..., R] uint8."""
    per_half = view.shape[1]
    # gather in the widest word that tiles the records: a third of the time of byte by byte
    for wide in (torch.int32, torch.int16):
        size = wide.itemsize
        if view.shape[2] % size == 0 and view.stride(0) % size == 0:
            return view.view(wide)[addresses // per_half, addresses % per_half].view(torch.uint8)
    return view[addresses // per_half, addresses % per_half]


def field(records: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values of `dtype` at byte `start` of every record: [..., R] uint8 -> [..., count]."""
    size = torch.empty((), dtype=dtype).element_size()
    return records[..., start:start + count * size].contiguous().view(dtype)
