// The CUDA execution model on the CPU (see emu/device.h for what it covers): fibers for the
// threads of a block, a scheduler that runs them to their next scheduling point and completes
// warp collectives and block barriers, launch errors kept as a sticky CUDA error, and a
// segmentation-fault report that names the kernel, the block, the thread and the buffer.
//
// Fibers switch with a few lines of assembly on x86-64 (a swap of the callee-saved registers
// and the stack pointer: no system call, so millions of switches per test stay cheap) and with
// ucontext elsewhere (or with GSAE_EMU_UCONTEXT defined, to test that path on x86-64).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emu/device.h"

#if defined(__x86_64__) && !defined(GSAE_EMU_UCONTEXT)
#define GSAE_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace gsae_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (a guard page below it)
constexpr int kWarp = 32;

// ------------------------------------------------------------------------------ fibers

#if defined(GSAE_EMU_ASM_SWITCH)
extern "C" void gsae_emu_switch(void** save_sp, void* load_sp);
extern "C" void gsae_emu_start();
// gsae_emu_switch saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, loads load_sp and pops the other fiber's registers. gsae_emu_start is
// where a new fiber first "returns" to: it calls r13(r12) and never comes back.
asm(R"(
    .text
    .p2align 4
    .globl gsae_emu_switch
    .hidden gsae_emu_switch
    .type gsae_emu_switch,@function
gsae_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gsae_emu_switch, .-gsae_emu_switch
    .globl gsae_emu_start
    .hidden gsae_emu_start
    .type gsae_emu_start,@function
gsae_emu_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size gsae_emu_start, .-gsae_emu_start
)");
#endif

struct Fiber;
struct Launch;
void fiber_main(Fiber* f);
std::string where(const Launch& L, const Fiber* f);
void record_error(const std::string& what);

enum class State : uint8_t { Ready, AtWarp, AtBlock, Done };

struct Fiber {
  char* stack = nullptr;  // lowest usable byte (a guard page lies below)
#if defined(GSAE_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::Ready;
  uint3 tid{0, 0, 0};
  // The warp collective this lane waits at.
  Collective op = Collective::SyncWarp;
  unsigned mask = 0;
  int arg = 0, width = kWarp;
  uint64_t value = 0, result = 0;
  // The __syncthreads this thread waits at (its call site).
  const char* barrier_file = "";
  int barrier_line = 0;
};

// The state of the launch running on this OS thread.
struct Launch {
  const char* name = "";
  dim3 grid, block;
  Entry entry = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;  // one per thread of a block, reused across blocks
  Fiber* current = nullptr;
#if defined(GSAE_EMU_ASM_SWITCH)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
  bool failed = false;
};

thread_local Launch* t_launch = nullptr;
// Fiber stacks, kept across launches (mapped once per OS thread), unmapped when the thread ends.
struct Stacks {
  std::vector<char*> v;
  ~Stacks() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (char* s : v) munmap(s - page, kStackBytes + page);
  }
};
thread_local Stacks t_stacks;
thread_local uint64_t t_block_serial = 0;
thread_local std::string t_error;          // the sticky error of this OS thread
thread_local bool t_has_error = false;

Order g_order = Order::Forward;
uint64_t g_seed = 0;
bool g_schedule_read = false;
FaultDescriber g_describe = nullptr;

char* stack_for(size_t i) {
  while (t_stacks.v.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("gsae_emu: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
    t_stacks.v.push_back(static_cast<char*>(p) + page);
  }
  return t_stacks.v[i];
}

void switch_to(Fiber& f) {  // scheduler -> fiber
  Launch& L = *t_launch;
  L.current = &f;
  threadIdx = f.tid;
#if defined(GSAE_EMU_ASM_SWITCH)
  gsae_emu_switch(&L.scheduler_sp, f.sp);
#else
  swapcontext(&L.scheduler_ctx, &f.ctx);
#endif
  L.current = nullptr;
}

void yield_to_scheduler() {  // fiber -> scheduler
  Launch& L = *t_launch;
  Fiber& f = *L.current;
#if defined(GSAE_EMU_ASM_SWITCH)
  gsae_emu_switch(&f.sp, L.scheduler_sp);
#else
  swapcontext(&f.ctx, &L.scheduler_ctx);
#endif
}

#if !defined(GSAE_EMU_ASM_SWITCH)
void ucontext_entry(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Fiber& f, char* stack) {
  f.stack = stack;
  f.state = State::Ready;
#if defined(GSAE_EMU_ASM_SWITCH)
  // The frame gsae_emu_switch pops: r15 r14 r13 r12 rbx rbp, then the return address. After the
  // pops the stack pointer is 16-byte aligned at gsae_emu_start, as a call expects.
  auto* top = reinterpret_cast<uintptr_t*>(stack + kStackBytes);
  uintptr_t* sp = top - 9;
  sp[0] = sp[1] = 0;                                   // r15, r14
  sp[2] = reinterpret_cast<uintptr_t>(&fiber_main);    // r13: the function
  sp[3] = reinterpret_cast<uintptr_t>(&f);             // r12: its argument
  sp[4] = sp[5] = 0;                                   // rbx, rbp
  sp[6] = reinterpret_cast<uintptr_t>(&gsae_emu_start);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p & 0xffffffffu));
#endif
}

void fiber_main(Fiber* f) {
  Launch& L = *t_launch;
  try {  // no exception may unwind past the fiber's first frame (the assembly has no unwind info)
    L.entry(L.ctx);
  } catch (const std::exception& e) {
    record_error(std::string("exception in kernel code: ") + e.what() + ", " + where(L, f));
  } catch (...) {
    record_error("exception in kernel code, " + where(L, f));
  }
  f->state = State::Done;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

// ------------------------------------------------------------------------------ errors

std::string where(const Launch& L, const Fiber* f) {
  char buf[256];
  int n = std::snprintf(buf, sizeof(buf), "kernel %s, block (%u,%u,%u)", L.name, blockIdx.x,
                        blockIdx.y, blockIdx.z);
  if (f != nullptr)
    std::snprintf(buf + n, sizeof(buf) - n, ", thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
  return buf;
}

void record_error(const std::string& what) {
  Launch& L = *t_launch;
  if (!L.failed && !t_has_error) {
    t_error = "emulated CUDA: " + what;
    t_has_error = true;
  }
  L.failed = true;
}

const char* op_name(Collective op) {
  switch (op) {
    case Collective::ShflDown: return "__shfl_down_sync";
    case Collective::ShflXor: return "__shfl_xor_sync";
    case Collective::Shfl: return "__shfl_sync";
    case Collective::Ballot: return "__ballot_sync";
    case Collective::Any: return "__any_sync";
    case Collective::All: return "__all_sync";
    case Collective::SyncWarp: return "__syncwarp";
  }
  return "?";
}

// ------------------------------------------------------------------------------ scheduler

std::vector<size_t> order_of(size_t n, uint64_t salt) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  if (g_order == Order::Reverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_order == Order::Shuffle) {
    std::mt19937_64 rng(g_seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

std::string hex(unsigned v) {
  char h[16];
  std::snprintf(h, sizeof(h), "0x%08x", v);
  return h;
}

// Completes one warp collective: the lanes of `mask` in the warp starting at `lane`. As in CUDA,
// lanes of the mask that have exited (or do not exist: a partial last warp) take no part; every
// other lane of the mask must be at the same intrinsic with the same mask. Returns false while
// one has not arrived; records an error when they disagree or a shuffle reads an absent lane.
bool complete_group(Launch& L, Fiber* lane, size_t lanes, unsigned mask) {
  const Fiber* first = nullptr;
  unsigned present = 0;  // the lanes of the mask taking part
  for (size_t l = 0; l < lanes; ++l) {
    if (!((mask >> l) & 1u) || lane[l].state == State::Done) continue;
    const Fiber& b = lane[l];
    if (b.state != State::AtWarp) return false;  // running, or at __syncthreads (a deadlock
                                                 // unless it moves)
    if (first == nullptr) first = &b;
    if (b.op != first->op || b.mask != first->mask) {
      record_error(std::string("the lanes of a warp diverged: one is at ") + op_name(first->op) +
                   " (mask " + hex(first->mask) + "), lane " + std::to_string(l) + " at " +
                   op_name(b.op) + " (mask " + hex(b.mask) + "), " + where(L, &b));
      return false;
    }
    present |= 1u << l;
  }
  unsigned ballot = 0;
  for (size_t l = 0; l < lanes; ++l)
    if (((present >> l) & 1u) && lane[l].value != 0) ballot |= 1u << l;
  for (size_t l = 0; l < lanes; ++l) {
    if (!((present >> l) & 1u)) continue;
    Fiber& b = lane[l];
    const int me = static_cast<int>(l), seg = me / b.width * b.width;  // my width segment
    int src = -1;
    switch (b.op) {
      case Collective::ShflDown: src = me + b.arg < seg + b.width ? me + b.arg : me; break;
      case Collective::ShflXor: src = (me ^ b.arg) < seg + b.width ? me ^ b.arg : me; break;
      case Collective::Shfl: src = seg + (b.arg & (b.width - 1)); break;
      case Collective::Ballot: b.result = ballot; break;
      case Collective::Any: b.result = ballot != 0; break;
      case Collective::All: b.result = ballot == present; break;
      case Collective::SyncWarp: b.result = 0; break;
    }
    if (src >= 0) {
      if (!((present >> src) & 1u)) {
        const bool in_mask = (mask >> src) & 1u;
        record_error(std::string(op_name(b.op)) + " reads lane " + std::to_string(src) +
                     (in_mask ? ", which has exited (or is outside the block)"
                              : ", which is not in its mask " + hex(mask)) +
                     ", " + where(L, &b));
        return false;
      }
      b.result = lane[src].value;
    }
  }
  for (size_t l = 0; l < lanes; ++l)
    if ((present >> l) & 1u) lane[l].state = State::Ready;
  return true;
}

// Completes every warp collective whose lanes have all arrived; false if none could.
bool complete_warps(Launch& L, size_t n) {
  bool progress = false;
  for (size_t w0 = 0; w0 < n && !L.failed; w0 += kWarp) {
    const size_t lanes = std::min<size_t>(kWarp, n - w0);
    Fiber* lane = &L.fibers[w0];
    for (size_t l = 0; l < lanes && !L.failed; ++l) {
      if (lane[l].state != State::AtWarp) continue;
      if (!((lane[l].mask >> l) & 1u)) {
        record_error(std::string(op_name(lane[l].op)) + " with mask " + hex(lane[l].mask) +
                     ", which does not include the calling lane " + std::to_string(l) + ", " +
                     where(L, &lane[l]));
        break;
      }
      progress |= complete_group(L, lane, lanes, lane[l].mask);
    }
  }
  return progress;
}

void run_block(Launch& L, uint3 bid, uint64_t block_linear) {
  const size_t n = static_cast<size_t>(L.block.x) * L.block.y * L.block.z;
  blockIdx = bid;
  ++t_block_serial;
  L.fibers.resize(n);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = L.fibers[i];
    f.tid = uint3{static_cast<unsigned>(i % L.block.x),
                  static_cast<unsigned>(i / L.block.x % L.block.y),
                  static_cast<unsigned>(i / (size_t(L.block.x) * L.block.y))};
    start_fiber(f, stack_for(i));
  }
  const std::vector<size_t> order = order_of(n, block_linear);
  for (;;) {
    for (size_t i : order) {
      if (L.fibers[i].state != State::Ready) continue;
      switch_to(L.fibers[i]);
      if (L.failed) return;
    }
    size_t done = 0, at_block = 0;
    for (const Fiber& f : L.fibers) {
      done += f.state == State::Done;
      at_block += f.state == State::AtBlock;
    }
    if (done == n) return;
    if (complete_warps(L, n)) continue;
    if (L.failed) return;
    if (done + at_block == n) {  // every live thread is at a __syncthreads
      // CUDA wants the whole block at one barrier: one call site, and no thread gone before it
      // (a barrier in divergent code is undefined; compute-sanitizer's synccheck reports it).
      const Fiber* a = nullptr;
      for (const Fiber& f : L.fibers) {
        if (f.state != State::AtBlock) continue;
        if (a == nullptr) a = &f;
        if (f.barrier_line != a->barrier_line || std::strcmp(f.barrier_file, a->barrier_file)) {
          record_error(std::string("threads of a block wait at different __syncthreads (") +
                       a->barrier_file + ":" + std::to_string(a->barrier_line) + " and " +
                       f.barrier_file + ":" + std::to_string(f.barrier_line) + "), " +
                       where(L, &f));
          return;
        }
      }
      if (done > 0) {
        record_error("__syncthreads at " + std::string(a->barrier_file) + ":" +
                     std::to_string(a->barrier_line) + " after " + std::to_string(done) +
                     " threads of the block exited (a barrier in divergent code), " +
                     where(L, a));
        return;
      }
      for (Fiber& f : L.fibers)
        if (f.state == State::AtBlock) f.state = State::Ready;
      continue;
    }
    const Fiber* stuck = nullptr;
    for (const Fiber& f : L.fibers)
      if (f.state == State::AtWarp) { stuck = &f; break; }
    record_error(std::string("deadlock: a thread waits at ") + op_name(stuck->op) +
                 " for lanes that wait at __syncthreads (a barrier in divergent code), " +
                 where(L, stuck));
    return;
  }
}

// ------------------------------------------------------------------------------ faults

thread_local std::vector<char> t_signal_stack;
struct sigaction g_previous_segv;
bool g_handler_installed = false;

void write_str(const char* s) {
  ssize_t r = write(STDERR_FILENO, s, strlen(s));
  (void)r;
}

void on_segv(int sig, siginfo_t* info, void* uctx) {
  Launch* L = t_launch;
  if (L == nullptr) {  // not emulated kernel code: whoever handled it before
    sigaction(SIGSEGV, &g_previous_segv, nullptr);
    g_handler_installed = false;
    return;  // the fault repeats under the previous handler
  }
  char what[256] = "an address outside every buffer the executor allocated";
  const char* addr = static_cast<const char*>(info->si_addr);
  bool known = g_describe != nullptr && g_describe(addr, what, sizeof(what));
  if (!known)
    for (char* s : t_stacks.v)
      if (addr >= s - 4096 && addr < s) {
        std::snprintf(what, sizeof(what), "the guard page below an emulated thread's stack "
                      "(stack overflow: %zu bytes per thread)", kStackBytes);
        break;
      }
  char msg[768];
  const Fiber* f = L->current;
  std::snprintf(msg, sizeof(msg),
                "\ngsae_fast emulated CUDA: invalid memory access in kernel %s, block (%u,%u,%u), "
                "thread (%u,%u,%u), at %p: %s\n",
                L->name, blockIdx.x, blockIdx.y, blockIdx.z, f ? f->tid.x : 0u,
                f ? f->tid.y : 0u, f ? f->tid.z : 0u, info->si_addr, what);
  write_str(msg);
  (void)sig;
  (void)uctx;
  signal(SIGABRT, SIG_DFL);
  abort();
}

void install_fault_handler() {
  if (t_signal_stack.empty()) {  // the handler must not run on an overflowed fiber stack
    t_signal_stack.resize(64 * 1024);
    stack_t ss{};
    ss.ss_sp = t_signal_stack.data();
    ss.ss_size = t_signal_stack.size();
    sigaltstack(&ss, nullptr);
  }
  if (g_handler_installed) return;
  struct sigaction sa{};
  sa.sa_sigaction = &on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_previous_segv);
  g_handler_installed = true;
}

}  // namespace

// ------------------------------------------------------------------------------ device API

uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int arg, int width) {
  Launch& L = *t_launch;
  Fiber& f = *L.current;
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0)
    fail("shuffle width must be a power of two <= 32");
  f.state = State::AtWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  yield_to_scheduler();
  return f.result;
}

void sync_threads(const char* file, int line) {
  Fiber& f = *t_launch->current;
  f.state = State::AtBlock;
  f.barrier_file = file;
  f.barrier_line = line;
  yield_to_scheduler();
}

void fail(const char* what) {
  Launch& L = *t_launch;
  record_error(std::string(what) + ", " + where(L, L.current));
  L.current->state = State::Done;
  yield_to_scheduler();  // the scheduler abandons the block
  std::abort();
}

void shared_out_of_range(const char* name, int64_t i, int64_t n) {
  Launch& L = *t_launch;
  record_error("shared-memory array " + std::string(name) + " indexed at " + std::to_string(i) +
               ", outside [0, " + std::to_string(n) + "), " + where(L, L.current));
}

uint64_t block_serial() { return t_block_serial; }

void launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, Entry entry,
            void* ctx) {
  (void)shared_bytes;  // dynamic shared memory is not used by the kernels
  if (t_launch != nullptr) throw std::logic_error("gsae_emu: a launch inside a kernel");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    if (!t_has_error) {  // cudaErrorInvalidConfiguration
      char buf[256];
      std::snprintf(buf, sizeof(buf), "invalid launch configuration of kernel %s: grid "
                    "(%u,%u,%u), block (%u,%u,%u)", name, grid.x, grid.y, grid.z, block.x,
                    block.y, block.z);
      t_error = std::string("emulated CUDA: ") + buf;
      t_has_error = true;
    }
    return;
  }
  Order order;
  uint64_t seed;
  schedule(&order, &seed);
  install_fault_handler();
  Launch L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.entry = entry;
  L.ctx = ctx;
  t_launch = &L;
  struct Reset {  // whatever way the launch ends
    ~Reset() { t_launch = nullptr; }
  } reset;
  gridDim = grid;
  blockDim = block;
  const uint64_t n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  // Block order: forward, reverse or shuffled (a permutation of up to a few million ids).
  std::vector<size_t> blocks = order_of(static_cast<size_t>(n_blocks), ~uint64_t(0));
  for (size_t b : blocks) {
    const uint3 bid{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block(L, bid, b);
    if (L.failed) break;
  }
}

void set_schedule(Order order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
  g_schedule_read = true;
}

void schedule(Order* order, uint64_t* seed) {
  if (!g_schedule_read) {
    g_schedule_read = true;
    const char* s = std::getenv("GSAE_FAST_EMU_SCHEDULE");
    const std::string v = s == nullptr ? "" : s;
    if (v == "reverse") g_order = Order::Reverse;
    else if (v.rfind("shuffle", 0) == 0) {
      g_order = Order::Shuffle;
      g_seed = v.size() > 8 ? std::strtoull(v.c_str() + 8, nullptr, 10) : 0;
    } else if (!v.empty() && v != "forward") {
      std::fprintf(stderr, "gsae_fast: GSAE_FAST_EMU_SCHEDULE=%s is not forward, reverse or "
                   "shuffle:SEED; using forward\n", v.c_str());
    }
  }
  *order = g_order;
  *seed = g_seed;
}

void set_fault_describer(FaultDescriber describe) { g_describe = describe; }

}  // namespace gsae_emu

cudaError_t cudaGetLastError() {
  if (!gsae_emu::t_has_error) return cudaSuccess;
  gsae_emu::t_has_error = false;
  return cudaErrorLaunchFailure;
}

const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : gsae_emu::t_error.c_str();
}
