"""`full`: keep every token at full precision (the baseline every other policy is measured against)."""

from __future__ import annotations

from typing import Literal

from kvserve.policies.base import Policy, PolicyParams
from kvserve.policies.registry import register


class FullParams(PolicyParams):
    name: Literal["full"] = "full"


@register
class FullPolicy(Policy):
    name = "full"
    Params = FullParams
