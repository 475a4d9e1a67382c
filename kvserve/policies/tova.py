"""TOVA (Oren et al., 2024): when over budget, evict the token the current query attends least,
its attention averaged over the layer's query heads, so a layer's heads keep the same tokens
(as the paper and kvpress do; `heads: "group"` averages over each KV head's own group instead,
letting heads keep different tokens). Once the prompt is in, its last query cuts it back to the
budget (the paper's reading: the prompt is encoded, then compressed); during decode each new
query does, one in, one out. No history is kept.

With `chunked`, the last query of every prefill chunk cuts back already, so a long prompt's peak
is budget + chunk rather than the whole prompt; but a chunk's last query has not read the
question yet, so what the question needs may be gone before it arrives."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from kvserve.kernels.decode_evict import DecodeScore
from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.registry import register


class TOVAParams(BudgetParams):
    name: Literal["tova"] = "tova"
    heads: Literal["layer", "group"] = Field(default="layer", description="average the attention over the layer's "
                                             "query heads (layer) or over each KV head's group (group)")
    chunked: bool = Field(default=False, description="cut back after every prefill chunk (peak: budget + chunk), "
                                                     "not once the prompt is in")

    @model_validator(mode="after")
    def _adaptive_needs_group(self) -> TOVAParams:
        if self.adaptive and self.heads == "layer":
            raise ValueError("adaptive needs heads: group (with heads: layer, a layer's heads all score alike)")
        return self


def layer_mean(scores: torch.Tensor, held: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """scores, held, positions [n, L, Hkv, S] -> each held slot's score averaged over the layer's KV heads
    by token position (a head that no longer holds the token adds 0); 0 where not held."""
    n, layers, kv_heads, _ = scores.shape
    where = positions.masked_fill(~held, 0).flatten(2)
    total = torch.zeros(n, layers, int(where.max()) + 1).scatter_add_(-1, where, (scores * held).flatten(2))
    return (total / kv_heads).gather(-1, where).view_as(scores) * held


@register
class TOVAPolicy(BudgetPolicy):
    name = "tova"
    Params = TOVAParams
    needs_decode_scores = True

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        if self.params.chunked:
            return super().tokens_bound(max_new_tokens, chunk_tokens)
        return self.prompt_tokens + max_new_tokens  # the whole prompt is held until it is in

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return 1 if prompt_done or self.params.chunked else 0

    def acts(self, decoding: bool, prompt_done: bool) -> bool:
        return decoding or prompt_done or self.params.chunked

    def decode_score(self) -> DecodeScore | None:
        if self.params.adaptive:
            return None
        return DecodeScore.LAYER_MEAN if self.params.heads == "layer" else DecodeScore.GROUP_MEAN

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        acting = step.decoding | step.prompt_done | torch.tensor([p.params.chunked for p in step.policies])
        if not bool(acting.any()):
            return None
        decoding = step.decoding[:, None, None, None]
        current = torch.zeros_like(step.scores)
        if step.decode_sum is not None:
            current = torch.where(decoding, step.decode_sum, current)
        if step.window is not None:
            current = torch.where(decoding, current, step.window)
        current = current / step.group_size
        by_layer = torch.tensor([p.params.heads == "layer" for p in step.policies])
        if bool(by_layer.any()):
            current[by_layer] = layer_mean(current[by_layer], step.held[by_layer], step.positions[by_layer])
        step.scores.copy_(current)
        keep = keep_budget(step, step.scores, protected_recent(step))
        return torch.where(acting[:, None, None, None], keep, step.held)
