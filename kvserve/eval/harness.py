"""`kvserve eval`: passkey retrieval (with needle heatmaps), logit fidelity, KV bytes and decode speed
per policy, in process or (passkey only) against a server. The harness only measures: it hands each
policy the same prompts and never tells it where the needle is."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.eval.corpus import stdlib_prose
from kvserve.eval.fidelity import Fidelity, run_fidelity, text_windows
from kvserve.eval.heatmap import plot_heatmap
from kvserve.eval.passkey_grid import PasskeyRun, grid_cases, run_passkey_local
from kvserve.eval.peer import PeerOptions, PeerResult, run_peer
from kvserve.eval.remote import run_passkey_remote
from kvserve.eval.report import accuracy_grid, summarize, summary_table
from kvserve.eval.specs import parse_policy_list, policy_label
from kvserve.model.loader import load_tokenizer, resolve_model

log = logging.getLogger("kvserve.eval")


@dataclass
class EvalGrid:
    contexts: list[int]
    depths: list[float]
    trials: int
    answer_tokens: int = 16
    fidelity_context: int = 1500
    fidelity_continuation: int = 128
    fidelity_samples: int = 2  # 0: no fidelity


@dataclass
class EvalReport:
    results: dict[str, Any]  # what results.json holds
    table: str


def run_eval(args: argparse.Namespace, config: EngineConfig) -> int:
    specs = parse_policy_list(args.policies)
    grid = EvalGrid([int(c) for c in args.contexts.split(",")], [float(d) for d in args.depths.split(",")],
                    args.trials, args.answer_tokens, args.fidelity_context, args.fidelity_continuation,
                    args.fidelity_samples)
    # checked before the evaluation starts: a missing kvpress venv fails at once, not after it
    peer = (PeerOptions(str(resolve_model(config.model)), config.dtype, args.peer_python,
                        [name for name in args.peer_presses.split(",") if name], args.peer_split_question)
            if args.peer else None)
    if args.url:
        # the prompts are built with the model's own tokenizer, so their lengths hold on the server too
        report = evaluate_remote(args.url, load_tokenizer(resolve_model(config.model)), specs, grid, Path(args.out),
                                 args.api_key, peer)
    else:
        report = evaluate(LLMEngine(config), specs, grid, Path(args.out), peer)
    sys.stdout.write(report.table + "\n")
    return 0


def evaluate(engine: LLMEngine, specs: list[dict[str, Any]], grid: EvalGrid, out: Path,
             peer: PeerOptions | None = None) -> EvalReport:
    start = time.monotonic()
    cases = grid_cases(engine.tokenizer, grid.contexts, grid.depths, grid.trials)
    runs = run_passkey_local(engine, cases, specs, grid.answer_tokens)
    fidelity = {}
    if grid.fidelity_samples > 0:
        ids = list(engine.tokenizer(stdlib_prose())["input_ids"])
        windows = text_windows(ids, grid.fidelity_context, grid.fidelity_continuation, grid.fidelity_samples)
        log.info("fidelity: %d windows of %d + %d tokens, %d policies", len(windows), grid.fidelity_context,
                 grid.fidelity_continuation, len(specs))
        fidelity = dict(zip([policy_label(s) for s in specs], run_fidelity(engine, windows, specs)))
    meta = {"url": None, "model": engine.config.model, "dtype": engine.config.dtype,
            "kv_cache_memory": engine.runner.pool.capacity * engine.runner.pool.page_bytes,
            "seconds": round(time.monotonic() - start, 1)}  # kvserve's; the peer's are its own
    compared = run_peer(peer, engine.tokenizer, cases, specs, runs, grid.answer_tokens, out) if peer else None
    return write_results(specs, grid, runs, fidelity, out, meta, compared)


def evaluate_remote(url: str, tokenizer: Any, specs: list[dict[str, Any]], grid: EvalGrid, out: Path,
                    api_key: str | None = None, peer: PeerOptions | None = None) -> EvalReport:
    start = time.monotonic()
    cases = grid_cases(tokenizer, grid.contexts, grid.depths, grid.trials)
    runs = run_passkey_remote(url, cases, specs, grid.answer_tokens, api_key)
    meta = {"url": url, "seconds": round(time.monotonic() - start, 1)}
    compared = run_peer(peer, tokenizer, cases, specs, runs, grid.answer_tokens, out) if peer else None
    return write_results(specs, grid, runs, {}, out, meta, compared)


def write_results(specs: list[dict[str, Any]], grid: EvalGrid, runs: list[PasskeyRun],
                  fidelity: dict[str, Fidelity], out: Path, meta: dict[str, Any],
                  peer: PeerResult | None = None) -> EvalReport:
    """results.json and one heatmap PNG per policy under `out`; with a peer, its comparison too."""
    out.mkdir(parents=True, exist_ok=True)
    heatmaps = {}
    for spec in specs:
        label = policy_label(spec)
        path = out / f"passkey_{re.sub(r'[^A-Za-z0-9.=-]+', '_', label)}.png"
        plot_heatmap(f"passkey: {label}", grid.contexts, grid.depths,
                     accuracy_grid(runs, label, grid.contexts, grid.depths), path)
        heatmaps[label] = path.name
    rows = summarize(specs, runs, fidelity)
    results = {
        "config": {**meta, **asdict(grid), "policies": specs},
        "summary": [asdict(r) for r in rows],
        "fidelity": {label: asdict(f) for label, f in fidelity.items()},
        "heatmaps": heatmaps,
        "passkey_runs": [asdict(r) for r in runs],
    }
    table = summary_table(rows, grid.fidelity_context if fidelity else None)
    if peer:
        results["peer"] = {**peer.settings, "comparison": [asdict(r) for r in peer.rows]}
        table += "\n\n" + peer.table()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return EvalReport(results, table)
