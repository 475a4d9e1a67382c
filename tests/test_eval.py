"""The evaluation harness and the policy concurrency benchmark on the real default model, on grids
small enough for CI; the fidelity metric on hand-made distributions, the report on constructed runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvserve.cli import main
from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.eval.concurrency import run_concurrency
from kvserve.eval.corpus import stdlib_prose
from kvserve.eval.fidelity import Fidelity, compare_logprobs
from kvserve.eval.harness import EvalGrid, evaluate, evaluate_remote
from kvserve.eval.passkey import passkey_prompt
from kvserve.eval.passkey_grid import PasskeyRun
from kvserve.eval.report import accuracy_grid, summarize
from kvserve.eval.retention import needle_retention
from kvserve.eval.specs import parse_policy_list, policy_label

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # 8-KiB fp32 pages: 4000 of them hold two 264-token sequences uncompressed, beside their headroom;
    # 128 batched tokens make 64-token prefill chunks, so a budgeted policy's bound is below a prompt
    # as `kvserve eval` and `bench` run: without prefix caching, every policy computes its prompts (these
    # passkey prompts share their filler, which `full` would otherwise hold once for all)
    return LLMEngine(EngineConfig(kv_cache_memory=4000 * 8192, max_num_batched_tokens=128, max_num_seqs=16,
                                  enable_prefix_caching=False))


def test_compare_logprobs_on_hand_made_distributions():
    # float64 in: against the exact values a float32 computation (error ~1e-7) or KL(q || p) would be off
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64)
    kl, same = compare_logprobs(p.log(), q.log())
    expected = [0.0, 2 * 0.5 * math.log(0.5 / 0.25), 0.1 * math.log(0.1 / 0.6) + 0.1 * math.log(0.1 / 0.3)
                + 0.8 * math.log(0.8 / 0.1)]
    assert kl.dtype == torch.float64 and kl.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert same.tolist() == [True, False, False]
    # a zero-probability reference token adds nothing, even where the candidate's log-prob is -inf
    kl, _ = compare_logprobs(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, -math.inf]]))
    assert kl.tolist() == [0.0]


def test_summary_rows_and_accuracy_grid_on_constructed_runs():
    def run(policy: str, context: int, depth: float, correct: bool, kv_bytes: int, seconds: float | None
            ) -> PasskeyRun:
        return PasskeyRun(policy=policy, context=context, depth=depth, trial=0, prompt_tokens=context,
                          passkey="12345", answer="12345" if correct else "4", correct=correct, kv_bytes=kv_bytes,
                          kv_peak_bytes=2 * kv_bytes, kv_full_bytes=1000, kv_footprint_byte_steps=3 * kv_bytes,
                          kv_full_footprint_byte_steps=4000, decode_tokens=10, decode_seconds=seconds)

    specs = [{"name": "full"}, {"name": "h2o", "ratio": 0.5}]
    runs = [run("full", 600, 0.5, True, 1000, 1.0), run("full", 300, 0.2, True, 1000, 2.0),
            run("full", 300, 0.5, False, 1000, 4.0), run("full", 300, 0.8, True, 1000, None),
            run("h2o:0.5", 300, 0.2, False, 250, 1.0), run("h2o:0.5", 300, 0.8, True, 500, 1.0)]
    rows = summarize(specs, runs, {"h2o:0.5": Fidelity(kl=0.25, top1=0.5, steps=4)})
    assert [(r.policy, r.context) for r in rows] == [("full", 300), ("full", 600), ("h2o:0.5", 300)]
    full_300, full_600, h2o = rows
    assert (full_300.accuracy, full_600.accuracy, h2o.accuracy) == (2 / 3, 1.0, 0.5)
    assert (h2o.kv_end_pct, h2o.kv_peak_pct, h2o.kv_footprint_pct, h2o.ratio) == (37.5, 75.0, 28.125, 0.5)
    assert full_300.kv_footprint_pct == 75.0
    assert full_300.decode_tok_s == 3.75  # the median of 5 and 2.5 tokens/s; the untimed run left out
    assert (full_300.kl, full_300.top1, h2o.kl, h2o.top1) == (None, None, 0.25, 0.5)
    grid = accuracy_grid(runs, "full", [300, 600], [0.2, 0.5, 0.8])
    assert grid[0][0] == 1.0 and math.isnan(grid[0][1])  # no run at (600, 0.2)
    assert grid[1] == [0.0, 1.0] and grid[2][0] == 1.0


def test_policy_shorthand_and_json_lists():
    specs = parse_policy_list("full,h2o:0.25,corm:window=32:recent=32")
    assert specs == [{"name": "full"}, {"name": "h2o", "ratio": 0.25}, {"name": "corm", "window": 32, "recent": 32}]
    assert [policy_label(s) for s in specs] == ["full", "h2o:0.25", "corm:window=32:recent=32"]
    assert parse_policy_list('[{"name": "snapkv", "budget": 64}]') == [{"name": "snapkv", "budget": 64}]
    with pytest.raises(ValueError, match="ratio"):
        parse_policy_list("h2o:2")


def test_fidelity_text_is_deterministic_prose():
    text = stdlib_prose()
    assert text == stdlib_prose()
    assert len(text) > 40_000 and ">>>" not in text


def test_eval_harness_on_a_tiny_grid(engine, tmp_path):
    specs = parse_policy_list("full,h2o:0.5,streaming_llm:0.25")
    grid = EvalGrid(contexts=[300], depths=[0.2, 0.8], trials=1, answer_tokens=8, fidelity_context=200,
                    fidelity_continuation=12, fidelity_samples=1)
    report = evaluate(engine, specs, grid, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(report.results))
    assert len(results["passkey_runs"]) == 3 * 2
    summary = {row["policy"]: row for row in results["summary"]}
    assert list(summary) == ["full", "h2o:0.5", "streaming_llm:0.25"]
    for row in summary.values():
        assert row["context"] == 300 and row["decode_tok_s"] > 0
    # `full` is measured by a run of its own like any policy: exactly the reference's distributions,
    # as the engine's kernels are batch-invariant and deterministic (a second run is bit-identical)
    assert summary["full"]["kl"] == 0.0 and summary["full"]["top1"] == 1.0
    # compression moves the distributions, a quarter of the cache kept by position more than half by score
    assert 0 < summary["h2o:0.5"]["kl"] < summary["streaming_llm:0.25"]["kl"]
    assert results["fidelity"]["h2o:0.5"]["steps"] == 12
    assert summary["full"]["accuracy"] == 1.0  # a full cache of 300 tokens gives both passkeys back
    for run in results["passkey_runs"]:
        assert 280 <= run["prompt_tokens"] <= 320 and run["decode_tokens"] == 7
        if run["policy"] == "full":
            assert run["kv_bytes"] == run["kv_full_bytes"]
        else:
            assert run["kv_bytes"] < run["kv_full_bytes"]
        if run["policy"] == "streaming_llm:0.25" and run["depth"] == 0.2:
            assert not run["correct"]  # sinks and the newest quarter: the needle near the start is gone
    assert summary["streaming_llm:0.25"]["kv_end_pct"] < summary["h2o:0.5"]["kv_end_pct"] < 100
    assert set(results["heatmaps"]) == set(summary)
    for name in results["heatmaps"].values():
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    assert report.table.splitlines()[0].startswith("| policy | ratio | context | passkey acc")


def test_a_compressing_policy_runs_more_sequences_at_once_than_full(engine):
    results = run_concurrency(engine, [{"name": "full"}, {"name": "h2o", "ratio": 0.25}], num_requests=6,
                              input_len=256, output_len=8)
    full, h2o = results
    assert full.output_tokens == h2o.output_tokens == 6 * 8
    assert 1 <= full.max_running < h2o.max_running
    assert full.tok_s_at_max > 0 and h2o.tok_s_at_max > 0
    for result in results:  # every request's first token, later tokens and KV, once
        assert len(result.ttft) == len(result.tpot) == len(result.kv_peak_bytes) == 6
        assert 0 < min(result.ttft) <= max(result.ttft) < result.seconds and min(result.tpot) > 0
    # full holds its whole cache at its peak; H2O at a quarter holds less
    assert max(full.kv_peak_bytes) == full.kv_full_bytes
    assert max(h2o.kv_peak_bytes) < full.kv_full_bytes == h2o.kv_full_bytes
    assert engine.runner.pool.pages_available == engine.runner.pool.capacity


def test_passkey_against_a_server_reports_its_kv_usage(engine, server, tmp_path):
    specs = parse_policy_list("full,h2o:0.5")
    grid = EvalGrid(contexts=[300], depths=[0.5], trials=1, answer_tokens=8, fidelity_samples=0)
    results = evaluate_remote(server, engine.tokenizer, specs, grid, tmp_path).results
    full, h2o = results["passkey_runs"]
    assert full["kv_bytes"] == full["kv_full_bytes"] and h2o["kv_bytes"] < h2o["kv_full_bytes"]
    assert full["decode_seconds"] is None and results["fidelity"] == {}
    # the same prompt and greedy decoding as in process
    local = evaluate(engine, specs[:1], grid, tmp_path / "local").results["passkey_runs"][0]
    assert full["answer"] == local["answer"] and full["prompt_tokens"] == local["prompt_tokens"]


def test_needle_retention_sees_what_a_policy_kept(engine):
    case = passkey_prompt(engine.tokenizer, 300, 0.5, seed=1)
    full = needle_retention(engine, case, "full")
    assert full.heads_with_all == full.heads_with_passkey == full.tokens_kept == 1.0
    # sinks plus the newest quarter of the prompt: the needle in the middle is gone from every head
    streaming = needle_retention(engine, case, {"name": "streaming_llm", "ratio": 0.25})
    assert streaming.tokens_kept == 0.0 and len(streaming.per_layer_kept) == engine.model_config.num_layers
    assert engine.runner.pool.pages_available == engine.runner.pool.capacity


def test_cli_parses_eval_and_bench_policies(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "policies", "--help"])
    assert exit_info.value.code == 0


def test_bench_policies_prints_each_policy_against_full(capsys):
    main(["bench", "policies", "--kv-cache-memory", str(4000 * 8192), "--max-num-batched-tokens", "128",
          "--policies", "h2o:0.25", "--num-requests", "4", "--input-len", "256", "--output-len", "4"])
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("| full", "| h2o"))}
    full, h2o = rows["full"], rows["h2o:0.25"]
    # columns: max running, output tok/s, x full, tok/s at max running, x full, TTFT p50, TTFT p99, TPOT mean,
    # TPOT p99, KV MiB, KV %, preemptions
    assert full[2] == full[4] == "1.00x" and full[10] == "100%"
    assert int(h2o[0]) > int(full[0]) >= 1
    assert int(h2o[10].rstrip("%")) < 100


def test_a_bad_engine_flag_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "prefill", "--max-num-batched-tokens", "128", "--chunked-prefill-size", "256"])
    assert exit_info.value.code == 2
    assert "chunked_prefill_size must be positive and at most max_num_batched_tokens" in capsys.readouterr().err


def test_bench_prefill_times_each_policy_in_the_chunks_asked_for(capsys):
    main(["bench", "prefill", "--kv-cache-memory", str(2000 * 8192), "--max-num-batched-tokens", "128",
          "--chunked-prefill-size", "32",
          "--policies", "snapkv", "--num-requests", "2", "--input-len", "100"])
    out = capsys.readouterr().out
    assert "2 prompts of 100 tokens, each prefilled alone in chunks of 32 tokens" in out
    ratios = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith(("full ", "snapkv "))}
    assert ratios["full"] == "1.00x" and float(ratios["snapkv"].rstrip("x")) > 0
