"""The `kv_policy` objects a run sends, as given on the command line, and their short labels.

The server validates them (kvserve answers a bad one with a 400 naming the field), so nothing is
checked here beyond the shape; kvserve's own label helper lives beside its validator, which needs
torch, and this package must not."""

from __future__ import annotations

import json
from typing import Any


def parse_policy(text: str) -> dict[str, Any]:
    """A JSON object (`{"name": "h2o", "ratio": 0.25}`) or a bare name (`full`)."""
    text = text.strip()
    if not text.startswith("{"):
        return {"name": text}
    spec = json.loads(text)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a policy must be a JSON object with a string `name`, got {text!r}")
    return spec


def policy_label(spec: dict[str, Any] | None) -> str:
    """`full`, `h2o ratio=0.25`, `kivi bits=2`; `default` for requests that name no policy."""
    if spec is None:
        return "default"
    params = " ".join(f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"
                      for key, value in spec.items() if key != "name")
    return f"{spec['name']} {params}".strip()
