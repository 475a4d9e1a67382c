"""Continuous batching: which sequences advance in the next step, and by how many tokens.

Each step: every running sequence that is decoding gets its one token first; then running
sequences still prefilling get chunks; then waiting requests are admitted in queue order, each
only when its row, its chunk and the pages its prompt will need fit beside the pages promised to the
sequences still prefilling. A sequence whose policy compresses its prompt once it is in holds the
whole prompt only while prefilling, so memory holds one or two prompts at full size beside many
compressed sequences. Prefill chunks end at fixed
multiples of `prefill_chunk` tokens of their sequence, whatever else is in the batch: policies act
after every chunk, so this keeps a request's result independent of the traffic around it. The
prompt's last chunk alone starts earlier where the window its policy reads at the prompt's end would
not fit after the last multiple. The step holds at most `max_num_batched_tokens` tokens and
`max_num_seqs` sequences. When the pool runs out, the running sequence last in queue order is
preempted: its pages are freed and it goes back into the queue, at its place, to be recomputed.

With a prefix cache, a request is admitted starting from the longest run of its leading blocks
found there (kvserve/cache/prefix_cache.py), when its policy allows; one whose first uncached
block a running sequence is prefilling right now waits for it to be cached rather than compute it
alongside; one that shares a compressed prefix (`share_prefix`) waits for it to be built, by a
builder queued just ahead of it (kvserve/engine/shared_prefix.py). Cached blocks no sequence holds
count as available pages: the pool frees them on demand.

Queue order is arrival order ("fcfs"; then the victim is the most recently admitted sequence, and
since arrival order is never overtaken nothing starves), or with the "priority" policy each
request's `priority` (lower first; vLLM's convention), arrival breaking ties: there a steady flow of
urgent requests may hold back less urgent ones indefinitely, as it is meant to.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvserve.cache.page_pool import OutOfPages
from kvserve.cache.page_table import PageTable
from kvserve.cache.prefix_cache import PrefixCache
from kvserve.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    counts: list[int]  # tokens each sequence feeds this step

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)


@dataclass
class Begin:
    """How a waiting sequence starts: from `tokens` tokens in the cache (`blocks` of them cached
    blocks), taking `footprint` pages by the end of its prompt, `pinned` of the pages available now
    taken out of reach by `attach`, which fills its row from the prefix cache (None: nothing to attach)."""

    tokens: int
    blocks: int
    footprint: int
    pinned: int
    attach: Callable[[int], object] | None


class Scheduler:
    def __init__(self, table: PageTable, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int | None = None, by_priority: bool = False,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.table = table
        self.prefix_cache = prefix_cache
        # prompt tokens of admitted requests, and of those the ones found in the prefix cache (vLLM's counters)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # room for a whole chunk beside a full set of decode tokens
        self.prefill_chunk = prefill_chunk or max(1, min(max_num_batched_tokens - max_num_seqs,
                                                         max_num_batched_tokens // 2))
        self.by_priority = by_priority
        self.waiting: deque[Sequence] = deque()  # in queue order
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self._heads = table.num_layers * table.kv_heads
        self._arrivals = itertools.count()

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        self._enqueue(seq)

    def add_before(self, seq: Sequence, successor: Sequence) -> None:
        """Queue `seq` just ahead of the waiting `successor` (work it waits for)."""
        seq.arrival, seq.priority = successor.arrival - 0.5, successor.priority
        self._enqueue(seq)

    def _queue_key(self, seq: Sequence) -> tuple[int, float]:
        return (seq.priority if self.by_priority else 0, seq.arrival)

    def _enqueue(self, seq: Sequence) -> None:
        """Into the waiting queue at its place in queue order (a new arrival usually goes last)."""
        key = self._queue_key(seq)
        if not self.waiting or key > self._queue_key(self.waiting[-1]):
            self.waiting.append(seq)
        else:
            self.waiting.insert(bisect.bisect([self._queue_key(s) for s in self.waiting], key), seq)

    def _victim(self) -> Sequence:
        """The running sequence to preempt first: the last in queue order."""
        return max(self.running, key=self._queue_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pages_for_tokens(self, tokens: int) -> int:
        return self._heads * -(-tokens // self.table.block_size)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_once()
        # prefilling sequences admitted together can block each other on pages; the last in queue order yields
        while not batch.seqs and self.running:
            self.preempt(self._victim())
            batch = self._schedule_once()
        return batch

    def _schedule_once(self) -> ScheduledBatch:
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        decoding = self._fit_decodes(decoding)
        seqs, counts = list(decoding), [1] * len(decoding)
        budget = self.max_num_batched_tokens - len(decoding)

        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.num_uncomputed <= 1 or seq.status is not Status.RUNNING:
                continue
            chunk = self._next_chunk(seq)
            if chunk > budget or not self._fits(seq, chunk):
                continue
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk

        promised = self._promised_pages()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self.table.rows_free:
            seq = self.waiting[0]
            begin = self._begin(seq)
            if begin is None:
                break
            chunk = self._next_chunk(seq, begin.tokens)
            if chunk > budget:
                break
            # admit only when the pages its prompt will hold are free beside those promised to the
            # sequences still prefilling, with one page per head of headroom for every running
            # sequence's next decode steps: prefills are staged, never admitted to evict each other
            headroom = self._heads * (len(self.running) + 1)
            if begin.footprint + promised + headroom > self.table.pool.pages_available - begin.pinned:
                break
            row = self.table.acquire_row()
            if begin.attach is not None:
                try:
                    begin.attach(row)
                except OutOfPages:
                    self.table.release_row(row)
                    break
            promised += begin.footprint
            self.waiting.popleft()
            seq.row = row
            seq.num_computed, seq.blocks_offered = begin.tokens, begin.blocks
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(begin.tokens, len(seq.prompt_token_ids))
                if self.prefix_cache is not None:
                    self.prefix_cache_queries += len(seq.prompt_token_ids)
                    self.prefix_cache_hits += seq.num_cached_tokens
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
        return ScheduledBatch(seqs, counts)

    def _begin(self, seq: Sequence) -> Begin | None:
        """Where the waiting `seq` would start, or None when it should wait (for the compressed prefix
        it shares, or for the blocks a running sequence is prefilling)."""
        cache = self.prefix_cache
        if seq.shared_prefix is not None:
            if seq.shared_prefix not in cache.compressed:
                return None  # its builder runs first
            key, start = seq.shared_prefix, seq.shared_prefix_tokens
            # its own tokens, and a copy of each head's partial last page of the prefix
            return Begin(start, 0, self.pages_for_tokens(seq.num_tokens - start) + self._heads,
                         cache.pinned(compressed=key), lambda row: cache.attach_compressed(row, key))
        cached = self._cached_blocks(seq)
        if self._prefix_in_flight(seq, cached):
            return None
        footprint = self.pages_for_tokens(self._footprint(seq))
        if not cached:
            return Begin(0, 0, footprint, 0, None)
        # blocks it shares are held already; those it copies are pinned while it does
        shares = not seq.policy.ever_acts()
        hashes = seq.block_hashes[:cached]
        return Begin(cached * self.table.block_size, cached, footprint - (self._heads * cached if shares else 0),
                     cache.pinned(hashes), lambda row: cache.attach(row, hashes, private=not shares))

    def _next_chunk(self, seq: Sequence, computed: int | None = None) -> int:
        """Chunks end at multiples of `prefill_chunk`, but the last one starts early enough to hold
        the prompt-end window its policy reads (and never leaves a 1-token chunk before it).
        `computed`: the tokens in the cache when the chunk starts (default: the sequence's now)."""
        computed = seq.num_computed if computed is None else computed
        last_boundary = (seq.num_tokens - 1) // self.prefill_chunk * self.prefill_chunk
        last_start = min(last_boundary, seq.num_tokens - min(seq.policy.prompt_end_window(), self.prefill_chunk - 1))
        if computed + 1 >= last_start:
            return seq.num_tokens - computed
        boundary = (computed // self.prefill_chunk + 1) * self.prefill_chunk
        return min(boundary, last_start) - computed

    def _cached_blocks(self, seq: Sequence) -> int:
        """How many leading blocks of the waiting `seq` it can start from in the prefix cache. Never
        its last token (its logits are needed) nor the window its policy reads at the prompt's end;
        none when the request wants prompt logprobs or its policy reads the prompt's chunks."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        cache.extend_hashes(seq.block_hashes, seq.prompt_token_ids, seq.cache_salt)
        if seq.params.prompt_logprobs is not None or seq.policy.reads_prompt_chunks():
            return 0
        usable = (seq.num_tokens - max(1, seq.policy.prompt_end_window())) // self.table.block_size
        return cache.match(seq.block_hashes[:usable])

    def _prefix_in_flight(self, seq: Sequence, cached: int) -> bool:
        """Whether the first block `seq` would compute is being prefilled by a running sequence that
        will cache it: then `seq` waits a step or so and starts from it rather than computing it twice."""
        if self.prefix_cache is None or cached >= len(seq.block_hashes) or seq.policy.reads_prompt_chunks():
            return False
        wanted = seq.block_hashes[cached]
        bs = self.table.block_size
        return any(wanted in s.block_hashes[s.num_computed // bs:] for s in self.running
                   if s.num_uncomputed > 1 and not s.policy_acted)

    def _promised_pages(self) -> int:
        """Pages the running sequences still prefilling will take before their prompts are in: what
        each will hold then (its footprint) beyond what it holds now."""
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        if not prefilling:
            return 0
        held = self.table.pages_held(torch.tensor([s.row for s in prefilling])).tolist()
        # one that started from a compressed prefix takes pages for its own tokens only
        return sum(self.pages_for_tokens(s.num_uncomputed) if s.shared_prefix is not None
                   else max(0, self.pages_for_tokens(self._footprint(s)) - h) for s, h in zip(prefilling, held))

    def _footprint(self, seq: Sequence) -> int:
        """Tokens one head of `seq` holds once its prompt (or recompute) is in the cache."""
        bound = seq.policy.tokens_bound(seq.params.max_tokens, self.prefill_chunk)
        return min(seq.num_tokens, bound)

    def _fits(self, seq: Sequence, count: int) -> bool:
        rows = torch.tensor([seq.row])
        return self.table.pages_needed(rows, torch.tensor([count])) <= self.table.pool.pages_available

    def _fit_decodes(self, decoding: list[Sequence]) -> list[Sequence]:
        """Preempt, last in queue order first, until every decoding sequence's next token fits."""
        while decoding:
            rows = torch.tensor([s.row for s in decoding])
            if self.table.pages_needed(rows, torch.ones_like(rows)) <= self.table.pool.pages_available:
                break
            victim = self._victim()
            self.preempt(victim)
            if victim in decoding:
                decoding.remove(victim)
        return decoding

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.table.release_row(seq.row)
        seq.row = None
        seq.num_computed = seq.blocks_offered = 0
        seq.policy_acted = False
        # the recompute starts from a fresh policy: state such as ThinK's channels is chosen again
        seq.policy = type(seq.policy)(seq.policy_params, seq.policy.prompt_tokens, seq.policy.context_tokens)
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and return its pages.

        Pages go back first: the server's /metrics reads these counts from another thread, and a
        reader that sees the sequence gone from the queues must also see its pages free."""
        if seq.row is not None:
            self.table.release_row(seq.row)
            seq.row = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
