"""`kvserve eval --peer kvpress`: NVIDIA kvpress's presses on the same passkey prompts, model and dtype
as kvserve's policies, each accuracy beside the other's with its 95% Wilson interval.

kvpress pins transformers<5.3 while kvserve runs 5.x, so kvpress runs in a venv of its own (`make
kvpress-venv`) as a subprocess: kvserve/eval/kvpress_peer.py reads the cases and presses from
`kvpress_input.json` and writes its answers to `kvpress_output.json`, both under the eval's --out.

A policy has a counterpart where kvpress has its method (kvpress_peer.PRESSES) and the spec gives a
`ratio`: the press removes 1 - ratio. Only the ratio crosses over; each side keeps its own other
parameters (kvserve never evicts the prompt's last `recent` tokens, kvpress's SnapKV keeps its last 64
as the observation window, TOVA the last token, the others nothing). `full` is the peer without a
press. --peer-presses adds presses kvserve has no policy for, at every ratio the policies use.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvserve.eval import kvpress_peer
from kvserve.eval.passkey import QUESTION
from kvserve.eval.passkey_grid import GridCase, PasskeyRun
from kvserve.eval.report import interval_text, markdown_table, wilson_interval
from kvserve.eval.specs import policy_label


@dataclass
class PeerOptions:
    model: str  # the HF folder kvserve serves (resolve_model's)
    dtype: str
    python: str  # kvpress's venv's interpreter (`make kvpress-venv`: .venv-kvpress/bin/python)
    extra_presses: list[str] = field(default_factory=list)  # presses without a kvserve policy
    split_question: bool = False  # compress only the context, as kvpress's pipeline does

    def __post_init__(self) -> None:
        unknown = [name for name in self.extra_presses if name not in kvpress_peer.PRESSES]
        if unknown:
            raise ValueError(f"unknown kvpress press {unknown}: known are {sorted(kvpress_peer.PRESSES)}")
        # not resolved: a venv's python is a symlink whose own path makes it the venv's
        if not os.access(self.python, os.X_OK):
            raise FileNotFoundError(f"no kvpress venv at {self.python}: run `make kvpress-venv` to create it "
                                    "(or give its python with --peer-python)")


@dataclass
class ComparisonRow:
    policy: str | None  # kvserve's policy label; None for a press kvserve has no policy for
    kept: float  # the fraction of the prompt kept: kvserve's ratio, 1 - kvpress's compression_ratio
    context: int
    cases: int
    kvserve_accuracy: float | None
    kvserve_interval: tuple[float, float] | None  # 95% Wilson
    press: str  # e.g. KnormPress(compression_ratio=0.75)
    kvpress_accuracy: float
    kvpress_interval: tuple[float, float]
    same_answers: float | None  # the fraction of cases where both sides generated the same text
    kvpress_kv_kept_pct: float  # mean over cases of the compressed tokens' KV pairs kept, in %


@dataclass
class PeerResult:
    settings: dict[str, Any]  # kvpress's version, the peer's seconds, its files under --out
    rows: list[ComparisonRow]

    def table(self) -> str:
        s = self.settings
        scope = "the context only" if s["split_question"] else "the whole prompt"
        return (f"kvpress {s['kvpress']} (transformers {s['transformers']}) on the same prompts, {scope} "
                f"compressed, {s['seconds']:.0f} s:\n" + comparison_table(self.rows))


def counterpart(spec: dict[str, Any]) -> dict[str, Any] | None:
    """kvpress's press for a kvserve policy spec, as kvpress_peer takes it; None where there is none."""
    if spec["name"] == "full":
        return {"name": "full", "compression_ratio": 0.0}
    if spec["name"] not in kvpress_peer.PRESSES or "ratio" not in spec:
        return None
    return {"name": spec["name"], "compression_ratio": round(1.0 - spec["ratio"], 6)}


def peer_presses(specs: list[dict[str, Any]], extra: list[str]) -> list[tuple[str | None, dict[str, Any]]]:
    """(kvserve label or None, press) per row of the comparison: the specs' counterparts, then each
    extra press at every ratio the specs use."""
    pairs = [(policy_label(s), press) for s in specs if (press := counterpart(s))]
    ratios = sorted({press["compression_ratio"] for _, press in pairs if press["name"] != "full"})
    if extra and not ratios:
        raise ValueError("--peer-presses runs at the policies' ratios, and no policy with a counterpart has one")
    pairs += [(None, {"name": name, "compression_ratio": ratio}) for name in extra for ratio in ratios]
    return pairs


def case_id(cell: GridCase | PasskeyRun) -> str:
    return f"{cell.context}:{cell.depth:g}:{cell.trial}"


def peer_job(options: PeerOptions, tokenizer, cases: list[GridCase], presses: list[dict[str, Any]],  # noqa: ANN001
             answer_tokens: int) -> dict[str, Any]:
    """kvpress_peer's INPUT; each press once, however many policies map to it."""
    unique = {kvpress_peer.press_id(p): p for p in presses}
    return {"model": options.model, "dtype": options.dtype, "answer_tokens": answer_tokens,
            "cases": [{"id": case_id(c), "prompt_ids": c.prompt_ids, "passkey": c.case.passkey,
                       "context_len": context_len(tokenizer, c) if options.split_question else None} for c in cases],
            "presses": list(unique.values())}


def context_len(tokenizer, cell: GridCase) -> int:  # noqa: ANN001
    """The prompt's tokens that end before QUESTION begins (a token across the boundary goes with the
    question): the prompt was tokenized whole, so the split follows its tokens' character offsets."""
    body = len(cell.case.prompt) - len(QUESTION)
    offsets = tokenizer(cell.case.prompt, return_offsets_mapping=True)["offset_mapping"]
    if not cell.case.prompt.endswith(QUESTION) or len(offsets) != len(cell.prompt_ids):
        raise ValueError("the prompt does not end with the passkey question, or its ids are not its tokens")
    return sum(end <= body for _, end in offsets)


def run_peer(options: PeerOptions, tokenizer, cases: list[GridCase], specs: list[dict[str, Any]],  # noqa: ANN001
             runs: list[PasskeyRun], answer_tokens: int, out: Path) -> PeerResult:
    """kvpress_peer on the cases kvserve ran, compared with kvserve's `runs` of them."""
    pairs = peer_presses(specs, options.extra_presses)
    out.mkdir(parents=True, exist_ok=True)
    job_path, output_path = out / "kvpress_input.json", out / "kvpress_output.json"
    job_path.write_text(json.dumps(peer_job(options, tokenizer, cases, [p for _, p in pairs], answer_tokens)))
    start = time.monotonic()
    # the peer's progress goes to this process's stderr as it comes
    done = subprocess.run([options.python, kvpress_peer.__file__, str(job_path), str(output_path)], check=False)
    if done.returncode:
        raise RuntimeError(f"the kvpress peer failed (exit {done.returncode}); its log is above")
    output = kvpress_peer.read_output(output_path)
    rows = comparison_rows(pairs, cases, runs, output["runs"])
    settings = {"name": "kvpress", "python": options.python, "kvpress": output.get("kvpress"),
                "transformers": output.get("transformers"), "split_question": options.split_question,
                "seconds": round(time.monotonic() - start, 1), "input": job_path.name, "output": output_path.name}
    return PeerResult(settings, rows)


def comparison_rows(pairs: list[tuple[str | None, dict[str, Any]]], cases: list[GridCase], runs: list[PasskeyRun],
                    peer_runs: dict[tuple[str, str], dict[str, Any]]) -> list[ComparisonRow]:
    """One row per (kvserve policy or extra press, context); `peer_runs` keyed by (press id, case id)."""
    mine = {(r.policy, case_id(r)): r for r in runs}
    rows = []
    for label, press in pairs:
        pid = kvpress_peer.press_id(press)
        for context in sorted({c.context for c in cases}):
            ids = [case_id(c) for c in cases if c.context == context]
            theirs = [peer_runs[(pid, i)] for i in ids]
            ours = [mine[(label, i)] for i in ids] if label is not None else None
            rows.append(ComparisonRow(
                policy=label, kept=round(1.0 - press["compression_ratio"], 6), context=context, cases=len(ids),
                kvserve_accuracy=_mean([r.correct for r in ours]) if ours else None,
                kvserve_interval=_interval([r.correct for r in ours]) if ours else None,
                press=kvpress_peer.describe(press),
                kvpress_accuracy=_mean([r["correct"] for r in theirs]),
                kvpress_interval=_interval([r["correct"] for r in theirs]),
                same_answers=_mean([o.answer == t["answer"] for o, t in zip(ours, theirs)]) if ours else None,
                kvpress_kv_kept_pct=100.0 * _mean([r["kv_kept"] for r in theirs])))
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _interval(outcomes: list[bool]) -> tuple[float, float]:
    return wilson_interval(sum(outcomes), len(outcomes))


def comparison_table(rows: list[ComparisonRow]) -> str:
    headers = ["policy", "kept", "context", "kvserve acc [95% Wilson]", "kvpress press",
               "kvpress acc [95% Wilson]", "same answers", "kvpress KV kept %"]
    return markdown_table(headers, [
        [r.policy or "-", r.kept, r.context, _with_interval(r.kvserve_accuracy, r.kvserve_interval), r.press,
         _with_interval(r.kvpress_accuracy, r.kvpress_interval), r.same_answers, r.kvpress_kv_kept_pct]
        for r in rows])


def _with_interval(accuracy: float | None, interval: tuple[float, float] | None) -> str | None:
    if accuracy is None or interval is None:
        return None
    return f"{accuracy:.2f} {interval_text(interval)}"
