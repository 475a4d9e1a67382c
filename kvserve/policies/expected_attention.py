"""Expected Attention (Devoto et al., 2025; kvpress's ExpectedAttentionPress): keep the keys future
queries are expected to attend most, estimated from the statistics of the prompt's queries and
RoPE, with no attention weights from the kernel.

Per query head, the prompt's queries before RoPE have a mean mu and a covariance Sigma. A future
query at position p is R(p) q; averaged over the next `n_future_positions` positions, R-bar, it has
mean mu' = R-bar mu and covariance Sigma' = R-bar Sigma R-bar^T. If it were Gaussian,
E[exp(s q.k)] = exp(s mu'.k + s^2/2 k^T Sigma' k) (s: the softmax scale, 1/sqrt(D)); those logits,
softmaxed over the head's held keys, averaged over the query heads of the KV group and, with
`use_vnorm`, times (score + `epsilon`) x ||v||, rank the keys. The first `n_sink` positions are never
evicted and take no part in the statistics or the softmax, as in kvpress.

Where it differs from kvpress, and why:
- kvpress scores once, on the whole prompt. kvserve prefills in chunks and cuts every head back to
  the budget after each one (so a long prompt's peak is budget + one chunk, as keydiff does), so
  the statistics are those of the prompt's queries so far: a running count, mean and centred second
  moment per query head on the sequence's Policy instance (merged chunk by chunk with Chan et al.'s
  formula, the same as running sums of q and q q^T but without their cancellation in float), fed
  with every query of each chunk (`query_window` is the chunk), and R-bar averages the
  `n_future_positions` after the chunk's last token. On preemption the instance is re-created and
  the prompt recomputed, which rebuilds the statistics; queries past the prompt (recomputed output)
  are left out, so they are the prompt's, as kvpress's.
- kvpress computes pre-RoPE queries from the hidden states; kvserve observes them after RoPE
  (`PolicyStep.queries`) and undoes the rotation at each query's position with `rope_inv_freq`
  (angles in float32, as the model computes them).
- kvpress compresses only the prompt. Without `decode`, so does this policy: generated tokens are
  appended and never evicted. With `decode`, each decode step also cuts back to the budget, but does
  not rescore every key (S x D^2 per head per step): the statistics stay the prompt's; the new key
  alone is scored against the mu', Sigma' and per-query-head log-sum-exp of the last full scoring
  (as if it had been in that softmax), and every slot's score is kept in the slot (`scores`) so it
  moves with its token. Each slot's ||v|| is kept in `aux` for the same reason.

Host memory per sequence: while its prompt is prefilled, the statistics (float64, L x Hq x D^2: 8.8 MB
on SmolLM2-135M, 134 MB on Llama-3-8B); freed once the prompt is in; with `decode`, Sigma' stays
(float32, half that).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvserve.policies.base import BudgetParams, BudgetPolicy, PolicyStep, keep_budget, protected_recent
from kvserve.policies.registry import register


class ExpectedAttentionParams(BudgetParams):
    name: Literal["expected_attention"] = "expected_attention"
    n_future_positions: int = Field(default=512, ge=1, description="future positions the RoPE rotation is "
                                                                   "averaged over")
    n_sink: int = Field(default=4, ge=0, description="first tokens never evicted, and left out of the query "
                                                     "statistics")
    use_covariance: bool = Field(default=True, description="add the queries' covariance term to the expected logit")
    use_vnorm: bool = Field(default=True, description="scale each score by its value's L2 norm")
    epsilon: float = Field(default=0.0, ge=0, description="added to a score before the value-norm scaling")
    decode: bool = Field(default=False, description="also evict while decoding (else only while prefilling)")


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[...] positions, [D/2] inv_freq -> [..., D/2] float32 angles, as the model computes them."""
    return positions.float()[..., None] * inv_freq.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE's rotation of the channel pairs (i, i + D/2) of x [..., D] by cos, sin [..., D/2]:
    [x1 cos - x2 sin, x2 cos + x1 sin] (kernels/pointwise.py's `rope_ref_`; its inverse is sin -> -sin).
    `out`: where to write it (any strides, x's shape), e.g. a layout the next step reads faster."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


def unrotate(queries: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Queries [..., D] after RoPE at `positions` (broadcast against queries[..., 0]) -> before it."""
    angles = rope_angles(positions, inv_freq)
    return rotate(queries, angles.cos(), -angles.sin(), out)


def average_rotation(start: torch.Tensor, count: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R-bar, the mean of RoPE's rotations at positions start .. start + count - 1 (start [...]), as
    float64 (cos, sin) means [..., D/2]: R-bar x = `rotate(x, cos, sin)`."""
    positions = start.double()[..., None] + torch.arange(count, dtype=torch.float64)  # [..., count]
    angles = positions[..., None] * inv_freq.double()  # [..., count, D/2]
    return angles.cos().mean(-2), angles.sin().mean(-2)


def rotate_covariance(cov: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R cov R^T for a symmetric cov [..., D, D] and R given as `rotate`'s cos, sin [..., D/2]."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    return rotate(rotate(cov, cos, sin).mT, cos, sin)  # rows: cov R^T; transposed: R cov; rows again: R cov R^T


def merge_statistics(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, chunk_count: torch.Tensor,
                     chunk_mean: torch.Tensor, chunk_m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """Chan et al.'s merge of two sets' (count [m], mean [m, ..., D], centred second moment
    sum (q - mean)(q - mean)^T [m, ..., D, D]) into those of their union."""
    total = count + chunk_count
    shape = (-1,) + (1,) * (mean.dim() - 1)
    a, b, ab = count.double(), chunk_count.double(), total.clamp(min=1).double()
    weight = (b / ab).view(shape).to(mean.dtype)
    delta = chunk_mean - mean
    pair = (a * b / ab).view(shape + (1,)).to(mean.dtype)
    return total, mean + delta * weight, m2 + chunk_m2 + pair * delta[..., :, None] * delta[..., None, :]


def chunk_statistics(queries: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """queries [m, L, Hq, W, D] (pre-RoPE; overwritten), observed [m, W] bool -> the observed queries'
    count [m], mean [m, L, Hq, D] and centred second moment [m, L, Hq, D, D] (zeros where none)."""
    count = observed.sum(-1)
    unobserved = None if bool(observed.all()) else ~observed[:, None, None, :, None]
    if unobserved is not None:
        queries.masked_fill_(unobserved, 0.0)
    mean = queries.sum(-2) / count.clamp(min=1).view(-1, 1, 1, 1).to(queries.dtype)
    centred = queries.sub_(mean[..., None, :])
    if unobserved is not None:
        centred.masked_fill_(unobserved, 0.0)
    return count, mean, centred.mT @ centred


def expected_logits(keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None, scale: float) -> torch.Tensor:
    """keys [..., S, D], a KV group's rotated query mean [..., G, D] and covariance [..., G, D, D] ->
    [..., G, S]: scale mu'.k + scale^2 / 2 k^T Sigma' k."""
    logits = torch.einsum("...gd,...sd->...gs", mean, keys) * scale
    if cov is not None:
        keys = keys[..., None, :, :]  # [..., 1, S, D], against each query head of the group
        logits = logits + ((keys @ cov) * keys).sum(-1) * (scale * scale / 2)
    return logits


class _Statistics:
    """One sequence's running statistics of its pre-RoPE queries, and what its last full scoring used."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [L, Hq, D] float64
        self.m2: torch.Tensor | None = None  # [L, Hq, D, D] float64
        # with `decode`: the last full scoring's rotated mean, covariance and log-sum-exp per query head
        self.future_mean: torch.Tensor | None = None  # [L, Hkv, G, D] float32
        self.future_cov: torch.Tensor | None = None  # [L, Hkv, G, D, D] float32
        self.lse: torch.Tensor | None = None  # [L, Hkv, G] float32


@register
class ExpectedAttentionPolicy(BudgetPolicy):
    name = "expected_attention"
    Params = ExpectedAttentionParams
    params: ExpectedAttentionParams

    def __init__(self, params: ExpectedAttentionParams, prompt_tokens: int, context_tokens: int | None = None) -> None:
        super().__init__(params, prompt_tokens, context_tokens)
        self.stats = _Statistics()

    def context_budget(self) -> int:
        return max(self.params.budget_for(self.context_tokens), self.params.n_sink + 1)

    def reserved(self) -> int:
        return self.params.n_sink

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        if self.params.decode:
            return super().tokens_bound(max_new_tokens, chunk_tokens)
        return self.prefill_only_bound(max_new_tokens, chunk_tokens)

    def query_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        return chunk_tokens  # every query of the chunk feeds the statistics

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        prompt_end = step.per_row([p.prompt_tokens for p in step.policies]).flatten()
        # a prefill step: a chunk (of the prompt, or of recomputed output), or a one-token prompt chunk
        prefill = ~step.decoding | (step.newest_position < prompt_end)
        if step.queries is not None:
            cls._observe(step, torch.nonzero(prefill & (step.query_count > 0))[:, 0])
        keep = cls._score_and_cut(step, prefill)
        cls._release(step, prefill)
        return keep

    @classmethod
    def _score_and_cut(cls, step: PolicyStep, prefill: torch.Tensor) -> torch.Tensor | None:
        policies: list[ExpectedAttentionPolicy] = step.policies
        decode_option = torch.tensor([p.params.decode for p in policies])
        over = (step.lengths > step.per_row([p.budget() for p in policies])[..., 0]).flatten(1).any(-1)
        stored = torch.tensor([p.stats.lse is not None for p in policies])
        decoding = ~prefill & decode_option
        # every slot is scored after a chunk that overflows, and (for decode) once the sequence is all in
        full = (prefill & (over | (step.prompt_done & decode_option))) | (decoding & ~stored & over)
        incremental = decoding & stored  # only the new token
        if not bool((full | incremental).any()):
            return None
        if any(p.params.use_vnorm for p in policies):
            cls._value_norms(step)
        if bool(full.any()):
            cls._score_all(step, torch.nonzero(full)[:, 0])
        if bool(incremental.any()):
            cls._score_newest(step, torch.nonzero(incremental)[:, 0])
        rows = torch.nonzero((full | incremental) & over)[:, 0]
        if rows.numel() == 0:
            return None
        sinks = step.held & (step.positions < step.per_row([p.params.n_sink for p in policies]))
        protected = (protected_recent(step) | sinks)[rows]
        keep = step.held.clone()
        keep[rows] = keep_budget(step, step.scores[rows], protected, rows)
        return keep

    @staticmethod
    def _release(step: PolicyStep, prefill: torch.Tensor) -> None:
        """Once a sequence is all in, no query joins its statistics and nothing rescores it from them
        (decode uses what its last full scoring stored): free them."""
        for i in torch.nonzero(prefill & step.prompt_done)[:, 0].tolist():
            stats = step.policies[i].stats
            stats.count, stats.mean, stats.m2 = 0, None, None

    @classmethod
    def _observe(cls, step: PolicyStep, rows: torch.Tensor) -> None:
        """Fold each row's observed prompt queries (at positions n_sink .. prompt end) into its statistics."""
        if rows.numel() == 0:
            return
        policies: list[ExpectedAttentionPolicy] = [step.policies[i] for i in rows.tolist()]
        everyone = rows.numel() == step.queries.shape[0]  # no copy of the (large) queries when all rows observe
        queries = step.queries if everyone else step.queries[rows]  # [m, L, W, Hq, D], right-aligned
        width = queries.shape[2]
        offset = torch.arange(width) - (width - 1)
        positions = step.newest_position[rows][:, None] + offset  # [m, W]
        n_sink = torch.tensor([p.params.n_sink for p in policies])[:, None]
        prompt_end = torch.tensor([p.prompt_tokens for p in policies])[:, None]
        observed = ((offset >= 1 - step.query_count[rows][:, None]) & (positions >= n_sink)
                    & (positions < prompt_end))
        if not bool(observed.any()):
            return
        m, layers, _, query_heads, dim = queries.shape
        # written as [m, L, Hq, W, D]: each head's queries contiguous for the covariance's matmul
        plain = torch.empty(m, layers, query_heads, width, dim)
        unrotate(queries, positions.clamp(min=0)[:, None, :, None], step.rope_inv_freq, out=plain.transpose(2, 3))
        chunk_count, chunk_mean, chunk_m2 = chunk_statistics(plain, observed)
        zero_mean = torch.zeros(layers, query_heads, dim, dtype=torch.float64)
        zero_m2 = torch.zeros(layers, query_heads, dim, dim, dtype=torch.float64)
        count = torch.tensor([p.stats.count for p in policies])
        mean = torch.stack([zero_mean if p.stats.mean is None else p.stats.mean for p in policies])
        m2 = torch.stack([zero_m2 if p.stats.m2 is None else p.stats.m2 for p in policies])
        count, mean, m2 = merge_statistics(count, mean, m2, chunk_count, chunk_mean.double(), chunk_m2.double())
        for i, policy in enumerate(policies):
            policy.stats.count, policy.stats.mean, policy.stats.m2 = int(count[i]), mean[i], m2[i]

    @classmethod
    def _value_norms(cls, step: PolicyStep) -> None:
        """Each held slot's ||v|| in `aux`, computed once, when the slot is new (aux 0)."""
        fresh = step.held & (step.aux == 0)
        if bool(fresh.any()):
            step.aux[fresh] = step.value_store[step.slot[fresh]].float().norm(dim=-1).cpu()

    @classmethod
    def _future(cls, step: PolicyStep, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's rotated query mean [m, L, Hkv, G, D] and covariance [m, L, Hkv, G, D, D] (None
        when no row uses it) over the `n_future_positions` after its newest token, float32."""
        policies: list[ExpectedAttentionPolicy] = [step.policies[i] for i in rows.tolist()]
        layers, kv_heads, dim = step.held.shape[1], step.held.shape[2], step.key_store.shape[-1]
        query_heads = kv_heads * step.group_size
        means, covs = [], []
        for i, policy in zip(rows.tolist(), policies):
            stats, params = policy.stats, policy.params
            mean = stats.mean if stats.mean is not None else torch.zeros(layers, query_heads, dim, dtype=torch.float64)
            cos, sin = average_rotation(step.newest_position[i] + 1, params.n_future_positions, step.rope_inv_freq)
            means.append(rotate(mean, cos, sin))
            if params.use_covariance:
                cov = (stats.m2 / stats.count if stats.m2 is not None and stats.count else
                       torch.zeros(layers, query_heads, dim, dim, dtype=torch.float64))
                covs.append(rotate_covariance(cov, cos, sin))
            else:
                covs.append(torch.zeros(layers, query_heads, dim, dim, dtype=torch.float64))
        shape = (len(policies), layers, kv_heads, step.group_size, dim)
        mean = torch.stack(means).float().view(shape)
        if not any(p.params.use_covariance for p in policies):
            return mean, None
        return mean, torch.stack(covs).float().view(*shape, dim)

    @classmethod
    def _score_all(cls, step: PolicyStep, rows: torch.Tensor) -> None:
        """Score every held slot of `rows` into `step.scores` (sinks: +inf); keep what decode needs."""
        policies: list[ExpectedAttentionPolicy] = [step.policies[i] for i in rows.tolist()]
        mean, cov = cls._future(step, rows)
        slots = step.slot[rows]
        keys = step.key_store.index_select(0, slots.flatten().to(step.key_store.device)).float().cpu()
        keys = keys.view(*slots.shape, -1)  # [m, L, Hkv, S, D]: `step.keys(rows)`, gathered faster
        n_sink = torch.tensor([p.params.n_sink for p in policies])[:, None, None, None]
        sinks = step.positions[rows] < n_sink
        candidates = step.held[rows] & ~sinks
        logits = torch.empty(*mean.shape[:-1], keys.shape[-2])  # [m, L, Hkv, G, S]
        for layer in range(keys.shape[1]):  # one layer at a time bounds the covariance term's size
            logits[:, layer] = expected_logits(keys[:, layer], mean[:, layer],
                                               None if cov is None else cov[:, layer], step.attention_scale)
        logits.masked_fill_(~candidates[..., None, :], float("-inf"))
        lse = logits.logsumexp(-1)
        lse = torch.where(lse.isfinite(), lse, 0.0)  # a head with no candidates
        probs = (logits - lse[..., None]).exp().mean(-2)  # [m, L, Hkv, S]
        scores = cls._rescale(policies, probs, step.aux[rows])
        step.scores[rows] = torch.where(sinks, float("inf"), scores.masked_fill(~candidates, 0.0))
        for i, policy in enumerate(policies):
            if policy.params.decode:
                # copies: a view would keep the whole batch's tensors alive
                policy.stats.future_mean, policy.stats.lse = mean[i].clone(), lse[i].clone()
                policy.stats.future_cov = None if cov is None or not policy.params.use_covariance else cov[i].clone()

    @classmethod
    def _score_newest(cls, step: PolicyStep, rows: torch.Tensor) -> None:
        """Score the newest slot of each head of `rows` (one decode token each) against the stored
        statistics of the last full scoring, normalised by its stored log-sum-exp."""
        policies: list[ExpectedAttentionPolicy] = [step.policies[i] for i in rows.tolist()]
        newest = torch.zeros_like(step.held)
        newest[rows] = step.held[rows] & (step.positions[rows] == step.newest_position[rows][:, None, None, None])
        m, (layers, kv_heads) = len(policies), step.held.shape[1:3]
        keys = step.key_store[step.slot[newest]].float().cpu().view(m, layers, kv_heads, 1, -1)
        mean = torch.stack([p.stats.future_mean for p in policies])
        covs = [p.stats.future_cov for p in policies]
        cov = None
        if any(c is not None for c in covs):
            cov = torch.stack([c if c is not None else torch.zeros(*mean.shape[1:], mean.shape[-1]) for c in covs])
        logits = expected_logits(keys, mean, cov, step.attention_scale)[..., 0]  # [m, L, Hkv, G]
        lse = torch.stack([p.stats.lse for p in policies])
        probs = (logits - lse).exp().mean(-1)  # [m, L, Hkv]
        vnorm = step.aux[newest].view(m, layers, kv_heads)
        step.scores[newest] = cls._rescale(policies, probs, vnorm).flatten()

    @staticmethod
    def _rescale(policies: list[ExpectedAttentionPolicy], probs: torch.Tensor, vnorm: torch.Tensor) -> torch.Tensor:
        """(probs + epsilon) x ||v|| for the rows that use the value norm, probs for the others."""
        shape = (-1,) + (1,) * (probs.dim() - 1)
        use = torch.tensor([p.params.use_vnorm for p in policies]).view(shape)
        epsilon = torch.tensor([p.params.epsilon for p in policies]).view(shape)
        return torch.where(use, (probs + epsilon) * vnorm, probs)
