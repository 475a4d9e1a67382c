"""The project's forward pass against transformers' on tiny random-weight models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import feed, make_sequence, runner_for, save_tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, reference


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("length", [1, 7, 33, 130])
def test_prefill_matches_transformers(tiny, length):
    folder, reference = tiny
    ids = torch.randint(0, 320, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    runner = runner_for(folder, kv_cache_memory=4 << 20, block_size=8)
    seq = make_sequence(ids)
    ours = feed(runner, [seq], [length])
    expected = reference_logits(reference, ids)[-1]
    assert (ours[0] - expected).abs().max().item() < 1e-4


def test_chunked_prefill_and_decode_match_transformers(tiny):
    folder, reference = tiny
    ids = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(7)).tolist()
    expected = reference_logits(reference, ids)
    runner = runner_for(folder, kv_cache_memory=4 << 20, block_size=8)
    seq = make_sequence(ids)
    seq.row = runner.table.acquire_row()
    # uneven chunks, then the rest one token at a time: logits after each feed
    position = 0
    for count in [5, 17, 1, 30] + [1] * 37:
        seq_tokens = seq.prompt_token_ids[: position + count]
        seq_view = make_sequence(seq_tokens)
        seq_view.row, seq_view.num_computed = seq.row, position
        logits = feed(runner, [seq_view], [count])
        position += count
        assert (logits[0] - expected[position - 1]).abs().max().item() < 1e-4, f"after {position} tokens"
    assert position == len(ids)


def test_mixed_batch_matches_each_alone(tiny):
    """Decode tokens and prefill chunks of different sequences in one flat batch."""
    folder, reference = tiny
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (40, 3, 75)]
    runner = runner_for(folder, kv_cache_memory=4 << 20, block_size=8)
    seqs = [make_sequence(p) for p in prompts]
    feed(runner, seqs[:1], [39])  # first sequence has all but one token cached: it decodes next
    logits = feed(runner, seqs, [1, 3, 75])
    for row, prompt in enumerate(prompts):
        assert (logits[row] - reference_logits(reference, prompt)[-1]).abs().max().item() < 1e-4


def test_bfloat16_tracks_float32(tiny):
    folder, _ = tiny
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = runner_for(folder, kv_cache_memory=4 << 20, block_size=8, dtype=dtype)
        assert runner.pool.k_pages.dtype == runner.model.dtype
        logits[dtype] = feed(runner, [make_sequence(ids)], [50])[0]
    reference = logits["float32"]
    assert (logits["bfloat16"] - reference).abs().max().item() < 0.05 * reference.abs().max().item()
