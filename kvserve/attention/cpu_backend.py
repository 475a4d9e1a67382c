"""The compiled CPU path: the torch backend with decode attention in the compiled kernel, which
reads keys and values where they lie in the pages instead of gathering a copy per step."""

from __future__ import annotations

import torch

from kvserve.attention.torch_backend import TorchBackend
from kvserve.kernels.paged_decode import paged_decode_cpu


class CPUBackend(TorchBackend):
    name = "cpu"

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, want_scores: bool
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return paged_decode_cpu(q, self.k_pages, self.v_pages, tables, lens, self.scale, want_scores)
