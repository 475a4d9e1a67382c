"""TailorKV's sparse decode: attend only the tokens an approximate score ranks highest.

Per (sequence, KV head): the group-mean query q̄ picks the `channels` key channels where
|q̄| * max_j |K_j| is largest; the partial product q̄·K on those channels ranks the held tokens;
the top `select` of them are gathered and attended with the full queries.

Shapes (B sequences, Hq query heads, Hkv KV heads, D head_dim):
    q               [B, Hq, D]
    key_max         [B, Hkv, D]      max |K| per channel over the head's tokens
    key_view        [2N, per_half, D * itemsize] uint8 (PagePool.records), value_view likewise
    key_tables      [B, Hkv, Pk] int32, value_tables [B, Hkv, Pv] int32
    lens            [B, Hkv] int32, tokens held (may be 0)
    select          [B] int, tokens attended per head; channels [B] int, channels scored
returns out [B, Hq, D] and lse [B, Hq] (-inf where a head holds none), for `merge_attention`.

`sparse_decode_ref` is the torch reference; `sparse_decode_cpu` runs the compiled kernel
(kernels/csrc/sparse_decode.cpp), which scores the key records where they lie and attends the chosen
tokens like paged decode. The tokens live in host memory, so a GPU backend runs it too.
"""

from __future__ import annotations

import ctypes

import torch

from kvserve.kernels import cpu_library
from kvserve.kernels.quant_decode import attend_dense
from kvserve.kernels.records import list_addresses, read_records


def sparse_decode_ref(q: torch.Tensor, key_max: torch.Tensor, key_view: torch.Tensor, key_tables: torch.Tensor,
                      value_view: torch.Tensor, value_tables: torch.Tensor, lens: torch.Tensor,
                      select: torch.Tensor, channels: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, dim = q.shape
    kv_heads = key_tables.shape[1]
    num_pages = key_view.shape[0] // 2
    slots = max(1, int(lens.max()))
    keys = read_records(key_view, list_addresses(key_tables, slots, key_view.shape[1], num_pages)).view(q.dtype)
    q_mean = q.float().view(batch, kv_heads, -1, dim).mean(2)
    # zero the query outside each row's top channels, so the partial product uses only those
    rank = (q_mean.abs() * key_max.float()).argsort(-1, descending=True).argsort(-1)
    q_partial = q_mean * (rank < channels.view(-1, 1, 1))
    approx = torch.matmul(keys.float(), q_partial[..., None])[..., 0]  # [B, Hkv, S]
    approx.masked_fill_(torch.arange(slots) >= lens[..., None], float("-inf"))
    take = min(slots, int(select.max()))
    chosen = approx.topk(take, dim=-1).indices  # [B, Hkv, take]
    counts = torch.minimum(lens.long(), select.view(-1, 1).long())
    index = chosen[..., None].expand(-1, -1, -1, dim)
    picked_keys = keys.gather(2, index)
    values = read_records(value_view, list_addresses(value_tables, slots, value_view.shape[1], num_pages))
    picked_values = values.view(q.dtype).gather(2, index)
    return attend_dense(q, picked_keys, picked_values, counts, scale)


def sparse_decode_cpu(q: torch.Tensor, key_max: torch.Tensor, key_view: torch.Tensor, key_tables: torch.Tensor,
                      value_view: torch.Tensor, value_tables: torch.Tensor, lens: torch.Tensor,
                      select: torch.Tensor, channels: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_ref`'s contract by the compiled kernel; the reference where the kernels cannot take
    q's dtype or find no compiler."""
    code = cpu_library.dtype_code(q)
    if code is None or not key_view.is_cpu:
        return sparse_decode_ref(q, key_max, key_view, key_tables, value_view, value_tables, lens, select, channels,
                                 scale)
    batch, q_heads, dim = q.shape
    q, lens, out, lse = cpu_library.decode_io(q, lens)
    key_max = key_max.float().contiguous()
    select, channels = (t.to(torch.int64).contiguous() for t in (select, channels))
    keys, key_tables = cpu_library.record_tables(key_view, key_tables)
    values, value_tables = cpu_library.record_tables(value_view, value_tables)
    cpu_library.library().kv_sparse_decode(
        code, q.data_ptr(), q.stride(0), key_max.data_ptr(), ctypes.byref(keys), ctypes.byref(values),
        lens.data_ptr(), lens.stride(0), lens.stride(1), select.data_ptr(), channels.data_ptr(), batch, q_heads,
        key_tables.shape[1], dim, scale, out.data_ptr(), lse.data_ptr(), cpu_library.threads())
    return out, lse
