// Sparse decode on the CPU: out_t = bias + sum_k val[t, k] W_dec[idx[t, k]] (a gather of
// decoder rows, contiguous along d_in), and its backward:
//   grad_val[t, k] = grad_out_t . W_dec[idx[t, k]]     (0 on padding slots)
//   grad_W_dec[i]  = sum over active (t, k) with idx = i of val[t, k] grad_out_t
// The scatter is done feature by feature from the pairs grouped by feature: deterministic, no
// atomics, every row of grad_W_dec written once (zeros for features nobody used).
#include "common.h"

#include <algorithm>

namespace gsae_fast {
namespace {

void check_decode_inputs(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& counts,
                         const at::Tensor& W_dec, const char* op) {
  check_sparse(idx, counts, op);
  TORCH_CHECK(W_dec.dim() == 2, op, ": W_dec must be [d_sae, d_in], got ", W_dec.sizes());
  TORCH_CHECK(at::isFloatingType(W_dec.scalar_type()), op, ": W_dec must be floating point");
  TORCH_CHECK(val.sizes() == idx.sizes(), op, ": val must have the shape of idx");
  TORCH_CHECK(val.scalar_type() == acc_dtype(W_dec.scalar_type()), op, ": val must have dtype ",
              acc_dtype(W_dec.scalar_type()), " for W_dec of dtype ", W_dec.scalar_type(),
              ", got ", val.scalar_type());
  for (auto [t, name] : {std::pair{&idx, "idx"}, {&val, "val"}, {&counts, "counts"},
                         {&W_dec, "W_dec"}})
    check_cpu_contiguous(*t, op, name);
}

// out_a[t] = sum_k val_a[t, k] W_dec[idx[t, k]] (+ bias), and with kPair out_b likewise from
// val_b (x_hat and the auxiliary reconstruction of the Gated SAE loss): each used row of W_dec is
// read once for both outputs (two accumulators); each output's sums run over k in order.
template <typename scalar_t, typename acc_t, bool kPair>
void decode_impl(const char* op, const at::Tensor& idx_t, const at::Tensor& va_t,
                 const at::Tensor& vb_t, const at::Tensor& counts_t, const at::Tensor& W_dec,
                 const scalar_t* bias, at::Tensor& out_a_t, at::Tensor& out_b_t) {
  const int64_t B = idx_t.size(0), K = idx_t.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const acc_t* va = va_t.data_ptr<acc_t>();
  const acc_t* vb = kPair ? vb_t.data_ptr<acc_t>() : nullptr;
  const scalar_t* W = W_dec.data_ptr<scalar_t>();
  scalar_t* out_a = out_a_t.data_ptr<scalar_t>();
  scalar_t* out_b = kPair ? out_b_t.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B, 16, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc_a(d_in), acc_b(kPair ? d_in : 0);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t d = 0; d < d_in; ++d) {
        acc_a[d] = bias ? static_cast<acc_t>(bias[d]) : acc_t(0);
        if constexpr (kPair) acc_b[d] = acc_a[d];
      }
      const int64_t c = counts[t];
      TORCH_CHECK(c >= 0 && c <= K, op, ": counts[", t, "] = ", c, " is outside [0, ", K, "]");
      for (int64_t k = 0; k < c; ++k) {
        const int64_t i = idx[t * K + k];
        TORCH_CHECK(i >= 0 && i < d_sae, op, ": feature index ", i, " is outside [0, ", d_sae,
                    ")");
        const acc_t a = va[t * K + k];
        const scalar_t* row = W + i * d_in;
        acc_t* __restrict__ pa = acc_a.data();
        if constexpr (kPair) {
          const acc_t b = vb[t * K + k];
          acc_t* __restrict__ pb = acc_b.data();
          for (int64_t d = 0; d < d_in; ++d) {
            const acc_t w = static_cast<acc_t>(row[d]);
            pa[d] += a * w;
            pb[d] += b * w;
          }
        } else {
          for (int64_t d = 0; d < d_in; ++d) pa[d] += a * static_cast<acc_t>(row[d]);
        }
      }
      scalar_t* oa = out_a + t * d_in;
      for (int64_t d = 0; d < d_in; ++d) oa[d] = static_cast<scalar_t>(acc_a[d]);
      if constexpr (kPair) {
        scalar_t* ob = out_b + t * d_in;
        for (int64_t d = 0; d < d_in; ++d) ob[d] = static_cast<scalar_t>(acc_b[d]);
      }
    }
  });
}

// grad_val_a/b[t, k] = grad_a/b_t . W_dec[idx[t, k]] (two dots per read of the row), and
// grad_W_dec[i] = sum over the pairs of i of val_a grad_a_t (+ val_b grad_b_t when W_from_b).
// With grad_W_dec wanted, one pass over the features does it all: row i of W_dec is read once,
// and each of its pairs (t, k) reads the (cache-resident) gradient rows t for the two dots and
// the two accumulations; so each used W_dec row is read once in the backward, whatever the
// number of tokens that use it. Without it, the dots run token by token. The single decode's
// backward is this one without the b side (need_b and W_from_b false).
template <typename scalar_t, typename acc_t>
void decode_pair_backward_impl(const char* op, const at::Tensor& ga_t, const at::Tensor& gb_t,
                               const at::Tensor& idx_t, const at::Tensor& va_t,
                               const at::Tensor& vb_t, const at::Tensor& counts_t,
                               const at::Tensor& W_dec, bool need_a, bool need_b, bool need_W,
                               bool W_from_b, at::Tensor& gva_t, at::Tensor& gvb_t,
                               at::Tensor& gW_t) {
  const int64_t B = idx_t.size(0), K = idx_t.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const acc_t* va = va_t.data_ptr<acc_t>();
  const acc_t* vb = vb_t.data_ptr<acc_t>();
  const scalar_t* W = W_dec.data_ptr<scalar_t>();
  const scalar_t* ga = ga_t.data_ptr<scalar_t>();
  const scalar_t* gb = gb_t.data_ptr<scalar_t>();
  acc_t* gva = need_a ? gva_t.data_ptr<acc_t>() : nullptr;
  acc_t* gvb = need_b ? gvb_t.data_ptr<acc_t>() : nullptr;
  if (need_W) {
    const FeatureGroups groups = group_by_feature(idx, counts, B, K, d_sae, op);
    // Padding slots keep 0; every active slot is written by the pass below.
    if (gva) std::fill(gva, gva + B * K, acc_t(0));
    if (gvb) std::fill(gvb, gvb + B * K, acc_t(0));
    scalar_t* gW = gW_t.data_ptr<scalar_t>();
    at::parallel_for(0, d_sae, 64, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> acc_a(d_in), acc_b(d_in), w(d_in);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(acc_a.begin(), acc_a.end(), acc_t(0));
        std::fill(acc_b.begin(), acc_b.end(), acc_t(0));
        const int64_t p0 = groups.col_ptr[i], p1 = groups.col_ptr[i + 1];
        if (p0 < p1 && (gva || gvb)) {
          const scalar_t* row = W + i * d_in;
          for (int64_t d = 0; d < d_in; ++d) w[d] = static_cast<acc_t>(row[d]);
        }
        acc_t* __restrict__ pa = acc_a.data();
        acc_t* __restrict__ pb = acc_b.data();
        const acc_t* __restrict__ pw = w.data();
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t e = groups.entries[p];
          const scalar_t* g = ga + (e / K) * d_in;
          const scalar_t* h = gb + (e / K) * d_in;
          const acc_t a = va[e], b = W_from_b ? vb[e] : acc_t(0);
          if (gva) {
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < d_in; ++d) dot += static_cast<acc_t>(g[d]) * pw[d];
            gva[e] = dot;
          }
          if (gvb) {
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < d_in; ++d) dot += static_cast<acc_t>(h[d]) * pw[d];
            gvb[e] = dot;
          }
          for (int64_t d = 0; d < d_in; ++d) pa[d] += a * static_cast<acc_t>(g[d]);
          if (W_from_b)
            for (int64_t d = 0; d < d_in; ++d) pb[d] += b * static_cast<acc_t>(h[d]);
        }
        scalar_t* o = gW + i * d_in;
        if (W_from_b) {  // each path rounded to the storage dtype, then added (as two backwards)
          for (int64_t d = 0; d < d_in; ++d)
            o[d] = static_cast<scalar_t>(static_cast<scalar_t>(acc_a[d]) +
                                         static_cast<scalar_t>(acc_b[d]));
        } else {
          for (int64_t d = 0; d < d_in; ++d) o[d] = static_cast<scalar_t>(acc_a[d]);
        }
      }
    });
    return;
  }
  if (!need_a && !need_b) return;
  // The dots token by token: both from one read of each row, or the one wanted.
  const bool both = need_a && need_b;
  const scalar_t* g1 = need_a ? ga : gb;
  acc_t* out1 = need_a ? gva : gvb;
  at::parallel_for(0, B, 16, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> g_a(d_in), g_b(both ? d_in : 0);  // the gradients widened once per row
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t d = 0; d < d_in; ++d) {
        g_a[d] = static_cast<acc_t>(g1[t * d_in + d]);
        if (both) g_b[d] = static_cast<acc_t>(gb[t * d_in + d]);
      }
      const int64_t c = counts[t];
      TORCH_CHECK(c >= 0 && c <= K, op, ": counts[", t, "] = ", c, " is outside [0, ", K, "]");
      const acc_t* pa = g_a.data();
      const acc_t* pb = g_b.data();
      for (int64_t k = 0; k < K; ++k) {
        acc_t dot_a = 0, dot_b = 0;
        if (k < c) {
          const int64_t i = idx[t * K + k];
          TORCH_CHECK(i >= 0 && i < d_sae, op, ": feature index ", i, " is outside [0, ", d_sae,
                      ")");
          const scalar_t* row = W + i * d_in;
          if (both) {
#pragma omp simd reduction(+ : dot_a, dot_b)
            for (int64_t d = 0; d < d_in; ++d) {
              const acc_t w = static_cast<acc_t>(row[d]);
              dot_a += pa[d] * w;
              dot_b += pb[d] * w;
            }
          } else {
#pragma omp simd reduction(+ : dot_a)  // lets the compiler reorder the sum into vector lanes
            for (int64_t d = 0; d < d_in; ++d) dot_a += pa[d] * static_cast<acc_t>(row[d]);
          }
        }
        out1[t * K + k] = dot_a;
        if (both) gvb[t * K + k] = dot_b;
      }
    }
  });
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& idx, const at::Tensor& val,
                             const at::Tensor& counts, const at::Tensor& W_dec,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "gsae_fast.sparse_decode";
  at::AutoDispatchBelowADInplaceOrView guard;  // inner ATen calls skip autograd
  check_decode_inputs(idx, val, counts, W_dec, op);
  const int64_t B = idx.size(0), d_in = W_dec.size(1);
  if (bias) {
    check_cpu_contiguous(*bias, op, "bias");
    check_vector(*bias, d_in, W_dec.scalar_type(), op, "bias");
  }
  at::Tensor out = at::empty({B, d_in}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(),
                                  "sparse_decode_cpu", [&] {
    decode_impl<scalar_t, at::opmath_type<scalar_t>, false>(
        op, idx, val, val, counts, W_dec, bias ? bias->data_ptr<scalar_t>() : nullptr, out, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& val,
    const at::Tensor& counts, const at::Tensor& W_dec, bool need_val, bool need_W_dec,
    bool /*deterministic: always (grouped by feature)*/) {
  const char* op = "gsae_fast.sparse_decode_backward";
  at::AutoDispatchBelowADInplaceOrView guard;  // inner ATen calls skip autograd
  check_decode_inputs(idx, val, counts, W_dec, op);
  check_cpu_contiguous(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == idx.size(0) &&
                  grad_out.size(1) == W_dec.size(1),
              op, ": grad_out must be [B, d_in]");
  TORCH_CHECK(grad_out.scalar_type() == W_dec.scalar_type(), op,
              ": grad_out must have the dtype of W_dec");
  at::Tensor gval = need_val ? at::empty(idx.sizes(), val.options()) : at::empty({0}, val.options());
  at::Tensor gW = need_W_dec ? at::empty(W_dec.sizes(), W_dec.options())
                             : at::empty({0}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(),
                                  "sparse_decode_backward_cpu", [&] {
    // the pair's backward with one path: the single decode is the pair without its b side
    at::Tensor none = at::empty({0}, val.options());
    decode_pair_backward_impl<scalar_t, at::opmath_type<scalar_t>>(
        op, grad_out, grad_out, idx, val, val, counts, W_dec, need_val, false, need_W_dec, false,
        gval, none, gW);
  });
  return {gval, gW};
}

}  // namespace gsae_fast

namespace gsae_fast {

std::tuple<at::Tensor, at::Tensor> sparse_decode_pair_cpu(
    const at::Tensor& idx, const at::Tensor& val_a, const at::Tensor& val_b,
    const at::Tensor& counts, const at::Tensor& W_dec, const std::optional<at::Tensor>& bias) {
  const char* op = "gsae_fast.sparse_decode_pair";
  at::AutoDispatchBelowADInplaceOrView guard;
  check_decode_inputs(idx, val_a, counts, W_dec, op);
  check_decode_inputs(idx, val_b, counts, W_dec, op);
  const int64_t B = idx.size(0), d_in = W_dec.size(1);
  if (bias) {
    check_cpu_contiguous(*bias, op, "bias");
    check_vector(*bias, d_in, W_dec.scalar_type(), op, "bias");
  }
  at::Tensor out_a = at::empty({B, d_in}, W_dec.options());
  at::Tensor out_b = at::empty({B, d_in}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(),
                                  "sparse_decode_pair_cpu", [&] {
    decode_impl<scalar_t, at::opmath_type<scalar_t>, true>(
        op, idx, val_a, val_b, counts, W_dec, bias ? bias->data_ptr<scalar_t>() : nullptr, out_a,
        out_b);
  });
  return {out_a, out_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_pair_backward_cpu(
    const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& idx,
    const at::Tensor& val_a, const at::Tensor& val_b, const at::Tensor& counts,
    const at::Tensor& W_dec, bool need_val_a, bool need_val_b, bool need_W_dec, bool W_from_b,
    bool /*deterministic: always (grouped by feature)*/) {
  const char* op = "gsae_fast.sparse_decode_pair_backward";
  at::AutoDispatchBelowADInplaceOrView guard;
  check_decode_inputs(idx, val_a, counts, W_dec, op);
  check_decode_inputs(idx, val_b, counts, W_dec, op);
  for (auto [t, name] : {std::pair{&grad_a, "grad_a"}, {&grad_b, "grad_b"}}) {
    check_cpu_contiguous(*t, op, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == idx.size(0) && t->size(1) == W_dec.size(1), op,
                ": ", name, " must be [B, d_in]");
    TORCH_CHECK(t->scalar_type() == W_dec.scalar_type(), op, ": ", name,
                " must have the dtype of W_dec");
  }
  auto empty_v = [&] { return at::empty({0}, val_a.options()); };
  at::Tensor gva = need_val_a ? at::empty(idx.sizes(), val_a.options()) : empty_v();
  at::Tensor gvb = need_val_b ? at::empty(idx.sizes(), val_b.options()) : empty_v();
  at::Tensor gW = need_W_dec ? at::empty(W_dec.sizes(), W_dec.options())
                             : at::empty({0}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(),
                                  "sparse_decode_pair_backward_cpu", [&] {
    decode_pair_backward_impl<scalar_t, at::opmath_type<scalar_t>>(
        op, grad_a, grad_b, idx, val_a, val_b, counts, W_dec, need_val_a, need_val_b, need_W_dec,
        W_from_b, gva, gvb, gW);
  });
  return {gva, gvb, gW};
}

}  // namespace gsae_fast
