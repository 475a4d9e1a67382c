"""The decoder layer's pointwise steps: RMSNorm, rotary embedding, SiLU-and-multiply.

Shapes (T tokens, W row width, D head_dim):
    rms_norm(x [T, W], weight [W], eps) -> [T, W]      HF Llama's: weight * to_dtype(x * rsqrt(mean(x^2) + eps))
    silu_mul(gate_up [T, 2I]) -> [T, I]                silu(gate) * up, gate the first half of each row
    rope_(x [T, >= heads * D], positions [T] int64, cos, sin [max_position, D / 2], heads)
                                                       in place: HF's rotate-half RoPE on the first `heads` heads

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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, 1, D/2] -> the rotated copy (the rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_ref_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    dim = cos.shape[-1] * 2
    rotated = x[:, :heads * dim].view(x.shape[0], heads, dim)
    rotated.copy_(rotate(rotated, cos[positions][:, None], sin[positions][:, None]))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    code = _compiled_dtype(x, weight)
    if code is None or x.dim() != 2 or x.stride(-1) != 1:
        return rms_norm_ref(x, weight, eps)
    rows, width = x.shape
    out = torch.empty(rows, width, dtype=x.dtype)
    cpu_library.library().kv_rms_norm(code, x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows,
                                      width, eps, cpu_library.threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    code = _compiled_dtype(gate_up, gate_up)
    if code is None or gate_up.dim() != 2 or not gate_up.is_contiguous():
        return silu_mul_ref(gate_up)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    cpu_library.library().kv_silu_mul(code, gate_up.data_ptr(), out.data_ptr(), rows, width,
                                      cpu_library.threads())
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    code = _compiled_dtype(x, cos)
    if code is None or sin.dtype != x.dtype or x.dim() != 2 or x.stride(-1) != 1 or not (
            cos.is_contiguous() and sin.is_contiguous()):
        rope_ref_(x, positions, cos, sin, heads)
        return
    positions = positions.to(torch.int64).contiguous()
    cpu_library.library().kv_rope(code, x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(),
                                  sin.data_ptr(), x.shape[0], heads, cos.shape[-1] * 2, cpu_library.threads())


def _compiled_dtype(x: torch.Tensor, other: torch.Tensor) -> int | None:
    """The compiled kernels' dtype code for x and a second operand of the same dtype, or None where
    they cannot run (a GPU tensor, another dtype, no compiler). Called per layer: kept cheap."""
    if x.device.type != "cpu" or other.dtype is not x.dtype or not cpu_library.available():
        return None
    return cpu_library.DTYPE_CODES.get(x.dtype)
