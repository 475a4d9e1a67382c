"""The attention backend interface and the per-step metadata every backend reads.

A step runs one flat batch of T tokens from B sequences: decode tokens (one new token for a
sequence) and prefill chunks (several). The model runner builds `AttentionMetadata` once per step;
each layer then calls `backend.forward(layer, q, k, v, meta)`, which stores the new K/V in the
pages and attends. Sequences with exactly one new token take the decode path, the others the
prefill path; both see the same thing: every slot a head holds, minus the chunk's own future.

Observations (what compression policies ask for) are computed only when the metadata asks:
- `observe_decode`: for decode rows, per slot, the probability summed and maxed over the query
  heads of each KV group -> `decode_scores[layer] = (sum, max)`, each [Bd, Hkv, S] float32;
- `prefill_windows` ([Bp] ints, 0 for none): for each prefill row, the probabilities of its last
  `prefill_windows[row]` queries of the chunk, summed over them and over the group
  -> `window_scores[layer]`, [Bp, Hkv, S] float32.
- `query_windows` ([Bp] ints, 0 for none): for each prefill row, the mean over its chunk's last
  `query_windows[row]` queries of q**2 per channel -> `query_energy[layer]`, [Bp, Hq, D] float32
  (ThinK's channel score).
S = P * block_size; entries at or beyond a head's length are zero.

Decode rows of sequences that hold compressed tiers (`tier_views`) attend their full-precision
pages and every tier, merged by log-sum-exp; observations cover the full-precision pages only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from kvserve.cache.tier import TierView
from kvserve.kernels.paged_decode import merge_attention


@dataclass
class AttentionMetadata:
    block_tables: torch.Tensor  # [B, L, Hkv, P] int32, P = pages of the longest head in the batch
    seq_lens: torch.Tensor  # [B, L, Hkv] int32, tokens held per head after this step's append
    slot_index: torch.Tensor  # [L, T, Hkv] int64, flat page * block_size + offset of each new token
    decode_rows: torch.Tensor  # [Bd] int64, batch rows with one new token
    decode_tokens: torch.Tensor  # [Bd] int64, their token index in the flat batch
    prefill_rows: torch.Tensor  # [Bp] int64, batch rows with a chunk of several tokens
    prefill_tokens: torch.Tensor  # [Tp] int64, those rows' token indices, row by row
    prefill_query_start_loc: torch.Tensor  # [Bp + 1] int64, offsets into prefill_tokens
    observe_decode: bool = False
    prefill_windows: torch.Tensor | None = None  # [Bp] int64, queries each prefill row observes
    query_windows: torch.Tensor | None = None  # [Bp] int64, queries each prefill row reports the energy of
    tier_views: list[TierView] = field(default_factory=list)  # compressed tiers of decode rows
    decode_scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by layer
    window_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer
    query_energy: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer

    def to(self, device: torch.device) -> AttentionMetadata:
        """The step's index tensors on the pool's device (built on the host by the runner)."""
        if device.type == "cpu":
            return self
        for name in ("block_tables", "seq_lens", "slot_index", "decode_rows", "decode_tokens", "prefill_rows",
                     "prefill_tokens", "prefill_query_start_loc", "prefill_windows", "query_windows"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    @property
    def has_decode(self) -> bool:
        return self.decode_rows.numel() > 0

    @property
    def has_prefill(self) -> bool:
        return self.prefill_rows.numel() > 0


class AttentionBackend(ABC):
    """Stores K/V into the shared page pool and computes paged grouped-query attention.

    `forward` is the same for every backend; a backend supplies the three kernels it runs."""

    name: str
    triton: bool  # whether tiers attend with their Triton kernels

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> None:
        self.k_pages = k_pages
        self.v_pages = v_pages
        self.scale = scale

    @abstractmethod
    def store(self, k: torch.Tensor, v: torch.Tensor, slot_index: torch.Tensor) -> None:
        """k, v [T, Hkv, D] into their slots [T, Hkv]."""

    @abstractmethod
    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """paged_decode's contract: (out, lse, scores)."""

    @abstractmethod
    def prefill(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """paged_prefill's contract for the step's prefill rows: (out, window_scores)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> attention output [T, Hq, D]."""
        self.store(k, v, meta.slot_index[layer])
        tables = meta.block_tables[:, layer]
        lens = meta.seq_lens[:, layer]
        if not meta.has_prefill:  # the common all-decode step: no scatter needed
            return self._decode_rows(layer, q, tables, lens, meta)
        if meta.has_decode:
            out = torch.empty_like(q)
            rows = meta.decode_rows
            out[meta.decode_tokens] = self._decode_rows(layer, q[meta.decode_tokens], tables[rows], lens[rows], meta)
            rows = meta.prefill_rows
            queries = q[meta.prefill_tokens]
            pre, window = self.prefill(queries, tables[rows], lens[rows], meta)
            out[meta.prefill_tokens] = pre
        else:  # an all-prefill step: its rows and tokens are the prefill rows and tokens, in order
            queries = q
            out, window = self.prefill(q, tables, lens, meta)
        if window is not None:
            meta.window_scores[layer] = window
        if meta.query_windows is not None:
            meta.query_energy[layer] = query_energy(queries, meta.prefill_query_start_loc, meta.query_windows)
        return out

    def _decode_rows(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
        out, lse, scores = self.decode(q, tables, lens, meta.observe_decode)
        if meta.observe_decode:
            meta.decode_scores[layer] = scores
        for view in meta.tier_views:
            index = view.batch_index.to(q.device)
            part_out, part_lse = view.attend(layer, q[index], self.scale, self.triton)
            out[index], lse[index] = merge_attention(out[index], lse[index], part_out, part_lse)
        return out


def query_energy(q: torch.Tensor, query_start_loc: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Per prefill row, the mean of q**2 over its chunk's last windows[row] queries: [Bp, Hq, D] float32."""
    ends = query_start_loc[1:]
    width = torch.minimum(windows.to(ends.device), ends - query_start_loc[:-1])
    token = torch.arange(q.shape[0], device=q.device)
    row = torch.searchsorted(ends, token, right=True)
    observed = token >= (ends - width)[row]
    energy = torch.zeros(ends.numel(), *q.shape[1:], dtype=torch.float32, device=q.device)
    energy.index_add_(0, row[observed], q[observed].float().pow(2))
    return energy / width.clamp(min=1).view(-1, 1, 1)


def create_backend(name: str, k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float) -> AttentionBackend:
    """`auto` is triton where the pool lives on a CUDA device; on the CPU it is the compiled kernels
    where they build (float32, bfloat16), the torch references otherwise."""
    if name == "auto":
        if k_pages.is_cuda:
            name = "triton"
        else:
            from kvserve.kernels import cpu_library

            name = "cpu" if cpu_library.dtype_code(k_pages) is not None else "torch"
    if name == "torch":
        from kvserve.attention.torch_backend import TorchBackend

        return TorchBackend(k_pages, v_pages, scale)
    if name == "cpu":
        from kvserve.attention.cpu_backend import CPUBackend
        from kvserve.kernels import cpu_library

        if cpu_library.dtype_code(k_pages) is None:
            raise ValueError("the cpu attention backend needs a C++ compiler and a float32 or bfloat16 CPU cache")
        return CPUBackend(k_pages, v_pages, scale)
    if name == "triton":
        from kvserve.attention.triton_backend import TritonBackend

        return TritonBackend(k_pages, v_pages, scale)
    raise ValueError(f"unknown attention backend {name!r}")
