// Generalized advantage estimation on the GPU.
//
// What it computes (DESIGN.md; gae_reference in rlhf_fast/ops/gae.py is the definition): each
// row of [B, T] rewards r and values V is walked backwards over its valid steps, carrying the
// advantage and the value of the next valid step (both 0 after the last one):
//     delta_t = r_t + gamma * V_next - V_t,    A_t = delta_t + gamma * lam * A_next,
// and returns_t = A_t + V_t. Invalid steps output 0 and leave the carries alone, so their
// inputs never reach an output (padding may hold NaN). Arithmetic is fp32, with the same fused
// multiply-adds as the CPU kernel (csrc/cpu/gae_kernel.h).
//
// Why it is shaped like this. The recurrence is sequential in t and independent across rows,
// and the op is memory-bound (13 to 17 bytes per step for 4 flops), so rows are the
// parallelism: a warp owns 32 rows, one lane per row in the recurrence. Letting lane i walk row
// i straight through global memory would make every load instruction touch 32 addresses a row
// apart. Instead the warp moves tiles of 32 rows x 48 steps through shared memory:
//   1. load:  each load instruction reads 8 consecutive steps of 4 rows (whole 32-byte sectors
//             for fp32), and bf16/fp16 are widened to fp32 on their way into shared memory;
//   2. recur: lane i runs the recurrence along row i of the tile, overwriting rewards with
//             advantages and values with returns. Row pitches are an odd number of 4-byte
//             words, so 32 lanes reading one step of 32 rows hit 32 different banks;
//   3. store: the transpose of 1, for the fp32 outputs.
// Tiles go from the end of the rows to the start with (A_next, V_next) in registers. The loads
// of the next tile are issued before the recurrence over the current one, so their latency
// overlaps its arithmetic; nothing reads those registers (not even the mask bytes) until the
// next tile is staged, else the warp would stall right there. A tile in flight costs ~150-215
// registers per lane (48 steps; 64 would spill in the masked kernels), affordable because a
// block is one warp. One-warp blocks also need no __syncthreads and spread a small batch over
// as many SMs as it has warps.
//
// Limits of this shape: the parallelism is B / 32 warps. A large batch keeps the memory system
// busy; a small one (say B = 64, T = 4096) is latency-bound, one round trip per tile. The fix
// would be to split time across warps too (a chunked scan: the carry entering a chunk adds
// (gamma lam)^k (gamma V_in + gamma lam A_in) to an advantage with k valid steps after it in
// the chunk), at the cost of a second pass over the outputs.
//
// The warp program itself is plain C++ in gae_warp.cuh, which the CPU tests run in emulation.
#include "cuda/gae.cuh"
#include "cuda/gae_warp.cuh"

namespace rlhf_fast {
namespace cuda_gae {
namespace {

// The GPU's Warp policy (see gae_warp.cuh): this thread is one lane of the block's only warp.
template <class D>
struct ThisLane {
  int lane;
  LaneState<D> state;

  template <class Phase>
  __device__ __forceinline__ void each(Phase&& phase) {
    phase(lane, state);
  }
  __device__ __forceinline__ void sync() { __syncwarp(); }
};

template <class D, bool kHasMask>
__global__ void __launch_bounds__(kWarp) gae_kernel(const GaeArgs args, const int64_t rows) {
  __shared__ WarpTile tile;
  ThisLane<D> warp;
  warp.lane = static_cast<int>(threadIdx.x);
  gae_warp<D, kHasMask>(warp, tile, args, rows, static_cast<int64_t>(blockIdx.x) * kRows);
}

template <class D>
cudaError_t launch(const GaeArgs& args, int64_t rows, unsigned blocks, cudaStream_t stream) {
  if (args.mask != nullptr)
    gae_kernel<D, true><<<blocks, kWarp, 0, stream>>>(args, rows);
  else
    gae_kernel<D, false><<<blocks, kWarp, 0, stream>>>(args, rows);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda_gae

cudaError_t launch_gae(const GaeArgs& args, int64_t rows, DTypeIndex dtype, cudaStream_t stream) {
  using namespace cuda_gae;
  if (rows <= 0 || args.T <= 0) return cudaSuccess;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x's limit
  const auto grid = static_cast<unsigned>(blocks);
  switch (dtype) {
    case kF32:
      return launch<F32>(args, rows, grid, stream);
    case kBF16:
      return launch<BF16>(args, rows, grid, stream);
    case kF16:
      return launch<F16>(args, rows, grid, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rlhf_fast
