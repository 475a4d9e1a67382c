"""The compiled one-in-one-out decode pass (kernels/decode_evict.py) against its reference, the
policies' `act` through the policy runner's general path: on the same state they must leave the
same tables, lengths and slot metadata, to the bit (the kernel does the reference's float
operations in the reference's order), and the same tokens in the engine."""

from __future__ import annotations

import pytest
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.cache.page_pool import PagePool
from kvserve.cache.page_table import PageTable
from kvserve.cache.tier import TierSet
from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.policy_runner import PolicyRunner
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.eval.passkey import passkey_prompt
from kvserve.kernels import cpu_library, decode_evict
from kvserve.policies.registry import create_policy
from tests.helpers import assert_idle_and_clear, make_sequence

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason="the CPU kernels could not be built here")

LAYERS, KV_HEADS, GROUP, BLOCK, DIM = 3, 3, 3, 4, 8
PROMPT = 40


def decode_state(specs: list[dict], seed: int, dtype: torch.dtype, aligned: bool, over: list[int]
                 ) -> tuple[PolicyRunner, ScheduledBatch, AttentionMetadata]:
    """A pool and table holding one decoding sequence per spec, each head at `budget() + over[i]`
    (or fewer) tokens after its newest one was appended, in slot orders that differ by head unless
    `aligned`; NaN in every free page; random scores, aux and this step's attention sums, in
    quarters so that many tie."""
    gen = torch.Generator().manual_seed(seed)
    pool = PagePool(200, BLOCK, DIM, dtype)
    pool.storage.fill_(float("nan"))
    pool.slot_scores.fill_(float("nan"))
    table = PageTable(pool, 4, LAYERS, KV_HEADS, 128)
    runner = PolicyRunner(table, TierSet(table, 128), GROUP, DIM ** -0.5, torch.ones(DIM // 2))
    seqs = []
    generated = 12
    for i, spec in enumerate(specs):
        seq = make_sequence(list(range(100, 100 + PROMPT)), SamplingParams(max_tokens=64), spec)
        seq.policy = create_policy(seq.policy_params, PROMPT, context_tokens=PROMPT - 6)  # scope context: a question
        seq.output_token_ids = list(range(generated))
        seq.num_computed = seq.num_tokens
        seq.row = table.acquire_row()
        newest = seq.num_tokens - 1
        length = seq.policy.budget() + over[i]
        lengths = torch.full((LAYERS, KV_HEADS), length)
        lengths[0, 1] -= 1  # a head within its budget keeps everything
        pages = torch.zeros(LAYERS, KV_HEADS, -(-length // BLOCK), dtype=torch.int32)
        for layer in range(LAYERS):
            kept = torch.randperm(newest, generator=gen)[:length - 1]
            for head in range(KV_HEADS):
                n = int(lengths[layer, head])
                held = torch.cat([kept[:n - 1], torch.tensor([newest])])
                if not aligned:
                    held = held[torch.randperm(n, generator=gen)]
                count = -(-n // BLOCK)
                pages[layer, head, :count] = pool.allocate(count)
                slots = (pages[layer, head, :count].long()[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
                pool.slot_positions[slots] = held.to(torch.int32)
                pool.slot_scores[slots] = torch.randint(0, 4, (n,), generator=gen) / 4  # ties: the first slot goes
                pool.slot_aux[slots] = torch.randint(1, 9, (n,), generator=gen).float()
                pool.k_pages.view(-1, DIM)[slots] = torch.randn(n, DIM, generator=gen).to(dtype)
                pool.v_pages.view(-1, DIM)[slots] = torch.randn(n, DIM, generator=gen).to(dtype)
        table.attach(seq.row, pages, lengths.to(torch.int32))
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * len(seqs))
    lens = table.lengths[[s.row for s in seqs]]
    width = -(-int(lens.max()) // BLOCK) * BLOCK
    sums = torch.randint(0, 4, (len(seqs), LAYERS, KV_HEADS, width), generator=gen) / 4 * GROUP
    sums *= torch.arange(width) < lens[..., None]
    empty = torch.empty(0, dtype=torch.int64)
    meta = AttentionMetadata(block_tables=torch.empty(0), seq_lens=lens, slot_index=empty,
                             decode_rows=torch.arange(len(seqs)), decode_tokens=torch.arange(len(seqs)),
                             prefill_rows=empty, prefill_tokens=empty, prefill_query_start_loc=torch.zeros(1),
                             observe_decode=True,
                             decode_scores={layer: (sums[:, layer].contiguous(), sums[:, layer].contiguous())
                                            for layer in range(LAYERS)})
    return runner, batch, meta


def held_state(runner: PolicyRunner, batch: ScheduledBatch) -> dict[str, torch.Tensor]:
    """Every head's slots in slot order: positions, scores, aux, keys and values; and the lengths,
    the tables' pages, the pool's free pages."""
    table, pool = runner.table, runner.table.pool
    rows = torch.tensor([s.row for s in batch.seqs])
    lengths = table.lengths[rows].long()
    slot = table.slot_index(rows, int(lengths.max()))
    held = torch.arange(slot.shape[-1]) < lengths[..., None]
    picked = slot[held]
    return {"lengths": lengths, "pages": table.tables[rows].clone(), "free": pool.free_ids().sort().values,
            "positions": pool.slot_positions[picked], "scores": pool.slot_scores[picked],
            "aux": pool.slot_aux[picked], "keys": pool.k_pages.view(-1, DIM)[picked].view(torch.uint8),
            "values": pool.v_pages.view(-1, DIM)[picked].view(torch.uint8)}


TOVA = {"name": "tova", "budget": 20, "recent": 4}
CASES = {
    "tova": ([TOVA, {**TOVA, "budget": 17}], True),
    "tova-heads-apart": ([TOVA, {**TOVA, "budget": 17}], False),
    "tova-group": ([{**TOVA, "heads": "group"}, {**TOVA, "heads": "group", "budget": 23}], False),
    "h2o": ([{"name": "h2o", "budget": 20}, {"name": "h2o", "budget": 18, "recent": 3}], False),
    "h2o-context": ([{"name": "h2o", "budget": 21, "scope": "context"}], False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_eviction_leaves_what_the_policys_act_leaves(case, dtype):
    specs, aligned = CASES[case]
    for seed in range(3):
        over = [1] * len(specs) if seed < 2 else [0] * len(specs)
        compiled = decode_state(specs, seed, dtype, aligned, over)
        general = decode_state(specs, seed, dtype, aligned, over)
        members = list(range(len(specs)))
        cls = type(compiled[1].seqs[0].policy)
        assert compiled[0]._evict_compiled(cls, compiled[1], members, compiled[2])
        general[0]._run(cls, general[1], members, general[2])
        mine, theirs = held_state(*compiled[:2]), held_state(*general[:2])
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"{case} seed {seed}: {name} differs"
        evicted = sum(over) * (LAYERS * KV_HEADS - 1)
        assert compiled[0].tokens_evicted[cls.name] == general[0].tokens_evicted[cls.name] == evicted
        compiled[0].table.check_invariants(live_rows=[s.row for s in compiled[1].seqs])


def test_compiled_eviction_declines_the_steps_it_does_not_cover():
    """It changes nothing and says so where `act` must run: a head over budget by more than one,
    a policy with no decode rule (adaptive, normalised H2O), a prefill chunk."""
    for specs, over in (([TOVA], [2]), ([{**TOVA, "heads": "group", "adaptive": True}], [1]),
                        ([{"name": "h2o", "budget": 20, "normalize": True}], [1])):
        runner, batch, meta = decode_state(specs, 0, torch.float32, True, over)
        before = held_state(runner, batch)
        assert not runner._evict_compiled(type(batch.seqs[0].policy), batch, [0], meta)
        assert all(torch.equal(v, held_state(runner, batch)[k]) for k, v in before.items())
    runner, batch, meta = decode_state([TOVA], 0, torch.float32, True, [1])
    assert not runner._evict_compiled(type(batch.seqs[0].policy), ScheduledBatch(batch.seqs, [2]), [0], meta)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=256, enable_prefix_caching=False))


def test_the_engine_generates_the_same_tokens_with_the_compiled_pass_and_without(engine, monkeypatch):
    tok = engine.tokenizer
    prompts = [tok(passkey_prompt(tok, 260 + 30 * i, 0.4, seed=i).prompt)["input_ids"] for i in range(3)]
    specs = [{"name": "tova", "budget": 64}, {"name": "h2o", "budget": 64}, {"name": "tova", "budget": 48,
                                                                            "heads": "group"}]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    results = {}
    calls = []
    kernel = decode_evict.decode_evict_cpu
    monkeypatch.setattr(decode_evict, "decode_evict_cpu", lambda *args: calls.append(1) or kernel(*args))
    for compiled in (True, False):
        calls.clear()
        engine.policies.compiled_eviction = compiled
        engine.policies.tokens_evicted.clear()
        tokens = [engine.generate([p], params, spec)[0] for p, spec in zip(prompts, specs)]
        together = [engine.generate(prompts, params, spec) for spec in specs]
        results[compiled] = tokens, together, dict(engine.policies.tokens_evicted)
        assert (len(calls) > 0) == compiled
        assert_idle_and_clear(engine)
    engine.policies.compiled_eviction = True
    assert results[True] == results[False]
    assert results[True][2]["tova"] > 0 and results[True][2]["h2o"] > 0
