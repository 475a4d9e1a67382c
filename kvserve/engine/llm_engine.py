"""The synchronous engine: add requests, `step()` until done, abort. One thread drives it."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvserve.engine.bad_words import bad_word_bans, bad_words_token_ids
from kvserve.engine.config import EngineConfig
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.errors import InvalidRequest
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.outputs import KVUsage, RequestOutput, TokenLogprob
from kvserve.engine.policy_runner import PolicyRunner
from kvserve.engine.sampler import sample
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.sequence import Sequence, Status
from kvserve.model.loader import load_tokenizer
from kvserve.policies.registry import create_policy, parse_policy


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pages_total: int
    pages_free: int
    page_bytes: int
    num_preemptions: int
    bytes_held: dict[str, int]  # per policy: KV bytes its running sequences hold (as of the last step)
    tokens_evicted: dict[str, int]  # per policy, since start


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = load_tokenizer(self.runner.folder)
        self.scheduler = Scheduler(self.runner.table, config.max_num_seqs, config.max_num_batched_tokens,
                                   by_priority=config.scheduling_policy == "priority")
        self.policies = PolicyRunner(self.runner.table, self.runner.tiers, self.model_config.group_size)
        self.default_policy = parse_policy(config.kv_policy)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self._bytes_held: dict[str, int] = {}

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    kv_policy: Any = None, priority: int = 0) -> None:
        if request_id in self.seqs:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if priority and not self.scheduler.by_priority:
            raise InvalidRequest("priority needs the server's --scheduling-policy priority", "priority")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        for name, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids or ())):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"{name} token ids must be in [0, {vocab})", name)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                f"the prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context length of {self.max_model_len} tokens", "max_tokens")
        policy_params = parse_policy(kv_policy, self.default_policy)
        policy = create_policy(policy_params, len(prompt_token_ids))
        bound = min(total, policy.tokens_bound(params.max_tokens, self.scheduler.prefill_chunk))
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
            bad_words_ids=bad_words_token_ids(self.tokenizer, params.bad_words),
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        out = self._finish(seq, "abort")
        self._snapshot_bytes_held()
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        pool = self.runner.pool
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), pool.capacity,
                           pool.pages_free, pool.page_bytes, self.scheduler.num_preemptions,
                           dict(self._bytes_held), dict(self.policies.tokens_evicted))

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits, sampling, spans, meta = self.runner.execute(batch, *self.policies.observations(batch))
        logits, prompt_logits = logits[:len(sampling)], logits[len(sampling):]
        for span, span_logits in zip(spans, prompt_logits.split([span.count for span in spans])):
            self._add_prompt_logprobs(batch.seqs[span.seq], span.first, span_logits)
        # the peak is reached now, before the policies cut the step's new tokens back
        for seq, pages in zip(batch.seqs, self.runner.kv_pages_held([s.row for s in batch.seqs])):
            seq.kv_bytes_peak = max(seq.kv_bytes_peak, pages * self.runner.pool.page_bytes)
        self.policies.after_step(batch, meta)
        # a request for no tokens (max_tokens 0) only scores its prompt: it ends once the prompt is in
        outputs = [self._finish(seq, "length") for seq in batch.seqs
                   if not seq.params.max_tokens and seq.num_computed == seq.num_tokens]
        if not sampling:
            self._snapshot_bytes_held()
            return outputs
        sampled = [batch.seqs[i] for i in sampling]
        result = sample(logits, [s.params for s in sampled], [s.seed for s in sampled],
                        [s.output_token_ids for s in sampled], [s.prompt_token_ids for s in sampled],
                        [self._banned(s) for s in sampled])
        now = time.monotonic()
        for i, seq in enumerate(sampled):
            token = result.token_ids[i]
            if seq.forced_tokens is not None:
                seq.forced_logprobs.append(torch.log_softmax(logits[i], dim=-1))
                token = seq.forced_tokens[len(seq.output_token_ids)]
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.output_token_ids.append(token)
            if seq.params.logprobs is not None:
                top = seq.params.logprobs
                seq.output_logprobs.append(self._token_logprob(token, float(result.logprobs[i]),
                                                               result.top_ids[i, :top] if top else None,
                                                               result.top_logprobs[i, :top] if top else None))
            self._check_stop(seq, token)
            outputs.append(self._finish(seq) if seq.finish_reason else self._output(seq))
        # after the finished sequences left: a gauge read once traffic stops must not show their bytes
        self._snapshot_bytes_held()
        return outputs

    def _snapshot_bytes_held(self) -> None:
        """Per-policy bytes held, taken in the engine thread so readers elsewhere never see a half step."""
        running = self.scheduler.running
        held: dict[str, int] = {}
        for seq, pages in zip(running, self.runner.kv_pages_held([s.row for s in running]) if running else []):
            held[seq.policy_params.name] = held.get(seq.policy_params.name, 0) + pages * self.runner.pool.page_bytes
        self._bytes_held = held

    def _stop_ids(self, seq: Sequence) -> list[int]:
        """The tokens that would end this sequence: its stop token ids, and EOS unless ignored."""
        return [*seq.params.stop_token_ids, *(() if seq.params.ignore_eos else self.eos_token_ids)]

    def _banned(self, seq: Sequence) -> list[int]:
        """The tokens it may not sample this step: those that would stop it before min_tokens, and
        those that would complete a bad word."""
        banned = self._stop_ids(seq) if len(seq.output_token_ids) < seq.params.min_tokens else []
        if seq.bad_words_ids:
            banned += bad_word_bans(seq.bad_words_ids, seq.output_token_ids)
        return banned

    def _check_stop(self, seq: Sequence, token: int) -> None:
        # before min_tokens nothing stops it (the sampler kept stop tokens out), as in vLLM
        stop_string = seq.detokenizer.add(token, find_stop=len(seq.output_token_ids) >= seq.params.min_tokens)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif token in seq.params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.eos_token_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _token_logprob(self, token: int, logprob: float, top_ids: torch.Tensor | None,
                       top_logprobs: torch.Tensor | None, rank: int | None = None) -> TokenLogprob:
        decode = self.tokenizer.decode
        alternatives = []
        if top_ids is not None:
            ids = top_ids.tolist()
            alternatives = list(zip(ids, [decode([t]) for t in ids], top_logprobs.tolist()))
        return TokenLogprob(token, decode([token]), logprob, alternatives, rank)

    def _add_prompt_logprobs(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """The logprobs of prompt tokens first + 1 ... from the logits at positions first ..."""
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = seq.prompt_token_ids[first + 1:first + 1 + logits.shape[0]]
        chosen = logprobs.gather(1, torch.tensor(targets)[:, None])
        ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
        chosen = chosen[:, 0].tolist()
        top = seq.params.prompt_logprobs
        top_logprobs, top_ids = logprobs.topk(top, dim=-1) if top else (None, None)
        for j, token in enumerate(targets):
            seq.prompt_logprobs.append(self._token_logprob(token, chosen[j], top_ids[j] if top else None,
                                                           top_logprobs[j] if top else None, ranks[j]))

    def _kv_usage(self, seq: Sequence) -> KVUsage:
        runner = self.runner
        held = runner.kv_pages_held([seq.row])[0] if seq.row is not None else 0
        full = self.scheduler.pages_for_tokens(seq.num_computed) * runner.pool.page_bytes
        return KVUsage(seq.policy_params.name, held * runner.pool.page_bytes, full, seq.kv_bytes_peak)

    def _output(self, seq: Sequence) -> RequestOutput:
        first_output = seq.emitted_tokens == 0
        new_tokens = seq.output_token_ids[seq.emitted_tokens:]
        logprobs = seq.output_logprobs[seq.emitted_tokens:] if seq.params.logprobs is not None else None
        seq.emitted_tokens = len(seq.output_token_ids)
        finished = seq.status is Status.FINISHED
        return RequestOutput(
            request_id=seq.request_id, text=seq.detokenizer.take(final=finished), token_ids=new_tokens,
            logprobs=logprobs, finished=finished, finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
            kv_usage=self._kv_usage(seq) if finished else None, stop_reason=seq.stop_reason,
            metrics=seq.metrics if finished else None,
            prompt_logprobs=seq.prompt_logprobs if first_output and seq.params.prompt_logprobs is not None else None)

    def _finish(self, seq: Sequence, reason: str | None = None) -> RequestOutput:
        """Retire a sequence; `reason` sets its finish_reason (else it was set already)."""
        seq.finish_reason = reason or seq.finish_reason
        usage = self._kv_usage(seq)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        seq.metrics.finished_time = time.monotonic()
        out = self._output(seq)
        out.kv_usage = usage
        return out

    # ---- convenience -------------------------------------------------------------------------

    def teacher_force(self, prompt: list[int], continuation: list[int], kv_policy: Any = None) -> torch.Tensor:
        """Feed `continuation` after `prompt` token by token through the (compressed) cache instead of
        sampling; return the model's log-probabilities before each of its tokens, [len, vocab]."""
        request_id = f"force-{time.monotonic_ns()}"
        self.add_request(request_id, prompt, SamplingParams(max_tokens=len(continuation), temperature=0,
                                                            ignore_eos=True), kv_policy)
        seq = self.seqs[request_id]
        seq.forced_tokens = list(continuation)
        while self.has_unfinished():
            self.step()
        return torch.stack(seq.forced_logprobs)

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
