"""ThinK (Xu et al., 2025): prune the key channels the queries barely use.

When the prompt is complete, each (layer, KV head) scores its key channels by
mean_t(q_t,c^2) * mean_j(k_j,c^2) (the observation window's last `window` queries, averaged over
the query heads of the group, against the head's held keys) and keeps the (1 - channel_ratio) * D
best. The held tokens older than the window move to the thin-key page format
(kvserve/cache/thin_key.py), which stores only those channels of their keys; the newest `window`
tokens and generated tokens stay full width until `2 * window` have gathered, then the oldest
`window` are thinned. Values are untouched. Attention uses the query's matching channels with
the full-width 1/sqrt(D) scale.

With `base`, a token policy compresses the prompt first and ThinK thins what it keeps (ThinK's
`update_thinkv` order; kvpress's ComposedPress([SnapKV, ThinK])). As in the reference code, the
base acts while the prompt is prefilled; once tokens are thinned, nothing more is evicted.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from kvserve.cache.thin_key import ThinKey
from kvserve.policies.base import Policy, PolicyParams, PolicyStep, Transfer, oldest
from kvserve.policies.registry import register

_NOT_COMPOSABLE = ("think", "kivi", "tailorkv")


class ThinKParams(PolicyParams):
    name: Literal["think"] = "think"
    channel_ratio: float = Field(default=0.4, ge=0, lt=1, description="fraction of key channels pruned (lambda)")
    window: int = Field(default=32, ge=1, description="observation window; newest tokens kept full width")
    base: dict[str, Any] | None = Field(default=None, description="a token policy applied first, e.g. "
                                                                  '{"name": "snapkv", "ratio": 0.5}')
    _base: PolicyParams | None = PrivateAttr(default=None)

    @field_validator("base")
    @classmethod
    def _token_policy(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from kvserve.policies.registry import PolicyError, parse_policy

            if value.get("name") in _NOT_COMPOSABLE:
                raise ValueError(f"base must be a token policy, not {value.get('name')!r}")
            try:
                parse_policy(value)
            except PolicyError as e:
                raise ValueError(str(e).replace("kv_policy", "base", 1)) from None
        return value

    @model_validator(mode="after")
    def _parse_base(self) -> ThinKParams:
        if self.base is not None:
            from kvserve.policies.registry import parse_policy

            self._base = parse_policy(self.base)
        return self

    def kept_channels(self, head_dim: int) -> int:
        return head_dim - int(head_dim * self.channel_ratio)


@register
class ThinKPolicy(Policy):
    name = "think"
    Params = ThinKParams
    needs_key_norms = True  # for a knorm base

    def __init__(self, params: ThinKParams, prompt_tokens: int, context_tokens: int | None = None) -> None:
        super().__init__(params, prompt_tokens, context_tokens)
        from kvserve.policies.registry import create_policy

        self.base = None if params._base is None else create_policy(params._base, prompt_tokens, self.context_tokens)
        self.channels: torch.Tensor | None = None  # [L, Hkv, n_keep], chosen when the prompt completes

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        if self.base is None:
            return super().tokens_bound(max_new_tokens, chunk_tokens)
        return self.base.tokens_bound(max_new_tokens, chunk_tokens)

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return self.base.prefill_window(chunk_tokens, prompt_done) if self.base is not None else 0

    def query_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return self.params.window if prompt_done else 0

    def prompt_end_window(self) -> int:
        return max(self.params.window, self.base.prompt_end_window() if self.base is not None else 0)

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor:
        keep = step.held.clone()
        policies: list[ThinKPolicy] = step.policies
        prefill = [i for i, p in enumerate(policies) if p.base is not None and not bool(step.decoding[i])]
        for base_cls in {type(policies[i].base) for i in prefill}:
            rows = torch.tensor([i for i in prefill if type(policies[i].base) is base_cls])
            sub = step.subset(rows, [policies[i].base for i in rows.tolist()])
            sub_keep = base_cls.act(sub)
            step.scores[rows], step.aux[rows] = sub.scores, sub.aux
            if sub_keep is not None:
                keep[rows] = sub_keep
        choosing = [i for i, p in enumerate(policies) if p.channels is None and bool(step.prompt_done[i])]
        if choosing:
            cls._choose_channels(step, torch.tensor(choosing), keep)
        thinned = [p.channels is not None and bool(done) for p, done in zip(policies, step.prompt_done)]
        if not any(thinned):
            return keep
        window = step.per_row([p.params.window for p in policies])[..., 0]
        held = keep.sum(-1)
        first = ~step.decoding[:, None, None]
        # at the prompt's end every token older than the window; then `window` at a time
        counts = torch.where(first, held - window, torch.where(held >= 2 * window, held - window, 0)).clamp(min=0)
        mask = oldest(step.positions, keep, counts * torch.tensor(thinned)[:, None, None])
        moving = mask.flatten(1).any(-1).tolist()
        if not any(moving):
            return keep
        for keep_count in {p.channels.shape[-1] for p, m in zip(policies, moving) if m}:
            mine = [m and p.channels.shape[-1] == keep_count for p, m in zip(policies, moving)]
            channels = torch.zeros(*keep.shape[:3], keep_count, dtype=torch.long)
            for i in (i for i, m in enumerate(mine) if m):
                channels[i] = policies[i].channels
            step.transfers[ThinKey(keep_count)] = Transfer(mask & torch.tensor(mine)[:, None, None, None],
                                                           {"channels": channels})
        return keep

    @classmethod
    def _choose_channels(cls, step: PolicyStep, rows: torch.Tensor, keep: torch.Tensor) -> None:
        keys = step.keys(rows)  # [m, L, Hkv, S, D]
        kept = keep[rows][..., None]
        key_energy = (keys.pow(2) * kept).sum(-2) / kept.sum(-2).clamp(min=1)
        n, layers, kv_heads, dim = key_energy.shape
        # a sequence whose last prompt chunk was one token observed no window: it ranks on the keys alone
        query_energy = torch.ones_like(key_energy)
        if step.queries is not None:
            count = step.query_count[rows].clamp(min=1).view(n, 1, 1, 1)
            energy = step.queries[rows].pow(2).sum(2) / count  # [n, L, Hq, D]
            observed = energy.view(n, layers, kv_heads, -1, dim).mean(-2)
            seen = observed.flatten(1).any(-1)
            query_energy[seen] = observed[seen]
        score = query_energy * key_energy
        for i, row in enumerate(rows.tolist()):
            policy = step.policies[row]
            count = policy.params.kept_channels(dim)
            policy.channels = score[i].topk(count, dim=-1).indices.sort(-1).values
