"""KIVI-style quantization and the byte layout of its page records (the cache writes them,
kernels/quant_decode.py reads them).

Keys are quantized per channel over groups of `group_size` consecutive tokens, values per token
over groups of `channel_group` channels; both asymmetric min/max with `bits` in {1, 2, 4, 8},
codes packed 8 // bits to a byte (channel c of a token in byte c // (8 // bits), bits
(c % (8 // bits)) * bits upwards). Scales and minimums are float16, rounded before the codes are
taken so that de-quantizing (code * scale + min) errs by at most half a step.

Records (`QuantLayout`), one list per (sequence, layer, KV head):
    token record (one per token):   key codes [D*bits/8] u8 | value codes [D*bits/8] u8 |
                                    value scales [D/channel_group] f16 | value mins [D/channel_group] f16
    group record (one per `group_size` tokens): key scales [D] f16 | key mins [D] f16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kernels.records import field

SCALE_DTYPE = torch.float16


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of groups reduced along `dim`: (codes uint8, scale, min),
    the last two float16 with `dim` kept as size 1."""
    x = x.float()
    low = x.amin(dim, keepdim=True).to(SCALE_DTYPE)
    high = x.amax(dim, keepdim=True)
    step = ((high - low.float()) / (2 ** bits - 1)).to(SCALE_DTYPE)
    safe = torch.where(step > 0, step.float(), 1.0)
    codes = ((x - low.float()) / safe).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return codes, step, low


def dequantize(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return codes.float() * step.float() + low.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] codes < 2**bits -> [..., n * bits / 8] uint8."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: [..., m] uint8 -> [..., m * 8 / bits] uint8 codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)


@dataclass(frozen=True)
class QuantLayout:
    bits: int
    group_size: int  # tokens per key group
    head_dim: int

    def __post_init__(self) -> None:
        if self.bits not in (1, 2, 4, 8):
            raise ValueError("bits must be 1, 2, 4 or 8")
        if self.head_dim * self.bits % 16:
            raise ValueError("head_dim * bits must be a multiple of 16")
        if self.head_dim % self.channel_group:
            raise ValueError("head_dim must be a multiple of group_size (or smaller than it)")

    @property
    def channel_group(self) -> int:
        """Channels sharing one value scale (group_size, capped at head_dim)."""
        return min(self.group_size, self.head_dim)

    @property
    def code_bytes(self) -> int:
        return self.head_dim * self.bits // 8

    @property
    def value_groups(self) -> int:
        return self.head_dim // self.channel_group

    @property
    def token_bytes(self) -> int:
        return 2 * self.code_bytes + 4 * self.value_groups

    @property
    def group_bytes(self) -> int:
        return 4 * self.head_dim

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [M, group_size, D] (M whole groups) -> token records [M * group_size,
        token_bytes] and group records [M, group_bytes], uint8."""
        m, g, d = keys.shape
        k_codes, k_step, k_low = quantize(keys, self.bits, dim=1)  # per channel over the group
        grouped = values.reshape(m * g, self.value_groups, self.channel_group)
        v_codes, v_step, v_low = quantize(grouped, self.bits, dim=2)  # per token over channel groups
        as_bytes = lambda t: t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)
        tokens = torch.cat([pack(k_codes.reshape(m * g, d), self.bits), pack(v_codes.reshape(m * g, d), self.bits),
                            as_bytes(v_step.reshape(m * g, -1)), as_bytes(v_low.reshape(m * g, -1))], dim=1)
        groups = torch.cat([as_bytes(k_step.reshape(m, d)), as_bytes(k_low.reshape(m, d))], dim=1)
        return tokens, groups

    def decode(self, tokens: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token records [..., S, token_bytes], group records [..., S / group_size, group_bytes]
        -> de-quantized keys and values [..., S, D] float32."""
        d, cb, vg, g = self.head_dim, self.code_bytes, self.value_groups, self.group_size
        lead, slots = tokens.shape[:-2], tokens.shape[-2]
        # broadcast the scales over their groups instead of repeating them
        k_codes = unpack(tokens[..., :cb], self.bits).view(*lead, slots // g, g, d)
        k_step = field(groups, 0, d, SCALE_DTYPE)[..., None, :]
        k_low = field(groups, 2 * d, d, SCALE_DTYPE)[..., None, :]
        keys = dequantize(k_codes, k_step, k_low).view(*lead, slots, d)
        v_codes = unpack(tokens[..., cb:2 * cb], self.bits).view(*lead, slots, vg, self.channel_group)
        v_step = field(tokens, 2 * cb, vg, SCALE_DTYPE)[..., None]
        v_low = field(tokens, 2 * cb + 2 * vg, vg, SCALE_DTYPE)[..., None]
        values = dequantize(v_codes, v_step, v_low).view(*lead, slots, d)
        return keys, values
