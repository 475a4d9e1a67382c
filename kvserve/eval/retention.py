"""What a policy kept of the needle: after the prompt is in (compressed) cache, the share of
(layer, KV head) pairs still holding the needle's tokens. A diagnostic for passkey failures; it
reads the page table, the policy never sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.passkey import PasskeyCase


@dataclass
class Retention:
    needle_tokens: int
    heads_with_all: float  # share of (layer, head) pairs holding every needle token
    heads_with_passkey: float  # share holding at least one whole copy of the passkey's tokens
    tokens_kept: float  # mean share of needle tokens a head holds
    per_layer_kept: list[float]  # the same, per layer


def needle_positions(tokenizer, case: PasskeyCase) -> tuple[list[int], list[list[int]]]:  # noqa: ANN001
    """Token positions of the needle sentence, and of each copy of the passkey inside it."""
    encoded = tokenizer(case.prompt, return_offsets_mapping=True)
    start = case.prompt.index(f"The pass key is {case.passkey}.")
    end = case.prompt.index(f"{case.passkey} is the pass key.", start) + len(f"{case.passkey} is the pass key.")
    copies = [start + len("The pass key is "), end - len(f"{case.passkey} is the pass key.")]

    def tokens_in(lo: int, hi: int) -> list[int]:
        return [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < hi and b > lo]

    return tokens_in(start, end), [tokens_in(c, c + len(case.passkey)) for c in copies]


def needle_retention(engine: LLMEngine, case: PasskeyCase, kv_policy: Any) -> Retention:
    """Prefill the case's prompt under `kv_policy` and look at what its heads hold before decoding."""
    ids = list(engine.tokenizer(case.prompt)["input_ids"])
    needle, copies = needle_positions(engine.tokenizer, case)
    request_id = f"retention-{id(case)}"
    engine.add_request(request_id, ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), kv_policy)
    while not engine.seqs[request_id].output_token_ids:
        engine.step()
    row = engine.seqs[request_id].row
    table = engine.runner.table
    lengths = table.lengths[row].long()
    slots = table.slot_index(torch.tensor([row]), int(lengths.max()))[0]
    held = torch.arange(slots.shape[-1]) < lengths[..., None]
    positions = engine.runner.pool.slot_positions[slots.flatten()].view(slots.shape).long()
    engine.abort(request_id)

    def holds(wanted: list[int]) -> torch.Tensor:  # [L, H, len(wanted)]
        return ((positions[..., None] == torch.tensor(wanted)) & held[..., None]).any(-2)

    kept = holds(needle)
    passkey = torch.stack([holds(c).all(-1) for c in copies]).any(0)
    return Retention(len(needle), float(kept.all(-1).double().mean()), float(passkey.double().mean()),
                     float(kept.double().mean()), kept.double().mean((-1, -2)).tolist())
