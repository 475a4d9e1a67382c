"""Raw HTTP against the live server: SSE framing, 32 concurrent streams, client disconnects,
/metrics (parsed by prometheus_client, fed by the engine), /health, /v1/kv/policies."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Once upon a time, in a small village by the sea,"


def scrape(server: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    text = httpx.get(f"{server}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= lab)


def wait_idle(server: str, timeout: float = 30) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        idle = value(samples, "vllm:num_requests_running") == 0 and value(samples, "vllm:num_requests_waiting") == 0
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def sse_events(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body, checking its framing: each event one data line and a blank."""
    events = []
    for i in range(0, len(lines), 2):
        assert lines[i].startswith("data: "), lines[i]
        assert lines[i + 1] == "", "every event ends with a blank line"
        events.append(lines[i][len("data: "):])
    return events


def stream_lines(server: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode().split("\n")[:-1]


def test_chat_sse_framing_role_usage_and_done(server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 10, "temperature": 0.8,
            "seed": 11}
    events = sse_events(stream_lines(server, "/v1/chat/completions",
                                     {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    usage_chunk, content_chunks = chunks[-1], chunks[1:-1]
    assert usage_chunk["choices"] == []
    assert content_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)

    whole = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    assert usage_chunk["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert usage_chunk["usage"]["kv_cache"]["policy"] == "full"


def test_completion_stream_without_usage_has_no_usage_chunk(server: str) -> None:
    events = sse_events(stream_lines(server, "/v1/completions",
                                     {"prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_32_concurrent_streams_complete_with_exact_token_counts(server: str) -> None:
    before = wait_idle(server)
    clients, max_tokens = 32, 12

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {"prompt": f"{PROMPT} story number {i}:", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "seed": i, "stream_options": {"include_usage": True}}
        text, usage = "", None
        async with client.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    text += "".join(c["text"] for c in chunk["choices"])
        assert usage is not None
        return usage["completion_tokens"], text

    async def run() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(clients)))

    results = asyncio.run(run())
    assert [tokens for tokens, _ in results] == [max_tokens] * clients
    assert all(text for _, text in results)
    after = wait_idle(server)
    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") \
        == clients * max_tokens
    assert value(after, "vllm:request_success_total", finished_reason="length") \
        - value(before, "vllm:request_success_total", finished_reason="length") == clients
    assert value(after, "kvserve:kv_pages_in_use") == value(before, "kvserve:kv_pages_in_use") == 0


@pytest.mark.parametrize("policy,prompt", [
    ("full", PROMPT),
    # 300 tokens of which KIVI quantizes all but its 32-token residual: the quantized pages go back too
    ("kivi", "The quick brown fox jumps over the lazy dog. " * 30)])
def test_streaming_client_disconnect_aborts_and_frees_pages(server: str, policy: str, prompt: str) -> None:
    before = wait_idle(server)
    spec = {"name": policy} if policy == "full" else {"name": policy, "residual": 32}
    body = {"prompt": prompt, "max_tokens": 1000, "stream": True, "ignore_eos": True, "kv_policy": spec}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # held, so that leaving the loop does not close the response yet
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break
        during = scrape(server)
        assert value(during, "vllm:num_requests_running") == 1
        assert value(during, "kvserve:kv_pages_in_use") > 0
        assert value(during, "kvserve:kv_bytes_held", policy=policy) > 0
        assert value(during, "kvserve:requests_in_flight", policy=policy) == 1
    after = wait_idle(server, timeout=10)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "kvserve:kv_pages_in_use") == value(before, "kvserve:kv_pages_in_use")
    assert value(after, "kvserve:kv_bytes_held", policy=policy) == 0
    assert value(after, "vllm:request_success_total", finished_reason="abort") \
        == value(before, "vllm:request_success_total", finished_reason="abort") + 1
    assert value(after, "kvserve:requests_total", policy=policy, finished_reason="abort") \
        == value(before, "kvserve:requests_total", policy=policy, finished_reason="abort") + 1


def test_non_streaming_client_disconnect_aborts_and_frees_pages(server: str) -> None:
    before = wait_idle(server)
    body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
    try:
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.5)
        raise AssertionError("1000 tokens cannot be generated in half a second")
    except httpx.ReadTimeout:
        pass
    after = wait_idle(server, timeout=10)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "kvserve:kv_pages_in_use") == value(before, "kvserve:kv_pages_in_use")
    assert value(after, "vllm:request_success_total", finished_reason="abort") \
        == value(before, "vllm:request_success_total", finished_reason="abort") + 1


def test_metrics_parse_and_counters_move_with_a_request(server: str) -> None:
    before = wait_idle(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "kvserve:kv_pages_in_use", "kvserve:kv_pages_free", "vllm:num_preemptions_total"):
        assert any(n == name for n, _ in before), name
    assert value(before, "vllm:kv_cache_usage_perc") == 0
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}).json()
    prompt_tokens = r["usage"]["prompt_tokens"]
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("kvserve:requests_total", policy="full", finished_reason="length") == 1
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                      "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
                      "vllm:request_time_per_output_token_seconds", "vllm:request_prompt_tokens",
                      "vllm:request_generation_tokens", "vllm:request_params_max_tokens"):
        assert delta(f"{histogram}_count") == 1, histogram
    assert delta("vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:request_params_max_tokens_sum") == 5
    assert delta("vllm:inter_token_latency_seconds_count") == 4  # five outputs, four gaps
    assert delta("kvserve:kv_compression_ratio_count", policy="full") == 1
    assert delta("kvserve:kv_compression_ratio_sum", policy="full") == 1.0  # full holds a full cache
    assert delta("kvserve:kv_bytes_saved_total", policy="full") == 0
    pages = value(after, "kvserve:kv_pages_in_use") + value(after, "kvserve:kv_pages_free")
    assert pages == 512 * 2**20 // (2 * 16 * 64 * 4) - 1  # the 512 MiB pool, less the null page


def test_health_models_and_policies(server: str) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    policies = httpx.get(f"{server}/v1/kv/policies").json()
    by_name = {p["name"]: p for p in policies["data"]}
    assert "full" in by_name and policies["default"] == {"name": "full", "scope": "all"}
    assert by_name["full"]["schema"]["properties"]["name"]["const"] == "full"


def test_tokenize_detokenize_and_version(server: str) -> None:
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server}{path}", json=body, timeout=60)

    # the token counts the generation endpoints report for the same prompt and messages
    prompt = "The capital of France is"
    tokenized = post("/tokenize", {"prompt": prompt}).json()
    completion = post("/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == completion["usage"]["prompt_tokens"]
    assert tokenized["max_model_len"] == 8192
    assert post("/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": prompt}
    by_ids = post("/v1/completions", {"prompt": tokenized["tokens"], "max_tokens": 4, "temperature": 0}).json()
    by_text = post("/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    messages = [{"role": "user", "content": "Hello there"}]
    chat = post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    rendered = post("/tokenize", {"messages": messages}).json()
    assert rendered["count"] == chat["usage"]["prompt_tokens"]
    assert post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["count"] < rendered["count"]

    for path, body, status, param in [("/tokenize", {"prompt": "a", "messages": messages}, 400, "prompt"),
                                      ("/tokenize", {}, 400, "prompt"),
                                      ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
                                      ("/detokenize", {"tokens": [10**8]}, 400, "tokens"),
                                      ("/detokenize", {"tokens": [-1]}, 400, "tokens.0")]:
        r = post(path, body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
    assert httpx.get(f"{server}/version").json()["version"] == "0.1.0"


def test_chat_content_parts_are_joined(server: str) -> None:
    def reply(content: object) -> str:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    assert reply(parts) == reply("What is the capital of France?")


def test_explicit_kv_policy_is_accepted_and_reported(server: str) -> None:
    for spec in ("full", {"name": "full"}, '{"name": "full"}'):
        r = httpx.post(f"{server}/v1/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 2, "kv_policy": spec})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["kv_cache"]["policy"] == "full"


def test_compressing_policies_report_the_bytes_they_hold(server: str) -> None:
    """A 600-token prompt quantized (KIVI-2) and thinned (ThinK after SnapKV or H2O) holds less than a full cache."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 60
    for spec in ({"name": "kivi", "bits": 2, "residual": 32}, {"name": "think", "base": {"name": "snapkv"}},
                 {"name": "think", "base": {"name": "h2o", "ratio": 0.5}}):
        r = httpx.post(f"{server}/v1/completions", timeout=120,
                       json={"prompt": prompt, "max_tokens": 3, "kv_policy": spec, "temperature": 0})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]["kv_cache"]
        assert usage["policy"] == spec["name"]
        assert usage["bytes"] < 0.6 * usage["full_bytes"] <= 0.6 * usage["peak_bytes"], usage


def test_scope_context_compresses_the_conversation_and_keeps_the_last_question(server: str) -> None:
    """Through the openai client: at the same ratio, `scope: context` holds the ~90-token last user
    message whole on top of a quarter of the conversation before it, so it ends holding more than
    `scope: all` (a quarter of everything) and far less than a full cache."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)
    messages = [{"role": "system", "content": "The quick brown fox jumps over the lazy dog. " * 50},
                {"role": "user", "content": "Name the animals in the story, then " + "repeat them, " * 40 + "please."}]
    usage = {}
    for scope in ("all", "context"):
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4, temperature=0,
            extra_body={"kv_policy": {"name": "knorm", "ratio": 0.25, "scope": scope}})
        usage[scope] = reply.usage.model_extra["kv_cache"]
    assert usage["all"]["full_bytes"] == usage["context"]["full_bytes"]
    assert usage["all"]["bytes"] < usage["context"]["bytes"] < 0.6 * usage["context"]["full_bytes"], usage
