"""From raw runs to one row per (policy, context) and the printed table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from kvserve.eval.fidelity import Fidelity
from kvserve.eval.passkey_grid import PasskeyRun
from kvserve.eval.specs import policy_label


@dataclass
class SummaryRow:
    policy: str
    ratio: float | None  # the policy's `ratio`, None where it has none (full, corm, a fixed budget)
    context: int
    accuracy: float
    accuracy_interval: tuple[float, float]  # 95% Wilson, over the runs of this policy and context
    kv_end_pct: float | None  # mean over runs of bytes held at the end / a full cache's bytes, in %
    kv_peak_pct: float | None
    # mean over runs of the footprint (bytes held summed over the request's steps) / a full cache's over
    # the same steps, in %: a percentage, not MiB·steps, so that contexts and models of different sizes
    # compare, and the same steps on both sides, so that it measures what the policy kept and when
    kv_footprint_pct: float | None
    kl: float | None  # logit fidelity (the same for every context: it has its own context length)
    top1: float | None
    decode_tok_s: float | None  # median over the runs of one request's decode rate (batch 1)


def summarize(specs: list[dict[str, Any]], runs: list[PasskeyRun], fidelity: dict[str, Fidelity]
              ) -> list[SummaryRow]:
    rows = []
    for spec in specs:
        label = policy_label(spec)
        mine = [r for r in runs if r.policy == label]
        for context in sorted({r.context for r in mine}):
            cell = [r for r in mine if r.context == context]
            timed = [r for r in cell if r.decode_seconds]
            fid = fidelity.get(label)
            rows.append(SummaryRow(
                policy=label, ratio=spec.get("ratio"), context=context,
                accuracy=sum(r.correct for r in cell) / len(cell),
                accuracy_interval=wilson_interval(sum(r.correct for r in cell), len(cell)),
                kv_end_pct=_mean_pct([(r.kv_bytes, r.kv_full_bytes) for r in cell]),
                kv_peak_pct=_mean_pct([(r.kv_peak_bytes, r.kv_full_bytes) for r in cell]),
                kv_footprint_pct=_mean_pct([(r.kv_footprint_byte_steps, r.kv_full_footprint_byte_steps)
                                            for r in cell]),
                kl=fid.kl if fid else None, top1=fid.top1 if fid else None,
                # the median run: one request slowed by a neighbour on a shared machine does not move it
                decode_tok_s=(statistics.median(r.decode_tokens / r.decode_seconds for r in timed)
                              if timed else None)))
    return rows


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion of `successes` in `n` trials (95% at z = 1.96): unlike
    p ± z·sqrt(p(1-p)/n) it stays within [0, 1] and is not empty at 0 or n successes. (0, 1) at n = 0."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def interval_text(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _mean_pct(pairs: list[tuple[int | None, int | None]]) -> float | None:
    known = [100.0 * part / whole for part, whole in pairs if part is not None and whole]
    return sum(known) / len(known) if known else None


def accuracy_grid(runs: list[PasskeyRun], label: str, contexts: list[int], depths: list[float]
                  ) -> list[list[float]]:
    """[depth][context] passkey accuracy of one policy."""
    grid = []
    for depth in depths:
        row = []
        for context in contexts:
            cell = [r.correct for r in runs if r.policy == label and r.context == context and r.depth == depth]
            row.append(sum(cell) / len(cell) if cell else float("nan"))
        grid.append(row)
    return grid


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def summary_table(rows: list[SummaryRow], fidelity_context: int | None) -> str:
    kl_header = f"KL @{fidelity_context}" if fidelity_context else "KL"
    top1_header = f"top-1 @{fidelity_context}" if fidelity_context else "top-1"
    headers = ["policy", "ratio", "context", "passkey acc", "95% Wilson", "KV end % of full", "KV peak % of full",
               "KV footprint % of full", kl_header, top1_header, "decode tok/s"]
    return markdown_table(headers, [[r.policy, r.ratio, r.context, r.accuracy, interval_text(r.accuracy_interval),
                                     r.kv_end_pct, r.kv_peak_pct, r.kv_footprint_pct, r.kl, r.top1, r.decode_tok_s]
                                    for r in rows])
