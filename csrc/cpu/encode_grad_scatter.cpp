// The one kernel of the encoder's backward on the CPU (the rest of the math is gsae_fast/ops.py's
// gated_encode_backward, on [B, K] and [d_sae] tensors). Per active slot (t, k), feature
// i = idx[t, k], with per_slot [C, B, K] (row 0: dz):
//   dW_enc[:, i] += (x_t - b_dec) * per_slot[0, t, k]      sums[c, i] += per_slot[c, t, k]
// grad W_enc is built feature by feature from the pairs grouped by feature (deterministic, no
// atomics: on a CPU also the fastest) in blocks of kBlock columns, written transposed into
// W_enc's [d_in, d_sae] layout and its dtype, in cache-line sized runs.
#include "common.h"

#include <algorithm>

namespace gsae_fast {
namespace {

constexpr int64_t kBlock = 32;

template <typename scalar_t, typename acc_t>
void encode_grad_scatter_impl(const at::Tensor& xc, const at::Tensor& idx_t,
                              const at::Tensor& counts_t, const at::Tensor& per_slot_t,
                              int64_t d_sae, at::Tensor& dW, at::Tensor& sums_t) {
  const char* op = "gsae_fast.encode_grad_scatter";
  const int64_t B = xc.size(0), d_in = xc.size(1), K = idx_t.size(1), C = per_slot_t.size(0);
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const acc_t* per_slot = per_slot_t.data_ptr<acc_t>();
  const acc_t* dz = per_slot;  // row 0
  const acc_t* x = xc.data_ptr<acc_t>();
  scalar_t* dWp = dW.data_ptr<scalar_t>();
  acc_t* sums = sums_t.data_ptr<acc_t>();

  const FeatureGroups groups = group_by_feature(idx, counts, B, K, d_sae, op);
  at::parallel_for(0, (d_sae + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> col(kBlock * d_in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, n = std::min(kBlock, d_sae - i0);
      std::fill(col.begin(), col.end(), acc_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        acc_t* cj = col.data() + j * d_in;
        for (int64_t p = groups.col_ptr[i]; p < groups.col_ptr[i + 1]; ++p) {
          const int64_t e = groups.entries[p];
          const acc_t w = dz[e];
          const acc_t* xt = x + (e / K) * d_in;
          for (int64_t d = 0; d < d_in; ++d) cj[d] += w * xt[d];
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* v = per_slot + c * B * K;
          acc_t s = 0;
          for (int64_t p = groups.col_ptr[i]; p < groups.col_ptr[i + 1]; ++p)
            s += v[groups.entries[p]];
          sums[c * d_sae + i] = s;
        }
      }
      for (int64_t d = 0; d < d_in; ++d)
        for (int64_t j = 0; j < n; ++j)
          dWp[d * d_sae + i0 + j] = static_cast<scalar_t>(col[j * d_in + d]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> encode_grad_scatter_cpu(const at::Tensor& x,
                                                           const at::Tensor& b_dec,
                                                           const at::Tensor& idx,
                                                           const at::Tensor& counts,
                                                           const at::Tensor& per_slot,
                                                           int64_t d_sae) {
  const char* op = "gsae_fast.encode_grad_scatter";
  at::AutoDispatchBelowADInplaceOrView guard;  // inner ATen calls skip autograd
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in], got ", x.sizes());
  TORCH_CHECK(d_sae >= 0, op, ": d_sae must be >= 0");
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(dtype);
  const int64_t B = x.size(0), d_in = x.size(1);
  check_sparse(idx, counts, op);
  TORCH_CHECK(idx.size(0) == B, op, ": idx has ", idx.size(0), " rows, x has ", B);
  for (auto [t, name] : {std::pair{&x, "x"}, {&b_dec, "b_dec"}, {&idx, "idx"},
                         {&counts, "counts"}, {&per_slot, "per_slot"}})
    check_cpu_contiguous(*t, op, name);
  TORCH_CHECK(per_slot.dim() == 3 && per_slot.size(0) >= 1 && per_slot.size(1) == B &&
                  per_slot.size(2) == idx.size(1),
              op, ": per_slot must be [C, B, K] with C >= 1, got ", per_slot.sizes());
  TORCH_CHECK(per_slot.scalar_type() == acc, op, ": per_slot must have dtype ", acc);
  check_vector(b_dec, d_in, dtype, op, "b_dec");

  at::Tensor dW = at::empty({d_in, d_sae}, x.options());
  at::Tensor sums = at::empty({per_slot.size(0), d_sae}, x.options().dtype(acc));
  const at::Tensor xc = (x.to(acc) - b_dec.to(acc)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "encode_grad_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    encode_grad_scatter_impl<scalar_t, acc_t>(xc, idx, counts, per_slot, d_sae, dW, sums);
  });
  return {dW, sums};
}

}  // namespace gsae_fast
