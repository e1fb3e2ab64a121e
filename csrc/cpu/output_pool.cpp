#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace rlhf_fast {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // below this, faults are cheap
constexpr size_t kAlignment = 64;
constexpr size_t kDefaultCapacityMb = 256;
constexpr size_t kMaxCapacityMb = size_t(1) << 20;  // 1 TiB: larger is a typo

// $RLHF_FAST_OUTPUT_POOL_MB: a whole number of MiB (digits only, at most kMaxCapacityMb);
// anything else keeps the default (rlhf_fast/_native.py warns with the same rule: strtoull
// alone read "abc" as 0, turning the pool off, and "-1" as an unlimited pool).
size_t capacity_from_env() {
  const char* text = std::getenv("RLHF_FAST_OUTPUT_POOL_MB");
  if (text == nullptr || *text == '\0') return kDefaultCapacityMb << 20;
  size_t mb = 0;
  for (const char* c = text; *c != '\0'; ++c) {
    if (*c < '0' || *c > '9') return kDefaultCapacityMb << 20;
    mb = mb * 10 + static_cast<size_t>(*c - '0');
    if (mb > kMaxCapacityMb) return kDefaultCapacityMb << 20;  // before it could overflow
  }
  return mb << 20;
}

class OutputPool {
 public:
  OutputPool() : capacity_(capacity_from_env()) {}

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
  const size_t capacity_;
};

// Never destroyed: tensors handed out may outlive static destruction at interpreter exit.
OutputPool& pool() {
  static OutputPool* instance = new OutputPool();
  return *instance;
}

struct PooledBlock {
  void* data;
  size_t bytes;
};

void return_to_pool(void* context) {
  auto* block = static_cast<PooledBlock*>(context);
  pool().give(block->data, block->bytes);
  delete block;
}

// An allocator, not a blob with a deleter: storage made by an allocator stays resizable
// (resize_ asks it for the new size), as any CPU tensor's is; from_blob's was not.
class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (!pool().enabled_for(bytes)) return c10::GetCPUAllocator()->allocate(bytes);
    void* data = pool().take(bytes);
    return {data, new PooledBlock{data, bytes}, &return_to_pool, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* instance = new PoolAllocator();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(
      sizes, &pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

}  // namespace rlhf_fast
