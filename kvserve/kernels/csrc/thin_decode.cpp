// ThinK thin-key decode attention on the CPU: the contract is thin_decode_ref's
// (kernels/thin_decode.py). One task is one (sequence, KV head) with its G query heads: the queries
// gathered to the head's kept channels once, then the key records (K channels each) and the value
// records (all D) read where they lie, a half page of contiguous records at a time, by the same
// logits, softmax and accumulation as paged decode.
#include <vector>

#include "decode_tiles.h"

namespace kv {

// KEEP > 0 fixes the kept channels at compile time, DIM > 0 the head size, as in paged_decode
template <typename T, int KEEP, int DIM>
static void thin_decode(const T* q, int64_t q_stride_b, const int64_t* channels, int64_t channels_stride_b,
                        int64_t channels_stride_h, int runtime_keep, const RecordTables& keys,
                        const RecordTables& values, const int32_t* lens, int64_t lens_stride_b,
                        int64_t lens_stride_h, int batch, int q_heads, int kv_heads, int runtime_dim, float scale,
                        T* out, float* lse, int threads) {
    const int keep = KEEP > 0 ? KEEP : runtime_keep, dim = DIM > 0 ? DIM : runtime_dim;
    const int group = q_heads / kv_heads;
    int64_t slots = 0;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h) slots = std::max<int64_t>(slots, lens[b * lens_stride_b + h * lens_stride_h]);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> probs(static_cast<size_t>(group) * std::max<int64_t>(slots, 1));
        std::vector<float> query(static_cast<size_t>(group) * keep), acc(static_cast<size_t>(group) * dim);
        std::vector<float> rows(std::max(keys.per_half * keep, values.per_half * dim));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(batch) * kv_heads; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t len = lens[b * lens_stride_b + h * lens_stride_h];
            const int64_t* kept = channels + b * channels_stride_b + h * channels_stride_h;
            const T* q_group = q + b * q_stride_b + h * group * dim;
            for (int g = 0; g < group; ++g)
                for (int k = 0; k < keep; ++k) query[g * keep + k] = to_f32(q_group[g * dim + kept[k]]) * scale;
            keys.list(b, h).each_run(len, [&](int64_t start, int64_t count, const uint8_t* run) {
                page_logits<KEEP>(query.data(), group, reinterpret_cast<const T*>(run), count, keep, slots,
                                  probs.data() + start, rows.data());
            });
            softmax_rows(probs.data(), group, slots, len, lse + b * q_heads + h * group);
            std::fill(acc.begin(), acc.end(), 0.0f);
            values.list(b, h).each_run(len, [&](int64_t start, int64_t count, const uint8_t* run) {
                page_accumulate<DIM>(probs.data() + start, group, slots, reinterpret_cast<const T*>(run), count, dim,
                                     acc.data(), rows.data());
            });
            T* out_group = out + (b * q_heads + h * group) * dim;
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) out_group[i] = from_f32<T>(acc[i]);
        }
    }
}

template <typename T, typename... Args>
static void dispatch_shape(int keep, int dim, Args&&... args) {
    if (dim == 64 && keep == 32) thin_decode<T, 32, 64>(args...);
    else if (dim == 128 && keep == 64) thin_decode<T, 64, 128>(args...);
    else if (dim == 64) thin_decode<T, 0, 64>(args...);
    else if (dim == 128) thin_decode<T, 0, 128>(args...);
    else thin_decode<T, 0, 0>(args...);
}

}  // namespace kv

extern "C" void kv_thin_decode(int dtype, const void* q, int64_t q_stride_b, const int64_t* channels,
                               int64_t channels_stride_b, int64_t channels_stride_h, int keep,
                               const kv::RecordTables* keys, const kv::RecordTables* values, const int32_t* lens,
                               int64_t lens_stride_b, int64_t lens_stride_h, int batch, int q_heads, int kv_heads,
                               int dim, float scale, void* out, float* lse, int threads) {
    auto run = [&](auto type) {
        using T = decltype(type);
        kv::dispatch_shape<T>(keep, dim, static_cast<const T*>(q), q_stride_b, channels, channels_stride_b,
                              channels_stride_h, keep, *keys, *values, lens, lens_stride_b, lens_stride_h, batch,
                              q_heads, kv_heads, dim, scale, static_cast<T*>(out), lse, threads);
    };
    if (dtype == kv::kFloat32) run(float{});
    else run(kv::bf16{});
}
