"""A second, small server (2 running sequences, a queue of 2, an API key, --log-prompts): 401s,
429s with Retry-After while every accepted request completes, and the per-request log line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

KEY = "test-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def small(launch_server: Callable[..., ServerProcess]) -> ServerProcess:
    return launch_server("--max-num-seqs", "2", "--max-queue", "2", "--api-key", KEY, "--log-prompts",
                         "--kv-cache-memory", str(128 << 20))


def test_api_key_is_required_on_the_api_only(small: ServerProcess) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{small.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{small.url}/v1/models").status_code == 401
    assert httpx.post(f"{small.url}/v1/completions", json=body, headers=AUTH).status_code == 200
    # probes and scrapers need no key
    assert httpx.get(f"{small.url}/health").status_code == 200
    assert httpx.get(f"{small.url}/metrics").status_code == 200


def test_openai_client_with_and_without_the_key(small: ServerProcess) -> None:
    good = openai.OpenAI(base_url=f"{small.url}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="SmolLM2-135M-Instruct", prompt="hi", max_tokens=2).choices[0].text
    bad = openai.OpenAI(base_url=f"{small.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="SmolLM2-135M-Instruct", prompt="hi", max_tokens=2)


def test_full_queue_is_429_and_every_accepted_request_completes(small: ServerProcess) -> None:
    clients, max_tokens = 10, 16

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int | None, str | None]:
        body = {"prompt": f"Request {i}: once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{small.url}/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code != 200:
                error = json.loads(await r.aread())["error"]
                assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
                return r.status_code, None, r.headers.get("retry-after")
            tokens = None
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return 200, tokens, None

    async def burst() -> list[tuple[int, int | None, str | None]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(clients)))

    results = asyncio.run(burst())
    accepted = [tokens for status, tokens, _ in results if status == 200]
    rejected = [retry for status, _, retry in results if status != 200]
    assert all(status in (200, 429) for status, _, _ in results)
    # at most 2 running + 2 waiting at once: of 10 simultaneous requests, at least 6 are turned away
    assert 2 <= len(accepted) <= 4 and len(rejected) >= 6
    assert accepted == [max_tokens] * len(accepted)
    assert all(retry is not None and int(retry) >= 1 for retry in rejected)


def test_one_structured_log_line_per_request(small: ServerProcess) -> None:
    prompt = "The quick brown fox, log me please"
    r = httpx.post(f"{small.url}/v1/completions", headers=AUTH,
                   json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True}).json()
    lines = [json.loads(line.split("kvserve.request: ", 1)[1]) for line in small.log().splitlines()
             if "kvserve.request: " in line]
    mine = [rec for rec in lines if rec["request_id"] == r["id"]]
    assert len(mine) == 1
    rec = mine[0]
    assert rec["status"] == 200 and rec["policy"] == "full" and rec["endpoint"] == "/v1/completions"
    assert rec["prompt_tokens"] == r["usage"]["prompt_tokens"] and rec["completion_tokens"] == 3
    assert 0 < rec["ttft_s"] <= rec["duration_s"]
    assert rec["finish_reasons"] == ["length"]
    assert rec["prompt"] == prompt  # --log-prompts
    assert any(rec["status"] == 429 for rec in lines)  # rejected requests are logged too
