#include "cpu/output_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace rlhf_fast {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // below this, faults are cheap
constexpr size_t kAlignment = 64;

class OutputPool {
 public:
  OutputPool() {
    const char* limit = std::getenv("RLHF_FAST_OUTPUT_POOL_MB");
    capacity_ = (limit != nullptr ? std::strtoull(limit, nullptr, 10) : 256) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
    TORCH_CHECK(block != nullptr, "out of memory allocating ", bytes, " bytes");
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= capacity_) {
        free_.emplace(bytes, block);
        cached_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  bool enabled_for(size_t bytes) const { return bytes >= kMinPooledBytes && bytes <= capacity_; }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t capacity_ = 0;
};

// Never destroyed: tensors handed out may outlive static destruction at interpreter exit.
OutputPool& pool() {
  static OutputPool* instance = new OutputPool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  if (!pool().enabled_for(bytes)) return at::empty(sizes, options);
  void* block = pool().take(bytes);
  return at::from_blob(block, sizes, [bytes](void* data) { pool().give(data, bytes); }, options);
}

}  // namespace rlhf_fast
