"""Serving benchmark: kvserve against `transformers serve --continuous-batching` on the same model.

`python -m kvserve.server.bench` starts each server in turn (never both at once, so they do not
share the CPU or GPU), kvserve then transformers for each of `--rounds` rounds. Against each it sends
a warm-up request, then has N concurrent clients stream completions (prompts of ~200 words, greedy,
a fixed number of tokens with EOS ignored), and it prints output tokens/s, TTFT p50/p99 and time per
output token side by side with kvserve/transformers ratios, medians over the rounds.
The client and the figures are loadtest's (`vllm bench serve`'s definitions: TTFT = first chunk -
send; TPOT = (last - first) / (tokens - 1)). Nothing is downloaded: both servers read the local model folder."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kvserve.kernels import cpu_library
from kvserve.model.loader import resolve_model
from kvserve.server.process import ServerProcess
from loadtest.client import stream_completion
from loadtest.datasets import Sample, random_words
from loadtest.metrics import summarize

SERVER_START_TIMEOUT_S = 600


def prompts(count: int, words: int) -> list[str]:
    rng = random.Random(0)
    return [f"Story {i}: {random_words(rng, words)}. Continue the story:" for i in range(count)]


async def run_clients(url: str, bodies: list[dict], texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Every body streamed at once after one warm-up request (first-request set-up is not serving
    speed); loadtest's figures over them, a failed request an error."""
    samples = [Sample(text, max_tokens) for text in texts]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(bodies))
                                 ) as client:
        await stream_completion(client, 0, samples[0], bodies[0])
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, i, sample, body)
                                         for i, (sample, body) in enumerate(zip(samples, bodies))))
        duration = time.perf_counter() - start
    failed = [r.error for r in results if not r.success]
    if failed:
        raise RuntimeError(f"{url}: {len(failed)} requests failed, e.g. {failed[0]}")
    return summarize(results, duration)


def transformers_model_folder(folder: Path, scratch: Path) -> Path:
    """`transformers serve` picks the model class from config.json's `architectures`, which the
    GGUF conversion does not write: give it a folder of links to the same files and that field."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures"):
        return folder
    for item in folder.iterdir():
        if item.name != "config.json":
            (scratch / item.name).symlink_to(item.resolve())
    config["architectures"] = ["LlamaForCausalLM"]
    (scratch / "config.json").write_text(json.dumps(config))
    return scratch


def bench_kvserve(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    flags = ["--dtype", args.dtype, *(["--model", args.model] if args.model else []), *args.kvserve_args]
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for t in texts]
    with ServerProcess.kvserve(*flags, timeout=SERVER_START_TIMEOUT_S) as server:
        return asyncio.run(run_clients(server.url, bodies, texts, args.max_tokens))


def bench_transformers(args: argparse.Namespace, texts: list[str], folder: Path) -> dict[str, Any]:
    command = lambda port: [str(Path(sys.executable).with_name("transformers")), "serve", str(folder),
                            "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
                            "--device", args.hf_device]
    # a fresh generation config has no EOS token: the same fixed-length, greedy generation as ignore_eos
    config = json.dumps({"max_new_tokens": args.max_tokens, "do_sample": False})
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "generation_config": config} for t in texts]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with ServerProcess(command, SERVER_START_TIMEOUT_S, env, name="transformers-serve") as server:
        return asyncio.run(run_clients(server.url, bodies, texts, args.max_tokens))


METRICS = (("output tokens/s", "output_throughput", 1.0), ("TTFT p50 (s)", "median_ttft_ms", 1e-3),
           ("TTFT p99 (s)", "p99_ttft_ms", 1e-3), ("time per output token (ms)", "mean_tpot_ms", 1.0))


def report(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """Each server's median over rounds, and the median of the rounds' ratios (round i's two runs are
    minutes apart, so a busy spell on a shared host weighs on both)."""
    lines = [f"{'':28}{'kvserve':>12}{'transformers':>14}{'ratio':>9}"]
    for name, key, unit in METRICS:
        ratio = statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))
        lines.append(f"{name:28}{statistics.median(s[key] for s in ours) * unit:12.3f}"
                     f"{statistics.median(s[key] for s in theirs) * unit:14.3f}{ratio:9.2f}")
    if len(ours) > 1:
        by_round = ", ".join(f"{a['output_throughput']:.1f} / {b['output_throughput']:.1f}"
                             for a, b in zip(ours, theirs))
        lines.append(f"medians of {len(ours)} rounds; output tokens/s by round (kvserve / transformers): {by_round}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.server.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="as for kvserve serve (default: the built-in model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--words", type=int, default=200, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hf-device", default="auto", help="transformers serve --device")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of kvserve then transformers, each server started afresh")
    parser.add_argument("--kvserve-args", nargs=argparse.REMAINDER, default=[],
                        help="further `kvserve serve` flags (last on the line)")
    args = parser.parse_args(argv)

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    texts = prompts(args.clients, args.words)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        folder = transformers_model_folder(resolve_model(args.model), Path(scratch))
        for _ in range(args.rounds):
            ours.append(bench_kvserve(args, texts))
            theirs.append(bench_transformers(args, texts, folder))
    print(f"{args.clients} concurrent streaming clients, ~{args.words}-word prompts, {args.max_tokens} tokens each "
          f"(greedy, EOS ignored), {args.dtype}; {cpu_library.machine()}")
    print(report(ours, theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
