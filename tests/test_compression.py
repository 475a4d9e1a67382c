"""KIVI, ThinK and TailorKV in the engine on the real default model, at 4k tokens: the memory they
really free, read from the pools, and that what they keep still answers."""

from __future__ import annotations

import pytest
import torch

from kvserve.cache.host_tier import HostKey
from kvserve.cache.quantized import QuantKey
from kvserve.cache.thin_key import ThinKey
from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import passkey_correct, passkey_prompt

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(kv_cache_memory=320 << 20, max_num_batched_tokens=1024, max_num_seqs=8))


@pytest.fixture(scope="module")
def long_case(engine):
    case = passkey_prompt(engine.tokenizer, 4000, 0.4, seed=11)
    return case, engine.tokenizer(case.prompt)["input_ids"]


def run_until_decoding(engine: LLMEngine, prompt: list[int], policy: dict, request_id: str) -> list[int]:
    """Add a request and step until its prompt is in the cache and a few tokens are decoded."""
    engine.add_request(request_id, prompt, PARAMS, policy)
    tokens: list[int] = []
    while len(tokens) < 4:
        for out in engine.step():
            tokens += out.token_ids
    return tokens


def finish(engine: LLMEngine, tokens: list[int]) -> tuple[list[int], object]:
    usage = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
            usage = out.kv_usage or usage
    engine.runner.check_invariants(live_rows=[])
    assert engine.runner.pool.pages_available == engine.runner.pool.capacity
    return tokens, usage


def test_kivi_2_holds_a_quarter_of_the_full_cache_at_4k(engine, long_case):
    case, prompt = long_case
    first = run_until_decoding(engine, prompt, {"name": "kivi", "bits": 2, "group_size": 32, "residual": 128}, "kivi")
    seq = engine.seqs["kivi"]
    tier = engine.runner.tiers.tiers[QuantKey(2, 32)]
    quantized = tier.lengths[seq.row]
    # every head quantized all but its residual, in whole groups
    assert bool((quantized % 32 == 0).all()) and int(quantized.min()) >= len(prompt) - 128 - 31
    assert bool((engine.runner.table.lengths[seq.row] < 128 + 32).all())
    tokens, usage = finish(engine, first)
    assert usage.bytes <= 0.25 * usage.full_bytes, usage
    assert passkey_correct(case, engine.tokenizer.decode(tokens))


def test_think_saves_a_quarter_of_the_thinned_tokens_bytes(engine, long_case):
    _, prompt = long_case
    first = run_until_decoding(engine, prompt, {"name": "think", "channel_ratio": 0.5}, "think")
    seq = engine.seqs["think"]
    runner = engine.runner
    tier = runner.tiers.tiers[ThinKey(32)]
    row = torch.tensor([seq.row])
    thinned = int(tier.lengths[seq.row].sum())
    assert thinned >= 90 * (len(prompt) - 32 - 32)
    full_bytes = thinned * 2 * runner.pool.head_dim * runner.pool.k_pages.element_size()
    held_bytes = int(tier.pages_held(row)) * runner.pool.page_bytes
    assert held_bytes <= 0.76 * full_bytes
    # each head kept the same 32 channels for its whole life, sorted
    channels = tier.channels[seq.row]
    assert bool((channels[..., 1:] > channels[..., :-1]).all())
    finish(engine, first)


def test_tailorkv_holds_under_15_percent_on_the_device_at_4k(engine, long_case):
    case, prompt = long_case
    first = run_until_decoding(engine, prompt, {"name": "tailorkv"}, "tailor")
    seq = engine.seqs["tailor"]
    host = engine.runner.tiers.tiers[HostKey()]
    assert host.pool is not engine.runner.pool
    sparse = host.lengths[seq.row].sum((1,)) > 0
    assert bool(sparse.any()), "no layer was offloaded"
    quantized = seq.policy.quantized
    assert torch.equal(sparse, ~quantized)
    tokens, usage = finish(engine, first)
    assert usage.bytes <= 0.15 * usage.full_bytes, usage
    assert host.pool.pages_free == host.pool.capacity
    assert passkey_correct(case, engine.tokenizer.decode(tokens))


@pytest.mark.parametrize("policy", [{"name": "think", "channel_ratio": 0.5, "window": 16},
                                    {"name": "tailorkv", "budget": 96, "recent": 24}])
def test_a_preempted_compressed_request_recomputes_to_the_same_tokens(engine, policy):
    prompt = engine.tokenizer(passkey_prompt(engine.tokenizer, 700, 0.5, seed=3).prompt)["input_ids"]
    alone = finish(engine, run_until_decoding(engine, prompt, policy, "alone"))[0]
    first = run_until_decoding(engine, prompt, policy, "preempted")
    seq = engine.seqs["preempted"]
    engine.scheduler.preempt(seq)
    assert int(sum(t.lengths[seq.row or 0].sum() for t in engine.runner.tiers.tiers.values())) == 0
    tokens, _ = finish(engine, first)
    assert seq.metrics.num_preemptions == 1
    assert tokens == alone


def test_kivi_runs_more_sequences_than_fit_at_full_precision():
    """A pool for 3050 full-cache tokens: two 1480-token prompts fill it, and quantizing them (one
    layer at a time while pages are short) makes room for the third, which is admitted while they decode."""
    token_bytes = 30 * 3 * 2 * 64 * 4
    small = LLMEngine(EngineConfig(kv_cache_memory=3050 * token_bytes, max_num_batched_tokens=1024, max_num_seqs=4))
    prompts = [small.tokenizer(passkey_prompt(small.tokenizer, 1600, 0.5, seed=s).prompt)["input_ids"][:1480]
               for s in range(3)]
    for i, prompt in enumerate(prompts):
        small.add_request(str(i), prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                          {"name": "kivi", "bits": 2})
    most = 0
    while small.has_unfinished():
        small.step()
        most = max(most, len(small.scheduler.running))
    assert most == 3
    assert small.scheduler.num_preemptions == 0
    small.runner.check_invariants(live_rows=[])
