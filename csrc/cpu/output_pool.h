// Reuse of large output buffers across op calls.
//
// A fresh multi-MB output costs one page fault per 4 KiB page on its first write (~1.5 us each
// on our VMs): 4 MiB of GAE outputs took 1.6 ms to fault in, six times the kernel itself, and
// glibc returns such blocks to the OS on free, so every call pays again. PPO calls the same ops
// with the same shapes every step, so we keep freed output blocks of those sizes and hand them
// out again. The pool holds at most RLHF_FAST_OUTPUT_POOL_MB (default 256; 0 disables it; a
// value that is not a whole number of MiB keeps the default, and Python warns);
// small outputs go through torch's allocator as usual.
#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_fast {

// An uninitialized CPU tensor of `sizes` and `dtype`, from the pool when it is large.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat);

}  // namespace rlhf_fast
