// bfloat16 projections on Intel AMX: out = x @ W^T (+ add), with W packed once at load into AMX's
// B-tile layout. The contract is that of linear_bf16_ref in kernels/amx_linear.py.
//
// Packed layout: W [N, K] padded with zeros to [Np, Kp] (Np a multiple of 32, Kp of 32) and cut into
// 1 KiB tiles of 16 output rows x 32 inputs; tile (nb, kb) sits at ((nb * Kp / 32) + kb) * 512
// elements and holds W[nb * 16 + n][kb * 32 + 2 p + j] at p * 32 + n * 2 + j (the "VNNI" pair order
// TDPBF16PS reads). Each block of 16 outputs is one contiguous stream over K.
//
// Gated (SwiGLU) weights: W = [gate; up] [2I, K] is packed with its rows interleaved in blocks of 16
// (gate rows 16g..16g+15, then up rows 16g..16g+15, each gate part padded to a multiple of 16), so
// that one 32-output group holds a gate tile and its up tile and the epilogue writes silu(gate) * up
// [M, I] directly; the [M, 2I] product is never stored. It rounds as the unfused path does: gate and
// up to bfloat16, silu to bfloat16, then the product (pointwise.cpp's silu_mul).
//
// The work is cut into units: a range of 32-output groups (at most ~1 MiB of weights, which stays in
// L2) x a range of 32-row blocks of x. A unit walks its row blocks over its groups: two A tiles (x
// rows), two B tiles (weights), four float32 accumulator tiles per 32 x 32 block of the output. A
// decode step (1-32 rows) has one unit per thread, so each weight streams once, prefetched ahead,
// where torch's bfloat16 GEMM re-packs W on every call.
#include <algorithm>
#include <cstring>
#include <vector>

#include "amx.h"

namespace kv {

// weights walked over many rows at once (256 KiB was 3x slower at 2,048 rows of a 576 x 1536 weight)
static constexpr int64_t kChunkBytes = 1 << 20;
// 32-row blocks in a unit of a many-row call: small enough to balance two threads, large enough that
// a unit's weights are reused (8 and 16 were no faster at 2,048 rows, 4 the fastest at 512)
static constexpr int64_t kUnitRowBlocks = 4;

static inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

#if defined(KV_HAVE_AMX)
// tiles 0-3: accumulators (rows lo/hi x outputs lo/hi); 4-5: x rows lo/hi; 6-7: weights lo/hi
static void configure(int64_t rows_lo, int64_t rows_hi) {
    configure_tiles({rows_lo, rows_lo, rows_hi, rows_hi, rows_lo, rows_hi, kTileRows, kTileRows},
                    {64, 64, 64, 64, 64, 64, 64, 64});
}

// n is the output width: W's rows, or I for gated weights
static void linear(const bf16* x, int64_t x_stride, int64_t m, const bf16* packed, int64_t n, int64_t k,
                   const bf16* add, int64_t add_stride, bool gated, bf16* out, int threads) {
    const int64_t kp = round_up(k, kTileDepth), k_tiles = kp / kTileDepth;
    const int64_t groups = gated ? round_up(n, kTileRows) / kTileRows : round_up(n, 32) / 32;
    // x rows must be whole tiles wide: an unaligned K is copied into a zero-padded scratch
    std::vector<bf16> padded;
    if (kp != k) {
        padded.assign(static_cast<size_t>(m * kp), 0);
        for (int64_t r = 0; r < m; ++r) std::memcpy(&padded[r * kp], x + r * x_stride, k * sizeof(bf16));
        x = padded.data();
        x_stride = kp;
    }
    const int64_t x_bytes = x_stride * static_cast<int64_t>(sizeof(bf16));
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (2 * k_tiles * kTileElements * sizeof(bf16)));
    const int64_t unit_rows = kUnitRowBlocks * 2 * kTileRows;
    const int64_t group_ranges = m <= 2 * kTileRows ? std::min<int64_t>(groups, threads) : (groups + chunk - 1) / chunk;
    const int64_t row_ranges = (m + unit_rows - 1) / unit_rows;
#pragma omp parallel num_threads(threads)
    {
        alignas(64) float acc[2 * kTileRows][2 * kTileRows];
        int64_t configured = -1;
        // units from a shared counter rather than an even split up front: this host's two cores often
        // run at different speeds (a neighbour's load), and an even split left the faster one waiting
        // (1.1 - 1.35x at 512 rows). Consecutive units share their weights, which both threads then read.
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < group_ranges * row_ranges; ++unit) {
            const int64_t range = unit / row_ranges, first_row = unit % row_ranges * unit_rows;
            const int64_t first_group = groups * range / group_ranges, end_group = groups * (range + 1) / group_ranges;
            for (int64_t row = first_row; row < std::min(m, first_row + unit_rows); row += 2 * kTileRows) {
                const int64_t rows = m - row < 2 * kTileRows ? m - row : 2 * kTileRows;
                const int64_t rows_lo = rows < kTileRows ? rows : kTileRows, rows_hi = rows - rows_lo;
                if (rows != configured) {
                    configure(rows_lo, rows_hi);
                    configured = rows;
                }
                const bf16* x_lo = x + row * x_stride;
                const bf16* x_hi = x_lo + kTileRows * x_stride;
                for (int64_t g = first_group; g < end_group; ++g) {
                    const bf16* w_lo = packed + (2 * g) * k_tiles * kTileElements;
                    const bf16* w_hi = w_lo + k_tiles * kTileElements;
                    _tile_zero(0);
                    _tile_zero(1);
                    if (rows_hi) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    for (int64_t t = 0; t < k_tiles; ++t) {
                        // every line of both weight streams' tiles two steps ahead: a decode step waits on
                        // memory, and at 32 rows the 64 cycles of tile products per step would otherwise
                        // leave too few loads in flight (one line per tile was 1.4x slower at 32 rows,
                        // 1.13x at one row; 4 or 8 tiles ahead no better)
                        const auto* next_lo = reinterpret_cast<const char*>(w_lo + (t + 2) * kTileElements);
                        const auto* next_hi = reinterpret_cast<const char*>(w_hi + (t + 2) * kTileElements);
                        for (int64_t byte = 0; byte < kTileElements * 2; byte += 64) {
                            _mm_prefetch(next_lo + byte, _MM_HINT_T0);
                            _mm_prefetch(next_hi + byte, _MM_HINT_T0);
                        }
                        _tile_loadd(4, x_lo + t * kTileDepth, x_bytes);
                        _tile_loadd(6, w_lo + t * kTileElements, 64);
                        _tile_loadd(7, w_hi + t * kTileElements, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (rows_hi) {
                            _tile_loadd(5, x_hi + t * kTileDepth, x_bytes);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    constexpr int64_t stride = 2 * kTileRows * sizeof(float);
                    _tile_stored(0, &acc[0][0], stride);
                    _tile_stored(1, &acc[0][kTileRows], stride);
                    if (rows_hi) {
                        _tile_stored(2, &acc[kTileRows][0], stride);
                        _tile_stored(3, &acc[kTileRows][kTileRows], stride);
                    }
                    if (gated) {
                        const int64_t col = g * kTileRows, cols = n - col < kTileRows ? n - col : kTileRows;
                        const __mmask16 mask = first_lanes(cols);
                        for (int64_t r = 0; r < rows; ++r) {
                            const __m256i product = silu_mul16(round_bf16(_mm512_load_ps(acc[r])),
                                                               round_bf16(_mm512_load_ps(acc[r] + kTileRows)));
                            _mm256_mask_storeu_epi16(out + (row + r) * n + col, mask, product);
                        }
                        continue;
                    }
                    const int64_t col = g * 2 * kTileRows;
                    const int64_t cols = n - col < 2 * kTileRows ? n - col : 2 * kTileRows;
                    for (int64_t r = 0; r < rows; ++r) {
                        bf16* o = out + (row + r) * n + col;
                        const float* sums = acc[r];
                        if (add) {
                            const bf16* a = add + (row + r) * add_stride + col;
#pragma omp simd
                            for (int64_t c = 0; c < cols; ++c) o[c] = from_f32<bf16>(sums[c] + to_f32(a[c]));
                        } else {
#pragma omp simd
                            for (int64_t c = 0; c < cols; ++c) o[c] = from_f32<bf16>(sums[c]);
                        }
                    }
                }
            }
        }
        _tile_release();
    }
}
#endif

// where W[row][col] sits in the packed layout of a W with kp (padded) columns
static inline int64_t packed_index(int64_t row, int64_t col, int64_t kp) {
    const int64_t tile = (row / kTileRows) * (kp / kTileDepth) + col / kTileDepth;
    const int64_t pair = (col % kTileDepth) / 2;
    return tile * kTileElements + pair * 32 + (row % kTileRows) * 2 + col % 2;
}

}  // namespace kv

// 1 where this build has AMX and the OS grants it (asked here, once), else 0
extern "C" int kv_amx_available() {
#if defined(KV_HAVE_AMX)
    return kv::amx_permitted() ? 1 : 0;
#else
    return 0;
#endif
}

// w [n, k] -> packed (round_up(n, 32) * round_up(k, 32) elements, its padding zero)
extern "C" void kv_amx_pack(const void* w, int64_t n, int64_t k, void* packed, int threads) {
    const auto* src = static_cast<const kv::bf16*>(w);
    auto* dst = static_cast<kv::bf16*>(packed);
    const int64_t np = kv::round_up(n, 32), kp = kv::round_up(k, kv::kTileDepth);
    std::memset(dst, 0, np * kp * sizeof(kv::bf16));
#pragma omp parallel for num_threads(threads)
    for (int64_t row = 0; row < n; ++row)
        for (int64_t col = 0; col < k; ++col) dst[kv::packed_index(row, col, kp)] = src[row * k + col];
}

// x [m, k] (row stride x_stride), packed W, add [m, n] with row stride add_stride (0 for a bias) or
// null, out [m, n] contiguous; all bfloat16. With gated != 0, W is a gated weight packed as above,
// add is null and out = silu(x @ gate^T) * (x @ up^T) [m, n], n = I.
extern "C" void kv_amx_linear(const void* x, int64_t x_stride, int64_t m, const void* packed, int64_t n, int64_t k,
                              const void* add, int64_t add_stride, int gated, void* out, int threads) {
#if defined(KV_HAVE_AMX)
    kv::linear(static_cast<const kv::bf16*>(x), x_stride, m, static_cast<const kv::bf16*>(packed), n, k,
               static_cast<const kv::bf16*>(add), add_stride, gated != 0, static_cast<kv::bf16*>(out), threads);
#else
    (void)x, (void)x_stride, (void)m, (void)packed, (void)n, (void)k, (void)add, (void)add_stride, (void)gated,
        (void)out, (void)threads;
#endif
}
