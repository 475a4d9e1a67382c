"""The OpenAI wire format: request models (validated here, so a bad field is a 400 that names it)
and response models. Field names follow OpenAI, and vLLM where OpenAI has none (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, `min_tokens`, `include_stop_str_in_output`,
`skip_special_tokens`, `allowed_token_ids`, `bad_words`, `prompt_logprobs`, `truncate_prompt_tokens`,
`return_token_ids`, `request_id`, `priority`, the chat template's switches); `kv_policy` is kvserve's
extension. The sampling fields' ranges are the engine's own (`SAMPLING_BOUNDS`), declared here so that
a value out of range is a 400 naming its field and the schema shows the range."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kvserve.engine.sampling_params import SAMPLING_BOUNDS
from kvserve.policies.base import PolicyParams
from kvserve.policies.registry import parse_policy


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which no tokenizer can encode
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def bounded(default: Any, bound: str) -> Any:
    """A field with the range of the engine's sampling field `bound`."""
    return Field(default, **SAMPLING_BOUNDS[bound].constraints())


class OpenAIModel(BaseModel):
    # clients send vendor extensions freely; fields that would change the output are declared
    # (and rejected when unsupported), the rest are ignored
    model_config = ConfigDict(extra="ignore")


# vLLM request fields that change the output and that kvserve does not implement: set, each is a
# 400 naming it rather than silently ignored
UNSUPPORTED_VLLM_FIELDS = {
    "use_beam_search": "beam search",
    "structured_outputs": "structured outputs",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "prompt_embeds": "prompt embeddings",
    "logits_processors": "custom logits processors",
}


class FieldError(ValueError):
    """A cross-field check that fails; `param` names the field the client should change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class SamplingFields(OpenAIModel):
    """The fields both endpoints share."""

    model: str | None = None
    temperature: float = bounded(1.0, "temperature")
    top_p: float = bounded(1.0, "top_p")
    top_k: int = bounded(0, "top_k")
    min_p: float = bounded(0.0, "min_p")
    presence_penalty: float = bounded(0.0, "presence_penalty")
    frequency_penalty: float = bounded(0.0, "frequency_penalty")
    repetition_penalty: float = bounded(1.0, "repetition_penalty")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = bounded(0, "min_tokens")
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    bad_words: list[Text] | None = None
    prompt_logprobs: int | None = bounded(None, "prompt_logprobs")
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last k prompt tokens; -1: the context length
    return_token_ids: bool = False
    # the response's id, after its prefix; it is sent back in a header, so printable ASCII only
    request_id: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")
    priority: int = Field(0, ge=-(2**31), lt=2**31)  # lower runs first; needs --scheduling-policy priority
    # vLLM's: the prefix cache is salted with it, so only requests with the same salt share cached blocks
    cache_salt: str | None = Field(None, min_length=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(**SAMPLING_BOUNDS["logit_bias"].constraints())]] | None = None
    kv_policy: str | dict[str, Any] | None = None

    _policy: PolicyParams | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _unsupported_vllm_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, feature in UNSUPPORTED_VLLM_FIELDS.items():
                if data.get(name) not in (None, False):
                    raise FieldError(f"{name}: {feature} is not supported", name)
        return data

    @model_validator(mode="after")
    def _check_shared(self) -> SamplingFields:
        # validated by the policy's own pydantic model; its PolicyError names the field (kv_policy.budget)
        self._policy = None if self.kv_policy is None else parse_policy(self.kv_policy)
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options is only allowed when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs is not available when stream is true", "prompt_logprobs")
        if self.truncate_prompt_tokens == 0:
            raise FieldError("truncate_prompt_tokens must be -1 (the context length) or at least 1",
                             "truncate_prompt_tokens")
        if any(not (key.isascii() and key.isdigit()) for key in self.logit_bias or ()):  # "²" is a digit
            raise FieldError("logit_bias keys must be token ids (non-negative integers, as strings)", "logit_bias")
        return self

    @property
    def policy(self) -> PolicyParams | None:
        """The validated kv_policy; None means the server's default."""
        return self._policy

    @property
    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids."""
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM needs include_usage as well)."""
        return self.include_usage and self.stream_options.continuous_usage_stats  # type: ignore[union-attr]


Prompt = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # None: OpenAI's default of 16; 0 (with echo): score the prompt
    max_tokens: int | None = bounded(None, "max_tokens")
    logprobs: int | None = bounded(None, "logprobs")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's own (a BOS, say) around a text prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # one clear message instead of one error per member of the union
        def is_ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        ok = (isinstance(value, str) or is_ids(value)
              or (isinstance(value, list) and (all(isinstance(v, str) for v in value)
                                               or all(is_ids(v) for v in value))))
        if not ok:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                             "of token ids")
        if value in ("", []) or (isinstance(value, list) and any(v in ("", []) for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens must be at least 1; 0 (scoring the prompt) needs echo", "max_tokens")
        if self.suffix:
            raise FieldError("suffix (insertion) is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise FieldError("best_of is not supported; use n", "best_of")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts: strings or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # at least 1, unlike the engine's bound: a chat reply cannot only score its prompt
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = bounded(None, "logprobs")
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's chat template switches
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template writes them already
    echo: bool = False  # the reply starts with the last message when that is the assistant's

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message needs add_generation_prompt to be false",
                             "continue_final_message")
        if self.tools:
            raise FieldError("tools (function calling) are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise FieldError("only response_format type 'text' is supported", "response_format")
        return self

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None \
            else "max_completion_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def echoed_message(self) -> str | None:
        """What an `echo` reply starts with: the last message, when it is the assistant's."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else None


# ---- responses ----------------------------------------------------------------------------------


def _omit_none(value: Any) -> bool:
    return value is None


# fields a body carries only when asked for (vLLM's extras, a chunk's usage)
def _extra(default: Any = None) -> Any:
    return Field(default, exclude_if=_omit_none)


class KVCacheUsage(BaseModel):
    """kvserve's KV cache bytes for a request (engine KVUsage, summed over its samples); the footprints
    are in byte-steps: bytes held summed over the engine steps (engine Sequence.kv_footprint_byte_steps)."""

    policy: str
    bytes: int
    full_bytes: int
    peak_bytes: int
    footprint_byte_steps: int
    full_footprint_byte_steps: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    kv_cache: KVCacheUsage | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, kv_cache: KVCacheUsage | None = None,
           cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens), kv_cache=kv_cache)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob, in prompt_logprobs (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = _extra()
    prompt_token_ids: list[int] | None = _extra()
    token_ids: list[int] | None = _extra()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = _extra()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = _extra()
    prompt_token_ids: list[int] | None = _extra()


class Delta(BaseModel):
    # only the first chunk of a choice names the role, as OpenAI's do
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    token_ids: list[int] | None = _extra()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _extra()
    prompt_token_ids: list[int] | None = _extra()


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _extra()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a prompt, or chat messages as /v1/chat/completions would render them."""

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # for a prompt
    add_generation_prompt: bool = True  # for messages

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("give exactly one of prompt and messages", "prompt")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
