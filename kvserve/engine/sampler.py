"""Sampling for a batch of rows at once.

Every row's draw depends only on its own seed and how many tokens it has produced, never on what
else is in the batch: the uniform number of a draw is a hash of (seed, counter), and the token is
found by inverting the row's CDF. Greedy rows take the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.sequence import Sequence
from kvserve.kernels.argmax import argmax_rows

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_uniform(seed: int, counter: int) -> float:
    """The uniform in [0, 1) used for the `counter`-th token of a request with `seed`."""
    return (_mix64(_mix64(seed & _MASK64) ^ counter) >> 11) / float(1 << 53)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: torch.Tensor | None  # [n] logprob of each sampled token, when any row wants logprobs
    top_ids: torch.Tensor | None  # [n, k] the k most likely tokens, k = most asked by any row
    top_logprobs: torch.Tensor | None  # [n, k]


def _row_tokens(rows: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs, for indexing a [n, vocab] tensor: row rows[i] with tokens[i]."""
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    return (torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths),
            torch.tensor([t for row in tokens for t in row], dtype=torch.long))


def apply_penalties(logits: torch.Tensor, outputs: list[list[int]], presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens each row has generated so far."""
    counts = torch.zeros_like(logits)
    index = _row_tokens(list(range(len(outputs))), outputs)
    counts.index_put_(index, torch.ones(index[1].numel()), accumulate=True)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_repetition_penalty(logits: torch.Tensor, rows: list[int], penalties: list[float],
                             seen: list[list[int]]) -> torch.Tensor:
    """vLLM's (and transformers') repetition penalty on rows[i]: each token of seen[i] (its prompt and
    output) has a positive logit divided by penalties[i], a negative one multiplied by it."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[_row_tokens(rows, seen)] = True
    penalty = torch.ones(logits.shape[0])
    penalty[rows] = torch.tensor(penalties)
    penalty = penalty[:, None]
    return torch.where(mask, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]]) -> torch.Tensor:
    """Each row's own edits before sampling, computed only where some row asks: allowed_token_ids,
    logit_bias, the tokens `banned` this step (stop tokens before min_tokens, the last tokens of bad
    words), then the penalties."""
    params = [s.params for s in seqs]
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if restricted:
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[_row_tokens(restricted, [params[i].allowed_token_ids for i in restricted])] = True
        limited = torch.zeros(logits.shape[0], 1, dtype=torch.bool)
        limited[restricted] = True
        logits = logits.masked_fill(limited & ~allowed, float("-inf"))
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        index = _row_tokens(biased, [list(params[i].logit_bias) for i in biased])
        bias = torch.tensor([b for i in biased for b in params[i].logit_bias.values()], dtype=logits.dtype)
        logits = logits.index_put(index, bias, accumulate=True)
    if any(banned):
        logits = logits.index_put(_row_tokens(list(range(len(banned))), banned),
                                  torch.tensor(float("-inf"), dtype=logits.dtype))
    presence = torch.tensor([p.presence_penalty for p in params])
    frequency = torch.tensor([p.frequency_penalty for p in params])
    if bool(presence.any()) or bool(frequency.any()):
        logits = apply_penalties(logits, [s.output_token_ids for s in seqs], presence, frequency)
    repeating = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeating:
        logits = apply_repetition_penalty(logits, repeating, [params[i].repetition_penalty for i in repeating],
                                          [seqs[i].prompt_token_ids + seqs[i].output_token_ids for i in repeating])
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]]) -> SamplerOutput:
    """logits [n, vocab] float32, one row per sequence; `banned[i]`: the tokens seqs[i] may not
    sample this step. A row's draw uses its sequence's seed and the number of tokens it has output."""
    params = [s.params for s in seqs]
    logits = adjust_logits(logits, seqs, banned)
    want_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    logprobs = top_ids = top_logprobs = None
    if want_logprobs is not None:
        all_logprobs = torch.log_softmax(logits, dim=-1)
    chosen = argmax_rows(logits)

    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        chosen[rows] = _sample_random(logits[rows], [params[i] for i in random_rows],
                                      [draw_uniform(seqs[i].seed, len(seqs[i].output_token_ids))
                                       for i in random_rows])
    if want_logprobs is not None:
        logprobs = all_logprobs.gather(1, chosen[:, None])[:, 0]
        if want_logprobs:
            top_logprobs, top_ids = all_logprobs.topk(want_logprobs, dim=-1)
    return SamplerOutput(chosen.tolist(), logprobs, top_ids, top_logprobs)


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    temperature = torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])

    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1])
    drop = rank[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # top-p keeps the smallest prefix whose mass reaches top_p (always at least one token)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    probs = probs.masked_fill(drop, 0.0).double()
    cdf = probs.cumsum(-1)
    target = torch.tensor(uniforms, dtype=torch.float64)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)
    # never land on a dropped token through rounding at the top of the CDF
    index = torch.minimum(index, (~drop).sum(-1, keepdim=True) - 1)
    return order.gather(1, index)[:, 0]
