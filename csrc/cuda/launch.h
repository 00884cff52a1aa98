// The device API of kernels.cu and its one launch function, for both builds: nvcc and a GPU, or
// the emulated build (GSAE_FAST_CUDA_EMULATED), where csrc/emu runs the same kernels on the CPU.
#pragma once
#include <stddef.h>

#include <utility>

#if defined(GSAE_FAST_CUDA_EMULATED)
#include "emu/device.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// A shared-memory array; the emulated build checks every index and poisons it per block.
#define GSAE_SHARED_ARRAY(T, name, N) __shared__ T name[N]
#endif

#include "cuda/kernels.h"

namespace gsae_fast_cuda {
inline namespace GSAE_CUDA_VARIANT {

// kernel<<<grid, block, shared_bytes, stream>>>(args...), in both builds. `name` labels the
// emulator's error reports.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   size_t shared_bytes, cudaStream_t stream, Args... args) {
#if defined(GSAE_FAST_CUDA_EMULATED)
  (void)stream;
  auto body = [&] { kernel(static_cast<Params>(args)...); };
  using Body = decltype(body);
  ::gsae_emu::launch(name, grid, block, shared_bytes,
                     [](void* ctx) { (*static_cast<Body*>(ctx))(); }, &body);
#else
  (void)name;
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Params>(args)...);
#endif
}

}  // namespace GSAE_CUDA_VARIANT
}  // namespace gsae_fast_cuda
