"""The Llama-family forward pass (Llama, Mistral, Qwen2) over one flat batch of tokens.

Tokens from many sequences (prefill chunks and decode tokens mixed) run as one [T, hidden]
matrix through every matmul; only attention needs to know where sequences begin and end, and it
learns that from the step's `AttentionMetadata`. Logits are computed only at the rows given in
`logits_index` (the last token of each sequence that samples this step).
"""

from __future__ import annotations

import math

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.kernels import amx_linear, f32_linear
from kvserve.kernels.pointwise import rms_norm, rope_, silu_mul
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


class Projection:
    """x @ W^T for an HF [out, in] weight, plus its bias (if any) or else a residual on request.
    With `swiglu`, W is an MLP's [gate; up] and a call returns silu(x @ gate^T) * (x @ up^T).

    The weight is kept in the layout the fastest CPU kernel for its dtype reads:
    - float32, on a CPU with AVX2 + FMA, packed once at load into panels (kernels/f32_linear.py): it
      reads the weights once per decode step and keeps a row's bits whatever batch the row is in
      (torch's GEMM changes its summation order with the row count); the bias or residual and the
      SwiGLU activation run in its epilogue, so the [T, 2 * intermediate] product is never written;
    - float32 elsewhere as the transposed [in, out] copy, which MKL multiplies ~1.3x faster at 16-32
      rows than HF's layout;
    - bfloat16, on a CPU with AMX, packed once at load into AMX's tile layout (kernels/amx_linear.py):
      1.5-1.7x torch's bfloat16 GEMM at the 1-32 rows of decode steps, SwiGLU fused the same way;
    - anything else (bfloat16 without AMX, every GPU dtype) as HF's [out, in].
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False) -> None:
        self.out_features, self.in_features = weight.shape
        self.swiglu = swiglu
        self.element_size = weight.element_size()
        on_cpu = weight.device.type == "cpu"
        float32 = on_cpu and weight.dtype == torch.float32
        self.layout = ("f32_packed" if float32 and f32_linear.available()
                       else "transposed" if float32
                       else "amx" if on_cpu and weight.dtype == torch.bfloat16 and amx_linear.available()
                       else "plain")
        packer = {"f32_packed": f32_linear, "amx": amx_linear}.get(self.layout)
        self.weight = (weight.t().contiguous() if self.layout == "transposed"
                       else weight if packer is None
                       else packer.pack_gated(weight) if swiglu else packer.pack(weight))
        self.bias = bias
        # one row (batch-1 decode) of a plain CPU weight: the matrix-vector kernel reads bfloat16 ~1.35x faster
        self.one_row_mv = self.layout == "plain" and on_cpu

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out] ([T, out / 2] with swiglu); with `residual` [T, out], residual + x @ W^T
        in one pass.
        Only q/k/v have biases (Qwen2), and no residual joins them."""
        assert residual is None or (self.bias is None and not self.swiglu), "only a plain projection takes a residual"
        add = self.bias if residual is None else residual
        if self.layout == "f32_packed":
            if self.swiglu:
                return f32_linear.linear_f32(x, self.weight, self.out_features // 2, self.in_features, gated=True)
            return f32_linear.linear_f32(x, self.weight, self.out_features, self.in_features, add)
        if self.layout == "amx" and self.swiglu:
            return amx_linear.linear_bf16(x, self.weight, self.out_features // 2, self.in_features, gated=True)
        if self.layout == "amx":
            out = amx_linear.linear_bf16(x, self.weight, self.out_features, self.in_features, add)
        elif self.one_row_mv and x.shape[0] == 1:
            row = torch.mv(self.weight, x[0]) if add is None else torch.addmv(add.reshape(-1), self.weight, x[0])
            out = row[None]
        else:
            weight = self.weight if self.layout == "transposed" else self.weight.t()
            out = x @ weight if add is None else torch.addmm(add, x, weight)
        return silu_mul(out) if self.swiglu else out

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.element_size


class Layer:
    """One decoder layer's weights, with q/k/v and gate/up fused into single matmuls (the latter with
    its SwiGLU activation)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype,
                 device: torch.device) -> None:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"

        def load(*names: str) -> torch.Tensor:
            return torch.cat([weights[n] for n in names]).to(device, dtype)

        has_bias = f"{attn}.q_proj.bias" in weights
        self.qkv = Projection(load(*(f"{attn}.{p}_proj.weight" for p in "qkv")),
                              load(*(f"{attn}.{p}_proj.bias" for p in "qkv")) if has_bias else None)
        self.o = Projection(load(f"{attn}.o_proj.weight"))
        self.gate_up = Projection(load(f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), swiglu=True)
        self.down = Projection(load(f"{mlp}.down_proj.weight"))
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
        self.lm_head = Projection(self.embed if tied else head.to(device, dtype))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config))
        self.cos = angles.cos().to(device, dtype)
        self.sin = angles.sin().to(device, dtype)

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward step reads: every projection and the LM head."""
        return sum(p.nbytes for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
                   ) + self.lm_head.nbytes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, logits_index: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T]; logits_index [n] -> float32 logits [n, vocab]."""
        cfg = self.config
        tokens = input_ids.numel()
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # each token's rotary angles, gathered once for all layers
        cos, sin = self.cos[positions], self.sin[positions]
        x = self.embed[input_ids]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(h)
            rope_(qkv, cos, sin, cfg.num_heads + cfg.num_kv_heads)
            q = qkv[:, :q_width].view(tokens, cfg.num_heads, cfg.head_dim)
            k = qkv[:, q_width:q_width + kv_width].view(tokens, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, q_width + kv_width:].view(tokens, cfg.num_kv_heads, cfg.head_dim)
            attn = backend.forward(index, q, k, v, meta)
            # the residual adds ride on the matmuls (addmm), saving a pass over x each
            x = layer.o(attn.reshape(tokens, q_width), residual=x)
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = layer.down(layer.gate_up(h), residual=x)
        x = rms_norm(x[logits_index], self.norm, cfg.rms_norm_eps)
        return self.lm_head(x).float()
