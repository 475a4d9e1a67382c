"""Kernel benchmark on a GPU: `python -m kvserve.kernels.bench [--quick]`.

Llama-3-8B attention geometry (32 query heads, 8 KV heads, head_dim 128) in bfloat16 with 16-token
pages handed out in random order. For each kernel and size it prints the time and the bandwidth
achieved (the bytes the kernel must move at least, over its time) as a fraction of the device's
copy bandwidth (a 1 GiB device-to-device copy, read + write), beside the torch equivalent on the
same data laid out contiguously: SDPA for attention, index_copy_ for store_kv. Prefill also prints
TFLOP/s. Sizes that do not fit in free GPU memory are skipped. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from kvserve.kernels.paged_decode import gather_pages, paged_decode
from kvserve.kernels.paged_prefill import paged_prefill
from kvserve.kernels.store_kv import store_kv, store_kv_ref

DEVICE = "cuda"
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
SCALE = HEAD_DIM**-0.5
CONTEXTS = (1024, 8192, 32768, 131072)
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_BATCHES = (1, 4)
PREFILL_CHUNK = 2048  # a typical --max-num-batched-tokens
WINDOW = 32  # SnapKV's observation window
# SDPA must not fall back to its math kernel, which materialises [heads, queries, keys] scores
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def seconds(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100) * 1e-3


def copy_bandwidth() -> float:
    """Bytes per second read plus written by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds(lambda: dst.copy_(src))


def fits(nbytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def paged_cache(batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding `context` tokens for every (sequence, KV head), pages in random order."""
    pages = context // BLOCK_SIZE
    num_pages = 1 + batch * KV_HEADS * pages
    k_pages = torch.randn(num_pages, BLOCK_SIZE, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_pages = torch.randn(num_pages, BLOCK_SIZE, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    tables = (torch.randperm(num_pages - 1, device=DEVICE) + 1).to(torch.int32).view(batch, KV_HEADS, pages)
    lens = torch.full((batch, KV_HEADS), context, dtype=torch.int32, device=DEVICE)
    return k_pages, v_pages, tables, lens


def torch_sdpa(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, tables: torch.Tensor,
               mask: object = None) -> float | None:
    """Seconds for SDPA over the cache copied out contiguously; None where the copy does not fit
    or no fused SDPA kernel takes the shapes."""
    if not fits(2 * k_pages.numel() * k_pages.element_size()):
        return None
    keys, values = gather_pages(k_pages, tables), gather_pages(v_pages, tables)
    try:
        with sdpa_kernel(FUSED_SDPA):
            return seconds(lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=SCALE,
                                                                  enable_gqa=True))
    except RuntimeError:
        return None


def cell(time: float | None, nbytes: int, bandwidth: float) -> str:
    if time is None:
        return f"{'n/a':>9} {'':>6}"
    return f"{time * 1e6:9.1f} {nbytes / time / bandwidth:6.1%}"


def store_kv_row(tokens: int, bandwidth: float) -> str:
    num_pages = 1 + tokens * KV_HEADS
    k_pages = torch.randn(num_pages, BLOCK_SIZE, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_pages = torch.randn_like(k_pages)
    # each token and head lands on its own random page, as decode appends do
    slot_index = ((torch.randperm(num_pages - 1, device=DEVICE) + 1) * BLOCK_SIZE).view(tokens, KV_HEADS)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    nbytes = 2 * 2 * k.numel() * k.element_size()  # K and V, each read and written once
    kernel = seconds(lambda: store_kv(k, v, k_pages, v_pages, slot_index))
    reference = seconds(lambda: store_kv_ref(k, v, k_pages, v_pages, slot_index))
    return f"{tokens:7d} | {cell(kernel, nbytes, bandwidth)} | {cell(reference, nbytes, bandwidth)}"


def decode_row(batch: int, context: int, bandwidth: float) -> str:
    kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * DTYPE.itemsize
    if not fits(kv_bytes):
        return f"{batch:5d} {context:7d} | skipped: {kv_bytes / 2**30:.0f} GiB of K/V does not fit"
    k_pages, v_pages, tables, lens = paged_cache(batch, context)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    plain = seconds(lambda: paged_decode(q, k_pages, v_pages, tables, lens, SCALE))
    scored = seconds(lambda: paged_decode(q, k_pages, v_pages, tables, lens, SCALE, want_scores=True))
    # scores read K a second time, read and write the per-slot sum and write the max
    scored_bytes = kv_bytes + kv_bytes // 2 + 3 * batch * KV_HEADS * context * 4
    sdpa = torch_sdpa(q[:, :, None], k_pages, v_pages, tables)
    return (f"{batch:5d} {context:7d} | {cell(plain, kv_bytes, bandwidth)} | "
            f"{cell(scored, scored_bytes, bandwidth)} | {cell(sdpa, kv_bytes, bandwidth)}")


def prefill_row(batch: int, context: int, bandwidth: float) -> str:
    chunk = min(PREFILL_CHUNK, context)
    kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * DTYPE.itemsize
    if not fits(kv_bytes):
        return f"{batch:5d} {context:7d} | skipped: {kv_bytes / 2**30:.0f} GiB of K/V does not fit"
    k_pages, v_pages, tables, lens = paged_cache(batch, context)
    q = torch.randn(batch * chunk, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    starts = torch.arange(batch + 1, device=DEVICE) * chunk
    nbytes = kv_bytes + 2 * q.numel() * q.element_size()  # K/V read once, q read, out written
    # query j of the chunk sees context - chunk + j + 1 keys: 2 matmuls of 2 flops per pair
    flops = 4 * HEAD_DIM * Q_HEADS * batch * (chunk * (context - chunk) + chunk * (chunk + 1) // 2)
    plain = seconds(lambda: paged_prefill(q, k_pages, v_pages, tables, lens, starts, SCALE, max_chunk_len=chunk))
    windowed = seconds(lambda: paged_prefill(q, k_pages, v_pages, tables, lens, starts, SCALE, WINDOW,
                                             max_chunk_len=chunk))
    q_sdpa = q.view(batch, chunk, Q_HEADS, HEAD_DIM).transpose(1, 2)
    sdpa = torch_sdpa(q_sdpa, k_pages, v_pages, tables, causal_lower_right(chunk, context))
    sdpa_tflops = f"{flops / sdpa / 1e12:7.1f}" if sdpa else f"{'':>7}"
    return (f"{batch:5d} {context:7d} | {cell(plain, nbytes, bandwidth)} {flops / plain / 1e12:7.1f} | "
            f"{cell(windowed, nbytes, bandwidth)} | {cell(sdpa, nbytes, bandwidth)} {sdpa_tflops}")


def print_table(title: str, header: str, rows: Iterable[Callable[[], str]]) -> None:
    print(f"\n{title}\n{header}")
    for row in rows:
        print(row())
        torch.cuda.empty_cache()  # the next size may need the memory this one's cache held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller half of the batches and contexts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: the kernel benchmark needs CUDA; nothing to time")
        return
    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    decode_batches = DECODE_BATCHES[:2] if args.quick else DECODE_BATCHES
    prefill_batches = PREFILL_BATCHES[:1] if args.quick else PREFILL_BATCHES
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(1 GiB device-to-device copy, read + write)")
    print(f"geometry: {Q_HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, {DTYPE}, "
          f"block_size {BLOCK_SIZE}")
    print_table("store_kv: us and fraction of copy bandwidth (torch: store_kv_ref, index_copy_)",
                f"{'tokens':>7} | {'kernel':>16} | {'torch':>16}",
                (partial(store_kv_row, tokens, bandwidth) for tokens in (1, 64, PREFILL_CHUNK)))
    print_table("paged_decode: us and fraction of copy bandwidth (torch: SDPA over contiguous K/V)",
                f"{'batch':>5} {'context':>7} | {'kernel':>16} | {'with scores':>16} | {'torch':>16}",
                (partial(decode_row, batch, context, bandwidth) for batch in decode_batches for context in contexts))
    print_table(f"paged_prefill: the last min({PREFILL_CHUNK}, context) tokens of each sequence as one chunk; "
                "us, fraction of copy bandwidth and TFLOP/s (torch: SDPA over contiguous K/V)",
                f"{'batch':>5} {'context':>7} | {'kernel':>16} {'TFLOP/s':>7} | {f'window {WINDOW}':>16} | "
                f"{'torch':>16} {'TFLOP/s':>7}",
                (partial(prefill_row, batch, context, bandwidth) for batch in prefill_batches for context in contexts))


if __name__ == "__main__":
    main()
