"""float32 projections on AVX2 + FMA (or AVX-512), over weights packed once at load into panels.

Shapes (V: the floats in one of the build's vectors, 8 with AVX2, 16 with AVX-512; P = 2V):
    pack(weight [N, K]) -> packed [round_up(N, P) * K]                 once, at load
        panel p (P outputs) holds W[p P + j, i] at (p K + i) P + j: one contiguous stream over K
    linear_f32(x [M, K], packed, N, K, add) -> [M, N]                   x @ W^T + add
        add: None, a bias [N], or a residual [M, N]
    pack_gated(weight [2I, K]) -> packed [round_up(I, V) * 2 * K]
        panel p holds the gate rows of outputs p V .. p V + V - 1, then the up rows of the same outputs
    linear_f32(x [M, K], packed, I, K, gated=True) -> [M, I]            silu(x @ gate^T) * (x @ up^T)
        for a SwiGLU weight [gate; up]: the activation runs in the kernel's epilogue, so the [M, 2I]
        product is never written and read back

`linear_f32_ref` is the torch reference; `linear_f32` runs the compiled kernel
(kernels/csrc/f32_linear.cpp), which reads the packed weights once per call at the 1-32 rows of
decode steps. Each output is one chain of FMAs over K in order, so a row's bits do not depend on
the batch it is in nor on the thread count (torch's GEMM changes its summation order with the
shape). `available()` says whether this build has the kernel's vector path; nothing else here may
run before it has said True.
"""

from __future__ import annotations

import functools

import torch

from kvserve.kernels import cpu_library


def linear_f32_ref(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    out = x @ weight.t()
    return out if add is None else out + add


@functools.cache
def available() -> bool:
    """The library built with AVX2 + FMA or AVX-512: its scalar fallback (other CPUs) is correct but
    slower than torch's GEMM, which the callers then keep."""
    lib = cpu_library.library()
    return lib is not None and lib.kv_f32_lanes() >= 8


def _pack(weight: torch.Tensor, gated: bool) -> torch.Tensor:
    n, k = weight.shape
    weight = weight.contiguous()
    lib = cpu_library.library()
    packed = torch.empty(lib.kv_f32_packed_floats(n, k, int(gated)), dtype=torch.float32)
    lib.kv_f32_pack(weight.data_ptr(), n, k, int(gated), packed.data_ptr(), cpu_library.threads())
    return packed


def pack(weight: torch.Tensor) -> torch.Tensor:
    return _pack(weight, gated=False)


def pack_gated(weight: torch.Tensor) -> torch.Tensor:
    """[gate; up] [2I, K], each panel's gate outputs beside the same outputs of up."""
    return _pack(weight, gated=True)


def linear_f32(x: torch.Tensor, packed: torch.Tensor, n: int, k: int,
               add: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    assert not (gated and add is not None), "a gated projection adds nothing"
    rows = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # a bias [N] is read with row stride 0, a residual [M, N] through its own row stride
    if add is not None and add.stride(-1) != 1:
        add = add.contiguous()
    add_stride = 0 if add is None or add.dim() == 1 else add.stride(0)
    out = torch.empty(rows, n, dtype=torch.float32)
    cpu_library.library().kv_f32_linear(x.data_ptr(), x.stride(0), rows, packed.data_ptr(), n, k,
                                        None if add is None else add.data_ptr(), add_stride, int(gated),
                                        out.data_ptr(), cpu_library.threads())
    return out
