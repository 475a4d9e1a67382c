"""The peer of `kvserve eval --peer kvpress`: NVIDIA kvpress's presses on kvserve's passkey prompts.

kvpress 0.5.5 pins transformers<5.3 and kvserve runs 5.x, so this script runs under kvpress's own venv
(`make kvpress-venv`), as a subprocess of kvserve/eval/peer.py:

    .venv-kvpress/bin/python kvserve/eval/kvpress_peer.py INPUT.json OUTPUT.json

It imports nothing from kvserve (whose dependencies that venv lacks). torch, transformers and kvpress are
imported inside main(), so that kvserve's venv loads the JSON helpers too (its tests do).

INPUT:  {"model": HF folder, "dtype": "float32", "answer_tokens": 16,
         "cases": [{"id": str, "prompt_ids": [int], "passkey": str, "context_len": int | null}],
         "presses": [{"name": "knorm", "compression_ratio": 0.75}, {"name": "full", "compression_ratio": 0}]}
OUTPUT: {"kvpress": version, "transformers": version, "seconds": float,
         "runs": [{"press": "knorm:0.75", "case": id, "answer": text, "answer_ids": [int], "correct": bool,
                   "kv_kept": fraction of the compressed tokens' KV pairs kept, "seconds": float}]}

Per (press, case): the press is on for one forward pass over the prompt's ids as given (no chat
template, no BOS added), or over its first `context_len` ids only, after which the rest (the question)
goes in uncompressed at its own positions, as kvpress's pipeline does. Presses act at prefill only, as in
kvpress. Then `answer_tokens` greedy tokens without the press, at the positions the uncompressed prompt
gives them, EOS ignored (as `kvserve eval` generates), decoded without special tokens. A case is correct
where the passkey is in the answer's first 32 characters (kvserve.eval.passkey.passkey_correct's rule).

Presses: `compression_ratio` is the fraction REMOVED (kvserve's `ratio` is the fraction kept), and every
other parameter is kvpress's default. `adakv` is AdaKVPress around ExpectedAttentionPress (the pairing
kvpress's benchmarks rank first): head-wise budgets from expected attention, at least 20% of each head's
share kept. `kvzip` is KVzipPress: after the prefill it replays the compressed tokens behind a "Repeat
the previous context" prompt in chunks of 2048 and scores each pair by the attention the replay pays it,
about 2-3 prefills more on a CPU. Its prompt and suffix come from the model's chat template while the
passkey prompts have none, so on SmolLM2 the first tokens that its template's prefix would hold
(its system message, about 20 tokens, of the task line) are never scored and go before any other.
AdaKVPress and KVzipPress do not remove pairs: they mask them in the attention function (a key whose
attention underflows), so their `kv_kept` counts the pairs not masked.

Attention: ObservedAttentionPress (`h2o`) reads the attention weights and needs eager attention;
AdaKVPress and KVzipPress refuse eager. Every other press runs on sdpa like those two (about half
eager's time on a CPU at 1-2k tokens; SnapKV and TOVA compute their window's attention themselves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

# press name (a kvserve policy name, or one only kvpress has) -> the kvpress press it builds
PRESSES = {
    "full": "no press",
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "h2o": "ObservedAttentionPress",
    "keydiff": "KeyDiffPress",
    "expected_attention": "ExpectedAttentionPress",
    "adakv": "AdaKVPress",  # around ExpectedAttentionPress
    "kvzip": "KVzipPress",
}
EAGER = {"h2o"}  # presses that read the attention weights; the others run on sdpa


def press_id(press: dict[str, Any]) -> str:
    """`knorm:0.75`: a press's name and compression ratio, the key of its runs in OUTPUT."""
    return f"{press['name']}:{press['compression_ratio']:g}"


def is_correct(passkey: str, answer: str) -> bool:
    return passkey in answer[:32]


def read_input(path: Path) -> dict[str, Any]:
    job = json.loads(Path(path).read_text())
    missing = {"model", "dtype", "answer_tokens", "cases", "presses"} - set(job)
    if missing:
        raise ValueError(f"{path}: no {sorted(missing)}")
    for press in job["presses"]:
        if press["name"] not in PRESSES:
            raise ValueError(f"{path}: unknown press {press['name']!r} (known: {sorted(PRESSES)})")
        if not 0 <= press["compression_ratio"] < 1:
            raise ValueError(f"{path}: compression_ratio of {press['name']} must be in [0, 1)")
    return job


def write_output(path: Path, runs: list[dict[str, Any]], versions: dict[str, str], seconds: float) -> None:
    Path(path).write_text(json.dumps({**versions, "seconds": round(seconds, 1), "runs": runs}, indent=1))


def read_output(path: Path) -> dict[str, Any]:
    """OUTPUT, its runs keyed by (press id, case id)."""
    output = json.loads(Path(path).read_text())
    output["runs"] = {(run["press"], run["case"]): run for run in output["runs"]}
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    job = read_input(args.input)

    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    models: dict[str, Any] = {}

    def model_for(name: str) -> Any:
        attention = "eager" if name in EAGER else "sdpa"
        if attention not in models:
            models[attention] = AutoModelForCausalLM.from_pretrained(
                job["model"], dtype=getattr(torch, job["dtype"]), attn_implementation=attention).eval()
        return models[attention]

    start, runs = time.monotonic(), []
    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    write_output(args.output, runs, versions, 0.0)  # then again after each press
    for press in job["presses"]:
        pid, press_start, correct = press_id(press), time.monotonic(), 0
        for case in job["cases"]:
            run = run_case(model_for(press["name"]), tokenizer, build_press(kvpress, press), case,
                           job["answer_tokens"])
            runs.append({"press": pid, "case": case["id"], **run})
            correct += run["correct"]
        print(f"kvpress peer: {describe(press)}: {correct}/{len(job['cases'])} correct, "
              f"{time.monotonic() - press_start:.0f} s", file=sys.stderr, flush=True)
        write_output(args.output, runs, versions, time.monotonic() - start)  # a run cut short keeps these
    return 0


def build_press(kvpress: Any, press: dict[str, Any]) -> Any:
    """The press `describe` names (None for `full`)."""
    name, ratio = press["name"], press["compression_ratio"]
    if name == "full":
        return None
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def describe(press: dict[str, Any]) -> str:
    """The press `build_press` makes, as Python: `KnormPress(compression_ratio=0.75)`."""
    name, ratio = press["name"], press["compression_ratio"]
    if name == "full":
        return "no press"
    if name == "adakv":
        return f"AdaKVPress(ExpectedAttentionPress(compression_ratio={ratio:g}))"
    return f"{PRESSES[name]}(compression_ratio={ratio:g})"


def run_case(model: Any, tokenizer: Any, press: Any, case: dict[str, Any], answer_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    start = time.monotonic()
    ids = torch.tensor([case["prompt_ids"]], device=model.device)
    prompt_len = ids.shape[1]
    compressed = case.get("context_len") or prompt_len
    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=ids[:, :compressed], past_key_values=cache, logits_to_keep=1)
        kv_kept = _kv_kept(model, cache, compressed)
        if compressed < prompt_len:  # the question, uncompressed, at its own positions
            positions = torch.arange(compressed, prompt_len, device=model.device).unsqueeze(0)
            out = model(input_ids=ids[:, compressed:], past_key_values=cache, position_ids=positions,
                        logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        for i in range(answer_tokens - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device), past_key_values=cache,
                        position_ids=torch.tensor([[prompt_len + i]], device=model.device))
            tokens.append(int(out.logits[0, -1].argmax()))
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"answer": answer, "answer_ids": tokens, "correct": is_correct(case["passkey"], answer),
            "kv_kept": kv_kept, "seconds": round(time.monotonic() - start, 2)}


def _kv_kept(model: Any, cache: Any, tokens: int) -> float:
    """The fraction of the compressed tokens' KV pairs (over layers and KV heads) the cache still attends."""
    kept = total = 0
    for layer, cached in zip(model.model.layers, cache.layers):
        heads, length = cached.keys.shape[1], cached.keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)  # AdaKVPress, KVzipPress
        kept += heads * length - (len(masked[0]) if masked is not None else 0)
        total += heads * tokens
    return kept / total


if __name__ == "__main__":
    sys.exit(main())
