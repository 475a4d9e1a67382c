// Intel AMX set-up shared by the kernels that use its tiles: whether this build and this process may
// use them, and the tile configuration.
#pragma once

#include <cstdint>

#include "common.h"

// the kernels' AMX epilogues use AVX512-BF16, which every AMX CPU has
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define KV_HAVE_AMX 1
#endif

namespace kv {

static constexpr int64_t kTileRows = 16;   // rows of a tile (and outputs of a B tile)
static constexpr int64_t kTileDepth = 32;  // bfloat16 inputs per tile row
static constexpr int64_t kTileElements = kTileRows * kTileDepth;

#if defined(KV_HAVE_AMX)
// Linux grants the AMX register state only to processes that ask for it
static inline bool amx_permitted() {
    static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                          18 /* XFEATURE_XTILEDATA */) == 0;
    return permitted;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// tiles 0-7 with rows[t] rows of bytes[t] bytes each (0 rows: unused)
static inline void configure_tiles(const int64_t (&rows)[8], const int64_t (&bytes)[8]) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = static_cast<uint8_t>(rows[t]);
        config.colsb[t] = static_cast<uint16_t>(rows[t] ? bytes[t] : 0);
    }
    // not _tile_loadconfig: gcc 12's declares a read of 8 bytes only, so the compiler may drop or sink
    // the stores of the rest of the configuration (seen: an invalid configuration and a crash)
    __asm__ volatile("ldtilecfg %0" ::"m"(config));
}
#endif

}  // namespace kv
