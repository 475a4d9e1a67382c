"""Every error is OpenAI-shaped, has the right status and names the field; generated bodies never
produce a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

USER = [{"role": "user", "content": "hi"}]


def post(server: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "suffix": "bye"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8192}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * 8200, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "kv_policy": "h2o-ish"}, "kv_policy.name"),
    ("/v1/completions", {"prompt": "hi", "kv_policy": {"name": "full", "budget": 3}}, "kv_policy.budget"),
    ("/v1/completions", {"prompt": "hi", "kv_policy": 5}, "kv_policy"),
    ("/v1/completions", {"prompt": "hi", "kv_policy": {"name": "knorm", "scope": "context"}}, "kv_policy.scope"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}],
                              "kv_policy": {"name": "knorm", "scope": "context"}}, "kv_policy.scope"),
    ("/v1/completions", {"prompt": "hi", "kv_policy": {"name": "knorm", "scope": "question"}}, "kv_policy.scope"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"a": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"²": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ("/v1/chat/completions", {"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 9000}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 9000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "hi", "bad_words": "hi"}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "request_id": ""}, "request_id"),
    ("/v1/completions", {"prompt": "hi", "request_id": "Ā"}, "request_id"),  # it goes back in a header
    ("/v1/completions", {"prompt": "hi", "priority": 1}, "priority"),  # the server is first-come first-served
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": 1.5}},
     "stream_options.continuous_usage_stats"),
    ("/v1/chat/completions", {"messages": USER, "continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"messages": USER, "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
])
def test_invalid_fields_are_400_naming_the_field(server: str, path: str, body: dict, param: str) -> None:
    error = assert_error(post(server, path, body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_unknown_policy_lists_the_known_ones(server: str) -> None:
    error = assert_error(post(server, "/v1/completions", {"prompt": "hi", "kv_policy": {"name": "nope"}}), 400,
                         "kv_policy.name")
    assert "full" in error["message"]


def test_unknown_model_is_404(server: str) -> None:
    error = assert_error(post(server, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}), 404, "model")
    assert error["code"] == "model_not_found"


def test_malformed_json_and_non_objects_are_400(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, None)
    assert_error(post(server, "/v1/completions", [1, 2, 3]), 400, None)
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "a\\ud800"}',
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "prompt")  # a lone surrogate no tokenizer can encode


def test_body_over_the_limit_is_413(server: str) -> None:
    error = assert_error(post(server, "/v1/completions", {"prompt": "a" * (1 << 20)}), 413, None)
    assert "limit" in error["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"}'

    r = httpx.post(f"{server}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, None)


def test_errors_keep_the_server_serving(server: str) -> None:
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- generated bodies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid four times in five, so that many bodies get through validation into the engine."""
    return st.integers(0, 4).flatmap(lambda i: invalid if i == 0 else valid)


small_text = st.text(max_size=12)
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=4)
# values around the valid ranges; max_tokens stays small so a valid body generates a few tokens only
sampling_fields = {
    "max_tokens": mostly(st.integers(1, 3), st.sampled_from([-1, 0, 2.5, "2", None, 10**9])),
    "temperature": mostly(st.sampled_from([0, 0.7, 2]), st.sampled_from([-1, 2.1, "hot"])),
    "top_p": mostly(st.sampled_from([0.5, 1]), st.sampled_from([0, 1.5])),
    "top_k": mostly(st.sampled_from([-1, 0, 5]), st.sampled_from([-2, 1.5])),
    "min_p": mostly(st.sampled_from([0, 0.2, 1]), st.sampled_from([-0.1, 1.1])),
    "presence_penalty": mostly(st.sampled_from([-2, 0, 1.5]), st.just(-3)),
    "frequency_penalty": mostly(st.sampled_from([0, 2]), st.just(2.5)),
    "seed": mostly(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)), st.sampled_from([2**64, "x"])),
    "n": mostly(st.integers(1, 2), st.sampled_from([-1, 0, "two"])),
    "stop": mostly(st.one_of(st.none(), small_text, st.lists(small_text, max_size=2)), st.integers()),
    "stop_token_ids": mostly(st.one_of(st.none(), token_ids), st.lists(st.integers(-5, 10**6), max_size=2)),
    "ignore_eos": mostly(st.booleans(), st.just("yes")),
    "stream": st.booleans(),
    "stream_options": mostly(st.one_of(st.none(), st.fixed_dictionaries(
        {"include_usage": st.booleans()}, optional={"continuous_usage_stats": st.booleans()})), small_text),
    "kv_policy": mostly(st.sampled_from([None, "full", {"name": "full"}, '{"name": "full"}']),
                        st.one_of(small_text, st.sampled_from(['{"name": ', {"name": "h2o", "ratio": 0.5}]),
                                  st.dictionaries(small_text, json_values, max_size=2))),
    "model": mostly(st.just("SmolLM2-135M-Instruct"), st.sampled_from(["other", 3])),
    "user": st.one_of(st.none(), small_text),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=2),
                         st.dictionaries(st.sampled_from(["x", "²", "-1", "99999999", " 5"]),
                                         st.sampled_from([1, 101, "x"]), max_size=2)),
    "repetition_penalty": mostly(st.sampled_from([0.5, 1, 1.3]), st.sampled_from([0, -1, "x"])),
    "min_tokens": mostly(st.integers(0, 3), st.sampled_from([-1, 10**6, "x"])),
    "allowed_token_ids": mostly(st.one_of(st.none(), token_ids), st.sampled_from([[], [-1], [10**6], "x"])),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "bad_words": mostly(st.one_of(st.none(), st.lists(small_text, max_size=2)), st.sampled_from(["x", [1]])),
    "prompt_logprobs": mostly(st.one_of(st.none(), st.integers(0, 3)), st.sampled_from([-1, 21, "x"])),
    "truncate_prompt_tokens": mostly(st.one_of(st.none(), st.integers(-1, 3)), st.sampled_from([-2, "x"])),
    "return_token_ids": st.booleans(),
    "request_id": mostly(st.one_of(st.none(), small_text), st.integers()),
    "priority": mostly(st.just(0), st.sampled_from([1, -1, 2**40, "x"])),
    "use_beam_search": mostly(st.just(False), st.just(True)),
}
prompt = mostly(st.one_of(st.text(min_size=1, max_size=12), st.lists(st.text(min_size=1, max_size=12), min_size=1,
                                                                     max_size=2),
                          token_ids, st.lists(token_ids, min_size=1, max_size=2)),
                st.one_of(st.just(""), st.lists(st.integers(-3, 10**6), max_size=3), json_values))
logprobs = st.one_of(st.none(), st.integers(-1, 22), st.booleans())
text_part = st.fixed_dictionaries({"type": mostly(st.just("text"), st.just("image_url")), "text": small_text})
role = mostly(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "x"]))
content = mostly(st.one_of(small_text, st.lists(text_part, max_size=2)), st.one_of(st.none(), st.integers()))
message = mostly(st.fixed_dictionaries({"role": role, "content": content}), json_values)


def completion_bodies() -> st.SearchStrategy[object]:
    fields = st.fixed_dictionaries({"prompt": prompt, "max_tokens": sampling_fields["max_tokens"]},
                                   optional={**{k: v for k, v in sampling_fields.items() if k != "max_tokens"},
                                             "logprobs": logprobs, "echo": mostly(st.just(False), st.just(True)),
                                             "suffix": mostly(st.none(), small_text)})
    return mostly(fields, json_values)


def chat_bodies() -> st.SearchStrategy[object]:
    # max_tokens is always a small number: without it a valid chat request may generate the whole context
    fields = st.fixed_dictionaries(
        {"messages": mostly(st.lists(message, min_size=1, max_size=3), json_values), "max_tokens": st.integers(1, 3)},
        optional={**{k: v for k, v in sampling_fields.items() if k != "max_tokens"},
                  "max_completion_tokens": mostly(st.integers(1, 3), st.sampled_from([-1, 0, "x"])),
                  "logprobs": st.booleans(), "top_logprobs": mostly(st.integers(0, 20), st.integers(-1, 22)),
                  "add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(),
                  "echo": st.booleans(),
                  "chat_template_kwargs": mostly(st.one_of(st.none(), st.dictionaries(small_text, json_values,
                                                                                      max_size=2)), small_text)})
    return mostly(fields, json_values)


def check_no_server_error(server: str, path: str, body: object) -> None:
    with httpx.stream("POST", f"{server}{path}", content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json"}) as r:
        text = r.read().decode()
    assert r.status_code < 500, (body, r.status_code, text)
    if r.status_code != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n")
        assert '"error"' not in text, text
    else:
        assert json.loads(text)["choices"]


fuzz = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tokenize_bodies() -> st.SearchStrategy[object]:
    fields = st.fixed_dictionaries({}, optional={
        "prompt": mostly(small_text, json_values), "messages": mostly(st.lists(message, min_size=1, max_size=2),
                                                                      json_values),
        "model": sampling_fields["model"], "add_special_tokens": st.booleans(),
        "add_generation_prompt": st.booleans()})
    return mostly(fields, json_values)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokenize=tokenize_bodies(), tokens=mostly(token_ids, json_values))
def test_generated_tokenize_bodies_never_5xx(server: str, tokenize: object, tokens: object) -> None:
    for path, body in (("/tokenize", tokenize), ("/detokenize", {"tokens": tokens})):
        r = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code == 200:
            assert "count" in r.json() or "prompt" in r.json()
        else:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@fuzz
@given(body=completion_bodies())
def test_generated_completion_bodies_never_5xx(server: str, body: object) -> None:
    check_no_server_error(server, "/v1/completions", body)


@fuzz
@given(body=chat_bodies())
def test_generated_chat_bodies_never_5xx(server: str, body: object) -> None:
    check_no_server_error(server, "/v1/chat/completions", body)
