"""KIVI (Liu et al., 2024): quantize the cache, keys per channel and values per token.

While the prompt is prefilled the cache stays at full precision (as KIVI's own prefill does).
From the step that completes the prompt on, each head keeps its newest `residual` to
`residual + group_size - 1` tokens at full precision and moves the older ones, in whole groups of
`group_size` tokens (so a key group's min/max spans real tokens, never one at a time), into the
quantized page format of kvserve/cache/quantized.py. Attention de-quantizes in the kernel.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from kvserve.cache.quantized import QuantKey
from kvserve.policies.base import Policy, PolicyParams, PolicyStep, Transfer, oldest
from kvserve.policies.registry import register


class KIVIParams(PolicyParams):
    name: Literal["kivi"] = "kivi"
    bits: Literal[2, 4, 8] = Field(default=2, description="bits per quantized key and value element")
    group_size: int = Field(default=32, ge=16, le=256,
                            description="tokens per key quantization group (a power of two); also the "
                                        "channels per value group")
    residual: int = Field(default=128, ge=0, description="newest tokens kept at full precision (a multiple "
                                                          "of group_size)")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("group_size must be a power of two")
        return value

    @field_validator("residual")
    @classmethod
    def _aligned(cls, value: int, info: ValidationInfo) -> int:
        if value % info.data.get("group_size", 1):
            raise ValueError("residual must be a multiple of group_size")
        return value


def flush_groups(step: PolicyStep, acting: torch.Tensor, residual: torch.Tensor, group: torch.Tensor
                 ) -> torch.Tensor:
    """The oldest whole groups beyond each head's full-precision residual, for `acting` rows [n]:
    residual and group broadcast against [n, L, Hkv]; returns the [n, L, Hkv, S] mask to quantize."""
    over = step.lengths - residual
    counts = torch.where((over >= group) & acting[:, None, None], over // group * group, 0)
    if not bool(counts.any()):
        return torch.zeros_like(step.held)
    return oldest(step.positions, step.held, counts)


def quantize_into(step: PolicyStep, mask: torch.Tensor, keys: list[QuantKey]) -> None:
    """Ask for the slots of `mask` to move into each sequence's quantized tier (`keys`, one per sequence)."""
    if bool(mask.any()):
        for key in set(keys):
            mine = torch.tensor([k == key for k in keys])[:, None, None, None]
            step.transfers[key] = Transfer(mask & mine)


@register
class KIVIPolicy(Policy):
    name = "kivi"
    Params = KIVIParams

    def tier(self) -> QuantKey:
        return QuantKey(self.params.bits, self.params.group_size)

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        residual = step.per_row([p.params.residual for p in step.policies])[..., 0]
        group = step.per_row([p.params.group_size for p in step.policies])[..., 0]
        quantize_into(step, flush_groups(step, step.prompt_done, residual, group), [p.tier() for p in step.policies])
        return None
