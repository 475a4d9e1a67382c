"""Logit fidelity: how far a compressed cache moves the model's next-token distributions.

The first `context` tokens of a text are the prompt (compressed by the policy as it is read); the
next `continuation` tokens are teacher-forced through the cache. Each step's distribution is compared
with the `full` policy's on the same tokens: KL(full || policy) in nats and top-1 agreement.

A `full` spec is measured like any other, by a run of its own: its score (KL exactly 0, top-1 exactly
1) checks that two runs agree bit for bit, which the engine's batch-invariant kernels guarantee."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvserve.engine.llm_engine import LLMEngine
from kvserve.eval.teacher_forcing import teacher_force


@dataclass
class Fidelity:
    kl: float  # mean over steps of KL(full || policy), nats
    top1: float  # fraction of steps whose most likely token is the same as full's
    steps: int


def compare_logprobs(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step: KL(reference || candidate) and whether the argmaxes agree. Both [steps, vocab] log-probs."""
    ref, cand = reference.double(), candidate.double()
    p = ref.exp()
    # a token the reference gives probability 0 adds nothing, even where the candidate's log is -inf
    kl = torch.where(p > 0, p * (ref - cand), 0.0).sum(-1)
    return kl, reference.argmax(-1) == candidate.argmax(-1)


def text_windows(token_ids: list[int], context: int, continuation: int, samples: int
                 ) -> list[tuple[list[int], list[int]]]:
    """`samples` disjoint (prompt, continuation) windows from the start of the text."""
    span = context + continuation
    if samples * span > len(token_ids):
        raise ValueError(f"the text has {len(token_ids)} tokens; {samples} samples of {span} need more")
    return [(token_ids[i * span: i * span + context], token_ids[i * span + context: (i + 1) * span])
            for i in range(samples)]


def run_fidelity(engine: LLMEngine, windows: list[tuple[list[int], list[int]]], specs: list[dict[str, Any]]
                 ) -> list[Fidelity]:
    """One Fidelity per spec, against a `full` run of each window."""
    kls: list[list[torch.Tensor]] = [[] for _ in specs]
    agree: list[list[torch.Tensor]] = [[] for _ in specs]
    for prompt, continuation in windows:
        reference = teacher_force(engine, prompt, continuation, {"name": "full"})
        for i, spec in enumerate(specs):
            kl, same = compare_logprobs(reference, teacher_force(engine, prompt, continuation, spec))
            kls[i].append(kl)
            agree[i].append(same)
    results = []
    for kl, same in zip(kls, agree):
        kl_all, same_all = torch.cat(kl), torch.cat(same)
        results.append(Fidelity(float(kl_all.mean()), float(same_all.double().mean()), len(kl_all)))
    return results
