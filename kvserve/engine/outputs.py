"""What the engine hands back to its caller, one object per step in which a request advanced."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, text, logprob)
    rank: int | None = None  # 1 for the most likely token; given for prompt tokens (vLLM's prompt_logprobs)


@dataclass
class KVUsage:
    """Bytes of KV cache a request held: now, at its peak, and what a full fp cache would hold; and its
    footprint, the bytes held summed over its steps (Sequence.kv_footprint_byte_steps), with a full
    cache's footprint over the same steps."""

    policy: str
    bytes: int
    full_bytes: int
    peak_bytes: int
    footprint_byte_steps: int
    full_footprint_byte_steps: int


@dataclass
class RequestOutput:
    """The increment since the last output of this request.

    `text` is the newly decodable text (never a broken multi-byte character, never part of a stop
    string); `token_ids` the new token ids. `finish_reason` is set on the last output:
    "stop" (EOS, stop token or stop string), "length", or "abort".
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    kv_usage: KVUsage | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics | None = None  # set on the final output
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked for
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed


@dataclass
class RequestMetrics:
    """Engine-side timestamps (time.monotonic()) of one request, attached to its final output."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
