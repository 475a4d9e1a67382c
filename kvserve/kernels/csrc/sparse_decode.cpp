// TailorKV's sparse decode on the CPU: the contract is sparse_decode_ref's (kernels/sparse_decode.py).
// One task is one (sequence, KV head): the group-mean query's top channels by |q| * max |K|, the
// approximate score of every held token on those channels (key records read where they lie in the
// host pool), the `select` best tokens, then exact attention of the G query heads over them by the
// same logits, softmax and accumulation as paged decode.
#include <algorithm>
#include <numeric>
#include <vector>

#include "decode_tiles.h"

namespace kv {

template <typename T, int DIM>
static void sparse_decode(const T* q, int64_t q_stride_b, const float* key_max, const RecordTables& keys,
                          const RecordTables& values, const int32_t* lens, int64_t lens_stride_b,
                          int64_t lens_stride_h, const int64_t* select, const int64_t* channels, int batch,
                          int q_heads, int kv_heads, int runtime_dim, float scale, T* out, float* lse, int threads) {
    const int dim = DIM > 0 ? DIM : runtime_dim;
    const int group = q_heads / kv_heads;
    int64_t slots = 1;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h)
            slots = std::max<int64_t>(slots, lens[b * lens_stride_b + h * lens_stride_h]);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> mean(dim), channel_score(dim), weight(dim), query(static_cast<size_t>(group) * dim);
        std::vector<float> acc(static_cast<size_t>(group) * dim), approx(slots), chosen_keys, chosen_values, probs;
        std::vector<int> channel_order(dim);
        std::vector<int64_t> token_order(slots);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(batch) * kv_heads; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t len = lens[b * lens_stride_b + h * lens_stride_h];
            const int64_t take = std::min<int64_t>(len, select[b]);
            T* out_group = out + (b * q_heads + h * group) * dim;
            float* lse_group = lse + b * q_heads + h * group;
            if (take <= 0) {  // nothing held, or nothing to attend
                std::fill(out_group, out_group + static_cast<int64_t>(group) * dim, from_f32<T>(0.0f));
                std::fill(lse_group, lse_group + group, -INFINITY);
                continue;
            }
            const T* q_group = q + b * q_stride_b + h * group * dim;
            const float* head_max = key_max + item * dim;
            for (int d = 0; d < dim; ++d) {
                float sum = 0.0f;
                for (int g = 0; g < group; ++g) sum += to_f32(q_group[g * dim + d]);
                mean[d] = sum / static_cast<float>(group);
                channel_score[d] = std::fabs(mean[d]) * head_max[d];
            }
            // the ranking reads only the best channels, in channel order
            const int scored = static_cast<int>(std::min<int64_t>(channels[b], dim));
            std::iota(channel_order.begin(), channel_order.end(), 0);
            std::partial_sort(channel_order.begin(), channel_order.begin() + scored, channel_order.end(),
                              [&](int a, int c) {
                                  return channel_score[a] > channel_score[c] ||
                                         (channel_score[a] == channel_score[c] && a < c);
                              });
            std::sort(channel_order.begin(), channel_order.begin() + scored);
            for (int i = 0; i < scored; ++i) weight[i] = mean[channel_order[i]];
            keys.list(b, h).each_run(len, [&](int64_t start, int64_t count, const uint8_t* run) {
                const T* rows = reinterpret_cast<const T*>(run);
                for (int64_t j = 0; j < count; ++j) {
                    const T* row = rows + j * dim;
                    float sum = 0.0f;
                    for (int i = 0; i < scored; ++i) sum += to_f32(row[channel_order[i]]) * weight[i];
                    approx[start + j] = sum;
                }
            });
            std::iota(token_order.begin(), token_order.begin() + len, 0);
            std::nth_element(token_order.begin(), token_order.begin() + (take - 1), token_order.begin() + len,
                             [&](int64_t a, int64_t c) {
                                 return approx[a] > approx[c] || (approx[a] == approx[c] && a < c);
                             });
            // the chosen keys and values, widened once, then attended as one contiguous float32 run (so
            // the tiles need no scratch for widening)
            chosen_keys.resize(take * dim);
            chosen_values.resize(take * dim);
            const RecordList key_list = keys.list(b, h), value_list = values.list(b, h);
            for (int64_t i = 0; i < take; ++i) {
                const T* key = reinterpret_cast<const T*>(key_list.record(token_order[i]));
                const T* value = reinterpret_cast<const T*>(value_list.record(token_order[i]));
                for (int d = 0; d < dim; ++d) {
                    chosen_keys[i * dim + d] = to_f32(key[d]);
                    chosen_values[i * dim + d] = to_f32(value[d]);
                }
            }
            for (int g = 0; g < group; ++g)
                for (int d = 0; d < dim; ++d) query[g * dim + d] = to_f32(q_group[g * dim + d]) * scale;
            probs.resize(static_cast<size_t>(group) * take);
            page_logits<DIM>(query.data(), group, chosen_keys.data(), take, dim, take, probs.data(), nullptr);
            softmax_rows(probs.data(), group, take, take, lse_group);
            std::fill(acc.begin(), acc.end(), 0.0f);
            page_accumulate<DIM>(probs.data(), group, take, chosen_values.data(), take, dim, acc.data(), nullptr);
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) out_group[i] = from_f32<T>(acc[i]);
        }
    }
}

}  // namespace kv

extern "C" void kv_sparse_decode(int dtype, const void* q, int64_t q_stride_b, const float* key_max,
                                 const kv::RecordTables* keys, const kv::RecordTables* values, const int32_t* lens,
                                 int64_t lens_stride_b, int64_t lens_stride_h, const int64_t* select,
                                 const int64_t* channels, int batch, int q_heads, int kv_heads, int dim, float scale,
                                 void* out, float* lse, int threads) {
    auto run = [&](auto type, auto shape) {
        using T = decltype(type);
        kv::sparse_decode<T, decltype(shape)::value>(static_cast<const T*>(q), q_stride_b, key_max, *keys, *values,
                                                     lens, lens_stride_b, lens_stride_h, select, channels, batch,
                                                     q_heads, kv_heads, dim, scale, static_cast<T*>(out), lse, threads);
    };
    auto with_dtype = [&](auto shape) {
        if (dtype == kv::kFloat32) run(float{}, shape);
        else run(kv::bf16{}, shape);
    };
    if (dim == 64) with_dtype(std::integral_constant<int, 64>{});
    else if (dim == 128) with_dtype(std::integral_constant<int, 128>{});
    else with_dtype(std::integral_constant<int, 0>{});
}
