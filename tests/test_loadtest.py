"""loadtest against the live shared kvserve (the `server` fixture): the figures are consistent with
each other, the run stops by itself, failures are counted by status, and a sweep's JSON, CSV and
HTML hold every policy. Runs are kept short (a few requests of ~64 prompt and 8-16 output tokens):
the server is shared with the rest of the suite."""

from __future__ import annotations

import csv
import json

import pytest

from loadtest.__main__ import main
from loadtest.run import CANCELLED, RunConfig, run

H2O = {"name": "h2o", "ratio": 0.25}


def check_consistent(result: dict, asked: int) -> None:
    s, requests = result["summary"], result["requests"]
    assert s["completed"] + s["failed"] == asked == len(requests)
    assert sum(s["failures"].values()) == s["failed"]
    done = [r for r in requests if r["error"] is None]
    assert len(done) == s["completed"]
    for r in done:
        assert 0 < r["ttft"] <= r["latency"] <= s["duration"]
        assert sum(r["itl"]) == pytest.approx(r["latency"] - r["ttft"], abs=1e-6)
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in done)
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in done)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])
    assert s["request_throughput"] == pytest.approx(s["completed"] / s["duration"])
    assert s["total_token_throughput"] == pytest.approx((s["total_input_tokens"] + s["total_output_tokens"])
                                                        / s["duration"])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert s[f"median_{metric}_ms"] <= s[f"p90_{metric}_ms"] <= s[f"p99_{metric}_ms"]
    assert s["median_ttft_ms"] <= s["median_e2el_ms"]
    assert 1 <= s["max_concurrent_requests"] <= asked


def test_open_loop_run_against_kvserve_is_consistent(server):
    config = RunConfig(url=server, dataset="random", num_requests=8, request_rate=8.0, input_len=64, output_len=16,
                       policy=H2O, slo={"ttft": 60_000, "tpot": 60_000}, scrape_interval=0.5)
    result = run(config)
    check_consistent(result, 8)
    s = result["summary"]
    assert s["failed"] == 0 and s["total_output_tokens"] == 8 * 16  # ignore_eos: exactly the asked length
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])  # SLOs nobody misses
    assert all(r["kv_cache"]["policy"] == "h2o" for r in result["requests"])
    assert s["mean_kv_bytes"] < s["mean_kv_full_bytes"]  # h2o 0.25 keeps less than a full cache
    assert 0 < s["mean_kv_footprint_byte_steps"] < s["mean_kv_full_footprint_byte_steps"]
    assert s["tokens_evicted"] > 0 and s["max_kv_pages_in_use"] > 0 and "preemptions" in s
    assert len(result["timeline"]) >= 2 and result["timeline"][-1]["running"] == 0


def test_cli_closed_loop_passkey_run_writes_its_result(server, tmp_path, capsys):
    assert main(["run", "--url", server, "--dataset", "passkey", "--num-requests", "4", "--concurrency", "2",
                 "--input-len", "64", "--output-len", "8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    check_consistent(result, 4)
    assert result["summary"]["max_concurrent_requests"] <= 2
    assert result["summary"]["scored"] == 4 and result["summary"]["accuracy"] is not None
    out = capsys.readouterr()
    assert "Serving Benchmark Result" in out.out and "Accuracy (4 scored)" in out.out
    assert "4/4 requests" in out.err  # the progress line


def test_a_documents_run_from_a_cold_cache_reports_its_hit_rate(server, tmp_path):
    assert main(["run", "--url", server, "--dataset", "documents", "--num-docs", "1", "--num-requests", "4",
                 "--concurrency", "1", "--input-len", "200", "--output-len", "4", "--reset-prefix-cache",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    check_consistent(result, 4)
    cached = [r["cached_tokens"] for r in result["requests"]]  # in send order: the first computes the document
    assert cached[0] == 0 and all(c >= 128 for c in cached[1:]), cached
    assert result["summary"]["prefix_cache_hit_rate"] == sum(cached) / result["summary"]["total_input_tokens"]
    assert result["summary"]["accuracy"] is not None


def test_a_documents_run_shares_one_compressed_document_counted_by_tokenize(server, tmp_path):
    policy = '{"name": "snapkv", "ratio": 0.5, "share_prefix": true}'
    assert main(["run", "--url", server, "--dataset", "documents", "--num-docs", "1", "--num-requests", "3",
                 "--concurrency", "3", "--input-len", "200", "--output-len", "4", "--reset-prefix-cache",
                 "--policy", policy, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    check_consistent(result, 3)
    # every request, the first included, started from the document compressed once (its whole blocks)
    cached = {r["cached_tokens"] for r in result["requests"]}
    assert len(cached) == 1 and cached.pop() >= 128
    assert result["config"]["policy"]["share_prefix"] is True


def test_a_sweep_runs_each_policy_with_prefixes_shared_and_isolated(server, tmp_path):
    assert main(["sweep", "--url", server, "--dataset", "documents", "--num-docs", "1", "--num-requests", "3",
                 "--input-len", "150", "--output-len", "2", "--concurrencies", "1", "--policy", "full",
                 "--prefix-sharing", "shared,isolated", "--reset-prefix-cache", "--out", str(tmp_path)]) == 0
    shared, isolated = json.loads((tmp_path / "sweep.json").read_text())
    assert shared["policy"] == "full" and isolated["policy"] == "full, prefixes isolated"
    assert shared["summary"]["prefix_cache_hit_rate"] > 0.5  # 2 of 3 find the document
    assert isolated["summary"]["prefix_cache_hit_rate"] == 0  # each request its own cache_salt
    assert "prefixes isolated" in (tmp_path / "sweep.csv").read_text()


def test_a_run_stops_at_max_duration_and_counts_failures_by_status(server):
    result = run(RunConfig(url=server, num_requests=3, concurrency=3, input_len=64, output_len=2000,
                           max_duration=1.5))
    assert result["summary"]["duration"] < 5
    assert result["summary"]["failures"] == {"cancelled": 3}
    assert all(r["error"] == CANCELLED for r in result["requests"])
    refused = run(RunConfig(url=server, num_requests=2, input_len=16, output_len=2,
                            policy={"name": "h2o", "ratio": 7}))
    assert refused["summary"]["failures"] == {"400": 2} and refused["summary"]["completed"] == 0


def test_sweep_report_holds_every_policy(server, tmp_path):
    policies = ["full", json.dumps(H2O), '{"name":"streaming_llm","ratio":0.25}']
    argv = ["sweep", "--url", server, "--dataset", "passkey", "--num-requests", "3", "--input-len", "64",
            "--output-len", "8", "--request-rates", "inf", "--out", str(tmp_path)]
    for policy in policies:
        argv += ["--policy", policy]
    assert main(argv) == 0
    labels = ["full", "h2o ratio=0.25", "streaming_llm ratio=0.25"]
    runs = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["policy"] for r in runs] == labels
    for r in runs:
        check_consistent(r, 3)
    with (tmp_path / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["policy"] for row in rows] == labels
    assert [float(row["output_throughput"]) for row in rows] == pytest.approx(
        [r["summary"]["output_throughput"] for r in runs])
    page = (tmp_path / "report.html").read_text()
    assert all(label in page for label in labels)
    assert page.count("data:image/png;base64,") == 3
