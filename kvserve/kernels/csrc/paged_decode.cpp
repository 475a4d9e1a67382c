// Paged decode attention on the CPU: one query token per sequence over its per-head page lists.
// The shapes and the contract are paged_decode_ref's (kernels/paged_decode.py). One task is one
// (sequence, KV head) pair with its G query heads. Keys and values are read once, in place, a page at a
// time (the next ones prefetched), each key and value row loaded once for all G heads and converted
// to float32 in registers. On AMX, a bfloat16 page's logits are one tile product (AmxLogits);
// elsewhere, and for the values, AVX-512 float32 products, or AVX2 ones on CPUs without AVX-512.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "amx.h"

namespace kv {

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
#elif defined(__AVX2__) && defined(__FMA__)
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

// fn(std::integral_constant<int, n>) for a runtime 1 <= n <= kMax: with the head count of a block
// fixed at compile time its accumulators stay in registers and its loops carry no per-head branches
template <int kMax, typename Fn>
static inline void with_count(int n, Fn&& fn) {
    if constexpr (kMax > 1)
        if (n < kMax) return with_count<kMax - 1>(n, fn);
    fn(std::integral_constant<int, kMax>{});
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
#elif defined(__AVX2__) && defined(__FMA__)
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
#elif defined(__AVX2__) && defined(__FMA__)
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

#if defined(KV_HAVE_AMX)
// Logits on AMX tiles, for bfloat16 pages of 16 slots and head sizes of 32 - 128: a page's logits^T
// [16 slots, G] = K_page [16, DIM] . Q^T, the page itself the A operand (its rows are the tile's
// rows, no copy) and the G queries the B operand, loaded once per task in the pair order TDPBF16PS
// reads (q_pairs[t][p][g][j] = q[g][32 t + 2 p + j]). Products of bfloat16 values are exact in
// float32, so the logits are the AVX-512 path's up to the order of the float32 sums, and the keys'
// compute per page drops ~4x. A page's products go to tile 0 or 5 by turns, and a page's logits are
// read out only after the next page's products are issued: reading a tile waits for its products'
// latency, which would otherwise be paid on every page. Slots past a page's count hold whatever the
// page holds (NaN, say): each logit row reads only its own slot, and those rows are dropped.
// Tiles: 0, 5 the logits; 1, 3 the keys of alternate 32-dim chunks; 2, 4, 6, 7 the queries of chunks 0-3.
template <int DIM>
class AmxLogits {
  public:
    static_assert(DIM % 32 == 0 && DIM <= 128, "one B tile per 32-dim chunk, four at most");

    static void configure(int group) {
        const int64_t rows = kTileRows, narrow = 4 * group;  // a row of G float32 or G bfloat16 pairs
        configure_tiles({rows, rows, rows, rows, rows, rows, rows, rows},
                        {narrow, 64, narrow, 64, narrow, narrow, narrow, narrow});
    }

    // a task's queries into their B tiles
    AmxLogits(const bf16* q_pairs, int group, float scale, int64_t stride, float* logits)
        : group_(group), scale_(scale), stride_(stride), logits_(logits),
          slot_rows_(lane_offsets(group)) {
        const int64_t chunk = kTileRows * group * 2, bytes = 4 * group;
        _tile_loadd(2, q_pairs, bytes);
        if constexpr (DIM >= 64) _tile_loadd(4, q_pairs + chunk, bytes);
        if constexpr (DIM >= 96) _tile_loadd(6, q_pairs + 2 * chunk, bytes);
        if constexpr (DIM >= 128) _tile_loadd(7, q_pairs + 3 * chunk, bytes);
    }

    // the page of `count` slots starting at slot `start`
    void add(const bf16* keys, int64_t start, int64_t count) {
        products(keys, pages_ % 2 == 1);
        if (pages_ > 0) read_out(pages_ % 2 == 0);
        pending_start_ = start;
        pending_count_ = count;
        ++pages_;
    }

    void finish() {
        if (pages_ > 0) read_out(pages_ % 2 == 0);
    }

  private:
    // _tile_* take their tile registers as literals: a page's products are spelled out for each tile
#define KV_PAGE_PRODUCTS(LOGITS)                          \
    do {                                                  \
        constexpr int64_t stride = DIM * sizeof(bf16);    \
        _tile_zero(LOGITS);                               \
        _tile_loadd(1, keys, stride);                     \
        _tile_dpbf16ps(LOGITS, 1, 2);                     \
        if constexpr (DIM >= 64) {                        \
            _tile_loadd(3, keys + 32, stride);            \
            _tile_dpbf16ps(LOGITS, 3, 4);                 \
        }                                                 \
        if constexpr (DIM >= 96) {                        \
            _tile_loadd(1, keys + 64, stride);            \
            _tile_dpbf16ps(LOGITS, 1, 6);                 \
        }                                                 \
        if constexpr (DIM >= 128) {                       \
            _tile_loadd(3, keys + 96, stride);            \
            _tile_dpbf16ps(LOGITS, 3, 7);                 \
        }                                                 \
    } while (0)

    static void products(const bf16* keys, bool odd) {
        if (odd) KV_PAGE_PRODUCTS(5);
        else KV_PAGE_PRODUCTS(0);
    }
#undef KV_PAGE_PRODUCTS

    // the pending page's logits, from tile 5 when `odd` (its products went there), else tile 0
    void read_out(bool odd) {
        if (odd) _tile_stored(5, tile_, 4 * group_);
        else _tile_stored(0, tile_, 4 * group_);
        const __mmask16 mask = first_lanes(pending_count_);
        for (int g = 0; g < group_; ++g) {
            const __m512 column = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask,
                                                           _mm512_add_epi32(slot_rows_, _mm512_set1_epi32(g)), tile_, 4);
            _mm512_mask_storeu_ps(logits_ + g * stride_ + pending_start_, mask,
                                  _mm512_mul_ps(column, _mm512_set1_ps(scale_)));
        }
    }

    const int group_;
    const float scale_;
    const int64_t stride_;
    float* const logits_;
    const __m512i slot_rows_;  // where slot j's row starts in the stored tile: j * G
    alignas(64) float tile_[kTileRows * kTileRows];
    int64_t pages_ = 0, pending_start_ = 0, pending_count_ = 0;
};
#endif

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

// Whether the value walk prefetches its next pages too, as the key walk does: a long context's values
// fetched during the key walk are evicted before the value walk reaches them. On for the AVX2
// accumulation, which reads a page in column blocks rather than row after row; the AVX-512 path keeps
// the prefetching it was measured with.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
constexpr bool kValueWalkPrefetches = true;
#else
constexpr bool kValueWalkPrefetches = false;
#endif

// DIM > 0 fixes head_dim at compile time (the common 64 and 128), so the per-slot loops unroll fully
template <typename T, int DIM>
static void paged_decode(const T* q, int64_t q_stride_b, const T* k_pages, const T* v_pages, int block_size,
                         const int32_t* tables, int64_t tables_stride_b, int64_t tables_stride_h, int pages,
                         const int32_t* lens, int64_t lens_stride_b, int64_t lens_stride_h, int batch,
                         int q_heads, int kv_heads, int runtime_dim, float scale, T* out, float* lse,
                         float* score_sum, float* score_max, int threads) {
    const int dim = DIM > 0 ? DIM : runtime_dim;
    const int group = q_heads / kv_heads;
    const int64_t slots = static_cast<int64_t>(pages) * block_size;
    const int64_t page_elements = static_cast<int64_t>(block_size) * dim;
    // the logits on AMX tiles: bfloat16 pages of one tile's 16 rows, head sizes of whole 32-dim chunks
    // up to 128 and at most 16 query heads per KV head (one B tile's columns)
#if defined(KV_HAVE_AMX)
    constexpr bool kAmxShape = std::is_same_v<T, bf16> && DIM > 0 && DIM % 32 == 0 && DIM <= 128;
    const bool on_amx = kAmxShape && block_size == kTileRows && group <= kTileRows && amx_permitted();
#else
    constexpr bool kAmxShape = false, on_amx = false;
#endif
#pragma omp parallel num_threads(threads)
    {
        // probs[g * slots + s]: first the logits, then the probabilities, of query head g for slot s
        std::vector<float> probs(static_cast<size_t>(group) * slots);
        std::vector<float> query(static_cast<size_t>(group) * dim), acc(static_cast<size_t>(group) * dim);
        std::vector<float> page_rows(page_elements);
        std::vector<bf16> q_pairs(on_amx ? static_cast<size_t>(group) * dim : 0);
#if defined(KV_HAVE_AMX)
        if constexpr (kAmxShape)
            if (on_amx) AmxLogits<DIM>::configure(group);
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(batch) * kv_heads; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t len = lens[b * lens_stride_b + h * lens_stride_h];
            const int64_t used_pages = (len + block_size - 1) / block_size;
            const int32_t* table = tables + b * tables_stride_b + h * tables_stride_h;
            const T* q_group = q + b * q_stride_b + h * group * dim;
            if constexpr (kAmxShape) {
                // q_pairs[t][p][g][j] = q[g][32 t + 2 p + j]; the scale is applied to the logits
                if (on_amx)
                    for (int g = 0; g < group; ++g)
                        for (int64_t d = 0; d < dim; ++d)
                            q_pairs[((d / 32 * kTileRows + d % 32 / 2) * group + g) * 2 + d % 2] = q_group[g * dim + d];
            }
            if (!on_amx)
                for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) query[i] = to_f32(q_group[i]) * scale;

            // visit(start, in_page, rows): each page of the head's list in order, its first in_page
            // slots from slot `start` of the sequence; the key walk prefetches keys and values ahead
            auto each_page = [&](const T* pool, bool key_walk, auto&& visit) {
                for (int64_t page = 0; page < used_pages; ++page) {
                    const int64_t start = page * block_size;
                    const int64_t in_page = std::min<int64_t>(len - start, block_size);
                    if (key_walk && page + 1 < used_pages) {
                        prefetch_page<3>(k_pages + table[page + 1] * page_elements, page_elements);
                        prefetch_page<3>(v_pages + table[page + 1] * page_elements, page_elements);
                    }
                    if (key_walk && page + 2 < used_pages) {
                        prefetch_page<2>(k_pages + table[page + 2] * page_elements, page_elements);
                        prefetch_page<2>(v_pages + table[page + 2] * page_elements, page_elements);
                    }
                    if (kValueWalkPrefetches && !key_walk && page + 1 < used_pages)
                        prefetch_page<3>(v_pages + table[page + 1] * page_elements, page_elements);
                    if (kValueWalkPrefetches && !key_walk && page + 2 < used_pages)
                        prefetch_page<2>(v_pages + table[page + 2] * page_elements, page_elements);
                    const T* rows = pool + table[page] * page_elements;
                    visit(start, in_page, rows);
                }
            };
            if (used_pages > 0) prefetch_page<3>(v_pages + table[0] * page_elements, page_elements);
#if defined(KV_HAVE_AMX)
            if constexpr (kAmxShape) {
                if (on_amx) {
                    AmxLogits<DIM> logits(q_pairs.data(), group, scale, slots, probs.data());
                    each_page(k_pages, true, [&](int64_t start, int64_t in_page, const T* keys) {
                        logits.add(keys, start, in_page);
                    });
                    logits.finish();
                }
            }
#endif
            if (!on_amx)
                each_page(k_pages, true, [&](int64_t start, int64_t in_page, const T* keys) {
                    page_logits<DIM>(query.data(), group, keys, in_page, dim, slots, probs.data() + start,
                                     page_rows.data());
                });
            for (int g = 0; g < group; ++g) {
                float* p = probs.data() + g * slots;
                float top = -INFINITY;
#pragma omp simd reduction(max : top)
                for (int64_t s = 0; s < len; ++s) top = p[s] > top ? p[s] : top;
                const float total = exp_shifted(p, len, top);
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t s = 0; s < len; ++s) p[s] *= inv;
                lse[b * q_heads + h * group + g] = top + std::log(total);
            }

            std::fill(acc.begin(), acc.end(), 0.0f);
            each_page(v_pages, false, [&](int64_t start, int64_t in_page, const T* values) {
                page_accumulate<DIM>(probs.data() + start, group, slots, values, in_page, dim, acc.data(),
                                     page_rows.data());
            });
            T* out_group = out + (b * q_heads + h * group) * dim;
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) out_group[i] = from_f32<T>(acc[i]);

            if (score_sum != nullptr) {
                // a head at a time, so that the loop over the slots vectorises; the same sums in the
                // same order as slot by slot
                float* sums = score_sum + item * slots;
                float* maxes = score_max + item * slots;
                std::fill(sums, sums + slots, 0.0f);
                std::fill(maxes, maxes + slots, 0.0f);
                for (int g = 0; g < group; ++g) {
                    const float* p = probs.data() + g * slots;
#pragma omp simd
                    for (int64_t s = 0; s < len; ++s) {
                        sums[s] += p[s];
                        maxes[s] = p[s] > maxes[s] ? p[s] : maxes[s];
                    }
                }
            }
        }
#if defined(KV_HAVE_AMX)
        if (on_amx) _tile_release();
#endif
    }
}

template <typename T>
static void dispatch_dim(const void* q, int64_t q_stride_b, const void* k_pages, const void* v_pages,
                         int block_size, const int32_t* tables, int64_t tables_stride_b, int64_t tables_stride_h,
                         int pages, const int32_t* lens, int64_t lens_stride_b, int64_t lens_stride_h, int batch,
                         int q_heads, int kv_heads, int dim, float scale, void* out, float* lse, float* score_sum,
                         float* score_max, int threads) {
    auto run = [&](auto kernel) {
        kernel(static_cast<const T*>(q), q_stride_b, static_cast<const T*>(k_pages), static_cast<const T*>(v_pages),
               block_size, tables, tables_stride_b, tables_stride_h, pages, lens, lens_stride_b, lens_stride_h,
               batch, q_heads, kv_heads, dim, scale, static_cast<T*>(out), lse, score_sum, score_max, threads);
    };
    if (dim == 64) run(paged_decode<T, 64>);
    else if (dim == 128) run(paged_decode<T, 128>);
    else run(paged_decode<T, 0>);
}

}  // namespace kv

extern "C" void kv_paged_decode(int dtype, const void* q, int64_t q_stride_b, const void* k_pages,
                                const void* v_pages, int block_size, const int32_t* tables, int64_t tables_stride_b,
                                int64_t tables_stride_h, int pages, const int32_t* lens, int64_t lens_stride_b,
                                int64_t lens_stride_h, int batch, int q_heads, int kv_heads, int dim, float scale,
                                void* out, float* lse, float* score_sum, float* score_max, int threads) {
    auto decode = dtype == kv::kFloat32 ? kv::dispatch_dim<float> : kv::dispatch_dim<kv::bf16>;
    decode(q, q_stride_b, k_pages, v_pages, block_size, tables, tables_stride_b, tables_stride_h, pages, lens,
           lens_stride_b, lens_stride_h, batch, q_heads, kv_heads, dim, scale, out, lse, score_sum, score_max,
           threads);
}
