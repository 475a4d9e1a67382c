"""CORM (Dai et al., 2024): evict a key once it has been minor for each of the last `window`
queries, unless it is among the `recent` newest keys. Budget-free and per head, so heads end up
holding different numbers of tokens; compaction returns whole pages to the pool as a head shrinks.

A key is minor for a query at step t when its attention is below 1/t for every query head of its
group (the max over the group is below 1/t). Our reading of the paper's open points:
- t is the query's position + 1, the number of keys it would see uncompressed (not the current,
  shorter, cache length, which would raise the threshold after every eviction);
- the prompt is observed by decode queries only: prompt keys are kept at prefill and become
  evictable after `window` decode steps, so CORM does not lower the prefill peak;
- the optional `budget` caps a head: past it, the keys minor for the longest go first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.policies.base import Policy, PolicyParams, PolicyStep, keep_top
from kvserve.policies.registry import register


class CORMParams(PolicyParams):
    name: Literal["corm"] = "corm"
    window: int = Field(default=256, ge=1, description="w: consecutive minor queries before a key goes")
    recent: int = Field(default=256, ge=0, description="r: newest keys never evicted")
    budget: int | None = Field(default=None, ge=1, description="optional cap on tokens per head")


@register
class CORMPolicy(Policy):
    name = "corm"
    Params = CORMParams
    needs_decode_scores = True

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        total = self.prompt_tokens + max_new_tokens
        return total if self.params.budget is None else min(total, max(self.params.budget, self.prompt_tokens))

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        if step.decode_max is None or not bool(step.decoding.any()):
            return None
        decoding = step.decoding[:, None, None, None]
        threshold = 1.0 / (step.newest_position[:, None, None, None] + 1)
        minor = step.decode_max < threshold
        # aux: how many consecutive decode queries found the key minor
        step.aux.copy_(torch.where(decoding, torch.where(minor, step.aux + 1, 0.0), step.aux) * step.held)
        recent = step.per_row([p.params.recent for p in step.policies])
        protected = step.positions > step.newest_position[:, None, None, None] - recent
        window = step.per_row([p.params.window for p in step.policies])
        keep = step.held & ~(decoding & ~protected & (step.aux >= window))
        budgets = [p.params.budget or torch.iinfo(torch.int32).max for p in step.policies]
        return keep_top(-step.aux, keep, protected, step.per_row(budgets)[..., 0])
