// Small CUDA-style kernels that exercise the emulator itself (tests/test_cuda_emulated.py): warp
// collectives, block barriers and shared memory, and the faults it must report. Op
// gsae_fast_emu::selftest(case, n, input) runs one case as the emulated executor's ops run
// (guarded memory, a guarded copy of `input`, inputs checked unchanged) and returns its output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "emu/guarded_memory.h"
#define GSAE_FAST_CUDA_EMULATED 1
#include "cuda/launch.h"

namespace gsae_fast_cuda {
inline namespace GSAE_CUDA_VARIANT {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[t] = the sum over t's warp of the thread ids (shuffle down), the same by a butterfly
// (shuffle xor), lane 3's id (broadcast), and the ballot of "id % 3 == 0" with any / all.
__global__ void warp_kernel(float* out) {
  const int t = threadIdx.x;
  float down = static_cast<float>(t);
  for (int o = 16; o > 0; o >>= 1) down += __shfl_down_sync(kFull, down, o);
  float xr = static_cast<float>(t);
  for (int o = 16; o > 0; o >>= 1) xr += __shfl_xor_sync(kFull, xr, o);
  const int from3 = __shfl_sync(kFull, t, 3);
  const unsigned ballot = __ballot_sync(kFull, t % 3 == 0);
  const int any = __any_sync(kFull, t == 40), all = __all_sync(kFull, t < 48);
  float* o = out + 6 * t;
  o[0] = (t % 32 == 0) ? down : -1.0f;
  o[1] = xr;
  o[2] = static_cast<float>(from3);
  o[3] = static_cast<float>(ballot);
  o[4] = static_cast<float>(any);
  o[5] = static_cast<float>(all);
}

// A block sum through shared memory (a tree of in-place additions); RACY leaves out the barrier
// after each step, so a thread may read a partial sum before its owner has added into it: the
// result then depends on the order threads run in.
template <bool RACY> __global__ void block_sum_kernel(const float* in, float* out) {
  GSAE_SHARED_ARRAY(float, buf, 256);
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    if (!RACY) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// Reads a shared element no thread wrote (it holds the poison), or one past the array's end.
__global__ void shared_read_kernel(float* out, int index) {
  GSAE_SHARED_ARRAY(float, buf, 64);
  buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[index];
}

// Lanes of one warp at different intrinsics; a shuffle that reads a lane that has exited; half
// a warp at __syncthreads while the other half waits for it in a shuffle; a vote whose mask
// names exited lanes (allowed: they take no part).
__global__ void diverged_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = static_cast<float>(__ballot_sync(kFull, 1));
  else v = __shfl_down_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}
__global__ void exited_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, 1.0f, 8);  // lanes 8..15 read lanes 16..23
}
__global__ void exited_vote_kernel(float* out) {
  if (threadIdx.x >= 20) return;
  const unsigned ballot = __ballot_sync(kFull, 1);
  out[threadIdx.x] = static_cast<float>(__popc(ballot) + 100 * __all_sync(kFull, 1));
}
// Two __syncthreads in the two branches of one if; a __syncthreads after half the block left.
__global__ void barrier_diverged_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  else out[threadIdx.x] = __shfl_down_sync(kFull, 1.0f, 1);
}

// Writes every element but the last (left as the guarded allocation's poison); or reads one
// element past the end of its input (fault = 1), or writes one before the start of its output
// (fault = 2).
__global__ void copy_kernel(const float* in, float* out, int n, int fault) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n - 1) out[i] = in[i];
  if (fault == 1 && i == n - 1) out[i] = in[n];
  if (fault == 2 && i == 0) out[-1] = in[0];
}
// Writes into what should be read-only.
__global__ void scribble_kernel(float* p) { p[threadIdx.x] = -5.0f; }

at::Tensor run_case(std::string which, int64_t n, const at::Tensor& in) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous() && in.numel() >= n,
              "selftest: input must be contiguous float32 with at least n elements");
  at::Tensor out;
  if (which == "warp") {
    out = at::empty({64 * 6}, f32);
    launch_kernel("warp_kernel", &warp_kernel, dim3(1), dim3(64), 0, nullptr, out.data_ptr<float>());
  } else if (which == "block_sum" || which == "block_sum_racy") {
    TORCH_CHECK(n % 256 == 0, "selftest: n must be a multiple of 256");
    out = at::empty({n / 256}, f32);
    auto k = which == "block_sum" ? &block_sum_kernel<false> : &block_sum_kernel<true>;
    launch_kernel(which.c_str(), k, dim3(n / 256), dim3(256), 0, nullptr,
                  static_cast<const float*>(in.data_ptr<float>()), out.data_ptr<float>());
  } else if (which == "shared_unwritten" || which == "shared_out_of_range") {
    out = at::empty({32}, f32);
    launch_kernel("shared_read_kernel", &shared_read_kernel, dim3(1), dim3(32), 0, nullptr,
                  out.data_ptr<float>(), which == "shared_unwritten" ? 40 : 64);
  } else if (which == "diverged" || which == "exited" || which == "deadlock" ||
             which == "exited_vote") {
    out = at::zeros({32}, f32);
    auto k = which == "diverged" ? &diverged_kernel
             : which == "exited" ? &exited_kernel
             : which == "exited_vote" ? &exited_vote_kernel : &deadlock_kernel;
    launch_kernel(which.c_str(), k, dim3(1), dim3(32), 0, nullptr, out.data_ptr<float>());
  } else if (which == "barrier_diverged" || which == "barrier_after_exit") {
    out = at::zeros({64}, f32);
    auto k = which == "barrier_diverged" ? &barrier_diverged_kernel : &barrier_after_exit_kernel;
    launch_kernel(which.c_str(), k, dim3(1), dim3(64), 0, nullptr, out.data_ptr<float>());
  } else if (which == "empty_grid") {
    out = at::zeros({32}, f32);
    launch_kernel("exited_vote_kernel", &exited_vote_kernel, dim3(0), dim3(32), 0, nullptr,
                  out.data_ptr<float>());
  } else if (which == "unwritten" || which == "read_past_end" || which == "write_before_start") {
    out = at::empty({n}, f32);
    launch_kernel("copy_kernel", &copy_kernel, dim3((n + 127) / 128), dim3(128), 0, nullptr,
                  static_cast<const float*>(in.data_ptr<float>()), out.data_ptr<float>(),
                  static_cast<int>(n), which == "read_past_end" ? 1
                                       : which == "write_before_start" ? 2 : 0);
  } else if (which == "write_input") {
    out = at::zeros({1}, f32);
    launch_kernel("scribble_kernel", &scribble_kernel, dim3(1), dim3(1), 0, nullptr,
                  const_cast<float*>(in.data_ptr<float>()));
  } else {
    TORCH_CHECK(false, "selftest: unknown case '", which, "'");
  }
  const cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, "selftest ", which, ": ", cudaGetErrorString(e));
  return out;
}

}  // namespace
}  // namespace GSAE_CUDA_VARIANT
}  // namespace gsae_fast_cuda

TORCH_LIBRARY_FRAGMENT(gsae_fast_emu, m) {
  m.def("selftest(str case, int n, Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(gsae_fast_emu, CPU, m) {
  m.impl("selftest", &gsae_fast::emu_memory::Guarded<&gsae_fast_cuda::run_case>::call);
}
