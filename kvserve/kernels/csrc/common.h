// Shared helpers of the CPU kernels: bfloat16 <-> float32, a vectorisable exp, SiLU and SwiGLU, row
// loads. Every kernel computes in float32 and rounds once when it writes a bfloat16 result, except
// where it mirrors torch's intermediate roundings (SwiGLU).
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kv {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1 };

// the bits of a bfloat16: the upper half of a float32
using bf16 = uint16_t;

static inline float to_f32(float x) { return x; }

static inline float to_f32(bf16 x) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

template <typename T> static inline T from_f32(float x);

template <> inline float from_f32<float>(float x) { return x; }

// round to nearest even, as torch does; NaN stays NaN
template <> inline bf16 from_f32<bf16>(float x) {
    const uint32_t u = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// an IEEE half (the compressed records' scales) as float32, subnormals included: one F16C
// instruction where the CPU has it (every AVX2 one)
static inline float half_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) {
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
    return __builtin_bit_cast(float, bits);
#endif
}

// exp for x <= 88 through 2^(x log2 e): a degree-6 polynomial on [-0.5, 0.5] and the exponent bits;
// relative error ~2e-7, and unlike libm's expf the compiler vectorises it
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float y = x * 1.4426950408889634f;
    // round to nearest by adding and removing 1.5 * 2^23 (floorf would keep the loop scalar)
    const float n = (y + 12582912.0f) - 12582912.0f;
    const float f = y - n;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// SiLU in float32 (x * sigmoid(x)), exp clamped where 1 + e^-x would overflow
static inline float silu(float g) { return g / (1.0f + fast_exp(-g > 88.0f ? 88.0f : -g)); }

#if defined(__AVX512F__)
// 16 bfloat16 bit patterns as float32 lanes
static inline __m512 widen(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// the first min(count, 16) of 16 lanes
static inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

// lane i holds i * step: the offsets of 16 rows `step` apart, for gathers
static inline __m512i lane_offsets(int32_t step) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(step));
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
// 8 bfloat16 bit patterns as float32 lanes
static inline __m256 widen8(__m128i bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// 8 float32 lanes rounded to bfloat16 as from_f32<bf16> rounds (to nearest even, NaN kept quiet),
// each still a float32: the bfloat16 in its upper half, zeros below (AVX2 has no conversion for it)
static inline __m256 round8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    const __m256 bits = _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet_nan),
                                         _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_and_ps(bits, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))));
}

// 8 float32 lanes rounded to bfloat16 bit patterns
static inline __m128i narrow8(__m256 x) {
    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(round8(x)), 16);
    // every lane holds a value below 2^16, so the unsigned saturation of the pack keeps it as it is
    return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

// 8 consecutive elements as float32 lanes, and back
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const bf16* p) { return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
static inline void store8(bf16* p, __m256 x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow8(x)); }

// the first min(count, 8) of 8 lanes, as _mm256_maskload_ps and _mm256_maskstore_ps take them
static inline __m256i first_lanes8(int64_t count) {
    const int32_t n = count >= 8 ? 8 : static_cast<int32_t>(count);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// the sum of the 8 lanes
static inline float sum8(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// fast_exp on 8 lanes: the same steps, fused as gcc fuses fast_exp's (x log2 e is never rounded on
// its own), so that the two agree to the bit, but for clamped inputs (gcc folds fast_exp of a clamp
// bound into a constant, and folds it unfused; the two differ in the last bit)
static inline __m256 fast_exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // operands in this order keep a NaN
    const __m256 log2e = _mm256_set1_ps(1.4426950408889634f), shift = _mm256_set1_ps(12582912.0f);
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, log2e, shift), shift);
    const __m256 f = _mm256_fmsub_ps(x, log2e, n);
    __m256 p = _mm256_set1_ps(1.5403530e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// silu on 8 lanes, clamped as silu is
static inline __m256 silu8(__m256 g) {
    const __m256 minus = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
    const __m256 e = fast_exp8(_mm256_min_ps(_mm256_set1_ps(88.0f), minus));  // NaN kept, as in max above
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
#endif

#if defined(__AVX512BF16__)
// 16 float32 lanes rounded to bfloat16 (nearest even), kept as float32
static inline __m512 round_bf16(__m512 x) { return widen((__m256i)_mm512_cvtneps_pbh(x)); }

// SwiGLU on 16 lanes of bfloat16 values held as float32: silu(gate), rounded to bfloat16 as torch
// rounds it, times up, rounded again -> 16 bfloat16 bit patterns
static inline __m256i silu_mul16(__m512 gate, __m512 up) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, gate);
#pragma omp simd
    for (int l = 0; l < 16; ++l) lanes[l] = silu(lanes[l]);
    return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(_mm512_load_ps(lanes)), up));
}
#endif

// n elements of T as float32: the row itself for float32, a converted copy in `scratch` otherwise
static inline const float* load_row(const float* src, float*, int64_t) { return src; }

static inline const float* load_row(const bf16* src, float* scratch, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) scratch[i] = to_f32(src[i]);
    return scratch;
}

}  // namespace kv
