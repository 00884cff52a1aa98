// The schemas of the kernel ops, one definition for every library that implements them:
// gsae_fast_C (the "cpu" and "cuda" executors, csrc/ops.cpp) and gsae_fast_emu (the emulated
// CUDA executor, csrc/emu/ops_emu.cpp). Users never call these: gsae_fast/ops.py does.
// `deterministic`: scatter the decoder gradient in a fixed order (gsae_fast.backends.set_scatter);
// executors that always do (the CPU's) ignore it.
#pragma once
#include <torch/library.h>

namespace gsae_fast {

inline void define_kernel_ops(torch::Library& m) {
  m.def(
      "gated_encode(Tensor x, Tensor W_enc, Tensor b_dec, Tensor b_gate, Tensor r_mag, "
      "Tensor b_mag, int capacity) -> (Tensor f, Tensor pi_gate, Tensor idx, Tensor counts, "
      "Tensor status)");
  // The encoder's backward kernel (gsae_fast/ops.py does the per-slot and per-feature math):
  // grad W_enc [d_in, d_sae] (x's dtype) and the per-feature sums [C, d_sae] of per_slot [C, B, K].
  m.def(
      "encode_grad_scatter(Tensor x, Tensor b_dec, Tensor idx, Tensor counts, Tensor per_slot, "
      "int d_sae) -> (Tensor grad_W_enc, Tensor sums)");
  m.def(
      "sparse_decode(Tensor idx, Tensor val, Tensor counts, Tensor W_dec, Tensor? bias) -> "
      "Tensor");
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor idx, Tensor val, Tensor counts, "
      "Tensor W_dec, bool need_val, bool need_W_dec, bool deterministic) -> (Tensor, Tensor)");
  // x_hat and the auxiliary reconstruction: two value sets over the same slots, one gather.
  m.def(
      "sparse_decode_pair(Tensor idx, Tensor val_a, Tensor val_b, Tensor counts, Tensor W_dec, "
      "Tensor? bias) -> (Tensor, Tensor)");
  m.def(
      "sparse_decode_pair_backward(Tensor grad_a, Tensor grad_b, Tensor idx, Tensor val_a, "
      "Tensor val_b, Tensor counts, Tensor W_dec, bool need_val_a, bool need_val_b, "
      "bool need_W_dec, bool W_from_b, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

}  // namespace gsae_fast
