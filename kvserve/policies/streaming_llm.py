"""StreamingLLM (Xiao et al., 2024): the first `sinks` tokens (attention sinks) plus a window of
the most recent ones, `budget` tokens per head in all. Positions are kept as they were (keys are
cached after RoPE), which is kvpress's reading; no re-rotation."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep
from kvserve.policies.registry import register


class StreamingLLMParams(BudgetParams):
    name: Literal["streaming_llm"] = "streaming_llm"
    sinks: int = Field(default=4, ge=0, description="first tokens always kept")


@register
class StreamingLLMPolicy(BudgetPolicy):
    name = "streaming_llm"
    Params = StreamingLLMParams

    def budget(self) -> int:
        return max(self.params.budget_for(self.prompt_tokens), self.params.sinks + 1)

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        sinks = step.per_row([p.params.sinks for p in step.policies])
        window = step.per_row([p.budget() - p.params.sinks for p in step.policies])
        newest = step.newest_position[:, None, None, None]
        return step.held & ((step.positions < sinks) | (step.positions > newest - window))
