"""The generic registry of swappable parts, and the attention backends' use of it."""

from __future__ import annotations

import pytest
import torch

from kvserve.attention.registry import BACKENDS, create_backend
from kvserve.registry import Registry, UnknownName


class Part:
    name = "part"


def test_registry_rejects_a_duplicate_name() -> None:
    parts: Registry[type[Part]] = Registry("part")
    assert parts.register(Part) is Part
    with pytest.raises(ValueError, match="part 'part' is already registered"):
        parts.register(type("Other", (), {"name": "part"}))
    assert parts["part"] is Part and list(parts) == parts.names() == ["part"]


def test_registry_loads_its_builtins_on_first_lookup() -> None:
    assert {"torch", "cpu", "triton"} <= set(BACKENDS.names())


def test_an_unknown_backend_name_lists_the_known_ones() -> None:
    pages = torch.zeros(2, 16, 1, 8)
    with pytest.raises(UnknownName, match=r"unknown attention backend 'nope'; known: cpu, torch, triton"):
        create_backend("nope", pages, pages, 1.0)
    assert create_backend("torch", pages, pages, 1.0).name == "torch"
