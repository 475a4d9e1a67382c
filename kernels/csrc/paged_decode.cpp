// Paged decode attention on the CPU: one query token per sequence over its per-head page lists.
// The shapes and the contract are paged_decode_ref's (kernels/paged_decode.py). Keys and values are
// read once, in place, a page at a time (the next one prefetched): each page is converted to float32
// once (bfloat16 pools) and then serves the G query heads of its KV group from L1.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

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
#endif

// logits[j] = q . keys[j] for the first `count` rows of a page (float32 rows of dim elements)
template <int DIM>
static inline void page_logits(const float* __restrict q, const float* __restrict keys, int64_t count, int dim,
                               float* __restrict logits) {
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
        if (count == 16) {
            __m512 partial[16];
            for (int j = 0; j < 16; ++j) {
                const float* key = keys + j * DIM;
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(key));
                for (int d = 16; d < DIM; d += 16)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(key + d), acc);
                partial[j] = acc;
            }
            _mm512_storeu_ps(logits, sum_lanes16(partial));
            return;
        }
    }
#endif
    for (int64_t j = 0; j < count; ++j) logits[j] = dot(q, keys + j * dim, dim);
}

// acc[d] += sum_j weights[j] * values[j][d] over the first `count` rows of a page
template <int DIM>
static inline void page_accumulate(const float* __restrict weights, const float* __restrict values, int64_t count,
                                   int dim, float* __restrict acc) {
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
        // the output row stays in registers across the page
        __m512 sums[DIM / 16];
        for (int c = 0; c < DIM / 16; ++c) sums[c] = _mm512_loadu_ps(acc + 16 * c);
        for (int64_t j = 0; j < count; ++j) {
            const __m512 w = _mm512_set1_ps(weights[j]);
            for (int c = 0; c < DIM / 16; ++c)
                sums[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(values + j * DIM + 16 * c), sums[c]);
        }
        for (int c = 0; c < DIM / 16; ++c) _mm512_storeu_ps(acc + 16 * c, sums[c]);
        return;
    }
#endif
    for (int64_t j = 0; j < count; ++j) {
        const float* __restrict value = values + j * dim;
#pragma omp simd
        for (int d = 0; d < dim; ++d) acc[d] += weights[j] * value[d];
    }
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
#pragma omp parallel num_threads(threads)
    {
        // probs[g * slots + s]: first the logits, then the probabilities, of query head g for slot s
        std::vector<float> probs(static_cast<size_t>(group) * slots);
        std::vector<float> query(static_cast<size_t>(group) * dim), acc(static_cast<size_t>(group) * dim);
        std::vector<float> page_rows(page_elements);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(batch) * kv_heads; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t len = lens[b * lens_stride_b + h * lens_stride_h];
            const int64_t used_pages = (len + block_size - 1) / block_size;
            const int32_t* table = tables + b * tables_stride_b + h * tables_stride_h;
            const T* q_group = q + b * q_stride_b + h * group * dim;
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) query[i] = to_f32(q_group[i]) * scale;

            // visit(start, in_page, rows): each page of the head's list in order, its first in_page
            // slots (from slot `start` of the sequence) as float32 rows
            auto each_page = [&](const T* pool, bool prefetch, auto&& visit) {
                for (int64_t page = 0; page < used_pages; ++page) {
                    const int64_t start = page * block_size;
                    const int64_t in_page = std::min<int64_t>(len - start, block_size);
                    if (prefetch && page + 1 < used_pages) {
                        prefetch_page<3>(k_pages + table[page + 1] * page_elements, page_elements);
                        prefetch_page<3>(v_pages + table[page + 1] * page_elements, page_elements);
                    }
                    if (prefetch && page + 2 < used_pages) {
                        prefetch_page<2>(k_pages + table[page + 2] * page_elements, page_elements);
                        prefetch_page<2>(v_pages + table[page + 2] * page_elements, page_elements);
                    }
                    const T* rows = pool + table[page] * page_elements;
                    visit(start, in_page, load_row(rows, page_rows.data(), in_page * dim));
                }
            };
            if (used_pages > 0) prefetch_page<3>(v_pages + table[0] * page_elements, page_elements);
            each_page(k_pages, true, [&](int64_t start, int64_t in_page, const float* keys) {
                for (int g = 0; g < group; ++g)
                    page_logits<DIM>(query.data() + g * dim, keys, in_page, dim, probs.data() + g * slots + start);
            });
            for (int g = 0; g < group; ++g) {
                float* p = probs.data() + g * slots;
                float top = -INFINITY;
#pragma omp simd reduction(max : top)
                for (int64_t s = 0; s < len; ++s) top = p[s] > top ? p[s] : top;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t s = 0; s < len; ++s) {
                    p[s] = fast_exp(p[s] - top);
                    total += p[s];
                }
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t s = 0; s < len; ++s) p[s] *= inv;
                lse[b * q_heads + h * group + g] = top + std::log(total);
            }

            std::fill(acc.begin(), acc.end(), 0.0f);
            each_page(v_pages, false, [&](int64_t start, int64_t in_page, const float* values) {
                for (int g = 0; g < group; ++g)
                    page_accumulate<DIM>(probs.data() + g * slots + start, values, in_page, dim,
                                         acc.data() + g * dim);
            });
            T* out_group = out + (b * q_heads + h * group) * dim;
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) out_group[i] = from_f32<T>(acc[i]);

            if (score_sum != nullptr) {
                float* sums = score_sum + item * slots;
                float* maxes = score_max + item * slots;
                for (int64_t s = 0; s < len; ++s) {
                    float sum = 0.0f, most = 0.0f;
                    for (int g = 0; g < group; ++g) {
                        const float p = probs[g * slots + s];
                        sum += p;
                        most = p > most ? p : most;
                    }
                    sums[s] = sum;
                    maxes[s] = most;
                }
                std::fill(sums + len, sums + slots, 0.0f);
                std::fill(maxes + len, maxes + slots, 0.0f);
            }
        }
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
