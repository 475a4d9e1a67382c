"""`kvserve bench policies`: at one fixed KV-cache size, how many long requests each policy runs at
once and how many output tokens per second that concurrency yields.

For each policy the same long prompts are all submitted at once (ignore_eos, a fixed output
length); after every step the sequences that ran in it are counted. The scheduler admits by what a
policy promises to hold (`tokens_bound`) and by the pages actually free, so a policy that frees
pages lets more requests in."""

from __future__ import annotations

import argparse
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
        start = time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outputs = engine.step()
            ran = engine.stats().num_running + sum(out.finished for out in outputs)
            steps.append((ran, sum(len(out.token_ids) for out in outputs), time.perf_counter() - t0))
        seconds = time.perf_counter() - start
        max_running = max(ran for ran, _, _ in steps)
        at_max = [(tokens, dt) for ran, tokens, dt in steps if ran == max_running]
        total = sum(tokens for _, tokens, _ in steps)
        results.append(ConcurrencyResult(
            policy=policy_label(spec), max_running=max_running,
            tok_s_at_max=sum(t for t, _ in at_max) / sum(dt for _, dt in at_max), tok_s=total / seconds,
            seconds=seconds, output_tokens=total, preemptions=engine.stats().num_preemptions - preemptions))
    return results


def run_policy_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    specs = [s for s in parse_policy_list(args.policies) if s != {"name": "full"}]
    config.max_num_seqs = max(config.max_num_seqs, args.num_requests)
    engine = LLMEngine(config)
    results = run_concurrency(engine, [{"name": "full"}, *specs], args.num_requests, args.input_len,
                              args.output_len)
    pool = engine.runner.pool
    sys.stdout.write(f"KV cache: {pool.capacity * pool.page_bytes / 2**20:.0f} MiB ({pool.capacity} pages), "
                     f"{args.num_requests} requests of {args.input_len} + {args.output_len} tokens\n")
    headers = ["policy", "max running seqs", "output tok/s at max", "output tok/s overall", "seconds",
               "preemptions"]
    sys.stdout.write(markdown_table(headers, [[r.policy, r.max_running, r.tok_s_at_max, r.tok_s, r.seconds,
                                               r.preemptions] for r in results]) + "\n")
    return 0
