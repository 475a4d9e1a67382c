"""The sweep's self-contained HTML report: a table of every run and three plots embedded as base64
PNG (matplotlib's Agg backend, no display needed), so the file can be mailed or attached to an issue.

- TTFT p99 against output throughput, one line per policy across the loads: the latency cost of load.
- Accuracy against KV bytes, one point per run: what a policy's memory saving costs in answers.
- KV cache usage over time, one panel per load, one line per policy (from /metrics)."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads

from loadtest.summary import MIB  # noqa: E402

COLUMNS = (  # (summary key, heading, format)
    ("completed", "done", "{:d}"), ("failed", "failed", "{:d}"),
    ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "output tok/s", "{:.1f}"),
    ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("mean_tpot_ms", "TPOT mean ms", "{:.0f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.0f}"),
    ("p99_itl_ms", "ITL p99 ms", "{:.0f}"), ("median_e2el_ms", "E2E p50 ms", "{:.0f}"),
    ("p99_e2el_ms", "E2E p99 ms", "{:.0f}"), ("request_goodput", "goodput req/s", "{:.2f}"),
    ("accuracy", "accuracy", "{:.2f}"), ("prefix_cache_hit_rate", "prefix cache hit rate", "{:.2f}"),
    ("mean_kv_bytes", "KV end MiB/req", "mib"),
    ("mean_kv_peak_bytes", "KV peak MiB/req", "mib"), ("mean_kv_full_bytes", "full KV MiB/req", "mib"),
    ("mean_kv_footprint_byte_steps", "KV footprint MiB·steps/req", "mib"),
    ("max_kv_cache_usage", "peak KV usage", "{:.1%}"),
    ("tokens_evicted", "tokens evicted", "{:.0f}"), ("preemptions", "preemptions", "{:.0f}"),
)


def kv_bytes(summary: dict[str, Any]) -> float | None:
    """What a policy keeps of a request's cache: the mean of usage.kv_cache.bytes (held at the request's
    end, after the policy's cuts), else the server's peak held bytes (/metrics) spread over the peak
    number of running requests."""
    if summary.get("mean_kv_bytes") is not None:
        return summary["mean_kv_bytes"]
    if summary.get("max_kv_bytes_held") and summary.get("max_running"):
        return summary["max_kv_bytes_held"] / summary["max_running"]
    return None


def html_report(runs: list[dict[str, Any]]) -> str:
    sections = [_figure("TTFT p99 against output throughput", _ttft_vs_throughput(runs)),
                _figure("Accuracy against KV cache bytes per request", _accuracy_vs_kv(runs)),
                _figure("KV cache usage over time", _kv_over_time(runs))]
    config = runs[0]["config"] if runs else {}
    intro = (f"{len(runs)} runs against {html.escape(str(config.get('url')))}, model "
             f"{html.escape(str(runs[0]['summary'].get('model')))}, dataset {html.escape(str(config.get('dataset')))}, "
             f"{config.get('num_requests')} requests of ~{config.get('input_len')} prompt and "
             f"{config.get('output_len')} output tokens per run." if runs else "No runs.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>loadtest report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,td:nth-child(2)"
            "{text-align:left}img{max-width:100%}</style></head><body><h1>Load test report</h1>"
            f"<p>{intro}</p>{_table(runs)}{''.join(sections)}</body></html>")


def _table(runs: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("policy", "load", *(c[1] for c in COLUMNS)))
    rows = []
    for run in runs:
        cells = [html.escape(run["policy"]), html.escape(run["load"])]
        cells += [_cell(run["summary"].get(key), fmt) for key, _, fmt in COLUMNS]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{value / MIB:.2f}" if fmt == "mib" else fmt.format(value)


def _by_policy(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[run["policy"]].append(run)
    return groups


def _ttft_vs_throughput(runs: list[dict[str, Any]]) -> plt.Figure | None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, group in _by_policy(runs).items():
        points = [(r["summary"]["output_throughput"], r["summary"]["p99_ttft_ms"], r["load"]) for r in group
                  if r["summary"]["output_throughput"] is not None and r["summary"]["p99_ttft_ms"] is not None]
        points.sort()
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        for x, y, load in points:
            ax.annotate(load, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set(xlabel="output throughput (tokens/s)", ylabel="TTFT p99 (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _accuracy_vs_kv(runs: list[dict[str, Any]]) -> plt.Figure | None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, group in _by_policy(runs).items():
        points = [(kv_bytes(r["summary"]), r["summary"]["accuracy"]) for r in group]
        points = [(x / MIB, y) for x, y in points if x is not None and y is not None]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=policy, alpha=0.7)
    if not ax.collections:
        plt.close(fig)
        return None
    ax.set(xlabel="KV cache held per request at its end (MiB)", ylabel="accuracy (answer contains the expected text)",
           ylim=(-0.05, 1.05))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _kv_over_time(runs: list[dict[str, Any]]) -> plt.Figure | None:
    by_load: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if any("kv_cache_usage" in point for point in run["timeline"]):
            by_load[run["load"]].append(run)
    if not by_load:
        return None
    fig, axes = plt.subplots(1, len(by_load), figsize=(4.5 * len(by_load), 3.5), sharey=True, squeeze=False)
    for ax, (load, group) in zip(axes[0], by_load.items()):
        for run in group:
            points = [(p["t"], 100 * p["kv_cache_usage"]) for p in run["timeline"] if "kv_cache_usage" in p]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=run["policy"], drawstyle="steps-post")
        ax.set(title=load, xlabel="time since the run started (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("KV cache pages in use (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure(title: str, fig: plt.Figure | None) -> str:
    if fig is None:
        return f"<h2>{html.escape(title)}</h2><p>No data for this plot in these runs.</p>"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
