"""Prometheus metrics: vLLM's names for the standard gauges, counters and histograms (so existing
dashboards and routers work), plus `kvserve:` metrics per compression policy.

Gauges are read from the engine when /metrics is scraped; counters and histograms are fed as
sequences finish. prometheus_client appends `_total` to counter names in the exposition, as
vLLM's do."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.outputs import RequestMetrics, RequestOutput
from kvserve.server.admission import Admission

LABELS = ["model_name", "engine"]

# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]
RATIO_BUCKETS = [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]


def token_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(float(value))
        exponent += 1


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, admission: Admission, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}
        self.registry.register(_EngineCollector(engine, admission, self.labels))
        reg = self.registry
        policy = [*LABELS, "policy"]

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=reg, buckets=buckets)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", LABELS, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", LABELS,
                                         registry=reg)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       [*LABELS, "finished_reason"], registry=reg)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between streamed outputs.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds", "Decode time per output token.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time waiting before first scheduled.",
                                    REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "Time from scheduled to first token.",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", "Time from first to last token.",
                                     REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds", "Time from scheduled to finished.",
                                        REQUEST_LATENCY_BUCKETS)
        length_buckets = token_buckets(engine.max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               length_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request.", length_buckets)
        self.request_max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens of requests.",
                                            length_buckets)
        self.request_preemptions = histogram("vllm:request_num_preemptions", "Preemptions per request.",
                                             token_buckets(1000))
        self.policy_requests = Counter("kvserve:requests", "Finished sequences per KV policy and finish reason.",
                                       [*policy, "finished_reason"], registry=reg)
        self.bytes_saved = Counter("kvserve:kv_bytes_saved",
                                   "Bytes of KV cache a full cache would have held beyond what the policy held, "
                                   "at the end of each sequence.", policy, registry=reg)
        self.compression_ratio = Histogram("kvserve:kv_compression_ratio",
                                           "Full-cache bytes over the bytes held at the peak, per sequence.",
                                           policy, registry=reg, buckets=RATIO_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def inter_token(self, seconds: float) -> None:
        self.itl.labels(**self.labels).observe(seconds)

    def finished(self, policy: str, out: RequestOutput, max_tokens: int) -> None:
        """A sequence's final output (any finish reason, abort included)."""
        labels, reason = self.labels, str(out.finish_reason)
        self.request_success.labels(**labels, finished_reason=reason).inc()
        self.policy_requests.labels(**labels, policy=policy, finished_reason=reason).inc()
        self.prompt_tokens.labels(**labels).inc(out.prompt_tokens)
        self.generation_tokens.labels(**labels).inc(out.completion_tokens)
        self.request_prompt_tokens.labels(**labels).observe(out.prompt_tokens)
        self.request_generation_tokens.labels(**labels).observe(out.completion_tokens)
        self.request_max_tokens.labels(**labels).observe(max_tokens)
        if out.kv_usage is not None:
            usage = out.kv_usage
            self.bytes_saved.labels(**labels, policy=policy).inc(max(0, usage.full_bytes - usage.bytes))
            if usage.peak_bytes:
                self.compression_ratio.labels(**labels, policy=policy).observe(usage.full_bytes / usage.peak_bytes)
        if out.metrics is not None:
            self._timings(out.metrics, out.completion_tokens)

    def aborted(self, policy: str) -> None:
        """A sequence abandoned by its client before the engine reported its end."""
        self.request_success.labels(**self.labels, finished_reason="abort").inc()
        self.policy_requests.labels(**self.labels, policy=policy, finished_reason="abort").inc()

    def _timings(self, m: RequestMetrics, completion_tokens: int) -> None:
        labels = self.labels
        self.request_preemptions.labels(**labels).observe(m.num_preemptions)
        if m.finished_time is not None:
            self.e2e.labels(**labels).observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is None or m.first_token_time is None or m.finished_time is None:
            return
        self.queue_time.labels(**labels).observe(m.first_scheduled_time - m.arrival_time)
        self.ttft.labels(**labels).observe(m.first_token_time - m.arrival_time)
        self.prefill_time.labels(**labels).observe(m.first_token_time - m.first_scheduled_time)
        decode = m.finished_time - m.first_token_time
        self.decode_time.labels(**labels).observe(decode)
        self.inference_time.labels(**labels).observe(m.finished_time - m.first_scheduled_time)
        if completion_tokens > 1:
            self.tpot.labels(**labels).observe(decode / (completion_tokens - 1))


class _EngineCollector(Collector):
    """Gauges (and the engine's own preemption counter) read at scrape time."""

    def __init__(self, engine: AsyncEngine, admission: Admission, labels: dict[str, str]) -> None:
        self.engine = engine
        self.admission = admission
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        names, values = list(self.labels), list(self.labels.values())
        stats = self.engine.stats()
        in_use = stats.pages_total - stats.pages_free
        prefix = stats.prefix_cache

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", self.admission.waiting())
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).",
                    in_use / stats.pages_total if stats.pages_total else 0.0)
        yield gauge("kvserve:kv_pages_in_use", "KV pages held by sequences.", in_use)
        yield gauge("kvserve:kv_pages_free", "KV pages free in the pool, cached blocks no sequence holds included "
                    "(freed on demand).", stats.pages_free)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions by the scheduler.", labels=names)
        preemptions.add_metric(values, stats.num_preemptions)
        yield preemptions
        if prefix is not None:
            for name, doc, value, kind in (
                    ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", prefix.queries,
                     CounterMetricFamily),
                    ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", prefix.hits,
                     CounterMetricFamily),
                    ("kvserve:prefix_cache_blocks_evicted", "Cached blocks and compressed prefixes evicted for "
                     "their pages.",
                     prefix.blocks_evicted, CounterMetricFamily),
                    ("kvserve:prefix_cache_blocks", "Blocks in the prefix cache.", prefix.blocks, GaugeMetricFamily),
                    ("kvserve:prefix_cache_compressed", "Compressed prefixes in the prefix cache (share_prefix).",
                     prefix.compressed, GaugeMetricFamily),
                    ("kvserve:prefix_cache_pages", "KV pages the prefix cache holds.", prefix.pages,
                     GaugeMetricFamily),
                    ("kvserve:kv_pages_shared", "KV pages held by more than one owner (sequences, the prefix "
                     "cache).", prefix.pages_shared, GaugeMetricFamily),
                    ("kvserve:kv_bytes_shared", "KV bytes of the pages held by more than one owner.",
                     prefix.pages_shared * stats.page_bytes, GaugeMetricFamily)):
                family = kind(name, doc, labels=names)
                family.add_metric(values, value)
                yield family

        held = GaugeMetricFamily("kvserve:kv_bytes_held", "KV cache bytes held now, per policy.",
                                 labels=[*names, "policy"])
        for policy, nbytes in sorted(stats.bytes_held.items()):
            held.add_metric([*values, policy], nbytes)
        yield held
        evicted = CounterMetricFamily("kvserve:tokens_evicted", "Tokens (per layer and KV head) evicted, per policy.",
                                      labels=[*names, "policy"])
        for policy, count in sorted(stats.tokens_evicted.items()):
            evicted.add_metric([*values, policy], count)
        yield evicted
        in_flight = GaugeMetricFamily("kvserve:requests_in_flight", "Sequences in the engine now, per policy.",
                                      labels=[*names, "policy"])
        for policy, count in sorted(self.admission.in_flight.items()):
            in_flight.add_metric([*values, policy], count)
        yield in_flight

