"""Prefix caching: reference counts under random traffic (property test), and on the default model
greedy outputs with a cached prefix equal to those without, cached pages never changed while
shared, aborts that leak nothing, concurrent requests over one document computing it once, and
cached blocks evicted before anything is preempted."""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.cache.page_pool import OutOfPages, PagePool
from kvserve.cache.page_table import PageTable
from kvserve.cache.prefix_cache import PrefixCache
from kvserve.cli import add_engine_args, engine_config
from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import InvalidRequest, LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import QUESTION, passkey_prompt
from tests.helpers import assert_idle_and_clear

LAYERS, HEADS, BLOCK = 2, 3, 4
MODEL = "SmolLM2-135M-Instruct"
DOCS = [[d * 100 + i for i in range(n)] for d, n in enumerate((13, 9, 21))]


def check_cached_blocks_untouched(cache: PrefixCache) -> None:
    """Every cached block's slots still hold its own tokens, in order (a compaction or an append
    into a shared page would move or overwrite them)."""
    for block_pages in cache.blocks.values():
        positions = cache.pool.slot_positions.view(-1, BLOCK)[block_pages.long()]
        assert bool((positions == positions[..., :1] + torch.arange(BLOCK)).all())
        assert bool((positions[..., 0] % BLOCK == 0).all())


def held_slots(entry, block: int) -> torch.Tensor:
    """The pool slots a compressed prefix's heads hold."""
    flat = (entry.pages.long()[..., None] * block + torch.arange(block)).flatten(-2)
    return flat[torch.arange(flat.shape[-1]) < entry.lengths.long()[..., None]]


operations = st.lists(st.tuples(st.sampled_from(["admit", "finish", "grow", "compact", "evict", "store",
                                                 "attach"]),
                                st.integers(0, 5), st.booleans(), st.integers(1, 9)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_traffic_keeps_every_page_free_cached_or_owned(ops):
    pool = PagePool(48, BLOCK, 8, torch.float32)
    table = PageTable(pool, 4, LAYERS, HEADS, 40)
    cache = PrefixCache(table, "test")
    live: dict[int, tuple[list[int], bool]] = {}  # row -> (its tokens, whether its pages are private)
    stored: dict[bytes, torch.Tensor] = {}  # compressed prefix -> its slots' positions when stored

    def append(row: int, tokens: list[int], start: int) -> None:
        positions = torch.arange(start, len(tokens))
        table.append(torch.tensor([row]), torch.tensor([len(positions)]), positions)

    for op, pick, private, count in ops:
        if op == "admit" and table.rows_free:
            tokens = DOCS[pick % len(DOCS)] + list(range(1000, 1000 + count))
            hashes = cache.extend_hashes([], tokens)
            cached = cache.match(hashes[:(len(tokens) - 1) // BLOCK])
            row = table.acquire_row()
            try:
                if cached:
                    cache.attach(row, hashes[:cached], private)
                append(row, tokens, cached * BLOCK)
            except OutOfPages:  # the pool is short even after the cache gave back what it could
                table.release_row(row)  # an admission or a prefill given up half way leaks nothing
            else:
                cache.insert(row, cached, hashes[cached:], private)
                live[row] = (tokens, private)
        elif op == "finish" and live:  # finished, aborted or preempted: the row lets its pages go
            row = sorted(live)[pick % len(live)]
            table.release_row(row)
            del live[row]
        elif op == "grow" and live:
            row = sorted(live)[pick % len(live)]
            tokens, row_private = live[row]
            if len(tokens) + count <= 40:
                grown = tokens + list(range(2000, 2000 + count))
                try:
                    append(row, grown, len(tokens))
                    live[row] = (grown, row_private)
                except OutOfPages:
                    pass
        elif op == "compact" and any(p for _, p in live.values()):
            # only a sequence with private pages compacts (a policy that acts never shares a page)
            row = sorted(r for r, (_, p) in live.items() if p)[pick % sum(p for _, p in live.values())]
            lengths = table.lengths[row].long()
            slots = int(lengths.max())
            keep = (torch.arange(slots) < lengths[..., None]) & (torch.arange(slots) % (count + 1) != 0)
            table.evict(torch.tensor([row]), keep[None])
        elif op == "evict":
            cache.evict(count * LAYERS * HEADS)
        elif op == "store" and any(p for _, p in live.values()):
            # a builder finishing: what its compacted row holds is cached as a compressed prefix, then it goes
            row = sorted(r for r, (_, p) in live.items() if p)[pick % sum(p for _, p in live.values())]
            key = bytes([pick])
            if key not in cache.compressed:
                cache.store_compressed(key, row, len(live[row][0]))
                stored[key] = pool.slot_positions[held_slots(cache.compressed[key], BLOCK)].clone()
            table.release_row(row)
            del live[row]
        elif op == "attach" and cache.compressed and table.rows_free:
            key = sorted(cache.compressed)[pick % len(cache.compressed)]
            row = table.acquire_row()
            try:
                tokens = cache.attach_compressed(row, key)
            except OutOfPages:
                table.release_row(row)
            else:
                live[row] = (list(range(tokens)), False)  # it shares the prefix: it only appends
        table.check_invariants(live_rows=list(live), cached=cache.pages())
        check_cached_blocks_untouched(cache)
        for key, entry in cache.compressed.items():  # nothing moved or overwrote a compressed prefix's tokens
            assert torch.equal(pool.slot_positions[held_slots(entry, BLOCK)], stored[key])
        assert pool.pages_available == pool.pages_free + cache.pages_evictable()
    for row in list(live):
        table.release_row(row)
    assert pool.pages_available == pool.capacity  # what the cache still holds, no sequence holds
    cache.clear()
    table.check_invariants(live_rows=[], cached=cache.pages())
    assert pool.pages_free == pool.capacity and not cache.blocks


# ---- the default model -------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
CONFIG = dict(kv_cache_memory=192 << 20, max_num_batched_tokens=512, max_num_seqs=16)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(**CONFIG))


@pytest.fixture(scope="module")
def uncached(engine):
    return LLMEngine(EngineConfig(**CONFIG, enable_prefix_caching=False))


@pytest.fixture(autouse=True)
def nothing_leaks(request):
    yield
    if "engine" in request.fixturenames:
        # each test computes its prompts (a few count the steps that takes)
        assert_idle_and_clear(request.getfixturevalue("engine"))


def document(engine, tokens: int, seed: int) -> tuple[list[int], str]:
    """A passkey prompt's tokens before its question, and the passkey; documents of different seeds
    differ from their first token (the filler is the same)."""
    case = passkey_prompt(engine.tokenizer, tokens, 0.4, seed=seed)
    return engine.tokenizer.encode(f"Document {seed}. " + case.prompt.removesuffix(QUESTION)), case.passkey


def question(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(f"\nQuiz {text}.{QUESTION}")


def run(engine, prompts: list[list[int]], policy: object, usage: list | None = None
        ) -> dict[str, tuple[list[int], int]]:
    """Every prompt at once; each one's tokens and prompt tokens found cached, by request id (and
    each one's KV usage appended to `usage`, in order)."""
    ids = [f"r{i}-{id(prompts)}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, GREEDY, policy)
    outputs: dict[str, tuple[list[int], int]] = {rid: ([], 0) for rid in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, _ = outputs[out.request_id]
            outputs[out.request_id] = (tokens + out.token_ids, out.num_cached_tokens)
            if out.finished:
                finals[out.request_id] = out.kv_usage
    if usage is not None:
        usage.extend(finals[rid] for rid in ids)
    return {rid: outputs[rid] for rid in ids}


POLICIES = ["full", {"name": "snapkv", "ratio": 0.25}, {"name": "tova", "ratio": 0.25},
            {"name": "h2o", "ratio": 0.25}, {"name": "kivi", "bits": 4}]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p if isinstance(p, str) else p["name"])
def test_a_cached_prefix_gives_the_uncached_greedy_tokens_and_stays_unchanged(engine, uncached, policy):
    doc, _ = document(engine, 600, seed=3)
    first, second = doc + question(engine, "one"), doc + question(engine, "two")
    run(engine, [first], policy)  # caches the document's blocks
    cache, pool, block = engine.runner.prefix_cache, engine.runner.pool, engine.runner.table.block_size
    cached = {h: p.clone() for h, p in cache.blocks.items()}
    pages = torch.stack(list(cached.values())).long().flatten()
    before = pool.storage[:, pages].clone(), pool.slot_positions.view(-1, block)[pages].clone()
    pool.storage[:, pool.free_ids().long()] = float("nan")  # whatever reads a page it does not hold reads NaN

    (tokens, cached_tokens), = run(engine, [second], policy).values()
    (expected, _), = run(uncached, [second], policy).values()
    assert tokens == expected
    if policy in POLICIES[:3]:  # the document's whole blocks, short of what the question changes
        assert len(doc) // block * block - block <= cached_tokens <= len(doc) // block * block
    else:  # H2O and KIVI act on every prefill chunk: they compute the prompt, and cache copies of it
        assert cached_tokens == 0
    assert all(cache.blocks.get(h) is not None and torch.equal(cache.blocks[h], p) for h, p in cached.items())
    assert torch.equal(pool.storage[:, pages], before[0])  # bit for bit: nothing wrote into a cached page
    assert torch.equal(pool.slot_positions.view(-1, block)[pages], before[1])


def test_requests_over_one_document_compute_it_once(engine):
    doc, passkey = document(engine, 900, seed=5)
    prompts = [doc + question(engine, str(i)) for i in range(4)]
    queries, hits = engine.scheduler.prefix_cache_queries, engine.scheduler.prefix_cache_hits
    usage: list = []
    results = list(run(engine, prompts, "full", usage).values())
    block = engine.runner.table.block_size
    # the first computes the document; the others, admitted with it, wait for its blocks and reuse them
    assert results[0][1] == 0
    assert all(cached >= len(doc) // block * block - block for _, cached in results[1:])
    assert engine.scheduler.prefix_cache_queries - queries == sum(len(p) for p in prompts)
    assert engine.scheduler.prefix_cache_hits - hits == sum(cached for _, cached in results)
    # the document's pages count 1/n to each of the n requests holding them: the first finishes alone,
    # holding its whole cache; those that finish while others still share with them hold less
    assert usage[0].bytes <= usage[0].full_bytes and min(u.bytes / u.full_bytes for u in usage) < 0.75
    answers = {engine.tokenizer.decode(tokens) for tokens, _ in results}
    assert all(passkey in answer for answer in answers), answers


def test_aborting_requests_mid_prefill_of_a_shared_prefix_leaks_nothing(engine):
    doc, _ = document(engine, 1500, seed=7)
    engine.add_request("a", doc + question(engine, "a"), GREEDY, "full")
    engine.step()  # its first chunk is computed and cached: the pages are the cache's and its own
    assert int((engine.runner.pool.refs > 1).sum()) > 0 and engine.seqs["a"].num_uncomputed > 1
    engine.abort("a")
    engine.runner.check_invariants(live_rows=[])
    engine.add_request("b", doc + question(engine, "b"), GREEDY, "full")
    engine.add_request("c", doc + question(engine, "c"), GREEDY, {"name": "snapkv", "ratio": 0.25})
    engine.step()
    b, c = engine.seqs["b"], engine.seqs["c"]
    assert b.num_cached_tokens > 0 and b.num_uncomputed > 1  # it started from the cached chunk, and goes on
    assert c.row is None  # waiting for b to cache the blocks it computes now
    for rid in ("b", "c"):
        engine.abort(rid)


def test_cached_blocks_are_evicted_before_anything_is_preempted():
    small = LLMEngine(EngineConfig(kv_cache_memory=36 << 20, max_num_batched_tokens=512, max_num_seqs=4))
    pool, cache = small.runner.pool, small.runner.prefix_cache
    docs = [document(small, 300, seed=s)[0] for s in range(3)]  # each ~14 MiB of KV: the third needs room
    for doc in docs:
        run(small, [doc + question(small, "x")], "full")
    assert cache.blocks_evicted > 0 and small.scheduler.num_preemptions == 0
    small.runner.check_invariants(live_rows=[])
    assert pool.pages_available == pool.capacity
    # the last document is the one still cached: asked again, it is found
    (_, cached), = run(small, [docs[-1] + question(small, "y")], "full").values()
    assert cached > 0 and small.scheduler.num_preemptions == 0


# ---- over HTTP ---------------------------------------------------------------------------------

def test_usage_and_metrics_report_the_cached_prompt_tokens(server):
    import httpx
    import openai

    def counter(name: str) -> float:
        lines = httpx.get(f"{server}/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{"))

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    system = "You answer questions about this manual. " + "Section: the valve opens at dawn and closes at dusk. " * 40
    queries, hits = counter("vllm:prefix_cache_queries_total"), counter("vllm:prefix_cache_hits_total")
    replies = [client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}])
        for i in range(2)]
    first, second = (r.usage for r in replies)
    assert first.prompt_tokens_details.cached_tokens == 0
    # the system prompt's whole blocks: all of it but the partial block where the question starts
    assert first.prompt_tokens - 40 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    assert second.prompt_tokens_details.cached_tokens % 16 == 0
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Question 3?"}])
    final = [chunk for chunk in stream][-1].usage
    assert final.prompt_tokens_details.cached_tokens == second.prompt_tokens_details.cached_tokens
    prompts = first.prompt_tokens + second.prompt_tokens + final.prompt_tokens
    assert counter("vllm:prefix_cache_queries_total") - queries == prompts
    assert counter("vllm:prefix_cache_hits_total") - hits == 2 * second.prompt_tokens_details.cached_tokens
    assert counter("kvserve:prefix_cache_pages") > 0
    assert counter("kvserve:kv_bytes_shared") == counter("kvserve:kv_pages_shared") * 2 * 16 * 64 * 4
    shared = {"name": "snapkv", "ratio": 0.5, "share_prefix": True}
    built = counter("kvserve:prefix_cache_compressed")
    compressed = [client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, extra_body={"kv_policy": shared},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]).usage
        for i in (4, 5)]
    # both start from the system prompt compressed once (its whole blocks), built for the first
    assert compressed[0].prompt_tokens_details.cached_tokens == compressed[1].prompt_tokens_details.cached_tokens
    assert compressed[0].prompt_tokens_details.cached_tokens >= second.prompt_tokens_details.cached_tokens - 16
    assert counter("kvserve:prefix_cache_compressed") == built + 1
    with pytest.raises(openai.BadRequestError) as refused:  # a completion has no context to share
        client.completions.create(model=MODEL, prompt=system, max_tokens=2, extra_body={"kv_policy": shared})
    assert refused.value.body["param"] == "kv_policy.share_prefix"
    # a cold cache on demand (the benchmarks' reset): the same prompt again finds nothing
    assert httpx.post(f"{server}/reset_prefix_cache").status_code == 200
    again = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Question 1?"}])
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_prefix_caching_is_on_to_serve_and_off_to_benchmark_unless_asked():
    serve, bench = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_engine_args(serve)
    add_engine_args(bench, prefix_caching=False)
    assert engine_config(serve.parse_args([])).enable_prefix_caching
    assert not engine_config(serve.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching
    assert not engine_config(bench.parse_args([])).enable_prefix_caching
    assert engine_config(bench.parse_args(["--enable-prefix-caching"])).enable_prefix_caching


SHARED = {"name": "snapkv", "ratio": 0.25, "share_prefix": True}


def shared_requests(engine, doc: list[int], questions: list[str]) -> dict[str, object]:
    """Chat-like requests over `doc` (their context) with SHARED; each one's final output, by id."""
    for q in questions:
        engine.add_request(q, doc + question(engine, q), GREEDY, SHARED, context_tokens=len(doc))
    tokens: dict[str, list[int]] = {q: [] for q in questions}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finals[out.request_id] = (out, tokens[out.request_id])
    return finals


def test_a_compressed_prefix_is_built_once_shared_by_every_request_and_never_changed(engine):
    doc, _ = document(engine, 1200, seed=11)
    pool, cache, block = engine.runner.pool, engine.runner.prefix_cache, engine.runner.table.block_size
    prefix = len(doc) // block * block
    finals = shared_requests(engine, doc, ["s0", "s1", "s2"])
    assert sorted(finals) == ["s0", "s1", "s2"]  # the builder's own output stays inside the engine
    assert all(out.num_cached_tokens == prefix for out, _ in finals.values())
    (entry,) = cache.compressed.values()
    assert entry.tokens == prefix
    # a quarter of the prefix per head (SnapKV's budget), the reconstruction prompt's tokens dropped
    budget = -(-prefix // 4)
    assert bool((entry.lengths <= budget + 1).all()) and bool((entry.lengths >= budget - 32).all())
    flat = (entry.pages.long()[..., None] * block + torch.arange(block)).flatten(-2)  # [L, Hkv, P * block]
    slots = flat[torch.arange(flat.shape[-1]) < entry.lengths.long()[..., None]]  # the slots its heads hold
    assert int(pool.slot_positions[slots].max()) < prefix
    # the three shared it: at their end each held its own pages and a third of the prefix's, or less
    own = engine.scheduler.pages_for_tokens(len(question(engine, "s0")) + GREEDY.max_tokens + 2 * block)
    assert all(out.kv_usage.bytes <= (entry.owned.numel() + own) * pool.page_bytes for out, _ in finals.values())

    snapshot = pool.storage[:, entry.owned].clone(), pool.slot_positions[slots].clone()
    pool.storage[:, pool.free_ids().long()] = float("nan")
    again = shared_requests(engine, doc, ["s0", "s3"])
    assert again["s0"][1] == finals["s0"][1]  # the same compressed prefix and question: the same answer
    assert cache.compressed[next(iter(cache.compressed))] is entry  # found, not built again
    assert torch.equal(pool.storage[:, entry.owned], snapshot[0])
    assert torch.equal(pool.slot_positions[slots], snapshot[1])


def test_share_prefix_needs_a_context_or_a_length_and_prefix_caching(engine, uncached):
    doc, _ = document(engine, 300, seed=12)
    cases = [(engine, SHARED, None), (engine, SHARED, 5), (uncached, SHARED, len(doc)),
             (engine, SHARED | {"share_prefix": 8}, None), (engine, SHARED | {"share_prefix": len(doc)}, None)]
    for eng, policy, context in cases:
        with pytest.raises(InvalidRequest) as error:
            eng.add_request("bad", doc, GREEDY, policy, context_tokens=context)
        assert error.value.param == "kv_policy.share_prefix"
    with pytest.raises(ValueError, match="share_prefix"):
        engine.add_request("bad", doc, GREEDY, SHARED | {"share_prefix": 0})


def test_a_prefix_given_in_tokens_is_shared_like_a_chat_context(engine):
    doc, _ = document(engine, 400, seed=13)
    by_length = SHARED | {"share_prefix": len(doc)}
    for q in ("a", "b"):
        engine.add_request(q, doc + question(engine, q), GREEDY, by_length)
    finals = {}
    while engine.has_unfinished():
        finals |= {out.request_id: out for out in engine.step() if out.finished}
    block = engine.runner.table.block_size
    assert [finals[q].num_cached_tokens for q in "ab"] == [len(doc) // block * block] * 2
    assert len(engine.runner.prefix_cache.compressed) == 1


def test_a_cache_salt_keeps_requests_from_sharing_prefixes(engine):
    doc, _ = document(engine, 400, seed=14)
    prompt = doc + question(engine, "salt")
    cached = {}
    for rid, salt in (("plain", None), ("a1", "a"), ("b", "b"), ("a2", "a")):
        engine.add_request(rid, prompt, GREEDY, "full", cache_salt=salt)
        while engine.has_unfinished():
            cached |= {out.request_id: out.num_cached_tokens for out in engine.step() if out.finished}
    # the same prompt: found again only under the salt that cached it
    assert cached["plain"] == cached["a1"] == cached["b"] == 0
    assert cached["a2"] == len(prompt) // 16 * 16
