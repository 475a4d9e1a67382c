"""From a forward pass's logits to each request's progress: its prompt logprobs, its next token
(sampled, or replaced by the request's token override), that token's logprobs, the stop checks and
the detokenized text, handed out as RequestOutputs."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvserve.engine.bad_words import bad_word_bans
from kvserve.engine.model_runner import ModelOutput
from kvserve.engine.outputs import KVUsage, RequestOutput, TokenLogprob
from kvserve.engine.sampler import sample
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.engine.sequence import Sequence, Status


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def process(self, batch: ScheduledBatch, result: ModelOutput) -> list[Sequence]:
        """Advance the batch's sequences by the step's results; return those with something to report,
        in order, with finish_reason set on the ones that are done."""
        for span, logits in result.prompt_logits:
            self._add_prompt_logprobs(batch.seqs[span.seq], span.first, logits)
        # a request for no tokens (max_tokens 0) only scores its prompt: it ends once the prompt is in
        scored = [seq for seq in batch.seqs if not seq.params.max_tokens and seq.num_computed == seq.num_tokens]
        for seq in scored:
            seq.finish_reason = "length"
        if result.sampling:
            self._append_tokens(result.sampling, result.logits)
        return scored + result.sampling

    def output(self, seq: Sequence, kv_usage: KVUsage | None = None) -> RequestOutput:
        """What the sequence produced since its last output; a finished one's carries its `kv_usage`."""
        first_output = seq.emitted_tokens == 0
        new_tokens = seq.output_token_ids[seq.emitted_tokens:]
        logprobs = seq.output_logprobs[seq.emitted_tokens:] if seq.params.logprobs is not None else None
        seq.emitted_tokens = len(seq.output_token_ids)
        finished = seq.status is Status.FINISHED
        return RequestOutput(
            request_id=seq.request_id, text=seq.detokenizer.take(final=finished), token_ids=new_tokens,
            logprobs=logprobs, finished=finished, finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
            kv_usage=kv_usage, stop_reason=seq.stop_reason, metrics=seq.metrics if finished else None,
            prompt_logprobs=seq.prompt_logprobs if first_output and seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens or 0)

    def _append_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of `logits`, let its override replace it,
        append it with its logprobs, and check whether it ends the sequence."""
        result = sample(logits, seqs, [self._banned(seq) for seq in seqs])
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            token = result.token_ids[i]
            if seq.token_override is not None:
                token = seq.token_override(logits[i], token)
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.output_token_ids.append(token)
            if seq.params.logprobs is not None:
                top = seq.params.logprobs
                seq.output_logprobs.append(self._token_logprob(token, float(result.logprobs[i]),
                                                               result.top_ids[i, :top] if top else None,
                                                               result.top_logprobs[i, :top] if top else None))
            self._check_stop(seq, token)

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
