"""Prompts to send: fixed-length random text, passkey retrieval, a shared prefix, documents asked
several questions, growing conversations, or a JSONL file.

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

from kvserve.eval.passkey import QUESTION, PasskeyCase, passkey_prompt

# Common English words, each a single token in the usual BPE vocabularies.
WORDS = ("river mountain quiet lamp history engine garden silver market winter harbor letter signal bridge "
         "valley thunder library meadow candle window forest copper island shadow ladder canyon kettle "
         "journey stone cloud paper orange table music summer voice light green small house water story "
         "people morning evening train field ocean castle road city glass bread apple").split()
DATASETS = ("random", "passkey", "shared-prefix", "documents", "multi-turn", "jsonl:FILE")
_PIECE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Sample:
    """One request's prompt; `expected` is the text a correct completion contains (None: not scored)."""

    prompt: str
    output_len: int
    expected: str | None = None
    # the prompt's leading part that a chat request sends as its system message (the rest is the user's)
    context: str | None = None


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


def _documents(docs: int, input_len: int, seed: int) -> list[tuple[str, PasskeyCase]]:
    """`docs` passkey documents of ~`input_len` tokens (needles spread over depths), without their
    question; each names itself first, so no two share a block of tokens."""
    tokenizer = ApproxTokenizer()
    cases = [passkey_prompt(tokenizer, input_len, depth=(d + 0.5) / docs, seed=seed * 100_003 + d)
             for d in range(docs)]
    return [(f"Document {d + 1}. " + case.prompt.removesuffix(QUESTION), case) for d, case in enumerate(cases)]


def document_samples(count: int, docs: int, input_len: int, output_len: int, seed: int) -> list[Sample]:
    """`docs` passkey documents, each asked `count / docs` differently worded questions, the requests
    interleaved (document 1, 2, ..., 1, 2, ...): one shared context, many queries (SCBench's
    multi-request mode), what a prefix cache serves. Correct when the completion has the passkey."""
    documents = _documents(docs, input_len, seed)
    return [Sample(f"{documents[i % docs][0]}\nQuiz {i // docs + 1}.{QUESTION}", output_len,
                   documents[i % docs][1].passkey, documents[i % docs][0]) for i in range(count)]


def multi_turn_samples(count: int, conversations: int, input_len: int, output_len: int, seed: int) -> list[Sample]:
    """`conversations` chats over a passkey document each, growing turn by turn: turn t's prompt is the
    document, t earlier exchanges (generated small talk standing in for the replies), then the passkey
    question. Turns are interleaved across conversations, so every prompt extends one sent before it
    (SCBench's multi-turn mode)."""
    documents = _documents(conversations, input_len, seed)
    rng = random.Random(seed)
    turns = -(-count // conversations)
    exchanges = [[f"\nUser: {random_words(rng, 12)}?\nAssistant: {random_words(rng, 24)}." for _ in range(turns)]
                 for _ in range(conversations)]
    return [Sample(documents[c][0] + "".join(exchanges[c][:t]) + QUESTION, output_len, documents[c][1].passkey,
                   documents[c][0] + "".join(exchanges[c][:t]))
            for c, t in ((i % conversations, i // conversations) for i in range(count))]


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
                  prefix_len: int, num_docs: int = 4) -> list[Sample]:
    if dataset == "random":
        return random_samples(count, input_len, output_len, seed)
    if dataset == "passkey":
        return passkey_samples(count, input_len, output_len, seed)
    if dataset == "shared-prefix":
        return shared_prefix_samples(count, prefix_len, input_len, output_len, seed)
    if dataset == "documents":
        return document_samples(count, num_docs, input_len, output_len, seed)
    if dataset == "multi-turn":
        return multi_turn_samples(count, num_docs, input_len, output_len, seed)
    if dataset.startswith("jsonl:"):
        return jsonl_samples(Path(dataset.removeprefix("jsonl:")), count, output_len)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
