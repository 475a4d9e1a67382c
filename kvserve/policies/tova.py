"""TOVA (Oren et al., 2024): when over budget, evict the token the current query attends least,
its attention averaged over the query heads of the group. At the end of the prompt the last
prompt query decides; during decode, each new query does (one in, one out). No history is kept."""

from __future__ import annotations

from typing import Literal

import torch

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_top, protected_recent
from kvserve.policies.registry import register


class TOVAParams(BudgetParams):
    name: Literal["tova"] = "tova"


@register
class TOVAPolicy(BudgetPolicy):
    name = "tova"
    Params = TOVAParams
    needs_decode_scores = True

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return 1

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        current = torch.zeros_like(step.scores)
        decoding = step.decoding[:, None, None, None]
        if step.decode_sum is not None:
            current = torch.where(decoding, step.decode_sum, current)
        if step.window is not None:
            current = torch.where(decoding, current, step.window)
        step.scores.copy_(current / step.group_size)
        budget = step.per_row([p.budget() for p in step.policies])[..., 0]
        return keep_top(step.scores, step.held, protected_recent(step), budget)
