"""KeyDiff (Park et al., 2025): keep the keys least like the others. A head's anchor is the mean of
its held keys, each normalised to unit length; a key's score is minus its cosine similarity to the
anchor, and the lowest-scoring keys go. Needs no attention probabilities, so it runs beside any
kernel.

The paper evicts block by block while the prompt streams in: here after every prefill chunk,
against the anchor of what the head holds then, so a long prompt's peak is budget + chunk. With
`decode`, each decode step does the same (one in, one out per head); without it, generated tokens
are appended and never evicted, as kvpress runs its presses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.registry import register


class KeyDiffParams(BudgetParams):
    name: Literal["keydiff"] = "keydiff"
    decode: bool = Field(default=False, description="also evict while decoding (else only while prefilling)")


def keydiff_scores(keys: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """keys [..., S, D], held [..., S] bool -> [..., S] float32: minus each key's cosine similarity to
    the mean of the held keys normalised to unit length (padding: -inf)."""
    unit = F.normalize(keys.float(), dim=-1) * held[..., None]
    anchor = unit.sum(-2, keepdim=True) / held.sum(-1)[..., None, None].clamp(min=1)
    similarity = F.cosine_similarity(keys.float(), anchor, dim=-1)
    return (-similarity).masked_fill(~held, float("-inf"))


@register
class KeyDiffPolicy(BudgetPolicy):
    name = "keydiff"
    Params = KeyDiffParams

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        if self.params.decode:
            return super().tokens_bound(max_new_tokens, chunk_tokens)
        return self.prefill_only_bound(max_new_tokens, chunk_tokens)

    def acts(self, decoding: bool, prompt_done: bool) -> bool:
        return not decoding or self.params.decode

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        acting = ~step.decoding | torch.tensor([p.params.decode for p in step.policies])
        over = (step.lengths > step.per_row([p.budget() for p in step.policies])[..., 0]).flatten(1).any(-1)
        rows = torch.nonzero(acting & over)[:, 0]
        if rows.numel() == 0:
            return None
        keep = step.held.clone()
        held = step.held[rows]
        scores = keydiff_scores(step.keys(rows), held)
        keep[rows] = keep_budget(step, scores, protected_recent(step)[rows], rows, standardise=True)
        return keep
