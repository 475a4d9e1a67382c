"""Turns a scheduled batch into one forward pass: tokens, positions, page appends, metadata."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.registry import create_backend
from kvserve.cache.page_pool import PagePool
from kvserve.cache.page_table import PageTable
from kvserve.cache.prefix_cache import PrefixCache
from kvserve.cache.tier import TierSet
from kvserve.engine.config import EngineConfig
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.engine.sequence import Sequence
from kvserve.kernels import cpu_library
from kvserve.model.config import ModelConfig
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_weights, resolve_model

log = logging.getLogger("kvserve.engine")


@dataclass
class PromptSpan:
    """`count` prompt positions of the batch's sequence `seq`, from position `first`, whose logits
    that request's prompt_logprobs needs."""

    seq: int
    first: int
    count: int


@dataclass
class Observations:
    """What attention must report this step for the compression policies: decode scores (for every
    decode row), and per batch row the probabilities (`windows`) and the queries themselves
    (`query_windows`) of that many of its prefill chunk's last queries (0: none)."""

    decode_scores: bool = False
    windows: list[int] = field(default_factory=list)
    query_windows: list[int] = field(default_factory=list)


@dataclass
class ModelOutput:
    """What one forward pass gives the engine."""

    # the sequences that sample a token now (all their tokens are in the cache and they want tokens;
    # a request for no tokens samples nothing), and their next-token logits [len(sampling), vocab]
    sampling: list[Sequence]
    logits: torch.Tensor
    # the prompt positions whose logits requests asked for (prompt_logprobs): each span with its [count, vocab]
    prompt_logits: list[tuple[PromptSpan, torch.Tensor]]
    meta: AttentionMetadata  # the step's metadata, holding the observations


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.folder = resolve_model(config.model)
        self.model_config = mc = ModelConfig.from_folder(self.folder)
        self.dtype = config.torch_dtype
        self.device = config.torch_device
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_library.native_bfloat16():
            log.warning("bfloat16 on a CPU without AVX512-BF16 or AMX: every bfloat16 matmul is widened in software "
                        "and runs several times slower than float32; --dtype float32 is the faster choice here")
        self.model = LlamaModel(mc, load_weights(self.folder), self.dtype, self.device)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        memory = config.resolved_kv_cache_memory()
        num_pages = PagePool.pages_for_memory(memory, config.block_size, mc.head_dim, self.dtype)
        self.pool = PagePool(num_pages, config.block_size, mc.head_dim, self.dtype, self.device)
        self.table = PageTable(self.pool, config.max_num_seqs, mc.num_layers, mc.num_kv_heads, self.max_model_len)
        self.tiers = TierSet(self.table, self.max_model_len)
        self.prefix_cache = (PrefixCache(self.table, f"{self.folder}:{config.dtype}")
                             if config.enable_prefix_caching else None)
        self.table.release_hooks.append(self.tiers.release_row)
        self.backend = create_backend(config.attention_backend, self.pool.k_pages, self.pool.v_pages,
                                      mc.head_dim ** -0.5)
        token_bytes = mc.num_layers * mc.num_kv_heads * 2 * mc.head_dim * self.pool.k_pages.element_size()
        log.info("KV cache: %.1f MiB in %d pages of %d tokens (one layer, one KV head each): "
                 "%d full-cache tokens", memory / 2**20, num_pages, config.block_size,
                 self.pool.capacity * config.block_size * 2 * mc.head_dim * self.pool.k_pages.element_size()
                 // token_bytes)

    def execute(self, batch: ScheduledBatch, observations: Observations | None = None) -> ModelOutput:
        """Run the batch, with the observations the policies asked for in the step's metadata."""
        observations = observations or Observations()
        windows, query_windows = observations.windows, observations.query_windows
        seqs = batch.seqs
        counts = torch.tensor(batch.counts)
        rows = torch.tensor([s.row for s in seqs])
        starts = torch.tensor([s.num_computed for s in seqs])
        input_ids = torch.tensor([t for s, c in zip(seqs, batch.counts)
                                  for t in s.token_slice(s.num_computed, s.num_computed + c)])
        ends = torch.cumsum(counts, 0)
        token_seq = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        positions = starts[token_seq] + torch.arange(input_ids.numel()) - (ends - counts)[token_seq]

        slot_index = self.table.append(rows, counts, positions)
        block_tables, seq_lens = self.table.batch_view(rows)
        is_decode = counts == 1
        decode_rows = torch.nonzero(is_decode)[:, 0]
        prefill_rows = torch.nonzero(~is_decode)[:, 0]
        prefill_counts = counts[prefill_rows]
        meta = AttentionMetadata(
            block_tables=block_tables, seq_lens=seq_lens, slot_index=slot_index,
            decode_rows=decode_rows, decode_tokens=ends[decode_rows] - 1,
            prefill_rows=prefill_rows,
            prefill_tokens=torch.nonzero(~is_decode[token_seq])[:, 0],
            prefill_query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(prefill_counts, 0)]),
            observe_decode=observations.decode_scores,
            prefill_windows=torch.tensor(windows)[prefill_rows] if any(windows) else None,
            query_windows=torch.tensor(query_windows)[prefill_rows] if any(query_windows) else None,
            tier_views=self.tiers.views(rows[decode_rows]) if self.tiers.tiers and decode_rows.numel() else [],
        )
        sampling = [i for i, (s, c) in enumerate(zip(seqs, batch.counts))
                    if s.num_computed + c == s.num_tokens and s.params.max_tokens]
        logits_index = ends[sampling] - 1
        spans = self._prompt_spans(batch)
        if spans:
            chunk_starts = ends - counts  # where each sequence's tokens begin in the flat batch
            logits_index = torch.cat([logits_index] + [
                chunk_starts[span.seq] + span.first - seqs[span.seq].num_computed + torch.arange(span.count)
                for span in spans])
        device = self.device
        logits = self.model.forward(input_ids.to(device), positions.to(device), meta.to(device), self.backend,
                                    logits_index.to(device)).cpu()
        for s, c in zip(seqs, batch.counts):
            s.num_computed += c
        prompt_logits = logits[len(sampling):].split([span.count for span in spans])
        return ModelOutput(sampling=[seqs[i] for i in sampling], logits=logits[:len(sampling)],
                           prompt_logits=list(zip(spans, prompt_logits)), meta=meta)

    @staticmethod
    def _prompt_spans(batch: ScheduledBatch) -> list[PromptSpan]:
        """The prompt positions of this step whose logits give prompt logprobs not yet collected
        (position p predicts prompt token p + 1; a preempted request's recomputed ones are skipped)."""
        spans = []
        for i, (s, c) in enumerate(zip(batch.seqs, batch.counts)):
            if s.params.prompt_logprobs is None:
                continue
            first = max(s.num_computed, len(s.prompt_logprobs) - 1)
            end = min(s.num_computed + c, len(s.prompt_token_ids) - 1)
            if first < end:
                spans.append(PromptSpan(i, first, end - first))
        return spans

    def kv_pages_held(self, rows: list[int]) -> list[float]:
        """Pages of the pool each row holds across all its layers and heads, compressed tiers included;
        a page n sequences share counts 1/n to each (the prefix cache's own reference is not a sequence's)."""
        index = torch.tensor(rows, dtype=torch.long)
        held = self.tiers.device_pages_held(index).double()
        cache = self.prefix_cache
        # sequences share pages only through cached entries, which stay while they do
        if cache is not None and (cache.blocks or cache.compressed) and index.numel():
            readers = self.pool.refs - cache.cached.to(torch.int32)  # sequences holding each page
            if int(readers.max()) > 1:
                held -= self.table.shared_excess(index, readers)
        return held.tolist()

    def check_invariants(self, live_rows: list[int] | None = None) -> None:
        """The page table's invariants over the pool, the pages of compressed tiers and of the prefix
        cache included."""
        self.table.check_invariants(live_rows, others=self.tiers.device_tables(),
                                    cached=None if self.prefix_cache is None else self.prefix_cache.pages())
        if live_rows is not None:
            released = torch.ones(self.table.tables.shape[0], dtype=torch.bool)
            released[live_rows] = False
            for tier in self.tiers.tiers.values():
                assert int(tier.lengths[released].sum()) == 0, "a released row still holds tier tokens"
