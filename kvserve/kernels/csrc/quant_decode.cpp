// KIVI decode attention on the CPU over quantized records: the contract is quant_decode_ref's
// (kernels/quant_decode.py), the byte layout quant_layout.py's. One task is one (sequence, KV head)
// with its G query heads; the codes are never de-quantized into a copy. A key is code * step + low
// per channel, with step and low shared by a group of tokens, so within a group
//     q . k = (q * step) . code + q . low:
// the query is scaled by the group's steps once and each token's logit is one product with its
// codes plus a per-group constant. A value is code * step + low per token and channel group, so
//     sum_t p_t v_t = sum_t (p_t step_t) code_t + sum_t p_t low_t,
// the second term a scalar per channel group added once at the end. Codes are widened to float32
// lanes in registers, 8 channels at a time (AVX2 on every x86-64-v3 CPU, AVX-512 ones included).
#include <cstring>
#include <vector>

#include "decode_tiles.h"

namespace kv {

// The order the kernel reads a record's channels in, 8 float32 lanes at a time. Natural: vector i holds
// channels 8i .. 8i + 7. Blocked, where the codes come in whole 8-byte blocks and a byte holds
// P = 8 / bits codes: block k's 8 bytes are widened once, and vector k * P + s takes the s-th code of
// each, so its lane l holds channel (8k + l) * P + s: a shift and a mask per vector instead of a
// broadcast and a variable shift. The order is the query's for the keys (it is permuted to match)
// and the output's for the values (it is permuted back); values take it only where each vector's
// channels share one value scale.
struct QuantShape {
#if defined(__AVX2__) && defined(__FMA__)
    static constexpr bool kCanBlock = true;
#else
    static constexpr bool kCanBlock = false;  // the scalar loops read the natural order
#endif
    int bits, group_size, dim, channel_group;
    int code_bytes() const { return dim * bits / 8; }
    int value_groups() const { return dim / channel_group; }
    int per_byte() const { return 8 / bits; }
    bool keys_blocked() const { return kCanBlock && bits < 8 && code_bytes() % 8 == 0; }
    bool values_blocked() const { return keys_blocked() && per_byte() <= 4 && channel_group % (8 * per_byte()) == 0; }
    // the channel in lane l of vector i
    int channel(int i, int l, bool blocked) const {
        return blocked ? (8 * (i / per_byte()) + l) * per_byte() + i % per_byte() : 8 * i + l;
    }
};

// n halves as float32, 8 at a time where the CPU has F16C
static inline void halves_to_f32(const uint16_t* src, int n, float* dst) {
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_f32(src[i]);
}

// code of channel c in packed codes: byte c / (8 / BITS), from bit (c % (8 / BITS)) * BITS
template <int BITS>
static inline float code_at(const uint8_t* packed, int c) {
    constexpr int kPerByte = 8 / BITS;
    return static_cast<float>((packed[c / kPerByte] >> ((c % kPerByte) * BITS)) & ((1 << BITS) - 1));
}

#if defined(__AVX2__) && defined(__FMA__)
// the codes of channels c .. c + 7 (c a multiple of 8) as float32 lanes: their BITS bytes broadcast,
// each lane shifted to its code
template <int BITS>
static inline __m256 codes8(const uint8_t* packed, int c) {
    if constexpr (BITS == 8) {
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + c))));
    } else {
        uint32_t word = 0;
        std::memcpy(&word, packed + c * BITS / 8, BITS);
        const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
        const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), shifts);
        return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << BITS) - 1)));
    }
}

// block k of packed codes (bytes 8k .. 8k + 7) as 8 int32 lanes, and the s-th code of each as float32
static inline __m256i code_block(const uint8_t* packed, int k) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + 8 * k)));
}

template <int BITS>
static inline __m256 block_codes(__m256i block, int s) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(block, s * BITS), _mm256_set1_epi32((1 << BITS) - 1)));
}

// logits[g * stride + j] = scaled[g] . code_j + bias[g] for H heads and `count` token records
// `record_bytes` apart (key codes first), 8 tokens at a time finished by one transposing sum. Up to 6
// heads take two tokens per step, each code chunk widened once for the H heads: twice the independent
// FMA chains, whose latency would otherwise bound the loop.
template <int H, int BITS, int DIM, bool BLOCKED>
static inline void group_logits(const float* __restrict scaled, const float* bias, const uint8_t* records,
                                int64_t count, int64_t record_bytes, int dim, int64_t stride, float* logits) {
    constexpr int K = H <= 6 ? 2 : 1;
    const int width = DIM > 0 ? DIM : dim;
    for (int64_t j0 = 0; j0 < count; j0 += 8) {
        const int64_t rows = std::min<int64_t>(count - j0, 8);
        __m256 partial[H][8];
        for (int64_t j = 0; j < 8; j += K) {
            __m256 acc[K][H];
            for (int k = 0; k < K; ++k)
                for (int g = 0; g < H; ++g) acc[k][g] = _mm256_setzero_ps();
            // tokens j .. j + N - 1 of the block; those past `count` are not read
            auto products = [&](auto tokens_now) {
                constexpr int N = decltype(tokens_now)::value;
                const uint8_t* codes = records + (j0 + j) * record_bytes;
                auto vector = [&](int d, const __m256* code) {
                    for (int g = 0; g < H; ++g) {
                        const __m256 query = _mm256_loadu_ps(scaled + g * width + d);
                        for (int k = 0; k < N; ++k) acc[k][g] = _mm256_fmadd_ps(query, code[k], acc[k][g]);
                    }
                };
                if constexpr (BLOCKED) {
                    constexpr int P = 8 / BITS;
                    for (int b = 0; b < width / (8 * P); ++b) {
                        __m256i block[N];
                        for (int k = 0; k < N; ++k) block[k] = code_block(codes + k * record_bytes, b);
                        for (int s = 0; s < P; ++s) {
                            __m256 code[N];
                            for (int k = 0; k < N; ++k) code[k] = block_codes<BITS>(block[k], s);
                            vector(8 * (b * P + s), code);
                        }
                    }
                } else {
                    for (int d = 0; d < width; d += 8) {
                        __m256 code[N];
                        for (int k = 0; k < N; ++k) code[k] = codes8<BITS>(codes + k * record_bytes, d);
                        vector(d, code);
                    }
                }
            };
            if (j + K <= rows) products(std::integral_constant<int, K>{});
            else if (j < rows) products(std::integral_constant<int, 1>{});
            for (int k = 0; k < K; ++k)
                for (int g = 0; g < H; ++g) partial[g][j + k] = acc[k][g];
        }
        for (int g = 0; g < H; ++g)
            _mm256_maskstore_ps(logits + g * stride + j0, first_lanes8(rows),
                                _mm256_add_ps(sum_lanes8(partial[g]), _mm256_set1_ps(bias[g])));
    }
}

// acc[g][d] += sum_j weights[(g * VG + d / channel_group) * stride + j] * code_j[d] for H heads and
// `count` value-code rows `record_bytes` apart, in column blocks of C chunks whose H x C sums stay in
// registers across the rows
template <int H, int BITS, int DIM>
static inline void group_accumulate(const float* __restrict weights, int64_t stride, const uint8_t* codes,
                                    int64_t count, int64_t record_bytes, const QuantShape& shape,
                                    float* __restrict acc) {
    constexpr int C = H <= 2 ? 4 : H <= 4 ? 3 : 2;
    const int width = DIM > 0 ? DIM : shape.dim, groups = shape.value_groups();
    auto block = [&](int d0, auto columns) {
        constexpr int kCols = decltype(columns)::value;
        const float* row[H][kCols];
        __m256 sums[H][kCols];
        for (int g = 0; g < H; ++g)
            for (int c = 0; c < kCols; ++c) {
                row[g][c] = weights + (g * groups + (d0 + 8 * c) / shape.channel_group) * stride;
                sums[g][c] = _mm256_loadu_ps(acc + g * width + d0 + 8 * c);
            }
        for (int64_t j = 0; j < count; ++j) {
            __m256 value[kCols];
            for (int c = 0; c < kCols; ++c) value[c] = codes8<BITS>(codes + j * record_bytes, d0 + 8 * c);
            for (int g = 0; g < H; ++g)
                for (int c = 0; c < kCols; ++c)
                    sums[g][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(row[g][c] + j), value[c], sums[g][c]);
        }
        for (int g = 0; g < H; ++g)
            for (int c = 0; c < kCols; ++c) _mm256_storeu_ps(acc + g * width + d0 + 8 * c, sums[g][c]);
    };
    int d0 = 0;
    for (; d0 + 8 * C <= width; d0 += 8 * C) block(d0, std::integral_constant<int, C>{});
    if constexpr (C > 1)
        if (d0 < width) with_count<C - 1>((width - d0) / 8, [&](auto columns) { block(d0, columns); });
}

// group_accumulate in the blocked order: a code block at a time (its P vectors share one value scale),
// its H x P sums in registers across the rows, the block's 8 bytes widened once per row
template <int H, int BITS, int DIM>
static inline void group_accumulate_blocked(const float* __restrict weights, int64_t stride, const uint8_t* codes,
                                            int64_t count, int64_t record_bytes, const QuantShape& shape,
                                            float* __restrict acc) {
    constexpr int P = 8 / BITS;
    const int width = DIM > 0 ? DIM : shape.dim, groups = shape.value_groups();
    for (int b = 0; b < width / (8 * P); ++b) {
        const float* row[H];
        __m256 sums[H][P];
        for (int g = 0; g < H; ++g) {
            row[g] = weights + (g * groups + 8 * P * b / shape.channel_group) * stride;
            for (int s = 0; s < P; ++s) sums[g][s] = _mm256_loadu_ps(acc + g * width + 8 * (b * P + s));
        }
        for (int64_t j = 0; j < count; ++j) {
            const __m256i block = code_block(codes + j * record_bytes, b);
            for (int s = 0; s < P; ++s) {
                const __m256 value = block_codes<BITS>(block, s);
                for (int g = 0; g < H; ++g)
                    sums[g][s] = _mm256_fmadd_ps(_mm256_broadcast_ss(row[g] + j), value, sums[g][s]);
            }
        }
        for (int g = 0; g < H; ++g)
            for (int s = 0; s < P; ++s) _mm256_storeu_ps(acc + g * width + 8 * (b * P + s), sums[g][s]);
    }
}
#endif

// the logits of `count` token records for all G heads (see group_logits)
template <int BITS, int DIM>
static inline void token_logits(const float* scaled, const float* bias, int group, const uint8_t* records,
                                int64_t count, int64_t record_bytes, const QuantShape& shape, int64_t stride,
                                float* logits) {
    const int dim = shape.dim;
#if defined(__AVX2__) && defined(__FMA__)
    constexpr int kHeads = 8;
    for (int g0 = 0; g0 < group; g0 += kHeads)
        with_count<kHeads>(std::min(kHeads, group - g0), [&](auto heads) {
            constexpr int H = decltype(heads)::value;
            auto run = shape.keys_blocked() ? group_logits<H, BITS, DIM, BITS < 8> : group_logits<H, BITS, DIM, false>;
            run(scaled + g0 * dim, bias + g0, records, count, record_bytes, dim, stride, logits + g0 * stride);
        });
#else
    for (int g = 0; g < group; ++g)
        for (int64_t j = 0; j < count; ++j) {
            float sum = 0.0f;
            for (int d = 0; d < dim; ++d) sum += scaled[g * dim + d] * code_at<BITS>(records + j * record_bytes, d);
            logits[g * stride + j] = sum + bias[g];
        }
#endif
}

// the weighted value codes of `count` token records for all G heads (see group_accumulate)
template <int BITS, int DIM>
static inline void token_accumulate(const float* weights, int group, int64_t stride, const uint8_t* codes,
                                    int64_t count, int64_t record_bytes, const QuantShape& shape, float* acc) {
#if defined(__AVX2__) && defined(__FMA__)
    const int rows_per_head = shape.value_groups();
    if constexpr (BITS == 2 || BITS == 4) {
        if (shape.values_blocked()) {
            constexpr int kHeads = 12 / (8 / BITS);  // H x P sums and a value
            for (int g0 = 0; g0 < group; g0 += kHeads)
                with_count<kHeads>(std::min(kHeads, group - g0), [&](auto heads) {
                    group_accumulate_blocked<decltype(heads)::value, BITS, DIM>(
                        weights + g0 * rows_per_head * stride, stride, codes, count, record_bytes, shape,
                        acc + g0 * shape.dim);
                });
            return;
        }
    }
    constexpr int kHeads = 6;
    for (int g0 = 0; g0 < group; g0 += kHeads)
        with_count<kHeads>(std::min(kHeads, group - g0), [&](auto heads) {
            group_accumulate<decltype(heads)::value, BITS, DIM>(weights + g0 * rows_per_head * stride, stride, codes,
                                                                 count, record_bytes, shape, acc + g0 * shape.dim);
        });
#else
    for (int g = 0; g < group; ++g)
        for (int64_t j = 0; j < count; ++j)
            for (int d = 0; d < shape.dim; ++d)
                acc[g * shape.dim + d] += weights[(g * shape.value_groups() + d / shape.channel_group) * stride + j] *
                                          code_at<BITS>(codes + j * record_bytes, d);
#endif
}

// DIM > 0 fixes head_dim at compile time
template <typename T, int BITS, int DIM>
static void quant_decode(const T* q, int64_t q_stride_b, const RecordTables& tokens, const RecordTables& groups,
                         const int32_t* lens, int64_t lens_stride_b, int64_t lens_stride_h, int batch, int q_heads,
                         int kv_heads, QuantShape shape, float scale, T* out, float* lse, int threads) {
    if constexpr (DIM > 0) shape.dim = DIM;
    const int dim = shape.dim, group = q_heads / kv_heads, value_groups = shape.value_groups();
    const int code_bytes = shape.code_bytes();
    int64_t slots = 1;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h) slots = std::max<int64_t>(slots, lens[b * lens_stride_b + h * lens_stride_h]);
    // the channel at each position of the order the keys and the values are read in
    std::vector<int> key_order(dim), value_order(dim);
    for (int i = 0; i < dim; ++i) {
        key_order[i] = shape.channel(i / 8, i % 8, shape.keys_blocked());
        value_order[i] = shape.channel(i / 8, i % 8, shape.values_blocked());
    }
#pragma omp parallel num_threads(threads)
    {
        // probs[g * slots + j]: logits, then probabilities; value_steps and value_lows[v * slots + j]: token
        // j's step and minimum for channel group v; weights[(g * VG + v) * slots + j]: probability times step
        std::vector<float> probs(static_cast<size_t>(group) * slots);
        std::vector<float> weights(static_cast<size_t>(group) * value_groups * slots);
        std::vector<float> value_steps(static_cast<size_t>(value_groups) * slots), value_lows(value_steps.size());
        // query: natural order; query_keys, steps and scaled: the keys' order
        std::vector<float> query(static_cast<size_t>(group) * dim), query_keys(query.size()), scaled(query.size());
        std::vector<float> bias(group), step_low(2 * static_cast<size_t>(dim)), steps(dim);
        std::vector<float> acc(static_cast<size_t>(group) * dim), lows(static_cast<size_t>(group) * value_groups);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(batch) * kv_heads; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t len = lens[b * lens_stride_b + h * lens_stride_h];
            const RecordList token_list = tokens.list(b, h), group_list = groups.list(b, h);
            const T* q_group = q + b * q_stride_b + h * group * dim;
            for (int64_t i = 0; i < static_cast<int64_t>(group) * dim; ++i) query[i] = to_f32(q_group[i]) * scale;
            for (int g = 0; g < group; ++g)
                for (int i = 0; i < dim; ++i) query_keys[g * dim + i] = query[g * dim + key_order[i]];

            // keys: a group of tokens at a time, the query scaled by its steps; its tokens' records are
            // contiguous but where the group crosses from one half page to the next
            int64_t prefetched = -1;
            for (int64_t start = 0; start < len; start += shape.group_size) {
                halves_to_f32(reinterpret_cast<const uint16_t*>(group_list.record(start / shape.group_size)), 2 * dim,
                              step_low.data());
                for (int i = 0; i < dim; ++i) steps[i] = step_low[key_order[i]];
                for (int g = 0; g < group; ++g) {
                    const float* q_row = query_keys.data() + g * dim;
                    float* scaled_row = scaled.data() + g * dim;
#pragma omp simd
                    for (int i = 0; i < dim; ++i) scaled_row[i] = q_row[i] * steps[i];
                    bias[g] = dot(query.data() + g * dim, step_low.data() + dim, dim);
                }
                const int64_t end = std::min<int64_t>(start + shape.group_size, len);
                for (int64_t j = start; j < end;) {
                    const int64_t run = j / token_list.per_half, first = j % token_list.per_half;
                    const int64_t count = std::min(end - j, token_list.per_half - first);
                    if (run > prefetched) {  // the run's first visit: fetch the next two, as each_run does
                        const int64_t run_bytes = token_list.per_half * token_list.record_bytes;
                        if ((run + 1) * token_list.per_half < len) prefetch_page<3>(token_list.run(run + 1), run_bytes);
                        if ((run + 2) * token_list.per_half < len) prefetch_page<2>(token_list.run(run + 2), run_bytes);
                        prefetched = run;
                    }
                    const uint8_t* records = token_list.run(run) + first * token_list.record_bytes;
                    token_logits<BITS, DIM>(scaled.data(), bias.data(), group, records, count,
                                            token_list.record_bytes, shape, slots, probs.data() + j);
                    // the same records' value steps and minimums, while they are in cache
                    for (int64_t i = 0; i < count; ++i) {
                        const uint16_t* scales =
                            reinterpret_cast<const uint16_t*>(records + i * token_list.record_bytes + 2 * code_bytes);
                        for (int v = 0; v < value_groups; ++v) {
                            value_steps[v * slots + j + i] = half_to_f32(scales[v]);
                            value_lows[v * slots + j + i] = half_to_f32(scales[value_groups + v]);
                        }
                    }
                    j += count;
                }
            }
            softmax_rows(probs.data(), group, slots, len, lse + b * q_heads + h * group);

            // values: each token's steps fold into its weights, its minimums into `lows`
            for (int g = 0; g < group; ++g)
                for (int v = 0; v < value_groups; ++v) {
                    const float* p = probs.data() + g * slots;
                    const float* steps = value_steps.data() + v * slots;
                    const float* mins = value_lows.data() + v * slots;
                    float* w = weights.data() + (g * value_groups + v) * slots;
                    float low = 0.0f;
#pragma omp simd reduction(+ : low)
                    for (int64_t j = 0; j < len; ++j) {
                        w[j] = p[j] * steps[j];
                        low += p[j] * mins[j];
                    }
                    lows[g * value_groups + v] = low;
                }
            std::fill(acc.begin(), acc.end(), 0.0f);
            // the key walk brought the records into cache: no prefetching here
            for (int64_t start = 0; start < len; start += token_list.per_half)
                token_accumulate<BITS, DIM>(weights.data() + start, group, slots,
                                            token_list.run(start / token_list.per_half) + code_bytes,
                                            std::min(len - start, token_list.per_half), token_list.record_bytes,
                                            shape, acc.data());
            T* out_group = out + (b * q_heads + h * group) * dim;
            for (int g = 0; g < group; ++g)
                for (int i = 0; i < dim; ++i) {
                    const int d = value_order[i];
                    out_group[g * dim + d] = from_f32<T>(acc[g * dim + i] + lows[g * value_groups + d / shape.channel_group]);
                }
        }
    }
}

}  // namespace kv

extern "C" void kv_quant_decode(int dtype, const void* q, int64_t q_stride_b, const kv::RecordTables* tokens,
                                const kv::RecordTables* groups, const int32_t* lens, int64_t lens_stride_b,
                                int64_t lens_stride_h, int batch, int q_heads, int kv_heads, int dim, int bits,
                                int group_size, float scale, void* out, float* lse, int threads) {
    const kv::QuantShape shape{bits, group_size, dim, std::min(group_size, dim)};
    auto run = [&](auto type, auto bits_now, auto dim_now) {
        using T = decltype(type);
        kv::quant_decode<T, decltype(bits_now)::value, decltype(dim_now)::value>(
            static_cast<const T*>(q), q_stride_b, *tokens, *groups, lens, lens_stride_b, lens_stride_h, batch, q_heads,
            kv_heads, shape, scale, static_cast<T*>(out), lse, threads);
    };
    auto with_dim = [&](auto type, auto bits_now) {
        if (dim == 64) run(type, bits_now, std::integral_constant<int, 64>{});
        else if (dim == 128) run(type, bits_now, std::integral_constant<int, 128>{});
        else run(type, bits_now, std::integral_constant<int, 0>{});
    };
    auto with_bits = [&](auto type) {
        if (bits == 1) with_dim(type, std::integral_constant<int, 1>{});
        else if (bits == 2) with_dim(type, std::integral_constant<int, 2>{});
        else if (bits == 4) with_dim(type, std::integral_constant<int, 4>{});
        else with_dim(type, std::integral_constant<int, 8>{});
    };
    if (dtype == kv::kFloat32) with_bits(float{});
    else with_bits(kv::bf16{});
}
