"""TailorKV (Yao et al., 2025): quantize the layers that need every token, offload the rest.

When the prompt is complete, each layer is classified from the observation window's attention
(the paper's test): if more than 20% of the attention mass falls outside the top 5% of keys, the
layer needs global information and is quantized (`bits`, the KIVI format, keys per channel over
`group_size` tokens, a full-precision residual); otherwise it is sparse. `quant_layers` skips the
test. [inferred] The top 5% is taken on the window's summed attention per KV head (the window's
queries and the group's heads together) rather than query by query.

A sparse layer keeps its `sinks` first and `recent` last prompt tokens and every generated token
on the device; the rest of the prompt moves to the host tier (kvserve/cache/host_tier.py, outside
--kv-cache-memory). Each decode step, per head, the group-mean query picks the `channels`
channels where |q| * max|K| is largest, scores the host tokens on them, and attends the
`budget - sinks - recent` best beside the resident ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from kvserve.cache.host_tier import HostKey
from kvserve.cache.quantized import QuantKey
from kvserve.policies.base import Policy, PolicyParams, PolicyStep, Transfer
from kvserve.policies.kivi import KIVIParams, flush_groups, quantize_into
from kvserve.policies.registry import register

TOP_FRACTION = 0.05  # the paper's alpha
OUTSIDE_MASS = 0.2  # the paper's beta
OBSERVED_QUERIES = 32


class TailorKVParams(PolicyParams):
    name: Literal["tailorkv"] = "tailorkv"
    bits: Literal[1, 2] = Field(default=2, description="bits of the quantized layers")
    sinks: int = Field(default=8, ge=0, description="first prompt tokens resident in sparse layers")
    recent: int = Field(default=56, ge=0, description="last prompt tokens resident in sparse layers")
    budget: int = Field(default=192, ge=1, description="tokens attended per head in a sparse layer")
    channels: int = Field(default=8, ge=1, description="key channels the sparse layers' token ranking reads")
    quant_layers: list[int] | None = Field(default=None, description="layers to quantize; default: the paper's test")
    group_size: int = Field(default=64, ge=16, le=256, description="tokens per key group (a power of two)")
    residual: int = Field(default=128, ge=0, description="newest tokens of quantized layers at full precision")

    @field_validator("budget")
    @classmethod
    def _exceeds_resident(cls, value: int, info: ValidationInfo) -> int:
        if value <= info.data.get("sinks", 0) + info.data.get("recent", 0):
            raise ValueError("budget must exceed sinks + recent")
        return value

    @field_validator("quant_layers")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(layer < 0 for layer in value):
            raise ValueError("quant_layers must be layer indices")
        return value

    _power_of_two = field_validator("group_size")(KIVIParams._power_of_two.__func__)
    _aligned = field_validator("residual")(KIVIParams._aligned.__func__)


@register
class TailorKVPolicy(Policy):
    name = "tailorkv"
    Params = TailorKVParams

    def __init__(self, params: TailorKVParams, prompt_tokens: int, context_tokens: int | None = None) -> None:
        super().__init__(params, prompt_tokens, context_tokens)
        self.quantized: torch.Tensor | None = None  # [L] bool, set when the prompt completes

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return self.prompt_end_window() if prompt_done else 0

    def prompt_end_window(self) -> int:
        return OBSERVED_QUERIES if self.params.quant_layers is None else 0

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        policies: list[TailorKVPolicy] = step.policies
        layers = step.lengths.shape[1]
        deciding = [i for i, p in enumerate(policies) if p.quantized is None and bool(step.prompt_done[i])]
        if deciding:
            cls._classify(step, deciding, layers)
        decided = torch.tensor([p.quantized is not None for p in policies])
        if not bool(decided.any()):
            return None
        # [n, L]: the quantized layers of each decided sequence (none for the others)
        quantized = torch.stack([p.quantized if p.quantized is not None else torch.zeros(layers, dtype=torch.bool)
                                 for p in policies])
        if deciding:
            cls._offload(step, deciding, decided[:, None] & ~quantized)
        residual = step.per_row([p.params.residual for p in policies])[..., 0]
        group = step.per_row([p.params.group_size for p in policies])[..., 0]
        mask = flush_groups(step, decided, residual, group) & quantized[:, :, None, None]
        quantize_into(step, mask, [QuantKey(p.params.bits, p.params.group_size) for p in policies])
        return None

    @classmethod
    def _classify(cls, step: PolicyStep, rows: list[int], layers: int) -> None:
        for i in rows:
            policy = step.policies[i]
            chosen = torch.zeros(layers, dtype=torch.bool)
            if policy.params.quant_layers is not None:
                chosen[[layer for layer in policy.params.quant_layers if layer < layers]] = True
            elif step.window is not None and bool(step.window[i].any()):
                votes = step.window[i]  # [L, Hkv, S]
                top = max(1, math.ceil(TOP_FRACTION * int(step.lengths[i].max())))
                outside = 1 - votes.topk(top, dim=-1).values.sum(-1) / votes.sum(-1).clamp(min=1e-9)
                chosen = outside.mean(-1) > OUTSIDE_MASS
            else:  # a one-token last chunk observed nothing: the paper's usual split, layer 0 quantized
                chosen[0] = True
            policy.quantized = chosen

    @classmethod
    def _offload(cls, step: PolicyStep, rows: list[int], sparse: torch.Tensor) -> None:
        """Move the middle prompt tokens of each sparse layer ([n, L] bool) of `rows` to the host tier."""
        policies: list[TailorKVPolicy] = step.policies
        picked = torch.zeros(len(policies), dtype=torch.bool)
        picked[rows] = True
        sinks = step.per_row([p.params.sinks for p in policies])
        prompt_end = step.per_row([p.prompt_tokens - p.params.recent for p in policies])
        mask = (step.held & (step.positions >= sinks) & (step.positions < prompt_end)
                & sparse[:, :, None, None] & picked[:, None, None, None])
        select = torch.tensor([p.params.budget - p.params.sinks - p.params.recent for p in policies])
        channels = torch.tensor([p.params.channels for p in policies])
        step.transfers[HostKey()] = Transfer(mask, {"select": select, "channels_scored": channels})
