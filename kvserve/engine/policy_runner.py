"""Runs the compression policies after each forward pass: one `act` call per policy class in the
batch, on [n, L, Hkv, S] tensors gathered from the pool's slot metadata, then one vectorised
eviction for all the heads that shrank."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.cache.page_table import PageTable
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.policies.base import Policy, PolicyStep


class PolicyRunner:
    def __init__(self, table: PageTable, group_size: int) -> None:
        self.table = table
        self.group_size = group_size
        self.tokens_evicted: Counter[str] = Counter()

    def observations(self, batch: ScheduledBatch) -> tuple[bool, list[int]]:
        """What attention must report this step: decode scores? how many of each prefill chunk's queries?"""
        decode, windows = False, []
        for seq, count in zip(batch.seqs, batch.counts):
            if count == 1:
                decode |= seq.policy.needs_decode_scores
                windows.append(0)
            else:
                windows.append(seq.policy.prefill_window(count, seq.num_computed + count == seq.num_tokens))
        return decode, windows

    def after_step(self, batch: ScheduledBatch, meta: AttentionMetadata) -> None:
        """Call after the forward pass (sequences' num_computed already advanced)."""
        groups: dict[type[Policy], list[int]] = defaultdict(list)
        for i, seq in enumerate(batch.seqs):
            if type(seq.policy).act.__func__ is not Policy.act.__func__:
                groups[type(seq.policy)].append(i)
        for cls, members in groups.items():
            self._run(cls, batch, members, meta)

    def _run(self, cls: type[Policy], batch: ScheduledBatch, members: list[int], meta: AttentionMetadata) -> None:
        table, pool = self.table, self.table.pool
        seqs = [batch.seqs[i] for i in members]
        rows = torch.tensor([s.row for s in seqs])
        counts = torch.tensor([batch.counts[i] for i in members])
        lengths = table.lengths[rows].long()
        slots = int(lengths.max())
        slot = table.slot_index(rows, slots)
        held = torch.arange(slots) < lengths[..., None]
        newest = torch.tensor([s.num_computed - 1 for s in seqs])
        positions = pool.slot_positions[slot].long()
        members_t = torch.tensor(members)
        decode_sum = decode_max = window = key_norms = None
        batch_size = len(batch.seqs)
        if meta.decode_scores:
            decode_sum, decode_max = (self._observed(meta.decode_scores, meta.decode_rows, batch_size, members_t,
                                                     slots, k) for k in (0, 1))
        if meta.window_scores:
            window = self._observed(meta.window_scores, meta.prefill_rows, batch_size, members_t, slots, None)
        if cls.needs_key_norms:
            fresh = held & (positions > (newest - counts)[:, None, None, None])
            key_norms = torch.full(slot.shape, float("nan"))
            key_norms[fresh] = pool.k_pages.view(-1, pool.head_dim)[slot[fresh]].float().norm(dim=-1)
        step = PolicyStep(
            policies=[s.policy for s in seqs], lengths=lengths, new_tokens=counts, decoding=counts == 1,
            prompt_done=torch.tensor([s.num_computed == s.num_tokens for s in seqs]), newest_position=newest,
            held=held, positions=positions, scores=pool.slot_scores[slot], aux=pool.slot_aux[slot],
            key_norms=key_norms, decode_sum=decode_sum, decode_max=decode_max, window=window,
            group_size=self.group_size)
        keep = cls.act(step)
        pool.slot_scores[slot[held]] = step.scores[held]
        pool.slot_aux[slot[held]] = step.aux[held]
        if keep is None:
            return
        dropped = int((held & ~keep).sum())
        if dropped:
            table.evict(rows, keep)
            self.tokens_evicted[cls.name] += dropped

    @staticmethod
    def _observed(per_layer: dict, covered: torch.Tensor, batch_size: int, members: torch.Tensor, slots: int,
                  which: int | None) -> torch.Tensor:
        """Stack a per-layer observation of the batch rows `covered` ([len(covered), Hkv, S] each)
        into [n, L, Hkv, slots] for `members`, zero for members it does not cover."""
        layers = [per_layer[layer] if which is None else per_layer[layer][which] for layer in sorted(per_layer)]
        stacked = torch.stack(layers, dim=1).float()[..., :slots].cpu()
        lookup = torch.full((batch_size,), -1, dtype=torch.long)
        lookup[covered.cpu()] = torch.arange(covered.numel())
        picked = lookup[members]
        return stacked[picked.clamp(min=0)] * (picked >= 0)[:, None, None, None]
