"""One request's life in the engine: its tokens, how many of them are in the cache, its state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.outputs import RequestMetrics, TokenLogprob
from kvserve.engine.sampling_params import SamplingParams
from kvserve.policies.base import Policy, PolicyParams

# A per-request hook on the sampled token (evaluation's teacher forcing is one): called with the row's
# logits [vocab] and the token sampled from them, it returns the token the sequence appends instead.
TokenOverride = Callable[[torch.Tensor, int], int]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request. `num_computed` tokens of `token_ids` have their K/V in the cache; the scheduler
    feeds the rest (a prompt in chunks, then one sampled token per step). Preemption drops the
    cache and sets `num_computed` to 0; the tokens themselves are kept and recomputed."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    policy_params: PolicyParams
    policy: Policy
    detokenizer: IncrementalDetokenizer
    seed: int
    priority: int = 0  # with the priority scheduling policy: lower runs first
    arrival: float = 0  # order of arrival at the scheduler (ties between equal priorities)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # with params.prompt_logprobs: one per prompt token computed so far (the first, None, has no context)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token ids
    num_computed: int = 0
    row: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))
    kv_bytes_peak: int = 0
    # The KV footprint ("Cache Me If You Can", Bhaskar et al. 2025), in byte-steps: the sum, over the
    # engine steps this sequence took part in, of the KV bytes it held after that step's policies acted,
    # i.e. what the step leaves in the pool for the next one. The transient high inside a step, before
    # the policies cut its new tokens back, is the peak's business; counting the bytes that persist is
    # what separates a policy that compresses while prefilling from one that compresses only at the end.
    # Steps it sat out (skipped for the token budget, or waiting) add nothing; recomputation after a
    # preemption adds its steps again, since it holds pages again.
    kv_footprint_byte_steps: int = 0
    kv_full_footprint_byte_steps: int = 0  # the same sum for a full cache over the same steps
    emitted_tokens: int = 0  # output tokens already handed to the caller
    # prefix caching: the hashes of the token blocks known so far, how many leading blocks the cache
    # has been offered (or the sequence started from), whether its policy has acted on its pages yet
    # (from then on they no longer hold its blocks as computed), and the prompt tokens it found cached
    block_hashes: list[bytes] = field(default_factory=list)
    blocks_offered: int = 0
    policy_acted: bool = False
    num_cached_tokens: int | None = None
    cache_salt: str | None = None  # only sequences with the same salt share prefix-cache blocks
    # `share_prefix`: the key of the compressed prefix it starts from and the prompt tokens that stands for;
    # a builder of one (kvserve/engine/shared_prefix.py) has `builds_prefix`, the key it builds
    shared_prefix: bytes | None = None
    shared_prefix_tokens: int = 0
    builds_prefix: bytes | None = None
    token_override: TokenOverride | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the two."""
        prompt = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:end] if start < prompt else []
        return head + self.output_token_ids[max(0, start - prompt):max(0, end - prompt)]
