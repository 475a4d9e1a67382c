"""One load run: send the samples at a request rate (open loop) or a concurrency (closed loop),
scrape `/metrics` meanwhile, and summarise.

Bounded by design: at most `num_requests` requests, and at `max_duration` seconds nothing more is
sent and requests still in flight are cancelled (counted as failures), so a run always ends."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from loadtest.arrivals import arrival_gaps
from loadtest.client import ENDPOINTS, RequestResult, request_body, stream_completion
from loadtest.datasets import Sample, build_samples
from loadtest.metrics import summarize
from loadtest.policies import policy_label
from loadtest.progress import Progress
from loadtest.scrape import Scraper

CANCELLED = "cancelled: --max-duration reached"


@dataclass
class RunConfig:
    url: str
    dataset: str = "random"
    num_requests: int = 100
    request_rate: float | None = None  # requests/s (open loop); None: all at once; ignored with a concurrency
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop: this many requests always in flight
    input_len: int = 256
    output_len: int = 64
    prefix_len: int = 256  # the shared-prefix dataset's shared part
    num_docs: int = 4  # the documents dataset's documents, the multi-turn dataset's conversations
    seed: int = 0
    policy: dict[str, Any] | None = None
    model: str | None = None  # None: the first of GET /v1/models
    api_key: str | None = None
    slo: dict[str, float] | None = None  # milliseconds, for goodput
    max_duration: float = 600.0
    request_timeout: float = 300.0
    scrape_interval: float = 1.0
    reset_prefix_cache: bool = False  # POST /reset_prefix_cache first (kvserve, vLLM): each run starts cold
    endpoint: str = "completions"  # or "chat"
    # every request its own `cache_salt` (vLLM's field): none reuses another's cached prefix, as if the
    # server cached nothing, while the server stays as it is (one sweep compares shared and isolated)
    isolate_prefixes: bool = False

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")
        if self.num_docs < 1:
            raise ValueError("--num-docs must be at least 1")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.max_duration <= 0:
            raise ValueError("--max-duration must be positive")

    @property
    def load(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "all at once" if self.request_rate is None else f"{self.request_rate:g} req/s"


def run(config: RunConfig, prefix: str = "") -> dict[str, Any]:
    """The run's result: its config, summary, per-request records and the scraped timeline; `prefix`
    leads the progress line (a sweep's `[3/9]`)."""
    return asyncio.run(run_async(config, prefix))


async def run_async(config: RunConfig, prefix: str = "") -> dict[str, Any]:
    samples = build_samples(config.dataset, config.num_requests, config.input_len, config.output_len,
                            config.seed, config.prefix_len, config.num_docs)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=(config.concurrency or config.num_requests) + 1)  # +1: the scraper
    timeout = httpx.Timeout(config.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        model = config.model or await first_model(client)
        if config.reset_prefix_cache:
            (await client.post("/reset_prefix_cache")).raise_for_status()
        bodies = [request_body(s, model, config.policy, config.endpoint) for s in samples]
        if config.endpoint == "completions" and (config.policy or {}).get("share_prefix") is True:
            await _count_shared_prefixes(client, samples, bodies)
        if config.isolate_prefixes:
            run_id = uuid.uuid4().hex
            for i, body in enumerate(bodies):
                body["cache_salt"] = f"{run_id}-{i}"
        policy = policy_label(config.policy) + (", prefixes isolated" if config.isolate_prefixes else "")
        label = f"{policy} @ {config.load}"
        progress = Progress(len(samples), f"{prefix} {label}".strip())
        scraper = Scraper(client, start=time.perf_counter(), interval=config.scrape_interval)
        await scraper.scrape()  # the baseline of the counters
        start = scraper.start = time.perf_counter()  # the duration starts with the first send, as vLLM's
        stop = asyncio.Event()
        watchers = [asyncio.create_task(scraper.run_until(stop)), asyncio.create_task(progress.run_until(stop))]
        results = await _dispatch(client, config, samples, bodies, progress, deadline=start + config.max_duration)
        duration = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*watchers)
    summary = summarize(results, duration, config.slo) | scraper.summary()
    summary["model"] = model
    return {"label": label, "policy": policy, "load": config.load,
            "config": asdict(config),
            "summary": summary, "requests": [_record(r, start) for r in results], "timeline": scraper.timeline}


async def _count_shared_prefixes(client: httpx.AsyncClient, samples: list[Sample], bodies: list[dict]) -> None:
    """A completion names the prefix it shares in tokens (kvserve's `share_prefix: N`): each sample's
    context, counted by the server's /tokenize, less one token (the context's last may merge with
    what follows it in the prompt)."""
    counts: dict[str, int] = {}
    for sample, body in zip(samples, bodies):
        if sample.context is None:
            raise ValueError("share_prefix on completions needs a dataset whose prompts have a context "
                             "(documents, multi-turn)")
        if sample.context not in counts:
            response = await client.post("/tokenize", json={"prompt": sample.context})
            response.raise_for_status()
            counts[sample.context] = response.json()["count"] - 1
        body["kv_policy"] = body["kv_policy"] | {"share_prefix": counts[sample.context]}


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _dispatch(client: httpx.AsyncClient, config: RunConfig, samples: list[Sample], bodies: list[dict],
                    progress: Progress, deadline: float) -> list[RequestResult]:
    """Send the requests, wait for them until the deadline, cancel the rest; results in send order."""
    tasks: dict[int, asyncio.Task[RequestResult]] = {}
    sent: dict[int, float] = {}

    def launch(i: int) -> asyncio.Task[RequestResult]:
        sent[i] = time.perf_counter()
        task = asyncio.create_task(stream_completion(client, i, samples[i], bodies[i]))
        task.add_done_callback(lambda t: t.cancelled() or progress.add(t.result()))
        tasks[i] = task
        return task

    async def open_loop() -> None:
        for i, gap in enumerate(arrival_gaps(len(samples), config.request_rate, config.burstiness, config.seed)):
            if time.perf_counter() + gap >= deadline:
                return
            await asyncio.sleep(gap)
            launch(i)

    async def closed_loop() -> None:
        pending = iter(range(len(samples)))

        async def worker() -> None:
            for i in pending:  # the shared iterator hands each index to one worker
                if time.perf_counter() >= deadline:
                    return
                await launch(i)

        await asyncio.gather(*(worker() for _ in range(config.concurrency or 1)))

    sender = asyncio.create_task(closed_loop() if config.concurrency else open_loop())
    await asyncio.wait([sender], timeout=max(0.0, deadline - time.perf_counter()))
    if not sender.done():
        sender.cancel()
    if tasks:
        await asyncio.wait(list(tasks.values()), timeout=max(0.0, deadline - time.perf_counter()))
    results = []
    for i in sorted(tasks):
        task = tasks[i]
        if task.done() and not task.cancelled():
            results.append(task.result())
            continue
        task.cancel()
        results.append(RequestResult(index=i, send=sent[i], error=CANCELLED))
    await asyncio.gather(sender, *tasks.values(), return_exceptions=True)
    for r in results:
        if r.error == CANCELLED:
            progress.add(r)
    return results


def _record(result: RequestResult, start: float) -> dict[str, Any]:
    """A request as stored in the result file, its send time relative to the run's start."""
    record = asdict(result)
    record["send"] = result.send - start
    return record
