// The "cuda" executor: host side of the six kernel ops on CUDA tensors (shape, dtype, device
// checks; torch ops for the GEMMs, sorts and small vectors; the kernels of kernels.cu for the
// rest). Same contract as the CPU ops (csrc/cpu) and gsae_fast/torch_executor.py.
//
// Fused encode, CUDA flavour: the encoder GEMM runs on cuBLAS (at::mm, fp32 output for bf16 /
// fp16 inputs) over blocks of features small enough that a [B, block] fp32 tile stays small
// (ENCODE_BLOCK_ELEMS), each followed by the epilogue kernel that gates and compacts the block;
// no [B, d_sae] tensor is allocated.
//
// This host code is built twice: for the GPU, and (GSAE_FAST_CUDA_EMULATED, csrc/emu/ops_emu.cpp)
// on CPU tensors with the kernels run by the emulator, as the "cuda_emulated" executor. The two
// differ only in what is below under that macro: the device checks, guard and stream, and the
// GEMM's output dtype; the launch logic is one.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <initializer_list>
#include <tuple>

#include "cuda/kernels.h"

#if defined(GSAE_FAST_CUDA_EMULATED)
#define GSAE_OP(name) "gsae_fast_emu::" name " (cuda_emulated)"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (not ATen/cuda/CUDAContext.h: it needs the cuSPARSE headers)
#define GSAE_OP(name) "gsae_fast_C::" name " (cuda)"
#endif

namespace gsae_fast {
inline namespace GSAE_CUDA_VARIANT {
namespace {

#if defined(GSAE_FAST_CUDA_EMULATED)
struct DeviceGuard {  // CPU tensors: nothing to make current (ops_emu.cpp guards the memory)
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kTensorKind = "CPU tensor (the emulated CUDA executor)";
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kTensorKind = "CUDA tensor";
#endif

using gsae_fast_cuda::DType;

// z block: 32 MiB in fp32, so that the epilogue reads it from L2 (50 MB on an H100 / H200) where
// the GEMM just wrote it, rather than from HBM; blocks stay >= 2048 features at B = 4096, large
// enough for cuBLAS to run at full speed.
constexpr int64_t ENCODE_BLOCK_ELEMS = int64_t(1) << 23;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

DType dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
  return DType::F32;
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a ", kTensorKind, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

void check_sparse(const at::Tensor& idx, const at::Tensor& counts, const at::Tensor& val,
                  const char* op) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kInt, op, ": idx must be int32 [B, K]");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == idx.size(0) &&
                  counts.scalar_type() == at::kInt,
              op, ": counts must be int32 [B]");
  TORCH_CHECK(val.sizes() == idx.sizes(), op, ": values must have idx's shape ", idx.sizes());
}

// z = a @ b in the accumulation dtype: bf16 / fp16 products accumulate and land in fp32.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf) {
#if (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)) && \
    !defined(GSAE_FAST_CUDA_EMULATED)  // (mm with an output dtype is CUDA-only)
    return at::mm(a, b, at::kFloat);
#else
    return at::mm(a.to(at::kFloat), b.to(at::kFloat));
#endif
  }
  return at::mm(a, b);
}

// The active (row, slot) pairs grouped by feature: ptr [d_sae + 1] (int64 offsets), the pairs'
// flat positions b * K + k in feature order (stable: rows increasing within a feature), rows.
struct Groups {
  at::Tensor ptr, pos, rows;
};

Groups group_by_feature(const at::Tensor& idx, const at::Tensor& counts, int64_t d_sae) {
  const int64_t K = idx.size(1);
  auto mask = at::arange(K, idx.options().dtype(at::kLong)).unsqueeze(0) <
              counts.to(at::kLong).unsqueeze(1);
  // Padding slots get key d_sae and sort last; no nonzero/bincount, so no host sync.
  auto keys = at::where(mask, idx.to(at::kLong), d_sae).flatten();
  auto sorted = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto pos = std::get<1>(sorted);
  auto ptr = at::searchsorted(std::get<0>(sorted), at::arange(d_sae + 1, pos.options()));
  return {ptr, pos, at::floor_divide(pos, K)};
}

// grad W_dec [d_sae, d_in] in W's dtype: val [rows, K] * src [rows, d_in] (A) scattered to the
// rows idx; grouped by feature (fixed order, written in W's dtype) or with atomics (fp32, then
// converted), as the caller says.
at::Tensor scatter_grad_W(const char* op, const at::Tensor& src, const at::Tensor& idx,
                          const at::Tensor& counts, const at::Tensor& val, const at::Tensor& W,
                          bool deterministic, cudaStream_t stream) {
  const int64_t d_sae = W.size(0), d_in = W.size(1);
  at::Tensor out;
  if (deterministic) {
    Groups g = group_by_feature(idx, counts, d_sae);
    auto vals = val.flatten().index_select(0, g.pos).contiguous();
    out = at::empty({d_sae, d_in}, W.options());
    gsae_fast_cuda::launch_segment_scatter(dtype_code(W.scalar_type(), op),
                                           g.ptr.data_ptr<int64_t>(), g.rows.data_ptr<int64_t>(),
                                           vals.data_ptr(), src.data_ptr(), out.data_ptr(), d_sae,
                                           d_in, stream);
  } else {
    out = at::zeros({d_sae, d_in}, src.options());
    gsae_fast_cuda::launch_atomic_scatter(src.scalar_type() == at::kDouble,
                                          idx.data_ptr<int32_t>(), val.data_ptr(),
                                          counts.data_ptr<int32_t>(), src.data_ptr(),
                                          out.data_ptr(), idx.size(0), idx.size(1), d_in, stream);
  }
  check_launch(op);
  return out.to(W.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_encode_cuda(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec,
    const at::Tensor& b_gate, const at::Tensor& r_mag, const at::Tensor& b_mag,
    int64_t capacity) {
  const char* op = GSAE_OP("gated_encode");
  for (auto* t : {&x, &W_enc, &b_dec, &b_gate, &r_mag, &b_mag}) check_cuda(*t, op, "input");
  TORCH_CHECK(x.dim() == 2 && W_enc.dim() == 2 && x.size(1) == W_enc.size(0), op,
              ": x must be [B, d_in] and W_enc [d_in, d_sae]");
  TORCH_CHECK(capacity >= 0, op, ": capacity must be >= 0");
  TORCH_CHECK(W_enc.scalar_type() == x.scalar_type() && b_dec.scalar_type() == x.scalar_type(),
              op, ": x, W_enc and b_dec must share one dtype");
  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), d_sae = W_enc.size(1);
  const auto acc = acc_of(x.scalar_type());
  const bool fp64 = acc == at::kDouble;
  auto opts = x.options();
  auto idx = at::zeros({B, capacity}, opts.dtype(at::kInt));
  auto f = at::zeros({B, capacity}, opts.dtype(acc));
  auto pi = at::zeros({B, capacity}, opts.dtype(acc));
  auto counts = at::zeros({B}, opts.dtype(at::kInt));
  auto bad = at::zeros({1}, opts.dtype(at::kInt));
  // Centring folded in: z = x @ W - b_dec @ W (x read as it is; bf16 products exact in fp32).
  auto centre = mm_acc(b_dec.unsqueeze(0), W_enc).squeeze(0).contiguous();
  auto bg = b_gate.to(acc).contiguous(), er = r_mag.to(acc).exp().contiguous(),
       bm = b_mag.to(acc).contiguous();
  const int64_t block = std::max<int64_t>(
      128, std::min<int64_t>(d_sae, ENCODE_BLOCK_ELEMS / std::max<int64_t>(B, 1)) / 128 * 128);
  auto stream = current_stream();
  for (int64_t f0 = 0; f0 < d_sae && B > 0; f0 += block) {
    const int64_t F = std::min(block, d_sae - f0);
    auto z = mm_acc(x, W_enc.narrow(1, f0, F)).contiguous();  // centred in the epilogue
    gsae_fast_cuda::launch_epilogue(fp64, z.data_ptr(), B, F, f0, centre.data_ptr(),
                                    bg.data_ptr(), er.data_ptr(),
                                    bm.data_ptr(), capacity, idx.data_ptr<int32_t>(),
                                    f.data_ptr(), pi.data_ptr(), counts.data_ptr<int32_t>(),
                                    bad.data_ptr<int32_t>(), stream);
    check_launch(op);
  }
  auto max_count = B > 0 ? counts.max().reshape({1}) : at::zeros({1}, opts.dtype(at::kInt));
  auto status = at::cat({max_count.to(at::kInt), bad});
  return {f, pi, idx, counts, status};
}

// The encoder's backward kernel: grad W_enc written transposed in x's dtype straight from the
// pairs grouped by feature, and the per-feature sums of per_slot (ops.py does the rest).
std::tuple<at::Tensor, at::Tensor> encode_grad_scatter_cuda(const at::Tensor& x,
                                                            const at::Tensor& b_dec,
                                                            const at::Tensor& idx,
                                                            const at::Tensor& counts,
                                                            const at::Tensor& per_slot,
                                                            int64_t d_sae) {
  const char* op = GSAE_OP("encode_grad_scatter");
  for (auto* t : {&x, &b_dec, &idx, &counts, &per_slot}) check_cuda(*t, op, "input");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in]");
  TORCH_CHECK(d_sae >= 0, op, ": d_sae must be >= 0");
  const int64_t B = x.size(0), d_in = x.size(1);
  const auto dt = x.scalar_type();
  const auto acc = acc_of(dt);
  TORCH_CHECK(b_dec.dim() == 1 && b_dec.size(0) == d_in && b_dec.scalar_type() == dt, op,
              ": b_dec must be [d_in] in x's dtype");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B, op, ": idx must be [B, K] with x's B");
  TORCH_CHECK(per_slot.dim() == 3 && per_slot.size(0) >= 1 && per_slot.size(0) <= 8 &&
                  per_slot.scalar_type() == acc,
              op, ": per_slot must be [C, B, K] (1 <= C <= 8) of ", acc);
  check_sparse(idx, counts, per_slot[0], op);
  const DeviceGuard guard(x.device());
  const int64_t C = per_slot.size(0);
  Groups g = group_by_feature(idx, counts, d_sae);
  // The per-slot values in feature order; row 0 (dz) weighs the scatter.
  auto sorted = per_slot.reshape({C, -1}).index_select(1, g.pos).contiguous();
  auto xc = (x.to(acc) - b_dec.to(acc)).contiguous();
  auto grad_W = at::empty({d_in, d_sae}, x.options());
  auto sums = at::empty({C, d_sae}, per_slot.options());
  gsae_fast_cuda::launch_segment_scatter_t(dtype_code(dt, op), g.ptr.data_ptr<int64_t>(),
                                           g.rows.data_ptr<int64_t>(), sorted.data_ptr(),
                                           xc.data_ptr(), grad_W.data_ptr(), d_sae, d_in,
                                           sorted.data_ptr(), sums.data_ptr(),
                                           static_cast<int>(C), g.pos.size(0), current_stream());
  check_launch(op);
  return {grad_W, sums};
}

namespace {
// The checks of a decode of value sets `vals` (one, or the pair's two) through W_dec, and its bias
// in the accumulation dtype (undefined without one).
at::Tensor check_decode(const char* op, const at::Tensor& idx, const at::Tensor& counts,
                        std::initializer_list<const at::Tensor*> vals, const at::Tensor& W_dec,
                        const std::optional<at::Tensor>& bias) {
  for (auto* t : {&idx, &counts, &W_dec}) check_cuda(*t, op, "input");
  const auto acc = acc_of(W_dec.scalar_type());
  for (auto* v : vals) {
    check_cuda(*v, op, "values");
    check_sparse(idx, counts, *v, op);
    TORCH_CHECK(v->scalar_type() == acc, op, ": values must be ", acc);
  }
  TORCH_CHECK(W_dec.dim() == 2, op, ": W_dec must be [d_sae, d_in]");
  TORCH_CHECK(!bias.has_value() || bias->numel() == W_dec.size(1), op, ": bias must be [d_in]");
  if (!bias.has_value()) return at::Tensor();
  check_cuda(*bias, op, "bias");
  return bias->to(acc).contiguous();
}
}  // namespace

at::Tensor sparse_decode_cuda(const at::Tensor& idx, const at::Tensor& val,
                              const at::Tensor& counts, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& bias) {
  const char* op = GSAE_OP("sparse_decode");
  const at::Tensor b = check_decode(op, idx, counts, {&val}, W_dec, bias);
  const DeviceGuard guard(W_dec.device());
  const int64_t B = idx.size(0), K = idx.size(1), d_in = W_dec.size(1);
  auto out = at::empty({B, d_in}, W_dec.options());
  gsae_fast_cuda::launch_decode(dtype_code(W_dec.scalar_type(), op), false,
                                idx.data_ptr<int32_t>(), val.data_ptr(), nullptr,
                                counts.data_ptr<int32_t>(), W_dec.data_ptr(),
                                b.defined() ? b.data_ptr() : nullptr,
                                out.data_ptr(), nullptr, B, K, d_in, current_stream());
  check_launch(op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& val,
    const at::Tensor& counts, const at::Tensor& W_dec, bool need_val, bool need_W_dec,
    bool deterministic) {
  const char* op = GSAE_OP("sparse_decode_backward");
  for (auto* t : {&grad_out, &idx, &val, &counts, &W_dec}) check_cuda(*t, op, "input");
  check_sparse(idx, counts, val, op);
  const auto acc = acc_of(W_dec.scalar_type());
  TORCH_CHECK(val.scalar_type() == acc, op, ": values must be ", acc);
  const int64_t B = idx.size(0), K = idx.size(1), d_in = W_dec.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == d_in, op,
              ": grad_out must be [B, d_in]");
  const DeviceGuard guard(W_dec.device());
  auto stream = current_stream();
  auto g = grad_out.to(acc).contiguous();
  at::Tensor grad_val = at::empty({0}, val.options());
  if (need_val) {
    grad_val = at::empty_like(val);
    gsae_fast_cuda::launch_slot_dot(dtype_code(W_dec.scalar_type(), op), false, g.data_ptr(),
                                    nullptr, idx.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                    W_dec.data_ptr(), grad_val.data_ptr(), nullptr, B, K, d_in,
                                    stream);
    check_launch(op);
  }
  at::Tensor grad_W = at::empty({0}, W_dec.options());
  if (need_W_dec) grad_W = scatter_grad_W(op, g, idx, counts, val, W_dec, deterministic, stream);
  return {grad_val, grad_W};
}

// x_hat and the auxiliary reconstruction (two value sets over the same slots): one gather of each
// used W_dec row for both outputs, and one for both value gradients in the backward.
std::tuple<at::Tensor, at::Tensor> sparse_decode_pair_cuda(
    const at::Tensor& idx, const at::Tensor& val_a, const at::Tensor& val_b,
    const at::Tensor& counts, const at::Tensor& W_dec, const std::optional<at::Tensor>& bias) {
  const char* op = GSAE_OP("sparse_decode_pair");
  const at::Tensor b = check_decode(op, idx, counts, {&val_a, &val_b}, W_dec, bias);
  const DeviceGuard guard(W_dec.device());
  const int64_t B = idx.size(0), K = idx.size(1), d_in = W_dec.size(1);
  auto out_a = at::empty({B, d_in}, W_dec.options());
  auto out_b = at::empty({B, d_in}, W_dec.options());
  gsae_fast_cuda::launch_decode(dtype_code(W_dec.scalar_type(), op), true,
                                idx.data_ptr<int32_t>(), val_a.data_ptr(), val_b.data_ptr(),
                                counts.data_ptr<int32_t>(), W_dec.data_ptr(),
                                b.defined() ? b.data_ptr() : nullptr,
                                out_a.data_ptr(), out_b.data_ptr(), B, K, d_in,
                                current_stream());
  check_launch(op);
  return {out_a, out_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_pair_backward_cuda(
    const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& idx,
    const at::Tensor& val_a, const at::Tensor& val_b, const at::Tensor& counts,
    const at::Tensor& W_dec, bool need_val_a, bool need_val_b, bool need_W_dec, bool W_from_b,
    bool deterministic) {
  const char* op = GSAE_OP("sparse_decode_pair_backward");
  for (auto* t : {&grad_a, &grad_b, &idx, &val_a, &val_b, &counts, &W_dec})
    check_cuda(*t, op, "input");
  check_sparse(idx, counts, val_a, op);
  check_sparse(idx, counts, val_b, op);
  const auto acc = acc_of(W_dec.scalar_type());
  TORCH_CHECK(val_a.scalar_type() == acc && val_b.scalar_type() == acc, op,
              ": values must be ", acc);
  const int64_t B = idx.size(0), K = idx.size(1), d_in = W_dec.size(1);
  for (auto* t : {&grad_a, &grad_b})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == d_in, op,
                ": grad_a and grad_b must be [B, d_in]");
  const DeviceGuard guard(W_dec.device());
  auto stream = current_stream();
  auto ga = grad_a.to(acc).contiguous();
  auto gb = grad_b.to(acc).contiguous();
  const auto dt = dtype_code(W_dec.scalar_type(), op);
  at::Tensor gva = need_val_a ? at::empty_like(val_a) : at::empty({0}, val_a.options());
  at::Tensor gvb = need_val_b ? at::empty_like(val_b) : at::empty({0}, val_b.options());
  if (need_val_a || need_val_b) {  // one read of each row for the one or two dots wanted
    const bool both = need_val_a && need_val_b;
    gsae_fast_cuda::launch_slot_dot(dt, both, need_val_a ? ga.data_ptr() : gb.data_ptr(),
                                    both ? gb.data_ptr() : nullptr, idx.data_ptr<int32_t>(),
                                    counts.data_ptr<int32_t>(), W_dec.data_ptr(),
                                    need_val_a ? gva.data_ptr() : gvb.data_ptr(),
                                    both ? gvb.data_ptr() : nullptr, B, K, d_in, stream);
    check_launch(op);
  }
  at::Tensor grad_W = at::empty({0}, W_dec.options());
  if (need_W_dec) {
    // Both paths as one scatter over the stacked rows [grad_a; grad_b] (the pairs of the b path
    // are those of the a path, B rows further on).
    auto sidx = W_from_b ? at::cat({idx, idx}) : idx;
    auto scounts = W_from_b ? at::cat({counts, counts}) : counts;
    auto sval = W_from_b ? at::cat({val_a, val_b}).contiguous() : val_a;
    auto src = W_from_b ? at::cat({ga, gb}).contiguous() : ga;
    grad_W = scatter_grad_W(op, src, sidx, scounts, sval, W_dec, deterministic, stream);
  }
  return {gva, gvb, grad_W};
}

}  // namespace GSAE_CUDA_VARIANT
}  // namespace gsae_fast

#if !defined(GSAE_FAST_CUDA_EMULATED)  // the emulated build registers in csrc/emu/ops_emu.cpp
TORCH_LIBRARY_IMPL(gsae_fast_C, CUDA, m) {
  m.impl("gated_encode", &gsae_fast::gated_encode_cuda);
  m.impl("encode_grad_scatter", &gsae_fast::encode_grad_scatter_cuda);
  m.impl("sparse_decode", &gsae_fast::sparse_decode_cuda);
  m.impl("sparse_decode_backward", &gsae_fast::sparse_decode_backward_cuda);
  m.impl("sparse_decode_pair", &gsae_fast::sparse_decode_pair_cuda);
  m.impl("sparse_decode_pair_backward", &gsae_fast::sparse_decode_pair_backward_cuda);
}
#endif
