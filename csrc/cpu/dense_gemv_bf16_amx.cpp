// bf16 x bf16 few-row GEMV (M <= 16) on AMX-BF16 tiles: y = x @ W.T for the decode step of a
// bf16 model, fp32 sums. The avx512 kernel table points at it where the CPU has AMX-BF16 and
// Linux grants this process the tile state (isa_avx512.cpp); other CPUs keep
// dense_gemv_kernel.h's path, which widens the bf16 weights to fp32.
//
// Why tiles: on the dev VM's Xeon one vdpbf16ps (32 bf16 products) issues at a quarter of the
// rate of a 16-lane FMA, so the AVX512_BF16 pair products ran 1.7x slower than widening the
// weights to fp32; one tdpbf16ps multiplies a 16 x 32 tile of weights by 32 x M inputs (up to
// 8192 products) and measured ~180-330 products per ns at M = 8-16, 2-4x the FMAs' peak (~80).
//
// The product is computed transposed, y.T = W x.T: the A tile is 16 weight rows x 32 columns,
// loaded as the weights lie ([N, K] row-major bf16, row stride ldw), and the B tile is 16 pairs
// of x's columns x M rows, which the caller packs once per call (args.x_pairs: pair p, row m
// at p * M + m; pairs past K are zeros). Four 16-channel C tiles share each B tile. K's ragged
// last 32 columns are copied into a zero-padded block first, so no load reads past a weight row
// (the zeros in both tiles add nothing); a ragged last group of channels runs with tiles of
// that many rows. Products of two bf16 are exact in fp32; the sums differ from a sequential
// fp32 sum only in their order and in denormals (tdpbf16ps flushes them), far below bf16's
// resolution.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16,avx2,fma,f16c,popcnt")
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "cpu/kernels.h"
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512amx
#include "cpu/simd.h"  // VecAvx512::store: torch's rounding of fp32 to bf16

namespace rlhf_fast::avx512amx {
namespace {

constexpr int64_t kBlock = 32;  // bf16 columns per A tile (64 bytes, a tile row's maximum)
constexpr int kChannels = 16;   // weight rows per A tile
// Tiles: C (fp32 sums) 0-3, A (weights) 4-5 in turn, B (x) 6. GCC's tile intrinsics paste
// the tile number into the assembly text, so the numbers below are literals.

// The LDTILECFG operand (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

void configure_tiles(int channels, int64_t M) {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 4; ++t) {  // C: channels x M fp32
    config.rows[t] = static_cast<uint8_t>(channels);
    config.bytes_per_row[t] = static_cast<uint16_t>(M * 4);
  }
  for (int t = 4; t < 6; ++t) {  // A: channels x 32 bf16
    config.rows[t] = static_cast<uint8_t>(channels);
    config.bytes_per_row[t] = kBlock * 2;
  }
  config.rows[6] = kBlock / 2;  // B: 16 pairs x M
  config.bytes_per_row[6] = static_cast<uint16_t>(M * 4);
  _tile_loadconfig(&config);
}

// Channels [n, n + G * 16) (G C tiles), `channels` rows per tile (16, or fewer in the one
// ragged group, where G is 1). No software prefetch: 16 rows per tile made it one prefetch
// per 32 products, and the tile loads ran 2x faster without them, from cache and from DRAM
// alike (the hardware prefetcher follows the rows).
template <int G>
void amx_channel_group(const DenseGemvArgs& a, int64_t n, int channels) {
  const int64_t K = a.K, M = a.M, ldw = a.ldw;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(a.w) + n * ldw;
  const uint32_t* x_pairs = a.x_pairs;
  const int64_t w_stride = ldw * 2;  // bytes
  if constexpr (G > 0) _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  if constexpr (G > 3) _tile_zero(3);
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock) {
    _tile_loadd(6, x_pairs + (k / 2) * M, M * 4);
    _tile_loadd(4, w + k, w_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (G > 1) {
      _tile_loadd(5, w + 16 * ldw + k, w_stride);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (G > 2) {
      _tile_loadd(4, w + 32 * ldw + k, w_stride);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (G > 3) {
      _tile_loadd(5, w + 48 * ldw + k, w_stride);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  if (k < K) {  // the ragged last columns, from a zero-padded copy
    alignas(64) uint16_t tail[G * kChannels][kBlock] = {};
    for (int r = 0; r < G * channels; ++r) std::memcpy(tail[r], w + r * ldw + k, (K - k) * 2);
    _tile_loadd(6, x_pairs + (k / 2) * M, M * 4);
    _tile_loadd(4, tail[0], kBlock * 2);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (G > 1) {
      _tile_loadd(5, tail[16], kBlock * 2);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (G > 2) {
      _tile_loadd(4, tail[32], kBlock * 2);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (G > 3) {
      _tile_loadd(5, tail[48], kBlock * 2);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  alignas(64) float sums[4 * kChannels][kDenseGemvMaxRows];  // [channel][row]
  constexpr int64_t kSumsStride = kDenseGemvMaxRows * 4;
  if constexpr (G > 0) _tile_stored(0, sums[0], kSumsStride);
  if constexpr (G > 1) _tile_stored(1, sums[16], kSumsStride);
  if constexpr (G > 2) _tile_stored(2, sums[32], kSumsStride);
  if constexpr (G > 3) _tile_stored(3, sums[48], kSumsStride);
  // y's rows hold channels: 16 at a time, gathered down a column of the sums (a scalar loop
  // here cost about as much as the tile products)
  const __mmask16 lanes = static_cast<__mmask16>((1u << channels) - 1u);
  const __m512i column = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(kDenseGemvMaxRows));
  for (int g = 0; g < G; ++g) {
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(lanes, a.bias + n + 16 * g)
                               : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      const __m512 sum =
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, column, sums[16 * g] + m, 4);
      VecAvx512::store(a.y_bf16 + m * a.N + n + 16 * g, _mm512_add_ps(sum, bias), channels);
    }
  }
}

}  // namespace

bool enable_amx() {
  // Linux hands out the 8 KB of tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); without it the first tile instruction kills the process.
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

void dense_gemv_bf16_amx(const DenseGemvArgs& a, int64_t n_begin, int64_t n_end) {
  // The tile configuration is per thread: set here, released before returning, so that no
  // other library's AMX kernels find it (oneDNN configures its own before each use).
  configure_tiles(kChannels, a.M);
  int64_t n = n_begin;
  for (; n + 4 * kChannels <= n_end; n += 4 * kChannels) amx_channel_group<4>(a, n, kChannels);
  for (; n + kChannels <= n_end; n += kChannels) amx_channel_group<1>(a, n, kChannels);
  if (n < n_end) {
    configure_tiles(static_cast<int>(n_end - n), a.M);
    amx_channel_group<1>(a, n, static_cast<int>(n_end - n));
  }
  _tile_release();
}

}  // namespace rlhf_fast::avx512amx
