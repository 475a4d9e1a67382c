// float32 projections: out = x @ W^T (+ add), over W packed once at load into panels that the
// register-blocked tile below streams in order. The contract is that of linear_f32_ref in
// kernels/f32_linear.py.
//
// Packed layout: W [N, K] padded with zero rows to a multiple of kPanel (two vectors of the build's
// width: 16 outputs with AVX2, 32 with AVX-512) and cut into panels of kPanel rows; panel p holds
// W[p * kPanel + j][i] at (p * K + i) * kPanel + j, so that each step over K reads one contiguous
// kPanel-wide slice and the whole panel is one stream.
//
// Gated (SwiGLU) weights: W = [gate; up] [2I, K] is packed with each panel's first vector of outputs
// from gate and its second from the same outputs of up (gate rows kLanes p .. kLanes p + kLanes - 1,
// then the up rows of those outputs), so the epilogue writes silu(gate) * up [M, I] from registers
// and the [M, 2I] product is never stored. silu is common.h's, in float32 (its silu8 at AVX2).
//
// Every output is one chain of FMAs over k = 0 .. K-1 in order, started from zero, held in one
// register lane until the epilogue adds the bias or residual: its bits depend on K alone, never on
// how many rows share the call, where the row sits in the batch, or how the work is split between
// threads (torch's GEMM picks its blocking, and so its summation order, by the shape).
//
// The work is cut into units: a range of panels (at most kChunkBytes of weights, which stays in L2)
// x a range of rows. A unit walks its rows kRows at a time, and for each row block every panel of its
// range: the rows' accumulators (kRows x 2 vectors) stay in registers over the whole of K, the block's
// rows of x stay in L1 and the range's weights in L2 across the blocks. A decode step (1-32 rows) has
// a single range of rows, so each weight is read from memory once per call.
#include <algorithm>
#include <cmath>
#include <utility>

#include "common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kv {
namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
// 8 rows x 2 vectors: 16 accumulators, enough independent FMA chains to cover the FMA latency of
// two pipes, with room left for the weights and the broadcast row value
constexpr int kRows = 8;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
// 6 rows x 2 vectors: 12 accumulators + 2 weight vectors + 1 broadcast of AVX2's 16 registers
constexpr int kRows = 6;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
#else
// scalar fallback: one lane, std::fma so that the compiler cannot contract some sums and not others
using Vec = float;
constexpr int kLanes = 1;
constexpr int kRows = 4;
inline Vec vzero() { return 0.0f; }
inline Vec vload(const float* p) { return *p; }
inline void vstore(float* p, Vec v) { *p = v; }
inline Vec vbroadcast(const float* p) { return *p; }
inline Vec vfma(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return a + b; }
#endif

constexpr int kPanel = 2 * kLanes;
// a unit's weights, re-read from L2 by each of its row blocks (fits the 512 KiB L2 of Zen 2/3 with
// room for the rows of x)
constexpr int64_t kChunkBytes = 256 << 10;
// rows in a unit of a many-row call: the unit's weights come from L3 or memory once per this many rows
constexpr int64_t kUnitRows = 96;

// Panels side by side in one tile: few rows leave few accumulators, too few FMA chains to hide the
// FMA latency (and too few loads in flight for a batch-1 weight stream), so those tiles take more
// panels at once. Never more accumulators than the registers hold beside the weights.
template <int R> constexpr int panels_per_tile() {
    return R == 1 ? 4 : R == 2 ? 2 : (kLanes == 16 && R <= 4) ? 2 : 1;
}

// Whether a tile prefetches the panels after its own while it runs. A tile of many rows spends long
// enough on each panel that the next one's memory latency would show when it starts, so it asks
// for that panel (into L2) meanwhile; few-row tiles stream too fast for that to pay, and the
// hardware prefetcher follows their streams alone (prefetching them was slower at 1-4 rows).
template <int R, int P> constexpr bool prefetches() { return P == 1 && R >= 3; }

constexpr int kLineFloats = 64 / sizeof(float);

struct Job {
    const float* x;
    int64_t x_stride, m;
    const float* packed;
    int64_t n, k;  // n: the output width (I for a gated weight)
    const float* add;
    int64_t add_stride;
    bool gated;
    float* out;
};

// pairs[2i] = silu(pairs[2i]) * pairs[2i + 1], for `count` pairs of (gate, up) vectors. One call per
// tile, so the pairs' exp and division overlap rather than wait on each other; out of line and not
// cloned, so that every tile shares one compiled copy (a copy per tile shape could be vectorised or
// contracted into FMAs differently, and a row's bits would then depend on the rows beside it).
__attribute__((noipa)) void swiglu(float* pairs, int count) {
    for (int i = 0; i < count; ++i) {
        float* gate = pairs + 2 * i * kLanes;
        const float* up = gate + kLanes;
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
        // common.h's silu8: at AVX2 gcc leaves a loop of the scalar silu scalar (its clamps become branches)
        vstore(gate, _mm256_mul_ps(silu8(vload(gate)), vload(up)));
#else
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) gate[l] = silu(gate[l]) * up[l];
#endif
    }
}

// one row's kLanes outputs of a gated panel
inline void store_gated(const Job& job, int64_t row, int64_t panel, const float* product) {
    const int64_t col = panel * kLanes, cols = std::min<int64_t>(kLanes, job.n - col);
    float* o = job.out + row * job.n + col;
    if (cols == kLanes) {
        vstore(o, vload(product));
        return;
    }
    for (int64_t l = 0; l < cols; ++l) o[l] = product[l];
}

// one row's kPanel outputs of a plain panel: the sums, plus the bias or residual
inline void store_plain(const Job& job, int64_t row, int64_t panel, Vec lo, Vec hi) {
    const int64_t col = panel * kPanel, cols = std::min<int64_t>(kPanel, job.n - col);
    float* o = job.out + row * job.n + col;
    const float* a = job.add ? job.add + row * job.add_stride + col : nullptr;
    if (cols == kPanel) {
        if (a) {
            lo = vadd(lo, vload(a));
            hi = vadd(hi, vload(a + kLanes));
        }
        vstore(o, lo);
        vstore(o + kLanes, hi);
        return;
    }
    // the last panel: its padding outputs are computed (from zero weights) but never stored, and
    // the add reads no further than the row's n values
    alignas(64) float sums[kPanel];
    vstore(sums, lo);
    vstore(sums + kLanes, hi);
    for (int64_t c = 0; c < cols; ++c) o[c] = a ? sums[c] + a[c] : sums[c];
}

// rows [row, row + R) x panels [panel, panel + P): R x 2P accumulators over the whole of K
template <int R, int P> inline void tile(const Job& job, int64_t row, int64_t panel) {
    const int64_t k = job.k, panel_floats = k * kPanel;
    const float* w = job.packed + panel * panel_floats;
    const float* x[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) x[r] = job.x + (row + r) * job.x_stride;
    Vec acc[R][2 * P];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < 2 * P; ++v) acc[r][v] = vzero();
    for (int64_t i = 0; i < k; ++i) {
        // the next panels, into L2 (see prefetches)
        if constexpr (prefetches<R, P>())
#pragma GCC unroll 8
            for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
                for (int line = 0; line < kPanel; line += kLineFloats)
                    __builtin_prefetch(w + (P + p) * panel_floats + i * kPanel + line, 0, 2);
        Vec weights[2 * P];
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
            weights[2 * p] = vload(w + p * panel_floats + i * kPanel);
            weights[2 * p + 1] = vload(w + p * panel_floats + i * kPanel + kLanes);
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const Vec xv = vbroadcast(x[r] + i);
#pragma GCC unroll 16
            for (int v = 0; v < 2 * P; ++v) acc[r][v] = vfma(xv, weights[v], acc[r][v]);
        }
    }
    if (job.gated) {
        alignas(64) float pairs[R * 2 * P * kLanes];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
            for (int v = 0; v < 2 * P; ++v) vstore(pairs + (r * 2 * P + v) * kLanes, acc[r][v]);
        swiglu(pairs, R * P);
        for (int r = 0; r < R; ++r)
            for (int p = 0; p < P; ++p) store_gated(job, row + r, panel + p, pairs + (r * 2 * P + 2 * p) * kLanes);
        return;
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) store_plain(job, row + r, panel + p, acc[r][2 * p], acc[r][2 * p + 1]);
}

// R rows over panels [first, end): P at a time, the rest one at a time
template <int R> void row_block(const Job& job, int64_t row, int64_t first, int64_t end) {
    constexpr int P = panels_per_tile<R>();
    int64_t panel = first;
    for (; panel + P <= end; panel += P) tile<R, P>(job, row, panel);
    for (; panel < end; ++panel) tile<R, 1>(job, row, panel);
}

template <int... R>
void dispatch(std::integer_sequence<int, R...>, int rows, const Job& job, int64_t row, int64_t first, int64_t end) {
    ((rows == R + 1 ? row_block<R + 1>(job, row, first, end) : void()), ...);
}

void linear(const Job& job, int threads) {
    const int64_t width = job.gated ? kLanes : kPanel;
    const int64_t panels = (job.n + width - 1) / width;
    const int64_t panel_bytes = job.k * kPanel * static_cast<int64_t>(sizeof(float));
    int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(panel_bytes, 1));
    const int64_t row_ranges = (job.m + kUnitRows - 1) / kUnitRows;
    // at least 4 units per thread where the panels allow, so that the faster core takes more of them
    if (row_ranges < 4 * threads) chunk = std::min(chunk, std::max<int64_t>(1, panels * row_ranges / (4 * threads)));
    const int64_t panel_ranges = (panels + chunk - 1) / chunk;
    const int64_t units = panel_ranges * row_ranges;
    // units from a shared counter rather than an even split up front: this host's two cores often run
    // at different speeds (a neighbour's load), and an even split leaves the faster one waiting.
    // Consecutive units share their panels, which both threads then read while they are in L3.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t range = unit / row_ranges, first_row = unit % row_ranges * kUnitRows;
        const int64_t first = panels * range / panel_ranges, end = panels * (range + 1) / panel_ranges;
        const int64_t end_row = std::min(job.m, first_row + kUnitRows);
        for (int64_t row = first_row; row < end_row; row += kRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kRows, end_row - row));
            dispatch(std::make_integer_sequence<int, kRows>(), rows, job, row, first, end);
        }
    }
}

inline int64_t panel_count(int64_t n, bool gated) {
    return gated ? (n / 2 + kLanes - 1) / kLanes : (n + kPanel - 1) / kPanel;
}

}  // namespace
}  // namespace kv

// the floats in a vector of this build: 16 (AVX-512), 8 (AVX2 + FMA) or 1 (the scalar fallback)
extern "C" int kv_f32_lanes() { return kv::kLanes; }

// floats of a packed W [n, k] (n = 2I rows for a gated weight)
extern "C" int64_t kv_f32_packed_floats(int64_t n, int64_t k, int gated) {
    return kv::panel_count(n, gated != 0) * k * kv::kPanel;
}

// w [n, k] -> packed (kv_f32_packed_floats(n, k, gated) floats, its padding zero)
extern "C" void kv_f32_pack(const float* w, int64_t n, int64_t k, int gated, float* packed, int threads) {
    constexpr int64_t lanes = kv::kLanes, width = kv::kPanel;
    const int64_t panels = kv::panel_count(n, gated != 0), half = n / 2;
#pragma omp parallel for num_threads(threads)
    for (int64_t p = 0; p < panels; ++p) {
        for (int64_t j = 0; j < width; ++j) {
            // the source row of this panel's j-th output, or -1 for padding
            int64_t src = p * width + j;
            if (gated) {
                const int64_t output = p * lanes + j % lanes;
                src = output >= half ? -1 : j < lanes ? output : half + output;
            } else if (src >= n) {
                src = -1;
            }
            float* dst = packed + p * k * width + j;
            for (int64_t i = 0; i < k; ++i) dst[i * width] = src < 0 ? 0.0f : w[src * k + i];
        }
    }
}

// x [m, k] (row stride x_stride), packed W, add [m, n] with row stride add_stride (0 for a bias [n])
// or null, out [m, n] contiguous; all float32. With gated != 0, W is a gated weight packed as above,
// add is null and out = silu(x @ gate^T) * (x @ up^T) [m, n], n = I.
extern "C" void kv_f32_linear(const float* x, int64_t x_stride, int64_t m, const float* packed, int64_t n, int64_t k,
                              const float* add, int64_t add_stride, int gated, float* out, int threads) {
    kv::linear({x, x_stride, m, packed, n, k, add, add_stride, gated != 0, out}, threads);
}
