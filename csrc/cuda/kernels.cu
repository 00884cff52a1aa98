// CUDA kernels of the "cuda" executor. Raw pointers only: no torch headers here, so nvcc stays
// fast; the host side (shapes, dtypes, torch ops, streams, error checks) is ops_cuda.cpp.
// The same source also compiles as C++ for the "cuda_emulated" executor (csrc/emu runs it on the
// CPU, for tests): kernels start through launch_kernel (cuda/launch.h), in both builds.
//
// Accumulation type A is float (fp32/bf16/fp16 inputs) or double (fp64). Tensors the host has
// already converted to A: values, gradients of the outputs, centred inputs, biases. Tensors read
// in their storage dtype T: the weight matrices (the big reads).
#include <stdint.h>

#include <type_traits>

#include "cuda/launch.h"

namespace gsae_fast_cuda {
inline namespace GSAE_CUDA_VARIANT {
namespace {

template <typename T> __device__ __forceinline__ float to_acc(T v);
template <> __device__ __forceinline__ float to_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A> __device__ __forceinline__ A load(const T* p) {
  return static_cast<A>(to_acc<T>(*p));
}
template <> __device__ __forceinline__ double load<double, double>(const double* p) { return *p; }

template <typename T, typename A> __device__ __forceinline__ T store(A v);
template <> __device__ __forceinline__ float store<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double store<double, double>(double v) { return v; }
template <> __device__ __forceinline__ __half store<__half, float>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// 16-byte loads (one LDG.128 each): kVec<T> consecutive elements from a 16-byte aligned address,
// converted to A. The emulated build checks the alignment (a GPU faults on a misaligned one).
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T, typename A>
__device__ __forceinline__ void load16(const T* p, A* out) {
  T v[kVec<T>];
#if defined(GSAE_FAST_CUDA_EMULATED)
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) gsae_emu::fail("misaligned 16-byte load");
  std::memcpy(v, p, 16);
#else
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  memcpy(v, &raw, 16);  // (a register move: the bytes are already in registers)
#endif
  for (int q = 0; q < kVec<T>; ++q) out[q] = load<T, A>(v + q);
}

// N consecutive elements from p: 16-byte loads when `vec` (p 16-byte aligned, N a multiple of
// kVec<T>), else element by element, the ones at or past `n` read as 0.
template <typename T, typename A, int N>
__device__ __forceinline__ void load_run(const T* p, bool vec, int64_t n, A (&out)[N]) {
  if constexpr (N % kVec<T> == 0) {
    if (vec) {
      for (int j = 0; j < N; j += kVec<T>) load16<T, A>(p + j, out + j);
      return;
    }
  }
  for (int j = 0; j < N; ++j) out[j] = j < n ? load<T, A>(p + j) : A(0);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The gather decode, single (kPair = false) or pair: out_a[b, c] = sum_{k < counts[b]}
// val_a[b, k] * W[idx[b, k], c] (+ bias[c]), and out_b likewise from val_b over the same slots
// with the same loads of W. Grid (B, column blocks); each thread owns runs of kRun columns (one
// 16-byte load of a W row per run: kRun = kVec<T>, when d_in is a multiple of it and W is
// aligned; else runs of 1) and walks the row's slots kUnroll at a time, so that kUnroll
// independent row loads are in flight. The sums run over k in order, whichever path.
constexpr int kUnroll = 4;

template <typename T, typename A, bool kPair, int kRun>
__device__ __forceinline__ void decode_columns(const int32_t* idx, const A* val_a, const A* val_b,
                                               int64_t n, const T* W, const A* bias, T* out_a,
                                               T* out_b, int64_t d_in, int64_t c) {
  const bool vec = kRun > 1;
  A acc_a[kRun], acc_b[kRun];
  for (int q = 0; q < kRun; ++q) acc_a[q] = acc_b[q] = bias != nullptr ? bias[c + q] : A(0);
  int64_t k = 0;
  for (; k + kUnroll <= n; k += kUnroll) {
    A w[kUnroll][kRun];
    for (int u = 0; u < kUnroll; ++u)
      load_run<T, A, kRun>(W + static_cast<int64_t>(idx[k + u]) * d_in + c, vec, kRun, w[u]);
    for (int u = 0; u < kUnroll; ++u)
      for (int q = 0; q < kRun; ++q) {
        acc_a[q] += val_a[k + u] * w[u][q];
        if (kPair) acc_b[q] += val_b[k + u] * w[u][q];
      }
  }
  for (; k < n; ++k) {
    A w[kRun];
    load_run<T, A, kRun>(W + static_cast<int64_t>(idx[k]) * d_in + c, vec, kRun, w);
    for (int q = 0; q < kRun; ++q) {
      acc_a[q] += val_a[k] * w[q];
      if (kPair) acc_b[q] += val_b[k] * w[q];
    }
  }
  for (int q = 0; q < kRun; ++q) {
    out_a[c + q] = store<T, A>(acc_a[q]);
    if (kPair) out_b[c + q] = store<T, A>(acc_b[q]);
  }
}

template <typename T, typename A, bool kPair, int kRun>
__global__ void decode_kernel(const int32_t* __restrict__ idx, const A* __restrict__ val_a,
                              const A* __restrict__ val_b, const int32_t* __restrict__ counts,
                              const T* __restrict__ W, const A* __restrict__ bias,
                              T* __restrict__ out_a, T* __restrict__ out_b, int64_t K,
                              int64_t d_in, int64_t cols_per_block) {
  const int64_t b = blockIdx.x;
  const int64_t c0 = blockIdx.y * cols_per_block;
  const int64_t c1 = min(c0 + cols_per_block, d_in);
  const int64_t n = min(static_cast<int64_t>(counts[b]), K);  // as Triton: never past row b
  for (int64_t c = c0 + threadIdx.x * kRun; c < c1; c += blockDim.x * kRun)
    decode_columns<T, A, kPair, kRun>(idx + b * K, val_a + b * K, kPair ? val_b + b * K : nullptr,
                                      n, W, bias, out_a + b * d_in,
                                      kPair ? out_b + b * d_in : nullptr, d_in, c);
}

// The value gradients, single or pair: grad_a[b, k] = W[idx[b, k]] . g_a[b] (and grad_b from
// g_b with the same loads of the row) for k < counts[b], 0 on padding: one warp per slot, its
// lanes over runs of kRun columns (16-byte loads of the row and of g when `vec`). A null grad_a /
// grad_b is not written (its gradient is not wanted).
template <typename T, typename A, bool kPair>
__global__ void slot_dot_kernel(const A* __restrict__ g_a, const A* __restrict__ g_b,
                                const int32_t* __restrict__ idx,
                                const int32_t* __restrict__ counts, const T* __restrict__ W,
                                A* __restrict__ grad_a, A* __restrict__ grad_b, int64_t B,
                                int64_t K, int64_t d_in, bool vec) {
  constexpr int R = kVec<T>;
  const int64_t slot = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (slot >= B * K) return;
  const int64_t b = slot / K, k = slot % K;
  A acc_a = 0, acc_b = 0;
  if (k < counts[b]) {
    const T* w = W + static_cast<int64_t>(idx[slot]) * d_in;
    const A* ga = g_a + b * d_in;
    const A* gb = kPair ? g_b + b * d_in : nullptr;
    if (vec) {  // d_in % R == 0 and every row start 16-byte aligned
      for (int64_t c = lane * R; c < d_in; c += 32 * R) {
        A wc[R], xa[R], xb[R];
        load_run<T, A, R>(w + c, true, R, wc);
        load_run<A, A, R>(ga + c, true, R, xa);
        if (kPair) load_run<A, A, R>(gb + c, true, R, xb);
        for (int q = 0; q < R; ++q) {
          acc_a += wc[q] * xa[q];
          if (kPair) acc_b += wc[q] * xb[q];
        }
      }
    } else {
      for (int64_t c = lane; c < d_in; c += 32) {
        const A wc = load<T, A>(w + c);
        acc_a += wc * ga[c];
        if (kPair) acc_b += wc * gb[c];
      }
    }
  }
  acc_a = warp_sum(acc_a);
  if (kPair) acc_b = warp_sum(acc_b);
  if (lane == 0) {
    if (grad_a != nullptr) grad_a[slot] = acc_a;
    if (kPair && grad_b != nullptr) grad_b[slot] = acc_b;
  }
}

// Deterministic grouped scatter: out[f, c] = sum_{p in [ptr[f], ptr[f+1])} vals[p] * src[rows[p], c],
// the pairs of each feature in a fixed order (the host's stable sort). One block per feature
// (empty ones write zeros and are done); threads over c, so each src row is read coalesced.
template <typename T, typename A>
__global__ void segment_scatter_kernel(const int64_t* __restrict__ ptr,
                                       const int64_t* __restrict__ rows,
                                       const A* __restrict__ vals, const A* __restrict__ src,
                                       T* __restrict__ out, int64_t width) {
  const int64_t f = blockIdx.x;
  const int64_t p0 = ptr[f], p1 = ptr[f + 1];
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    A acc = 0;
    for (int64_t p = p0; p < p1; ++p) acc += vals[p] * src[rows[p] * width + c];
    out[f * width + c] = store<T, A>(acc);
  }
}

// The same scatter written transposed, out [width, d_sae] (grad W_enc in W_enc's own layout and
// dtype: no [d_sae, d_in] staging copy and no transpose pass). A block owns a tile of kTileF
// features x kTileC columns: warp w sums the pairs of features w, w + 8, ... with its lanes over
// 4 column runs of 32 (coalesced src reads), parks the sums in shared memory, and the block
// writes the tile out along features (coalesced stores). The padded row (kTileC + 1) keeps the
// transposed read free of bank conflicts. Blocks of the first column tile also write the
// per-feature sums of the n_extra rows of extra [n_extra, n_pairs] (the bias gradients).
constexpr int kTileF = 32, kTileC = 128, kTileThreads = 256;

template <typename T, typename A>
__global__ void segment_scatter_t_kernel(const int64_t* __restrict__ ptr,
                                         const int64_t* __restrict__ rows,
                                         const A* __restrict__ vals, const A* __restrict__ src,
                                         T* __restrict__ out, int64_t width, int64_t d_sae,
                                         const A* __restrict__ extra, A* __restrict__ sums,
                                         int n_extra, int64_t n_pairs) {
  GSAE_SHARED_ARRAY(A, tile, kTileF * (kTileC + 1));
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kTileF;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = warp; j < kTileF; j += kTileThreads / 32) {
    A acc[kTileC / 32] = {};
    if (f0 + j < d_sae) {
      for (int64_t p = ptr[f0 + j]; p < ptr[f0 + j + 1]; ++p) {
        const A v = vals[p];
        const A* row = src + rows[p] * width;
        for (int q = 0; q < kTileC / 32; ++q) {
          const int64_t c = c0 + q * 32 + lane;
          if (c < width) acc[q] += v * row[c];
        }
      }
    }
    for (int q = 0; q < kTileC / 32; ++q) tile[j * (kTileC + 1) + q * 32 + lane] = acc[q];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTileF * kTileC; e += kTileThreads) {
    const int j = e % kTileF, c = e / kTileF;
    if (f0 + j < d_sae && c0 + c < width)
      out[(c0 + c) * d_sae + f0 + j] = store<T, A>(tile[j * (kTileC + 1) + c]);
  }
  if (blockIdx.y == 0 && static_cast<int>(threadIdx.x) < kTileF * n_extra) {
    const int j = threadIdx.x % kTileF, r = threadIdx.x / kTileF;
    if (f0 + j < d_sae) {
      A s = 0;
      for (int64_t p = ptr[f0 + j]; p < ptr[f0 + j + 1]; ++p) s += extra[r * n_pairs + p];
      sums[r * d_sae + f0 + j] = s;
    }
  }
}

// Atomic scatter (fast, order-dependent rounding): out[idx[b, k], c] += val[b, k] * src[b, c].
template <typename A>
__global__ void atomic_scatter_kernel(const int32_t* __restrict__ idx, const A* __restrict__ val,
                                      const int32_t* __restrict__ counts,
                                      const A* __restrict__ src, A* __restrict__ out, int64_t K,
                                      int64_t width) {
  const int64_t b = blockIdx.x;
  const int64_t n = min(static_cast<int64_t>(counts[b]), K);
  for (int64_t k = 0; k < n; ++k) {
    const A v = val[b * K + k];
    A* row = out + static_cast<int64_t>(idx[b * K + k]) * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) atomicAdd(row + c, v * src[b * width + c]);
  }
}

// The gated epilogue over one feature block [f0, f0 + F) of z (z = x @ W_enc, row-major [B, F],
// centred here: z - centre with centre = b_dec @ W_enc): pi = z + b_gate, gate = pi > 0,
// f = relu(exp(r_mag) z + b_mag). One warp per row scans the block 128 features at a time, each
// lane 4 adjacent ones (16-byte loads of z and of the per-feature vectors when `vec`: F a multiple
// of 4 and every pointer 16-byte aligned). Three ballots give each lane the number of open gates
// of the lanes before it, so the slots of a row come out in increasing feature order
// (deterministic), after the row's earlier blocks (counts[b] carries the running count). Slots
// past `capacity` are not written, but counted: the host re-runs with the true maximum.
constexpr int kEpiRun = 4;

template <typename A>
__global__ void epilogue_kernel(const A* __restrict__ z, int64_t B, int64_t F, int64_t f0,
                                const A* __restrict__ centre, const A* __restrict__ b_gate,
                                const A* __restrict__ exp_r, const A* __restrict__ b_mag,
                                int64_t capacity, int32_t* __restrict__ idx,
                                A* __restrict__ f_out, A* __restrict__ pi_out,
                                int32_t* __restrict__ counts, int32_t* __restrict__ bad,
                                bool vec) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const unsigned lanes_before = (1u << lane) - 1u;
  int64_t base = counts[b];
  bool nonfinite = false;
  for (int64_t j0 = 0; j0 < F; j0 += 32 * kEpiRun) {
    const int64_t j = j0 + lane * kEpiRun;
    const int64_t n = F - j;  // features of this lane's run inside the block (may be <= 0)
    A zz[kEpiRun], c[kEpiRun], bg[kEpiRun], pi[kEpiRun] = {};
    int open = 0;  // bit q: the gate of feature j + q is open
    if (n > 0) {
      load_run<A, A, kEpiRun>(z + b * F + j, vec, n, zz);
      load_run<A, A, kEpiRun>(centre + f0 + j, vec, n, c);
      load_run<A, A, kEpiRun>(b_gate + f0 + j, vec, n, bg);
      for (int q = 0; q < kEpiRun && q < n; ++q) {
        zz[q] -= c[q];
        nonfinite |= !isfinite(zz[q]);
        pi[q] = zz[q] + bg[q];
        if (pi[q] > A(0)) open |= 1 << q;
      }
    }
    const int mine = __popc(static_cast<unsigned>(open));  // 0 .. 4: three bits
    const unsigned m1 = __ballot_sync(0xffffffffu, mine & 1);
    const unsigned m2 = __ballot_sync(0xffffffffu, mine & 2);
    const unsigned m4 = __ballot_sync(0xffffffffu, mine & 4);
    if (open != 0) {
      int64_t slot = base + __popc(m1 & lanes_before) + 2 * __popc(m2 & lanes_before) +
                     4 * __popc(m4 & lanes_before);
      A er[kEpiRun], bm[kEpiRun];
      load_run<A, A, kEpiRun>(exp_r + f0 + j, vec, n, er);
      load_run<A, A, kEpiRun>(b_mag + f0 + j, vec, n, bm);
      for (int q = 0; q < kEpiRun; ++q) {
        if (!(open >> q & 1)) continue;
        if (slot < capacity) {
          const A pm = er[q] * zz[q] + bm[q];
          idx[b * capacity + slot] = static_cast<int32_t>(f0 + j + q);
          f_out[b * capacity + slot] = pm > A(0) ? pm : A(0);
          pi_out[b * capacity + slot] = pi[q];
        }
        ++slot;
      }
    }
    base += __popc(m1) + 2 * __popc(m2) + 4 * __popc(m4);
  }
  if (__any_sync(0xffffffffu, nonfinite) && lane == 0) atomicOr(bad, 1);
  if (lane == 0) counts[b] = static_cast<int32_t>(base);
}

int blocks_for(int64_t threads, int per_block) {
  return static_cast<int>((threads + per_block - 1) / per_block);
}

// Columns per block of the decode: enough blocks for small B, long rows in L2; 128 threads with
// 16-byte runs (kVec<T> columns each), 256 threads one column at a time.
template <typename T, typename A, bool kPair>
void decode_t(const int32_t* idx, const void* val_a, const void* val_b, const int32_t* counts,
              const void* W, const void* bias, void* out_a, void* out_b, int64_t B, int64_t K,
              int64_t d_in, cudaStream_t s) {
  constexpr int R = kVec<T>;
  const bool vec = d_in % R == 0 && aligned16(W);
  const int threads = vec ? 128 : 256;
  const int64_t cols = vec ? 128 * R : 1024;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((d_in + cols - 1) / cols));
  auto args = [&](auto kernel) {
    launch_kernel(kPair ? "decode_pair_kernel" : "decode_kernel", kernel, grid, dim3(threads), 0,
                  s, idx, static_cast<const A*>(val_a), static_cast<const A*>(val_b), counts,
                  static_cast<const T*>(W), static_cast<const A*>(bias), static_cast<T*>(out_a),
                  static_cast<T*>(out_b), K, d_in, cols);
  };
  if (vec) args(&decode_kernel<T, A, kPair, R>);
  else args(&decode_kernel<T, A, kPair, 1>);
}

template <typename T, typename A, bool kPair>
void slot_dot_t(const void* g_a, const void* g_b, const int32_t* idx, const int32_t* counts,
                const void* W, void* grad_a, void* grad_b, int64_t B, int64_t K, int64_t d_in,
                cudaStream_t s) {
  const bool vec = d_in % kVec<T> == 0 && aligned16(W) && aligned16(g_a) &&
                   (!kPair || aligned16(g_b));
  launch_kernel(kPair ? "slot_dot_pair_kernel" : "slot_dot_kernel", &slot_dot_kernel<T, A, kPair>,
                dim3(blocks_for(B * K * 32, 256)), dim3(256), 0, s, static_cast<const A*>(g_a),
                static_cast<const A*>(g_b), idx, counts, static_cast<const T*>(W),
                static_cast<A*>(grad_a), static_cast<A*>(grad_b), B, K, d_in, vec);
}

}  // namespace

#define GSAE_DISPATCH_W(dtype, ...)                                          \
  switch (dtype) {                                                          \
    case DType::F32: { using T = float; using A = float; __VA_ARGS__; break; }   \
    case DType::F64: { using T = double; using A = double; __VA_ARGS__; break; } \
    case DType::BF16: { using T = __nv_bfloat16; using A = float; __VA_ARGS__; break; } \
    case DType::F16: { using T = __half; using A = float; __VA_ARGS__; break; }  \
  }

void launch_decode(DType dt, bool pair, const int32_t* idx, const void* val_a,
                   const void* val_b, const int32_t* counts, const void* W, const void* bias,
                   void* out_a, void* out_b, int64_t B, int64_t K, int64_t d_in,
                   cudaStream_t s) {
  if (B == 0 || d_in == 0) return;
  if (!pair) {
    GSAE_DISPATCH_W(dt, (decode_t<T, A, false>(idx, val_a, nullptr, counts, W, bias, out_a,
                                                nullptr, B, K, d_in, s)));
  } else {
    GSAE_DISPATCH_W(dt, (decode_t<T, A, true>(idx, val_a, val_b, counts, W, bias, out_a, out_b, B,
                                               K, d_in, s)));
  }
}

void launch_slot_dot(DType dt, bool pair, const void* g_a, const void* g_b, const int32_t* idx,
                     const int32_t* counts, const void* W, void* grad_a, void* grad_b, int64_t B,
                     int64_t K, int64_t d_in, cudaStream_t s) {
  if (B * K == 0) return;
  if (!pair) {
    GSAE_DISPATCH_W(dt, (slot_dot_t<T, A, false>(g_a, nullptr, idx, counts, W, grad_a, nullptr,
                                                  B, K, d_in, s)));
  } else {
    GSAE_DISPATCH_W(dt, (slot_dot_t<T, A, true>(g_a, g_b, idx, counts, W, grad_a, grad_b, B, K,
                                                 d_in, s)));
  }
}

void launch_segment_scatter(DType out_dt, const int64_t* ptr, const int64_t* rows,
                            const void* vals, const void* src, void* out, int64_t d_sae,
                            int64_t width, cudaStream_t s) {
  if (d_sae == 0 || width == 0) return;
  GSAE_DISPATCH_W(out_dt, (launch_kernel(
      "segment_scatter_kernel", &segment_scatter_kernel<T, A>, dim3(static_cast<unsigned>(d_sae)),
      dim3(128), 0, s, ptr, rows, static_cast<const A*>(vals), static_cast<const A*>(src),
      static_cast<T*>(out), width)));
}

void launch_segment_scatter_t(DType out_dt, const int64_t* ptr, const int64_t* rows,
                              const void* vals, const void* src, void* out, int64_t d_sae,
                              int64_t width, const void* extra, void* sums, int n_extra,
                              int64_t n_pairs, cudaStream_t s) {
  if (d_sae == 0) return;
  // One column tile even when width is 0: its blocks write the per-feature sums.
  const dim3 grid(static_cast<unsigned>((d_sae + kTileF - 1) / kTileF),
                  static_cast<unsigned>(width > 0 ? (width + kTileC - 1) / kTileC : 1));
  GSAE_DISPATCH_W(out_dt, (launch_kernel(
      "segment_scatter_t_kernel", &segment_scatter_t_kernel<T, A>, grid, dim3(kTileThreads), 0,
      s, ptr, rows, static_cast<const A*>(vals), static_cast<const A*>(src), static_cast<T*>(out),
      width, d_sae, static_cast<const A*>(extra), static_cast<A*>(sums), n_extra, n_pairs)));
}

void launch_atomic_scatter(bool fp64, const int32_t* idx, const void* val, const int32_t* counts,
                           const void* src, void* out, int64_t B, int64_t K, int64_t width,
                           cudaStream_t s) {
  if (B == 0) return;
  const dim3 grid(static_cast<unsigned>(B));
  if (fp64) {
    launch_kernel("atomic_scatter_kernel", &atomic_scatter_kernel<double>, grid, dim3(256), 0, s,
                  idx, static_cast<const double*>(val), counts, static_cast<const double*>(src),
                  static_cast<double*>(out), K, width);
  } else {
    launch_kernel("atomic_scatter_kernel", &atomic_scatter_kernel<float>, grid, dim3(256), 0, s,
                  idx, static_cast<const float*>(val), counts, static_cast<const float*>(src),
                  static_cast<float*>(out), K, width);
  }
}

void launch_epilogue(bool fp64, const void* z, int64_t B, int64_t F, int64_t f0,
                     const void* centre, const void* b_gate, const void* exp_r, const void* b_mag,
                     int64_t capacity, int32_t* idx, void* f, void* pi, int32_t* counts,
                     int32_t* bad, cudaStream_t s) {
  if (B == 0 || F == 0) return;
  const dim3 grid(blocks_for(B * 32, 256));
  auto launch = [&](auto* a) {  // a: a null pointer of the accumulation type
    using A = std::remove_const_t<std::remove_pointer_t<decltype(a)>>;
    const A* c = static_cast<const A*>(centre) + f0;
    const A* g = static_cast<const A*>(b_gate) + f0;
    const A* e = static_cast<const A*>(exp_r) + f0;
    const A* m = static_cast<const A*>(b_mag) + f0;
    const bool vec = F % kEpiRun == 0 && aligned16(z) && aligned16(c) && aligned16(g) &&
                     aligned16(e) && aligned16(m);
    launch_kernel("epilogue_kernel", &epilogue_kernel<A>, grid, dim3(256), 0, s,
                  static_cast<const A*>(z), B, F, f0, static_cast<const A*>(centre),
                  static_cast<const A*>(b_gate), static_cast<const A*>(exp_r),
                  static_cast<const A*>(b_mag), capacity, idx, static_cast<A*>(f),
                  static_cast<A*>(pi), counts, bad, vec);
  };
  if (fp64) launch(static_cast<double*>(nullptr));
  else launch(static_cast<float*>(nullptr));
}

}  // namespace GSAE_CUDA_VARIANT
}  // namespace gsae_fast_cuda
