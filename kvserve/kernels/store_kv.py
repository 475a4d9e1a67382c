"""store_kv: write the step's new K/V rows into their page slots.

Shapes:
    k, v:        [T, Hkv, D]          new keys (after RoPE) and values of the T tokens of this step
    k_pages:     [num_pages, block_size, D]   the pool (v_pages likewise); page 0 is the null page
    slot_index:  [T, Hkv] int64       flat destination page * block_size + offset, per token and head

`store_kv_ref` is the torch reference, `store_kv_cpu` the compiled CPU kernel
(kernels/csrc/store_kv.cpp), `store_kv` the Triton version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels import cpu_library


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 slot_index: torch.Tensor) -> None:
    dim = k_pages.shape[-1]
    flat = slot_index.reshape(-1)
    k_pages.view(-1, dim).index_copy_(0, flat, k.reshape(-1, dim).to(k_pages.dtype))
    v_pages.view(-1, dim).index_copy_(0, flat, v.reshape(-1, dim).to(v_pages.dtype))


def store_kv_cpu(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 slot_index: torch.Tensor) -> None:
    """`store_kv_ref` by the compiled kernel, which copies each row straight from the qkv
    projection's output instead of first gathering k and v into contiguous copies."""
    tokens, kv_heads, dim = k.shape
    code = cpu_library.dtype_code(k, v, k_pages, v_pages)
    if (code is None or k.stride()[1:] != (dim, 1) or v.stride()[1:] != (dim, 1)
            or not (k_pages.is_contiguous() and v_pages.is_contiguous())):
        store_kv_ref(k, v, k_pages, v_pages, slot_index)
        return
    slots = slot_index.to(torch.int64).contiguous()
    cpu_library.library().kv_store_kv(code, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_pages.data_ptr(),
                                      v_pages.data_ptr(), slots.data_ptr(), tokens, kv_heads, dim,
                                      cpu_library.threads())


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kp_page, stride_kp_slot, stride_kp_d,
    stride_vp_page, stride_vp_slot, stride_vp_d,
    stride_st, stride_sh,
    kv_heads, dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: copies its [Hkv, D] key and value rows to their slots."""
    token = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < kv_heads)[:, None] & (dims < dim)[None, :]

    slot = tl.load(slot_ptr + token * stride_st + heads * stride_sh, mask=heads < kv_heads, other=0)
    page = slot // block_size
    offset = slot % block_size

    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask)
    k_dst = k_pages_ptr + page[:, None] * stride_kp_page + offset[:, None] * stride_kp_slot
    tl.store(k_dst + dims[None, :] * stride_kp_d, k.to(k_pages_ptr.dtype.element_ty), mask=mask)

    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask)
    v_dst = v_pages_ptr + page[:, None] * stride_vp_page + offset[:, None] * stride_vp_slot
    tl.store(v_dst + dims[None, :] * stride_vp_d, v.to(v_pages_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
             slot_index: torch.Tensor) -> None:
    """Triton `store_kv_ref`: same shapes; k, v and slot_index may be strided views."""
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_pages, v_pages, slot_index,
        *k.stride(), *v.stride(), *k_pages.stride(), *v_pages.stride(), *slot_index.stride(),
        kv_heads, dim, k_pages.shape[1],
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(dim),
    )
