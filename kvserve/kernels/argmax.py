"""Greedy sampling's row-wise argmax.

Shapes:
    argmax_rows(logits [n, vocab] float32) -> [n] int64    the first index of each row's largest
                                                          value, NaN counting as the largest

`argmax_rows_ref` is torch's argmax; `argmax_rows` runs the compiled CPU kernel
(kernels/csrc/argmax.cpp), ~10x faster at 32 rows of a 49k vocabulary, and the reference elsewhere.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu_library


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    if (cpu_library.dtype_code(logits) != cpu_library.DTYPE_CODES[torch.float32] or logits.dim() != 2
            or not logits.is_contiguous() or logits.shape[1] == 0):
        return argmax_rows_ref(logits)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    cpu_library.library().kv_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(),
                                         cpu_library.threads())
    return out
