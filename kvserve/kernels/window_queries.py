"""The query observation: each prefill row's last queries of its chunk, for the policies that
score keys from queries themselves (CORM's minor keys, ThinK's channel energy).

Shapes (T prefill tokens of Bp rows, row by row; Hq query heads, D head_dim):
    q               [T, Hq, D] (after RoPE)
    query_start_loc [Bp + 1] int64, offsets of each row's tokens in q
    windows         [Bp] int, queries observed per row (capped at the row's chunk; 0 for none)
returns [Bp, W, Hq, D] float32, W = the largest capped window: each row's observed queries
right-aligned (its chunk's last query at W - 1), zeros before them.

The torch gather is the only implementation, for every backend: it copies W queries per row.
"""

from __future__ import annotations

import torch


def window_queries(q: torch.Tensor, query_start_loc: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    ends = query_start_loc[1:]
    width = torch.minimum(windows.to(ends.device), ends - query_start_loc[:-1])
    span = int(width.max())
    offset = torch.arange(-span, 0, device=q.device)
    index = (ends[:, None] + offset).clamp(min=0)
    observed = offset >= -width[:, None]
    return q[index].float() * observed[..., None, None]
