// Fused pointwise steps of the decoder layer on the CPU, each one pass over its rows. The contracts
// are those of the torch references in kernels/pointwise.py.
#include <cmath>
#include <type_traits>

#include "common.h"

namespace kv {

// Rows are split between threads only when there is enough work to pay for waking them.
static constexpr int64_t kParallelElements = 1 << 15;

#if defined(__AVX512BF16__)
// rms_norm for bfloat16 rows, 16 elements at a time: the generic loop's bfloat16 rounding vectorises
// poorly (2,048 rows of 576: 0.34 ms against 0.22 here)
static void rms_norm_bf16(const bf16* x, int64_t x_stride, const bf16* weight, bf16* out, int64_t rows, int64_t width,
                          float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* in = x + r * x_stride;
        bf16* o = out + r * width;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < width; i += 16) {
            const __m512 v = widen(_mm256_maskz_loadu_epi16(first_lanes(width - i), in + i));
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float mean = _mm512_reduce_add_ps(squares) / static_cast<float>(width);
        const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
        for (int64_t i = 0; i < width; i += 16) {
            const __mmask16 mask = first_lanes(width - i);
            const __m512 normed = round_bf16(_mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(mask, in + i)), inv));
            const __m512 scaled = _mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(mask, weight + i)), normed);
            _mm256_mask_storeu_epi16(o + i, mask, (__m256i)_mm512_cvtneps_pbh(scaled));
        }
    }
}
#endif

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
// rms_norm for bfloat16 rows on AVX2, 8 elements at a time and the rest of the row by the generic
// loop's steps: gcc vectorises the generic loop's bfloat16 rounding poorly
static void rms_norm_avx2(const bf16* x, int64_t x_stride, const bf16* weight, bf16* out, int64_t rows, int64_t width,
                          float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* in = x + r * x_stride;
        bf16* o = out + r * width;
        const int64_t whole = width / 8 * 8;
        // two sums, two chains of FMAs
        __m256 squares[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t i = 0;
        for (; i + 16 <= whole; i += 16)
            for (int k = 0; k < 2; ++k) {
                const __m256 v = load8(in + i + 8 * k);
                squares[k] = _mm256_fmadd_ps(v, v, squares[k]);
            }
        if (i < whole) {
            const __m256 v = load8(in + i);
            squares[0] = _mm256_fmadd_ps(v, v, squares[0]);
        }
        float sum = sum8(_mm256_add_ps(squares[0], squares[1]));
        for (i = whole; i < width; ++i) sum += to_f32(in[i]) * to_f32(in[i]);
        const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
        for (i = 0; i < whole; i += 8)
            store8(o + i, _mm256_mul_ps(load8(weight + i), round8(_mm256_mul_ps(load8(in + i), _mm256_set1_ps(inv)))));
        for (i = whole; i < width; ++i)
            o[i] = from_f32<bf16>(to_f32(weight[i]) * to_f32(from_f32<bf16>(to_f32(in[i]) * inv)));
    }
}
#endif

// out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), row by row (HF Llama's RMSNorm)
template <typename T>
static void rms_norm(const T* x, int64_t x_stride, const T* weight, T* out, int64_t rows, int64_t width, float eps,
                     int threads) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
        rms_norm_bf16(x, x_stride, weight, out, rows, width, eps, threads);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<T, bf16>) {
        rms_norm_avx2(x, x_stride, weight, out, rows, width, eps, threads);
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* in = x + r * x_stride;
        T* o = out + r * width;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; ++i) squares += to_f32(in[i]) * to_f32(in[i]);
        const float inv = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i)
            o[i] = from_f32<T>(to_f32(weight[i]) * to_f32(from_f32<T>(to_f32(in[i]) * inv)));
    }
}

#if defined(__AVX512BF16__)
// silu_mul for bfloat16 rows, 16 elements at a time with AVX512-BF16's conversions: gcc 12 vectorises
// the generic loop's bfloat16 rounding poorly (2.0 ms against 1.2 here on 2048 x 1536 rows)
static void silu_mul_bf16(const bf16* gate_up, bf16* out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* gate = gate_up + r * 2 * width;
        const bf16* up = gate + width;
        bf16* o = out + r * width;
        for (int64_t i = 0; i < width; i += 16) {
            const __mmask16 mask = first_lanes(width - i);
            const __m256i product = silu_mul16(widen(_mm256_maskz_loadu_epi16(mask, gate + i)),
                                               widen(_mm256_maskz_loadu_epi16(mask, up + i)));
            _mm256_mask_storeu_epi16(o + i, mask, product);
        }
    }
}
#endif

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
// silu_mul on AVX2, 8 elements at a time and the rest of the row by the generic loop's steps: without
// AVX-512's masks gcc keeps silu's clamps branches and the generic loop scalar, float32 included
template <typename T>
static void silu_mul_avx2(const T* gate_up, T* out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* gate = gate_up + r * 2 * width;
        const T* up = gate + width;
        T* o = out + r * width;
        const int64_t whole = width / 8 * 8;
        for (int64_t i = 0; i < whole; i += 8) {
            __m256 activated = silu8(load8(gate + i));
            if constexpr (std::is_same_v<T, bf16>) activated = round8(activated);
            store8(o + i, _mm256_mul_ps(activated, load8(up + i)));
        }
        for (int64_t i = whole; i < width; ++i)
            o[i] = from_f32<T>(to_f32(from_f32<T>(silu(to_f32(gate[i])))) * to_f32(up[i]));
    }
}
#endif

// gate_up [rows, 2 * width] -> out [rows, width] = silu(gate) * up, silu rounded to T first as torch does
template <typename T>
static void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t width, int threads) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
        silu_mul_bf16(gate_up, out, rows, width, threads);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    // float32 is left to gcc where AVX-512 lets it vectorise the generic loop
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bf16>)
#endif
    {
        silu_mul_avx2(gate_up, out, rows, width, threads);
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* gate = gate_up + r * 2 * width;
        const T* up = gate + width;
        T* o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
            o[i] = from_f32<T>(to_f32(from_f32<T>(silu(to_f32(gate[i])))) * to_f32(up[i]));
        }
    }
}

#if defined(__AVX512BF16__)
// rope for bfloat16 rows, 16 angles at a time, each angle's cos and sin loaded once for all heads
// (2,048 rows of 12 heads: 0.25 ms in the generic loop, 0.14 here)
static void rope_bf16(bf16* x, int64_t x_stride, const bf16* cos, const bf16* sin, int64_t rows, int heads, int dim,
                      int threads) {
    const int half = dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * dim >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        for (int i = 0; i < half; i += 16) {
            const __mmask16 mask = first_lanes(half - i);
            const __m512 c = widen(_mm256_maskz_loadu_epi16(mask, cos + r * half + i));
            const __m512 s = widen(_mm256_maskz_loadu_epi16(mask, sin + r * half + i));
            for (int h = 0; h < heads; ++h) {
                bf16* x1 = x + r * x_stride + h * dim + i;
                bf16* x2 = x1 + half;
                const __m512 a = widen(_mm256_maskz_loadu_epi16(mask, x1));
                const __m512 b = widen(_mm256_maskz_loadu_epi16(mask, x2));
                const __m512 rotated1 = _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s));
                const __m512 rotated2 = _mm512_fmadd_ps(b, c, _mm512_mul_ps(a, s));
                _mm256_mask_storeu_epi16(x1, mask, (__m256i)_mm512_cvtneps_pbh(rotated1));
                _mm256_mask_storeu_epi16(x2, mask, (__m256i)_mm512_cvtneps_pbh(rotated2));
            }
        }
    }
}
#endif

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
// rope for bfloat16 rows on AVX2, 8 angles at a time, each angle's cos and sin loaded once for all
// heads, and the rest of the half by the generic loop's steps
static void rope_avx2(bf16* x, int64_t x_stride, const bf16* cos, const bf16* sin, int64_t rows, int heads, int dim,
                      int threads) {
    const int half = dim / 2, whole = half / 8 * 8;
#pragma omp parallel for num_threads(threads) if (rows * heads * dim >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* c = cos + r * half;
        const bf16* s = sin + r * half;
        for (int i = 0; i < whole; i += 8) {
            const __m256 ci = load8(c + i), si = load8(s + i);
            for (int h = 0; h < heads; ++h) {
                bf16* x1 = x + r * x_stride + h * dim + i;
                bf16* x2 = x1 + half;
                const __m256 a = load8(x1), b = load8(x2);
                store8(x1, _mm256_fmsub_ps(a, ci, _mm256_mul_ps(b, si)));
                store8(x2, _mm256_fmadd_ps(b, ci, _mm256_mul_ps(a, si)));
            }
        }
        for (int h = 0; h < heads; ++h) {
            bf16* x1 = x + r * x_stride + h * dim;
            bf16* x2 = x1 + half;
            for (int i = whole; i < half; ++i) {
                const float a = to_f32(x1[i]), b = to_f32(x2[i]), ci = to_f32(c[i]), si = to_f32(s[i]);
                x1[i] = from_f32<bf16>(a * ci - b * si);
                x2[i] = from_f32<bf16>(b * ci + a * si);
            }
        }
    }
}
#endif

// In place, the first `heads` heads of each row of x [rows, >= heads * dim] (row stride x_stride):
// the rotate-half RoPE of HF Llama, with row r's angles in cos, sin [rows, dim / 2]
template <typename T>
static void rope(T* x, int64_t x_stride, const T* cos, const T* sin, int64_t rows,
                 int heads, int dim, int threads) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
        rope_bf16(x, x_stride, cos, sin, rows, heads, dim, threads);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<T, bf16>) {
        rope_avx2(x, x_stride, cos, sin, rows, heads, dim, threads);
        return;
    }
#endif
    const int half = dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * dim >= kParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T* c = cos + r * half;
        const T* s = sin + r * half;
        for (int h = 0; h < heads; ++h) {
            T* x1 = x + r * x_stride + h * dim;
            T* x2 = x1 + half;
#pragma omp simd
            for (int i = 0; i < half; ++i) {
                const float a = to_f32(x1[i]), b = to_f32(x2[i]), ci = to_f32(c[i]), si = to_f32(s[i]);
                x1[i] = from_f32<T>(a * ci - b * si);
                x2[i] = from_f32<T>(b * ci + a * si);
            }
        }
    }
}

}  // namespace kv

extern "C" void kv_rms_norm(int dtype, const void* x, int64_t x_stride, const void* weight, void* out, int64_t rows,
                            int64_t width, float eps, int threads) {
    if (dtype == kv::kFloat32)
        kv::rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(weight),
                     static_cast<float*>(out), rows, width, eps, threads);
    else
        kv::rms_norm(static_cast<const kv::bf16*>(x), x_stride, static_cast<const kv::bf16*>(weight),
                     static_cast<kv::bf16*>(out), rows, width, eps, threads);
}

extern "C" void kv_silu_mul(int dtype, const void* gate_up, void* out, int64_t rows, int64_t width, int threads) {
    if (dtype == kv::kFloat32)
        kv::silu_mul(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, width, threads);
    else
        kv::silu_mul(static_cast<const kv::bf16*>(gate_up), static_cast<kv::bf16*>(out), rows, width, threads);
}

extern "C" void kv_rope(int dtype, void* x, int64_t x_stride, const void* cos, const void* sin, int64_t rows, int heads, int dim, int threads) {
    if (dtype == kv::kFloat32)
        kv::rope(static_cast<float*>(x), x_stride, static_cast<const float*>(cos),
                 static_cast<const float*>(sin), rows, heads, dim, threads);
    else
        kv::rope(static_cast<kv::bf16*>(x), x_stride, static_cast<const kv::bf16*>(cos),
                 static_cast<const kv::bf16*>(sin), rows, heads, dim, threads);
}
