"""Server-side KV usage during a run, read from the Prometheus `/metrics` endpoint.

Scraped once before the first request, every `interval` seconds while the run lasts, and once after
the last one, so counters (preemptions, evictions) are reported as increases over the run. Servers
without `/metrics`, or without some of these names, are fine: what is missing is left out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# timeline key -> exposition names (the first present wins); values are summed over label sets (policies)
GAUGES = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_pages_in_use": ("kvserve:kv_pages_in_use",),
    "kv_bytes_held": ("kvserve:kv_bytes_held",),
}
COUNTERS = {
    "preemptions": ("vllm:num_preemptions_total",),
    "tokens_evicted": ("kvserve:tokens_evicted_total",),
}


def parse_exposition(text: str) -> dict[str, float]:
    """Sample name -> value summed over its label sets."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def pick(samples: dict[str, float], names: dict[str, tuple[str, ...]]) -> dict[str, float]:
    picked = {}
    for key, candidates in names.items():
        for name in candidates:
            if name in samples:
                picked[key] = samples[name]
                break
    return picked


@dataclass
class Scraper:
    """Collects a timeline of points {"t": seconds since `start`, key: value, ...}."""

    client: httpx.AsyncClient
    start: float  # perf_counter of the run's start
    interval: float = 1.0
    timeline: list[dict[str, float]] = field(default_factory=list)
    available: bool = True  # False once /metrics answered with something that is not Prometheus metrics

    async def scrape(self) -> None:
        if not self.available:
            return
        try:
            response = await self.client.get("/metrics", timeout=10)
            samples = parse_exposition(response.text) if response.status_code == 200 else {}
        except httpx.HTTPError:
            return  # a busy server may be slow to answer; the next scrape may get through
        except ValueError:
            samples = {}
        point = pick(samples, GAUGES) | pick(samples, COUNTERS)
        if not point:
            self.available = False
            return
        self.timeline.append({"t": time.perf_counter() - self.start, **point})

    async def run_until(self, stop: asyncio.Event) -> None:
        """Scrape every `interval` seconds until `stop` is set, then once more."""
        while not stop.is_set():
            await self.scrape()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except asyncio.TimeoutError:
                pass
        await self.scrape()

    def summary(self) -> dict[str, Any]:
        """Peaks of the gauges and increases of the counters over the run (absent when not exported)."""
        out: dict[str, Any] = {}
        for key in GAUGES:
            values = [p[key] for p in self.timeline if key in p]
            if values:
                out[f"max_{key}"] = max(values)
        for key in COUNTERS:
            values = [p[key] for p in self.timeline if key in p]
            if values:
                out[key] = values[-1] - values[0]
        return out
