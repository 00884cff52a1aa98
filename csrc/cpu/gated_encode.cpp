// Fused gated encode on the CPU: z = (x - b_dec) @ W_enc computed tile by tile with the BLAS
// GEMM (MKL/OpenBLAS through ATen, which the two cores cannot beat by hand), each tile followed
// at once, while it is still in cache, by the gate / magnitude epilogue that writes only the
// active features. The [B, d_sae] matrix is never allocated: one [ROWS, FEATS] tile per thread.
//
// Output, the padded-row sparse format (gsae_fast/types.py, SparseActs; docs/design.md):
//   f [B, K], pi_gate [B, K] (accumulation dtype), idx [B, K] int32, counts [B] int32,
//   status [2] int32 = {max over rows of the true count, 1 if any z was NaN/Inf}.
// counts hold the true number of actives even past K (only the first K are written), so the
// caller detects an overflow and re-runs with a larger K: nothing is dropped silently.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gsae_fast {
namespace {

// Rows per GEMM tile, and a cap on the features per tile: a tile of W_enc (d_in x FEATS) and of
// z (ROWS x FEATS) should sit in the per-core L2 (2 MB here) while the epilogue reads it.
constexpr int64_t kTileRows = 128;
constexpr int64_t kMaxTileFeats = 1024;
constexpr int64_t kChunk = 16;  // features tested together before any branch (one AVX-512 vector)

int64_t tile_feats(int64_t d_in, int64_t d_sae, int64_t elem) {
  const int64_t budget = 512 * 1024 / elem;  // W_enc tile elements
  int64_t n = std::max<int64_t>(64, budget / std::max<int64_t>(d_in, 1));
  n = std::min<int64_t>(n, kMaxTileFeats);
  return std::min<int64_t>((n / 16) * 16, d_sae);
}

// Bit j of the result is the gate of feature j of a chunk of n <= 16 (z + b_gate > 0); `bad`
// is set if any z is NaN or Inf (z - z != 0).
template <typename acc_t>
inline uint32_t gate_bits(const acc_t* z, const acc_t* b_gate, int64_t n, bool& bad) {
  uint32_t bits = 0;
  for (int64_t j = 0; j < n; ++j) {
    bits |= static_cast<uint32_t>(z[j] + b_gate[j] > 0) << j;
    bad |= !(z[j] - z[j] == 0);
  }
  return bits;
}

#if defined(__AVX512F__)
// The same with one vector compare: the gate test is the only per-element work of the encode
// besides the GEMM, so it must run at vector speed (the scalar loop cost ~20% of the GEMM).
template <>
inline uint32_t gate_bits<float>(const float* z, const float* b_gate, int64_t n, bool& bad) {
  const __mmask16 lanes = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m512 zz = _mm512_maskz_loadu_ps(lanes, z);
  const __m512 pg = _mm512_add_ps(zz, _mm512_maskz_loadu_ps(lanes, b_gate));
  const __m512 zero = _mm512_setzero_ps();
  bad |= _mm512_mask_cmp_ps_mask(lanes, _mm512_sub_ps(zz, zz), zero, _CMP_EQ_OQ) != lanes;
  return _mm512_mask_cmp_ps_mask(lanes, pg, zero, _CMP_GT_OQ);
}
#endif

// Gate / magnitude epilogue of one tile z[rows, cols] (features f0 .. f0+cols) for rows r0..;
// appends each row's actives in increasing feature order, so rows come out sorted.
template <typename acc_t>
void epilogue(const acc_t* z, int64_t rows, int64_t cols, int64_t r0, int64_t f0,
              const acc_t* b_gate, const acc_t* exp_r, const acc_t* b_mag, int64_t K,
              int32_t* idx, acc_t* f, acc_t* pi, int32_t* counts, bool& nonfinite) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* zr = z + r * cols;
    const int64_t t = r0 + r;
    int64_t c = counts[t];
    for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
      uint32_t bits = gate_bits<acc_t>(zr + j0, b_gate + f0 + j0, std::min(kChunk, cols - j0),
                                       nonfinite);
      for (; bits; bits &= bits - 1, ++c) {
        if (c >= K) continue;  // overflow: keep counting, the caller re-runs with room
        const int64_t j = j0 + __builtin_ctz(bits), i = f0 + j;
        const acc_t pm = exp_r[i] * zr[j] + b_mag[i];
        idx[t * K + c] = static_cast<int32_t>(i);
        pi[t * K + c] = zr[j] + b_gate[i];
        f[t * K + c] = pm > 0 ? pm : acc_t(0);
      }
    }
    counts[t] = static_cast<int32_t>(std::min<int64_t>(c, INT32_MAX));
  }
}

template <typename acc_t>
void encode_impl(const at::Tensor& xc, const at::Tensor& W, const at::Tensor& b_gate,
                 const at::Tensor& exp_r, const at::Tensor& b_mag, int64_t K, at::Tensor& idx,
                 at::Tensor& f, at::Tensor& pi, at::Tensor& counts, bool& nonfinite_out) {
  const int64_t B = xc.size(0), d_in = xc.size(1), d_sae = W.size(1);
  const int64_t feats = tile_feats(d_in, d_sae, sizeof(acc_t));
  const auto opts = xc.options();
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B, kTileRows, [&](int64_t begin, int64_t end) {
    // One tile buffer per thread; z tiles are contiguous [rows, cols] views of it.
    at::Tensor buf = at::empty({kTileRows * feats}, opts);
    bool bad = false;
    for (int64_t r0 = begin; r0 < end; r0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, end - r0);
      const at::Tensor x_rows = xc.narrow(0, r0, rows);
      for (int64_t f0 = 0; f0 < d_sae; f0 += feats) {
        const int64_t cols = std::min(feats, d_sae - f0);
        at::Tensor z = buf.narrow(0, 0, rows * cols).view({rows, cols});
        // Inside parallel_for ATen runs this GEMM single-threaded: one tile per core.
        at::mm_out(z, x_rows, W.narrow(1, f0, cols));
        epilogue<acc_t>(z.data_ptr<acc_t>(), rows, cols, r0, f0, b_gate.data_ptr<acc_t>(),
                        exp_r.data_ptr<acc_t>(), b_mag.data_ptr<acc_t>(), K,
                        idx.data_ptr<int32_t>(), f.data_ptr<acc_t>(), pi.data_ptr<acc_t>(),
                        counts.data_ptr<int32_t>(), bad);
      }
    }
    if (bad) nonfinite = true;
  });
  nonfinite_out = nonfinite;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec,
    const at::Tensor& b_gate, const at::Tensor& r_mag, const at::Tensor& b_mag,
    int64_t capacity) {
  const char* op = "gsae_fast.gated_encode";
  at::AutoDispatchBelowADInplaceOrView guard;  // inner ATen calls skip autograd
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in], got ", x.sizes());
  TORCH_CHECK(W_enc.dim() == 2 && W_enc.size(0) == x.size(1), op, ": W_enc must be [d_in=",
              x.size(1), ", d_sae], got ", W_enc.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": x must be floating point, got ", dtype);
  TORCH_CHECK(W_enc.scalar_type() == dtype, op, ": W_enc dtype ", W_enc.scalar_type(),
              " differs from x dtype ", dtype);
  const int64_t B = x.size(0), d_in = x.size(1), d_sae = W_enc.size(1);
  for (auto [t, name] : {std::pair{&x, "x"}, {&W_enc, "W_enc"}, {&b_dec, "b_dec"},
                         {&b_gate, "b_gate"}, {&r_mag, "r_mag"}, {&b_mag, "b_mag"}})
    check_cpu_contiguous(*t, op, name);
  check_vector(b_dec, d_in, dtype, op, "b_dec");
  check_vector(b_gate, d_sae, dtype, op, "b_gate");
  check_vector(r_mag, d_sae, dtype, op, "r_mag");
  check_vector(b_mag, d_sae, dtype, op, "b_mag");
  TORCH_CHECK(capacity >= 0, op, ": capacity must be >= 0, got ", capacity);
  TORCH_CHECK(d_sae <= INT32_MAX, op, ": d_sae must fit in int32");

  const auto acc = acc_dtype(dtype);
  const auto iopts = x.options().dtype(at::kInt);
  const auto aopts = x.options().dtype(acc);
  at::Tensor idx = at::zeros({B, capacity}, iopts);
  at::Tensor f = at::zeros({B, capacity}, aopts);
  at::Tensor pi = at::zeros({B, capacity}, aopts);
  at::Tensor counts = at::zeros({B}, iopts);
  at::Tensor status = at::zeros({2}, iopts);
  if (B == 0 || d_sae == 0) return {f, pi, idx, counts, status};

  // Centring once: [B, d_in] is small next to the GEMM. Low-precision weights are widened once
  // so the GEMM accumulates and rounds in fp32 (a parameter-sized buffer, never B x d_sae).
  // Detached: the GEMM runs on pool threads, where the autograd guard above does not reach.
  const at::Tensor xc = (x.detach().to(acc) - b_dec.detach().to(acc)).contiguous();
  const at::Tensor W = W_enc.detach().to(acc).contiguous();
  const at::Tensor bg = b_gate.to(acc).contiguous();
  const at::Tensor er = r_mag.to(acc).exp().contiguous();  // ATen's exp, as the reference uses
  const at::Tensor bm = b_mag.to(acc).contiguous();
  bool nonfinite = false;
  AT_DISPATCH_FLOATING_TYPES(acc, "gated_encode_cpu", [&] {
    encode_impl<scalar_t>(xc, W, bg, er, bm, capacity, idx, f, pi, counts, nonfinite);
  });
  status[0] = counts.max().item<int32_t>();
  status[1] = nonfinite ? 1 : 0;
  return {f, pi, idx, counts, status};
}

}  // namespace gsae_fast
