"""The Triton kernels against their torch references, and the Triton backend against the torch one.

Without a GPU the kernels run on CPU tensors under the Triton interpreter. Inputs are small and
random; pages are scattered out of order in the pool, every slot no list holds (the null page,
free pages, the tail of a last page) is NaN for the kernels, so a read outside a head's list
shows, and every buffer the wrappers allocate starts as NaN, so an element never written shows.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_backend import TorchBackend
from kvserve.attention.triton_backend import TritonBackend
from kvserve.kernels import paged_decode as decode
from kvserve.kernels import paged_prefill as prefill
from kvserve.kernels import store_kv as store

# tests/conftest.py turns the interpreter on before anything imports triton when there is no GPU
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "no GPU and no TRITON_INTERPRET=1"

BLOCK_SIZE = 16
SCALE = 0.125
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
BFLOAT16_DOT = pytest.mark.skipif(DEVICE == "cpu", reason="the Triton 3.9 interpreter's tl.dot multiplies "
                                  "bfloat16 operands as their uint16 storage")

@pytest.fixture(autouse=True)
def nan_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every floating-point buffer allocated with torch.empty / empty_like starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Largest error relative to the largest reference magnitude; any NaN fails."""
    assert actual.shape == expected.shape
    error = (actual.float().cpu() - expected.float().cpu()).abs().max()
    assert not torch.isnan(actual).any(), "NaN in kernel output"
    assert error <= TOLERANCE[dtype] * expected.float().abs().max(), f"relative error {error}"


class Cache:
    """A page pool holding one page list per (sequence, layer, KV head), pages in random order.

    lens: [B, L, Hkv] tokens per list. `tables` [B, L, Hkv, P] pads each list with page 0 and one
    spare column; `k_pages` / `v_pages` are random everywhere, `k_poisoned` / `v_poisoned` are
    copies with NaN in every slot no list holds.
    """

    def __init__(self, lens: torch.Tensor, dim: int, dtype: torch.dtype, spare_pages: int = 3) -> None:
        counts = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.lens = lens.to(torch.int32)
        num_pages = 1 + int(counts.sum()) + spare_pages
        order = (torch.randperm(num_pages - 1) + 1).tolist()  # page 0 is the null page
        self.tables = torch.zeros(*lens.shape, int(counts.max()) + 1, dtype=torch.int32)
        held = torch.zeros(num_pages, BLOCK_SIZE, dtype=torch.bool)
        for index in torch.cartesian_prod(*(torch.arange(n) for n in lens.shape)).tolist():
            length = int(lens[tuple(index)])
            for p in range((length + BLOCK_SIZE - 1) // BLOCK_SIZE):
                page = order.pop()
                self.tables[tuple(index)][p] = page
                held[page, : min(BLOCK_SIZE, length - p * BLOCK_SIZE)] = True
        self.k_pages = torch.randn(num_pages, BLOCK_SIZE, dim).to(dtype)
        self.v_pages = torch.randn(num_pages, BLOCK_SIZE, dim).to(dtype)
        self.k_poisoned = self.k_pages.masked_fill(~held[..., None], float("nan"))
        self.v_poisoned = self.v_pages.masked_fill(~held[..., None], float("nan"))

    def slot(self, b: int, layer: int, head: int, position: int) -> int:
        page = int(self.tables[b, layer, head, position // BLOCK_SIZE])
        return page * BLOCK_SIZE + position % BLOCK_SIZE


def layer_view(lens: list[list[int]], dim: int, dtype: torch.dtype) -> tuple[Cache, torch.Tensor, torch.Tensor]:
    """A two-layer cache whose layer 1 holds `lens` [B][Hkv]; returns it and that layer's tables
    and lengths as the strided views the engine passes to the kernels."""
    lens_1 = torch.tensor(lens)
    lens_0 = torch.randint(1, 40, lens_1.shape)
    cache = Cache(torch.stack([lens_0, lens_1], dim=1), dim, dtype)
    return cache, cache.tables[:, 1].to(DEVICE), cache.lens[:, 1].to(DEVICE)


@pytest.mark.parametrize(("tokens", "source", "pool_dtype"), [
    (1, torch.float32, torch.float32), (7, torch.float32, torch.float32), (5, torch.bfloat16, torch.bfloat16),
    (5, torch.float32, torch.bfloat16)])
def test_store_kv_matches_reference(tokens: int, source: torch.dtype, pool_dtype: torch.dtype) -> None:
    kv_heads, q_heads, dim, num_pages = 3, 9, 64, 6
    pool = torch.randn(num_pages, BLOCK_SIZE, dim).to(pool_dtype)
    slots = torch.randperm((num_pages - 1) * BLOCK_SIZE)[: tokens * kv_heads] + BLOCK_SIZE
    slot_index = slots.view(tokens, kv_heads)
    # k and v are strided views of a fused qkv projection
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, dim).to(source)
    k, v = qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    expected_k, expected_v = pool.clone(), pool.clone()
    store.store_kv_ref(k, v, expected_k, expected_v, slot_index)
    k_pages, v_pages = pool.clone().to(DEVICE), pool.clone().to(DEVICE)
    store.store_kv(k.to(DEVICE), v.to(DEVICE), k_pages, v_pages, slot_index.to(DEVICE))
    if source != pool_dtype and DEVICE == "cpu":
        # the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest
        assert_close(k_pages, expected_k, torch.bfloat16)
        assert_close(v_pages, expected_v, torch.bfloat16)
    else:
        assert torch.equal(k_pages.cpu(), expected_k)
        assert torch.equal(v_pages.cpu(), expected_v)


DECODE_CASES = [
    pytest.param(dict(lens=[[1, 1], [1, 1]], group=1, dim=64, partition=None), id="length-1"),
    pytest.param(dict(lens=[[17, 33], [5, 48], [16, 1]], group=3, dim=64, partition=48), id="ragged-heads-gqa3"),
    pytest.param(dict(lens=[[31, 64, 2]], group=4, dim=128, partition=32), id="gqa4-head-dim-128"),
    pytest.param(dict(lens=[[1, 2], [300, 257], [40, 3]], group=4, dim=64, partition=64),
                 id="very-different-lengths"),
    pytest.param(dict(lens=[[300, 7], [9, 100]], group=1, dim=128, partition=None), id="one-partition"),
    pytest.param(dict(lens=[[20, 45], [70, 9]], group=3, dim=128, partition=32, dtype=torch.bfloat16),
                 id="bfloat16", marks=BFLOAT16_DOT),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_paged_decode_matches_reference(case: dict) -> None:
    dtype = case.get("dtype", torch.float32)
    cache, tables, lens = layer_view(case["lens"], case["dim"], dtype)
    batch, kv_heads = lens.shape
    q = torch.randn(batch, kv_heads * case["group"], case["dim"]).to(dtype)
    out, lse, (sums, maxes) = decode.paged_decode_ref(q, cache.k_pages, cache.v_pages, tables.cpu(), lens.cpu(),
                                                      SCALE, want_scores=True)
    got_out, got_lse, got_scores = decode.paged_decode(
        q.to(DEVICE), cache.k_poisoned.to(DEVICE), cache.v_poisoned.to(DEVICE), tables, lens, SCALE,
        want_scores=True, partition_size=case["partition"])
    assert got_out.dtype == out.dtype and got_lse.dtype == torch.float32
    assert_close(got_out, out, dtype)
    assert_close(got_lse, lse, dtype)
    assert_close(got_scores[0], sums, dtype)
    assert_close(got_scores[1], maxes, dtype)
    assert decode.paged_decode(q.to(DEVICE), cache.k_poisoned.to(DEVICE), cache.v_poisoned.to(DEVICE), tables,
                               lens, SCALE)[2] is None


def test_attention_scores_accumulates_into_a_strided_buffer() -> None:
    cache, tables, lens = layer_view([[23, 70], [1, 40]], 64, torch.float32)
    batch, kv_heads = lens.shape
    q = torch.randn(batch, kv_heads * 4, 64)
    _, lse, (sums, maxes) = decode.paged_decode_ref(q, cache.k_pages, cache.v_pages, tables.cpu(), lens.cpu(),
                                                    SCALE, want_scores=True)
    # one layer of per-layer buffers, wider than this step's slots
    slots = sums.shape[-1]
    total = torch.rand(batch, 2, kv_heads, slots + 5)
    latest = torch.full_like(total, float("nan"))
    total_view, latest_view = total.clone().to(DEVICE)[:, 1], latest.to(DEVICE)[:, 1]
    decode.attention_scores(q.to(DEVICE), cache.k_poisoned.to(DEVICE), tables, lens, lse.to(DEVICE), SCALE,
                            total_view, latest_view, partition_size=32)
    assert_close(total_view[..., :slots], total[:, 1, :, :slots] + sums)
    assert torch.equal(total_view[..., slots:].cpu(), total[:, 1, :, slots:])
    assert_close(latest_view[..., :slots], maxes)
    assert torch.equal(latest_view[..., slots:].cpu(), torch.zeros(batch, kv_heads, 5))


PREFILL_CASES = [
    pytest.param(dict(chunks=[1], lens=[[1, 1]], group=4, dim=64, window=4), id="single-token-prompt"),
    pytest.param(dict(chunks=[20], lens=[[20, 20]], group=1, dim=64, window=0), id="prompt-without-context"),
    pytest.param(dict(chunks=[2, 19, 7], lens=[[40, 19], [19, 33], [7, 60]], group=3, dim=64, window=8),
                 id="context-ragged-heads-gqa3"),
    pytest.param(dict(chunks=[40, 3], lens=[[120, 41, 40], [3, 50, 17]], group=4, dim=128, window=16),
                 id="gqa4-head-dim-128"),
    pytest.param(dict(chunks=[130], lens=[[150, 135]], group=1, dim=64, window=4), id="group-1-two-query-tiles"),
    # per-sequence windows (a whole-chunk observer, a 3-query one, one observing nothing) in one batch
    pytest.param(dict(chunks=[12, 9, 5], lens=[[30, 12], [9, 20], [40, 5]], group=3, dim=64,
                      window=torch.tensor([12, 3, 0])), id="per-sequence-windows"),
    pytest.param(dict(chunks=[9, 30], lens=[[9, 50], [64, 31]], group=3, dim=128, window=8, dtype=torch.bfloat16),
                 id="bfloat16", marks=BFLOAT16_DOT),
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_paged_prefill_matches_reference(case: dict) -> None:
    dtype = case.get("dtype", torch.float32)
    cache, tables, lens = layer_view(case["lens"], case["dim"], dtype)
    kv_heads = lens.shape[1]
    chunks = torch.tensor(case["chunks"])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), chunks.cumsum(0)])
    q = torch.randn(int(chunks.sum()), kv_heads * case["group"], case["dim"]).to(dtype)
    out, window = prefill.paged_prefill_ref(q, cache.k_pages, cache.v_pages, tables.cpu(), lens.cpu(), starts, SCALE,
                                            case["window"])
    got_out, got_window = prefill.paged_prefill(q.to(DEVICE), cache.k_poisoned.to(DEVICE),
                                                cache.v_poisoned.to(DEVICE), tables, lens, starts.to(DEVICE), SCALE,
                                                case["window"])
    assert got_out.dtype == out.dtype
    assert_close(got_out, out, dtype)
    if isinstance(case["window"], torch.Tensor) or case["window"]:
        assert_close(got_window, window, dtype)
    else:
        assert got_window is None


def make_step(cache: Cache, new_tokens: list[int], observe: bool) -> AttentionMetadata:
    """Metadata for one step in which sequence b appends new_tokens[b] tokens to every list (its
    lengths in `cache` are after the append); one new token makes it a decode row."""
    batch, layers, kv_heads = cache.lens.shape
    slot_index = torch.tensor([[[cache.slot(b, layer, h, int(cache.lens[b, layer, h]) - n + j)
                                 for h in range(kv_heads)]
                                for b, n in enumerate(new_tokens) for j in range(n)]
                               for layer in range(layers)])
    token_start = torch.tensor([0, *new_tokens]).cumsum(0)
    decode_rows = [b for b, n in enumerate(new_tokens) if n == 1]
    prefill_rows = [b for b, n in enumerate(new_tokens) if n > 1]
    prefill_tokens = [t for b in prefill_rows for t in range(int(token_start[b]), int(token_start[b + 1]))]
    prefill_lens = torch.tensor([new_tokens[b] for b in prefill_rows], dtype=torch.int64)
    return AttentionMetadata(
        block_tables=cache.tables.to(DEVICE), seq_lens=cache.lens.to(DEVICE), slot_index=slot_index.to(DEVICE),
        decode_rows=torch.tensor(decode_rows, dtype=torch.int64, device=DEVICE),
        decode_tokens=token_start[decode_rows].to(DEVICE),
        prefill_rows=torch.tensor(prefill_rows, dtype=torch.int64, device=DEVICE),
        prefill_tokens=torch.tensor(prefill_tokens, dtype=torch.int64, device=DEVICE),
        prefill_query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int64), prefill_lens.cumsum(0)]).to(DEVICE),
        observe_decode=observe,
        prefill_windows=torch.tensor([6] * len(prefill_rows), device=DEVICE) if observe and prefill_rows else None)


@pytest.mark.parametrize("new_tokens", [[1, 5, 1], [1, 1]], ids=["mixed", "all-decode"])
@pytest.mark.parametrize("observe", [False, True], ids=["plain", "observed"])
def test_triton_backend_matches_torch_backend(new_tokens: list[int], observe: bool) -> None:
    layers, kv_heads, group, dim = 2, 2, 3, 64
    lens = torch.stack([torch.randint(n, 50, (layers, kv_heads)) for n in new_tokens])
    cache = Cache(lens, dim, torch.float32)
    tokens = sum(new_tokens)
    # strided views of one [T, Hq + Hkv, D] tensor, as the model passes q and k after RoPE
    qk = torch.randn(tokens, kv_heads * (group + 1), dim)
    q, k, v = qk[:, :kv_heads * group], qk[:, kv_heads * group:], torch.randn(tokens, kv_heads, dim)
    torch_meta, triton_meta = make_step(cache, new_tokens, observe), make_step(cache, new_tokens, observe)
    torch_side = TorchBackend(cache.k_pages.clone().to(DEVICE), cache.v_pages.clone().to(DEVICE), SCALE)
    triton_side = TritonBackend(cache.k_pages.clone().to(DEVICE), cache.v_pages.clone().to(DEVICE), SCALE)
    for layer in range(layers):
        expected = torch_side.forward(layer, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch_meta)
        assert_close(triton_side.forward(layer, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), triton_meta), expected)
        if observe:
            for got, want in zip(triton_meta.decode_scores[layer], torch_meta.decode_scores[layer], strict=True):
                assert_close(got, want)
            if 5 in new_tokens:
                assert_close(triton_meta.window_scores[layer], torch_meta.window_scores[layer])
    assert torch.equal(triton_side.k_pages, torch_side.k_pages)
    assert torch.equal(triton_side.v_pages, torch_side.v_pages)
