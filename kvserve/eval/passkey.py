"""Passkey retrieval prompts (the Landmark-attention test): a number hidden in repetitive filler.

Everything is generated here from a seed; nothing is downloaded."""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyCase:
    prompt: str
    passkey: str
    depth: float  # where the needle sits, as a fraction of the filler


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int) -> PasskeyCase:  # noqa: ANN001
    """A prompt of about `context_tokens` tokens with the passkey at `depth` (0 = start, 1 = end)."""
    rng = random.Random(seed)
    passkey = str(rng.randint(10000, 99999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    fixed = len(tokenizer(TASK + needle + QUESTION)["input_ids"])
    per_filler = len(tokenizer(FILLER * 10)["input_ids"]) / 10
    repeats = max(1, int((context_tokens - fixed) / per_filler))
    before = round(repeats * depth)
    prompt = TASK + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return PasskeyCase(prompt, passkey, depth)


def passkey_correct(case: PasskeyCase, answer: str) -> bool:
    return case.passkey in answer[:32]
