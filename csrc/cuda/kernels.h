// Launchers of the CUDA kernels (csrc/cuda/kernels.cu): raw pointers and sizes, on a stream.
// Accumulation-type buffers (A) are float, or double for fp64; see kernels.cu.
//
// Two builds share this source: the real one (nvcc, GPU) and the emulated one (the same kernels
// compiled as C++ and run on the CPU by csrc/emu, when GSAE_FAST_CUDA_EMULATED is defined). Their
// symbols live in different inline namespaces, so both can sit in one library.
#pragma once
#include <stdint.h>

#if defined(GSAE_FAST_CUDA_EMULATED)
#include "emu/runtime.h"
#define GSAE_CUDA_VARIANT emulated
#else
#include <cuda_runtime.h>
#define GSAE_CUDA_VARIANT device
#endif

namespace gsae_fast_cuda {
inline namespace GSAE_CUDA_VARIANT {

enum class DType { F32, F64, BF16, F16 };  // the storage dtype of the weight matrices

// out_a [B, d_in] (W's dtype) = sum over the active slots of val_a * W[idx] (+ bias, A), and,
// with `pair`, out_b likewise from val_b (one load of each W element for both; without it val_b
// and out_b are not read). (A flag, not a null val_b: an empty tensor's data pointer is null.)
void launch_decode(DType dt, bool pair, const int32_t* idx, const void* val_a,
                   const void* val_b, const int32_t* counts, const void* W, const void* bias,
                   void* out_a, void* out_b, int64_t B, int64_t K, int64_t d_in,
                   cudaStream_t s);
// grad_a [B, K] (A) = W[idx[b, k]] . g_a[b] with g_a [B, d_in] (A), 0 on padding slots, and,
// with `pair`, grad_b from g_b with the same reads of each row. A null grad_a / grad_b is not
// written.
void launch_slot_dot(DType dt, bool pair, const void* g_a, const void* g_b, const int32_t* idx,
                     const int32_t* counts, const void* W, void* grad_a, void* grad_b, int64_t B,
                     int64_t K, int64_t d_in, cudaStream_t s);
// out [d_sae, width] (out_dt) = per feature f, sum over its pairs p (ptr[f] .. ptr[f+1], rows[p],
// vals[p]) of vals[p] * src[rows[p]] (src [*, width], A). Deterministic.
void launch_segment_scatter(DType out_dt, const int64_t* ptr, const int64_t* rows,
                            const void* vals, const void* src, void* out, int64_t d_sae,
                            int64_t width, cudaStream_t s);
// The same sums written transposed, out [width, d_sae] (out_dt), and sums [n_extra, d_sae] (A,
// n_extra <= 8) = per-feature sums of the rows of extra [n_extra, n_pairs]. Deterministic.
void launch_segment_scatter_t(DType out_dt, const int64_t* ptr, const int64_t* rows,
                              const void* vals, const void* src, void* out, int64_t d_sae,
                              int64_t width, const void* extra, void* sums, int n_extra,
                              int64_t n_pairs, cudaStream_t s);
// out [d_sae, width] (A, zeroed by the caller) += val[b, k] * src[b] at row idx[b, k]; atomics.
void launch_atomic_scatter(bool fp64, const int32_t* idx, const void* val, const int32_t* counts,
                           const void* src, void* out, int64_t B, int64_t K, int64_t width,
                           cudaStream_t s);
// The gated epilogue of one feature block of z [B, F] (A), features f0 .. f0 + F: appends the
// open gates of each row to its slots (idx, f, pi [B, capacity]) after counts[b] earlier ones,
// counting past capacity; bad |= 1 on a NaN/Inf z. Biases are A, exp_r = exp(r_mag).
void launch_epilogue(bool fp64, const void* z, int64_t B, int64_t F, int64_t f0,
                     const void* centre, const void* b_gate, const void* exp_r, const void* b_mag, int64_t capacity,
                     int32_t* idx, void* f, void* pi, int32_t* counts, int32_t* bad,
                     cudaStream_t s);

}  // namespace GSAE_CUDA_VARIANT
}  // namespace gsae_fast_cuda
