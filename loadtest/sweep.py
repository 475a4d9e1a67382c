"""A sweep: one run per (load, policy), one after the other against the same server, then one JSON
and one CSV of all runs and the HTML report.

Loads are the outer loop, so that the runs of one load are close in time and a slow drift of the
machine (other jobs) weighs on every policy alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from loadtest.report import html_report
from loadtest.run import RunConfig, run
from loadtest.summary import format_summary

SWEEP_JSON, SWEEP_CSV, REPORT_HTML = "sweep.json", "sweep.csv", "report.html"


def sweep(configs: list[RunConfig], out: Path) -> list[Path]:
    """Run every config; write sweep.json (every run, requests and timelines included), sweep.csv (one
    row per run) and report.html into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n, config in enumerate(configs, 1):
        result = run(config, prefix=f"[{n}/{len(configs)}]")
        print(format_summary(result), flush=True)
        runs.append(result)
        (out / SWEEP_JSON).write_text(json.dumps(runs, indent=1))  # what is done survives an interruption
    write_csv(runs, out / SWEEP_CSV)
    (out / REPORT_HTML).write_text(html_report(runs))
    return [out / SWEEP_JSON, out / SWEEP_CSV, out / REPORT_HTML]


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    """The run's identity and its summary's figures; failures as a JSON object."""
    config = result["config"]
    row = {"policy": result["policy"], "kv_policy": json.dumps(config["policy"]), "load": result["load"],
           "request_rate": config["request_rate"], "concurrency": config["concurrency"],
           "dataset": config["dataset"], "num_requests": config["num_requests"]}
    for key, value in result["summary"].items():
        row[key] = json.dumps(value) if isinstance(value, dict) else value
    return row


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    rows = [csv_row(r) for r in runs]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # the union, in first-seen order
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
