"""Knorm (Devoto et al., 2024): keep the keys of lowest L2 norm, which tend to draw the most
attention. Needs no attention probabilities at all: a cheap baseline kvpress users compare with.
Acts after every prefill chunk and decode step, so a head never holds more than budget + chunk."""

from __future__ import annotations

from typing import Literal

import torch

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.registry import register


class KnormParams(BudgetParams):
    name: Literal["knorm"] = "knorm"


@register
class KnormPolicy(BudgetPolicy):
    name = "knorm"
    Params = KnormParams
    needs_key_norms = True

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        # norms arrive for the step's new keys only (NaN elsewhere): keep each as the slot's score
        fresh = ~torch.isnan(step.key_norms)
        step.scores.copy_(torch.where(fresh, -step.key_norms, step.scores))
        return keep_budget(step, step.scores, protected_recent(step), standardise=True)
