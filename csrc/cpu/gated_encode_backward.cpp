// Backward of the gated encode, on the active set only (DESIGN.md "Every gradient lives on the
// active set"). Inputs are the gradients of the two differentiable outputs, f and pi_gate, at the
// active slots. Per active (t, i):
//   dpi_mag = grad_f * 1[f > 0]          dz = grad_pi_gate + exp(r_mag_i) * dpi_mag
//   dW_enc[:, i] += (x_t - b_dec) dz     db_gate_i += grad_pi_gate     db_mag_i += dpi_mag
//   dr_mag_i += dpi_mag * exp(r_mag_i) * z        (z = pi_gate - b_gate_i)
//   db_dec = -W_enc @ (sum_t dz[t, :])   dx_t = sum_i dz[t, i] W_enc[:, i]
// grad W_enc is built feature by feature from the pairs grouped by feature (deterministic, no
// atomics) in blocks of kBlock columns, written back transposed in cache-line sized runs.
#include "common.h"

#include <algorithm>

namespace gsae_fast {
namespace {

constexpr int64_t kBlock = 32;

template <typename scalar_t, typename acc_t>
void encode_backward_impl(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_gate,
                          const at::Tensor& exp_r, const at::Tensor& idx_t, const at::Tensor& f_t,
                          const at::Tensor& pi_t, const at::Tensor& counts_t,
                          const at::Tensor& grad_f_t, const at::Tensor& grad_pi_t, bool need_x,
                          at::Tensor& dx, at::Tensor& dW, at::Tensor& db_dec, at::Tensor& db_gate,
                          at::Tensor& dr_mag, at::Tensor& db_mag) {
  const char* op = "gsae_fast.gated_encode_backward";
  at::AutoDispatchBelowADInplaceOrView guard;  // inner ATen calls skip autograd
  const int64_t B = xc.size(0), d_in = xc.size(1), d_sae = W_enc.size(1), K = idx_t.size(1);
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const acc_t* f = f_t.data_ptr<acc_t>();
  const acc_t* pi = pi_t.data_ptr<acc_t>();
  const acc_t* gf = grad_f_t.data_ptr<acc_t>();
  const acc_t* gp = grad_pi_t.data_ptr<acc_t>();
  const acc_t* er = exp_r.data_ptr<acc_t>();
  const acc_t* bg = b_gate.data_ptr<acc_t>();
  const acc_t* x = xc.data_ptr<acc_t>();
  const scalar_t* W = W_enc.data_ptr<scalar_t>();

  const FeatureGroups groups = group_by_feature(idx, counts, B, K, d_sae, op);

  // dz and dpi_mag per active slot.
  std::vector<acc_t> dz(B * K, acc_t(0)), dpm(B * K, acc_t(0));
  at::parallel_for(0, B, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < counts[t]; ++k) {
        const int64_t e = t * K + k;
        const acc_t m = f[e] > 0 ? gf[e] : acc_t(0);
        dpm[e] = m;
        dz[e] = gp[e] + er[idx[e]] * m;
      }
  });

  // Per feature: the column of dW_enc and the per-feature vectors; s_i = sum_t dz[t, i].
  std::vector<acc_t> s(d_sae);
  acc_t* dWp = dW.data_ptr<acc_t>();
  acc_t* dbg = db_gate.data_ptr<acc_t>();
  acc_t* dbm = db_mag.data_ptr<acc_t>();
  acc_t* drm = dr_mag.data_ptr<acc_t>();
  at::parallel_for(0, (d_sae + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> col(kBlock * d_in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, n = std::min(kBlock, d_sae - i0);
      std::fill(col.begin(), col.end(), acc_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        acc_t* cj = col.data() + j * d_in;
        acc_t sg = 0, sm = 0, sr = 0, sz = 0;
        for (int64_t p = groups.col_ptr[i]; p < groups.col_ptr[i + 1]; ++p) {
          const int64_t e = groups.entries[p];
          const acc_t w = dz[e];
          const acc_t* xt = x + (e / K) * d_in;
          for (int64_t d = 0; d < d_in; ++d) cj[d] += w * xt[d];
          sg += gp[e];
          sm += dpm[e];
          sr += dpm[e] * (pi[e] - bg[i]);
          sz += w;
        }
        dbg[i] = sg;
        dbm[i] = sm;
        drm[i] = sr * er[i];
        s[i] = sz;
      }
      for (int64_t d = 0; d < d_in; ++d)
        for (int64_t j = 0; j < n; ++j) dWp[d * d_sae + i0 + j] = col[j * d_in + d];
    }
  });

  // db_dec = -W_enc @ s: one pass over W_enc, rows of it in parallel.
  acc_t* dbd = db_dec.data_ptr<acc_t>();
  at::parallel_for(0, d_in, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      const scalar_t* Wd = W + d * d_sae;
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)  // lets the compiler reorder the sum into vector lanes
      for (int64_t i = 0; i < d_sae; ++i) acc += static_cast<acc_t>(Wd[i]) * s[i];
      dbd[d] = -acc;
    }
  });

  if (need_x) {
    // dx_t = sum_k dz[t, k] W_enc[:, idx]: gather rows of W_enc^T (one transposed copy).
    const at::Tensor Wt = W_enc.t().to(dx.scalar_type()).contiguous();
    const acc_t* Wtp = Wt.data_ptr<acc_t>();
    acc_t* dxp = dx.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        acc_t* out = dxp + t * d_in;
        std::fill(out, out + d_in, acc_t(0));
        for (int64_t k = 0; k < counts[t]; ++k) {
          const acc_t w = dz[t * K + k];
          const acc_t* row = Wtp + static_cast<int64_t>(idx[t * K + k]) * d_in;
          for (int64_t d = 0; d < d_in; ++d) out[d] += w * row[d];
        }
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_encode_backward_cpu(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec,
                          const at::Tensor& b_gate, const at::Tensor& r_mag,
                          const at::Tensor& b_mag, const at::Tensor& idx, const at::Tensor& f,
                          const at::Tensor& pi_gate, const at::Tensor& counts,
                          const at::Tensor& grad_f, const at::Tensor& grad_pi_gate, bool need_x) {
  const char* op = "gsae_fast.gated_encode_backward";
  TORCH_CHECK(x.dim() == 2 && W_enc.dim() == 2 && W_enc.size(0) == x.size(1), op,
              ": x must be [B, d_in] and W_enc [d_in, d_sae]");
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(dtype);
  const int64_t B = x.size(0), d_in = x.size(1), d_sae = W_enc.size(1);
  check_sparse(idx, counts, op);
  TORCH_CHECK(idx.size(0) == B, op, ": idx has ", idx.size(0), " rows, x has ", B);
  for (auto [t, name] : {std::pair{&x, "x"}, {&W_enc, "W_enc"}, {&b_dec, "b_dec"},
                         {&b_gate, "b_gate"}, {&r_mag, "r_mag"}, {&b_mag, "b_mag"},
                         {&idx, "idx"}, {&f, "f"}, {&pi_gate, "pi_gate"}, {&counts, "counts"},
                         {&grad_f, "grad_f"}, {&grad_pi_gate, "grad_pi_gate"}})
    check_cpu_contiguous(*t, op, name);
  for (auto [t, name] : {std::pair{&f, "f"}, {&pi_gate, "pi_gate"}, {&grad_f, "grad_f"},
                         {&grad_pi_gate, "grad_pi_gate"}}) {
    TORCH_CHECK(t->sizes() == idx.sizes(), op, ": ", name, " must have the shape of idx");
    TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must have dtype ", acc);
  }
  TORCH_CHECK(W_enc.scalar_type() == dtype, op, ": W_enc dtype differs from x dtype");
  check_vector(b_dec, d_in, dtype, op, "b_dec");
  check_vector(b_gate, d_sae, dtype, op, "b_gate");
  check_vector(r_mag, d_sae, dtype, op, "r_mag");
  check_vector(b_mag, d_sae, dtype, op, "b_mag");

  const auto aopts = x.options().dtype(acc);
  at::Tensor dx = need_x ? at::empty({B, d_in}, aopts) : at::empty({0}, aopts);
  at::Tensor dW = at::empty({d_in, d_sae}, aopts);
  at::Tensor db_dec = at::empty({d_in}, aopts);
  at::Tensor db_gate = at::empty({d_sae}, aopts), dr_mag = at::empty({d_sae}, aopts),
             db_mag = at::empty({d_sae}, aopts);
  const at::Tensor xc = (x.to(acc) - b_dec.to(acc)).contiguous();
  const at::Tensor bg = b_gate.to(acc).contiguous();
  const at::Tensor er = r_mag.to(acc).exp().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gated_encode_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    encode_backward_impl<scalar_t, acc_t>(xc, W_enc, bg, er, idx, f, pi_gate, counts, grad_f,
                                          grad_pi_gate, need_x, dx, dW, db_dec, db_gate, dr_mag,
                                          db_mag);
  });
  return {need_x ? dx.to(dtype) : dx, dW.to(dtype), db_dec.to(dtype), db_gate.to(dtype),
          dr_mag.to(dtype), db_mag.to(dtype)};
}

}  // namespace gsae_fast
