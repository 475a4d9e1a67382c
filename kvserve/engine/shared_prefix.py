"""Compress once, share the compressed prefix: `share_prefix` on a budgeted policy.

A request whose policy says `share_prefix` starts from a prefix of its prompt (`true`: a chat
request's context, the messages before its last user message; N: its first N tokens; in whole
blocks) compressed once for every request with the same prefix and policy.
The first one queues a builder: an internal request of the context followed by RECONSTRUCTION, for no
tokens, under the request's policy. The policy scores the context by what the reconstruction prompt's
queries attend: a score of the document alone, not of any request's question (the idea of KVzip,
which scores a context by how well it can be repeated). What the builder's row holds once the
policy has acted, less the reconstruction prompt's own tokens, is cached as a compressed prefix under
(the context's hash, the policy). Requests attach it, sharing its pages, and prefill only their own
last message; that and the answer they keep whole, so their policy no longer acts.
"""

from __future__ import annotations

import hashlib

import torch

from kvserve.cache.prefix_cache import PrefixCache
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.errors import InvalidRequest
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.sequence import Sequence, Status
from kvserve.policies.base import Policy, PolicyParams
from kvserve.policies.registry import create_policy, parse_policy

RECONSTRUCTION = "\n\nRepeat the text above word for word, keeping every name and number."


class SharedPrefixes:
    def __init__(self, cache: PrefixCache | None, scheduler: Scheduler, tokenizer) -> None:  # noqa: ANN001
        self.cache = cache
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.reconstruction = tokenizer.encode(RECONSTRUCTION, add_special_tokens=False)
        self.building: dict[bytes, Sequence] = {}  # key -> its builder, queued or running

    @staticmethod
    def wanted(params: PolicyParams) -> bool:
        return bool(getattr(params, "share_prefix", False))

    def key(self, prompt: list[int], params: PolicyParams, context_tokens: int | None, salt: str | None = None
            ) -> tuple[bytes, int]:
        """The compressed prefix a `share_prefix` request starts from: its key and its tokens
        (InvalidRequest, naming the field, when the request cannot have one)."""
        field = "kv_policy.share_prefix"
        if self.cache is None:
            raise InvalidRequest("kv_policy.share_prefix needs prefix caching (the server runs with "
                                 "--no-enable-prefix-caching)", field)
        asked = params.share_prefix
        tokens = context_tokens if asked is True else asked
        if tokens is None:
            raise InvalidRequest("kv_policy.share_prefix: true needs a chat request with a user message (the "
                                 "context is what precedes the last one); give a number of tokens otherwise", field)
        if tokens >= len(prompt):
            raise InvalidRequest(f"kv_policy.share_prefix: {tokens} tokens leave none of the {len(prompt)}-token "
                                 "prompt to the request itself", field)
        blocks = tokens // self.cache.block_size
        if blocks == 0:
            raise InvalidRequest(f"kv_policy.share_prefix: a prefix of {tokens} tokens holds no whole block of "
                                 f"{self.cache.block_size}", field)
        hashes = self.cache.extend_hashes([], prompt[:blocks * self.cache.block_size], salt)
        policy = params.model_copy(update={"share_prefix": False, "scope": "all"}).model_dump_json()
        return hashlib.blake2b(hashes[-1] + policy.encode(), digest_size=16).digest(), blocks * self.cache.block_size

    @staticmethod
    def serving_policy(prompt_tokens: int) -> Policy:
        """The policy a request runs once attached: none that acts (its pages are shared)."""
        return create_policy(parse_policy("full"), prompt_tokens)

    def queue_builders(self) -> None:
        """Queue a builder, just ahead of it, for every waiting request whose compressed prefix is
        neither cached nor being built (the first of its key, or one whose prefix was evicted)."""
        for seq in list(self.scheduler.waiting):
            key = seq.shared_prefix
            if key is None or key in self.cache.compressed or key in self.building:
                continue
            context = seq.prompt_token_ids[:seq.shared_prefix_tokens]
            params = seq.policy_params.model_copy(update={"share_prefix": False, "scope": "all"})
            prompt = context + self.reconstruction
            builder = Sequence(
                request_id=f"shared-prefix-{key.hex()}", prompt_token_ids=prompt,
                params=SamplingParams(max_tokens=0), policy_params=params,
                policy=create_policy(params, len(prompt)), detokenizer=IncrementalDetokenizer(self.tokenizer, []),
                seed=0, priority=seq.priority, builds_prefix=key, shared_prefix_tokens=seq.shared_prefix_tokens,
                cache_salt=seq.cache_salt)
            self.scheduler.add_before(builder, seq)
            self.building[key] = builder

    def builder_finished(self, seq: Sequence) -> None:
        """Before a builder's row is released: cache what it holds of the context, if it got that far."""
        key = seq.builds_prefix
        self.building.pop(key, None)
        if seq.status is not Status.RUNNING or seq.num_computed < seq.num_tokens:
            return  # aborted: a later request queues another
        table = self.scheduler.table
        rows = torch.tensor([seq.row])
        slots = int(table.lengths[seq.row].max())
        positions = table.pool.slot_positions[table.slot_index(rows, slots)]
        held = torch.arange(slots) < table.lengths[rows].long()[..., None]
        table.evict(rows, held & (positions < seq.shared_prefix_tokens))  # the reconstruction prompt goes
        self.cache.store_compressed(key, seq.row, seq.shared_prefix_tokens)
