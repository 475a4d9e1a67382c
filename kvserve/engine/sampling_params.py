"""What a request asks of the sampler: the OpenAI and vLLM sampling fields, validated once.

`SAMPLING_BOUNDS` is the one statement of their numeric ranges: `SamplingParams` checks it, and the
HTTP API declares the same ranges on its request fields (so its schema shows them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.engine.errors import InvalidRequest

MAX_LOGPROBS = 20  # the sampler returns at most this many alternatives per token


@dataclass(frozen=True)
class Bound:
    """A numeric range in pydantic's terms: `ge` or `gt` below, `le` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def __str__(self) -> str:
        """As an error message says it: `in (0, 1]`, `>= -1`."""
        if self.ge is not None:
            low, only_low = f"[{self.ge:g}", f">= {self.ge:g}"
        elif self.gt is not None:
            low, only_low = f"({self.gt:g}", f"> {self.gt:g}"
        else:
            return f"<= {self.le:g}"
        return only_low if self.le is None else f"in {low}, {self.le:g}]"

    def constraints(self) -> dict[str, float]:
        """The bound as keyword arguments of pydantic's `Field`."""
        return {name: value for name, value in (("ge", self.ge), ("gt", self.gt), ("le", self.le))
                if value is not None}


# OpenAI's ranges, and vLLM's for its fields; `logit_bias` bounds each bias value
SAMPLING_BOUNDS = {
    "max_tokens": Bound(ge=0),  # 0: the prompt is only scored
    "temperature": Bound(ge=0, le=2),
    "top_p": Bound(gt=0, le=1),
    "top_k": Bound(ge=-1),  # 0 or -1: disabled
    "min_p": Bound(ge=0, le=1),
    "presence_penalty": Bound(ge=-2, le=2),
    "frequency_penalty": Bound(ge=-2, le=2),
    "repetition_penalty": Bound(gt=0),
    "logit_bias": Bound(ge=-100, le=100),
    "min_tokens": Bound(ge=0),
    "logprobs": Bound(ge=0, le=MAX_LOGPROBS),
    "prompt_logprobs": Bound(ge=0, le=MAX_LOGPROBS),
}


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages every token of the prompt and the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM's: no EOS, stop token id or stop string ends the output before this many tokens
    include_stop_str_in_output: bool = False  # vLLM's: a matched stop string stays in the text
    skip_special_tokens: bool = True  # vLLM's: special tokens (EOS, chat markers) are left out of the text
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be sampled
    bad_words: list[str] = field(default_factory=list)  # vLLM's: words the output may not contain
    logprobs: int | None = None  # number of top alternatives to return with each sampled token
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob, with this many alternatives

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if name == "logit_bias":
                if any(bias not in bound for bias in value.values()):
                    raise InvalidRequest(f"logit_bias values must be {bound}", name)
            elif value is not None and value not in bound:
                raise InvalidRequest(f"{name} must be {bound}", name)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest("min_tokens must be at most max_tokens", "min_tokens")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequest("allowed_token_ids must be non-empty", "allowed_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
