"""CPU kernel benchmark: `python -m kvserve.kernels.cpu_bench SECTION [options]`.

Each section is a subcommand (`SECTIONS`); every one prints the CPU, the ISA the kernels were built
for (`KVSERVE_CPU_ISA`: native or avx2), torch's CPU capability, the thread count and this machine's
measured ceilings (kernels/roofline.py) first.

`linear [--rows 1 8 32 256 2048]`: the float32 projections of the default model (or `--model`), ours
(kernels/f32_linear.py over packed weights, bias/residual and SwiGLU in the epilogue) against what
torch runs for them otherwise: x @ W_t with W_t the contiguous [in, out] transpose, addmm for a
residual, and the compiled silu_mul after a gate/up product. Both read several copies of their
weights in turn, so that each call finds them in memory and not in the last-level cache, as a decode
step does. Per shape and row count it prints the median time of each, GFLOP/s, GB/s of weights read,
the speedup (torch's time over ours, the median of adjacent pairs) and our share of the roofline
bound: the larger of FLOPs at the FMA peak and weight bytes at read bandwidth, over our time.

`decode [--contexts 512 2048 8192] [--batches 1 16]`: paged decode attention, one query token per
sequence, for the default model's (or `--model`'s) heads and for Llama-3-8B's (32 query heads, 8 KV
heads, head_dim 128), in float32 and bfloat16, every (sequence, KV head) holding the context in
16-token pages in random order: ours (kernels/paged_decode.py's paged_decode_cpu, reading the pages
in place) against torch's SDPA over the same keys and values laid out contiguously (gather_pages;
the gather is not timed). Each side cycles through copies of its cache, as the linear section does
through its weights. Per case it prints the median time of each, the GB/s of keys and values read
(the bytes that must be read, over the time), the speedup and our share of the read bandwidth.

`tiers [--context 6000] [--batch 16] [--bits 2 4 8] [--channel-ratio 0.5]`: one decode step's
attention for one layer over compressed tiers, against full precision, for the default model's (or
`--model`'s) heads and Llama-3-8B's, in float32. Full: paged decode over the whole context. KIVI:
the context but its newest 128 tokens quantized (quant_decode_cpu, in whole 32-token key groups),
those 128 at full precision (paged_decode_cpu), merged by log-sum-exp, as a KIVI request attends.
ThinK: all but the newest 32 tokens with `channel_ratio` of their key channels pruned
(thin_decode_cpu), the 32 at full width, merged likewise. TailorKV: its sparse layers' host tier
(sparse_decode_cpu: every hosted key scored on 8 channels, the best 128 attended) beside 64 resident
tokens, merged likewise. Records lie in pages in random order, and
each case cycles through copies of its cache. Per case it prints the median time of the compiled
kernels and of their torch references (the CPU path before the kernels: quant_decode_ref,
thin_decode_ref, sparse_decode_ref), the bytes each kernel must read, and the ratio to full's time
from the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from kvserve.kernels import cpu_library, f32_linear, roofline
from kvserve.kernels.paged_decode import gather_pages, merge_attention, paged_decode_cpu
from kvserve.kernels.pointwise import silu_mul
from kvserve.kernels.quant_decode import quant_decode_cpu, quant_decode_ref
from kvserve.kernels.quant_layout import QuantLayout
from kvserve.kernels.sparse_decode import sparse_decode_cpu, sparse_decode_ref
from kvserve.kernels.thin_decode import thin_decode_cpu, thin_decode_ref
from kvserve.model.config import ModelConfig
from kvserve.model.loader import resolve_model

# bytes of weights each side cycles through: several times any last-level cache
WORKING_SET_BYTES = 256 << 20
# seconds of calls per timed sample, and samples per side (ours and torch's alternate)
SAMPLE_S = 0.04
SAMPLES = 7
WARMUP_S = 0.3
# the LM head runs on the rows that sample, at most --max-num-seqs of them, never on a prefill's
LM_HEAD_MAX_ROWS = 64


def print_header() -> None:
    print(f"{cpu_library.machine()}; torch capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"measured ceilings: FMA peak {roofline.fma_peak() / 1e9:.0f} GFLOP/s, read bandwidth "
          f"{roofline.read_bandwidth() / 1e9:.1f} GB/s, copy bandwidth {roofline.copy_bandwidth() / 1e9:.1f} GB/s "
          "(read + written)")


def samples(fns: list[Callable[[int], object]], calls: int) -> list[list[float]]:
    """SAMPLES seconds-per-call of each fn, the fns taking turns; each call gets the next index (the
    copy of the weights it reads), so that consecutive samples go on through the copies."""
    times: list[list[float]] = [[] for _ in fns]
    for sample in range(SAMPLES):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            for call in range(sample * calls, (sample + 1) * calls):
                fn(call)
            out.append((time.perf_counter() - start) / calls)
    return times


def calls_per_sample(fns: list[Callable[[int], object]], copies: int = 1) -> int:
    """Enough calls for SAMPLE_S seconds of the slowest fn. Each fn first runs over its `copies` of
    the weights (for up to WARMUP_S): the first reads of freshly written memory run slower than the
    steady state that long-lived weights are in."""
    slowest = 0.0
    for fn in fns:
        fn(0)
        start = time.perf_counter()
        fn(1)
        one = time.perf_counter() - start
        for call in range(2, min(copies, math.ceil(WARMUP_S / one))):
            fn(call)
        slowest = max(slowest, one)
    return max(1, math.ceil(SAMPLE_S / slowest))


@dataclass
class Shape:
    name: str
    out_features: int
    in_features: int
    swiglu: bool = False
    residual: bool = False
    max_rows: int | None = None


def model_shapes(cfg: ModelConfig) -> list[Shape]:
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [Shape("qkv", q + 2 * kv, d), Shape("o", d, q, residual=True),
            Shape("gate_up", 2 * cfg.intermediate_size, d, swiglu=True),
            Shape("down", d, cfg.intermediate_size, residual=True),
            Shape("lm_head", cfg.vocab_size, d, max_rows=LM_HEAD_MAX_ROWS)]


@dataclass
class LinearCase:
    """One shape at one row count: copies of the weights in our packed layout and in torch's."""

    shape: Shape
    packed: list[torch.Tensor]
    transposed: list[torch.Tensor]
    x: torch.Tensor
    residual: torch.Tensor | None

    def ours(self, call: int) -> torch.Tensor:
        shape = self.shape
        width = shape.out_features // 2 if shape.swiglu else shape.out_features
        return f32_linear.linear_f32(self.x, self.packed[call % len(self.packed)], width, shape.in_features,
                                     self.residual, gated=shape.swiglu)

    def theirs(self, call: int) -> torch.Tensor:
        w_t = self.transposed[call % len(self.transposed)]
        out = self.x @ w_t if self.residual is None else torch.addmm(self.residual, self.x, w_t)
        return silu_mul(out) if self.shape.swiglu else out


def bench_linear(args: argparse.Namespace) -> int:
    if not f32_linear.available():
        print("the float32 linear kernel is not available in this build (no AVX2 + FMA, or no compiler)")
        return 1
    cfg = ModelConfig.from_folder(resolve_model(args.model))
    print_header()
    peak, bandwidth = roofline.fma_peak(), roofline.read_bandwidth()
    print(f"\n{'shape':<22}{'rows':>6}{'ours ms':>10}{'torch ms':>10}{'ours GF/s':>11}{'torch GF/s':>11}"
          f"{'ours GB/s':>11}{'torch GB/s':>11}{'speedup':>9}{'roofline':>10}")
    for shape in model_shapes(cfg):
        n, k = shape.out_features, shape.in_features
        weight_bytes = n * k * 4
        weights = [torch.randn(n, k) for _ in range(max(1, math.ceil(WORKING_SET_BYTES / weight_bytes)))]
        packed = [f32_linear.pack_gated(w) if shape.swiglu else f32_linear.pack(w) for w in weights]
        transposed = [w.t().contiguous() for w in weights]
        del weights
        for rows in args.rows:
            if shape.max_rows is not None and rows > shape.max_rows:
                continue
            case = LinearCase(shape, packed, transposed, torch.randn(rows, k),
                              torch.randn(rows, n) if shape.residual else None)
            ours_t, torch_t = samples([case.ours, case.theirs], calls_per_sample([case.ours, case.theirs], len(packed)))
            t_ours, t_torch = statistics.median(ours_t), statistics.median(torch_t)
            speedup = statistics.median(b / a for a, b in zip(ours_t, torch_t))
            flops = 2 * rows * n * k
            bound_s, bound = max((flops / peak, "fma"), (weight_bytes / bandwidth, "mem"))
            print(f"{f'{shape.name} [{n}, {k}]':<22}{rows:>6}{t_ours * 1e3:>10.3f}{t_torch * 1e3:>10.3f}"
                  f"{flops / t_ours / 1e9:>11.1f}{flops / t_torch / 1e9:>11.1f}{weight_bytes / t_ours / 1e9:>11.1f}"
                  f"{weight_bytes / t_torch / 1e9:>11.1f}{speedup:>8.2f}x{bound_s / t_ours:>6.0%} {bound}")
    print(f"\nmedians of {SAMPLES} alternating samples of >= {SAMPLE_S * 1e3:.0f} ms; speedup: torch's time over "
          "ours; roofline: our share of max(FLOPs / FMA peak, weight bytes / read bandwidth), and which bound")
    return 0


def linear_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256, 2048],
                        help="rows of x (tokens in a step)")
    parser.add_argument("--model", default=None, help="whose projection shapes (default: the built-in model)")


# query heads, KV heads, head_dim of the larger decode geometry (Llama-3-8B's)
LARGE_DECODE_HEADS = (32, 8, 128)
DECODE_BLOCK_SIZE = 16
# the share of the memory available at the start that a decode case's copies may take
DECODE_MEMORY_SHARE = 0.5


@dataclass
class DecodeCase:
    """One geometry, dtype, context and batch: copies of a paged cache (each its own page order) for
    ours, and the same caches gathered contiguously for torch."""

    q: torch.Tensor
    pools: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # k_pages, v_pages, tables
    gathered: list[tuple[torch.Tensor, torch.Tensor]]  # keys, values [B, Hkv, S, D]
    lens: torch.Tensor
    scale: float

    @staticmethod
    def build(q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype, context: int, batch: int,
              copies: int) -> DecodeCase:
        pages = context // DECODE_BLOCK_SIZE
        pools, gathered = [], []
        for _ in range(copies):
            num_pages = batch * kv_heads * pages
            k_pages, v_pages = (torch.randn(num_pages, DECODE_BLOCK_SIZE, dim).to(dtype) for _ in range(2))
            tables = torch.randperm(num_pages).to(torch.int32).view(batch, kv_heads, pages)
            pools.append((k_pages, v_pages, tables))
            gathered.append((gather_pages(k_pages, tables), gather_pages(v_pages, tables)))
        lens = torch.full((batch, kv_heads), context, dtype=torch.int32)
        return DecodeCase(torch.randn(batch, q_heads, dim).to(dtype), pools, gathered, lens, dim**-0.5)

    def ours(self, call: int) -> torch.Tensor:
        k_pages, v_pages, tables = self.pools[call % len(self.pools)]
        return paged_decode_cpu(self.q, k_pages, v_pages, tables, self.lens, self.scale)[0]

    def theirs(self, call: int) -> torch.Tensor:
        keys, values = self.gathered[call % len(self.gathered)]
        return F.scaled_dot_product_attention(self.q[:, :, None], keys, values, scale=self.scale, enable_gqa=True)


def available_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bench_decode(args: argparse.Namespace) -> int:
    if not cpu_library.available():
        print("the compiled CPU kernels are not available here (no compiler, or KVSERVE_CPU_KERNELS=0)")
        return 1
    cfg = ModelConfig.from_folder(resolve_model(args.model))
    print_header()
    bandwidth = roofline.read_bandwidth()
    budget = DECODE_MEMORY_SHARE * available_memory()
    print(f"\n{'heads q/kv/dim':<16}{'dtype':>10}{'context':>9}{'batch':>7}{'ours ms':>10}{'torch ms':>10}"
          f"{'ours GB/s':>11}{'torch GB/s':>11}{'speedup':>9}{'of read':>9}")
    for q_heads, kv_heads, dim in [(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), LARGE_DECODE_HEADS]:
        for dtype in (torch.float32, torch.bfloat16):
            for context in args.contexts:
                for batch in args.batches:
                    kv_bytes = 2 * batch * kv_heads * context * dim * dtype.itemsize
                    geometry, dtype_name = f"{q_heads}/{kv_heads}/{dim}", str(dtype).removeprefix("torch.")
                    label = f"{geometry:<16}{dtype_name:>10}{context:>9}{batch:>7}"
                    if 2 * kv_bytes > budget:  # the pool and its gathered copy
                        print(f"{label}  skipped: {2 * kv_bytes / 2**30:.1f} GiB of caches")
                        continue
                    copies = max(1, min(math.ceil(WORKING_SET_BYTES / kv_bytes), int(budget // (2 * kv_bytes))))
                    case = DecodeCase.build(q_heads, kv_heads, dim, dtype, context, batch, copies)
                    ours_t, torch_t = samples([case.ours, case.theirs], calls_per_sample([case.ours, case.theirs]))
                    t_ours, t_torch = statistics.median(ours_t), statistics.median(torch_t)
                    speedup = statistics.median(b / a for a, b in zip(ours_t, torch_t))
                    print(f"{label}{t_ours * 1e3:>10.3f}{t_torch * 1e3:>10.3f}{kv_bytes / t_ours / 1e9:>11.1f}"
                          f"{kv_bytes / t_torch / 1e9:>11.1f}{speedup:>8.2f}x{kv_bytes / t_ours / bandwidth:>8.0%}")
                    del case
    print(f"\nmedians of {SAMPLES} alternating samples of >= {SAMPLE_S * 1e3:.0f} ms; GB/s: bytes of keys and "
          "values read over the time; speedup: torch's time over ours; of read: our GB/s over the read "
          "bandwidth")
    return 0


def decode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192],
                        help="tokens held by every (sequence, KV head); whole 16-token pages")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="sequences in the step")
    parser.add_argument("--model", default=None, help="whose heads besides Llama-3-8B's (default: the built-in model)")


# KIVI's defaults (policies/kivi.py): tokens per key group and the newest tokens kept at full precision;
# ThinK's window (policies/think.py): the newest tokens kept at full width
KIVI_GROUP, KIVI_RESIDUAL, THINK_WINDOW = 32, 128, 32
# TailorKV's defaults (policies/tailorkv.py): resident tokens (sinks + recent), tokens attended, channels ranked
TAILORKV_RESIDENT, TAILORKV_SELECT, TAILORKV_CHANNELS = 64, 128, 8


def record_lists(batch: int, kv_heads: int, lists: list[tuple[int, int]], half_bytes: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pool of random bytes and, for each (records, record_bytes) of `lists`, its records' view
    (`PagePool.records`' layout) and [B, Hkv, P] tables giving every (sequence, KV head) that many
    records, the lists' pages disjoint and in random order."""
    pages = [-(-records // (2 * (half_bytes // record_bytes))) for records, record_bytes in lists]
    num_pages = batch * kv_heads * sum(pages)
    storage = torch.randint(0, 256, (2 * num_pages * half_bytes,), dtype=torch.uint8)
    order = torch.randperm(num_pages).to(torch.int32)
    result, taken = [], 0
    for (_, record_bytes), count in zip(lists, pages):
        per_half = half_bytes // record_bytes
        view = storage.as_strided((2 * num_pages, per_half, record_bytes), (half_bytes, record_bytes, 1))
        tables = order[taken:taken + batch * kv_heads * count].view(batch, kv_heads, count)
        result.append((view, tables))
        taken += batch * kv_heads * count
    return result


def with_scales(view: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Overwrite bytes [start, start + 2 * count) of every record with float16 scales in [0, 0.1)."""
    view[:, :, start:start + 2 * count] = (torch.rand(*view.shape[:2], count) * 0.1).half().view(torch.uint8)
    return view


@dataclass
class TierCase:
    """One step over one layer for a geometry and batch: every copy's full-precision pages for the newest
    tokens and its tier's records for the rest. `attend(call, kernels)` runs both and merges them."""

    q: torch.Tensor
    recent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # k_pages, v_pages, tables
    recent_lens: torch.Tensor
    tier: list[tuple]  # the tier kernel's arguments after q
    tier_bytes: int
    scale: float

    def attend(self, call: int, kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        k_pages, v_pages, tables = self.recent[call % len(self.recent)]
        out, lse, _ = paged_decode_cpu(self.q, k_pages, v_pages, tables, self.recent_lens, self.scale)
        part_out, part_lse = kernel(self.q, *self.tier[call % len(self.tier)])
        return merge_attention(out, lse, part_out, part_lse)[0]


def paged_copy(batch: int, kv_heads: int, dim: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pages = -(-context // DECODE_BLOCK_SIZE)
    num_pages = batch * kv_heads * pages
    k_pages, v_pages = (torch.randn(num_pages, DECODE_BLOCK_SIZE, dim) for _ in range(2))
    return k_pages, v_pages, torch.randperm(num_pages).to(torch.int32).view(batch, kv_heads, pages)


def tier_case(q: torch.Tensor, kv_heads: int, recent: int, tier_len: int, copies: int,
              tier_copy: Callable[[], tuple], tier_bytes: int) -> TierCase:
    batch, _, dim = q.shape
    return TierCase(q, [paged_copy(batch, kv_heads, dim, recent) for _ in range(copies)],
                    torch.full((batch, kv_heads), recent, dtype=torch.int32),
                    [tier_copy() for _ in range(copies)], tier_bytes, dim**-0.5)


def kivi_case(q: torch.Tensor, kv_heads: int, context: int, bits: int, copies: int) -> TierCase:
    batch, _, dim = q.shape
    quantized = (context - KIVI_RESIDUAL) // KIVI_GROUP * KIVI_GROUP
    layout = QuantLayout(bits, KIVI_GROUP, dim)
    half_bytes = DECODE_BLOCK_SIZE * dim * 4
    lens = torch.full((batch, kv_heads), quantized, dtype=torch.int32)

    def tier_copy() -> tuple:
        (tokens, token_tables), (groups, group_tables) = record_lists(
            batch, kv_heads, [(quantized, layout.token_bytes), (quantized // KIVI_GROUP, layout.group_bytes)],
            half_bytes)
        # the scales of both lists: each write covers every record slot of the pool, whatever list holds it
        with_scales(tokens, 2 * layout.code_bytes, 2 * layout.value_groups)
        with_scales(groups, 0, 2 * dim)
        return tokens, token_tables, groups, group_tables, lens, layout, dim**-0.5

    tier_bytes = batch * kv_heads * (quantized * layout.token_bytes + quantized // KIVI_GROUP * layout.group_bytes)
    return tier_case(q, kv_heads, context - quantized, quantized, copies, tier_copy, tier_bytes)


def think_case(q: torch.Tensor, kv_heads: int, context: int, channel_ratio: float, copies: int) -> TierCase:
    batch, _, dim = q.shape
    keep = dim - int(channel_ratio * dim)
    thin = context - THINK_WINDOW
    half_bytes = DECODE_BLOCK_SIZE * dim * 4
    lens = torch.full((batch, kv_heads), thin, dtype=torch.int32)
    channels = torch.stack([torch.randperm(dim)[:keep].sort().values for _ in range(batch * kv_heads)])
    channels = channels.view(batch, kv_heads, keep)

    def tier_copy() -> tuple:
        (keys, key_tables), (values, value_tables) = record_lists(
            batch, kv_heads, [(thin, keep * 4), (thin, dim * 4)], half_bytes)
        values.view(torch.float32).copy_(torch.randn(values.shape[0], values.shape[1], dim))
        return channels, keys, key_tables, values, value_tables, lens, dim**-0.5

    return tier_case(q, kv_heads, THINK_WINDOW, thin, copies, tier_copy, batch * kv_heads * thin * (keep + dim) * 4)


def host_case(q: torch.Tensor, kv_heads: int, context: int, copies: int) -> TierCase:
    """TailorKV's sparse layers at its defaults (policies/tailorkv.py): 64 resident tokens (sinks and the
    prompt's last) at full precision, the rest in the host tier, 128 of them attended, ranked on 8 channels."""
    batch, _, dim = q.shape
    hosted = context - TAILORKV_RESIDENT
    half_bytes = DECODE_BLOCK_SIZE * dim * 4
    lens = torch.full((batch, kv_heads), hosted, dtype=torch.int32)

    def tier_copy() -> tuple:
        (keys, key_tables), (values, value_tables) = record_lists(
            batch, kv_heads, [(hosted, dim * 4), (hosted, dim * 4)], half_bytes)
        for view in (keys, values):
            view.view(torch.float32).copy_(torch.randn(view.shape[0], view.shape[1], dim))
        key_max = torch.rand(batch, kv_heads, dim) + 2
        return (key_max, keys, key_tables, values, value_tables, lens, torch.full((batch,), TAILORKV_SELECT),
                torch.full((batch,), TAILORKV_CHANNELS), dim**-0.5)

    # every hosted key is read to rank it, the chosen tokens' values to attend them
    read = batch * kv_heads * (hosted + TAILORKV_SELECT) * dim * 4
    return tier_case(q, kv_heads, TAILORKV_RESIDENT, hosted, copies, tier_copy, read)


def bench_tiers(args: argparse.Namespace) -> int:
    if not cpu_library.available():
        print("the compiled CPU kernels are not available here (no compiler, or KVSERVE_CPU_KERNELS=0)")
        return 1
    cfg = ModelConfig.from_folder(resolve_model(args.model))
    print_header()
    context, batch = args.context, args.batch
    print(f"\none layer's decode attention, float32, context {context}, batch {batch}")
    print(f"{'heads q/kv/dim':<16}{'cache':<12}{'MB read':>9}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}"
          f"{'vs full':>9}")
    for q_heads, kv_heads, dim in [(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), LARGE_DECODE_HEADS]:
        geometry = f"{q_heads}/{kv_heads}/{dim}"
        q = torch.randn(batch, q_heads, dim)
        full_bytes = 2 * batch * kv_heads * context * dim * 4
        full = DecodeCase.build(q_heads, kv_heads, dim, torch.float32, context, batch,
                                max(1, min(math.ceil(WORKING_SET_BYTES / full_bytes), 4)))
        builders = {f"kivi-{bits}": (partial(kivi_case, q, kv_heads, context, bits), quant_decode_cpu, quant_decode_ref)
                    for bits in args.bits}
        builders[f"think-{args.channel_ratio:g}"] = (partial(think_case, q, kv_heads, context, args.channel_ratio),
                                                      thin_decode_cpu, thin_decode_ref)
        builders["tailorkv"] = (partial(host_case, q, kv_heads, context), sparse_decode_cpu, sparse_decode_ref)
        print(f"{geometry:<16}{'full':<12}{full_bytes / 1e6:>9.1f}")
        for name, (build, ours, reference) in builders.items():
            # as many copies as fill the working set, as full's do
            case = build(1)
            case = build(max(1, min(math.ceil(WORKING_SET_BYTES / case.tier_bytes), 16)))
            fns = [full.ours, partial(case.attend, kernel=ours), partial(case.attend, kernel=reference)]
            full_t, ours_t, ref_t = samples(fns, calls_per_sample(fns))
            t_full, t_ours, t_ref = (statistics.median(x) for x in (full_t, ours_t, ref_t))
            ratio = statistics.median(o / f for o, f in zip(ours_t, full_t))
            print(f"{geometry:<16}{name:<12}{case.tier_bytes / 1e6:>9.1f}{t_ours * 1e3:>10.3f}{t_ref * 1e3:>10.3f}"
                  f"{t_ref / t_ours:>8.2f}x{ratio:>8.2f}x   (full {t_full * 1e3:.3f} ms)")
            del case
        del full
    print(f"\nmedians of {SAMPLES} alternating samples of >= {SAMPLE_S * 1e3:.0f} ms; MB read: the tier's records "
          "(full: its keys and values); ours / torch: the tier's compiled kernel / torch reference, plus paged "
          "decode over the newest tokens at full precision and the merge; speedup: torch's time over ours; "
          "vs full: ours over full's time in the same samples (median of adjacent pairs)")
    return 0


def tiers_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int, default=6000, help="tokens held by every (sequence, KV head)")
    parser.add_argument("--batch", type=int, default=16, help="sequences in the step")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8], choices=[1, 2, 4, 8])
    parser.add_argument("--channel-ratio", type=float, default=0.5, help="ThinK's pruned share of key channels")
    parser.add_argument("--model", default=None, help="whose heads besides Llama-3-8B's (default: the built-in model)")


# name: (help, adds its arguments, runs it and returns the exit status)
SECTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "linear": ("float32 projections: ours vs torch's GEMM", linear_args, bench_linear),
    "decode": ("paged decode attention: ours vs torch's SDPA", decode_args, bench_decode),
    "tiers": ("decode attention over KIVI, ThinK and TailorKV's host tiers vs full precision", tiers_args,
              bench_tiers),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.kernels.cpu_bench", description=__doc__.split("\n")[0])
    sections = parser.add_subparsers(dest="section", required=True)
    for name, (help_text, add_args, _) in SECTIONS.items():
        add_args(sections.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return SECTIONS[args.section][2](args)


if __name__ == "__main__":
    raise SystemExit(main())
