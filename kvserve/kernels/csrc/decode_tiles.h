// The pieces every CPU decode kernel is built from (paged_decode.cpp, thin_decode.cpp,
// quant_decode.cpp): the G query heads of a KV group against a run of key rows (page_logits), the
// softmax of their logits (softmax_rows), the probabilities times a run of value rows
// (page_accumulate), prefetching, and where a compressed record lies in the pool (RecordList).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace kv {

// fn(std::integral_constant<int, n>) for a runtime 1 <= n <= kMax: with the head count of a block
// fixed at compile time its accumulators stay in registers and its loops carry no per-head branches
template <int kMax, typename Fn>
static inline void with_count(int n, Fn&& fn) {
    if constexpr (kMax > 1)
        if (n < kMax) return with_count<kMax - 1>(n, fn);
    fn(std::integral_constant<int, kMax>{});
}

// a . b over dim elements. The sum runs in 16 lanes, folded as a tree at the end: a plain reduction
// loop ends in a chain of scalar adds, since without -ffast-math the compiler keeps their order.
static inline float dot(const float* __restrict a, const float* __restrict b, int dim) {
    constexpr int kLanes = 16;
    if (dim % kLanes != 0) {
        float sum = 0.0f;
        for (int d = 0; d < dim; ++d) sum += a[d] * b[d];
        return sum;
    }
    float lanes[kLanes] = {};
    for (int d0 = 0; d0 < dim; d0 += kLanes)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) lanes[l] += a[d0 + l] * b[d0 + l];
    for (int width = kLanes / 2; width > 0; width /= 2)
#pragma omp simd
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    return lanes[0];
}

#if defined(__AVX512F__)
// r[j] = the sum of v[j]'s 16 lanes: 16 dot products finished together by a transposing tree of
// shuffles and adds (15 adds in all), where one horizontal sum per key would take 4 each
static inline __m512 sum_lanes16(const __m512* v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 consecutive elements as float32 lanes, converted in registers (a bfloat16 page is never
// copied out as float32: that copy cost as much as the products it fed)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
#if defined(__AVX2__) && defined(__FMA__)
// sum_lanes16 for 8 lanes: r[j] = the sum of v[j]'s 8 lanes, by the same kind of tree (7 adds)
static inline __m256 sum_lanes8(const __m256* v) {
    __m256 a[4], b[2];
    for (int i = 0; i < 4; ++i)
        a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

// page_logits for H heads: 8 keys at a time, the last block masked. 16 registers cannot hold a key
// row: each 8-element chunk of it is loaded (and widened) once and used at once by the H heads'
// accumulators. Up to 6 heads take two keys per step, each query chunk loaded once for both: twice
// the independent FMA chains (one per head would leave the FMAs waiting on each other) and half the
// query loads.
template <int H, int DIM, typename T>
static inline void logits_avx2(const float* __restrict q, const T* __restrict keys, int64_t count, int dim,
                               int64_t stride, float* __restrict logits) {
    constexpr int K = H <= 6 ? 2 : 1;  // K x H sums, K key chunks and a query chunk
    const int width = DIM > 0 ? DIM : dim;
    for (int64_t j0 = 0; j0 < count; j0 += 8) {
        const int64_t rows = std::min<int64_t>(count - j0, 8);
        __m256 partial[H][8];
        for (int64_t j = 0; j < 8; j += K) {
            __m256 acc[K][H];
            for (int k = 0; k < K; ++k)
                for (int g = 0; g < H; ++g) acc[k][g] = _mm256_setzero_ps();
            // the products with keys j .. j + N - 1 of the block; keys past the page's count are not
            // read (a short last page may end the pool) and their lanes are not stored
            auto products = [&](auto keys_now) {
                constexpr int N = decltype(keys_now)::value;
                const T* row = keys + (j0 + j) * width;
                for (int d = 0; d < width; d += 8) {
                    __m256 key[N];
                    for (int k = 0; k < N; ++k) key[k] = load8(row + k * width + d);
                    for (int g = 0; g < H; ++g) {
                        const __m256 query = _mm256_loadu_ps(q + g * width + d);
                        for (int k = 0; k < N; ++k) acc[k][g] = _mm256_fmadd_ps(query, key[k], acc[k][g]);
                    }
                }
            };
            if (j + K <= rows) products(std::integral_constant<int, K>{});
            else if (j < rows) products(std::integral_constant<int, 1>{});
            for (int k = 0; k < K; ++k)
                for (int g = 0; g < H; ++g) partial[g][j + k] = acc[k][g];
        }
        for (int g = 0; g < H; ++g)
            _mm256_maskstore_ps(logits + g * stride + j0, first_lanes8(rows), sum_lanes8(partial[g]));
    }
}

// page_accumulate for H heads: no whole output row fits in 16 registers, so the rows go in column
// blocks of C chunks, each block's H x C sums in registers across the page (chains of FMAs long
// enough to hide their latency) and each value chunk loaded (and widened) once for the H heads
template <int H, int DIM, typename T>
static inline void accumulate_avx2(const float* __restrict weights, int64_t stride, const T* __restrict values,
                                   int64_t count, int dim, float* __restrict acc) {
    constexpr int C = H <= 2 ? 4 : H <= 4 ? 3 : 2;  // H x C sums, C value chunks and a weight
    const int width = DIM > 0 ? DIM : dim;
    auto block = [&](int d0, auto columns) {
        constexpr int kCols = decltype(columns)::value;
        __m256 sums[H][kCols];
        for (int g = 0; g < H; ++g)
            for (int c = 0; c < kCols; ++c) sums[g][c] = _mm256_loadu_ps(acc + g * width + d0 + 8 * c);
        for (int64_t j = 0; j < count; ++j) {
            __m256 value[kCols];
            for (int c = 0; c < kCols; ++c) value[c] = load8(values + j * width + d0 + 8 * c);
            for (int g = 0; g < H; ++g) {
                const __m256 w = _mm256_set1_ps(weights[g * stride + j]);
                for (int c = 0; c < kCols; ++c) sums[g][c] = _mm256_fmadd_ps(w, value[c], sums[g][c]);
            }
        }
        for (int g = 0; g < H; ++g)
            for (int c = 0; c < kCols; ++c) _mm256_storeu_ps(acc + g * width + d0 + 8 * c, sums[g][c]);
    };
    int d0 = 0;
    for (; d0 + 8 * C <= width; d0 += 8 * C) block(d0, std::integral_constant<int, C>{});
    if constexpr (C > 1)
        if (d0 < width) with_count<C - 1>((width - d0) / 8, [&](auto columns) { block(d0, columns); });
}
#endif

// logits[g * stride + j] = q_g . keys[j] for the G query heads of a KV group and the first `count`
// rows of a page: each key is loaded once for all G heads
template <int DIM, typename T>
static inline void page_logits(const float* __restrict q, int group, const T* __restrict keys, int64_t count,
                               int dim, int64_t stride, float* __restrict logits, float* __restrict scratch) {
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
        constexpr int kChunks = DIM / 16, kHeads = 4;
        // 16 keys at a time, the last block masked
        for (int64_t j0 = 0; j0 < count; j0 += 16) {
            const int64_t rows = std::min<int64_t>(count - j0, 16);
            for (int g0 = 0; g0 < group; g0 += kHeads) {
                __m512 partial[kHeads][16];
                for (int64_t j = 0; j < 16; ++j) {
                    __m512 key[kChunks];
                    if (j < rows)
                        for (int c = 0; c < kChunks; ++c) key[c] = load16(keys + (j0 + j) * DIM + 16 * c);
                    for (int g = 0; g < kHeads; ++g) {
                        if (g0 + g >= group) break;
                        if (j >= rows) {
                            partial[g][j] = _mm512_setzero_ps();
                            continue;
                        }
                        const float* qg = q + (g0 + g) * DIM;
                        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), key[0]);
                        for (int c = 1; c < kChunks; ++c)
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), key[c], acc);
                        partial[g][j] = acc;
                    }
                }
                for (int g = 0; g < kHeads && g0 + g < group; ++g)
                    _mm512_mask_storeu_ps(logits + (g0 + g) * stride + j0, first_lanes(rows), sum_lanes16(partial[g]));
            }
        }
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    // any head size of whole 8-lane chunks (80 too); DIM > 0 just fixes the chunk count at compile time
    if ((DIM > 0 ? DIM : dim) % 8 == 0) {
        constexpr int kHeads = 8;  // 8 sums, a key chunk and a query chunk (logits_avx2)
        const int width = DIM > 0 ? DIM : dim;
        for (int g0 = 0; g0 < group; g0 += kHeads)
            with_count<kHeads>(std::min(kHeads, group - g0), [&](auto heads) {
                logits_avx2<decltype(heads)::value, DIM>(q + g0 * width, keys, count, width, stride,
                                                         logits + g0 * stride);
            });
        return;
    }
#endif
    const float* rows = load_row(keys, scratch, count * dim);
    for (int g = 0; g < group; ++g)
        for (int64_t j = 0; j < count; ++j) logits[g * stride + j] = dot(q + g * dim, rows + j * dim, dim);
}

// acc[g][d] += sum_j weights[g * stride + j] * values[j][d] for the G query heads and the first
// `count` rows of a page: each value row is loaded once for all G heads, whose output rows stay in
// registers across the page
template <int DIM, typename T>
static inline void page_accumulate(const float* __restrict weights, int group, int64_t stride,
                                   const T* __restrict values, int64_t count, int dim, float* __restrict acc,
                                   float* __restrict scratch) {
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
        constexpr int kChunks = DIM / 16, kHeads = kChunks >= 16 ? 1 : 16 / kChunks;
        for (int g0 = 0; g0 < group; g0 += kHeads) {
            __m512 sums[kHeads][kChunks];
            for (int g = 0; g < kHeads && g0 + g < group; ++g)
                for (int c = 0; c < kChunks; ++c) sums[g][c] = _mm512_loadu_ps(acc + (g0 + g) * DIM + 16 * c);
            for (int64_t j = 0; j < count; ++j) {
                __m512 value[kChunks];
                for (int c = 0; c < kChunks; ++c) value[c] = load16(values + j * DIM + 16 * c);
                for (int g = 0; g < kHeads; ++g) {
                    if (g0 + g >= group) break;
                    const __m512 w = _mm512_set1_ps(weights[(g0 + g) * stride + j]);
                    for (int c = 0; c < kChunks; ++c) sums[g][c] = _mm512_fmadd_ps(w, value[c], sums[g][c]);
                }
            }
            for (int g = 0; g < kHeads && g0 + g < group; ++g)
                for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + (g0 + g) * DIM + 16 * c, sums[g][c]);
        }
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if ((DIM > 0 ? DIM : dim) % 8 == 0) {
        constexpr int kHeads = 6;  // 12 sums, 2 value chunks and a weight (accumulate_avx2)
        const int width = DIM > 0 ? DIM : dim;
        for (int g0 = 0; g0 < group; g0 += kHeads)
            with_count<kHeads>(std::min(kHeads, group - g0), [&](auto heads) {
                accumulate_avx2<decltype(heads)::value, DIM>(weights + g0 * stride, stride, values, count, width,
                                                             acc + g0 * width);
            });
        return;
    }
#endif
    const float* rows = load_row(values, scratch, count * dim);
    for (int g = 0; g < group; ++g)
        for (int64_t j = 0; j < count; ++j) {
            const float* __restrict value = rows + j * dim;
            float* __restrict out = acc + g * dim;
            const float w = weights[g * stride + j];
#pragma omp simd
            for (int d = 0; d < dim; ++d) out[d] += w * value[d];
        }
}

// p[s] = exp(p[s] - top) for s < n; returns their sum
static inline float exp_shifted(float* __restrict p, int64_t n, float top) {
    float total = 0.0f;
    int64_t s = 0;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    // without AVX-512's masks gcc keeps fast_exp's clamp a branch, and the loop below scalar
    __m256 sums = _mm256_setzero_ps();
    for (; s + 8 <= n; s += 8) {
        const __m256 e = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), _mm256_set1_ps(top)));
        _mm256_storeu_ps(p + s, e);
        sums = _mm256_add_ps(sums, e);
    }
    total = sum8(sums);
#endif
#pragma omp simd reduction(+ : total)
    for (int64_t i = s; i < n; ++i) {
        p[i] = fast_exp(p[i] - top);
        total += p[i];
    }
    return total;
}

// Pages lie anywhere in a pool of gigabytes, where the hardware prefetcher cannot follow: while one
// page's keys are used, the next page's keys and values are fetched into L1 (1.5-1.8x in a 2 GB pool)
// and the page after next's into L2, which keeps more lines in flight than L1's fill buffers allow
// (a further 1.09x on scattered pages, 1.03x on adjacent ones); the value walk then finds its pages
// in cache. Locality: 3 for L1, 2 for L2.
template <int Locality, typename T>
static inline void prefetch_page(const T* page, int64_t elements) {
    const char* bytes = reinterpret_cast<const char*>(page);
    const int64_t bytes_total = elements * static_cast<int64_t>(sizeof(T));
    for (int64_t line = 0; line < bytes_total; line += 64) __builtin_prefetch(bytes + line, 0, Locality);
}

// Each of the G rows of probs (a row every `stride` floats), logits of its first `len` slots on
// entry, becomes their softmax; lse[g] gets the row's natural log-sum-exp (-inf for len 0)
static inline void softmax_rows(float* probs, int group, int64_t stride, int64_t len, float* lse) {
    for (int g = 0; g < group; ++g) {
        float* p = probs + g * stride;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t s = 0; s < len; ++s) top = p[s] > top ? p[s] : top;
        const float total = exp_shifted(p, len, top);
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t s = 0; s < len; ++s) p[s] *= inv;
        lse[g] = len > 0 ? top + std::log(total) : -INFINITY;
    }
}

// One head's list of fixed-size records in the pool (kernels/records.py): the pool as
// [2N, per_half, record_bytes] bytes, halves half_bytes apart. Records are contiguous a half at a time:
// run r holds records [r * per_half, (r + 1) * per_half), in the K half of the list's page r / 2 for
// even r and in its V half for odd r.
struct RecordList {
    const uint8_t* pool;
    int64_t half_bytes, per_half, record_bytes, num_pages;
    const int32_t* table;  // the list's page ids

    const uint8_t* run(int64_t r) const {
        return pool + ((r % 2) * num_pages + table[r / 2]) * half_bytes;
    }

    const uint8_t* record(int64_t j) const { return run(j / per_half) + (j % per_half) * record_bytes; }

    // visit(start, count, first): each run holding some of records [0, len), its records from
    // `start`, `count` of them contiguous from `first`; the next run is prefetched into L1 and the one
    // after into L2, as paged decode prefetches its pages
    template <typename Visit>
    void each_run(int64_t len, Visit&& visit) const {
        const int64_t runs = (len + per_half - 1) / per_half;
        for (int64_t r = 0; r < runs; ++r) {
            if (r + 1 < runs) prefetch_page<3>(run(r + 1), per_half * record_bytes);
            if (r + 2 < runs) prefetch_page<2>(run(r + 2), per_half * record_bytes);
            const int64_t start = r * per_half;
            visit(start, std::min(len - start, per_half), run(r));
        }
    }
};

// A batch's record lists as the Python side passes them (cpu_library.RecordTables): one pool view
// and the [B, Hkv, P] page tables of one layer
struct RecordTables {
    const uint8_t* pool;
    int64_t half_bytes, per_half, record_bytes, num_pages;
    const int32_t* tables;
    int64_t table_stride_b, table_stride_h;

    RecordList list(int64_t b, int64_t h) const {
        return {pool, half_bytes, per_half, record_bytes, num_pages, tables + b * table_stride_b + h * table_stride_h};
    }
};

}  // namespace kv
