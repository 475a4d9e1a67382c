"""The compression-policy interface.

A policy is chosen per request. `Params` is a pydantic model (the API contract: validated, listed
with its JSON schema by `GET /v1/kv/policies`); one `Policy` instance is created per sequence and
owns whatever per-sequence state its algorithm needs. Invariants every policy keeps:

- it only shrinks a head's token list (through the page table), never grows it;
- after it acts, every (layer, KV head) of its sequence holds at most `tokens_bound(...)` tokens,
  which the scheduler trusts when it admits requests.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class Policy:
    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]]

    def __init__(self, params: PolicyParams) -> None:
        self.params = params

    def tokens_bound(self, prompt_tokens: int, max_new_tokens: int, chunk_tokens: int) -> int:
        """Most tokens one head of this sequence will ever hold at once."""
        return prompt_tokens + max_new_tokens

    def reset(self) -> None:
        """Forget all per-sequence state (the sequence was preempted and will be recomputed)."""
