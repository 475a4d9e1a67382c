"""One streamed completion, timed the way `vllm bench serve` times it.

POST /v1/completions (or /v1/chat/completions) with `stream: true` and `stream_options.include_usage`;
every SSE event that carries `choices` is a chunk: the first one's arrival is the TTFT, the gaps
between the following ones are the ITLs, the last one's arrival ends the request (E2E). The output
token count is the final usage event's `completion_tokens` (servers without usage: the number of chunks)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.datasets import Sample, approx_tokens


@dataclass
class RequestResult:
    """Timings in seconds from `send`, the client's perf_counter at the POST."""

    index: int
    send: float  # perf_counter at the POST
    status: int | None = None  # HTTP status; None when the connection failed or it was cancelled
    error: str | None = None  # None on success
    ttft: float | None = None
    latency: float | None = None  # to the last chunk with choices
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0  # usage.prompt_tokens; the approximate count where the server sends no usage
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server sends it
    text: str = ""
    # kvserve's usage.kv_cache: policy, bytes, full_bytes, peak_bytes, footprint_byte_steps, full_footprint_byte_steps
    kv_cache: dict[str, Any] | None = None
    correct: bool | None = None  # the completion contains the sample's expected text; None when unscored

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def failure(self) -> str:
        """What failures are counted by: the HTTP status, else the exception's name (`ConnectError`, ...)."""
        if self.status is not None and self.status != 200:
            return str(self.status)
        return (self.error or "").split(":")[0]


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def request_body(sample: Sample, model: str, policy: dict[str, Any] | None, endpoint: str = "completions"
                 ) -> dict[str, Any]:
    """Greedy, EOS ignored so that output lengths are the ones asked for; `kv_policy` only when given,
    so servers that reject unknown fields still work. A chat request sends the sample's context, if it
    has one, as the system message and the rest of its prompt as the user's."""
    body: dict[str, Any] = {"model": model, "max_tokens": sample.output_len, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        context = sample.context or ""
        body["messages"] = ([{"role": "system", "content": context}] if context else []) + [
            {"role": "user", "content": sample.prompt[len(context):].strip()}]
    else:
        body["prompt"] = sample.prompt
    if policy is not None:
        body["kv_policy"] = policy
    return body


async def stream_completion(client: httpx.AsyncClient, index: int, sample: Sample,
                            body: dict[str, Any]) -> RequestResult:
    """Never raises for a failed request: the failure is in the result (cancellation still propagates)."""
    result = RequestResult(index=index, send=time.perf_counter(), prompt_tokens=approx_tokens(sample.prompt))
    path = ENDPOINTS["chat" if "messages" in body else "completions"]
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            await _read_events(response, result)
    except (httpx.HTTPError, ValueError) as exc:  # no connection, a timeout, a stream that is not JSON events
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.ttft is None:
        result.error = "the stream carried no completion chunk"
    elif sample.expected is not None:
        result.correct = sample.expected in result.text
    return result


async def _read_events(response: httpx.Response, result: RequestResult) -> None:
    last = result.send
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments (keep-alive pings), event names
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("choices"):
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - result.send
            else:
                result.itl.append(now - last)
            last = now
            chunks += 1
            choice = event["choices"][0]
            result.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        usage = event.get("usage")
        if usage:
            result.output_tokens = usage.get("completion_tokens", chunks)
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            result.kv_cache = usage.get("kv_cache")
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if result.ttft is not None:
        result.latency = last - result.send
        result.output_tokens = result.output_tokens or chunks
