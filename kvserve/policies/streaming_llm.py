"""StreamingLLM (Xiao et al., 2024): the first `sinks` tokens (attention sinks) plus a window of
the most recent ones, `budget` tokens per head in all; the window leaves room for the prompt's last
`recent` tokens, kept like every budgeted policy's (the question outlives a long answer).
Positions are kept as they were (keys are cached after RoPE), which is kvpress's reading; no
re-rotation."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.registry import register


class StreamingLLMParams(BudgetParams):
    name: Literal["streaming_llm"] = "streaming_llm"
    sinks: int = Field(default=4, ge=0, description="first tokens always kept")
    adaptive_unsupported: ClassVar[str] = ("streaming_llm keeps tokens by position, the same in every head: no "
                                           "scores to share a layer's budget by")


@register
class StreamingLLMPolicy(BudgetPolicy):
    name = "streaming_llm"
    Params = StreamingLLMParams

    def context_budget(self) -> int:
        return max(self.params.budget_for(self.context_tokens), self.params.sinks + 1)

    def reserved(self) -> int:
        return self.params.sinks

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        # the rest of the budget goes to the newest tokens: rank by position
        sinks = step.per_row([p.params.sinks for p in step.policies])
        protected = (step.held & (step.positions < sinks)) | protected_recent(step)
        return keep_budget(step, step.positions.float(), protected)  # `adaptive` is refused: by position
