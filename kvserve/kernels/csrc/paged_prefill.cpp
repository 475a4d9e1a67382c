// Paged prefill attention for bfloat16 on Intel AMX: a varlen batch of query chunks, causal inside
// each chunk, over each sequence's cached pages. The contract is paged_prefill_ref's in
// kernels/paged_prefill.py without an observation window; pages hold 16 slots, head_dim is 64 or 128.
//
// The softmax runs with queries in the lanes. A task is 16 queries of one sequence and one KV head;
// for each query head of the group it computes the transposed logits S^T = K Q^T one page at a time
// (the page as it lies in the pool is the A tile, 16 keys x 32 dims; the queries, packed once, the B
// tiles), so that a row of S^T is one key's logits for the 16 queries: the running max, exp and sum
// are whole-vector operations, one exp per 16 logits, with no per-row reductions. Two passes over the
// logits (max, then exp) replace the online rescaling of flash attention: the logits of a task's keys
// stay in L1/L2 between the passes, so each logit is computed once. The output is computed transposed too,
// out^T = V^T P^T: V^T (dims x keys) is packed once per sequence and KV head, and P^T's rows, rounded
// to bfloat16 as torch's flash attention rounds P, are interleaved in key pairs into B tiles.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "amx.h"

namespace kv {

#if defined(KV_HAVE_AMX)
static constexpr int64_t kPageSlots = 16;  // = kTileRows: a page of keys is one A tile
static constexpr int64_t kQueries = 16;    // queries of a task: the lanes of a logit row

// 2^x for x in [-100, 0] on 16 lanes: a degree-4 fit of 2^f on [-0.5, 0.5] (relative error 3e-6,
// ample for probabilities rounded to bfloat16) and the exponent by scalef
static inline __m512 exp2_16(__m512 x) {
    // (below -100: 2^-100, negligible beside the 1 of each row's max, and far from denormals, which are slow)
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.56051021e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.59170392e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40249811e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93121968e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.99999191e-1f));
    return _mm512_scalef_ps(p, n);
}

struct PrefillShape {
    const bf16* q;
    int64_t q_token_stride, q_head_stride;
    const bf16* k_pages;
    const bf16* v_pages;
    const int32_t* tables;
    int64_t table_seq_stride, table_head_stride;
    const int32_t* lens;
    int64_t len_seq_stride, len_head_stride;
    const int64_t* starts;  // query_start_loc [B + 1]
    bf16* out;              // [T, Hq, D] contiguous
    int64_t kv_heads, group, dim;
    float scale;
};

struct Task {
    int64_t seq, kv_head, first_query, keys;
};

// The task's scratch: logits, probabilities and the transposed output, reused across tasks.
struct PrefillScratch {
    std::vector<float> logits;     // [pages][16 keys][16 queries]
    std::vector<bf16> probs;       // [key pairs][16 queries][2]: B tiles of 32 keys
    alignas(64) uint32_t queries[4][kTileRows][kQueries];  // B tiles of Q: [dim tile][dim pair][query]
    alignas(64) float out_t[64][kQueries];                 // 64 dims of out^T
};

// One (sequence, KV head, 16 queries) task, head_dim = 32 * DIM_TILES, all query heads of the group.
// `values_t` is the sequence-head's V^T [dim][vt_stride], zero past its length.
template <int DIM_TILES>
static void prefill_task(const PrefillShape& s, const Task& task, const bf16* values_t, int64_t vt_stride,
                         PrefillScratch& scratch) {
    constexpr int64_t dim = 32 * DIM_TILES;
    const int64_t token0 = s.starts[task.seq] + task.first_query;
    const int64_t chunk = s.starts[task.seq + 1] - s.starts[task.seq];
    const int64_t queries = std::min<int64_t>(kQueries, chunk - task.first_query);
    const int64_t len = s.lens[task.seq * s.len_seq_stride + task.kv_head * s.len_head_stride];
    // query j of the task sees keys [0, first_visible_end + j)
    const int64_t first_visible_end = len - chunk + task.first_query + 1;
    const int64_t keys = task.keys, pages = (keys + kPageSlots - 1) / kPageSlots;
    const int64_t key_blocks = (keys + 2 * kPageSlots - 1) / (2 * kPageSlots);  // of 32 keys, for P V
    const int32_t* table = s.tables + task.seq * s.table_seq_stride + task.kv_head * s.table_head_stride;
    scratch.logits.resize(static_cast<size_t>(pages * kPageSlots * kQueries));
    scratch.probs.resize(static_cast<size_t>(key_blocks * kTileElements));
    const float log2_scale = s.scale * 1.4426950408889634f;
    const __m512i lane = lane_offsets(1);
    // interleaves two rows of 16 bfloat16 (p0 in the low half, p1 in the high) into pairs (p0[i], p1[i])
    const __m512i pair_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);

    const __mmask16 present = first_lanes(queries);
    const __m512i column = lane_offsets(kQueries);  // a column of out^T
    // each query's row offset in 32-bit pairs (the wrapper passes even strides)
    const __m512i query_rows = lane_offsets(static_cast<int32_t>(s.q_token_stride / 2));
    for (int64_t g = 0; g < s.group; ++g) {
        const int64_t head = task.kv_head * s.group + g;
        // Q's B tiles: row p of dim tile t holds each query's dims (32 t + 2 p, 32 t + 2 p + 1), one
        // 32-bit pair per query, gathered (lanes past the chunk's queries are zero)
        const auto* pairs =
            reinterpret_cast<const int*>(s.q + token0 * s.q_token_stride + head * s.q_head_stride);
        for (int t = 0; t < DIM_TILES; ++t)
            for (int64_t p = 0; p < kTileRows; ++p)
                _mm512_store_si512(scratch.queries[t][p], _mm512_mask_i32gather_epi32(
                    _mm512_setzero_si512(), present, query_rows, pairs + t * kTileRows + p, 4));
        // (tiles 3-6; P V below reuses them, so each head loads its own)
        _tile_loadd(3, scratch.queries[0], 64);
        if constexpr (DIM_TILES > 1) _tile_loadd(4, scratch.queries[1], 64);
        if constexpr (DIM_TILES > 2) _tile_loadd(5, scratch.queries[2], 64);
        if constexpr (DIM_TILES > 3) _tile_loadd(6, scratch.queries[3], 64);

        // pass 1: S^T a page at a time; invisible logits become -inf; the max of each query. Two
        // logit tiles (0 and 7) alternate: a page's products are issued before the previous page's
        // logits are stored and read, so the tile products' latency overlaps that work. Four running
        // maxima, so that a page's 16 rows are not one chain of dependent max operations.
        __m512 row_max[4] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY),
                             _mm512_set1_ps(-INFINITY)};
        constexpr int64_t key_bytes = dim * static_cast<int64_t>(sizeof(bf16));
        const auto page_keys = [&](int64_t pg) {
            return s.k_pages + static_cast<int64_t>(table[pg]) * kPageSlots * dim;
        };
// a page's logits into tile `acc` (a literal: tile ids are encoded in the instructions)
#define KV_PAGE_LOGITS(acc, page)                          \
    do {                                                   \
        const bf16* keys_ = (page);                        \
        _tile_zero(acc);                                   \
        _tile_loadd(1, keys_, key_bytes);                  \
        _tile_dpbf16ps(acc, 1, 3);                         \
        if constexpr (DIM_TILES > 1) {                     \
            _tile_loadd(2, keys_ + 32, key_bytes);         \
            _tile_dpbf16ps(acc, 2, 4);                     \
        }                                                  \
        if constexpr (DIM_TILES > 2) {                     \
            _tile_loadd(1, keys_ + 64, key_bytes);         \
            _tile_dpbf16ps(acc, 1, 5);                     \
        }                                                  \
        if constexpr (DIM_TILES > 3) {                     \
            _tile_loadd(2, keys_ + 96, key_bytes);         \
            _tile_dpbf16ps(acc, 2, 6);                     \
        }                                                  \
    } while (0)
        KV_PAGE_LOGITS(0, page_keys(0));
        for (int64_t pg = 0; pg < pages; ++pg) {
            float* logits = scratch.logits.data() + pg * kPageSlots * kQueries;
            const bool next = pg + 1 < pages;
            if (pg % 2 == 0) {
                if (next) KV_PAGE_LOGITS(7, page_keys(pg + 1));
                _tile_stored(0, logits, 64);
            } else {
                if (next) KV_PAGE_LOGITS(0, page_keys(pg + 1));
                _tile_stored(7, logits, 64);
            }
            if ((pg + 1) * kPageSlots <= first_visible_end) {  // every lane sees every key of the page
                for (int64_t r = 0; r < kPageSlots; ++r)
                    row_max[r % 4] = _mm512_max_ps(row_max[r % 4], _mm512_loadu_ps(logits + r * kQueries));
                continue;
            }
            for (int64_t r = 0; r < kPageSlots; ++r) {
                const int64_t key = pg * kPageSlots + r;
                // lane n sees the key when key < first_visible_end + n; slots past the task's keys
                // (possibly NaN in the pool) are hidden from every lane
                const __mmask16 visible = key < keys
                    ? _mm512_cmpgt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(
                          static_cast<int32_t>(first_visible_end - key))), _mm512_setzero_si512())
                    : 0;
                const __m512 row = _mm512_mask_blend_ps(visible, _mm512_set1_ps(-INFINITY),
                                                        _mm512_loadu_ps(logits + r * kQueries));
                _mm512_storeu_ps(logits + r * kQueries, row);
                row_max[r % 4] = _mm512_max_ps(row_max[r % 4], row);
            }
        }
#undef KV_PAGE_LOGITS

        // pass 2: P^T = exp(S^T - max), summed per query and interleaved in key pairs as bfloat16
        const __m512 query_max = _mm512_max_ps(_mm512_max_ps(row_max[0], row_max[1]),
                                               _mm512_max_ps(row_max[2], row_max[3]));
        const __m512 shift = _mm512_mul_ps(query_max, _mm512_set1_ps(log2_scale));
        __m512 sum_even = _mm512_setzero_ps(), sum_odd = _mm512_setzero_ps();
        const __m512 scale2 = _mm512_set1_ps(log2_scale);
        for (int64_t pair = 0; pair < key_blocks * kTileRows; ++pair) {
            __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            if (2 * pair < pages * kPageSlots) {
                const float* logits = scratch.logits.data() + 2 * pair * kQueries;
                p0 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(logits), scale2, shift));
                p1 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(logits + kQueries), scale2, shift));
            }
            sum_even = _mm512_add_ps(sum_even, p0);
            sum_odd = _mm512_add_ps(sum_odd, p1);
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
            _mm512_storeu_si512(scratch.probs.data() + pair * 2 * kQueries,
                                _mm512_permutexvar_epi16(pair_order, both));
        }
        alignas(64) float inverse_sum[kQueries];
        _mm512_store_ps(inverse_sum, _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(sum_even, sum_odd)));

        // out^T = V^T P^T, 64 dims at a time in four accumulators (tiles 4-7)
        const int64_t vt_bytes = vt_stride * static_cast<int64_t>(sizeof(bf16));
        for (int64_t half = 0; half < dim / 64; ++half) {
            const bf16* vt = values_t + half * 64 * vt_stride;
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (int64_t block = 0; block < key_blocks; ++block) {
                const bf16* vt_block = vt + block * 32;
                _tile_loadd(3, scratch.probs.data() + block * kTileElements, 64);
                _tile_loadd(1, vt_block, vt_bytes);
                _tile_dpbf16ps(4, 1, 3);
                _tile_loadd(2, vt_block + 16 * vt_stride, vt_bytes);
                _tile_dpbf16ps(5, 2, 3);
                _tile_loadd(1, vt_block + 32 * vt_stride, vt_bytes);
                _tile_dpbf16ps(6, 1, 3);
                _tile_loadd(2, vt_block + 48 * vt_stride, vt_bytes);
                _tile_dpbf16ps(7, 2, 3);
            }
            _tile_stored(4, scratch.out_t[0], 64);
            _tile_stored(5, scratch.out_t[16], 64);
            _tile_stored(6, scratch.out_t[32], 64);
            _tile_stored(7, scratch.out_t[48], 64);
            // column n of out^T is query n's output: gathered 16 dims at a time
            for (int64_t n = 0; n < queries; ++n) {
                bf16* o = s.out + ((token0 + n) * s.kv_heads * s.group + head) * dim + half * 64;
                const __m512 inv = _mm512_set1_ps(inverse_sum[n]);
                for (int64_t d = 0; d < 64; d += 16) {
                    const __m512 values = _mm512_i32gather_ps(column, &scratch.out_t[d][n], 4);
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(values, inv)));
                }
            }
        }
    }
}

// V^T [dim][vt_stride] of one sequence and KV head, zero past its length
static void pack_values_t(const PrefillShape& s, int64_t seq, int64_t kv_head, bf16* values_t, int64_t vt_stride) {
    const int64_t len = s.lens[seq * s.len_seq_stride + kv_head * s.len_head_stride];
    const int32_t* table = s.tables + seq * s.table_seq_stride + kv_head * s.table_head_stride;
    std::memset(values_t, 0, static_cast<size_t>(s.dim * vt_stride) * sizeof(bf16));
    for (int64_t key0 = 0; key0 < len; key0 += kPageSlots) {
        const bf16* page = s.v_pages + static_cast<int64_t>(table[key0 / kPageSlots]) * kPageSlots * s.dim;
        const int64_t count = std::min<int64_t>(kPageSlots, len - key0);
        // a page (2 or 4 KiB) stays in L1 while each dim's 16 keys are written as one run
        for (int64_t d = 0; d < s.dim; ++d)
            for (int64_t r = 0; r < count; ++r) values_t[d * vt_stride + key0 + r] = page[r * s.dim + d];
    }
}

static void paged_prefill(const PrefillShape& s, int64_t batch, int threads) {
    // each sequence-head's V^T, then the tasks, longest first (a chunk's later queries see more keys)
    std::vector<int64_t> vt_offset(batch * s.kv_heads + 1, 0), vt_stride(batch * s.kv_heads);
    std::vector<Task> tasks;
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t chunk = s.starts[b + 1] - s.starts[b];
        for (int64_t h = 0; h < s.kv_heads; ++h) {
            const int64_t len = s.lens[b * s.len_seq_stride + h * s.len_head_stride];
            const int64_t bh = b * s.kv_heads + h;
            // a row of V^T is a multiple of 32 keys plus 32 more: rows a power of two apart in bytes
            // would fall into the same few L1 sets (an A tile reads 16 rows, P V four tiles at a time)
            vt_stride[bh] = (len + 31) / 32 * 32 + 32;
            vt_offset[bh + 1] = vt_offset[bh] + s.dim * vt_stride[bh];
            for (int64_t first = 0; first < chunk; first += kQueries)
                tasks.push_back({b, h, first, len - chunk + std::min<int64_t>(first + kQueries, chunk)});
        }
    }
    std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.keys > b.keys; });
    std::vector<bf16> values_t(static_cast<size_t>(vt_offset.back()));
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic)
        for (int64_t bh = 0; bh < batch * s.kv_heads; ++bh)
            pack_values_t(s, bh / s.kv_heads, bh % s.kv_heads, values_t.data() + vt_offset[bh], vt_stride[bh]);
        configure_tiles({16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
        PrefillScratch scratch;
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < tasks.size(); ++i) {
            const int64_t bh = tasks[i].seq * s.kv_heads + tasks[i].kv_head;
            if (s.dim == 64)
                prefill_task<2>(s, tasks[i], values_t.data() + vt_offset[bh], vt_stride[bh], scratch);
            else
                prefill_task<4>(s, tasks[i], values_t.data() + vt_offset[bh], vt_stride[bh], scratch);
        }
        _tile_release();
    }
}
#endif

}  // namespace kv

// q [T, Hq, D] bfloat16 (strides in elements; dims contiguous), pages [N, 16, D], tables [B, Hkv, P]
// and lens [B, Hkv] int32 (strides in elements), query_start_loc [B + 1] int64, out [T, Hq, D]
// contiguous. Returns 0 when this build or CPU cannot run it (no AMX, or D not 64 or 128).
extern "C" int kv_paged_prefill(const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k_pages,
                                const void* v_pages, const void* tables, int64_t table_seq_stride,
                                int64_t table_head_stride, const void* lens, int64_t len_seq_stride,
                                int64_t len_head_stride, const void* query_start_loc, int64_t batch,
                                int64_t kv_heads, int64_t group, int64_t dim, float scale, void* out, int threads) {
#if defined(KV_HAVE_AMX)
    if (!kv::amx_permitted() || (dim != 64 && dim != 128)) return 0;
    const kv::PrefillShape shape{static_cast<const kv::bf16*>(q), q_token_stride, q_head_stride,
                                 static_cast<const kv::bf16*>(k_pages), static_cast<const kv::bf16*>(v_pages),
                                 static_cast<const int32_t*>(tables), table_seq_stride, table_head_stride,
                                 static_cast<const int32_t*>(lens), len_seq_stride, len_head_stride,
                                 static_cast<const int64_t*>(query_start_loc), static_cast<kv::bf16*>(out),
                                 kv_heads, group, dim, scale};
    kv::paged_prefill(shape, batch, threads);
    return 1;
#else
    (void)q, (void)q_token_stride, (void)q_head_stride, (void)k_pages, (void)v_pages, (void)tables,
        (void)table_seq_stride, (void)table_head_stride, (void)lens, (void)len_seq_stride, (void)len_head_stride,
        (void)query_start_loc, (void)batch, (void)kv_heads, (void)group, (void)dim, (void)scale, (void)out,
        (void)threads;
    return 0;
#endif
}
