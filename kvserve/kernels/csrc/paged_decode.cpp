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
#include "decode_tiles.h"

namespace kv {

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
            softmax_rows(probs.data(), group, slots, len, lse + b * q_heads + h * group);

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
