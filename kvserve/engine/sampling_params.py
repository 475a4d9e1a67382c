"""What a request asks of the sampler: the OpenAI and vLLM sampling fields, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.engine.errors import InvalidRequest


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
        checks = [
            ("max_tokens", self.max_tokens >= 0, ">= 0 (0: the prompt is only scored)"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= -1, "-1, 0 or positive"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("logit_bias", all(-100 <= bias <= 100 for bias in self.logit_bias.values()), "values in [-100, 100]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in [0, max_tokens]"),
            ("allowed_token_ids", self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "non-empty"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "in [0, 20]"),
        ]
        for name, valid, expected in checks:
            if not valid:
                raise InvalidRequest(f"{name} must be {expected}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
