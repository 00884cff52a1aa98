// Guarded, poisoned CPU allocations for the emulated CUDA executor (see guarded_memory.h).
#include "emu/guarded_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <c10/core/CPUAllocator.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>

#include "emu/runtime.h"

namespace gsae_fast {
namespace emu_memory {
namespace {

struct Mapping {
  char* base;    // first (inaccessible) page
  size_t total;  // bytes mapped, both guard pages included
  char* data;    // the buffer: it ends where the last guard page begins
  size_t bytes;
};

std::mutex g_mutex;
std::map<uintptr_t, Mapping> g_live;  // by base address

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

// Called from the fault handler: names the buffer whose guard page `addr` is in. (Reads the
// map without the lock: the faulting thread runs kernel code, which never allocates.)
bool describe(const void* addr, char* buf, size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  auto it = g_live.upper_bound(a);
  if (it == g_live.begin()) return false;
  const Mapping& m = std::prev(it)->second;
  const auto data = reinterpret_cast<uintptr_t>(m.data);
  if (a >= reinterpret_cast<uintptr_t>(m.base) + m.total) return false;
  if (a >= data + m.bytes)
    std::snprintf(buf, n, "%zu bytes past the end of a %zu-byte buffer at %p",
                  static_cast<size_t>(a - data - m.bytes), m.bytes, static_cast<void*>(m.data));
  else
    std::snprintf(buf, n, "%zu bytes before the start of a %zu-byte buffer at %p",
                  static_cast<size_t>(data - a), m.bytes, static_cast<void*>(m.data));
  return true;
}

void release(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_live.erase(reinterpret_cast<uintptr_t>(m->base));
  }
  munmap(m->base, m->total);
  delete m;
}

class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const size_t page = page_size();
    const size_t data_pages = (bytes + page - 1) / page;
    const size_t total = (data_pages + 2) * page;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "emulated CUDA: cannot map ", total, " bytes of guarded memory");
    char* base = static_cast<char*>(p);
    mprotect(base, page, PROT_NONE);
    mprotect(base + (data_pages + 1) * page, page, PROT_NONE);
    auto* m = new Mapping{base, total, base + (data_pages + 1) * page - bytes, bytes};
    std::memset(m->data, 0xFF, bytes);
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      g_live[reinterpret_cast<uintptr_t>(base)] = *m;
    }
    return {m->data, m, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GuardedAllocator g_allocator;

}  // namespace

GuardedMemoryScope::GuardedMemoryScope() : previous_(c10::GetCPUAllocator()) {
  static const bool registered = (gsae_emu::set_fault_describer(&describe), true);
  (void)registered;
  c10::SetCPUAllocator(&g_allocator, /*priority=*/255);
}

GuardedMemoryScope::~GuardedMemoryScope() { c10::SetCPUAllocator(previous_, /*priority=*/255); }

at::Tensor guarded_copy(const at::Tensor& t) {
  if (!t.defined()) return t;
  auto copy = at::empty_strided(t.sizes(), t.strides(), t.options());
  copy.copy_(t);
  return copy;
}

}  // namespace emu_memory
}  // namespace gsae_fast
