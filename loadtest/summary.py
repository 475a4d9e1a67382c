"""The printed result of a run, laid out like `vllm bench serve`'s "Serving Benchmark Result"."""

from __future__ import annotations

from typing import Any

WIDTH = 50
MIB = 1 << 20


def format_summary(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}", _row("Policy:", result["policy"]),
             _row("Load:", result["load"]), _row("Successful requests:", s["completed"]),
             _row("Failed requests:", s["failed"])]
    lines += [_row(f"  status/error {key}:", count) for key, count in s["failures"].items()]
    lines += [_row("Benchmark duration (s):", s["duration"]),
              _row("Total input tokens:", s["total_input_tokens"]),
              _row("Total generated tokens:", s["total_output_tokens"]),
              _row("Request throughput (req/s):", s["request_throughput"]),
              _row("Request goodput (req/s):", s["request_goodput"]),
              _row("Output token throughput (tok/s):", s["output_throughput"]),
              _row("Total token throughput (tok/s):", s["total_token_throughput"]),
              _row("Peak concurrent requests:", s["max_concurrent_requests"])]
    if s["accuracy"] is not None:
        lines.append(_row(f"Accuracy ({s['scored']} scored):", s["accuracy"]))
    if s.get("prefix_cache_hit_rate") is not None:
        lines.append(_row("Prefix cache hit rate (usage):", s["prefix_cache_hit_rate"]))
    for metric, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                          ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{title:-^{WIDTH}}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(_row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} "
                              f"{metric.upper()} (ms):", s[f"{stat}_{metric}_ms"]))
    kv = [_row(title, s[key] / MIB) for key, title in KV_ROWS if s.get(key) is not None]
    kv += [_row(title, s[key] / MIB if key.endswith("bytes_held") else s[key]) for key, title in SERVER_ROWS
           if key in s]
    if kv:
        lines += [f"{'KV cache':-^{WIDTH}}", *kv]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


KV_ROWS = (("mean_kv_bytes", "Mean KV MiB at end (usage):"), ("mean_kv_peak_bytes", "Mean KV peak MiB (usage):"),
           ("mean_kv_full_bytes", "Mean full-cache MiB (usage):"),
           ("mean_kv_footprint_byte_steps", "Mean KV footprint MiB·steps (usage):"),
           ("mean_kv_full_footprint_byte_steps", "Mean full footprint MiB·steps (usage):"))
SERVER_ROWS = (("max_kv_cache_usage", "Peak KV usage (/metrics, 0-1):"),
               ("max_kv_pages_in_use", "Peak KV pages in use:"), ("max_kv_bytes_held", "Peak KV MiB held:"),
               ("max_running", "Peak running requests:"), ("max_waiting", "Peak waiting requests:"),
               ("tokens_evicted", "Tokens evicted (per layer, head):"), ("preemptions", "Preemptions:"))


def _row(title: str, value: Any) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = str(int(value))
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{title:<38}{text:>{WIDTH - 38}}"
