"""`kvserve bench policies`: the capacity benchmark. At one fixed KV-cache size, how many long
requests each policy runs at once, and what that concurrency yields: output tokens per second, time
to first token, time per output token and the KV each request held, with each policy's ratio to
full's from the same run.

For each policy the same long prompts are all submitted at once (ignore_eos, a fixed output
length); after every step the sequences that ran in it are counted. The scheduler admits by what a
policy promises to hold (`tokens_bound`) and by the pages actually free, so a policy that frees
pages lets more requests in."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import passkey_prompt
from kvserve.eval.report import markdown_table
from kvserve.eval.specs import parse_policy_list, policy_label


@dataclass
class ConcurrencyResult:
    policy: str
    max_running: int  # most sequences in one step
    tok_s_at_max: float  # output tokens per second over the steps that ran max_running sequences
    tok_s: float  # output tokens per second over the whole run, prefill included
    seconds: float
    output_tokens: int
    preemptions: int
    ttft: list[float]  # per request: seconds from submission (all at once) to its first token
    tpot: list[float]  # per request: seconds per output token after the first
    kv_peak_bytes: list[int]  # per request: the most KV it held
    kv_full_bytes: int  # what one request's full-precision cache holds at its end


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (share in (0, 1]) of values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def long_prompts(engine: LLMEngine, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens (passkey filler, cut to length)."""
    prompts = []
    for seed in range(count):
        ids = engine.tokenizer(passkey_prompt(engine.tokenizer, length + 64, 0.5, seed).prompt)["input_ids"]
        prompts.append(list(ids[:length]))
    return prompts


def run_concurrency(engine: LLMEngine, specs: list[dict[str, Any]], num_requests: int, input_len: int,
                    output_len: int) -> list[ConcurrencyResult]:
    prompts = long_prompts(engine, num_requests, input_len)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    results = []
    for spec in specs:
        preemptions = engine.stats().num_preemptions
        for i, prompt in enumerate(prompts):
            engine.add_request(f"concurrency-{policy_label(spec)}-{i}-{time.monotonic_ns()}", prompt, params, spec)
        # per step: sequences that ran (still running after it, plus those it finished), tokens, seconds
        steps: list[tuple[int, int, float]] = []
        first: dict[str, float] = {}
        last: dict[str, tuple[float, int]] = {}  # request: (time of its last token, tokens)
        usage = {}
        start = time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outputs = engine.step()
            now = time.perf_counter()
            ran = engine.stats().num_running + sum(out.finished for out in outputs)
            steps.append((ran, sum(len(out.token_ids) for out in outputs), now - t0))
            for out in outputs:
                if out.token_ids:
                    first.setdefault(out.request_id, now - start)
                    last[out.request_id] = (now - start, out.completion_tokens)
                if out.finished:
                    usage[out.request_id] = out.kv_usage
        seconds = time.perf_counter() - start
        max_running = max(ran for ran, _, _ in steps)
        at_max = [(tokens, dt) for ran, tokens, dt in steps if ran == max_running]
        total = sum(tokens for _, tokens, _ in steps)
        tpot = [(end - first[rid]) / (tokens - 1) for rid, (end, tokens) in last.items() if tokens > 1]
        results.append(ConcurrencyResult(
            policy=policy_label(spec), max_running=max_running,
            tok_s_at_max=sum(t for t, _ in at_max) / sum(dt for _, dt in at_max), tok_s=total / seconds,
            seconds=seconds, output_tokens=total, preemptions=engine.stats().num_preemptions - preemptions,
            ttft=list(first.values()), tpot=tpot, kv_peak_bytes=[u.peak_bytes for u in usage.values() if u],
            kv_full_bytes=max((u.full_bytes for u in usage.values() if u), default=0)))
    return results


def run_policy_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    specs = [s for s in parse_policy_list(args.policies) if s != {"name": "full"}]
    config.max_num_seqs = max(config.max_num_seqs, args.num_requests)
    engine = LLMEngine(config)
    results = run_concurrency(engine, [{"name": "full"}, *specs], args.num_requests, args.input_len,
                              args.output_len)
    pool = engine.runner.pool
    sys.stdout.write(f"KV cache: {pool.capacity * pool.page_bytes / 2**20:.0f} MiB ({pool.capacity} pages), "
                     f"{args.num_requests} requests of {args.input_len} + {args.output_len} tokens, submitted at "
                     f"once; {config.machine()}\n")
    full = results[0]
    headers = ["policy", "max running", "output tok/s", "x full", "tok/s at max running", "x full",
               "TTFT p50 s", "TTFT p99 s", "TPOT mean s",
               "TPOT p99 s", "KV peak / request MiB", "KV peak % of full", "preemptions"]
    rows = []
    for r in results:
        peak = statistics.mean(r.kv_peak_bytes) if r.kv_peak_bytes else 0.0
        rows.append([r.policy, r.max_running, r.tok_s, f"{r.tok_s / full.tok_s:.2f}x", r.tok_s_at_max,
                     f"{r.tok_s_at_max / full.tok_s_at_max:.2f}x", percentile(r.ttft, 0.5),
                     percentile(r.ttft, 0.99), statistics.mean(r.tpot), percentile(r.tpot, 0.99), peak / 2**20,
                     f"{peak / r.kv_full_bytes:.0%}" if r.kv_full_bytes else "", r.preemptions])
    sys.stdout.write(markdown_table(headers, rows) + "\n")
    sys.stdout.write("output tok/s: over the whole run, prefill included; x full: that over full's in this run; "
                     "tok/s at max running: over the steps that ran the most sequences; "
                     "TTFT from the common submission; TPOT: a request's time after its first token over its "
                     "later tokens; KV peak: the most a request held (usage.kv_cache.peak_bytes)\n")
    return 0
