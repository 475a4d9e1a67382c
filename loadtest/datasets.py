"""Prompts to send: fixed-length random text, passkey retrieval, a shared prefix, or a JSONL file.

Prompts are text, not token ids, so that every OpenAI-compatible server accepts them. Lengths are
counted with an approximate tokenizer (a word or a punctuation mark is a token: within ~2 % of
SmolLM2's tokenizer on these prompts); the exact counts come back in `usage`, and the metrics use
those."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from kvserve.eval.passkey import passkey_prompt

# Common English words, each a single token in the usual BPE vocabularies.
WORDS = ("river mountain quiet lamp history engine garden silver market winter harbor letter signal bridge "
         "valley thunder library meadow candle window forest copper island shadow ladder canyon kettle "
         "journey stone cloud paper orange table music summer voice light green small house water story "
         "people morning evening train field ocean castle road city glass bread apple").split()
DATASETS = ("random", "passkey", "shared-prefix", "jsonl:FILE")
_PIECE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Sample:
    """One request's prompt; `expected` is the text a correct completion contains (None: not scored)."""

    prompt: str
    output_len: int
    expected: str | None = None


def approx_tokens(text: str) -> int:
    """Words and punctuation marks: close enough to size prompts; usage.prompt_tokens is exact."""
    return len(_PIECE.findall(text))


class ApproxTokenizer:
    """The call shape `kvserve.eval.passkey.passkey_prompt` expects of a HF tokenizer."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [0] * approx_tokens(text)}


def random_words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def random_samples(count: int, input_len: int, output_len: int, seed: int) -> list[Sample]:
    """Independent random-word prompts of `input_len` tokens (vLLM's `random` dataset, as text)."""
    rng = random.Random(seed)
    return [Sample(random_words(rng, input_len), output_len) for _ in range(count)]


def shared_prefix_samples(count: int, prefix_len: int, input_len: int, output_len: int, seed: int) -> list[Sample]:
    """One `prefix_len`-token system text shared by every prompt, then `input_len` tokens of its own:
    what a prefix cache would reuse (SGLang's `generated-shared-prefix` with one group)."""
    rng = random.Random(seed)
    prefix = random_words(rng, prefix_len)
    return [Sample(f"{prefix}\n{random_words(rng, input_len)}", output_len) for _ in range(count)]


def passkey_samples(count: int, input_len: int, output_len: int, seed: int) -> list[Sample]:
    """Passkey retrieval prompts of ~`input_len` tokens, needles at depths spread evenly over the
    requests; a completion is correct when it contains the passkey."""
    tokenizer = ApproxTokenizer()
    samples = []
    for i in range(count):
        case = passkey_prompt(tokenizer, input_len, depth=(i + 0.5) / count, seed=seed * 100_003 + i)
        samples.append(Sample(case.prompt, output_len, case.passkey))
    return samples


def jsonl_samples(path: Path, count: int, output_len: int) -> list[Sample]:
    """Lines of `{"prompt": str, "output_len"?: int, "expected"?: str}`, cycled up to `count`."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each line must be an object with a string `prompt`")
    return [Sample(row["prompt"], int(row.get("output_len", output_len)), row.get("expected"))
            for row in (rows[i % len(rows)] for i in range(count))]


def build_samples(dataset: str, count: int, input_len: int, output_len: int, seed: int,
                  prefix_len: int) -> list[Sample]:
    if dataset == "random":
        return random_samples(count, input_len, output_len, seed)
    if dataset == "passkey":
        return passkey_samples(count, input_len, output_len, seed)
    if dataset == "shared-prefix":
        return shared_prefix_samples(count, prefix_len, input_len, output_len, seed)
    if dataset.startswith("jsonl:"):
        return jsonl_samples(Path(dataset.removeprefix("jsonl:")), count, output_len)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
