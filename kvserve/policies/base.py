"""The compression-policy interface.

A policy is chosen per request. `Params` is a pydantic model (the API contract: validated, listed
with its JSON schema by `GET /v1/kv/policies`). One `Policy` instance per sequence holds its
parameters and bounds; the work is done by the classmethod `act`, once per step for all the
sequences of that policy in the batch at once, on `PolicyStep` tensors (no loop over sequences,
layers or heads). Per-token state lives in the slot metadata of the page pool (position, score,
aux), so it moves with its token when a head is compacted and is freed with its page.

Invariants every policy keeps:
- it only removes tokens (`act` returns which slots to keep), never adds any;
- after it acts, no head of a sequence holds more than `tokens_bound(...)` tokens, which the
  scheduler trusts when it admits requests;
- it reads only what it declared: `needs_decode_scores`, `prefill_window(...)`,
  `query_window(...)`; the backend computes nothing else for it;
- where `acts(...)` says it does not act on a sequence in a step, `act` would change nothing of it:
  the runner leaves that sequence out;
- a policy that compresses rather than drops moves tokens into a tier (`PolicyStep.transfers`):
  the moved slots leave the full-precision pages as if evicted, but their tokens stay attended;
- it never changes a page another sequence reads (prefix caching, kvserve/cache/prefix_cache.py):
  a sequence whose policy `ever_acts` holds no shared page (it starts from copies of cached pages and
  caches copies of its own), and one whose policy does not shares pages it never writes;
- where `decode_score()` names a rule, a decode step's `act` is one in, one out: every slot scored by
  that rule, then each head over `budget()` (by one token at most) drops its lowest-scoring slot
  outside `protected_recent`; the runner may then run the compiled pass (kernels/decode_evict.py)
  instead, which must leave the same slots, lengths and scores;
- a sequence may start from a cached prompt prefix, skipping its prefill, only when its policy
  neither acts on nor observes a chunk that does not complete the prompt (`reads_prompt_chunks`):
  then what it does is the same whether the prefix was computed or found.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvserve.cache.tier import TierKey
from kvserve.kernels.decode_evict import DecodeScore


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    scope: Literal["all", "context"] = Field(
        default="all", description="context: compress only what precedes the last user message of a chat request, "
                                   "keeping the final question whole")


DEFAULT_RECENT = 32  # tokens: a question's last sentence, or an answer's opening, in the default model's tokenizer


class BudgetParams(PolicyParams):
    """A per-head token budget, absolute (`budget`) or as a fraction of the prompt (`ratio`), and the
    `recent` tokens no budget evicts: the prompt's last ones and the newest ones. With `adaptive`,
    the budget is a layer's average per head instead (AdaKV, see `adaptive_budgets`)."""

    # why a policy refuses `adaptive` (None: it accepts it)
    adaptive_unsupported: ClassVar[str | None] = None

    budget: int | None = Field(default=None, ge=1, description="tokens kept per KV head")
    ratio: float | None = Field(default=None, gt=0, le=1, description="fraction of the prompt kept per KV head")
    recent: int | None = Field(default=None, ge=0, description=f"the prompt's last and the newest tokens never "
                               f"evicted (default {DEFAULT_RECENT}; at most half the budget)")
    adaptive: bool = Field(default=False, description="AdaKV: share each layer's budget (budget x KV heads) among "
                           "its heads by ranking all their scores together, so a head whose scores are "
                           "concentrated keeps (and holds the pages of) fewer tokens and a diffuse head more")
    adaptive_floor: float = Field(default=0.2, gt=0, le=1, description="with adaptive: no head keeps fewer than "
                                  "ceil(adaptive_floor x budget) tokens (AdaKV's alpha safeguard; 1: every head "
                                  "keeps the budget)")
    share_prefix: bool | int = Field(default=False, description="compress a prefix of the prompt once, scored by a "
                                     "reconstruction prompt rather than by this request's question, and share it with "
                                     "every request with the same prefix and policy; the rest and the answer are kept "
                                     "whole. true: a chat request's context (the messages before its last user "
                                     "message); N: the prompt's first N tokens (in whole blocks)")

    @field_validator("share_prefix")
    @classmethod
    def _prefix_tokens(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and value < 1:
            raise ValueError("share_prefix is true, false, or a number of tokens (at least 1)")
        return value

    @field_validator("adaptive")
    @classmethod
    def _adaptive_supported(cls, value: bool) -> bool:
        if value and cls.adaptive_unsupported:
            raise ValueError(f"not supported by this policy: {cls.adaptive_unsupported}")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetParams:
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give either budget or ratio, not both")
        if self.budget is None and self.ratio is None:
            self.ratio = 0.5
        return self

    def budget_for(self, prompt_tokens: int) -> int:
        if self.budget is not None:
            return self.budget
        return max(1, math.ceil(self.ratio * prompt_tokens))


@dataclass
class Transfer:
    """Slots to move into a tier ([n, L, Hkv, S] bool; each head's count a multiple of the tier's
    unit), and per-row extras the tier keeps (e.g. ThinK's channel index), each [n, ...]."""

    mask: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PolicyStep:
    """The n sequences of one policy in this step, after the forward pass, as [n, L, Hkv, S] views
    of their slots (S: the longest head among them). `scores` and `aux` are written back to the
    pool after `act`; slots at or beyond a head's length (`held` False) are padding."""

    policies: list[Policy]
    lengths: torch.Tensor  # [n, L, Hkv] tokens held per head, this step's tokens included
    new_tokens: torch.Tensor  # [n] tokens this step appended
    decoding: torch.Tensor  # [n] bool: one new token (decode_scores are for these rows)
    prompt_done: torch.Tensor  # [n] bool: the whole prompt is in the cache after this step
    newest_position: torch.Tensor  # [n] position of the sequence's last token in the cache
    held: torch.Tensor  # [n, L, Hkv, S] bool
    positions: torch.Tensor  # [n, L, Hkv, S] int64: each slot's token position in its sequence
    scores: torch.Tensor  # [n, L, Hkv, S] float32, policy-defined, zero for a new slot
    aux: torch.Tensor  # [n, L, Hkv, S] float32, policy-defined, zero for a new slot
    key_norms: torch.Tensor | None  # [n, L, Hkv, S] L2 norm of each key, for policies that ask
    decode_sum: torch.Tensor | None  # [n, L, Hkv, S] probability summed over the group (decoding rows)
    decode_max: torch.Tensor | None  # [n, L, Hkv, S] probability maxed over the group (decoding rows)
    window: torch.Tensor | None  # [n, L, Hkv, S] prefill observation window column sums
    # [n, L, W, Hq, D] float32: the prefill chunk's last `query_count` queries (after RoPE), right-aligned
    # (the chunk's last query at W - 1, at position newest_position), zeros before them
    queries: torch.Tensor | None
    group_size: int
    slot: torch.Tensor  # [n, L, Hkv, S] each slot's flat index in the pool
    key_store: torch.Tensor  # the pool's keys, [num_pages * block_size, D]
    transfers: dict[TierKey, Transfer] = field(default_factory=dict)  # set by `act`
    query_count: torch.Tensor | None = None  # [n] int64: the queries observed per row (0: none)
    attention_scale: float = 1.0  # the softmax scale of q.k (1/sqrt(D) for Llama), to recompute attention
    value_store: torch.Tensor | None = None  # the pool's values, [num_pages * block_size, D]
    # [D / 2] float32: RoPE's angle per position of each channel pair (i, i + D/2), to undo or redo the rotation
    rope_inv_freq: torch.Tensor | None = None

    def subset(self, rows: torch.Tensor, policies: list[Policy]) -> PolicyStep:
        """The step of `rows` alone (copies), acted on by `policies` (e.g. a composed policy's base)."""
        pick = lambda t: t[rows] if isinstance(t, torch.Tensor) else t
        return dataclasses.replace(self, policies=policies, transfers={},
                                   **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)
                                      if f.name not in ("policies", "transfers", "key_store", "value_store",
                                                        "rope_inv_freq")})

    def keys(self, rows: torch.Tensor) -> torch.Tensor:
        """The keys of `rows` (indices into the n sequences), [len(rows), L, Hkv, S, D] float32, on the host
        like every other field of the step."""
        return self.key_store[self.slot[rows]].float().cpu()

    def values(self, rows: torch.Tensor) -> torch.Tensor:
        """The values of `rows`, like `keys`."""
        return self.value_store[self.slot[rows]].float().cpu()

    def per_row(self, values: list[float] | list[int]) -> torch.Tensor:
        """A per-sequence number broadcast against [n, L, Hkv, S]."""
        return torch.tensor(values)[:, None, None, None]


class Policy:
    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]]
    needs_decode_scores: ClassVar[bool] = False
    needs_key_norms: ClassVar[bool] = False

    def __init__(self, params: PolicyParams, prompt_tokens: int, context_tokens: int | None = None) -> None:
        """`context_tokens`: with scope `context`, the prompt's tokens before its last user message,
        the only ones it may compress (the runner keeps the rest, `question_tokens`, whole)."""
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.context_tokens = prompt_tokens if params.scope == "all" or context_tokens is None else context_tokens

    @property
    def question_tokens(self) -> int:
        """The prompt's last tokens out of this policy's reach (scope `context`; 0 otherwise)."""
        return self.prompt_tokens - self.context_tokens

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        """Most tokens one head of this sequence will ever hold at once."""
        return self.prompt_tokens + max_new_tokens

    def prefill_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        """How many of a prefill chunk's last queries this policy reads probabilities of (0: none)."""
        return 0

    def query_window(self, chunk_tokens: int, prompt_done: bool) -> int:
        """How many of a prefill chunk's last queries this policy reads (`PolicyStep.queries`; 0: none)."""
        return 0

    def prompt_end_window(self) -> int:
        """How many of the prompt's last queries this policy reads in the step that completes the
        prompt. The scheduler makes the prompt's last chunk at least that long (up to a chunk), so
        the window never spans two chunks, whatever the prompt's length."""
        return 0

    def acts(self, decoding: bool, prompt_done: bool) -> bool:
        """Whether `act` may change anything of this sequence in a step that fed it one token
        (`decoding`) or a prefill chunk (completing its prompt or not). Where this is False, `act`
        must return None and leave scores and aux as they are: the runner leaves the sequence out,
        so a policy that compresses once costs its decode steps nothing."""
        return type(self).act.__func__ is not Policy.act.__func__

    def ever_acts(self) -> bool:
        """Whether `act` may change this sequence in any step (False: its pages can be shared)."""
        return any(self.acts(decoding, done) for decoding in (False, True) for done in (False, True))

    def reads_prompt_chunks(self) -> bool:
        """Whether the policy acts on, or observes, a prefill chunk that does not complete the prompt
        (False: a cached prompt prefix may stand in for its prefill)."""
        return self.acts(False, False) or any(window(chunk, False) for chunk in (1, 1 << 20)
                                              for window in (self.prefill_window, self.query_window))

    def decode_score(self) -> DecodeScore | None:
        """The rule this sequence's decode steps rank by when they are one in, one out at `budget()`
        (see the invariants), or None: `act` always runs."""
        return None

    @classmethod
    def act(cls, step: PolicyStep) -> torch.Tensor | None:
        """Update `step.scores` / `step.aux` in place; return the slots to keep ([n, L, Hkv, S] bool,
        False where not held) or None to keep everything."""
        return None


class BudgetPolicy(Policy):
    """A policy that cuts every head back to `budget()` tokens after each chunk and decode step.

    Whatever it scores, it never evicts what the next token needs most (`protected_recent`): the
    prompt's last `prompt_tail()` tokens (the question, the answer's prefix) and the newest
    `recent()` tokens (the answer so far); the two together fit in the budget."""

    params: BudgetParams

    def context_budget(self) -> int:
        """Tokens kept per head of what the policy may compress (`ratio` is of those)."""
        return self.params.budget_for(self.context_tokens)

    def budget(self) -> int:
        return self.context_budget() + self.question_tokens

    def reserved(self) -> int:
        """Tokens of the context budget the policy keeps for a purpose of its own (e.g. sinks)."""
        return 0

    def recent(self) -> int:
        """Newest tokens never evicted: `recent`, within half of what the reserve leaves of the budget."""
        recent = self.params.recent if self.params.recent is not None else DEFAULT_RECENT
        return min(recent, (self.context_budget() - self.reserved()) // 2)

    def prompt_tail(self) -> int:
        """The prompt's last tokens never evicted, whatever has been generated since: the question
        out of reach (scope `context`), and `recent()` before it (which fits: at most half the room)."""
        return self.question_tokens + self.recent()

    def head_floor(self) -> int:
        """With `adaptive`: the fewest tokens a head keeps, ceil(adaptive_floor x budget)."""
        return math.ceil(round(self.params.adaptive_floor * self.budget(), 6))

    def most_kept(self, kv_heads: int | None = None) -> int | None:
        """Most tokens one head keeps once the policy has acted: `budget()`; with `adaptive`, the
        whole layer's budget less the other heads' floors, kv_heads x budget - (kv_heads - 1) x
        floor, so None (no bound but the sequence's length) when `kv_heads` is not known."""
        if not self.params.adaptive:
            return self.budget()
        if kv_heads is None:
            return None
        return kv_heads * self.budget() - (kv_heads - 1) * self.head_floor()

    def prefill_only_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        """`tokens_bound` of a policy that evicts while prefilling only: generated tokens are appended."""
        kept = self.most_kept()  # None: adaptive, one head may take most of its layer's budget
        total = self.prompt_tokens + max_new_tokens
        return total if kept is None else min(total, kept + max(chunk_tokens, max_new_tokens))

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        # a policy does not know the model's KV heads: with `adaptive`, one head may take nearly all of
        # its layer's budget, so only the sequence's length bounds it
        kept = self.most_kept()
        total = self.prompt_tokens + max_new_tokens
        return total if kept is None else min(total, kept + chunk_tokens)


def protected_recent(step: PolicyStep) -> torch.Tensor:
    """[n, L, Hkv, S] bool: the held slots of each sequence's prompt tail and newest tokens (the
    `BudgetPolicy` guarantee); `step.policies` are BudgetPolicies."""
    prompt_end = step.per_row([p.prompt_tokens for p in step.policies])
    tail = step.per_row([p.prompt_tail() for p in step.policies])
    recent = step.per_row([p.recent() for p in step.policies])
    positions, newest = step.positions, step.newest_position[:, None, None, None]
    in_tail = (positions >= prompt_end - tail) & (positions < prompt_end)
    return step.held & (in_tail | (positions > newest - recent))


def keep_top(scores: torch.Tensor, held: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep the protected slots plus the highest-scoring others, `budget` in all per head.

    budget: broadcastable to [n, L, Hkv] (per-row budgets). Heads within budget keep everything.
    When at most one slot must go per head (decode: one in, one out) an argmin does; otherwise a sort.
    """
    lengths = held.sum(-1)
    budget = budget.expand_as(lengths)
    over = lengths - budget
    keep = held.clone()
    if int(over.max()) <= 0:
        return keep
    candidates = held & ~protected
    ranked = scores.masked_fill(~candidates, float("inf"))
    if int(over.max()) == 1:
        # each head over budget drops its lowest-ranked candidate (none if all it holds is protected)
        victim = ranked.argmin(-1, keepdim=True)
        drop = (over > 0)[..., None] & (ranked.gather(-1, victim) < float("inf"))
        return keep.scatter_(-1, victim, keep.gather(-1, victim) & ~drop)
    # drop the `over` lowest-scoring candidates of each head
    order = ranked.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    evict = candidates & (rank < over[..., None])
    return keep & ~evict


def adaptive_budgets(scores: torch.Tensor, held: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor,
                     floor: torch.Tensor) -> torch.Tensor:
    """AdaKV (Feng et al., 2024): share each layer's budget among its KV heads by score.

    scores, held, protected: [n, L, Hkv, S]; budget, floor: broadcastable to [n, L, Hkv] (per row, or
    per head). Returns [n, L, Hkv] int64 per-head budgets for `keep_top`, such that per (row, layer):
    - each head gets at least min(what it holds, max(its protected slots, floor)): the protected
      slots count inside the head's budget, and the floor (AdaKV's safeguard) is filled with the
      head's own best candidates, as kvpress's AdaKVPress does;
    - the rest of the layer's total (the sum of `budget` over its heads) goes to the best of all
      the heads' remaining candidates ranked together: a head whose score mass sits on a few tokens
      gets few more, a head with many good tokens many;
    - so the budgets sum to the layer's total, or to what its heads hold where that is less (no head
      is given more than it holds); more only if protected slots alone exceed it.
    Scores are ranked as given, so they must be comparable across heads (`standardise_per_head` for
    those that are not); NaN ranks lowest. Ties go to the lower head index, then the lower slot.
    """
    lengths = held.sum(-1)
    budget, floor = budget.expand_as(lengths), floor.expand_as(lengths)
    candidates = held & ~protected
    n_protected = (held & protected).sum(-1)
    finite = torch.finfo(scores.dtype)
    # candidates rank above every other slot whatever their score (even -inf or NaN)
    ranked = scores.nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min).masked_fill(~candidates,
                                                                                                float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    safeguarded = candidates & (rank < (floor - n_protected).clamp(min=0)[..., None])
    guaranteed = n_protected + safeguarded.sum(-1)
    spare = (budget.sum(-1) - guaranteed.sum(-1)).clamp(min=0)  # [n, L]
    rest = (candidates & ~safeguarded).flatten(2)  # the layer's heads side by side, head-major
    layer_order = ranked.flatten(2).masked_fill(~rest, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    layer_rank = torch.empty_like(layer_order).scatter_(
        -1, layer_order, torch.arange(layer_order.shape[-1]).expand_as(layer_order))
    picked = rest & (layer_rank < spare[..., None])
    return guaranteed + picked.reshape(held.shape).sum(-1)


def standardise_per_head(scores: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Each head's scores less their mean, over their standard deviation (over the held slots):
    makes scores comparable across heads where their scale and offset differ by head for reasons
    other than how concentrated the head is (key norms; cosines to a head's mean key)."""
    count = held.sum(-1, keepdim=True).clamp(min=1)
    values = scores.masked_fill(~held, 0.0)
    mean = values.sum(-1, keepdim=True) / count
    spread = (((values - mean) ** 2) * held).sum(-1, keepdim=True) / count
    return (scores - mean) / spread.sqrt().clamp(min=1e-6)


def keep_budget(step: PolicyStep, scores: torch.Tensor, protected: torch.Tensor, rows: torch.Tensor | None = None,
                *, standardise: bool = False) -> torch.Tensor:
    """`keep_top` at each BudgetPolicy's `budget()`; for the rows whose policy is `adaptive`, at the
    per-head budgets `adaptive_budgets` gives (floor: `head_floor()`).

    rows: indices into `step.policies` the tensors are of (None: every row). `standardise`: the
    scores are not comparable across heads (knorm's -norm, keydiff's -cosine), so the layer-wide
    ranking uses `standardise_per_head` of them. Attention-probability scores (h2o, tova, snapkv)
    are ranked as they are, as in AdaKV and kvpress: every head's probabilities sum to the same, so
    a token's share of its head's attention means the same in every head."""
    index = range(len(step.policies)) if rows is None else rows.tolist()
    policies: list[BudgetPolicy] = [step.policies[i] for i in index]
    held = step.held if rows is None else step.held[rows]
    budget = torch.tensor([p.budget() for p in policies])[:, None, None].expand(held.shape[:3]).clone()
    adaptive = torch.tensor([p.params.adaptive for p in policies], dtype=torch.bool)
    if bool(adaptive.any()):
        a = torch.nonzero(adaptive)[:, 0]
        floor = torch.tensor([p.head_floor() for p in policies])[a][:, None, None]
        ranking = standardise_per_head(scores[a], held[a]) if standardise else scores[a]
        budget[a] = adaptive_budgets(ranking, held[a], protected[a], budget[a], floor)
    return keep_top(scores, held, protected, budget)


def oldest(positions: torch.Tensor, held: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The counts[..., ] ([n, L, Hkv]) held slots of lowest position in each head, as a mask."""
    order = positions.masked_fill(~held, torch.iinfo(torch.int64).max).argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return held & (rank < counts[..., None])
