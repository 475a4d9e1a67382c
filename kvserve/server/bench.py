"""Serving benchmark: kvserve against `transformers serve --continuous-batching` on the same model.

`python -m kvserve.server.bench` starts each server in turn (never both at once, so they do not
share the CPU or GPU), kvserve then transformers for each of `--rounds` rounds. Against each it sends
a warm-up request, then has N concurrent clients stream completions (prompts of ~200 words, greedy,
a fixed number of tokens with EOS ignored), and it prints output tokens/s, TTFT p50/p99 and time per
output token side by side with kvserve/transformers ratios, medians over the rounds.
Metrics follow `vllm bench serve`: TTFT = first streamed text - send; TPOT = (last - first) /
(tokens - 1). Nothing is downloaded: both servers read the local model folder."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from kvserve.kernels import cpu_library
from kvserve.model.loader import resolve_model
from kvserve.server.ports import free_local_port

WORDS = ("river mountain quiet lantern history engine garden silver market winter harbor letter orchard signal "
         "painter bridge valley thunder library compass meadow candle voyage window forest copper island "
         "shadow ladder festival canyon whisper kettle meadowlark granite ember canvas journey").split()


@dataclass
class Result:
    ttft: float
    tpot: float
    tokens: int
    sent: float
    done: float


@dataclass
class Summary:
    name: str
    results: list[Result]

    @property
    def throughput(self) -> float:
        span = max(r.done for r in self.results) - min(r.sent for r in self.results)
        return sum(r.tokens for r in self.results) / span

    def ttft(self, q: float) -> float:
        return float(np.percentile([r.ttft for r in self.results], q))

    def tpot(self) -> float:
        return float(np.mean([r.tpot for r in self.results]))


def prompts(count: int, words: int) -> list[str]:
    rng = random.Random(0)
    return [f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". Continue the story:"
            for i in range(count)]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", ())):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or last is None or tokens < 2:
        raise RuntimeError(f"{url} streamed no usable completion")
    return Result(ttft=first - sent, tpot=(last - first) / (tokens - 1), tokens=tokens, sent=sent, done=last)


async def run_clients(url: str, bodies: list[dict]) -> list[Result]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as client:
        await stream_one(client, url, bodies[0])  # warm-up: first-request set-up is not serving speed
        return await asyncio.gather(*(stream_one(client, url, body) for body in bodies))


@contextmanager
def serving(command: list[str], url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[:3]} exited:\n{log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not become healthy")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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


def bench_kvserve(args: argparse.Namespace, texts: list[str]) -> Summary:
    port = free_local_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kvserve", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, *(["--model", args.model] if args.model else []), *args.kvserve_args]
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for t in texts]
    with serving(command, url):
        return Summary("kvserve", asyncio.run(run_clients(url, bodies)))


def bench_transformers(args: argparse.Namespace, texts: list[str], folder: Path) -> Summary:
    port = free_local_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--device", args.hf_device]
    # a fresh generation config has no EOS token: the same fixed-length, greedy generation as ignore_eos
    config = json.dumps({"max_new_tokens": args.max_tokens, "do_sample": False})
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "generation_config": config} for t in texts]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with serving(command, url, env):
        return Summary("transformers", asyncio.run(run_clients(url, bodies)))


def report(ours: list[Summary], theirs: list[Summary]) -> str:
    """Each server's median over rounds, and the median of the rounds' ratios (round i's two runs are
    minutes apart, so a busy spell on a shared host weighs on both)."""
    metrics = [("output tokens/s", lambda s: s.throughput), ("TTFT p50 (s)", lambda s: s.ttft(50)),
               ("TTFT p99 (s)", lambda s: s.ttft(99)), ("time per output token (ms)", lambda s: 1000 * s.tpot())]
    lines = [f"{'':28}{'kvserve':>12}{'transformers':>14}{'ratio':>9}"]
    for name, metric in metrics:
        ratio = statistics.median(metric(a) / metric(b) for a, b in zip(ours, theirs))
        lines.append(f"{name:28}{statistics.median(map(metric, ours)):12.3f}"
                     f"{statistics.median(map(metric, theirs)):14.3f}{ratio:9.2f}")
    if len(ours) > 1:
        by_round = ", ".join(f"{a.throughput:.1f} / {b.throughput:.1f}" for a, b in zip(ours, theirs))
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
