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
- a policy that compresses rather than drops moves tokens into a tier (`PolicyStep.transfers`):
  the moved slots leave the full-precision pages as if evicted, but their tokens stay attended.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvserve.cache.tier import TierKey


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    scope: Literal["all", "context"] = Field(
        default="all", description="context: compress only what precedes the last user message of a chat request, "
                                   "keeping the final question whole")


DEFAULT_RECENT = 32  # tokens: a question's last sentence, or an answer's opening, in the default model's tokenizer


class BudgetParams(PolicyParams):
    """A per-head token budget, absolute (`budget`) or as a fraction of the prompt (`ratio`), and the
    `recent` tokens no budget evicts: the prompt's last ones and the newest ones."""

    budget: int | None = Field(default=None, ge=1, description="tokens kept per KV head")
    ratio: float | None = Field(default=None, gt=0, le=1, description="fraction of the prompt kept per KV head")
    recent: int | None = Field(default=None, ge=0, description=f"the prompt's last and the newest tokens never "
                               f"evicted (default {DEFAULT_RECENT}; at most half the budget)")

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
    query_energy: torch.Tensor | None  # [n, L, Hq, D] mean q**2 of the prefill's last queries
    group_size: int
    slot: torch.Tensor  # [n, L, Hkv, S] each slot's flat index in the pool
    key_store: torch.Tensor  # the pool's keys, [num_pages * block_size, D]
    transfers: dict[TierKey, Transfer] = field(default_factory=dict)  # set by `act`

    def subset(self, rows: torch.Tensor, policies: list[Policy]) -> PolicyStep:
        """The step of `rows` alone (copies), acted on by `policies` (e.g. a composed policy's base)."""
        pick = lambda t: t[rows] if isinstance(t, torch.Tensor) else t
        return dataclasses.replace(self, policies=policies, transfers={},
                                   **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)
                                      if f.name not in ("policies", "transfers", "key_store", "group_size")})

    def keys(self, rows: torch.Tensor) -> torch.Tensor:
        """The keys of `rows` (indices into the n sequences), [len(rows), L, Hkv, S, D] float32, on the host
        like every other field of the step."""
        return self.key_store[self.slot[rows]].float().cpu()

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
        """How many of a prefill chunk's last queries this policy reads the energy of (0: none)."""
        return 0

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

    def tokens_bound(self, max_new_tokens: int, chunk_tokens: int) -> int:
        return min(self.prompt_tokens + max_new_tokens, self.budget() + chunk_tokens)


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
        victim = ranked.argmin(-1, keepdim=True)
        evict = (over > 0)[..., None] & candidates & torch.zeros_like(held).scatter_(-1, victim, True)
        return keep & ~evict
    # drop the `over` lowest-scoring candidates of each head
    order = ranked.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    evict = candidates & (rank < over[..., None])
    return keep & ~evict


def oldest(positions: torch.Tensor, held: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The counts[..., ] ([n, L, Hkv]) held slots of lowest position in each head, as a mask."""
    order = positions.masked_fill(~held, torch.iinfo(torch.int64).max).argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return held & (rank < counts[..., None])
