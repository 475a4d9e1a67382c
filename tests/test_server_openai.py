"""The official openai client against the live server: completions and chat, streamed and not,
n > 1, stop strings, seeds, logprobs; asserted on content and shape."""

from __future__ import annotations

import math

import openai
import pytest

from kvserve.model.loader import load_tokenizer, resolve_model

MODEL = "SmolLM2-135M-Instruct"
STORY = "Once upon a time, in a small village by the sea,"
COUNTING = "1, 2, 3, 4,"


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 8192


def test_completion_greedy_content_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    usage = r.usage
    assert usage.prompt_tokens == 5 and 1 <= usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    kv = usage.model_extra["kv_cache"]
    assert kv["policy"] == "full"
    # the full policy holds exactly a full cache: bytes at the end = peak = full
    assert kv["bytes"] == kv["full_bytes"] == kv["peak_bytes"] > 0


def test_kv_footprint_sums_steps_and_samples(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt=STORY, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    one = client.completions.create(**kwargs).usage.model_extra["kv_cache"]
    # the prompt's step, then 5 decode steps, each holding at least the prompt's pages and at most the end's
    assert 6 * one["bytes"] >= one["footprint_byte_steps"] > one["bytes"] > 0
    assert one["footprint_byte_steps"] == one["full_footprint_byte_steps"]  # the full policy holds a full cache
    two = client.completions.create(**kwargs, n=2).usage.model_extra["kv_cache"]
    assert two["footprint_byte_steps"] == two["full_footprint_byte_steps"] == 2 * one["footprint_byte_steps"]
    chunks = client.completions.create(**kwargs, n=2, stream=True, stream_options={"include_usage": True})
    streamed = [c.usage for c in chunks if c.usage is not None][-1].model_extra["kv_cache"]
    assert streamed["footprint_byte_steps"] == two["footprint_byte_steps"]


def test_completion_counts_to_length_with_ignore_eos(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=STORY, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_token_id_prompt_matches_string_prompt(client: openai.OpenAI) -> None:
    token_ids = load_tokenizer(resolve_model(None))(COUNTING)["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(token_ids)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=20, temperature=0, stop=[" 7", "zzz"])
    assert r.choices[0].text == " 5, 6,"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == " 7"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=20, temperature=0, stop=" 7", stream=True))
    assert streamed == " 5, 6,"


def test_sampling_fields_reach_the_sampler(client: openai.OpenAI) -> None:
    def text(**fields: object) -> str:
        extra = {k: fields.pop(k) for k in ("top_k", "min_p", "stop_token_ids") if k in fields}
        r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, extra_body=extra, **fields)
        return r.choices[0].text

    greedy = text(temperature=0)
    assert greedy.startswith(" 5, 6,")
    # top_k=1 and min_p=1 leave only the most likely token, whatever the temperature
    assert text(temperature=1.5, seed=3, top_k=1) == greedy
    assert text(temperature=1.5, seed=3, min_p=1.0) == greedy
    # the penalties push the greedy choice away from the tokens it has already produced
    def story(**penalty: float) -> str:
        return client.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0, **penalty,
                                         extra_body={"ignore_eos": True}).choices[0].text

    plain = story()
    assert story(frequency_penalty=2.0) != plain
    assert story(presence_penalty=2.0) != plain
    comma = load_tokenizer(resolve_model(None))(",")["input_ids"]
    assert len(comma) == 1
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": comma})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == comma[0]
    assert r.choices[0].text == " 5,"  # as in vLLM, a (non-special) stop token stays in the text


def test_logit_bias_min_tokens_and_repetition_penalty(client: openai.OpenAI) -> None:
    tokenizer = load_tokenizer(resolve_model(None))
    [comma], [ocean] = tokenizer(",")["input_ids"], tokenizer(" ocean")["input_ids"]
    # OpenAI's logit_bias (token ids as strings): +100 makes a token the greedy pick, -100 bans it
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4, temperature=0,
                                  logit_bias={str(ocean): 100})
    assert r.choices[0].text == " ocean" * 4
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=6, temperature=0,
                                  logit_bias={str(comma): -100})
    assert r.choices[0].text.startswith(" 5") and "," not in r.choices[0].text
    # vLLM's min_tokens: the stop token, biased to be the greedy pick, comes only after four others
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0,
                                  logit_bias={str(comma): 100}, extra_body={"stop_token_ids": [comma], "min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].model_extra["stop_reason"] == comma
    assert r.choices[0].text.endswith(",") and "," not in r.choices[0].text[:-1]
    # vLLM's repetition_penalty also discourages the prompt's own tokens
    chat = client.chat.completions.create(model=MODEL, messages=chat_messages("Say: the the the the"),
                                          max_tokens=12, temperature=0)
    penalised = client.chat.completions.create(model=MODEL, messages=chat_messages("Say: the the the the"),
                                               max_tokens=12, temperature=0, extra_body={"repetition_penalty": 2.0})
    assert penalised.choices[0].message.content != chat.choices[0].message.content
    # vLLM's allowed_token_ids and include_stop_str_in_output
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=5, temperature=1.0, seed=1,
                                  extra_body={"allowed_token_ids": [ocean, comma], "ignore_eos": True})
    assert r.choices[0].text.replace(" ocean", "").replace(",", "") == ""
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=20, temperature=0, stop=[" 7"],
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == " 5, 6, 7"


def test_echo_repeats_the_prompt_with_its_logprobs(client: openai.OpenAI) -> None:
    # what lm-eval-harness's loglikelihood requests ask of an OpenAI completions server
    echoed = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0, echo=True,
                                       logprobs=2).choices[0]
    plain = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0,
                                      logprobs=2).choices[0]
    assert echoed.text == COUNTING + plain.text
    lp = echoed.logprobs
    prompt_len = len(load_tokenizer(resolve_model(None))(COUNTING)["input_ids"])
    assert len(lp.tokens) == prompt_len + 3 and "".join(lp.tokens) == echoed.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.tokens[prompt_len:] == plain.logprobs.tokens
    assert lp.token_logprobs[prompt_len:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    # a counting prompt is easy to predict: the prompt's own digits are the model's top choice
    assert lp.top_logprobs[prompt_len - 2][lp.tokens[prompt_len - 2]] == max(lp.top_logprobs[prompt_len - 2].values())
    streamed = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.text
    # max_tokens 0 only scores the prompt, as OpenAI's legacy completions did
    scored = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=0, echo=True, logprobs=2)
    assert scored.choices[0].text == COUNTING and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.tokens == lp.tokens[:prompt_len]
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:prompt_len], abs=1e-5)
    by_ids = client.completions.create(model=MODEL, prompt=[[101, 102, 103]], max_tokens=1, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith(load_tokenizer(resolve_model(None)).decode([101, 102, 103]))


def test_seed_reproduces_and_different_seeds_differ(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=STORY, max_tokens=16, temperature=1.0, seed=seed,
                                          extra_body={"ignore_eos": True}).choices[0].text

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert first == again
    assert first != other


def test_n_samples_are_independent_and_reproducible(client: openai.OpenAI) -> None:
    def run() -> list[str]:
        r = client.completions.create(model=MODEL, prompt=STORY, max_tokens=12, temperature=1.0, n=2, seed=99,
                                      extra_body={"ignore_eos": True})
        assert [c.index for c in r.choices] == [0, 1]
        assert r.usage.completion_tokens == 24
        return [c.text for c in r.choices]

    texts = run()
    assert texts[0] != texts[1]
    assert run() == texts


def test_prompt_list_times_n_gives_indexed_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=[COUNTING, STORY], max_tokens=3, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    # greedy: both samples of a prompt agree; the two prompts continue differently
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3] and by_index[0] != by_index[2]
    assert r.usage.completion_tokens == 12


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=STORY, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        # greedy: the sampled token is the most likely one
        assert math.isclose(value, max(top.values()), abs_tol=1e-5) and top[token] == value
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_completion_content_and_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=chat_messages("What is the capital of France?"),
                                       max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    message = r.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10


def test_chat_multi_turn_uses_the_history(client: openai.OpenAI) -> None:
    messages = [*chat_messages("My name is Zorblax. Reply OK."), {"role": "assistant", "content": "OK."},
                {"role": "user", "content": "What is my name?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert "Zorblax" in r.choices[0].message.content


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=chat_messages("Say hello."), max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.token == item.top_logprobs[0].token and item.logprob == item.top_logprobs[0].logprob
        assert bytes(item.bytes).decode(errors="replace") == item.token


def test_chat_stream_matches_non_streamed_for_a_seed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=chat_messages("Tell me about the sea."), max_tokens=12, temperature=0.9,
                  seed=7, n=2)
    whole = client.chat.completions.create(**kwargs)
    parts: dict[int, str] = {0: "", 1: ""}
    roles, usage = set(), None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            parts[choice.index] += choice.delta.content or ""
    assert roles == {0, 1}
    assert [parts[0], parts[1]] == [c.message.content for c in whole.choices]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_matches_non_streamed_for_a_seed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt=STORY, max_tokens=10, temperature=1.0, seed=5)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.id == chunks[0].id for c in chunks)


def test_errors_reach_the_client_as_typed_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
