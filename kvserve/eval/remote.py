"""Passkey retrieval against a running kvserve server: the OpenAI completions endpoint with the
`kv_policy` extension; the cache sizes come from `usage.kv_cache`."""

from __future__ import annotations

from typing import Any

import httpx

from kvserve.eval.passkey import passkey_correct
from kvserve.eval.passkey_grid import GridCase, PasskeyRun, run_grid
from kvserve.eval.specs import policy_label


def run_passkey_remote(url: str, cases: list[GridCase], specs: list[dict[str, Any]], answer_tokens: int,
                       api_key: str | None = None, timeout: float = 600.0) -> list[PasskeyRun]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        models = client.get("/v1/models")
        models.raise_for_status()
        model = models.json()["data"][0]["id"]

        def run_one(cell: GridCase, spec: dict[str, Any]) -> PasskeyRun:
            # token ids, not text: the server sees exactly the prompt the grid measured
            body = {"model": model, "prompt": cell.prompt_ids, "max_tokens": answer_tokens, "temperature": 0,
                    "ignore_eos": True, "kv_policy": spec}
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{policy_label(spec)}: HTTP {response.status_code}: {response.text}")
            data = response.json()
            answer = data["choices"][0]["text"]
            usage = data["usage"]
            kv = usage.get("kv_cache") or {}
            return PasskeyRun(
                policy=policy_label(spec), context=cell.context, depth=cell.depth, trial=cell.trial,
                prompt_tokens=usage["prompt_tokens"], passkey=cell.case.passkey, answer=answer,
                correct=passkey_correct(cell.case, answer), kv_bytes=kv.get("bytes"),
                kv_peak_bytes=kv.get("peak_bytes"), kv_full_bytes=kv.get("full_bytes"),
                kv_footprint_byte_steps=kv.get("footprint_byte_steps"),
                kv_full_footprint_byte_steps=kv.get("full_footprint_byte_steps"),
                decode_tokens=usage["completion_tokens"] - 1, decode_seconds=None)

        return run_grid(cases, specs, run_one)
