// The gae kernel's warp program, written once for the GPU (gae.cu) and for a CPU emulation
// (tests/gae_cuda_emulator.cpp). gae.cu explains the algorithm and its shape.
//
// Everything here is plain C++ over one warp of 32 lanes. Each phase is a function of (lane,
// that lane's registers, the warp's shared-memory tile), and a `Warp` policy says how the
// lanes run: on the GPU each thread is one lane, `each` runs the phase for it and `sync` is
// __syncwarp(); in the emulator one CPU thread runs a phase for the 32 lanes in turn, which is
// what a correctly synchronized warp computes. The CPU tests thereby check every index, bound
// and carry of the kernel, and that a sync separates every two phases (the emulator counts a
// phase that follows another unsynced); only the CUDA parts (launch, fp16 conversion) need a
// GPU.
#pragma once

#include <cstdint>

#include "cpu/kernels.h"  // GaeArgs: the same argument block as the CPU kernels
#include "cuda/element_types.cuh"

#if !defined(__CUDACC__)
#include <cmath>
#endif
#define GAE_FN RLHF_CUDA_FN

namespace rlhf_fast {
namespace cuda_gae {

constexpr int kWarp = 32;
constexpr int kRows = kWarp;    // rows per warp: one per lane in the recurrence
constexpr int kTileSteps = 48;  // time steps per tile (64 spills registers in the masked kernels)
// Loads and stores of a tile: lane l covers row group a = l / 8 and column b = l % 8, i.e.
// element (i, k) of lane l is row 8 a + i, step t0 + b + 8 k. One instruction (fixed i, k)
// thus moves 8 consecutive steps of each of 4 rows: whole 32-byte sectors for fp32 (half ones
// for 16-bit types, whose other half the next k reads from L1), while a lane addresses only 8
// rows, which keeps the hoisted row addresses from crowding out the tile's registers.
constexpr int kLanesPerRow = 8;
constexpr int kRowsPerLane = kRows * kLanesPerRow / kWarp;  // 8
constexpr int kStepsPerLane = kTileSteps / kLanesPerRow;    // 6
// Row pitches of the shared tile are an odd number of 4-byte words. Then lane i reading step j
// of row i hits bank (i * pitch + j) % 32, a different one for each lane; and in the mapping
// above the rows 8 a + i of the four groups start 8 a * pitch words apart, a different
// multiple of 8 banks for each a, so 4 groups x 8 columns also hit 32 different banks.
constexpr int kFloatPitch = kTileSteps + 1;
constexpr int kMaskPitch = kTileSteps + 4;  // bytes
static_assert(kFloatPitch % 2 == 1 && (kMaskPitch / 4) % 2 == 1 && kMaskPitch % 4 == 0,
              "odd pitches in words");

struct WarpTile {
  float rewards[kRows][kFloatPitch];  // in: rewards as fp32; out: advantages
  float values[kRows][kFloatPitch];   // in: values as fp32;  out: returns
  uint8_t valid[kRows][kMaskPitch];
};

using cuda_elements::BF16;
using cuda_elements::F16;
using cuda_elements::F32;
using cuda_elements::float_from_bits;

// One lane's registers: its elements of the tile in flight (element (i, k) is row
// row_of(lane, i) at step t0 + step_of(lane, k)), and the recurrence's carries for row `lane`.
template <class D>
struct LaneState {
  typename D::raw rewards[kRowsPerLane][kStepsPerLane];
  typename D::raw values[kRowsPerLane][kStepsPerLane];
  uint8_t valid[kRowsPerLane][kStepsPerLane];  // raw mask bytes: used only once they arrive
  float next_advantage;  // advantage of the row's next valid step (0 after the last)
  float next_value;      // value of the row's next valid step (0 after the last)
};

GAE_FN int row_of(int lane, int i) { return (lane / kLanesPerRow) * kRowsPerLane + i; }
GAE_FN int step_of(int lane, int k) { return lane % kLanesPerRow + kLanesPerRow * k; }

// Phase 1: issue the loads of tile [t0, t0 + kTileSteps) into registers. Elements past the
// last row or step read as 0 and invalid; nothing waits for the loads until stage_tile. One
// row address per row, and immediate offsets for the steps, keep the address arithmetic small.
template <class D, bool kHasMask>
GAE_FN void load_tile(LaneState<D>& lane_state, const GaeArgs& a, int64_t rows, int64_t row0,
                      int64_t t0, int lane) {
  using raw = typename D::raw;
  const int64_t first_step = t0 + step_of(lane, 0);
  const int64_t steps_left = a.T - first_step;  // element k exists iff kLanesPerRow * k < this
#pragma unroll
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int64_t row = row0 + row_of(lane, i);
    const raw* rewards =
        static_cast<const raw*>(a.rewards) + row * a.rewards_row_stride + first_step;
    const raw* values = static_cast<const raw*>(a.values) + row * a.values_row_stride + first_step;
    const uint8_t* mask = a.mask + (kHasMask ? row * a.mask_row_stride + first_step : 0);
#pragma unroll
    for (int k = 0; k < kStepsPerLane; ++k) {
      const bool inside = row < rows && kLanesPerRow * k < steps_left;
      lane_state.rewards[i][k] = inside ? rewards[kLanesPerRow * k] : raw{};
      lane_state.values[i][k] = inside ? values[kLanesPerRow * k] : raw{};
      if (kHasMask) lane_state.valid[i][k] = inside ? mask[kLanesPerRow * k] : uint8_t{0};
    }
  }
}

// Phase 2: write the lane's registers, widened to fp32, into the shared tile.
template <class D, bool kHasMask>
GAE_FN void stage_tile(const LaneState<D>& lane_state, WarpTile& tile, int lane) {
#pragma unroll
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int row = row_of(lane, i);
#pragma unroll
    for (int k = 0; k < kStepsPerLane; ++k) {
      const int j = step_of(lane, k);
      tile.rewards[row][j] = D::to_float(lane_state.rewards[i][k]);
      tile.values[row][j] = D::to_float(lane_state.values[i][k]);
      if (kHasMask) tile.valid[row][j] = lane_state.valid[i][k];
    }
  }
}

// Phase 3: the backward recurrence over the first `steps` steps of the lane's own row, in
// place: rewards become advantages and values become returns (0 at invalid steps).
template <bool kHasMask, class D>
GAE_FN void recur_row(LaneState<D>& lane_state, WarpTile& tile, int steps, float gamma,
                      float gamma_lam, int lane) {
  float* rewards_then_advantages = tile.rewards[lane];
  float* values_then_returns = tile.values[lane];
  const uint8_t* valid = tile.valid[lane];
  float next_advantage = lane_state.next_advantage, next_value = lane_state.next_value;
#pragma unroll 4
  for (int j = steps - 1; j >= 0; --j) {
    const float value = values_then_returns[j];
    const float delta = fmaf(gamma, next_value, rewards_then_advantages[j] - value);
    const float advantage = fmaf(gamma_lam, next_advantage, delta);
    const bool is_valid = !kHasMask || valid[j] != 0;
    next_advantage = is_valid ? advantage : next_advantage;
    next_value = is_valid ? value : next_value;
    rewards_then_advantages[j] = is_valid ? advantage : 0.0f;
    values_then_returns[j] = is_valid ? advantage + value : 0.0f;
  }
  lane_state.next_advantage = next_advantage;
  lane_state.next_value = next_value;
}

// Phase 4: store the lane's elements of the tile's advantages and returns.
GAE_FN void store_tile(const WarpTile& tile, const GaeArgs& a, int64_t rows, int64_t row0,
                       int64_t t0, int lane) {
  const int64_t first_step = t0 + step_of(lane, 0);
  const int64_t steps_left = a.T - first_step;
#pragma unroll
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int row = row_of(lane, i);
    if (row0 + row >= rows) continue;
    float* advantages = a.advantages + (row0 + row) * a.T + first_step;
    float* returns = a.returns + (row0 + row) * a.T + first_step;
#pragma unroll
    for (int k = 0; k < kStepsPerLane; ++k) {
      if (kLanesPerRow * k >= steps_left) continue;
      advantages[kLanesPerRow * k] = tile.rewards[row][step_of(lane, k)];
      returns[kLanesPerRow * k] = tile.values[row][step_of(lane, k)];
    }
  }
}

// Rows [row0, row0 + 32) of the batch, time tiles from the last to the first; the loads of
// the next tile are in flight while the lanes run the recurrence over the current one.
template <class D, bool kHasMask, class Warp>
GAE_FN void gae_warp(Warp& warp, WarpTile& tile, const GaeArgs& a, int64_t rows, int64_t row0) {
  const float gamma = a.gamma;
  const float gamma_lam = a.gamma * a.lam;
  const int64_t last_tile = (a.T - 1) / kTileSteps;
  warp.each([&](int lane, LaneState<D>& lane_state) {
    lane_state.next_advantage = 0.0f;
    lane_state.next_value = 0.0f;
    load_tile<D, kHasMask>(lane_state, a, rows, row0, last_tile * kTileSteps, lane);
  });
  for (int64_t c = last_tile; c >= 0; --c) {
    const int64_t t0 = c * kTileSteps;
    const int steps = static_cast<int>(a.T - t0 < kTileSteps ? a.T - t0 : kTileSteps);
    warp.sync();  // every lane has finished reading the previous tile (store_tile)
    warp.each([&](int lane, LaneState<D>& lane_state) {
      stage_tile<D, kHasMask>(lane_state, tile, lane);
    });
    warp.sync();
    warp.each([&](int lane, LaneState<D>& lane_state) {
      if (c > 0) load_tile<D, kHasMask>(lane_state, a, rows, row0, t0 - kTileSteps, lane);
      recur_row<kHasMask>(lane_state, tile, steps, gamma, gamma_lam, lane);
    });
    warp.sync();
    warp.each([&](int lane, LaneState<D>&) { store_tile(tile, a, rows, row0, t0, lane); });
  }
}

}  // namespace cuda_gae
}  // namespace rlhf_fast
