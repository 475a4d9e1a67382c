"""loadtest's pure parts on recorded timings, with results computed by hand: the metrics, the arrival
process, SSE parsing, the /metrics scraper, datasets and the report. No server, no model."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from kvserve.eval.passkey import QUESTION
from loadtest.arrivals import arrival_gaps
from loadtest.client import RequestResult, request_body, stream_completion
from loadtest.datasets import Sample, approx_tokens, build_samples, jsonl_samples
from loadtest.metrics import max_concurrency, parse_slo, summarize, tpot
from loadtest.policies import parse_policy, policy_label
from loadtest.report import html_report
from loadtest.scrape import Scraper, parse_exposition


def recorded() -> list[RequestResult]:
    """Three completed requests and one refused; times in seconds."""
    return [
        RequestResult(0, send=0.0, status=200, ttft=0.1, latency=0.5, itl=[0.1] * 4, output_tokens=5,
                      prompt_tokens=10, cached_tokens=0, correct=True,
                      kv_cache={"bytes": 100, "peak_bytes": 300, "full_bytes": 400, "footprint_byte_steps": 900,
                                "full_footprint_byte_steps": 1200}),
        RequestResult(1, send=0.2, status=200, ttft=0.3, latency=1.1, itl=[0.2] * 4, output_tokens=5,
                      prompt_tokens=20, cached_tokens=16, correct=False,
                      kv_cache={"bytes": 300, "peak_bytes": 500, "full_bytes": 400}),
        RequestResult(2, send=0.3, status=429, error="HTTP 429: queue full", prompt_tokens=7),
        RequestResult(3, send=0.5, status=200, ttft=0.2, latency=0.2, output_tokens=1, prompt_tokens=5),
    ]


def test_summary_of_recorded_timings_matches_hand_computed_figures():
    s = summarize(recorded(), duration=2.0, slo={"ttft": 250, "tpot": 150})
    assert (s["completed"], s["failed"], s["failures"]) == (3, 1, {"429": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 11)  # the refused request counts nowhere
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(5.5)
    assert s["total_token_throughput"] == pytest.approx(23.0)
    # TTFT 100, 300, 200 ms: numpy's linear percentiles over the sorted 100, 200, 300
    assert s["mean_ttft_ms"] == pytest.approx(200)
    assert s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(280)
    assert s["p99_ttft_ms"] == pytest.approx(298)
    # TPOT (0.5 - 0.1) / 4 = 100 ms and (1.1 - 0.3) / 4 = 200 ms; the one-token request has none
    assert s["mean_tpot_ms"] == pytest.approx(150)
    assert s["p90_tpot_ms"] == pytest.approx(190)
    assert s["std_tpot_ms"] == pytest.approx(50)
    # ITL pooled: four gaps of 100 ms and four of 200 ms
    assert s["mean_itl_ms"] == pytest.approx(150)
    assert s["median_itl_ms"] == pytest.approx(150)
    assert s["p90_itl_ms"] == pytest.approx(200)
    # E2E 500, 1100, 200 ms
    assert s["mean_e2el_ms"] == pytest.approx(600)
    assert s["median_e2el_ms"] == pytest.approx(500)
    assert s["p90_e2el_ms"] == pytest.approx(980)
    # goodput: request 0 (100 ms, 100 ms) and request 3 (200 ms, TPOT 0) meet both SLOs; request 1 misses TTFT
    assert s["request_goodput"] == pytest.approx(1.0)
    assert s["accuracy"] == pytest.approx(0.5) and s["scored"] == 2
    assert s["max_concurrent_requests"] == 2  # request 0 ends at 0.5 s, as request 3 starts
    assert (s["mean_kv_bytes"], s["mean_kv_peak_bytes"], s["mean_kv_full_bytes"]) == (200, 400, 400)
    # the second result's server reports no footprint: the mean is over the one that does
    assert (s["mean_kv_footprint_byte_steps"], s["mean_kv_full_footprint_byte_steps"]) == (900, 1200)
    # 16 of the 30 prompt tokens of the two requests whose server said how many it found cached
    assert s["prefix_cache_hit_rate"] == pytest.approx(16 / 30)


def test_empty_and_all_failed_runs_have_no_latencies():
    s = summarize([recorded()[2]], duration=1.0)
    assert s["completed"] == 0 and s["failed"] == 1
    assert s["mean_ttft_ms"] is None and s["p99_e2el_ms"] is None and s["accuracy"] is None
    assert s["request_goodput"] is None and s["mean_kv_bytes"] is None and s["prefix_cache_hit_rate"] is None


def test_tpot_excludes_the_first_token():
    r = RequestResult(0, send=0.0, ttft=1.0, latency=4.0, output_tokens=4)
    assert tpot(r) == pytest.approx(1.0)
    assert tpot(RequestResult(0, send=0.0, ttft=1.0, latency=1.0, output_tokens=1)) is None


def test_max_concurrency_counts_overlaps():
    def r(send: float, latency: float) -> RequestResult:
        return RequestResult(0, send=send, ttft=0.0, latency=latency, output_tokens=1)

    assert max_concurrency([r(0, 3), r(1, 1), r(1.5, 2), r(3, 1)]) == 3
    assert max_concurrency([]) == 0


def test_slo_parsing():
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    for bad in ("ttft", "latency=5", "ttft=0"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_poisson_and_gamma_arrivals_have_the_asked_mean_rate():
    gaps = arrival_gaps(20001, rate=4.0, burstiness=1.0, seed=0)
    assert gaps[0] == 0.0 and np.mean(gaps[1:]) == pytest.approx(0.25, rel=0.03)
    assert np.std(gaps[1:]) == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    bursty = arrival_gaps(20001, rate=4.0, burstiness=0.25, seed=0)
    assert np.mean(bursty[1:]) == pytest.approx(0.25, rel=0.06)
    assert np.std(bursty[1:]) == pytest.approx(0.5, rel=0.1)  # gamma: std = mean / sqrt(shape)
    assert arrival_gaps(3, rate=None, burstiness=1.0, seed=0) == [0.0, 0.0, 0.0]
    assert arrival_gaps(5, 2.0, 1.0, seed=7) == arrival_gaps(5, 2.0, 1.0, seed=7)


def sse(*events: object) -> bytes:
    lines = [": keep-alive\n\n"] + [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def run_stream(handler, sample: Sample, endpoint: str = "completions") -> RequestResult:  # noqa: ANN001
    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            body = request_body(sample, "m", {"name": "full"}, endpoint)
            return await stream_completion(client, 0, sample, body)
    return asyncio.run(go())


def test_a_chat_run_sends_the_context_as_the_system_message_and_reads_deltas():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        usage = {"prompt_tokens": 30, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 16}}
        return httpx.Response(200, content=sse({"choices": [{"delta": {"role": "assistant"}}]},
                                                {"choices": [{"delta": {"content": "It is"}}]},
                                                {"choices": [{"delta": {"content": " 42"}}]},
                                                {"choices": [], "usage": usage}))

    r = run_stream(handler, Sample("A long document.\nWhat is it?", 2, "42", context="A long document."), "chat")
    path, body = seen[0]
    assert path == "/v1/chat/completions" and "prompt" not in body
    assert body["messages"] == [{"role": "system", "content": "A long document."},
                                {"role": "user", "content": "What is it?"}]
    assert r.text == "It is 42" and r.correct and r.cached_tokens == 16
    run_stream(handler, Sample("Just a question?", 2), "chat")
    assert seen[1][1]["messages"] == [{"role": "user", "content": "Just a question?"}]


def test_stream_parsing_takes_tokens_and_kv_bytes_from_usage():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "kv_cache": {"policy": "full", "bytes": 8}}
        return httpx.Response(200, content=sse({"choices": [{"text": "The key"}]}, {"choices": [{"text": " is"}]},
                                                {"choices": [{"text": " 42"}]}, {"choices": [], "usage": usage}))

    r = run_stream(handler, Sample("prompt", 3, expected="42"))
    assert r.success and r.text == "The key is 42" and r.correct
    assert (r.output_tokens, r.prompt_tokens, r.kv_cache) == (3, 9, {"policy": "full", "bytes": 8})
    assert len(r.itl) == 2 and 0 <= r.ttft <= r.latency
    assert bodies[0]["stream_options"] == {"include_usage": True} and bodies[0]["ignore_eos"]
    assert bodies[0]["kv_policy"] == {"name": "full"} and bodies[0]["max_tokens"] == 3


def test_stream_without_usage_counts_chunks_and_failures_keep_their_status():
    r = run_stream(lambda _: httpx.Response(200, content=sse({"choices": [{"text": "a"}]},
                                                             {"choices": [{"text": "b"}]})), Sample("p", 2))
    assert r.output_tokens == 2 and r.prompt_tokens == approx_tokens("p") and r.correct is None
    refused = run_stream(lambda _: httpx.Response(429, json={"error": {"message": "full"}}), Sample("p", 2))
    assert not refused.success and refused.failure == "429"

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert run_stream(unreachable, Sample("p", 2)).failure == "ConnectError"
    garbled = run_stream(lambda _: httpx.Response(200, content=b"data: {not json\n\n"), Sample("p", 2))
    assert garbled.failure == "JSONDecodeError"


EXPOSITION = """# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0"} 0.25
# TYPE kvserve:kv_bytes_held gauge
kvserve:kv_bytes_held{policy="h2o"} 100.0
kvserve:kv_bytes_held{policy="full"} 300.0
# TYPE kvserve:tokens_evicted counter
kvserve:tokens_evicted_total{policy="h2o"} 7.0
"""


def test_scraper_sums_policies_reports_increases_and_tolerates_servers_without_metrics():
    evicted = iter([7.0, 19.0])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=EXPOSITION.replace("} 7.0", f"}} {next(evicted)}"))

    async def scrape(handler) -> Scraper:  # noqa: ANN001
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            scraper = Scraper(client, start=0.0)
            await scraper.scrape()
            await scraper.scrape()
            return scraper

    assert parse_exposition(EXPOSITION)["kvserve:kv_bytes_held"] == 400.0
    summary = asyncio.run(scrape(handler)).summary()
    assert summary == {"max_kv_cache_usage": 0.25, "max_kv_bytes_held": 400.0, "tokens_evicted": 12.0}
    missing = asyncio.run(scrape(lambda _: httpx.Response(404, text="not found")))
    assert not missing.available and missing.timeline == [] and missing.summary() == {}


def test_datasets(tmp_path):
    passkey = build_samples("passkey", 3, 300, 8, seed=1, prefix_len=0)
    assert all(s.expected and s.expected in s.prompt for s in passkey)
    assert all(250 <= approx_tokens(s.prompt) <= 330 for s in passkey)
    assert len({s.expected for s in passkey}) == 3
    rand = build_samples("random", 2, 50, 4, seed=1, prefix_len=0)
    assert [approx_tokens(s.prompt) for s in rand] == [50, 50] and rand[0] != rand[1]
    assert rand == build_samples("random", 2, 50, 4, seed=1, prefix_len=0)
    shared = build_samples("shared-prefix", 2, 10, 4, seed=1, prefix_len=20)
    assert shared[0].prompt.split("\n")[0] == shared[1].prompt.split("\n")[0]
    documents = build_samples("documents", 6, 200, 8, seed=1, prefix_len=0, num_docs=3)
    context = [s.prompt.split("\nQuiz")[0] for s in documents]
    assert context[:3] == context[3:] and len(set(context)) == 3  # each document asked twice, interleaved
    assert len({s.prompt for s in documents}) == 6 and all(s.expected in c for s, c in zip(documents, context))
    assert len({c.split()[1] for c in context}) == 3  # they differ from their second word on
    chats = build_samples("multi-turn", 6, 200, 8, seed=1, prefix_len=0, num_docs=2)
    for earlier, later in zip(chats[:4], chats[2:]):  # turn t + 1 of a conversation extends its turn t
        stem = earlier.prompt.removesuffix(QUESTION)
        assert later.prompt.startswith(stem) and len(later.prompt) > len(earlier.prompt)
        assert later.expected == earlier.expected and later.expected in stem
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "expected": "b"}\n\n{"prompt": "c", "output_len": 2}\n')
    assert jsonl_samples(path, 3, 5) == [Sample("a", 5, "b"), Sample("c", 2), Sample("a", 5, "b")]
    with pytest.raises(ValueError):
        build_samples("sharegpt", 1, 1, 1, 0, 0)


def test_policy_arguments_and_labels():
    assert parse_policy("full") == {"name": "full"}
    assert policy_label(parse_policy('{"name": "h2o", "ratio": 0.25}')) == "h2o ratio=0.25"
    assert policy_label({"name": "kivi", "bits": 2}) == "kivi bits=2"
    assert policy_label(None) == "default"
    with pytest.raises(ValueError):
        parse_policy('{"ratio": 0.5}')


def test_report_without_kv_or_accuracy_data_still_renders():
    summary = summarize(recorded(), duration=2.0)
    runs = [{"policy": p, "load": "1 req/s", "config": {"url": "u", "dataset": "random"}, "timeline": [],
             "summary": {**summary, "accuracy": None, "model": "m"}} for p in ("full", "h2o ratio=0.25")]
    page = html_report(runs)
    assert "full" in page and "h2o ratio=0.25" in page
    assert page.count("data:image/png;base64,") == 1  # only TTFT vs throughput has data
    assert page.count("No data for this plot") == 2
