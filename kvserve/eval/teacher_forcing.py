"""Teacher forcing: feed a fixed continuation through the (compressed) cache instead of sampling,
and keep the model's distribution before each of its tokens. Built on the engine's per-request
token override, so the engine itself knows nothing of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams


@dataclass
class ForcedTokens:
    """A token override that replaces the i-th sampled token by `tokens[i]`, keeping the
    log-probabilities of the logits it was sampled from."""

    tokens: list[int]
    logprobs: list[torch.Tensor] = field(default_factory=list)  # one [vocab] per token fed

    def __call__(self, logits: torch.Tensor, sampled: int) -> int:
        self.logprobs.append(torch.log_softmax(logits, dim=-1))
        return self.tokens[len(self.logprobs) - 1]


def teacher_force(engine: LLMEngine, prompt: list[int], continuation: list[int], kv_policy: Any = None
                  ) -> torch.Tensor:
    """Feed `continuation` after `prompt` token by token under `kv_policy`; return the model's
    log-probabilities before each of its tokens, [len(continuation), vocab]."""
    forced = ForcedTokens(list(continuation))
    params = SamplingParams(max_tokens=len(continuation), temperature=0, ignore_eos=True)
    engine.add_request(f"force-{time.monotonic_ns()}", prompt, params, kv_policy, token_override=forced)
    while engine.has_unfinished():
        engine.step()
    return torch.stack(forced.logprobs)
