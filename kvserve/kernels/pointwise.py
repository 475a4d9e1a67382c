"""The decoder layer's pointwise steps: RMSNorm, rotary embedding, SiLU-and-multiply.

Shapes (T tokens, W row width, D head_dim):
    rms_norm(x [T, W], weight [W], eps) -> [T, W]      HF Llama's: weight * to_dtype(x * rsqrt(mean(x^2) + eps))
    silu_mul(gate_up [T, 2I]) -> [T, I]                silu(gate) * up, gate the first half of each row
    rope_(x [T, >= heads * D], cos, sin [T, D / 2], heads)
                                                       in place: HF's rotate-half RoPE on the first `heads` heads,
                                                       token t at the angles of row t (gathered once per step)

The `_ref` functions are the torch references (every device); the others run the compiled CPU kernels
(kernels/csrc/pointwise.cpp) on CPU float32/bfloat16 tensors, one pass over the rows each, and fall
back to the references elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.kernels import cpu_library


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_ref_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    half = cos.shape[-1]
    rotated = x[:, :heads * 2 * half].view(x.shape[0], heads, 2 * half)
    x1, x2 = rotated[..., :half], rotated[..., half:]
    cos, sin = cos[:, None], sin[:, None]
    rotated.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    code = cpu_library.dtype_code(x, weight)
    if code is None or x.dim() != 2 or x.stride(-1) != 1:
        return rms_norm_ref(x, weight, eps)
    rows, width = x.shape
    out = torch.empty(rows, width, dtype=x.dtype)
    cpu_library.library().kv_rms_norm(code, x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows,
                                      width, eps, cpu_library.threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    code = cpu_library.dtype_code(gate_up)
    if code is None or gate_up.dim() != 2 or not gate_up.is_contiguous():
        return silu_mul_ref(gate_up)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    cpu_library.library().kv_silu_mul(code, gate_up.data_ptr(), out.data_ptr(), rows, width,
                                      cpu_library.threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    code = cpu_library.dtype_code(x, cos, sin)
    if code is None or x.dim() != 2 or x.stride(-1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        rope_ref_(x, cos, sin, heads)
        return
    cpu_library.library().kv_rope(code, x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), x.shape[0], heads,
                                  cos.shape[-1] * 2, cpu_library.threads())
