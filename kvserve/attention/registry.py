"""Attention backends by name (`--attention-backend`), and the one `auto` picks."""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.kernels import cpu_library
from kvserve.registry import Registry

BACKENDS: Registry[type[AttentionBackend]] = Registry(
    "attention backend", tuple(f"kvserve.attention.{module}" for module in ("torch_backend", "cpu_backend",
                                                                             "triton_backend")))
register = BACKENDS.register


def create_backend(name: str, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> AttentionBackend:
    """`auto` is triton where the pool lives on a CUDA device; on the CPU it is the compiled kernels
    where they build (float32, bfloat16), the torch references otherwise."""
    if name == "auto":
        if k_pages.is_cuda:
            name = "triton"
        else:
            name = "cpu" if cpu_library.dtype_code(k_pages) is not None else "torch"
    return BACKENDS[name](k_pages, v_pages, scale)
