"""`kvserve eval --peer kvpress` without kvpress: the Wilson interval, which kvserve policy maps to which
press, the subprocess's JSON protocol (kvpress_peer's helpers load under kvserve's venv: kvpress and
transformers are imported inside its main()), and the comparison built from a constructed peer output."""

from __future__ import annotations

import json
import math
import sys

import pytest

from kvserve.eval import kvpress_peer
from kvserve.eval.harness import EvalGrid, write_results
from kvserve.eval.passkey import QUESTION, PasskeyCase, passkey_correct
from kvserve.eval.passkey_grid import GridCase, PasskeyRun, grid_cases
from kvserve.eval.peer import (
    PeerOptions,
    PeerResult,
    comparison_rows,
    comparison_table,
    context_len,
    counterpart,
    peer_job,
    peer_presses,
)
from kvserve.eval.report import wilson_interval
from kvserve.model.loader import load_tokenizer, resolve_model


def wilson_roots(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The interval as the roots of (p - p̂)² = z² p (1 - p) / n, a quadratic in p, in float64."""
    phat, z2 = successes / n, z * z
    a, b, c = 1 + z2 / n, -(2 * phat + z2 / n), phat * phat
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


@pytest.mark.parametrize(("successes", "n", "expected"), [
    (0, 10, (0.0, 0.27754)), (10, 10, (0.72246, 1.0)), (5, 10, (0.23659, 0.76341)), (24, 30, (0.62694, 0.90495))])
def test_wilson_interval_against_hand_computed_bounds(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert (low, high) == pytest.approx(wilson_roots(successes, n), abs=1e-12)
    assert (low, high) == pytest.approx(expected, abs=5e-6)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured: nothing known
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # clamped, never past
    wide, narrow = wilson_interval(5, 10), wilson_interval(50, 100)
    assert narrow[0] > wide[0] and narrow[1] < wide[1]
    assert wilson_interval(5, 10, z=2.576)[0] < wide[0]  # 99% is wider than 95%


def test_a_ratio_kept_maps_to_the_fraction_kvpress_removes():
    assert counterpart({"name": "knorm", "ratio": 0.25}) == {"name": "knorm", "compression_ratio": 0.75}
    assert counterpart({"name": "h2o", "ratio": 0.5, "recent": 8}) == {"name": "h2o", "compression_ratio": 0.5}
    assert counterpart({"name": "full"}) == {"name": "full", "compression_ratio": 0.0}
    # no counterpart: a method kvpress lacks, or a fixed budget instead of a ratio
    assert counterpart({"name": "corm", "window": 32}) is None
    assert counterpart({"name": "kivi", "bits": 2}) is None
    assert counterpart({"name": "snapkv", "budget": 512}) is None


def test_peer_presses_leave_out_policies_without_a_counterpart_and_add_extras_at_every_ratio():
    specs = [{"name": "full"}, {"name": "snapkv", "ratio": 0.5}, {"name": "corm"}, {"name": "knorm", "ratio": 0.25}]
    pairs = peer_presses(specs, ["kvzip"])
    assert pairs == [("full", {"name": "full", "compression_ratio": 0.0}),
                     ("snapkv:0.5", {"name": "snapkv", "compression_ratio": 0.5}),
                     ("knorm:0.25", {"name": "knorm", "compression_ratio": 0.75}),
                     (None, {"name": "kvzip", "compression_ratio": 0.5}),
                     (None, {"name": "kvzip", "compression_ratio": 0.75})]
    with pytest.raises(ValueError, match="ratio"):
        peer_presses([{"name": "full"}], ["adakv"])


def test_peer_options_refuse_an_unknown_press_and_point_at_the_make_target(tmp_path):
    with pytest.raises(ValueError, match="unknown kvpress press"):
        PeerOptions("model", "float32", sys.executable, ["pyramidkv"])
    with pytest.raises(FileNotFoundError, match="make kvpress-venv"):
        PeerOptions("model", "float32", str(tmp_path / ".venv-kvpress/bin/python"))


def cell(context: int, depth: float, passkey: str, ids: list[int]) -> GridCase:
    return GridCase(context, depth, 0, PasskeyCase("filler" + QUESTION, passkey, depth), ids)


def run(policy: str, grid_cell: GridCase, answer: str) -> PasskeyRun:
    return PasskeyRun(policy=policy, context=grid_cell.context, depth=grid_cell.depth, trial=0,
                      prompt_tokens=len(grid_cell.prompt_ids), passkey=grid_cell.case.passkey, answer=answer,
                      correct=passkey_correct(grid_cell.case, answer), kv_bytes=None, kv_peak_bytes=None,
                      kv_full_bytes=None, kv_footprint_byte_steps=None, kv_full_footprint_byte_steps=None,
                      decode_tokens=7, decode_seconds=None)


def test_the_job_goes_through_the_peers_json_protocol(tmp_path):
    cases = [cell(300, 0.25, "11111", [1, 2, 3]), cell(300, 0.75, "22222", [4, 5])]
    # knorm:0.5 and knorm:0.5:x=1 map to one press: the peer runs it once
    pairs = peer_presses([{"name": "full"}, {"name": "knorm", "ratio": 0.5}, {"name": "knorm", "ratio": 0.5, "x": 1}],
                         [])
    options = PeerOptions("/models/smol", "float32", sys.executable)
    path = tmp_path / "in.json"
    path.write_text(json.dumps(peer_job(options, None, cases, [p for _, p in pairs], answer_tokens=16)))
    job = kvpress_peer.read_input(path)
    assert (job["model"], job["dtype"], job["answer_tokens"]) == ("/models/smol", "float32", 16)
    assert job["cases"] == [{"id": "300:0.25:0", "prompt_ids": [1, 2, 3], "passkey": "11111", "context_len": None},
                            {"id": "300:0.75:0", "prompt_ids": [4, 5], "passkey": "22222", "context_len": None}]
    assert [kvpress_peer.press_id(p) for p in job["presses"]] == ["full:0", "knorm:0.5"]

    runs = [{"press": "knorm:0.5", "case": "300:0.25:0", "answer": " 11111.", "answer_ids": [5], "correct": True,
             "kv_kept": 0.5, "seconds": 1.0}]
    kvpress_peer.write_output(tmp_path / "out.json", runs, {"kvpress": "0.5.5"}, 12.34)
    output = kvpress_peer.read_output(tmp_path / "out.json")
    assert output["kvpress"] == "0.5.5" and output["seconds"] == 12.3
    assert output["runs"] == {("knorm:0.5", "300:0.25:0"): runs[0]}


@pytest.mark.parametrize(("presses", "drop", "message"), [
    ([{"name": "quest", "compression_ratio": 0.5}], None, "unknown press 'quest'"),
    ([{"name": "knorm", "compression_ratio": 1.0}], None, "compression_ratio of knorm"),
    ([], "cases", "no \\['cases'\\]")])
def test_the_peer_refuses_a_bad_job_before_it_imports_kvpress(tmp_path, presses, drop, message):
    job = {"model": "m", "dtype": "float32", "answer_tokens": 4, "cases": [], "presses": presses}
    job.pop(drop, None)
    (tmp_path / "in.json").write_text(json.dumps(job))
    # kvpress is not in this venv: an import would raise ModuleNotFoundError, not this
    with pytest.raises(ValueError, match=message):
        kvpress_peer.main([str(tmp_path / "in.json"), str(tmp_path / "out.json")])


def test_the_peer_judges_an_answer_as_kvserve_does():
    case = PasskeyCase("", "48213", 0.5)
    for answer in [" 48213.", "48213", " 4821", "The pass key is 48213", " " * 28 + "48213", "x" * 30 + "48213", ""]:
        assert kvpress_peer.is_correct(case.passkey, answer) == passkey_correct(case, answer)


def test_comparison_rows_and_table_from_a_constructed_peer_output(tmp_path):
    cases = [cell(300, 0.25, "11111", [1, 2, 3]), cell(300, 0.75, "22222", [4, 5]),
             cell(600, 0.5, "33333", [6, 7])]
    specs = [{"name": "full"}, {"name": "knorm", "ratio": 0.25}, {"name": "corm"}]
    kvserve = [run("full", cases[0], " 11111."), run("full", cases[1], " 22222."), run("full", cases[2], " 33333."),
               run("knorm:0.25", cases[0], " 11111."), run("knorm:0.25", cases[1], " 2."),
               run("knorm:0.25", cases[2], " 3.")]
    answers = {("full:0", "300:0.25:0"): " 11111.", ("full:0", "300:0.75:0"): " 22222.",
               ("full:0", "600:0.5:0"): " 33.", ("knorm:0.75", "300:0.25:0"): " 1.",
               ("knorm:0.75", "300:0.75:0"): " 2.", ("knorm:0.75", "600:0.5:0"): " 33333.",
               ("adakv:0.75", "300:0.25:0"): " 11111.", ("adakv:0.75", "300:0.75:0"): " 22222.",
               ("adakv:0.75", "600:0.5:0"): " 33333."}
    passkeys = {"300:0.25:0": "11111", "300:0.75:0": "22222", "600:0.5:0": "33333"}
    peer = {key: {"answer": a, "correct": passkeys[key[1]] in a, "kv_kept": 1.0 if key[0] == "full:0" else 0.25}
            for key, a in answers.items()}
    rows = comparison_rows(peer_presses(specs, ["adakv"]), cases, kvserve, peer)
    assert [(r.policy, r.press, r.context) for r in rows] == [
        ("full", "no press", 300), ("full", "no press", 600),
        ("knorm:0.25", "KnormPress(compression_ratio=0.75)", 300),
        ("knorm:0.25", "KnormPress(compression_ratio=0.75)", 600),
        (None, "AdaKVPress(ExpectedAttentionPress(compression_ratio=0.75))", 300),
        (None, "AdaKVPress(ExpectedAttentionPress(compression_ratio=0.75))", 600)]
    full_300, full_600, knorm_300, knorm_600, ada_300, _ = rows
    assert (full_300.kvserve_accuracy, full_300.kvpress_accuracy, full_300.same_answers) == (1.0, 1.0, 1.0)
    assert (full_600.kvserve_accuracy, full_600.kvpress_accuracy, full_600.same_answers) == (1.0, 0.0, 0.0)
    assert (knorm_300.kept, knorm_300.cases) == (0.25, 2)
    assert (knorm_300.kvserve_accuracy, knorm_300.kvpress_accuracy) == (0.5, 0.0)
    assert knorm_300.same_answers == 0.5  # " 2." on both sides
    assert knorm_300.kvserve_interval == wilson_interval(1, 2) and knorm_300.kvpress_interval == wilson_interval(0, 2)
    assert (knorm_600.kvserve_accuracy, knorm_600.kvpress_accuracy) == (0.0, 1.0)
    assert knorm_300.kvpress_kv_kept_pct == 25.0 and full_300.kvpress_kv_kept_pct == 100.0
    assert (ada_300.policy, ada_300.kvserve_accuracy, ada_300.kvserve_interval, ada_300.same_answers) == (
        None, None, None, None)

    table = comparison_table(rows).splitlines()
    assert table[0] == ("| policy | kept | context | kvserve acc [95% Wilson] | kvpress press | "
                        "kvpress acc [95% Wilson] | same answers | kvpress KV kept % |")
    assert table[4] == ("| knorm:0.25 | 0.25 | 300 | 0.50 [0.09, 0.91] | KnormPress(compression_ratio=0.75) | "
                        "0.00 [0.00, 0.66] | 0.5 | 25.0 |")
    assert table[6].startswith("| - | 0.25 | 300 | - | AdaKVPress(ExpectedAttentionPress(compression_ratio=0.75)) | "
                               "1.00 [0.34, 1.00] | - |")

    # results.json carries the comparison, the printed output both tables
    result = PeerResult({"name": "kvpress", "kvpress": "0.5.5", "transformers": "5.2.0", "split_question": False,
                         "seconds": 42.0}, rows)
    grid = EvalGrid(contexts=[300, 600], depths=[0.25, 0.5, 0.75], trials=1, fidelity_samples=0)
    report = write_results(specs[:2], grid, kvserve, {}, tmp_path, {}, result)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["peer"]["kvpress"] == "0.5.5" and len(saved["peer"]["comparison"]) == 6
    assert saved["peer"]["comparison"][2]["kvserve_interval"] == list(wilson_interval(1, 2))
    assert saved["summary"][2]["accuracy_interval"] == list(wilson_interval(1, 2))
    assert "| policy | ratio | context | passkey acc | 95% Wilson |" in report.table
    assert "kvpress 0.5.5 (transformers 5.2.0) on the same prompts, the whole prompt compressed, 42 s:" in report.table
    assert table[4] in report.table


def test_the_context_ends_where_the_question_begins():
    tokenizer = load_tokenizer(resolve_model(None))
    (grid_cell,) = grid_cases(tokenizer, [300], [0.5], 1)
    n = context_len(tokenizer, grid_cell)
    context, question = grid_cell.prompt_ids[:n], grid_cell.prompt_ids[n:]
    assert tokenizer.decode(context) + tokenizer.decode(question) == grid_cell.case.prompt
    # the question's ids hold QUESTION and at most a token that straddles its start
    assert tokenizer.decode(question).endswith(QUESTION)
    assert len(question) <= len(tokenizer(QUESTION)["input_ids"]) + 1
