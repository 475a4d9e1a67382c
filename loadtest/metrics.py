"""The figures of `vllm bench serve`, computed from per-request timings (vllm/benchmarks/serve.py,
`calculate_metrics`), under its names so result files compare directly:

- TTFT: send -> first chunk with choices. E2EL: send -> last chunk with choices.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), per request with more than one output token.
- ITL: every gap between consecutive chunks, pooled over requests.
- Throughputs: completed requests, output tokens, input + output tokens, each over the benchmark
  duration (first send -> last completion); goodput: requests meeting every SLO, over the duration.
Percentiles are numpy's linear interpolation, as vLLM's. Failed requests count in `failed` and
`failures` (by status code or error) and nowhere else; accuracy is over the scored completed ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtest.client import RequestResult

PERCENTILES = (90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=500,tpot=50` (milliseconds; also `e2el`) -> {"ttft": 500.0, "tpot": 50.0}."""
    slo: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo: expected NAME=MS with NAME in {', '.join(SLO_METRICS)}, got {item!r}")
        slo[name] = float(value)
        if slo[name] <= 0:
            raise ValueError(f"--slo: {name} must be positive")
    return slo


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first; None for a request of one token (or a failed one)."""
    if result.latency is None or result.ttft is None or result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def distribution(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of `name` in milliseconds; None where there are no values."""
    values = np.asarray(seconds, dtype=float) * 1000.0
    stats: dict[str, float | None] = {}
    empty = values.size == 0
    stats[f"mean_{name}_ms"] = None if empty else float(values.mean())
    stats[f"median_{name}_ms"] = None if empty else float(np.median(values))
    stats[f"std_{name}_ms"] = None if empty else float(values.std())
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = None if empty else float(np.percentile(values, p))
    return stats


def meets_slo(result: RequestResult, slo: dict[str, float]) -> bool:
    """Every SLO met (vLLM's goodput; a one-token request's TPOT counts as 0)."""
    assert result.ttft is not None and result.latency is not None
    measured = {"ttft": result.ttft, "tpot": tpot(result) or 0.0, "e2el": result.latency}
    return all(measured[name] * 1000.0 <= limit for name, limit in slo.items())


def max_concurrency(results: Sequence[RequestResult]) -> int:
    """The most completed requests in flight at once (send -> last chunk)."""
    events = sorted([(r.send, 1) for r in results] + [(r.send + r.latency, -1) for r in results],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def summarize(results: Sequence[RequestResult], duration: float, slo: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """The run's figures; `duration` is the benchmark's wall time in seconds."""
    done = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    scored = [r for r in done if r.correct is not None]
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(failed),
        "failures": dict(sorted(Counter(r.failure for r in failed).items())),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "request_goodput": (sum(meets_slo(r, slo) for r in done) / duration
                            if slo and duration > 0 else None),
        "output_throughput": total_output / duration if duration > 0 else None,
        "total_token_throughput": (total_input + total_output) / duration if duration > 0 else None,
        "max_concurrent_requests": max_concurrency(done),
        "accuracy": sum(bool(r.correct) for r in scored) / len(scored) if scored else None,
        "scored": len(scored),
    }
    summary |= distribution("ttft", [r.ttft for r in done])
    summary |= distribution("tpot", [t for r in done if (t := tpot(r)) is not None])
    summary |= distribution("itl", [gap for r in done for gap in r.itl])
    summary |= distribution("e2el", [r.latency for r in done])
    summary |= kv_cache_means(done)
    reported = [r for r in done if r.cached_tokens is not None]
    summary["prefix_cache_hit_rate"] = (sum(r.cached_tokens for r in reported) / sum(r.prompt_tokens for r in reported)
                                        if reported and sum(r.prompt_tokens for r in reported) else None)
    return summary


def kv_cache_means(results: Sequence[RequestResult]) -> dict[str, float | None]:
    """Mean per-request `usage.kv_cache` bytes (end, peak, full-cache) and footprints (byte-steps, own and
    a full cache's) where the server reports them; a server without footprints leaves those None."""
    reported = [r.kv_cache for r in results if r.kv_cache]
    keys = {"kv_bytes": "bytes", "kv_peak_bytes": "peak_bytes", "kv_full_bytes": "full_bytes",
            "kv_footprint_byte_steps": "footprint_byte_steps",
            "kv_full_footprint_byte_steps": "full_footprint_byte_steps"}
    means: dict[str, float | None] = {}
    for name, key in keys.items():
        values = [kv[key] for kv in reported if key in kv]
        means[f"mean_{name}"] = float(np.mean(values)) if values else None
    return means
