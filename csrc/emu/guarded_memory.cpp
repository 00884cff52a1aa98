// Guarded, poisoned CPU allocations for the emulated CUDA executor (see guarded_memory.h).
#include "emu/guarded_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <c10/core/CPUAllocator.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "emu/runtime.h"

namespace gsae_fast {
namespace emu_memory {
namespace {

struct Mapping {
  char* base;    // the leading inaccessible page
  size_t total;  // bytes mapped, both guard pages included
  char* data;    // the buffer, against the trailing guard page (or the leading one: "start")
  size_t bytes;
};

constexpr unsigned char kPoison = 0xFF;

std::mutex g_mutex;
std::map<uintptr_t, Mapping> g_live;  // by base address
thread_local int t_depth = 0;         // open scopes on this thread
c10::Allocator* g_fallback = nullptr;  // the allocator for everything outside a scope

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

// GSAE_FAST_EMU_MEMORY=start puts each buffer against its leading guard page instead (64-byte
// aligned, as torch's own buffers; underruns fault at the first byte, overruns are found when
// the buffer is freed).
bool start_aligned() {
  static const bool start = [] {
    const char* v = std::getenv("GSAE_FAST_EMU_MEMORY");
    return v != nullptr && std::strcmp(v, "start") == 0;
  }();
  return start;
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

// The accessible bytes around the buffer (the rest of its pages) must still hold the poison: a
// write there is a kernel writing out of bounds without reaching a guard page.
void check_slack(const Mapping& m) {
  const char* first = m.base + page_size();
  const char* last = m.base + m.total - page_size();
  auto clean = [](const char* p, const char* e) {
    for (; p < e; ++p)
      if (static_cast<unsigned char>(*p) != kPoison) return p;
    return static_cast<const char*>(nullptr);
  };
  const char* bad = clean(first, m.data);
  const char* bad_after = clean(m.data + m.bytes, last);
  if (bad == nullptr && bad_after == nullptr) return;
  char msg[256];
  if (bad != nullptr)
    std::snprintf(msg, sizeof(msg), "%zu bytes before the start", static_cast<size_t>(m.data - bad));
  else
    std::snprintf(msg, sizeof(msg), "%zu bytes past the end",
                  static_cast<size_t>(bad_after - m.data - m.bytes));
  std::fprintf(stderr, "\ngsae_fast emulated CUDA: a write %s of a %zu-byte buffer at %p "
               "(found when the buffer was freed)\n", msg, m.bytes, static_cast<void*>(m.data));
  std::abort();
}

void release(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_live.erase(reinterpret_cast<uintptr_t>(m->base));
  }
  check_slack(*m);
  munmap(m->base, m->total);
  delete m;
}

class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (t_depth == 0) return g_fallback->allocate(bytes);  // outside an emulated op
    const size_t page = page_size();
    const size_t data_pages = (bytes + page - 1) / page;
    const size_t total = (data_pages + 2) * page;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "emulated CUDA: cannot map ", total, " bytes of guarded memory");
    char* base = static_cast<char*>(p);
    mprotect(base, page, PROT_NONE);
    mprotect(base + (data_pages + 1) * page, page, PROT_NONE);
    std::memset(base + page, kPoison, data_pages * page);  // the buffer and the slack around it
    char* data = start_aligned() ? base + page : base + (data_pages + 1) * page - bytes;
    auto* m = new Mapping{base, total, data, bytes};
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      g_live[reinterpret_cast<uintptr_t>(base)] = *m;
    }
    return {m->data, m, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return g_fallback->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GuardedAllocator g_allocator;

}  // namespace

GuardedMemoryScope::GuardedMemoryScope() {
  // Installed once for the process: outside a scope it hands every request to the allocator it
  // replaced, so scopes on several threads never swap a process-wide setting back and forth.
  static const bool installed = [] {
    g_fallback = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_allocator, /*priority=*/255);
    gsae_emu::set_fault_describer(&describe);
    return true;
  }();
  (void)installed;
  ++t_depth;
}

GuardedMemoryScope::~GuardedMemoryScope() { --t_depth; }

at::Tensor guarded_copy(const at::Tensor& t) {
  if (!t.defined()) return t;
  auto copy = at::empty_strided(t.sizes(), t.strides(), t.options());
  copy.copy_(t);
  return copy;
}

void check_unchanged(const at::Tensor& original, const at::Tensor& copy, const char* op,
                     int index) {
  if (!original.defined()) return;
  const auto a = original.contiguous(), b = copy.contiguous();
  const size_t n = static_cast<size_t>(a.numel()) * a.element_size();
  TORCH_CHECK(n == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), n) == 0, "emulated CUDA: ", op,
              " wrote into its input ", index, " (inputs are read-only)");
}

}  // namespace emu_memory
}  // namespace gsae_fast
