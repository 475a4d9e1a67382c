// This machine's ceilings, measured by small kernels of the project's built with the same flags as
// the others: float32 FMA throughput (the bound of a many-row projection), streaming read bandwidth
// (the bound of a batch-1 decode step, which reads every weight once and writes next to nothing) and
// streaming copy bandwidth (reads and writes, as a memory benchmark counts them). Each runs on
// `threads` threads and reports the best of several repeats, so that a neighbour's burst of load
// lowers a repeat rather than the ceiling.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kv {
namespace {

// many short repeats: the best of them is the one no neighbour interrupted
constexpr int kFmaRepeats = 64;
constexpr int kCopyRepeats = 9;

// a buffer of `bytes` (rounded to whole blocks) touched first by the threads that will stream it
struct Buffer {
    static constexpr int64_t kBlock = 1 << 20;  // bytes per unit of work
    static constexpr int64_t kFloats = kBlock / sizeof(float);
    int64_t blocks;
    float* data;
    Buffer(int64_t bytes, int threads)
        : blocks(std::max<int64_t>(1, bytes / kBlock)), data(static_cast<float*>(std::aligned_alloc(64, blocks * kBlock))) {
        if (data == nullptr) return;
#pragma omp parallel for num_threads(threads)
        for (int64_t b = 0; b < blocks; ++b)
            for (int64_t i = 0; i < kFloats; ++i) data[b * kFloats + i] = static_cast<float>(i);
    }
    ~Buffer() { std::free(data); }
};

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
// 24 independent chains: more than FMA latency x FMA pipes on any x86 core, within 32 registers
constexpr int kChains = 24;
inline Vec vset(float v) { return _mm512_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vfirst(Vec v) { return _mm512_cvtss_f32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
// 12 independent chains (4-5 cycle latency x 2 pipes needs 8-10), within 16 registers
constexpr int kChains = 12;
inline Vec vset(float v) { return _mm256_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vfirst(Vec v) { return _mm256_cvtss_f32(v); }
#else
using Vec = float;
constexpr int kLanes = 1;
constexpr int kChains = 8;
inline Vec vset(float v) { return v; }
inline Vec vfma(Vec a, Vec b, Vec c) { return __builtin_fmaf(a, b, c); }
inline float vfirst(Vec v) { return v; }
#endif

// `steps` rounds of kChains FMAs; a * 0.5 + 0.5 converges to 1, so no value overflows or goes
// subnormal. The result goes to a volatile store, which keeps the work between the clock's reads.
__attribute__((noinline)) void fma_chains(int64_t steps, float seed, volatile float* sink) {
    Vec acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = vset(seed + static_cast<float>(c));
    const Vec half = vset(0.5f);
    for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 32
        for (int c = 0; c < kChains; ++c) acc[c] = vfma(acc[c], half, half);
    }
    float sum = 0.0f;
    for (int c = 0; c < kChains; ++c) sum += vfirst(acc[c]);
    *sink = sum;
}

}  // namespace
}  // namespace kv

// float32 FLOP/s of all `threads` threads running independent FMA chains at the build's vector width,
// at once: each thread times its own repeats and keeps its best, and the threads' bests add up (the
// cores' FMA units are their own; a repeat timed across threads would wait for whichever a
// neighbour's process interrupted)
extern "C" double kv_fma_peak(int threads) {
    // the same 2^25 FLOPs per repeat at every vector width: short enough to fit between interruptions
    constexpr int64_t steps = (int64_t{1} << 24) / (kv::kLanes * kv::kChains);
    constexpr double flops = 2.0 * kv::kLanes * kv::kChains * steps;
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        double best = 0.0;
        volatile float sink = 0.0f;
        for (int repeat = 0; repeat < kv::kFmaRepeats; ++repeat) {
            const double start = omp_get_wtime();
            kv::fma_chains(steps, static_cast<float>(repeat), &sink);
            best = std::max(best, flops / (omp_get_wtime() - start));
        }
        total += best;
    }
    return total;
}

// bytes/s read by a parallel sum of a `bytes` buffer (several times the last level cache), in
// independent vector chains so that the adds never wait on each other
extern "C" double kv_read_bandwidth(int64_t bytes, int threads) {
    const kv::Buffer buffer(bytes, threads);
    if (buffer.data == nullptr) return 0.0;
    double best = 0.0;
    volatile float sink = 0.0f;
    for (int repeat = 0; repeat < kv::kCopyRepeats; ++repeat) {
        const double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float lanes[64] = {};
            // blocks from a shared counter: the two cores may run at different speeds
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < buffer.blocks; ++b) {
                const float* from = buffer.data + b * kv::Buffer::kFloats;
                for (int64_t i = 0; i < kv::Buffer::kFloats; i += 64)
#pragma omp simd
                    for (int l = 0; l < 64; ++l) lanes[l] += from[i + l];
            }
            float sum = 0.0f;
            for (float lane : lanes) sum += lane;
            sink = sink + sum;
        }
        best = std::max(best, static_cast<double>(buffer.blocks * kv::Buffer::kBlock) / (omp_get_wtime() - start));
    }
    return best;
}

// bytes/s read plus written by a parallel copy of a `bytes` buffer (make it several times the last
// level cache), with non-temporal stores where the build has them, so that the written lines are
// not first read (as a plain store's would be) and the count is the traffic
extern "C" double kv_copy_bandwidth(int64_t bytes, int threads) {
    const kv::Buffer src(bytes, threads), dst(bytes, threads);
    if (src.data == nullptr || dst.data == nullptr) return 0.0;
    constexpr int64_t block = kv::Buffer::kBlock, floats = kv::Buffer::kFloats;
    double best = 0.0;
    for (int repeat = 0; repeat < kv::kCopyRepeats; ++repeat) {
        const double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            // blocks from a shared counter: the two cores may run at different speeds
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < src.blocks; ++b) {
                const float* from = src.data + b * floats;
                float* to = dst.data + b * floats;
#if defined(__AVX512F__)
                for (int64_t i = 0; i < floats; i += 16) _mm512_stream_ps(to + i, _mm512_load_ps(from + i));
#elif defined(__AVX2__)
                for (int64_t i = 0; i < floats; i += 8) _mm256_stream_ps(to + i, _mm256_load_ps(from + i));
#else
                std::memcpy(to, from, block);
#endif
            }
#if defined(__AVX2__)
            // each thread's non-temporal stores done before the clock stops
            _mm_sfence();
#endif
        }
        best = std::max(best, 2.0 * src.blocks * block / (omp_get_wtime() - start));
    }
    return best;
}
