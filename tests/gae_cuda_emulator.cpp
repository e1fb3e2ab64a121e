// The CUDA gae kernel's warp program (csrc/cuda/gae_warp.cuh) run on the CPU, for
// tests/test_cuda_kernels.py: one CPU thread plays the 32 lanes of each warp, phase by phase,
// with the same indexing, bounds and carries as the GPU. Built with g++ into a shared library
// and called through ctypes with the arguments of rlhf_fast::launch_gae.
#include "cuda/gae_warp.cuh"

namespace {

using namespace rlhf_fast;
using namespace rlhf_fast::cuda_gae;

// The emulator's Warp policy: each phase runs for lanes 0..31 in turn, so a phase sees every
// write of the phases before it, as __syncwarp() guarantees on the GPU -- but only where the
// program syncs: on a GPU two phases without a __syncwarp() between them overlap across lanes
// (lane 0 may stage the next tile while lane 31 still stores this one), and running them in
// turn here would hide that race. So a phase that follows another with no sync between them is
// counted (the phases all share the tile), and gae_emulated reports it.
int64_t unsynced_phases = 0;

template <class D>
struct EmulatedWarp {
  LaneState<D> lanes[kWarp];
  bool synced = true;  // no phase has run since the last sync

  template <class Phase>
  void each(Phase&& phase) {
    if (!synced) ++unsynced_phases;
    synced = false;
    for (int lane = 0; lane < kWarp; ++lane) phase(lane, lanes[lane]);
  }
  void sync() { synced = true; }
};

template <class D, bool kHasMask>
void run_grid(const GaeArgs& args, int64_t rows) {
  WarpTile tile;
  for (int64_t row0 = 0; row0 < rows; row0 += kRows) {  // one block (one warp) at a time
    EmulatedWarp<D> warp;
    gae_warp<D, kHasMask>(warp, tile, args, rows, row0);
  }
}

template <class D>
void run_grid(const GaeArgs& args, int64_t rows) {
  if (args.mask != nullptr)
    run_grid<D, true>(args, rows);
  else
    run_grid<D, false>(args, rows);
}

}  // namespace

// Returns 0, -1 for an unknown dtype, or -2 if two phases of the warp program ran with no
// sync between them (a race on the GPU); does nothing when rows or T is 0 (as launch_gae).
extern "C" int gae_emulated(const void* rewards, const void* values, const uint8_t* mask,
                            int dtype, int64_t rows, int64_t steps, int64_t rewards_row_stride,
                            int64_t values_row_stride, int64_t mask_row_stride, float gamma,
                            float lam, float* advantages, float* returns) {
  if (rows <= 0 || steps <= 0) return 0;
  GaeArgs args{};
  args.rewards = rewards;
  args.values = values;
  args.mask = mask;
  args.rewards_row_stride = rewards_row_stride;
  args.values_row_stride = values_row_stride;
  args.mask_row_stride = mask_row_stride;
  args.T = steps;
  args.gamma = gamma;
  args.lam = lam;
  args.advantages = advantages;
  args.returns = returns;
  unsynced_phases = 0;
  switch (dtype) {
    case kF32:
      run_grid<F32>(args, rows);
      break;
    case kBF16:
      run_grid<BF16>(args, rows);
      break;
    case kF16:
      run_grid<F16>(args, rows);
      break;
    default:
      return -1;
  }
  return unsynced_phases == 0 ? 0 : -2;
}

#ifdef GAE_EMULATOR_SELF_TEST
// A standalone run for AddressSanitizer: each input sits in a heap array that ends exactly
// where its last row does, so any read or write outside the [B, T] arrays is reported. The
// results are compared with a plain loop over each row.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

// fp32 -> bf16 storage by truncation, and back: exact for the values it produces.
uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

bool check(int64_t rows, int64_t steps, bool masked, bool bf16, std::mt19937& rng) {
  const int64_t stride = steps + 3, size = (rows - 1) * stride + steps;
  std::normal_distribution<float> normal;
  std::vector<float> rewards(size), values(size);
  std::vector<uint16_t> rewards16(size), values16(size);
  std::vector<uint8_t> mask(size);
  for (int64_t i = 0; i < size; ++i) {
    rewards[i] = BF16::to_float(bf16_bits(normal(rng)));
    values[i] = BF16::to_float(bf16_bits(normal(rng)));
    rewards16[i] = bf16_bits(rewards[i]);
    values16[i] = bf16_bits(values[i]);
    mask[i] = (rng() % 3) != 0;
  }
  std::vector<float> advantages(rows * steps), returns(rows * steps);
  const float gamma = 0.99f, lam = 0.95f;
  const int status =
      gae_emulated(bf16 ? static_cast<const void*>(rewards16.data()) : rewards.data(),
                   bf16 ? static_cast<const void*>(values16.data()) : values.data(),
                   masked ? mask.data() : nullptr, bf16 ? kBF16 : kF32, rows, steps, stride,
                   stride, stride, gamma, lam, advantages.data(), returns.data());
  if (status != 0) {
    std::printf("status %d: rows %ld steps %ld\n", status, static_cast<long>(rows),
                static_cast<long>(steps));
    return false;
  }
  for (int64_t row = 0; row < rows; ++row) {
    double next_advantage = 0, next_value = 0;
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t in = row * stride + t, out = row * steps + t;
      const bool valid = !masked || mask[in] != 0;
      const double delta = rewards[in] + gamma * next_value - values[in];
      const double advantage = valid ? delta + gamma * lam * next_advantage : 0.0;
      const double ret = valid ? advantage + values[in] : 0.0;
      if (std::fabs(advantages[out] - advantage) > 1e-4 || std::fabs(returns[out] - ret) > 1e-4) {
        std::printf("mismatch: rows %ld steps %ld masked %d bf16 %d at [%ld, %ld]\n",
                    static_cast<long>(rows), static_cast<long>(steps), masked, bf16,
                    static_cast<long>(row), static_cast<long>(t));
        return false;
      }
      if (valid) next_advantage = advantage, next_value = values[in];
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const int64_t shapes[][2] = {{1, 1}, {1, 47}, {2, 48}, {33, 49}, {65, 97}, {3, 200}};
  for (const auto& shape : shapes)
    for (bool masked : {false, true})
      for (bool bf16 : {false, true})
        if (!check(shape[0], shape[1], masked, bf16, rng)) return 1;
  std::printf("ok\n");
  return 0;
}
#endif
