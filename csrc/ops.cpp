// The kernel ops of the compiled extension, namespace gsae_fast_C. Users never call these: the
// public ops (gsae_fast/ops.py, namespace gsae_fast) carry the autograd, the fake kernels, the
// capacity handling, and choose an executor; these are the "cpu" (and, when built, "cuda")
// executors of that math. Schemas live here; each device's sources register their kernels.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernel_ops.h"

namespace gsae_fast {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec,
    const at::Tensor& b_gate, const at::Tensor& r_mag, const at::Tensor& b_mag,
    int64_t capacity);
std::tuple<at::Tensor, at::Tensor> encode_grad_scatter_cpu(const at::Tensor& x,
                                                           const at::Tensor& b_dec,
                                                           const at::Tensor& idx,
                                                           const at::Tensor& counts,
                                                           const at::Tensor& per_slot,
                                                           int64_t d_sae);
at::Tensor sparse_decode_cpu(const at::Tensor& idx, const at::Tensor& val,
                             const at::Tensor& counts, const at::Tensor& W_dec,
                             const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& val,
    const at::Tensor& counts, const at::Tensor& W_dec, bool need_val, bool need_W_dec,
    bool deterministic);
std::tuple<at::Tensor, at::Tensor> sparse_decode_pair_cpu(
    const at::Tensor& idx, const at::Tensor& val_a, const at::Tensor& val_b,
    const at::Tensor& counts, const at::Tensor& W_dec, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_pair_backward_cpu(
    const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& idx,
    const at::Tensor& val_a, const at::Tensor& val_b, const at::Tensor& counts,
    const at::Tensor& W_dec, bool need_val_a, bool need_val_b, bool need_W_dec, bool W_from_b,
    bool deterministic);
}  // namespace gsae_fast

TORCH_LIBRARY(gsae_fast_C, m) { gsae_fast::define_kernel_ops(m); }

TORCH_LIBRARY_IMPL(gsae_fast_C, CPU, m) {
  m.impl("gated_encode", &gsae_fast::gated_encode_cpu);
  m.impl("encode_grad_scatter", &gsae_fast::encode_grad_scatter_cpu);
  m.impl("sparse_decode", &gsae_fast::sparse_decode_cpu);
  m.impl("sparse_decode_backward", &gsae_fast::sparse_decode_backward_cpu);
  m.impl("sparse_decode_pair", &gsae_fast::sparse_decode_pair_cpu);
  m.impl("sparse_decode_pair_backward", &gsae_fast::sparse_decode_pair_backward_cpu);
}

// Importing gsae_fast._C loads the library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
