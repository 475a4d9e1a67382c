"""ThinK's query observation: the mean of q**2 per channel over a prefill chunk's last queries.

Shapes (T prefill tokens of Bp rows, row by row; Hq query heads, D head_dim):
    q               [T, Hq, D]
    query_start_loc [Bp + 1] int64, offsets of each row's tokens in q
    windows         [Bp] int, queries observed per row (capped at the row's chunk; 0 for none)
returns [Bp, Hq, D] float32 (zero for a row that observes none).

The torch computation is the only implementation, for every backend: it reads the chunk's
queries once per layer, next to the attention that reads them many times.
"""

from __future__ import annotations

import torch


def query_energy(q: torch.Tensor, query_start_loc: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    ends = query_start_loc[1:]
    width = torch.minimum(windows.to(ends.device), ends - query_start_loc[:-1])
    token = torch.arange(q.shape[0], device=q.device)
    row = torch.searchsorted(ends, token, right=True)
    observed = token >= (ends - width)[row]
    energy = torch.zeros(ends.numel(), *q.shape[1:], dtype=torch.float32, device=q.device)
    energy.index_add_(0, row[observed], q[observed].float().pow(2))
    return energy / width.clamp(min=1).view(-1, 1, 1)
