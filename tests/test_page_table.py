"""Property tests of the page pool and the per-head page tables under random operations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.cache.page_pool import OutOfPages, PagePool
from kvserve.cache.page_table import PageTable

LAYERS, HEADS, BLOCK = 2, 3, 4


def new_table(pages: int = 64, rows: int = 4, max_tokens: int = 40) -> PageTable:
    return PageTable(PagePool(pages, BLOCK, 8, torch.float32), rows, LAYERS, HEADS, max_tokens)


operations = st.lists(st.tuples(st.sampled_from(["acquire", "append", "release"]), st.integers(0, 3),
                                st.integers(1, 9)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_operations_keep_every_page_owned_once(ops):
    table = new_table()
    live: dict[int, int] = {}  # row -> tokens per head
    for op, pick, count in ops:
        if op == "acquire" and table.rows_free:
            live[table.acquire_row()] = 0
        elif op == "append" and live:
            row = sorted(live)[pick % len(live)]
            if live[row] + count > 40:
                continue
            free_before = table.pool.pages_free
            try:
                slots = table.append(torch.tensor([row]), torch.tensor([count]))
            except OutOfPages:
                assert table.pool.pages_free == free_before  # a failed append takes nothing
                continue
            live[row] += count
            assert slots.shape == (LAYERS, count, HEADS)
            assert len(set(slots.flatten().tolist())) == slots.numel()  # no slot written twice
        elif op == "release" and live:
            row = sorted(live)[pick % len(live)]
            table.release_row(row)
            del live[row]
        table.check_invariants(live_rows=list(live))
        for row, tokens in live.items():
            assert bool((table.lengths[row] == tokens).all())
    for row in list(live):
        table.release_row(row)
    table.check_invariants(live_rows=[])
    assert table.pool.pages_free == table.pool.capacity


def test_append_slots_land_in_the_heads_own_pages():
    table = new_table()
    rows = torch.tensor([table.acquire_row(), table.acquire_row()])
    table.append(rows, torch.tensor([5, 2]))
    slots = table.append(rows, torch.tensor([1, 7]))  # [L, 8, H]
    for layer in range(LAYERS):
        for head in range(HEADS):
            for token, (row, position) in enumerate([(rows[0], 5)] + [(rows[1], 2 + i) for i in range(7)]):
                page = int(table.tables[row, layer, head, position // BLOCK])
                assert int(slots[layer, token, head]) == page * BLOCK + position % BLOCK


def test_out_of_pages_is_reported_without_side_effects():
    table = new_table(pages=7)  # 6 usable pages, a row needs 6 pages for its first token
    row = torch.tensor([table.acquire_row()])
    table.append(row, torch.tensor([BLOCK]))
    with pytest.raises(OutOfPages):
        table.append(row, torch.tensor([1]))
    assert int(table.lengths[row].max()) == BLOCK
    table.check_invariants()


def test_null_page_is_never_handed_out():
    pool = PagePool(5, BLOCK, 8, torch.float32)
    pages = pool.allocate(4)
    assert sorted(pages.tolist()) == [1, 2, 3, 4]
    with pytest.raises(OutOfPages):
        pool.allocate(1)
