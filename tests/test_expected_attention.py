"""Expected Attention: RoPE undone and averaged, the running query statistics, the score against a
float64 restatement of kvpress's `score`, the budget with its protected sinks and tail, the decode
approximation, and one run on the real engine."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import passkey_prompt
from kvserve.kernels.pointwise import rope_ref_
from kvserve.policies.base import PolicyStep
from kvserve.policies.expected_attention import (
    ExpectedAttentionPolicy,
    average_rotation,
    rotate,
    rotate_covariance,
    unrotate,
)
from kvserve.policies.registry import PolicyError, create_policy, parse_policy

EPS32 = torch.finfo(torch.float32).eps


def inv_freq_for(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated as the model does (float32 angles, kernels/pointwise.py's `rope_ref_`)."""
    angles = torch.outer(positions.float(), inv_freq)
    flat = x.reshape(x.shape[0], -1).clone()
    rope_ref_(flat, angles.cos(), angles.sin(), x.shape[1])
    return flat.view(x.shape)


def kvpress_rotation(start: int, count: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """kvpress's `apply_avg_rope` matrix, float64: mean over positions of cos I + sin P, with HF's
    cos/sin (each channel pair's angle repeated in both halves)."""
    dim = 2 * inv_freq.numel()
    angles = torch.arange(start, start + count, dtype=torch.float64)[:, None] * inv_freq.double()
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    eye = torch.eye(dim, dtype=torch.float64)
    p = torch.zeros(dim, dim, dtype=torch.float64)
    p[dim // 2:, :dim // 2], p[:dim // 2, dim // 2:] = torch.eye(dim // 2), -torch.eye(dim // 2)
    return (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * p).mean(0)


def make_step(spec: dict, keys: torch.Tensor, values: torch.Tensor, *, new_tokens: int, prompt_tokens: int,
              prompt_done: bool, group_size: int = 1, inv_freq: torch.Tensor | None = None, queries=None,
              query_count: int = 0, policy: ExpectedAttentionPolicy | None = None, scores=None) -> PolicyStep:
    """One sequence; keys and values [L, Hkv, S, D] held at positions 0..S-1 (the newest S - 1)."""
    layers, kv_heads, slots, dim = keys.shape
    policy = policy or create_policy(parse_policy(spec), prompt_tokens)
    shape = (1, layers, kv_heads, slots)
    return PolicyStep(
        policies=[policy], lengths=torch.full(shape[:3], slots), new_tokens=torch.tensor([new_tokens]),
        decoding=torch.tensor([new_tokens == 1]), prompt_done=torch.tensor([prompt_done]),
        newest_position=torch.tensor([slots - 1]), held=torch.ones(shape, dtype=torch.bool),
        positions=torch.arange(slots).expand(shape).clone(),
        scores=torch.zeros(shape) if scores is None else scores.clone(), aux=torch.zeros(shape), key_norms=None,
        decode_sum=None, decode_max=None, window=None, queries=queries, group_size=group_size,
        slot=torch.arange(keys[..., 0].numel()).view(shape), key_store=keys.reshape(-1, dim).float(),
        query_count=torch.tensor([query_count]), attention_scale=1 / math.sqrt(dim),
        value_store=values.reshape(-1, dim).float(),
        rope_inv_freq=inv_freq if inv_freq is not None else inv_freq_for(dim))


def set_statistics(policy: ExpectedAttentionPolicy, mean: torch.Tensor, cov: torch.Tensor, count: int = 10) -> None:
    """mean [L, Hq, D], cov [L, Hq, D, D] as if `count` queries had been observed."""
    policy.stats.count, policy.stats.mean, policy.stats.m2 = count, mean.double(), cov.double() * count


def test_unrotate_recovers_the_queries_the_model_rotated():
    torch.manual_seed(0)
    dim = 64
    inv_freq = inv_freq_for(dim)
    positions = torch.tensor([0, 1, 17, 300, 4095, 31000])
    queries = torch.randn(len(positions), 3, dim) * 4
    rotated = rope(queries, positions, inv_freq)
    assert not torch.allclose(rotated[1:], queries[1:])
    back = unrotate(rotated, positions[:, None], inv_freq)
    # each channel goes through two 2-term rotations with float32 cos/sin: a few ulps of the pair's size
    bound = 8 * EPS32 * float(queries.abs().max())
    assert float((back - queries).abs().max()) <= bound


def test_average_rotation_is_the_mean_of_cos_and_sin_over_the_future_positions():
    # one channel pair, inv_freq 0.5, positions 3..6: angles 1.5, 2, 2.5, 3
    cos, sin = average_rotation(torch.tensor(3), 4, torch.tensor([0.5]))
    angles = [1.5, 2.0, 2.5, 3.0]
    assert float(cos[0]) == pytest.approx(sum(math.cos(a) for a in angles) / 4, abs=1e-15)
    assert float(sin[0]) == pytest.approx(sum(math.sin(a) for a in angles) / 4, abs=1e-15)
    # and for D = 8, R-bar mu and R-bar Sigma R-bar^T are kvpress's matrix products
    torch.manual_seed(1)
    inv_freq = inv_freq_for(8, theta=100.0)
    cos, sin = average_rotation(torch.tensor(40), 32, inv_freq)
    matrix = kvpress_rotation(40, 32, inv_freq)
    mean = torch.randn(8, dtype=torch.float64)
    root = torch.randn(8, 8, dtype=torch.float64)
    cov = root @ root.T
    assert torch.allclose(rotate(mean, cos, sin), matrix @ mean, atol=1e-12)
    assert torch.allclose(rotate_covariance(cov, cos, sin), matrix @ cov @ matrix.T, atol=1e-12)


def reference_scores(keys, values, mean, cov, start, n_future, inv_freq, n_sink, epsilon, group):
    """kvpress's `score` restated in float64 for one layer: keys, values [Hkv, S, D], mean [Hq, D],
    cov [Hq, D, D]; the future positions start at `start`. Returns the non-sink scores [Hkv, S - n_sink]
    and the log-sum-exp per query head [Hq]."""
    keys, values = keys.double()[:, n_sink:], values.double()[:, n_sink:]
    dim = keys.shape[-1]
    rot = kvpress_rotation(start, n_future, inv_freq)
    mu = mean.double() @ rot.T
    sigma = rot @ cov.double() @ rot.T
    k = keys.repeat_interleave(group, dim=0)  # repeat_kv: query head h reads KV head h // group
    logits = torch.einsum("hd,hsd->hs", mu, k) / math.sqrt(dim) + torch.einsum("hsi,hij,hsj->hs", k, sigma, k) / dim / 2
    probs = logits.softmax(-1).view(keys.shape[0], group, -1).mean(1)
    return (probs + epsilon) * values.norm(dim=-1), logits.logsumexp(-1)


def test_score_matches_a_float64_restatement_of_kvpress_and_decode_scores_the_new_key_alike():
    torch.manual_seed(2)
    dim, group, n_sink, slots = 4, 2, 1, 5
    spec = {"name": "expected_attention", "budget": 4, "recent": 0, "n_sink": n_sink, "n_future_positions": 6,
            "epsilon": 0.01, "decode": True}
    inv_freq = torch.tensor([0.3, 0.02])
    keys, values = torch.randn(1, 1, slots, dim), torch.randn(1, 1, slots, dim)
    mean = torch.randn(1, group, dim)
    root = torch.randn(1, group, dim, dim) * 0.7
    cov = root @ root.mT  # the covariance term matters: of the order of the mean term
    # the prompt's last chunk: every slot scored (the budget of 4 evicts the lowest non-sink one)
    step = make_step(spec, keys, values, new_tokens=slots, prompt_tokens=slots, prompt_done=True,
                     group_size=group, inv_freq=inv_freq)
    policy = step.policies[0]
    set_statistics(policy, mean, cov)
    keep = ExpectedAttentionPolicy.act(step)
    expected, lse = reference_scores(keys[0], values[0], mean[0], cov[0], slots, 6, inv_freq, n_sink, 0.01, group)
    scores = step.scores[0, 0, 0]
    assert scores[0] == float("inf")  # the sink
    # float32 scoring against float64: a few ulps through exp and the dot products of size-1 values
    assert torch.allclose(scores[n_sink:].double(), expected[0], rtol=1e-5, atol=1e-7)
    lowest = n_sink + int(expected[0].argmin())
    assert keep[0, 0, 0].tolist() == [i != lowest for i in range(slots)]
    assert torch.allclose(policy.stats.lse.double().flatten(), lse, rtol=1e-5)
    assert policy.stats.mean is None  # the prompt is in: the running statistics are freed

    # a decode step appends key 5: scored alone, against the stored statistics and log-sum-exp
    new_key, new_value = torch.randn(1, 1, 1, dim), torch.randn(1, 1, 1, dim)
    survivors = [i for i in range(slots) if i != lowest]
    keys2 = torch.cat((keys[:, :, survivors], new_key), 2)
    values2 = torch.cat((values[:, :, survivors], new_value), 2)
    step2 = make_step(spec, keys2, values2, new_tokens=1, prompt_tokens=slots, prompt_done=True, group_size=group,
                      inv_freq=inv_freq, policy=policy, scores=torch.cat((step.scores[..., survivors],
                                                                          torch.zeros(1, 1, 1, 1)), -1))
    step2.positions = torch.tensor(survivors + [slots]).view(1, 1, 1, -1)
    step2.newest_position = torch.tensor([slots])
    keep2 = ExpectedAttentionPolicy.act(step2)
    rot = kvpress_rotation(slots, 6, inv_freq)
    k = new_key[0, 0, 0].double()
    mu, sigma = mean[0].double() @ rot.T, rot @ cov[0].double() @ rot.T
    logit = mu @ k / math.sqrt(dim) + torch.einsum("i,hij,j->h", k, sigma, k) / dim / 2
    new_score = ((logit - lse).exp().mean() + 0.01) * new_value.double().norm()
    assert float(step2.scores[0, 0, 0, -1]) == pytest.approx(float(new_score), rel=1e-5)
    # the older slots keep their scores; one in, one out: the lowest unprotected of the five goes
    assert torch.equal(step2.scores[0, 0, 0, :-1], step.scores[0, 0, 0, survivors])
    candidates = step2.scores[0, 0, 0].clone()
    candidates[0] = float("inf")  # the sink; recent 0 protects nothing else
    assert keep2[0, 0, 0].tolist() == [i != int(candidates.argmin()) for i in range(5)]


def test_running_statistics_over_two_chunks_equal_those_of_all_the_queries_at_once():
    torch.manual_seed(3)
    dim, heads, layers = 8, 2, 2
    inv_freq = inv_freq_for(dim, theta=50.0)
    spec = {"name": "expected_attention", "budget": 64, "n_sink": 2}
    plain = torch.randn(11, layers, heads, dim, dtype=torch.float64) * 2 + torch.randn(dim, dtype=torch.float64)
    observed = torch.stack([rope(plain[:, layer].float(), torch.arange(11), inv_freq) for layer in range(layers)], 1)
    policy = create_policy(parse_policy(spec), 10)  # a 10-token prompt; position 10 is recomputed output
    keys = torch.randn(layers, 1, 11, dim)
    # chunk 1: positions 0..5, all observed (W 6); chunk 2: positions 6..10, right-aligned in W 6
    first = observed[:6].transpose(0, 1)[None]
    second = torch.cat((torch.zeros(1, layers, heads, dim), observed[6:])).transpose(0, 1)[None]
    for chunk, end, count in ((first, 6, 6), (second, 11, 5)):
        step = make_step(spec, keys[:, :, :end], keys[:, :, :end], new_tokens=count, prompt_tokens=10,
                         prompt_done=False, group_size=heads, inv_freq=inv_freq, queries=chunk, query_count=count,
                         policy=policy)
        assert ExpectedAttentionPolicy.act(step) is None  # within the budget
    # the statistics are those of positions 2..9: not the sinks, not past the prompt
    queries = plain[2:10]  # [8, L, Hq, D]
    centred = queries - queries.mean(0)
    cov = torch.einsum("tlhi,tlhj->lhij", centred, centred) / len(queries)
    stats = policy.stats
    assert stats.count == 8
    size = float(queries.abs().max())
    # float32 queries through a rotation and back: ~1e-6 of their size; the moments inherit it
    assert torch.allclose(stats.mean, queries.mean(0), atol=1e-5 * size)
    assert torch.allclose(stats.m2 / stats.count, cov, atol=1e-5 * size * size)


def test_sinks_and_the_prompts_tail_are_kept_and_a_prefill_chunk_is_cut_to_the_budget():
    dim, slots = 2, 20
    spec = {"name": "expected_attention", "budget": 8, "recent": 2, "n_sink": 2, "use_covariance": False,
            "use_vnorm": False}
    # keys along x with these sizes: the query mean is +x, so the score rises with the size
    sizes = [-5.0, -4.0, 1.0, 9.0, 2.0, 8.0, 0.0, 3.0, 7.0, 6.0, 0.5, 1.5, 2.5, 4.0, 5.0, 0.2, 0.1, 0.3, -3.0, -2.0]
    keys = torch.tensor([[s, 0.0] for s in sizes]).view(1, 1, slots, dim)
    step = make_step(spec, keys, torch.ones(1, 1, slots, dim), new_tokens=slots, prompt_tokens=slots,
                     prompt_done=True, inv_freq=torch.tensor([1e-6]))  # R-bar ~ the identity
    set_statistics(step.policies[0], torch.tensor([[[1.0, 0.0]]]), torch.zeros(1, 1, 2, 2))
    keep = ExpectedAttentionPolicy.act(step)
    # sinks 0, 1 and the tail 18, 19 (lowest scores all) kept; the four largest others: 3, 5, 8, 9
    assert torch.nonzero(keep[0, 0, 0])[:, 0].tolist() == [0, 1, 3, 5, 8, 9, 18, 19]
    assert step.policies[0].budget() == 8 and step.policies[0].recent() == 2
    # the bound of a 1000-token prompt: the prefill peak or the output appended, whichever is more
    policy = create_policy(parse_policy(spec), 1000)
    assert policy.tokens_bound(50, 64) == 8 + 64 and policy.tokens_bound(100, 64) == 8 + 100
    assert create_policy(parse_policy({**spec, "decode": True}), 1000).tokens_bound(100, 64) == 8 + 64
    # without `decode`, a decode step evicts nothing
    decode = make_step(spec, keys, torch.ones(1, 1, slots, dim), new_tokens=1, prompt_tokens=10, prompt_done=True)
    assert ExpectedAttentionPolicy.act(decode) is None


def test_parameters_are_validated():
    params = parse_policy({"name": "expected_attention", "ratio": 0.25})
    assert (params.n_future_positions, params.n_sink, params.use_covariance, params.use_vnorm, params.epsilon,
            params.decode) == (512, 4, True, True, 0.0, False)
    with pytest.raises(PolicyError, match="n_future_positions"):
        parse_policy({"name": "expected_attention", "n_future_positions": 0})
    # a budget too small for the sinks still leaves room for one more token
    assert create_policy(parse_policy({"name": "expected_attention", "budget": 2}), 100).budget() == 5


def test_on_the_engine_prefill_chunks_are_cut_to_a_quarter_and_the_pages_come_back():
    engine = LLMEngine(EngineConfig(kv_cache_memory=128 << 20, max_num_batched_tokens=256, max_num_seqs=4))
    tok = engine.tokenizer
    prompt = tok(passkey_prompt(tok, 600, 0.5, seed=4).prompt)["input_ids"]
    assert 550 <= len(prompt) <= 650
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    specs = {"plain": {"name": "expected_attention", "ratio": 0.25},
             "decode": {"name": "expected_attention", "ratio": 0.25, "decode": True}}
    for rid, spec in specs.items():  # one batch: both rows go through one `act`
        engine.add_request(rid, prompt, params, spec)
    seqs = dict(engine.seqs)
    budget = math.ceil(0.25 * len(prompt))
    assert all(s.policy.budget() == budget for s in seqs.values())
    table, block = engine.runner.table, engine.runner.table.block_size
    usage, tokens, prefill_checks = {}, {rid: [] for rid in specs}, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                usage[out.request_id] = out.kv_usage
        for rid, seq in seqs.items():
            if seq.row is None:
                continue
            lengths = table.lengths[seq.row].long()
            generated = max(0, seq.num_computed - len(prompt))
            # after each chunk every head is cut back to the budget (its peak: budget + the chunk);
            # then the output is appended, or (decode) one in, one out
            expected = min(seq.num_computed, budget) + (generated if rid == "plain" else 0)
            assert bool((lengths == expected).all()), (rid, seq.num_computed, lengths.min(), lengths.max())
            prefill_checks += generated == 0
    assert prefill_checks >= 2 * 3  # three 256-token chunks each
    assert all(len(t) == 16 for t in tokens.values())
    assert engine.runner.pool.pages_available == engine.runner.pool.capacity
    heads = engine.model_config.num_layers * engine.model_config.num_kv_heads
    page_bytes = engine.runner.pool.page_bytes
    for rid, kept in (("plain", budget + 15), ("decode", budget)):  # 15 of the 16 tokens were appended
        u = usage[rid]
        assert u.policy == "expected_attention"
        assert u.full_bytes == heads * math.ceil((len(prompt) + 15) / block) * page_bytes
        assert u.bytes == heads * math.ceil(kept / block) * page_bytes
        # a quarter of the prompt, the sinks and recent tokens inside it, plus (plain) the 15 generated
        # tokens and page rounding: 0.25 to 0.25 + (15 + 16) / 615 ~ 0.30
        assert 0.24 <= u.bytes / u.full_bytes <= 0.30, (rid, u.bytes / u.full_bytes)
