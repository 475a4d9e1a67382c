"""CORM (Dai et al., 2024): evict a key once it has been minor for each of the last `window`
queries, unless it is among the `recent` newest keys. Budget-free and per head, so heads end up
holding different numbers of tokens; compaction returns whole pages to the pool as a head shrinks.

A key is minor for a query at position p when its attention is below 1/(p + 1) for every query
head of its group (the max over the group is below the threshold). The paper's observation is
that a query's attention is predicted by the queries just before it, and that holds inside the
prompt too, so the prompt's own last queries judge its keys:
- once the prompt is in, its last `window` queries (the scheduler makes the prompt's last chunk
  hold them) are read back (`query_window`) and each key's attention under each is recomputed
  over what the head holds; a key minor for all of them has a count of `window` and goes at once;
- each decode query extends or resets the count from the decode kernel's group max, and a key
  whose count reaches `window` goes;
- `chunked`: the last `window` queries of every prefill chunk judge already, so a long prompt's
  peak is bounded by what each chunk keeps; a key minor for all of them adds to its count when
  they were the whole chunk, else restarts at their number (a lower bound: a key may stay longer,
  never go sooner). Keys judged before the question is read cannot be saved by it;
- `prompt: false`: decode queries alone judge, which frees nothing before `window` tokens have
  been generated.
A number's later digits draw less than 1/(p + 1) from every query of the question, so on passkey
prompts the paper's rule keeps only the key's first digits (docs/benchmarks.md); `kernel` (odd,
SnapKV's pooling over positions) keeps the neighbours of every major key as well.
Our reading of the paper's open points: p + 1 is the number of keys the query would see
uncompressed (not the current, shorter, cache length, which would raise the threshold after every
eviction); the optional `budget` caps a head: past it, the keys minor for the longest go first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.policies.base import Policy, PolicyParams, PolicyStep, keep_top
from kvserve.policies.pooling import PoolingKernel, pool_scores
from kvserve.policies.registry import register


class CORMParams(PolicyParams):
    name: Literal["corm"] = "corm"
    window: int = Field(default=256, ge=1, description="w: consecutive minor queries before a key goes")
    recent: int = Field(default=256, ge=0, description="r: newest keys never evicted")
    budget: int | None = Field(default=None, ge=1, description="optional cap on tokens per head")
    prompt: bool = Field(default=True, description="the prompt's own last queries judge its keys once it is in "
                                                   "(false: decode queries only)")
    kernel: PoolingKernel = Field(default=1, description="a key next to a major one (within kernel // 2 positions) "
                                                     "is not minor either (odd; 1: the paper)")
    chunked: bool = Field(default=False, description="the last queries of every prefill chunk judge already "
                                                     "(a lower peak; the prompt's end cannot save a key any more)")


def minor_for_all(queries: torch.Tensor, query_positions: torch.Tensor, observed: torch.Tensor,
                  keys: torch.Tensor, key_positions: torch.Tensor, held: torch.Tensor, scale: float) -> torch.Tensor:
    """Whether every observed query found each key minor.

    queries [..., W, G, D] (a KV head's group of G query heads), query_positions [..., W], observed
    [..., W] bool (padding False), keys [..., S, D], key_positions and held [..., S] -> [..., S] bool.
    A query's attention is its softmax over the held keys at or before its position; a key is minor
    for it when that is below 1/(p + 1) for every head of the group, compared as logs:
    logit - lse + log(p + 1) < 0. A key some observed query cannot see is not minor for all.
    """
    visible = held[..., None, :] & (key_positions[..., None, :] <= query_positions[..., :, None])  # [..., W, S]
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    logits = torch.einsum("...wgd,...sd->...wgs", queries * scale, keys).add_(bias[..., :, None, :])
    # an unobserved (padding) query's offset is -inf, so it never makes a key major
    offset = torch.log1p(query_positions.float()).masked_fill(~observed, float("-inf"))[..., None]
    offset = offset - logits.logsumexp(-1)  # [..., W, G]
    worst = logits.add_(offset[..., None]).amax((-3, -2))  # the largest log-ratio over the queries and the group
    seen_by_all = (visible | ~observed[..., None]).all(-2)
    return (worst < 0) & seen_by_all


@register
class CORMPolicy(Policy):
    name = "corm"
    Params = CORMParams
    needs_decode_scores = True

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        total = self.prompt_tokens + max_new_tokens
        return total if self.params.budget is None else min(total, self.params.budget + chunk_tokens)

    def query_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        judging = self.params.prompt and (prompt_done or self.params.chunked)
        return min(self.params.window, chunk_tokens) if judging else 0

    def prompt_end_window(self) -> int:
        return self.params.window if self.params.prompt and not self.params.chunked else 0

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        # this step's observed queries per row (a decode row: its one query) and the keys minor for all
        observed = torch.where(step.decoding, 1, step.query_count if step.query_count is not None else 0)
        all_minor = torch.zeros_like(step.held)
        if step.queries is not None:
            all_minor = cls._minor_for_prefill(step)
        if step.decode_max is not None:
            threshold = 1.0 / (step.newest_position[:, None, None, None] + 1)
            all_minor = torch.where(step.decoding[:, None, None, None], step.decode_max < threshold, all_minor)
        for kernel in {p.params.kernel for p in step.policies} - {1}:
            rows = torch.tensor([p.params.kernel == kernel for p in step.policies])
            near_major = pool_scores((~all_minor[rows]).float(), step.held[rows], step.positions[rows], kernel) > 0
            all_minor[rows] &= ~near_major
        # aux: how many consecutive queries found the key minor; a step that observed all its queries
        # extends the count of the steps before, one that observed its last ones only restarts it there
        whole = (observed == step.new_tokens)[:, None, None, None]
        count = observed.float()[:, None, None, None]
        step.aux.copy_(torch.where(all_minor & (observed > 0)[:, None, None, None],
                                   torch.where(whole, step.aux + count, count), 0.0) * step.held)
        recent = step.per_row([p.params.recent for p in step.policies])
        protected = step.held & (step.positions > step.newest_position[:, None, None, None] - recent)
        window = step.per_row([p.params.window for p in step.policies])
        keep = step.held & (protected | (step.aux < window))
        budgets = [p.params.budget or torch.iinfo(torch.int32).max for p in step.policies]
        return keep_top(-step.aux, keep, protected, step.per_row(budgets)[..., 0])

    @classmethod
    def _minor_for_prefill(cls, step: PolicyStep) -> torch.Tensor:
        """[n, L, Hkv, S] bool: the keys every observed prefill query found minor (False for rows that
        observed none), one layer at a time to bound the logits' size."""
        minor = torch.zeros_like(step.held)
        rows = torch.nonzero(step.query_count > 0)[:, 0]
        if rows.numel() == 0:
            return minor
        queries = step.queries[rows]  # [m, L, W, Hq, D]
        m, layers, width, query_heads, dim = queries.shape
        kv_heads = step.held.shape[2]
        offset = torch.arange(width) - (width - 1)
        query_positions = (step.newest_position[rows][:, None] + offset)[:, None].expand(m, kv_heads, width)
        observed = (offset >= 1 - step.query_count[rows][:, None])[:, None].expand(m, kv_heads, width)
        keys = step.keys(rows)  # [m, L, Hkv, S, D]
        held, key_positions = step.held[rows], step.positions[rows]
        grouped = queries.view(m, layers, width, kv_heads, query_heads // kv_heads, dim).transpose(2, 3)
        for layer in range(layers):
            minor[rows, layer] = minor_for_all(grouped[:, layer], query_positions, observed, keys[:, layer],
                                               key_positions[:, layer], held[:, layer], step.attention_scale)
        return minor
