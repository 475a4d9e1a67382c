// store_kv on the CPU: the step's new K/V rows into their page slots. The contract is that of
// store_kv_ref in kernels/store_kv.py; k and v are read through their token stride (slices of the
// fused qkv projection), so nothing is gathered into a contiguous copy first.
#include <cstring>

#include "common.h"

extern "C" void kv_store_kv(int dtype, const void* k, int64_t k_stride_t, const void* v, int64_t v_stride_t,
                            void* k_pages, void* v_pages, const int64_t* slot_index, int64_t tokens, int kv_heads,
                            int dim, int threads) {
    const int64_t element = dtype == kv::kFloat32 ? 4 : 2;
    const int64_t row_bytes = dim * element;
    const auto* k_src = static_cast<const char*>(k);
    const auto* v_src = static_cast<const char*>(v);
    auto* k_dst = static_cast<char*>(k_pages);
    auto* v_dst = static_cast<char*>(v_pages);
#pragma omp parallel for num_threads(threads) if (tokens * kv_heads * dim >= (1 << 15))
    for (int64_t t = 0; t < tokens; ++t)
        for (int h = 0; h < kv_heads; ++h) {
            const int64_t slot = slot_index[t * kv_heads + h];
            std::memcpy(k_dst + slot * row_bytes, k_src + (t * k_stride_t + h * dim) * element, row_bytes);
            std::memcpy(v_dst + slot * row_bytes, v_src + (t * v_stride_t + h * dim) * element, row_bytes);
        }
}
