// The gradient buffer cache behind empty_gradient_buffer (contract in gradient_buffer_cache.h) and its
// configuration op (schema in csrc/registration.cpp).
//
// Why a cache and not the allocator: the CPU allocator returns large blocks to the OS (glibc munmap), so every
// step's [N, V] gradient would be fresh pages again. The cache keeps a strong reference to each buffer's
// StorageImpl and hands a buffer out again only when that reference is the only one left (strong count 1,
// no weak references: is_uniquely_owned). Every tensor, view, torch.UntypedStorage, DLPack capsule or numpy
// array over the buffer holds a strong reference, so a gradient the user still holds is never handed out.
// A storage whose data was swapped since it was cached (share_memory_, resize_, a copy-on-write clone) no
// longer holds the memory the cache allocated and is dropped instead.
#include "cpu/gradient_buffer_cache.h"

#include <ATen/ops/empty.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu/huge_pages.h"

namespace aioli_ext {
namespace {

// Below this, allocations come from malloc's heap (no fresh pages per call) or fault in negligible time.
constexpr int64_t kMinCachedBytes = int64_t(4) << 20;
constexpr int64_t kDefaultMaxBytes = int64_t(4) << 30;
constexpr const char* kMaxBytesEnv = "AIOLI_EXT_GRADIENT_CACHE_BYTES";

struct Entry {
  c10::intrusive_ptr<c10::StorageImpl> storage;
  // What the storage held when the cache allocated it: reuse requires it unchanged.
  const void* data;
  c10::DeleterFnPtr deleter;
  size_t nbytes;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;  // least recently handed out first
  int64_t max_bytes = -1;      // -1: not read from the environment yet
  int64_t cached_bytes = 0;
  int64_t reuses = 0;
  int64_t allocations = 0;
};

Cache& cache() {
  // Never destroyed: buffers still cached at exit go back to the OS with the process, and no static
  // destruction order (the allocator's, torch's) can matter.
  static Cache* instance = new Cache();
  return *instance;
}

int64_t max_bytes_from_env() {
  const char* text = std::getenv(kMaxBytesEnv);
  if (text == nullptr || *text == '\0') return kDefaultMaxBytes;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(errno == 0 && end != text && *end == '\0' && value >= 0, kMaxBytesEnv,
              " must be a whole number of bytes >= 0 (0 disables the gradient buffer cache), got '", text, "'");
  return static_cast<int64_t>(value);
}

// Callers hold the mutex.
void ensure_configured(Cache& c) {
  if (c.max_bytes < 0) c.max_bytes = max_bytes_from_env();
}

bool holds_its_memory(const Entry& e) {
  const c10::DataPtr& data = e.storage->data_ptr();
  return data.get() == e.data && data.get_deleter() == e.deleter && e.storage->nbytes() == e.nbytes;
}

bool idle(const Entry& e) { return e.storage.is_uniquely_owned() && holds_its_memory(e); }

void erase_at(Cache& c, size_t i) {
  c.cached_bytes -= static_cast<int64_t>(c.entries[i].nbytes);
  c.entries.erase(c.entries.begin() + static_cast<std::ptrdiff_t>(i));
}

// Drops the least recently handed out entries until the cache fits max_bytes. A dropped entry still in use
// lives on with its users; an idle one is freed here.
void evict_to_limit(Cache& c) {
  while (c.cached_bytes > c.max_bytes && !c.entries.empty()) erase_at(c, 0);
}

at::Tensor wrap(const c10::intrusive_ptr<c10::StorageImpl>& storage, at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage),
                                                          c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                          caffe2::TypeMeta::fromScalarType(dtype));
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

std::vector<int64_t> gradient_buffer_cache_op(std::optional<int64_t> max_bytes, bool clear) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  ensure_configured(c);
  if (clear) {
    while (!c.entries.empty()) erase_at(c, c.entries.size() - 1);
  }
  if (max_bytes.has_value()) {
    TORCH_CHECK(*max_bytes >= 0, "max_bytes must be >= 0 (0 disables the gradient buffer cache), got ", *max_bytes);
    c.max_bytes = *max_bytes;
    evict_to_limit(c);
  }
  int64_t idle_bytes = 0;
  for (const Entry& e : c.entries) {
    if (idle(e)) idle_bytes += static_cast<int64_t>(e.nbytes);
  }
  return {c.max_bytes, c.cached_bytes, idle_bytes, static_cast<int64_t>(c.entries.size()), c.reuses, c.allocations};
}

}  // namespace

at::Tensor empty_gradient_buffer(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  Cache& c = cache();
  const bool large = nbytes >= kMinCachedBytes;
  bool cacheable = false;
  if (large) {
    std::lock_guard<std::mutex> lock(c.mutex);
    ensure_configured(c);
    cacheable = nbytes <= c.max_bytes;
    size_t i = 0;
    while (cacheable && i < c.entries.size()) {
      Entry& e = c.entries[i];
      // A buffer in use is not inspected further: its users may be changing it right now.
      if (static_cast<int64_t>(e.nbytes) != nbytes || !e.storage.is_uniquely_owned()) {
        ++i;
        continue;
      }
      if (!holds_its_memory(e)) {
        erase_at(c, i);
        continue;
      }
      // is_uniquely_owned loads the count with acquire ordering: whatever the last user wrote before dropping
      // its reference happens before the new owner's writes.
      Entry reused = std::move(e);
      c.entries.erase(c.entries.begin() + static_cast<std::ptrdiff_t>(i));
      at::Tensor t = wrap(reused.storage, sizes, dtype);
      c.entries.push_back(std::move(reused));
      ++c.reuses;
      return t;
    }
  }
  at::Tensor fresh = at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  advise_huge_pages(fresh);
  if (!large) return fresh;
  const c10::Storage& storage = fresh.storage();
  Entry e{c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(storage.unsafeGetStorageImpl()),
          storage.data_ptr().get(), storage.data_ptr().get_deleter(), storage.nbytes()};
  std::lock_guard<std::mutex> lock(c.mutex);
  ++c.allocations;
  if (cacheable) {
    // The limit may have changed since the lookup.
    if (nbytes <= c.max_bytes) {
      c.entries.push_back(std::move(e));
      c.cached_bytes += nbytes;
      evict_to_limit(c);
    }
  }
  return fresh;
}

// No tensor arguments, so no dispatch key: a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(aioli_ext, m) {
  m.impl("gradient_buffer_cache", &gradient_buffer_cache_op);
}

}  // namespace aioli_ext
