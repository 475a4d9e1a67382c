"""H2O (Zhang et al., 2023): keep the heavy hitters — the tokens that have received the most
attention so far — plus the most recent tokens.

Score: the attention probability each cached token received, summed over the query heads of its
KV group and over every query that saw it (a raw sum as in the paper's real-drop code; with
`normalize`, divided by the number of those queries, as kvpress's ObservedAttentionPress does).
Prefill chunks add the column sums of all their queries and the cache is cut back to the budget
after each chunk, so a long prompt's peak is budget + chunk. During decode it is one in, one out
per head: the lowest-scoring token outside the recent window gives its slot to the new token.
`recent` defaults to the paper's half of the budget; the prompt's tail kept beside it is the
shared default's (`DEFAULT_RECENT`), within what the budget leaves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.kernels.decode_evict import DecodeScore
from kvserve.policies.base import DEFAULT_RECENT, BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.pooling import PoolingKernel, pool_scores
from kvserve.policies.registry import register


class H2OParams(BudgetParams):
    name: Literal["h2o"] = "h2o"
    recent: int | None = Field(default=None, ge=0, description="newest tokens always kept (default: half the budget)")
    normalize: bool = Field(default=False, description="divide each score by the number of queries that saw the token")
    window: int | None = Field(default=None, ge=1, description="a prefill chunk adds the attention of its last "
                                                               "`window` queries only (default: all of them)")
    kernel: PoolingKernel = Field(default=1, description="rank by the score max-pooled over this many neighbouring "
                                                        "positions (odd; 1: no pooling)")


@register
class H2OPolicy(BudgetPolicy):
    name = "h2o"
    Params = H2OParams
    needs_decode_scores = True

    def recent(self) -> int:
        budget = self.context_budget()
        return min(self.params.recent, budget) if self.params.recent is not None else budget // 2

    def prompt_tail(self) -> int:
        return self.question_tokens + min(DEFAULT_RECENT, self.context_budget() - self.recent())

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return chunk_tokens if self.params.window is None else min(self.params.window, chunk_tokens)

    def decode_score(self) -> DecodeScore | None:
        plain = not (self.params.adaptive or self.params.normalize or self.params.kernel != 1)
        return DecodeScore.ACCUMULATED if plain else None

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        decoding = step.decoding[:, None, None, None]
        if step.decode_sum is not None:
            step.scores += torch.where(decoding, step.decode_sum, 0.0)
        if step.window is not None:
            step.scores += torch.where(decoding, 0.0, step.window)
        # aux counts the queries that saw each slot: every observed query of the step from its own position on
        newest = step.newest_position[:, None, None, None]
        observed = [p.prefill_window(n, False) for p, n in zip(step.policies, step.new_tokens.tolist())]
        first_observed = newest - step.per_row(observed) + 1
        step.aux += (newest + 1 - torch.maximum(step.positions, first_observed)).clamp(min=0)
        step.aux *= step.held
        normalize = step.per_row([p.params.normalize for p in step.policies])
        ranking = torch.where(normalize, step.scores / step.aux.clamp(min=1), step.scores)
        for kernel in {p.params.kernel for p in step.policies} - {1}:
            rows = torch.tensor([p.params.kernel == kernel for p in step.policies])
            ranking[rows] = pool_scores(ranking[rows], step.held[rows], step.positions[rows], kernel)
        return keep_budget(step, ranking, protected_recent(step))
