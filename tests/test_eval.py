"""The evaluation harness and the policy concurrency benchmark on the real default model, on grids
small enough for CI; the fidelity metric on hand-made distributions."""

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
from kvserve.eval.fidelity import compare_logprobs
from kvserve.eval.harness import EvalGrid, evaluate, evaluate_remote
from kvserve.eval.passkey import passkey_prompt
from kvserve.eval.retention import needle_retention
from kvserve.eval.specs import parse_policy_list, policy_label

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # 8-KiB fp32 pages: 4000 of them hold two 264-token sequences uncompressed, beside their headroom;
    # 128 batched tokens make 64-token prefill chunks, so a budgeted policy's bound is below a prompt
    return LLMEngine(EngineConfig(kv_cache_memory=4000 * 8192, max_num_batched_tokens=128, max_num_seqs=16))


def test_compare_logprobs_on_hand_made_distributions():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]])
    kl, same = compare_logprobs(p.log(), q.log())
    expected = [0.0, 2 * 0.5 * math.log(0.5 / 0.25), 0.1 * math.log(0.1 / 0.6) + 0.1 * math.log(0.1 / 0.3)
                + 0.8 * math.log(0.8 / 0.1)]
    assert kl.tolist() == pytest.approx(expected)
    assert same.tolist() == [True, False, False]
    # a zero-probability reference token adds nothing, even where the candidate's log-prob is -inf
    kl, _ = compare_logprobs(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, -math.inf]]))
    assert kl.tolist() == [0.0]


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
        assert row["context"] == 300 and 0 <= row["accuracy"] <= 1
        assert 0 <= row["top1"] <= 1 and row["kl"] >= 0 and row["decode_tok_s"] > 0
    assert summary["full"]["kl"] == 0.0 and summary["full"]["top1"] == 1.0
    assert results["fidelity"]["h2o:0.5"]["steps"] == 12
    for run in results["passkey_runs"]:
        assert 280 <= run["prompt_tokens"] <= 320 and run["decode_tokens"] == 7
        if run["policy"] == "full":
            assert run["kv_bytes"] == run["kv_full_bytes"]
        else:
            assert run["kv_bytes"] < run["kv_full_bytes"]
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
    assert engine.runner.pool.pages_free == engine.runner.pool.capacity


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
    assert engine.runner.pool.pages_free == engine.runner.pool.capacity


def test_cli_parses_eval_and_bench_policies(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "policies", "--help"])
    assert exit_info.value.code == 0
