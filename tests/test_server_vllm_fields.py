"""vLLM's request extras on the live server: prompt_logprobs, return_token_ids, request_id,
continuous usage stats, truncate_prompt_tokens, bad_words and the chat template's switches. Each
is checked against what the same server says another way (/tokenize, /detokenize, echo with
logprobs, a prompt given as the tokens it should have been cut to)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.test_server_http import sse_events, stream_lines

PROMPT = "The capital of France is"
QUESTION = {"role": "user", "content": "What is the capital of France?"}
ANSWER_START = "The capital of France is"


def post(server: str, path: str, body: dict, **kwargs: object) -> httpx.Response:
    r = httpx.post(f"{server}{path}", json=body, timeout=60, **kwargs)
    assert r.status_code == 200, r.text
    return r


def test_prompt_logprobs_and_token_ids_agree_with_echo_and_the_tokenizer(server: str) -> None:
    prompt_ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    choice = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                              "prompt_logprobs": 2, "return_token_ids": True}).json()["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    assert post(server, "/detokenize", {"tokens": choice["token_ids"]}).json()["prompt"] == choice["text"]

    # vLLM's shape: None first, then per prompt token its own entry and the 2 most likely, keyed by id
    prompt_logprobs = choice["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt_ids)
    # an echo with 1 alternative beside prompt_logprobs with 2: each keeps its own count
    both = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                            "prompt_logprobs": 2}).json()["choices"][0]
    echoed = both["logprobs"]
    # equal to the bit: a float32 projection computes each row alone (kernels/f32_linear.py), so a prompt
    # position's logits do not depend on how many other rows (the sampled one here) share the step
    assert both["prompt_logprobs"] == prompt_logprobs
    assert all(len(top) <= 2 for top in echoed["top_logprobs"][1:])
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        own = entry[str(prompt_ids[position])]
        assert abs(own["logprob"] - echoed["token_logprobs"][position]) < 1e-5
        assert own["decoded_token"] == echoed["tokens"][position]
        ranked = sorted(entry.values(), key=lambda lp: lp["rank"])
        assert [lp["rank"] for lp in ranked[:2]] == [1, 2] and ranked[0]["logprob"] >= ranked[1]["logprob"]
        assert len(entry) == 2 + (own["rank"] > 2)
        assert own["rank"] >= 1 and (own["rank"] > 2) == (own["logprob"] < ranked[1]["logprob"])

    # nothing of it when not asked for
    plain = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).json()["choices"][0]
    assert not {"prompt_logprobs", "prompt_token_ids", "token_ids"} & set(plain)


def test_chat_prompt_logprobs_and_token_ids(server: str) -> None:
    messages = [QUESTION]
    rendered = post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0,
                                                 "prompt_logprobs": 0, "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == rendered
    assert [None if lp is None else list(lp) for lp in body["prompt_logprobs"]] == \
        [None] + [[str(t)] for t in rendered[1:]]  # 0 alternatives: the token itself only
    tokens = body["choices"][0]["token_ids"]
    assert len(tokens) == body["usage"]["completion_tokens"]
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"].startswith(
        body["choices"][0]["message"]["content"])  # the text leaves out EOS


def test_request_id_from_the_body_or_the_header(server: str) -> None:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "request_id": "batch-7"})
    assert r.json()["id"] == r.headers["x-request-id"] == "cmpl-batch-7"
    r = post(server, "/v1/chat/completions", {"messages": [QUESTION], "max_tokens": 2},
             headers={"X-Request-Id": "trace-42"})
    assert r.json()["id"] == r.headers["x-request-id"] == "chatcmpl-trace-42"
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 2, "stream": True, "request_id": "s-1"}) as streamed:
        assert streamed.headers["x-request-id"] == "cmpl-s-1"
        assert all(json.loads(e)["id"] == "cmpl-s-1" for e in sse_events(streamed.read().decode().split("\n")[:-1])
                   if e != "[DONE]")
    # clients may reuse an id, even at the same time: it names the response, not the engine's request
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "request_id": "same"}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(server, "/v1/completions", body).json(), range(4)))
    assert {r["id"] for r in replies} == {"cmpl-same"} and len({r["choices"][0]["text"] for r in replies}) == 1


def test_continuous_usage_stats_count_every_chunk(server: str) -> None:
    body = {"messages": [QUESTION], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(e) for e in sse_events(stream_lines(server, "/v1/chat/completions", body))[:-1]]
    *deltas, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant" and deltas[0]["usage"]["completion_tokens"] == 0
    counts = [c["usage"]["completion_tokens"] for c in deltas]
    assert counts == sorted(counts) and counts[-1] == 6
    assert all(c["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] and
               c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in deltas)
    # as in vLLM, continuous stats need include_usage
    body["stream_options"] = {"continuous_usage_stats": True}
    assert all("usage" not in json.loads(e) for e in sse_events(stream_lines(server, "/v1/chat/completions", body))
               if e != "[DONE]")


def test_truncate_prompt_tokens_keeps_the_last_ones(server: str) -> None:
    long_prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    prompt_ids = post(server, "/tokenize", {"prompt": long_prompt}).json()["tokens"]
    greedy = {"max_tokens": 6, "temperature": 0}
    cut = post(server, "/v1/completions", {"prompt": long_prompt, "truncate_prompt_tokens": 5, "echo": True,
                                           **greedy}).json()
    as_given = post(server, "/v1/completions", {"prompt": prompt_ids[-5:], **greedy}).json()
    kept = post(server, "/detokenize", {"tokens": prompt_ids[-5:]}).json()["prompt"]
    assert cut["usage"]["prompt_tokens"] == 5
    assert cut["choices"][0]["text"] == kept + as_given["choices"][0]["text"]
    whole = post(server, "/v1/completions", {"prompt": long_prompt, "truncate_prompt_tokens": -1, **greedy}).json()
    assert whole["usage"]["prompt_tokens"] == len(prompt_ids)


def test_bad_words_keep_a_word_out(server: str) -> None:
    greedy = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    assert "Paris" in post(server, "/v1/completions", greedy).json()["choices"][0]["text"]
    banned = post(server, "/v1/completions", {**greedy, "bad_words": ["Paris"]}).json()
    assert "Paris" not in banned["choices"][0]["text"]


def test_chat_continues_the_final_message_and_echoes_it(server: str) -> None:
    body = {"messages": [QUESTION, {"role": "assistant", "content": ANSWER_START}], "max_tokens": 6,
            "temperature": 0, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
            "return_token_ids": True, "chat_template_kwargs": {"unused_by_this_template": True}}
    reply = post(server, "/v1/chat/completions", body).json()
    prompt = post(server, "/detokenize", {"tokens": reply["prompt_token_ids"]}).json()["prompt"]
    assert prompt.endswith(f"assistant\n{ANSWER_START}")  # the message left open, no new turn
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith(ANSWER_START) and "Paris" in content
    events = sse_events(stream_lines(server, "/v1/chat/completions", {**body, "stream": True}))
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1] == {"content": ANSWER_START}
    assert "".join(d["content"] for d in deltas) == content
    # echo repeats only an assistant message; add_generation_prompt false leaves the assistant turn unopened
    plain = post(server, "/v1/chat/completions", {"messages": [QUESTION], "max_tokens": 3, "echo": True,
                                                  "add_generation_prompt": False, "return_token_ids": True}).json()
    assert not plain["choices"][0]["message"]["content"].startswith(QUESTION["content"])
    unopened = post(server, "/detokenize", {"tokens": plain["prompt_token_ids"]}).json()["prompt"]
    assert unopened.endswith(f"{QUESTION['content']}<|im_end|>\n")


def test_openai_client_passes_the_extras_through(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    completion = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4,
                                           temperature=0, extra_body={"return_token_ids": True, "bad_words": ["Paris"]})
    choice = completion.choices[0]
    assert "Paris" not in choice.text and len(choice.model_extra["token_ids"]) == 4
    assert choice.model_extra["prompt_token_ids"] == post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
