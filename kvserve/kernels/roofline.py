"""This machine's ceilings for the CPU kernels, measured once per process by small kernels of the
project's (kernels/csrc/roofline.cpp) built with the same flags as the others, on torch's thread count.

    fma_peak() -> FLOP/s        float32 FMAs at the build's vector width, all threads, independent
                                chains: the bound of a projection over many rows
    read_bandwidth() -> bytes/s a parallel streaming sum of 256 MiB: the bound of a batch-1 decode
                                step, which reads every weight once and writes next to nothing
    copy_bandwidth() -> bytes/s a parallel streaming copy of 256 MiB (bytes read + written), as memory
                                benchmarks count it

Each is the best of several repeats, so that a busy neighbour lowers a repeat, not the ceiling.
"""

from __future__ import annotations

import functools

from kvserve.kernels import cpu_library

# several times any last-level cache, so the copy runs from memory
COPY_BYTES = 256 << 20


@functools.cache
def fma_peak() -> float:
    """float32 FLOP/s (an FMA counts two) of all threads."""
    return float(cpu_library.library().kv_fma_peak(cpu_library.threads()))


@functools.cache
def read_bandwidth() -> float:
    """Bytes/s read by a streaming sum of COPY_BYTES."""
    return float(cpu_library.library().kv_read_bandwidth(COPY_BYTES, cpu_library.threads()))


@functools.cache
def copy_bandwidth() -> float:
    """Bytes/s read plus written by a streaming copy of COPY_BYTES."""
    return float(cpu_library.library().kv_copy_bandwidth(COPY_BYTES, cpu_library.threads()))
