"""The compiled CPU kernels (kernels/csrc/*.cpp): built once per machine with the system's C++
compiler, cached under `KVSERVE_CACHE_DIR`, and called through ctypes.

The library is plain C++ with OpenMP and no torch headers, so it builds in a few seconds; it shares
torch's OpenMP runtime (libgomp), and every call runs on torch's thread count (`threads()`), whichever
thread makes it. Where no compiler is found the CPU path runs the torch references instead
(`available()` says which), and `KVSERVE_CPU_KERNELS=0` asks for the references on purpose.

`KVSERVE_CPU_ISA=avx2` builds for x86-64-v3 (AVX2, FMA, F16C; no AVX-512, no AMX) instead of
`-march=native`, so that an AVX-512 or AMX host runs the kernels as an AVX2-only CPU would; the
package's `__init__` caps the libraries under torch the same way (`kvserve.CPU_ISA_CAPS`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kvserve.paths import cache_dir

log = logging.getLogger("kvserve.kernels")

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
ISA_MARCH = {"native": "native", "avx2": "x86-64-v3"}
CPU_ISA = os.environ.get("KVSERVE_CPU_ISA", "native")
if CPU_ISA not in ISA_MARCH:
    raise ValueError(f"KVSERVE_CPU_ISA must be one of {sorted(ISA_MARCH)}, not {CPU_ISA!r}")
FLAGS = ["-O3", f"-march={ISA_MARCH[CPU_ISA]}", "-fno-math-errno",
         "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_i32, _i64, _f32, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "kv_paged_decode": [_i32, _ptr, _i64, _ptr, _ptr, _i32, _ptr, _i64, _i64, _i32, _ptr, _i64, _i64, _i32, _i32,
                        _i32, _i32, _f32, _ptr, _ptr, _ptr, _ptr, _i32],
    "kv_rms_norm": [_i32, _ptr, _i64, _ptr, _ptr, _i64, _i64, _f32, _i32],
    "kv_silu_mul": [_i32, _ptr, _ptr, _i64, _i64, _i32],
    "kv_rope": [_i32, _ptr, _i64, _ptr, _ptr, _i64, _i32, _i32, _i32],
    "kv_store_kv": [_i32, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32],
    "kv_argmax_rows": [_ptr, _i64, _i64, _ptr, _i32],
    "kv_amx_available": [],
    "kv_amx_pack": [_ptr, _i64, _i64, _ptr, _i32],
    "kv_amx_linear": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i32, _ptr, _i32],
    "kv_paged_prefill": [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64,
                         _i64, _f32, _ptr, _i32],
    "kv_f32_lanes": [],
    "kv_f32_packed_floats": [_i64, _i64, _i32],
    "kv_f32_pack": [_ptr, _i64, _i64, _i32, _ptr, _i32],
    "kv_f32_linear": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i32, _ptr, _i32],
    "kv_thin_decode": [_i32, _ptr, _i64, _ptr, _i64, _i64, _i32, _ptr, _ptr, _ptr, _i64, _i64, _i32, _i32, _i32,
                       _i32, _f32, _ptr, _ptr, _i32],
    "kv_quant_decode": [_i32, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr,
                        _ptr, _i32],
    "kv_sparse_decode": [_i32, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i32, _i32, _i32, _i32,
                         _f32, _ptr, _ptr, _i32],
    "kv_decode_evict": [_i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64,
                        _ptr, _i64, _i64, _i32, _i32, _i32, _f32, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
                        _i32],
    "kv_fma_peak": [_i32],
    "kv_copy_bandwidth": [_i64, _i32],
    "kv_read_bandwidth": [_i64, _i32],
}


# the functions that return a value; every other one returns nothing
RESULT_TYPES = {"kv_amx_available": ctypes.c_int, "kv_paged_prefill": ctypes.c_int, "kv_f32_lanes": ctypes.c_int,
                "kv_f32_packed_floats": ctypes.c_int64, "kv_fma_peak": ctypes.c_double,
                "kv_copy_bandwidth": ctypes.c_double,
                "kv_read_bandwidth": ctypes.c_double}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def isa_in_use() -> str:
    """The widest vector extensions the kernels and torch use here: what a benchmark's machine line names."""
    flags = cpu_flags() if CPU_ISA == "native" else frozenset({"avx2", "fma"})
    for names, label in ((("amx_bf16",), "AMX + AVX-512"), (("avx512_bf16",), "AVX-512 + AVX512-BF16"),
                         (("avx512f",), "AVX-512"), (("avx2", "fma"), "AVX2 + FMA")):
        if set(names) <= flags:
            return label + (" (KVSERVE_CPU_ISA=avx2)" if CPU_ISA == "avx2" else "")
    return "no AVX2"


def machine() -> str:
    """One line naming this machine for a benchmark: CPU model, ISA in use, cores and threads."""
    return f"{cpu_model()}, {isa_in_use()}, {os.cpu_count()} cores, {threads()} threads"


def native_bfloat16() -> bool:
    """Whether the kernels and torch's GEMMs run bfloat16 natively here (AVX512-BF16 or AMX, and not
    capped to AVX2). Elsewhere bfloat16 is widened in software and runs slower than float32."""
    return CPU_ISA == "native" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(compiler: str) -> Path:
    """The cached library's path, keyed by the sources, the flags, the compiler and this CPU
    (-march=native code must not run on another machine that shares the cache)."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(FLAGS + [compiler, platform.machine(), platform.processor(), *sorted(cpu_flags())]).encode())
    return cache_dir() / "cpu_kernels" / f"kvserve_cpu_{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed, so concurrent first starts never load a partial file
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)], check=True,
                       capture_output=True, text=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, building it first if this machine has not yet; None where it cannot be."""
    if CPU_ISA == "avx2" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        raise RuntimeError("KVSERVE_CPU_ISA=avx2 was set after torch chose its kernels: import kvserve before "
                           "torch, or set ATEN_CPU_CAPABILITY=avx2 too")
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: the CPU path runs the torch reference kernels (slower)")
        return None
    target = _library_path(compiler)
    if not target.exists():
        log.info("building the CPU kernels with %s (once per machine)", compiler)
        try:
            _build(compiler, target)
        except subprocess.CalledProcessError as error:
            log.warning("building the CPU kernels failed, the torch references run instead:\n%s", error.stderr)
            return None
    lib = ctypes.CDLL(str(target))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESULT_TYPES.get(name)
    return lib


class RecordTables(ctypes.Structure):
    """One layer's record lists as the kernels take them (`kv::RecordTables` in csrc/decode_tiles.h):
    a `PagePool.records` view and its [B, Hkv, P] int32 page tables."""

    _fields_ = [("pool", _ptr), ("half_bytes", _i64), ("per_half", _i64), ("record_bytes", _i64),
                ("num_pages", _i64), ("tables", _ptr), ("table_stride_b", _i64), ("table_stride_h", _i64)]


def record_tables(view: torch.Tensor, tables: torch.Tensor) -> tuple[RecordTables, torch.Tensor]:
    """The RecordTables of `view` [2N, per_half, R] uint8 and `tables` [B, Hkv, P], and the int32 tables
    it points into (keep them alive for the call)."""
    tables = tables.to(torch.int32)
    tables = tables if tables.stride(2) == 1 else tables.contiguous()
    return RecordTables(view.data_ptr(), view.stride(0), view.shape[1], view.stride(1), view.shape[0] // 2,
                        tables.data_ptr(), tables.stride(0), tables.stride(1)), tables


def decode_io(q: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every decode kernel takes and fills: q [B, Hq, D] with each head's dims contiguous, lens as
    int32, and the fresh out [B, Hq, D] (q's dtype) and lse [B, Hq] (float32)."""
    batch, q_heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    return (q, lens.to(torch.int32), torch.empty(batch, q_heads, dim, dtype=q.dtype),
            torch.empty(batch, q_heads, dtype=torch.float32))


def available() -> bool:
    return library() is not None


@functools.cache
def _codes() -> dict[torch.dtype, int]:
    return DTYPE_CODES if available() else {}


def dtype_code(*tensors: torch.Tensor) -> int | None:
    """The kernels' code for the dtype these tensors share, or None where the compiled kernels cannot
    take them (not all on the CPU in float32 or bfloat16, or no library). Called several times per
    layer: kept to a plain loop."""
    dtype = tensors[0].dtype
    for tensor in tensors:
        if tensor.dtype is not dtype or not tensor.is_cpu:
            return None
    return _codes().get(dtype)


def threads() -> int:
    """The thread count the kernels run with: torch's (a per-thread OpenMP setting would not reach
    the engine's thread)."""
    return torch.get_num_threads()
