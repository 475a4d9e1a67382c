"""The synchronous engine: add requests, `step()` until done, abort. One thread drives it."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from kvserve.engine.bad_words import bad_words_token_ids
from kvserve.engine.config import EngineConfig
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.errors import InvalidRequest
from kvserve.engine.limits import check_context_length, check_token_ids
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.outputs import KVUsage, RequestOutput
from kvserve.engine.policy_runner import PolicyRunner
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.sequence import Sequence, TokenOverride
from kvserve.engine.shared_prefix import SharedPrefixes
from kvserve.model.llama import rope_inv_freq
from kvserve.model.loader import load_tokenizer
from kvserve.policies.registry import create_policy, parse_policy


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pages_total: int
    pages_free: int  # free, or held only by the prefix cache (which frees them on demand)
    page_bytes: int
    num_preemptions: int
    bytes_held: dict[str, int]  # per policy: KV bytes its running sequences hold (as of the last step)
    tokens_evicted: dict[str, int]  # per policy, since start
    prefix_cache: PrefixCacheStats | None = None  # None: prefix caching is off


@dataclass
class PrefixCacheStats:
    queries: int  # prompt tokens of admitted requests, since start
    hits: int  # of those, tokens found in the cache
    blocks: int  # blocks cached now
    compressed: int  # compressed prefixes cached now (share_prefix)
    pages: int  # pages the cache holds
    pages_shared: int  # pages held by more than one owner (sequences or the cache)
    blocks_evicted: int  # blocks and compressed prefixes, since start


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = load_tokenizer(self.runner.folder)
        self.scheduler = Scheduler(self.runner.table, config.max_num_seqs, config.max_num_batched_tokens,
                                   prefill_chunk=config.chunked_prefill_size,
                                   by_priority=config.scheduling_policy == "priority",
                                   prefix_cache=self.runner.prefix_cache)
        self.policies = PolicyRunner(self.runner.table, self.runner.tiers, self.model_config.group_size,
                                     self.runner.backend.scale, rope_inv_freq(self.model_config))
        self.default_policy = parse_policy(config.kv_policy)
        self.shared_prefixes = SharedPrefixes(self.runner.prefix_cache, self.scheduler, self.tokenizer)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        self._bytes_held: dict[str, int] = {}

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    kv_policy: Any = None, priority: int = 0, token_override: TokenOverride | None = None,
                    context_tokens: int | None = None, cache_salt: str | None = None) -> None:
        """Queue a request (InvalidRequest, naming the field, when it cannot be served); a
        `token_override` replaces each token it samples (see TokenOverride). `context_tokens`: the
        prompt's tokens before its last user message (a chat request), what a policy of scope
        `context` may compress. `cache_salt`: only requests with the same salt share prefix-cache blocks."""
        if request_id in self.seqs:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if priority and not self.scheduler.by_priority:
            raise InvalidRequest("priority needs the server's --scheduling-policy priority", "priority")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        for name, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids or ())):
            check_token_ids(name, ids, self.model_config.vocab_size)
        check_context_length(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        policy_params = parse_policy(kv_policy, self.default_policy)
        if policy_params.scope == "context" and context_tokens is None:
            raise InvalidRequest("kv_policy.scope: 'context' needs a chat request with a user message (the context "
                                 "is what precedes the last one)", "kv_policy.scope")
        shared_prefix, shared_tokens = None, 0
        if self.shared_prefixes.wanted(policy_params):
            shared_prefix, shared_tokens = self.shared_prefixes.key(prompt_token_ids, policy_params, context_tokens,
                                                                    cache_salt)
            policy = self.shared_prefixes.serving_policy(len(prompt_token_ids))
        else:
            policy = create_policy(policy_params, len(prompt_token_ids), context_tokens)
        bound = min(len(prompt_token_ids) + params.max_tokens,
                    policy.tokens_bound(params.max_tokens, self.scheduler.prefill_chunk))
        if self.scheduler.pages_for_tokens(bound) > self.runner.pool.capacity:
            raise InvalidRequest(f"the request needs more KV cache ({bound} tokens per head) than the whole "
                                 "pool holds; raise --kv-cache-memory or compress harder", "max_tokens")
        seq = Sequence(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params,
            policy_params=policy_params, policy=policy,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                               params.skip_special_tokens),
            seed=params.seed if params.seed is not None else random.getrandbits(63), priority=priority,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else [],
            bad_words_ids=bad_words_token_ids(self.tokenizer, params.bad_words), token_override=token_override,
            shared_prefix=shared_prefix, shared_prefix_tokens=shared_tokens, cache_salt=cache_salt,
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        out = self._finish(seq, "abort")
        self._snapshot_bytes_held(self._bytes_held_by_running())
        return out

    def reset_prefix_cache(self) -> None:
        """Free every cached block no sequence holds (those running sequences hold stay)."""
        if self.runner.prefix_cache is not None:
            self.runner.prefix_cache.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        pool, cache, scheduler = self.runner.pool, self.runner.prefix_cache, self.scheduler
        prefix = None if cache is None else PrefixCacheStats(
            scheduler.prefix_cache_queries, scheduler.prefix_cache_hits, len(cache.blocks), len(cache.compressed),
            int(cache.cached.sum()), int((pool.refs > 1).sum()), cache.blocks_evicted)
        return EngineStats(len(scheduler.running), len(scheduler.waiting), pool.capacity,
                           pool.pages_available, pool.page_bytes, scheduler.num_preemptions,
                           dict(self._bytes_held), dict(self.policies.tokens_evicted), prefix)

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> apply the policies -> process the outputs."""
        if self.runner.prefix_cache is not None:
            self.shared_prefixes.queue_builders()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        result = self.runner.execute(batch, self.policies.observations(batch))
        self._offer_blocks(batch.seqs)
        self._record_kv_peak(batch.seqs)
        self.policies.after_step(batch, result.meta)
        # one read of the pool serves both the footprint and the gauge: the cache does not change
        # while the outputs are processed, only finished sequences leave it
        held = self._bytes_held_by_running()
        self._record_kv_footprint(batch.seqs, held)
        advanced = self.processor.process(batch, result)
        outputs = [self._finish(seq) if seq.finish_reason else self.processor.output(seq) for seq in advanced]
        outputs = [out for seq, out in zip(advanced, outputs) if seq.builds_prefix is None]  # internal
        # after the finished sequences left: a gauge read once traffic stops must not show their bytes
        self._snapshot_bytes_held(held)
        return outputs

    def _offer_blocks(self, seqs: list[Sequence]) -> None:
        """Give the prefix cache the blocks the step completed, before any policy acts on them: every
        full block of a sequence whose policy never acts (its answer too, for the next turn of a
        chat), the prompt's full blocks of one whose policy has not acted yet (as copies)."""
        cache = self.runner.prefix_cache
        if cache is None:
            return
        for seq in seqs:
            if seq.policy_acted or seq.shared_prefix is not None:  # its heads hold a compressed prefix
                continue
            shares = not seq.policy.ever_acts()
            done = seq.num_computed if shares else min(seq.num_computed, len(seq.prompt_token_ids))
            blocks = done // cache.block_size
            if blocks <= seq.blocks_offered:
                continue
            if len(seq.block_hashes) < blocks:
                cache.extend_hashes(seq.block_hashes, seq.token_slice(0, blocks * cache.block_size), seq.cache_salt)
            cache.insert(seq.row, seq.blocks_offered, seq.block_hashes[seq.blocks_offered:blocks], private=not shares)
            seq.blocks_offered = blocks

    def _record_kv_peak(self, seqs: list[Sequence]) -> None:
        # the peak is reached now, before the policies cut the step's new tokens back
        for seq, pages in zip(seqs, self.runner.kv_pages_held([s.row for s in seqs])):
            seq.kv_bytes_peak = max(seq.kv_bytes_peak, round(pages * self.runner.pool.page_bytes))

    def _record_kv_footprint(self, seqs: list[Sequence], held: dict[str, int]) -> None:
        """Add this step's bytes, after the policies acted, to each batch sequence's footprint (see
        Sequence.kv_footprint_byte_steps), and what a full cache would hold at this step to its full one."""
        page_bytes = self.runner.pool.page_bytes
        for seq in seqs:
            seq.kv_footprint_byte_steps += held[seq.request_id]
            seq.kv_full_footprint_byte_steps += self.scheduler.pages_for_tokens(seq.num_computed) * page_bytes

    def _bytes_held_by_running(self) -> dict[str, int]:
        """KV bytes each running sequence holds now, by request id."""
        running = self.scheduler.running
        pages = self.runner.kv_pages_held([s.row for s in running]) if running else []
        return {seq.request_id: round(n * self.runner.pool.page_bytes) for seq, n in zip(running, pages)}

    def _snapshot_bytes_held(self, held: dict[str, int]) -> None:
        """Per-policy bytes the running sequences hold (`held`, by request id), taken in the engine
        thread so readers elsewhere never see a half step."""
        by_policy: dict[str, int] = {}
        for seq in self.scheduler.running:
            by_policy[seq.policy_params.name] = by_policy.get(seq.policy_params.name, 0) + held[seq.request_id]
        self._bytes_held = by_policy

    def _kv_usage(self, seq: Sequence) -> KVUsage:
        runner = self.runner
        held = runner.kv_pages_held([seq.row])[0] if seq.row is not None else 0
        full = self.scheduler.pages_for_tokens(seq.num_computed) * runner.pool.page_bytes
        return KVUsage(seq.policy_params.name, round(held * runner.pool.page_bytes), full, seq.kv_bytes_peak,
                       seq.kv_footprint_byte_steps, seq.kv_full_footprint_byte_steps)

    def _finish(self, seq: Sequence, reason: str | None = None) -> RequestOutput:
        """Retire a sequence; `reason` sets its finish_reason (else it was set already)."""
        seq.finish_reason = reason or seq.finish_reason
        if seq.builds_prefix is not None:
            self.shared_prefixes.builder_finished(seq)
        usage = self._kv_usage(seq)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        seq.metrics.finished_time = time.monotonic()
        return self.processor.output(seq, usage)

    # ---- convenience -------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, kv_policy: Any = None
                 ) -> list[list[int]]:
        """Run prompts (token ids) to completion; return each one's generated token ids."""
        ids = [f"generate-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params, kv_policy)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                tokens[out.request_id].extend(out.token_ids)
        return [tokens[rid] for rid in ids]
