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


def test_a_heads_pages_are_adjacent_and_ascending_from_a_fresh_pool():
    # the CPU's prefetcher follows a head's pages when they lie one after another in memory
    table = new_table(pages=200, rows=2)
    row = torch.tensor([table.acquire_row()])
    table.append(row, torch.tensor([3 * BLOCK]))
    lists = table.tables[row[0], :, :, :3].reshape(-1, 3).long()
    assert torch.equal(lists[:, 1:] - lists[:, :-1], torch.ones(lists.shape[0], 2, dtype=torch.long))
    table.release_row(int(row[0]))
    row = torch.tensor([table.acquire_row()])
    table.append(row, torch.tensor([3 * BLOCK]))
    assert torch.equal(table.tables[row[0], :, :, :3].reshape(-1, 3).long(), lists)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=3), st.integers(0, 2**31))
def test_evict_keeps_exactly_the_kept_tokens_and_frees_pages(lengths, seed):
    table = new_table(pages=200, rows=4)
    pool = table.pool
    rows = torch.tensor([table.acquire_row() for _ in lengths])
    slots = table.append(rows, torch.tensor(lengths))
    # tag every stored key with a unique value: (token index + 1) in channel 0
    tags = torch.arange(1, slots.numel() + 1, dtype=torch.float32).view(slots.shape)
    pool.k_pages.view(-1, 8)[slots.flatten(), 0] = tags.flatten()
    longest = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(len(lengths), LAYERS, HEADS, longest, generator=gen) < 0.5
    held = torch.arange(longest) < torch.tensor(lengths)[:, None, None, None]
    keep &= held
    expected = [[[sorted(tags[layer, sum(lengths[:i]) + j, head].item() for j in range(lengths[i])
                         if keep[i, layer, head, j]) for head in range(HEADS)] for layer in range(LAYERS)]
                for i in range(len(lengths))]
    state = torch.arange(keep.numel()).view(keep.shape)
    src, dst = table.evict(rows, keep)
    state.view(-1)[dst] = state.view(-1)[src]
    table.check_invariants(live_rows=rows.tolist())
    for i, row in enumerate(rows.tolist()):
        for layer in range(LAYERS):
            for head in range(HEADS):
                n = int(table.lengths[row, layer, head])
                pages = table.tables[row, layer, head]
                got = [pool.k_pages[int(pages[s // BLOCK]), s % BLOCK, 0].item() for s in range(n)]
                assert sorted(got) == expected[i][layer][head]
                # per-slot state followed its token: slot s now holds what was at state index s' with that tag
                moved = state[i, layer, head, :n] % longest
                assert sorted(moved.tolist()) == [j for j in range(lengths[i]) if keep[i, layer, head, j]]
    for row in rows.tolist():
        table.release_row(row)
    assert pool.pages_free == pool.capacity
