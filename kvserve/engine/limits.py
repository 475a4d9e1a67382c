"""What a request may ask for, each rule once: token ids the vocabulary has, and a prompt plus the
tokens it asks for that fit the model's context. The engine checks them at its boundary; the HTTP API
checks them before admitting a request, naming its own fields."""

from __future__ import annotations

from collections.abc import Iterable

from kvserve.engine.errors import ContextLengthExceeded, InvalidRequest


def check_context_length(prompt_tokens: int, max_tokens: int, max_model_len: int, prompt_param: str = "prompt",
                         max_tokens_param: str = "max_tokens") -> None:
    """Raise ContextLengthExceeded when the prompt leaves no room for a token, or the prompt plus
    `max_tokens` exceeds `max_model_len`; the params name the fields as the caller's request does."""
    if prompt_tokens >= max_model_len:
        raise ContextLengthExceeded(f"the prompt is {prompt_tokens} tokens; the model's context length is "
                                    f"{max_model_len}", prompt_param)
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceeded(f"the prompt ({prompt_tokens} tokens) plus {max_tokens_param} ({max_tokens}) "
                                    f"exceeds the model's context length of {max_model_len} tokens", max_tokens_param)


def check_token_ids(param: str, token_ids: Iterable[int], vocab_size: int) -> None:
    """Raise InvalidRequest naming `param` unless every id is in [0, vocab_size)."""
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise InvalidRequest(f"{param}: token ids must be in [0, {vocab_size})", param)
