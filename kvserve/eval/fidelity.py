"""Logit fidelity: how far a compressed cache moves the model's next-token distributions.

The first `context` tokens of a text are the prompt (compressed by the policy as it is read); the
next `continuation` tokens are teacher-forced through the cache. Each step's distribution is compared
with the `full` policy's on the same tokens: KL(full || policy) in nats and top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvserve.engine.llm_engine import LLMEngine


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
    """One Fidelity per spec; `full` is the reference, so a `full` spec scores exactly (0, 1)."""
    kls: list[list[torch.Tensor]] = [[] for _ in specs]
    agree: list[list[torch.Tensor]] = [[] for _ in specs]
    for prompt, continuation in windows:
        reference = engine.teacher_force(prompt, continuation, {"name": "full"})
        for i, spec in enumerate(specs):
            candidate = reference if spec == {"name": "full"} else engine.teacher_force(prompt, continuation, spec)
            kl, same = compare_logprobs(reference, candidate)
            kls[i].append(kl)
            agree[i].append(same)
    results = []
    for kl, same in zip(kls, agree):
        kl_all, same_all = torch.cat(kl), torch.cat(same)
        results.append(Fidelity(float(kl_all.mean()), float(same_all.double().mean()), len(kl_all)))
    return results
