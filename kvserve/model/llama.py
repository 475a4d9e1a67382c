"""The Llama-family forward pass (Llama, Mistral, Qwen2) over one flat batch of tokens.

Tokens from many sequences (prefill chunks and decode tokens mixed) run as one [T, hidden]
matrix through every matmul; only attention needs to know where sequences begin and end, and it
learns that from the step's `AttentionMetadata`. Logits are computed only at the rows given in
`logits_index` (the last token of each sequence that samples this step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend, AttentionMetadata
from kvserve.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= original / low) & (wavelen >= original / high)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"rope scaling {kind!r} is not supported")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, 1, D/2] (the rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def projection(weight: torch.Tensor) -> torch.Tensor:
    """An HF [out, in] weight as the [in, out] matrix `x @ w` multiplies by."""
    return weight.t().contiguous()


class Layer:
    """One decoder layer's weights, with q/k/v and gate/up fused into single matmuls."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype,
                 device: torch.device) -> None:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"

        def load(*names: str) -> torch.Tensor:
            return torch.cat([weights[n] for n in names]).to(device, dtype)

        # projections are stored transposed, [in, out]: x @ w streams the weights in the order a
        # one-row (decode) product reads them, measurably faster on a CPU than F.linear's [out, in]
        self.qkv = projection(load(*(f"{attn}.{p}_proj.weight" for p in "qkv")))
        has_bias = f"{attn}.q_proj.bias" in weights
        self.qkv_bias = load(*(f"{attn}.{p}_proj.bias" for p in "qkv")) if has_bias else None
        self.o = projection(load(f"{attn}.o_proj.weight"))
        self.gate_up = projection(load(f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"))
        self.down = projection(load(f"{mlp}.down_proj.weight"))
        self.input_norm = load(f"{prefix}.input_layernorm.weight")
        self.post_norm = load(f"{prefix}.post_attention_layernorm.weight")


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = weights["model.embed_tokens.weight"].to(device, dtype)
        self.layers = [Layer(weights, f"model.layers.{i}", dtype, self.device) for i in range(config.num_layers)]
        self.norm = weights["model.norm.weight"].to(device, dtype)
        head = weights.get("lm_head.weight")
        tied = config.tie_word_embeddings or head is None
        self.lm_head = projection(self.embed if tied else head.to(device, dtype))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config))
        self.cos = angles.cos().to(device, dtype)
        self.sin = angles.sin().to(device, dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, logits_index: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T]; logits_index [n] -> float32 logits [n, vocab]."""
        cfg = self.config
        tokens = input_ids.numel()
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        x = self.embed[input_ids]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = h @ layer.qkv if layer.qkv_bias is None else torch.addmm(layer.qkv_bias, h, layer.qkv)
            qk = apply_rope(qkv[:, :q_width + kv_width].view(tokens, -1, cfg.head_dim), cos, sin)
            q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
            v = qkv[:, q_width + kv_width:].view(tokens, cfg.num_kv_heads, cfg.head_dim)
            attn = backend.forward(index, q, k, v, meta)
            x = x + attn.reshape(tokens, q_width) @ layer.o
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gate, up = (h @ layer.gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down
        x = rms_norm(x[logits_index], self.norm, cfg.rms_norm_eps)
        return (x @ self.lm_head).float()
