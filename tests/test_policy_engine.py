"""Policies inside the engine on the real default model: batch invariance across policies, memory
really returned to the pool, and usage accounting."""

from __future__ import annotations

import pytest
import torch

from kvserve.engine.config import EngineConfig
from kvserve.engine.errors import InvalidRequest
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import passkey_prompt
from kvserve.eval.teacher_forcing import teacher_force
from tests.helpers import needs_native_bf16

POLICY_SPECS = [
    {"name": "full"},
    {"name": "h2o", "budget": 96, "recent": 16},
    {"name": "corm", "window": 4, "recent": 16},
    {"name": "snapkv", "budget": 96, "window": 16},
    {"name": "streaming_llm", "budget": 96},
    {"name": "knorm", "budget": 96},
    {"name": "tova", "budget": 96},
    {"name": "kivi", "bits": 2, "residual": 64},
    {"name": "think", "channel_ratio": 0.5, "window": 16, "base": {"name": "snapkv", "budget": 96, "window": 16}},
    {"name": "tailorkv", "budget": 96, "recent": 24, "quant_layers": [0, 5]},
]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(kv_cache_memory=128 << 20, max_num_batched_tokens=256, max_num_seqs=16))


def run(engine: LLMEngine, prompts: list[list[int]], specs: list[dict]) -> dict[str, tuple[list[int], object]]:
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        engine.add_request(f"r{i}", prompt, PARAMS, spec)
    results: dict[str, tuple[list[int], object]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + out.token_ids, out.kv_usage)
    engine.runner.check_invariants(live_rows=[])
    assert engine.runner.pool.pages_available == engine.runner.pool.capacity
    assert not any(engine.stats().bytes_held.values()), "bytes held reported after every request ended"
    return results


def test_each_policy_gives_the_same_tokens_alone_and_in_a_mixed_batch(engine):
    tok = engine.tokenizer
    cases = [passkey_prompt(tok, 300 + 40 * i, 0.5, seed=i) for i in range(len(POLICY_SPECS))]
    prompts = [tok(case.prompt)["input_ids"] for case in cases]
    alone = [run(engine, [p], [s])["r0"] for p, s in zip(prompts, POLICY_SPECS)]
    together = run(engine, prompts, POLICY_SPECS)
    for i, spec in enumerate(POLICY_SPECS):
        assert together[f"r{i}"][0] == alone[i][0], spec["name"]
        usage = together[f"r{i}"][1]
        assert usage.policy == spec["name"]
        if spec["name"] in ("h2o", "snapkv", "streaming_llm", "knorm", "tova"):
            # 96 tokens in 16-token pages, 30 layers x 3 heads, plus at most one page per head of new tokens
            assert usage.bytes <= 90 * 7 * engine.runner.pool.page_bytes < usage.full_bytes
        elif spec["name"] in ("kivi", "think", "tailorkv"):
            assert usage.bytes < 0.5 * usage.full_bytes
        else:
            assert usage.bytes <= usage.full_bytes


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_native_bf16)])
def test_h2o_quarter_ratio_holds_under_30_percent_of_the_full_pages(dtype):
    engine = LLMEngine(EngineConfig(kv_cache_memory=512 << 20, max_num_batched_tokens=2048, max_num_seqs=8,
                                    dtype=dtype))
    tok = engine.tokenizer
    prompts = [tok(passkey_prompt(tok, 3000, 0.5, seed=i).prompt)["input_ids"] for i in range(8)]
    assert all(len(p) >= 2900 for p in prompts)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"m{i}", prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
                           {"name": "h2o", "ratio": 0.25})
    pool = engine.runner.pool
    full_pages = sum(engine.scheduler.pages_for_tokens(len(p)) for p in prompts)
    peak_in_use = 0
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        if len(running) == 8 and all(s.output_token_ids for s in running):
            peak_in_use = max(peak_in_use, pool.pages_used - pool.evictable())  # the prefix cache's copies aside
    assert 0 < peak_in_use <= 0.30 * full_pages, (peak_in_use, full_pages)
    assert engine.policies.tokens_evicted["h2o"] > 0
    assert pool.pages_available == pool.capacity


def test_teacher_forcing_reproduces_greedy_and_measures_compression(engine):
    ids = engine.tokenizer(passkey_prompt(engine.tokenizer, 400, 0.3, seed=5).prompt)["input_ids"]
    greedy = engine.generate([ids], PARAMS)[0]
    full = teacher_force(engine, ids, greedy)
    assert full.shape == (len(greedy), engine.model_config.vocab_size)
    assert full.argmax(-1).tolist() == greedy
    assert torch.allclose(full.exp().sum(-1), torch.ones(len(greedy)), atol=1e-4)
    squeezed = teacher_force(engine, ids, greedy, {"name": "streaming_llm", "budget": 16, "sinks": 4})
    kl = (full.exp() * (full - squeezed)).sum(-1)
    assert float(kl.mean()) > 1e-3  # a 16-token cache changes the distributions


BUDGETED = [{"name": name, "ratio": 0.25} for name in ("h2o", "snapkv", "streaming_llm", "knorm", "tova", "keydiff")]
BUDGETED += [{"name": "knorm", "budget": 40, "recent": 8}, {"name": "keydiff", "ratio": 0.25, "decode": True},
             {"name": "expected_attention", "ratio": 0.25, "decode": True},
             {"name": "tova", "ratio": 0.25, "chunked": True},
             {"name": "h2o", "ratio": 0.25, "window": 16, "kernel": 5}]


def test_every_budgeted_policy_keeps_the_prompts_tail_and_the_newest_tokens_in_every_head(engine):
    """After every step, each head of each sequence still holds the prompt's last `prompt_tail()` tokens
    and the newest `recent()` ones, while the budget evicts the rest; checked on the slots' positions
    as the pool records them."""
    tok = engine.tokenizer
    prompts = [tok(passkey_prompt(tok, 240 + 24 * i, 0.5, seed=i).prompt)["input_ids"] for i in range(len(BUDGETED))]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i, (prompt, spec) in enumerate(zip(prompts, BUDGETED)):
        engine.add_request(f"p{i}", prompt, params, spec)

    def needed(seq) -> set[int]:
        prompt_end = min(len(seq.prompt_token_ids), seq.num_computed)
        tail = set(range(max(0, len(seq.prompt_token_ids) - seq.policy.prompt_tail()), prompt_end))
        return tail | set(range(max(0, seq.num_computed - seq.policy.recent()), seq.num_computed))

    checked, evicted = run_checking_held(engine, needed)
    assert checked > len(BUDGETED) * 40 and evicted > 0  # every step of every sequence, with evictions happening


SCOPED = [{"name": "knorm", "ratio": 0.25}, {"name": "h2o", "ratio": 0.25}, {"name": "snapkv", "ratio": 0.25},
          {"name": "kivi", "bits": 2, "group_size": 16, "residual": 16}, {"name": "corm", "window": 2, "recent": 8}]


def test_scope_context_keeps_the_question_whole_in_every_head_under_every_policy(engine):
    """The last 48 prompt tokens play the final user message: no policy evicts or quantizes them."""
    tok = engine.tokenizer
    prompts = [tok(passkey_prompt(tok, 260 + 24 * i, 0.5, seed=i).prompt)["input_ids"] for i in range(len(SCOPED))]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i, (prompt, spec) in enumerate(zip(prompts, SCOPED)):
        engine.add_request(f"q{i}", prompt, params, {**spec, "scope": "context"}, context_tokens=len(prompt) - 48)

    def needed(seq) -> set[int]:
        assert seq.policy.question_tokens == 48
        return set(range(len(seq.prompt_token_ids) - 48, min(len(seq.prompt_token_ids), seq.num_computed)))

    checked, evicted = run_checking_held(engine, needed)
    assert checked > len(SCOPED) * 40 and evicted > 0
    with pytest.raises(InvalidRequest, match="needs a chat request") as error:
        engine.add_request("no-context", prompts[0], params, {"name": "knorm", "scope": "context"})
    assert error.value.param == "kv_policy.scope"


def run_checking_held(engine, needed, after_step=lambda: None) -> tuple[int, int]:
    """Run the engine's requests to the end; after every step, every head of every running sequence
    must hold, at full precision, each position of `needed(seq)`. Returns (checks, heads that had
    dropped or moved tokens)."""
    seqs = dict(engine.seqs)
    table, pool = engine.runner.table, engine.runner.pool
    checked = evicted = 0
    while engine.has_unfinished():
        engine.step()
        after_step()
        for seq in seqs.values():
            if seq.row is None or seq.num_computed == 0:
                continue
            row = torch.tensor([seq.row])
            lengths = table.lengths[row].long()
            slots = table.slot_index(row, int(lengths.max()))
            held = torch.arange(slots.shape[-1]) < lengths[..., None]
            positions = torch.where(held, pool.slot_positions[slots].long(), -1)[0]  # [L, Hkv, S]
            wanted = torch.tensor(sorted(needed(seq)), dtype=torch.long)
            present = (positions[..., None] == wanted).any(-2)  # [L, Hkv, len(wanted)]
            assert bool(present.all()), f"{seq.policy.params}: a protected position left the pages"
            evicted += int((lengths < seq.num_computed).sum())
            checked += 1
    return checked, evicted


ADAPTIVE = [{"name": "snapkv", "ratio": 0.25}, {"name": "snapkv", "ratio": 0.25, "adaptive": True},
            {"name": "knorm", "ratio": 0.25}, {"name": "knorm", "ratio": 0.25, "adaptive": True}]


def test_adaptive_budgets_share_each_layers_tokens_and_pages_among_its_heads(engine):
    """With `adaptive`, each layer holds in all exactly what the uniform budget holds (no rounding:
    the shares are whole tokens that sum to the layer's budget), but its heads hold different
    numbers of tokens, each at least the floor, and only the pages those take: some heads hold fewer
    pages than any head under the uniform budget."""
    tok = engine.tokenizer
    prompt = tok(passkey_prompt(tok, 360, 0.5, seed=7).prompt)["input_ids"]
    for i, spec in enumerate(ADAPTIVE):
        engine.add_request(f"a{i}", prompt, PARAMS, spec)
    seqs = dict(engine.seqs)
    table, pool = engine.runner.table, engine.runner.pool
    pages = lambda held: (held + table.block_size - 1) // table.block_size
    snapshots: dict[tuple[str, int], torch.Tensor] = {}  # (request, tokens in the cache) -> [L, Hkv] lengths
    while engine.has_unfinished():
        engine.step()
        live = [s for s in seqs.values() if s.row is not None]
        # the pool lends exactly the pages the heads' lengths take, beside the prefix cache's copies
        assert pool.pages_used - pool.evictable() == int(pages(table.lengths[[s.row for s in live]].long()).sum())
        for seq in live:
            if seq.num_computed >= len(prompt):
                snapshots[seq.request_id, seq.num_computed] = table.lengths[seq.row].long().clone()
    heads = table.kv_heads
    for uniform, adaptive in (("a0", "a1"), ("a2", "a3")):
        policy = seqs[adaptive].policy
        steps = sorted(n for rid, n in snapshots if rid == adaptive)
        assert len(steps) == PARAMS.max_tokens - 1 and all((uniform, n) in snapshots for n in steps)
        for n in steps:
            plain, shared = snapshots[uniform, n], snapshots[adaptive, n]
            assert bool((plain == plain[:, :1]).all())  # uniform: every head the same
            assert torch.equal(shared.sum(-1), plain.sum(-1)), (adaptive, n)
            assert int((shared != shared[:, :1]).any(-1).sum()) > len(shared) // 2, "the heads should differ"
            assert int(shared.min()) >= policy.head_floor()
            new = n - len(prompt) if ADAPTIVE[int(adaptive[1])]["name"] == "snapkv" else 0  # snapkv never evicts those
            assert int(shared.max()) <= policy.most_kept(heads) + new
            # page rounding: a layer's adaptive heads take at most Hkv - 1 pages more, or fewer, than uniform ones
            assert bool(((pages(shared).sum(-1) - pages(plain).sum(-1)).abs() <= heads - 1).all())
            assert bool((pages(shared) < pages(plain)).any())


def test_corm_judges_the_prompt_at_its_end_or_chunk_by_chunk_and_never_evicts_the_recent_tokens(engine):
    """CORM's prompt keys are judged by the prompt's own last queries: once the prompt is in by
    default (nothing goes before), after every chunk with `chunked` (heads shrink while the prompt
    streams in, 128-token chunks here), and never with `prompt: false` (the whole prompt is still
    held when the first token is sampled). Every head keeps the newest `recent` tokens after every
    step."""
    tok = engine.tokenizer
    prompt = tok(passkey_prompt(tok, 700, 0.5, seed=3).prompt)["input_ids"]
    recent = 32
    shrunk_before_end, shrunk_at_end = {}, {}
    for mode in ({}, {"chunked": True}, {"prompt": False}):
        engine.add_request("c", prompt, PARAMS, {"name": "corm", "window": 16, "recent": recent, **mode})
        seq = engine.seqs["c"]
        label = str(mode)
        shrunk_before_end[label] = False

        def needed(seq) -> set[int]:
            return set(range(max(0, seq.num_computed - recent), seq.num_computed))

        def watch(seq=seq, label=label) -> None:
            if seq.row is None or seq.num_computed > len(prompt):
                return
            lengths = engine.runner.table.lengths[seq.row].long()
            if seq.num_computed < len(prompt):
                shrunk_before_end[label] |= bool((lengths < seq.num_computed).any())
            else:
                shrunk_at_end[label] = int((lengths < len(prompt)).sum())

        checked, _ = run_checking_held(engine, needed, after_step=watch)
        assert checked >= PARAMS.max_tokens
    heads = engine.model_config.num_layers * engine.model_config.num_kv_heads
    assert shrunk_before_end == {"{}": False, "{'chunked': True}": True, "{'prompt': False}": False}
    assert shrunk_at_end["{}"] > heads // 2 and shrunk_at_end["{'chunked': True}"] > heads // 2
    assert shrunk_at_end["{'prompt': False}"] == 0


@pytest.mark.parametrize("past_boundary", [1, 5])
def test_snapkv_compresses_a_prompt_ending_just_past_a_chunk_boundary(engine, past_boundary):
    """A prompt 1 or 5 tokens past a multiple of the chunk size: its last chunk is still made to hold
    SnapKV's whole window (a 1-token chunk would be taken for a decode step and never compress)."""
    chunk, window, budget = engine.scheduler.prefill_chunk, 16, 96
    tok = engine.tokenizer
    prompt = tok(passkey_prompt(tok, 3 * chunk, 0.5, seed=5).prompt)["input_ids"][: 2 * chunk + past_boundary]
    engine.add_request("s", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                       {"name": "snapkv", "budget": budget, "window": window})
    seq, chunks = engine.seqs["s"], []
    while seq.num_computed < len(prompt):
        before = seq.num_computed
        engine.step()
        chunks.append(seq.num_computed - before)
    assert chunks[-1] >= window and sum(chunks) == len(prompt)
    assert int(engine.runner.table.lengths[seq.row].max()) <= budget
    while engine.has_unfinished():
        engine.step()
