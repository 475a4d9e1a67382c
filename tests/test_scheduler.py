"""The scheduler's chunking rule, on stand-in sequences: chunks end at multiples of the chunk size,
except that the prompt's last chunk starts early enough to hold the window its policy reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvserve.engine.scheduler import Scheduler


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
