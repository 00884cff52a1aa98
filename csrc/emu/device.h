// The CUDA device API that csrc/cuda/kernels.cu uses, emulated on the CPU, so that the same
// kernel source compiles as C++ and runs (the "cuda_emulated" executor, for tests).
//
// Model (emu/cuda_emu.cpp): a launch runs its blocks one after another on the calling thread;
// every CUDA thread of a block is a fiber with its own stack. A fiber runs until it reaches a
// scheduling point (a warp collective, __syncwarp, __syncthreads) or ends; the scheduler then
// completes each warp collective whose lanes have all arrived (lanes of a warp are in lockstep
// at every intrinsic, as the _sync intrinsics require; lanes of the mask that exited take no
// part, as in CUDA) and releases a __syncthreads once every thread of the block is at it.
// Between scheduling points a thread runs alone, so atomics are plain read-modify-writes.
// Reported as launch errors: lanes at different collectives or masks, a shuffle that reads an
// exited lane, threads at different __syncthreads or a __syncthreads after some threads exited,
// threads that can never meet again (deadlock), an exception thrown by kernel code.
// The order of blocks and threads follows the schedule (emu/runtime.h): run a deterministic
// kernel under two orders and compare bitwise to find a missing barrier. Not found this way: two
// threads updating one global location with a plain read-modify-write where an atomic is needed
// (each runs its update alone, so it always comes out right here).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set by the scheduler before it resumes each fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }                // round to nearest even
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

using std::isfinite;
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }

namespace gsae_emu {

enum class Collective : uint8_t { ShflDown, ShflXor, Shfl, Ballot, Any, All, SyncWarp };

// A warp collective: this lane's `value` in, its result out, once every lane of `mask` is here.
uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int arg, int width);
void sync_threads(const char* file, int line);
// Ends the launch with an error (the host sees it from cudaGetLastError).
[[noreturn]] void fail(const char* what);
// Bumped at every block: shared arrays re-poison themselves on their first use in a block.
uint64_t block_serial();

using Entry = void (*)(void* ctx);
void launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, Entry entry, void* ctx);

template <typename T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a big type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T> T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// __shared__ T name[N] in the emulated build (GSAE_SHARED_ARRAY): one array per block (blocks
// run one at a time), filled with 0xFF bytes at its first use in each block (an element read
// before any thread of the block wrote it is NaN / -1), every index checked.
template <typename T, int64_t N> class SharedArray {
 public:
  explicit SharedArray(const char* name) : name_(name) {}
  T& operator[](int64_t i) {
    if (serial_ != block_serial()) {
      std::memset(static_cast<void*>(data_), 0xFF, sizeof(data_));
      serial_ = block_serial();
    }
    if (i < 0 || i >= N) out_of_range(i);
    return data_[i];
  }

 private:
  [[noreturn]] void out_of_range(int64_t i);
  const char* name_;
  uint64_t serial_ = ~uint64_t(0);
  T data_[N];
};

void shared_out_of_range(const char* name, int64_t i, int64_t n);
template <typename T, int64_t N> void SharedArray<T, N>::out_of_range(int64_t i) {
  shared_out_of_range(name_, i, N);
  fail("shared-memory index out of range");
}

}  // namespace gsae_emu

#define GSAE_SHARED_ARRAY(T, name, N) \
  static thread_local ::gsae_emu::SharedArray<T, (N)> name(#name)

template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return gsae_emu::from_bits<T>(gsae_emu::warp_collective(
      gsae_emu::Collective::ShflDown, mask, gsae_emu::to_bits(v), static_cast<int>(delta), width));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return gsae_emu::from_bits<T>(gsae_emu::warp_collective(
      gsae_emu::Collective::ShflXor, mask, gsae_emu::to_bits(v), lane_mask, width));
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return gsae_emu::from_bits<T>(gsae_emu::warp_collective(
      gsae_emu::Collective::Shfl, mask, gsae_emu::to_bits(v), src_lane, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(
      gsae_emu::warp_collective(gsae_emu::Collective::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(
      gsae_emu::warp_collective(gsae_emu::Collective::Any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(
      gsae_emu::warp_collective(gsae_emu::Collective::All, mask, pred != 0, 0, 32));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  gsae_emu::warp_collective(gsae_emu::Collective::SyncWarp, mask, 0, 0, 32);
}
// The call site goes with it: threads of a block at two different barriers are an error.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  gsae_emu::sync_threads(file, line);
}

// Atomics: a thread runs alone between scheduling points, so a plain read-modify-write is atomic.
template <typename T> T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T> T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T> T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T> T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T> T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
