"""Graceful shutdown on SIGTERM (a real server process), and a dead engine loop (in process)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
from starlette.testclient import TestClient

from kvserve.engine.async_engine import EngineDeadError
from kvserve.engine.llm_engine import EngineStats
from kvserve.policies.registry import parse_policy
from kvserve.server.admission import Admission
from kvserve.server.api_server import build_app
from kvserve.server.metrics import ServerMetrics
from kvserve.server.state import ServerState

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

SECRET_PROMPT = "A prompt that must not appear in the log"


def test_sigterm_drains_in_flight_requests_then_aborts_the_rest(launch_server: Callable[..., ServerProcess]
                                                                 ) -> None:
    process = launch_server("--shutdown-timeout", "4", "--kv-cache-memory", str(256 << 20))
    streams: dict[str, list[dict[str, Any]]] = {"short": [], "long": []}
    started = {name: threading.Event() for name in streams}

    def stream(name: str, max_tokens: int) -> None:
        body = {"prompt": SECRET_PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streams[name].append(json.loads(line[6:]))
                    started[name].set()
                elif line == "data: [DONE]":
                    streams[name].append({"done": True})

    threads = [threading.Thread(target=stream, args=args) for args in (("short", 10), ("long", 5000))]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in started.values())
    sent = time.monotonic()
    process.terminate()
    time.sleep(0.5)
    try:
        httpx.get(f"{process.url}/health", timeout=2)
        raise AssertionError("a server that is shutting down accepts no new connections")
    except httpx.ConnectError:
        pass
    for thread in threads:
        thread.join(60)
    assert process.wait(30) == 0
    elapsed = time.monotonic() - sent

    short, long = streams["short"], streams["long"]
    # the short request finished normally within the timeout; the long one was cut at it, cleanly
    assert short[-1] == {"done": True} and short[-2]["choices"][0]["finish_reason"] == "length"
    assert long[-1] == {"done": True} and long[-2]["choices"][0]["finish_reason"] == "abort"
    assert 4 <= elapsed < 20
    log = process.log()
    assert log.count('"status": 200') >= 2
    assert SECRET_PROMPT not in log  # no --log-prompts


class DeadEngine:
    """Just enough of AsyncEngine for the server to start, with a loop that is not running."""

    max_model_len = 64
    model_config = SimpleNamespace(vocab_size=100)

    @staticmethod
    def tokenizer(texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1, 2, 3] for _ in texts]}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, pages_total=10, pages_free=10, page_bytes=8,
                           num_preemptions=0, bytes_held={}, tokens_evicted={})

    async def generate(self, *args: object) -> AsyncIterator[object]:
        raise EngineDeadError("the engine loop is not running")
        yield  # an async generator, like AsyncEngine.generate


def test_dead_engine_loop_is_503_on_health_and_requests() -> None:
    engine = DeadEngine()
    admission = Admission(engine, max_queue=8)  # type: ignore[arg-type]
    state = ServerState(engine=engine, admission=admission,  # type: ignore[arg-type]
                        metrics=ServerMetrics(engine, admission, "m"),  # type: ignore[arg-type]
                        model_name="m", model_root="/nowhere", default_policy=parse_policy(None))
    with TestClient(build_app(state, api_key=None, max_body_bytes=1 << 20)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        for stream in (False, True):
            r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert admission.in_flight == {}  # the failed requests gave their admission back
