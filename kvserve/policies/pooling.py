"""Pooling a head's token scores over neighbouring positions (SnapKV's clustering): a token next to
a high-scoring one scores high too, so a kept token keeps its neighbours and a multi-token fact
(a number's digits) survives whole."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError("kernel must be odd")
    return kernel


# a policy parameter: the pooling width, odd so that a slot is centred among its neighbours
PoolingKernel = Annotated[int, Field(ge=1), AfterValidator(_odd)]


def pool_scores(scores: torch.Tensor, held: torch.Tensor, positions: torch.Tensor, kernel: int,
                pooling: str = "max") -> torch.Tensor:
    """scores, held, positions [..., S] -> [..., S]: each held slot's score pooled over the `kernel`
    slots nearest to it in position order (an odd width; 1 returns the scores as they are).
    Slots need not be in position order: they are sorted, pooled and put back."""
    if kernel <= 1:
        return scores
    order = positions.masked_fill(~held, torch.iinfo(torch.int64).max).argsort(-1)
    ordered = scores.masked_fill(~held, 0.0).gather(-1, order)
    flat = ordered.reshape(-1, 1, ordered.shape[-1])
    pad = kernel // 2
    pooled = (F.max_pool1d(flat, kernel, 1, pad) if pooling == "max"
              else F.avg_pool1d(flat, kernel, 1, pad, count_include_pad=False))
    pooled = pooled[..., : ordered.shape[-1]].reshape(ordered.shape)
    return torch.empty_like(scores).scatter_(-1, order, pooled)
