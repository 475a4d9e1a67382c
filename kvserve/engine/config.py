"""Engine configuration, validated once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvserve.attention.registry import BACKENDS
from kvserve.kernels import cpu_library

SCHEDULING_POLICIES = ("fcfs", "priority")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_backends() -> tuple[str, ...]:
    """`--attention-backend` choices: `auto`, then every registered backend."""
    return ("auto", *BACKENDS.names())


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the built-in default
    dtype: str = "float32"
    kv_cache_memory: int | None = None  # bytes; None: a share of free memory
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # prefill chunks end at multiples of this many tokens of a sequence; None: the scheduler's default
    chunked_prefill_size: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    attention_backend: str = "auto"
    kv_policy: str | None = None  # the default policy of requests that name none (name or JSON)
    device: str = "auto"  # auto: cuda when available, else cpu
    scheduling_policy: str = "fcfs"  # priority: requests queue by their `priority` (lower first), then arrival
    enable_prefix_caching: bool = True  # keep prompt blocks' K/V for later requests with the same prefix

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}")
        if self.attention_backend not in attention_backends():
            raise ValueError(f"attention_backend must be one of {', '.join(attention_backends())}")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.chunked_prefill_size is not None and not 0 < self.chunked_prefill_size <= self.max_num_batched_tokens:
            raise ValueError("chunked_prefill_size must be positive and at most max_num_batched_tokens")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def machine(self) -> str:
        """What a benchmark ran on: the CPU and the ISA its kernels use, or the GPU's name."""
        if self.torch_device.type == "cpu":
            return cpu_library.machine()
        return torch.cuda.get_device_name(self.torch_device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolved_kv_cache_memory(self) -> int:
        """The KV budget: as given, or a tenth of the memory available now (at least 256 MiB)."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        return max(256 << 20, available_memory_bytes() // 10)
