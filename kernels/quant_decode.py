"""KIVI-style quantized KV: the quantizer, the page records, and decode attention over them.

Keys are quantized per channel over groups of `group_size` consecutive tokens, values per token
over groups of `channel_group` channels; both asymmetric min/max with `bits` in {1, 2, 4, 8},
codes packed 8 // bits to a byte (channel c of a token in byte c // (8 // bits), bits
(c % (8 // bits)) * bits upwards). Scales and minimums are float16, rounded before the codes are
taken so that de-quantizing (code * scale + min) errs by at most half a step.

Records (`QuantLayout`), one list per (sequence, layer, KV head):
    token record (one per token):   key codes [D*bits/8] u8 | value codes [D*bits/8] u8 |
                                    value scales [D/channel_group] f16 | value mins [D/channel_group] f16
    group record (one per `group_size` tokens): key scales [D] f16 | key mins [D] f16

Decode attention shapes (B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim):
    q                   [B, Hq, D]
    token_view          [2N, per_half, token_bytes] uint8   (PagePool.records), group_view likewise
    token_tables        [B, Hkv, Pt] int32, group_tables [B, Hkv, Pg] int32
    lens                [B, Hkv] int32, quantized tokens per head (a multiple of group_size; may be 0)
returns out [B, Hq, D] (zero where a head holds none) and lse [B, Hq] float32 (-inf there), to be
merged with the attention over the full-precision residual (`merge_attention`).

`quant_decode_ref` is the torch reference (the CPU path), `quant_decode` the Triton kernel, which
de-quantizes tile by tile in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvserve.kernels.records import field, list_addresses, read_records
from kvserve.kernels.tile_attention import LOG2E, record_offset, softmax_tile, store_partial

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


def attend_dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] over keys, values [B, Hkv, S, D] (slots < lens [B, Hkv] valid) -> out [B, Hq, D],
    lse [B, Hq] float32; a head with no slots gives out 0 and lse -inf."""
    batch, q_heads, dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    logits = torch.matmul((q.float() * scale).view(batch, kv_heads, group, dim), keys.float().transpose(-1, -2))
    outside = torch.arange(slots, device=q.device) >= lens[..., None]
    logits.masked_fill_(outside[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = (logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp()
    # slots past a head's length may hold another format's bytes: never let them reach the sum
    values = values.float().masked_fill(outside[..., None], 0.0)
    out = torch.matmul(probs, values).view(batch, q_heads, values.shape[-1])
    return out.to(q.dtype), lse.view(batch, q_heads)


def quant_decode_ref(q: torch.Tensor, token_view: torch.Tensor, token_tables: torch.Tensor,
                     group_view: torch.Tensor, group_tables: torch.Tensor, lens: torch.Tensor,
                     layout: QuantLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_pages = token_view.shape[0] // 2
    slots = max(layout.group_size, -(-int(lens.max()) // layout.group_size) * layout.group_size)
    tokens = read_records(token_view, list_addresses(token_tables, slots, token_view.shape[1], num_pages))
    groups = read_records(group_view, list_addresses(group_tables, slots // layout.group_size,
                                                     group_view.shape[1], num_pages))
    keys, values = layout.decode(tokens, groups)
    return attend_dense(q, keys, values, lens, scale)


@triton.jit
def _quant_decode_kernel(
    q_ptr, pool_u8_ptr, pool_f16_ptr, token_tables_ptr, group_tables_ptr, lens_ptr, out_ptr, lse_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_ttb, stride_tth, stride_ttp,
    stride_gtb, stride_gth, stride_gtp,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    stride_lseb, stride_lseh,
    group, num_pages, half_bytes, token_per_half, group_per_half, token_bytes,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CHANNEL_GROUP: tl.constexpr, DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Program (b, kv_head): the group's query heads over the head's quantized tokens, one key
    group (GROUP_SIZE tokens) per iteration, de-quantized in registers."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b * stride_lb + kv_head * stride_lh)
    group_idx = tl.arange(0, BLOCK_G)
    head_mask = group_idx < group
    heads = kv_head * group + group_idx
    dims = tl.arange(0, DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_mask[:, None], other=0.0).to(tl.float32)
    token_table = token_tables_ptr + b * stride_ttb + kv_head * stride_tth
    group_table = group_tables_ptr + b * stride_gtb + kv_head * stride_gth

    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_BYTES: tl.constexpr = DIM * BITS // 8
    VALUE_GROUPS: tl.constexpr = DIM // CHANNEL_GROUP
    byte_of_channel = dims // PER_BYTE
    shift = ((dims % PER_BYTE) * BITS).to(tl.uint8)
    code_mask = (1 << BITS) - 1
    tokens = tl.arange(0, GROUP_SIZE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DIM], tl.float32)
    for start in range(0, seq_len, GROUP_SIZE):
        group_off = record_offset(group_table, start // GROUP_SIZE, group_per_half, half_bytes, 4 * DIM,
                                   num_pages, stride_gtp)
        k_step = tl.load(pool_f16_ptr + group_off // 2 + dims).to(tl.float32)
        k_low = tl.load(pool_f16_ptr + group_off // 2 + DIM + dims).to(tl.float32)
        token_off = record_offset(token_table, start + tokens, token_per_half, half_bytes, token_bytes,
                                   num_pages, stride_ttp)
        k_bytes = tl.load(pool_u8_ptr + token_off[:, None] + byte_of_channel[None, :])
        keys = ((k_bytes >> shift[None, :]) & code_mask).to(tl.float32) * k_step[None, :] + k_low[None, :]
        v_bytes = tl.load(pool_u8_ptr + token_off[:, None] + CODE_BYTES + byte_of_channel[None, :])
        v_group = (dims // CHANNEL_GROUP)[None, :]
        scales = pool_f16_ptr + (token_off[:, None] + 2 * CODE_BYTES) // 2
        v_step = tl.load(scales + v_group).to(tl.float32)
        v_low = tl.load(scales + VALUE_GROUPS + v_group).to(tl.float32)
        values = ((v_bytes >> shift[None, :]) & code_mask).to(tl.float32) * v_step + v_low

        s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale_log2
        m_i, l_i, acc = softmax_tile(s, values, m_i, l_i, acc)

    store_partial(out_ptr, lse_ptr, b, heads, head_mask, dims, m_i, l_i, acc,
                  stride_ob, stride_oh, stride_od, stride_lseb, stride_lseh)


def quant_decode(q: torch.Tensor, token_view: torch.Tensor, token_tables: torch.Tensor,
                 group_view: torch.Tensor, group_tables: torch.Tensor, lens: torch.Tensor,
                 layout: QuantLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quant_decode_ref`: same shapes and contract. token_view and group_view must be
    `PagePool.records` views of one pool (the kernel addresses the pool's bytes directly)."""
    batch, q_heads, dim = q.shape
    kv_heads = token_tables.shape[1]
    group = q_heads // kv_heads
    if dim & (dim - 1) or layout.group_size & (layout.group_size - 1) or layout.group_size < 16:
        raise ValueError("the Triton kernel needs a power-of-two head_dim and group_size >= 16")
    pool_u8 = torch.as_strided(token_view, (token_view.shape[0] * token_view.stride(0),), (1,))
    out = torch.empty(batch, q_heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=q.device)
    _quant_decode_kernel[(batch, kv_heads)](
        q, pool_u8, pool_u8.view(torch.float16), token_tables, group_tables, lens, out, lse,
        scale * LOG2E.value,
        *q.stride(), *token_tables.stride(), *group_tables.stride(), *lens.stride(), *out.stride(),
        *lse.stride(),
        group, token_view.shape[0] // 2, token_view.stride(0), token_view.shape[1], group_view.shape[1],
        layout.token_bytes,
        BITS=layout.bits, GROUP_SIZE=layout.group_size, CHANNEL_GROUP=layout.channel_group, DIM=dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
    )
    return out, lse
