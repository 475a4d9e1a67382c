"""The scheduler's chunking rule, on stand-in sequences: chunks end at multiples of the chunk size,
except that the prompt's last chunk starts early enough to hold the window its policy reads; and its
admission, on a real page table: prefills are staged by the pages their prompts will hold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvserve.cache.page_pool import PagePool
from kvserve.cache.page_table import PageTable
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import Scheduler
from tests.helpers import make_sequence


def chunks(prompt: int, prompt_end_window: int, chunk: int = 100) -> list[int]:
    scheduler = Scheduler(SimpleNamespace(num_layers=1, kv_heads=1), max_num_seqs=4, max_num_batched_tokens=256,
                          prefill_chunk=chunk)
    policy = SimpleNamespace(prompt_end_window=lambda: prompt_end_window)
    seq = SimpleNamespace(num_tokens=prompt, num_computed=0, policy=policy)
    counts = []
    while seq.num_computed < prompt:
        seq.num_uncomputed = prompt - seq.num_computed
        counts.append(scheduler._next_chunk(seq))
        seq.num_computed += counts[-1]
    return counts


@pytest.mark.parametrize(("prompt", "window", "expected"), [
    (250, 0, [100, 100, 50]),
    (201, 0, [100, 100, 1]),
    (250, 32, [100, 100, 50]),  # the last regular chunk already holds the window
    (205, 32, [100, 73, 32]),
    (201, 32, [100, 69, 32]),
    (131, 32, [99, 32]),
    (101, 32, [69, 32]),
    (30, 32, [30]),
    (150, 500, [51, 99]),  # a window past the chunk size: the last chunk is as long as a chunk allows
])
def test_the_prompts_last_chunk_holds_its_policys_window(prompt: int, window: int, expected: list[int]) -> None:
    assert chunks(prompt, window) == expected


def test_chunks_end_at_multiples_of_the_chunk_size_before_the_last() -> None:
    for prompt in range(2, 400, 7):
        for window in (0, 1, 16, 64):
            counts = chunks(prompt, window)
            ends = [sum(counts[:i + 1]) for i in range(len(counts))]
            assert ends[-1] == prompt and all(c >= 1 for c in counts) and max(counts) <= 100
            assert all(end % 100 == 0 for end in ends[:-2])
            assert counts[-1] >= min(window, prompt, 99)


def test_admission_stages_prefills_by_the_pages_their_prompts_will_hold() -> None:
    """Three 400-token prompts, one layer and one head of 16-slot pages, room for 2.5 prompts: the third
    is not admitted while the two before it still prefill, though the pages free at that moment (all
    but their first chunks') would take it; once they are in, it is."""
    pool = PagePool(64, 16, 8, torch.float32)
    table = PageTable(pool, max_rows=4, num_layers=1, kv_heads=1, max_tokens=1024)
    scheduler = Scheduler(table, max_num_seqs=4, max_num_batched_tokens=300, prefill_chunk=100)
    seqs = [make_sequence(list(range(400)), SamplingParams(max_tokens=8, temperature=0)) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)

    def run(batch) -> None:  # what the model runner does with the cache: hold the fed tokens
        for seq, count in zip(batch.seqs, batch.counts):
            table.append(torch.tensor([seq.row]), torch.tensor([count]))
            seq.num_computed += count

    batch = scheduler.schedule()
    assert batch.seqs == seqs[:2] and batch.counts == [100, 100]
    run(batch)
    # 14 pages held, 49 free: the third's 26 pages (408 tokens at most) and 3 of headroom would fit, not
    # beside the 2 x 19 its elders still take
    assert pool.pages_free == pool.capacity - 14
    while seqs[0].num_uncomputed > 1 or seqs[1].num_uncomputed > 1:
        batch = scheduler.schedule()
        assert seqs[2] not in batch.seqs
        run(batch)
    assert pool.pages_free == pool.capacity - 2 * 25
    # the prompts are in: a policy that compressed them now would have freed pages; here the 13 free
    # pages hold the third's first chunk but not its prompt, so it still waits
    batch = scheduler.schedule()
    assert seqs[2] not in batch.seqs
    scheduler.finish(seqs[0])
    assert seqs[2] in scheduler.schedule().seqs
