"""deploy/ray_serve end to end: `python -m deploy.ray_serve` on a local Ray cluster of 2 CPUs with 2
engine replicas of the default model, spoken to over HTTP through Ray Serve's proxy.

One cluster serves every check (starting it costs most of the test's time): correct greedy answers
from both replicas, SSE framing, the official client, traffic on both replicas, and that every
request of one `user` lands on one replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deploy.ray_serve.engine_replica import REPLICA_HEADER
from kvserve.server.ports import free_local_port

REPLICA = REPLICA_HEADER.decode()
STARTUP_TIMEOUT_S = 240
SHUTDOWN_TIMEOUT_S = 60
PROMPT = "The capital of France is"
READY_LINE = "kvserve on Ray Serve:"


class RayServeProcess:
    """The CLI in its own session, so that stopping it can never signal this test's process group."""

    def __init__(self, *args: str) -> None:
        self.port = free_local_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="kvserve-ray-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.ray_serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, replicas: int) -> None:
        """Until the CLI reports the application running (every replica started) and key-less
        requests have reached every replica (the ingress's router has learnt of them all)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        seen: set[str] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deploy.ray_serve exited with {self.proc.returncode}:\n{self.log()}")
            if READY_LINE in self.log():
                response = httpx.get(f"{self.url}/health", timeout=30)
                if response.status_code == 200:
                    seen.add(response.headers[REPLICA])
                if len(seen) == replicas:
                    return
            time.sleep(0.2 if seen else 1)
        raise RuntimeError(f"deploy.ray_serve: {len(seen)} of {replicas} replicas in {STARTUP_TIMEOUT_S} s:\n"
                           f"{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-20000:]

    def stop(self) -> int | None:
        """SIGTERM (Serve and the cluster shut down); the whole session is killed if that hangs."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[RayServeProcess]:
    process = RayServeProcess("--replicas", "2", "--num-cpus", "2", "--object-store-memory", str(200 << 20),
                              "--kv-cache-memory", str(256 << 20), "--max-num-seqs", "16")
    try:
        process.wait_ready(replicas=2)
        yield process
    finally:
        returncode = process.stop()
    assert returncode == 0, f"deploy.ray_serve did not shut down cleanly ({returncode}):\n{process.log()}"


def completion(user: str | None, max_tokens: int = 12, stream: bool = False) -> dict[str, object]:
    body: dict[str, object] = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return body | ({"user": user} if user else {})


async def post(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> tuple[str, str]:
    """(replica, text) of a completion, streamed or not; checks the SSE framing of streams."""
    if not body.get("stream"):
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        return response.headers[REPLICA], response.json()["choices"][0]["text"]
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1]), raw
    chunks = [json.loads(event[len("data: "):]) for event in events[:-2]]
    return response.headers[REPLICA], "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def metric_sum(metrics: str, name: str, label: str = "") -> float | None:
    """The sum of the samples of `name` (with `label` among their labels) in /metrics text; None if none."""
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith(name + "{") and label in line]
    return sum(values) if values else None


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + SHUTDOWN_TIMEOUT_S + 180)
def test_ray_serve_replicas_affinity_and_streaming(ray_serve: RayServeProcess) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=ray_serve.url, timeout=120) as client:
            # 12 users at once, one short request each: which replica owns which user
            users = [f"user-{i}" for i in range(12)]
            owners = dict(zip(users, [replica for replica, _ in await asyncio.gather(
                *(post(client, "/v1/completions", completion(u, max_tokens=2)) for u in users))]))
            assert len(set(owners.values())) == 2, f"all 12 users hashed to one replica: {owners}"
            by_replica = {replica: next(u for u in users if owners[u] == replica) for replica in owners.values()}

            # concurrently: 3 requests per user for 4 users (streamed and not), plus key-less ones
            tasks = [(u, post(client, "/v1/completions", completion(u, stream=k % 2 == 1)))
                     for u in users[:4] for k in range(3)]
            tasks += [(u, post(client, "/v1/completions", completion(u))) for u in by_replica.values()]
            tasks += [(None, post(client, "/v1/completions", completion(None, stream=k % 2 == 0)))
                      for k in range(4)]
            results = await asyncio.gather(*(t for _, t in tasks))
            texts = {text for _, text in results}
            assert len(texts) == 1 and texts.pop().strip(), f"greedy answers differ or are empty: {results}"
            for (user, _), (replica, _) in zip(tasks, results):
                if user is not None:
                    assert replica == owners[user], f"{user} went to {replica}, its owner is {owners[user]}"
            # the same greedy answer from both replicas (one user on each)
            assert {owners[u] for u in by_replica.values()} == set(owners.values())

            models = (await client.get("/v1/models")).json()
            assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"

            # a client that leaves mid-stream aborts its sequence on the replica (the same
            # x-session-id sends the stream and the /metrics scrapes to one replica)
            session = {"x-session-id": "leaver"}
            long = completion(None, max_tokens=2000, stream=True) | {"ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=long, headers=session) as response:
                replica = response.headers[REPLICA]
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break
            for _ in range(50):
                metrics = await client.get("/metrics", headers=session)
                assert metrics.headers[REPLICA] == replica
                if metric_sum(metrics.text, "vllm:request_success_total", 'finished_reason="abort"') and \
                        metric_sum(metrics.text, "vllm:num_requests_running") == 0:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail(f"the abandoned stream was not aborted:\n{metrics.text}")

    asyncio.run(scenario())

    # the official client, chat, streamed, through the proxy: same session, same replica
    client = openai.OpenAI(base_url=f"{ray_serve.url}/v1", api_key="unused", timeout=120)
    messages = [{"role": "user", "content": "Name the capital of France."}]
    raw = client.chat.completions.with_raw_response.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                           max_tokens=8, temperature=0, user="chat-user")
    assert raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
            model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8, temperature=0, user="chat-user",
            stream=True, stream_options={"include_usage": True}) as streamed:
        assert streamed.headers[REPLICA] == raw.headers[REPLICA]
        chunks = list(streamed.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        raw.parse().choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
