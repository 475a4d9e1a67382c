"""Passkey retrieval over a grid of context lengths × needle depths × trials, per policy, in process.

Each request runs alone (batch 1), so its decode rate is the policy's own and not its neighbours'."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import PasskeyCase, passkey_correct, passkey_prompt
from kvserve.eval.specs import policy_label

log = logging.getLogger("kvserve.eval")


@dataclass
class GridCase:
    context: int
    depth: float
    trial: int
    case: PasskeyCase
    prompt_ids: list[int]


@dataclass
class PasskeyRun:
    policy: str  # the policy's label
    context: int
    depth: float
    trial: int
    prompt_tokens: int
    passkey: str
    answer: str
    correct: bool
    kv_bytes: int | None  # at the end of the request
    kv_peak_bytes: int | None
    kv_full_bytes: int | None  # what an uncompressed cache would have held
    kv_footprint_byte_steps: int | None  # bytes held summed over the request's steps (engine KVUsage)
    kv_full_footprint_byte_steps: int | None  # the same sum for an uncompressed cache
    decode_tokens: int  # tokens generated after the first one
    decode_seconds: float | None  # the time those took; None where not measured (remote)


def grid_cases(tokenizer, contexts: list[int], depths: list[float], trials: int  # noqa: ANN001
               ) -> list[GridCase]:
    """Every (context, depth, trial) cell with its own passkey; the same cells for every policy."""
    cases = []
    for context in contexts:
        for d, depth in enumerate(depths):
            for trial in range(trials):
                case = passkey_prompt(tokenizer, context, depth, seed=context * 1000 + d * 100 + trial)
                cases.append(GridCase(context, depth, trial, case, list(tokenizer(case.prompt)["input_ids"])))
    return cases


def run_passkey_local(engine: LLMEngine, cases: list[GridCase], specs: list[dict[str, Any]],
                      answer_tokens: int) -> list[PasskeyRun]:
    params = SamplingParams(max_tokens=answer_tokens, temperature=0, ignore_eos=True)
    return run_grid(cases, specs, lambda cell, spec: _run_one(engine, cell, spec, params))


def run_grid(cases: list[GridCase], specs: list[dict[str, Any]],
             run_one: Callable[[GridCase, dict[str, Any]], PasskeyRun]) -> list[PasskeyRun]:
    runs, start, total = [], time.monotonic(), len(cases) * len(specs)
    for i, cell in enumerate(cases):
        for spec in specs:
            runs.append(run_one(cell, spec))
        done = (i + 1) * len(specs)
        elapsed = time.monotonic() - start
        log.info("passkey %d/%d (context %d, depth %.2f, trial %d): %.0f s, about %.0f s left", done, total,
                 cell.context, cell.depth, cell.trial, elapsed, elapsed / done * (total - done))
    return runs


def _run_one(engine: LLMEngine, cell: GridCase, spec: dict[str, Any], params: SamplingParams) -> PasskeyRun:
    request_id = f"passkey-{time.monotonic_ns()}"
    engine.add_request(request_id, cell.prompt_ids, params, spec)
    tokens: list[int] = []
    final = None
    while final is None:
        for out in engine.step():
            tokens.extend(out.token_ids)
            if out.finished:
                final = out
    answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    metrics, usage = final.metrics, final.kv_usage
    return PasskeyRun(
        policy=policy_label(spec), context=cell.context, depth=cell.depth, trial=cell.trial,
        prompt_tokens=len(cell.prompt_ids), passkey=cell.case.passkey, answer=answer,
        correct=passkey_correct(cell.case, answer), kv_bytes=usage.bytes, kv_peak_bytes=usage.peak_bytes,
        kv_full_bytes=usage.full_bytes, kv_footprint_byte_steps=usage.footprint_byte_steps,
        kv_full_footprint_byte_steps=usage.full_footprint_byte_steps, decode_tokens=len(tokens) - 1,
        decode_seconds=metrics.finished_time - metrics.first_token_time)
