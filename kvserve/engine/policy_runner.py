"""Runs the compression policies after each forward pass: one `act` call per policy class in the
batch, on [n, L, Hkv, S] tensors gathered from the pool's slot metadata; then the moves into
compressed tiers the policy asked for, and one vectorised eviction for all the heads that shrank.
A step where every sequence of a policy decodes one in, one out (`Policy.decode_score`) runs as one
compiled pass over the tables instead, where the CPU kernels are built (kernels/decode_evict.py)."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.cache.page_pool import OutOfPages
from kvserve.cache.page_table import PageTable
from kvserve.cache.tier import TierSet
from kvserve.engine.model_runner import Observations
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.kernels import decode_evict
from kvserve.policies.base import Policy, PolicyStep, Transfer, oldest


class PolicyRunner:
    def __init__(self, table: PageTable, tiers: TierSet, group_size: int, attention_scale: float,
                 rope_inv_freq: torch.Tensor) -> None:
        self.table = table
        self.tiers = tiers
        self.group_size = group_size
        self.attention_scale = attention_scale
        self.rope_inv_freq = rope_inv_freq
        self.tokens_evicted: Counter[str] = Counter()
        pool = table.pool
        self.compiled_eviction = decode_evict.available(table.tables, table.lengths, pool.k_pages, pool.v_pages)

    def observations(self, batch: ScheduledBatch) -> Observations:
        """What attention must report this step: decode scores? the probabilities and the queries
        of how many of each prefill chunk's last queries?"""
        wanted = Observations()
        for seq, count in zip(batch.seqs, batch.counts):
            if count == 1:
                wanted.decode_scores |= seq.policy.needs_decode_scores
                wanted.windows.append(0)
                wanted.query_windows.append(0)
            else:
                prompt_done = seq.num_computed + count == seq.num_tokens
                wanted.windows.append(seq.policy.prefill_window(count, prompt_done))
                wanted.query_windows.append(seq.policy.query_window(count, prompt_done))
        return wanted

    def after_step(self, batch: ScheduledBatch, meta: AttentionMetadata) -> None:
        """Call after the forward pass (sequences' num_computed already advanced)."""
        groups: dict[type[Policy], list[int]] = defaultdict(list)
        for i, (seq, count) in enumerate(zip(batch.seqs, batch.counts)):
            if seq.policy.acts(count == 1, seq.num_computed == seq.num_tokens):
                groups[type(seq.policy)].append(i)
                seq.policy_acted = True
        for cls, members in groups.items():
            if not self._evict_compiled(cls, batch, members, meta):
                self._run(cls, batch, members, meta)

    def _evict_compiled(self, cls: type[Policy], batch: ScheduledBatch, members: list[int],
                        meta: AttentionMetadata) -> bool:
        """One in, one out for `members` by the compiled pass; False, changing nothing, where it does
        not apply (not every member decodes by a `decode_score` rule, or a head is over its budget by
        more than the new token): then `act` runs."""
        if not self.compiled_eviction or not meta.decode_scores or any(batch.counts[i] != 1 for i in members):
            return False
        seqs = [batch.seqs[i] for i in members]
        rules = [s.policy.decode_score() for s in seqs]
        if None in rules:
            return False
        table, pool = self.table, self.table.pool
        rows = torch.tensor([s.row for s in seqs])
        budget = torch.tensor([s.policy.budget() for s in seqs])
        if int((table.lengths[rows] - budget[:, None, None]).max()) > 1:
            return False
        decode_row = {row: i for i, row in enumerate(meta.decode_rows.tolist())}
        prompt_end = torch.tensor([s.policy.prompt_tokens for s in seqs])
        newest = torch.tensor([s.num_computed - 1 for s in seqs])
        freed, evicted = decode_evict.decode_evict_cpu(
            rows, torch.tensor([decode_row[i] for i in members]), torch.tensor(rules), budget,
            prompt_end - torch.tensor([s.policy.prompt_tail() for s in seqs]), prompt_end,
            newest - torch.tensor([s.policy.recent() for s in seqs]),
            [meta.decode_scores[layer][0] for layer in range(table.num_layers)], table.tables, table.lengths,
            pool.k_pages, pool.v_pages, pool.slot_positions, pool.slot_scores, pool.slot_aux, self.group_size)
        pool.release(freed)
        self.tokens_evicted[cls.name] += int(evicted.sum())
        return True

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
        queries = query_count = None
        if meta.window_queries:
            queries = self._observed(meta.window_queries, meta.prefill_rows, batch_size, members_t, None, None)
            asked = [0 if c == 1 else s.policy.query_window(c, s.num_computed == s.num_tokens)
                     for s, c in zip(seqs, counts.tolist())]  # as `observations` asked, the chunk now computed
            query_count = torch.minimum(torch.tensor(asked), counts)
        if cls.needs_key_norms:
            fresh = held & (positions > (newest - counts)[:, None, None, None])
            key_norms = torch.full(slot.shape, float("nan"))
            key_norms[fresh] = pool.k_pages.view(-1, pool.head_dim)[slot[fresh]].float().norm(dim=-1).cpu()
        step = PolicyStep(
            policies=[s.policy for s in seqs], lengths=lengths, new_tokens=counts, decoding=counts == 1,
            prompt_done=torch.tensor([s.num_computed == s.num_tokens for s in seqs]), newest_position=newest,
            held=held, positions=positions, scores=pool.slot_scores[slot], aux=pool.slot_aux[slot],
            key_norms=key_norms, decode_sum=decode_sum, decode_max=decode_max, window=window,
            queries=queries, group_size=self.group_size, slot=slot, key_store=pool.k_pages.view(-1, pool.head_dim),
            query_count=query_count, attention_scale=self.attention_scale,
            value_store=pool.v_pages.view(-1, pool.head_dim), rope_inv_freq=self.rope_inv_freq)
        scores, aux = step.scores, step.aux
        versions = scores._version, aux._version  # bumped by every in-place change
        keep = cls.act(step)
        # written back only when act changed them, and whole, without selecting the held slots: a slot
        # past a head's length is a free slot of its own last page (zeroed when a token is appended
        # there) or the null page's, which nothing reads
        if step.scores is not scores or scores._version != versions[0]:
            pool.slot_scores[slot] = step.scores
        if step.aux is not aux or aux._version != versions[1]:
            pool.slot_aux[slot] = step.aux
        question = self._question(step)
        if keep is None and question is None and not step.transfers:
            return
        keep = held.clone() if keep is None else keep
        if question is not None:
            keep |= question
        dropped = int((held & ~keep).sum())
        for key, transfer in step.transfers.items():
            movable = keep if question is None else keep & ~question
            keep &= ~self._transfer(key, transfer, rows, movable, slot, positions, question is not None)
        if dropped or step.transfers:
            table.evict(rows, keep)
        self.tokens_evicted[cls.name] += dropped

    @staticmethod
    def _question(step: PolicyStep) -> torch.Tensor | None:
        """The held slots out of every policy's reach (scope `context`: the prompt after its context),
        or None when no sequence of the step has any."""
        if not any(p.question_tokens for p in step.policies):
            return None
        start = step.per_row([p.context_tokens for p in step.policies])
        end = step.per_row([p.prompt_tokens for p in step.policies])
        return step.held & (step.positions >= start) & (step.positions < end)

    def _transfer(self, key: object, transfer: Transfer, rows: torch.Tensor, movable: torch.Tensor,
                  slot: torch.Tensor, positions: torch.Tensor, trimmed: bool) -> torch.Tensor:
        """Copy the `movable` slots of `transfer.mask` into the tier, oldest first; return the slots moved.
        `trimmed`: slots were taken out of the policy's mask, so each head's count is cut down to a
        whole number of the tier's units again (the oldest go).

        When the pool cannot take them all at once (the pages the move frees come back only after
        it), they go one (sequence, layer) at a time while pages last; the rest stay at full
        precision and move on a later step, once this step's moves have freed their pages."""
        mask = transfer.mask & movable
        if trimmed and bool(mask.any()) and (unit := self.tiers.get(key).unit) > 1:
            mask = oldest(positions, mask, mask.sum(-1) // unit * unit)
        moved = torch.zeros_like(mask)
        counts = mask.sum(-1)
        active = torch.nonzero(counts.flatten(1).any(-1))[:, 0]
        if active.numel() == 0:
            return moved
        mask, counts = mask[active], counts[active]
        order = positions[active].masked_fill(~mask, torch.iinfo(torch.int64).max).argsort(-1)
        chosen = slot[active].gather(-1, order)[torch.arange(mask.shape[-1]) < counts[..., None]]
        pool = self.table.pool
        keys = pool.k_pages.view(-1, pool.head_dim)[chosen]
        values = pool.v_pages.view(-1, pool.head_dim)[chosen]
        tier = self.tiers.get(key)
        extra = {name: t[active] for name, t in transfer.extra.items()}
        try:
            tier.store(rows[active], counts, keys, values, **extra)
            moved[active] = mask
            return moved
        except OutOfPages:
            pass
        # tokens run head by head (sequence, layer, head): each (sequence, layer) is one contiguous span
        ends = torch.cumsum(counts.sum(-1).flatten(), 0).view(counts.shape[:2]).tolist()
        for i, row in enumerate(active.tolist()):
            for layer in range(counts.shape[1]):
                end = ends[i][layer]
                start = end - int(counts[i, layer].sum())
                if start == end:
                    continue
                piece = torch.zeros_like(counts[i:i + 1])
                piece[0, layer] = counts[i, layer]
                try:
                    tier.store(rows[row:row + 1], piece, keys[start:end], values[start:end],
                               **{name: t[i:i + 1] for name, t in extra.items()})
                except OutOfPages:
                    return moved
                moved[row, layer] = mask[i, layer]
        return moved

    @staticmethod
    def _observed(per_layer: dict, covered: torch.Tensor, batch_size: int, members: torch.Tensor,
                  slots: int | None, which: int | None) -> torch.Tensor:
        """Stack a per-layer observation of the batch rows `covered` ([len(covered), ...] each)
        into [n, L, ...] for `members` (the last dim cut to `slots` when given), zero for members it does
        not cover."""
        layers = [per_layer[layer] if which is None else per_layer[layer][which] for layer in sorted(per_layer)]
        stacked = torch.stack(layers, dim=1).float()[..., :slots].cpu()
        covered = covered.cpu()
        if torch.equal(covered, members):  # the common case: a step of decodes, all of one policy
            return stacked
        lookup = torch.full((batch_size,), -1, dtype=torch.long)
        lookup[covered] = torch.arange(covered.numel())
        picked = lookup[members]
        return stacked[picked.clamp(min=0)] * (picked >= 0).view(-1, *[1] * (stacked.dim() - 1))
