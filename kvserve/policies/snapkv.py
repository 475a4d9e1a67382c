"""SnapKV (Li et al., 2024): once the whole prompt is in the cache, the last `window` prompt
queries vote for the earlier tokens; their summed attention (over the window and the query heads
of a group), pooled over neighbouring positions, picks `budget - window` tokens to keep beside the
window itself, and the prompt's last `recent` tokens like every budgeted policy (the window
already covers them at its default). Prefill only: generated tokens are appended and never evicted.

The window is read from the prompt's last chunk, which the scheduler makes at least `window` long."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.pooling import PoolingKernel, pool_scores
from kvserve.policies.registry import register


class SnapKVParams(BudgetParams):
    name: Literal["snapkv"] = "snapkv"
    window: int = Field(default=32, ge=1, description="observation window: the prompt's last queries")
    kernel: PoolingKernel = Field(default=7, description="pooling width over neighbouring positions (odd)")
    pooling: Literal["max", "avg"] = "max"


@register
class SnapKVPolicy(BudgetPolicy):
    name = "snapkv"
    Params = SnapKVParams

    def context_budget(self) -> int:
        return max(self.params.budget_for(self.context_tokens), self.params.window)

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        return self.prompt_tokens + max_new_tokens  # the whole prompt is held before it is compressed

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return self.prompt_end_window() if prompt_done else 0

    def prompt_end_window(self) -> int:
        return self.params.window

    def acts(self, decoding: bool, prompt_done: bool) -> bool:
        return prompt_done and not decoding

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        # compress once, at the step that completes the prompt
        acting = step.prompt_done & ~step.decoding
        if step.window is None or not bool(acting.any()):
            return None
        keep = step.held.clone()
        rows = torch.nonzero(acting)[:, 0]
        for kernel, pooling in {(step.policies[i].params.kernel, step.policies[i].params.pooling) for i in rows}:
            same = [i for i in rows.tolist() if (step.policies[i].params.kernel, step.policies[i].params.pooling)
                    == (kernel, pooling)]
            keep[same] = cls._select(step, torch.tensor(same), kernel, pooling)
        return keep

    @classmethod
    def _select(cls, step: PolicyStep, rows: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
        held, positions = step.held[rows], step.positions[rows]
        pooled = pool_scores(step.window[rows], held, positions, kernel, pooling)
        window = step.per_row([step.policies[i].params.window for i in rows.tolist()])
        in_window = positions > step.newest_position[rows][:, None, None, None] - window
        protected = protected_recent(step)[rows] | in_window
        return keep_budget(step, pooled, protected, rows)
