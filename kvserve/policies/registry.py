"""Policies by name. `parse_policy` turns a request's `kv_policy` (a name or an object) into
validated parameters; errors are `PolicyError` naming the offending field."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kvserve.policies.base import Policy, PolicyParams
from kvserve.registry import Registry

_BUILTINS = ("full", "h2o", "corm", "snapkv", "streaming_llm", "knorm", "tova", "kivi", "think", "tailorkv", "keydiff",
             "expected_attention")
POLICIES: Registry[type[Policy]] = Registry("kv_policy", tuple(f"kvserve.policies.{name}" for name in _BUILTINS))
register = POLICIES.register


class PolicyError(ValueError):
    def __init__(self, message: str, param: str = "kv_policy") -> None:
        super().__init__(message)
        self.param = param


def parse_policy(spec: str | dict[str, Any] | PolicyParams | None, default: PolicyParams | None = None
                 ) -> PolicyParams:
    """Validate a policy spec: a registered name, a JSON object string, or a dict with `name`."""
    if spec is None:
        return default if default is not None else POLICIES["full"].Params()
    if isinstance(spec, PolicyParams):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise PolicyError(f"kv_policy is not valid JSON: {e.msg}") from None
        else:
            spec = {"name": text}
    if not isinstance(spec, dict):
        raise PolicyError("kv_policy must be a policy name or an object with a 'name' field")
    name = spec.get("name")
    if name not in POLICIES:
        raise PolicyError(f"unknown kv_policy name {name!r}; known policies: {', '.join(POLICIES)}",
                          "kv_policy.name")
    try:
        return POLICIES[name].Params(**spec)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(["kv_policy", *(str(p) for p in first["loc"])])
        message = first["msg"].removeprefix("Value error, ")
        raise PolicyError(f"{param}: {message}", param) from None


def create_policy(params: PolicyParams, prompt_tokens: int, context_tokens: int | None = None) -> Policy:
    return POLICIES[params.name](params, prompt_tokens, context_tokens)


def describe_policies() -> list[dict[str, Any]]:
    """Name, default parameters and JSON schema of every registered policy."""
    return [{"name": name, "defaults": cls.Params().model_dump() if _has_defaults(cls) else None,
             "schema": cls.Params.model_json_schema()} for name, cls in POLICIES.items()]


def _has_defaults(cls: type[Policy]) -> bool:
    try:
        cls.Params()
    except ValidationError:
        return False
    return True
