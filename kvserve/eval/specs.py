"""The policies an evaluation compares: a JSON list of policy objects, or the shorthand
`full,h2o:0.5,corm:window=32:recent=32` (a bare number after the name is the `ratio`)."""

from __future__ import annotations

import json
from typing import Any

from kvserve.policies.registry import parse_policy


def parse_policy_list(text: str) -> list[dict[str, Any]]:
    """Policy objects, each validated by its policy's own parameters (a bad one raises PolicyError)."""
    text = text.strip()
    if text.startswith("["):
        specs = json.loads(text)
        if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
            raise ValueError("--policies as JSON must be a list of policy objects")
    else:
        specs = [_shorthand(item) for item in text.split(",") if item.strip()]
    if not specs:
        raise ValueError("no policies given")
    for spec in specs:
        parse_policy(spec)
    labels = [policy_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a policy is listed twice: {labels}")
    return specs


def _shorthand(item: str) -> dict[str, Any]:
    name, *parts = item.strip().split(":")
    spec: dict[str, Any] = {"name": name}
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            spec[key] = _value(value)
        else:
            spec["ratio"] = float(part)
    return spec


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def policy_label(spec: dict[str, Any]) -> str:
    """A short unique name: `h2o:0.5`, `corm:window=32:recent=32`, `snapkv:budget=512`."""
    parts = [str(spec["name"])]
    if "ratio" in spec:
        parts.append(f"{spec['ratio']:g}")
    parts += [f"{k}={v}" for k, v in spec.items() if k not in ("name", "ratio")]
    return ":".join(parts)
