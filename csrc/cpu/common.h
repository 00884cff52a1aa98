// Shared pieces of the CPU kernels: input checks, dtype dispatch, and grouping of the
// active (row, slot) pairs by feature, which every backward scatter uses.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>
#include <vector>

namespace gsae_fast {

// fp64 inputs accumulate in fp64; fp32, bf16 and fp16 inputs accumulate in fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                         const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
}

// Sparse activations in the padded-row format: idx [B, K] int32, values [B, K], counts [B] int32.
inline void check_sparse(const at::Tensor& idx, const at::Tensor& counts, const char* op) {
  TORCH_CHECK(idx.dim() == 2, op, ": idx must be [B, K], got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt, op, ": idx must be int32");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == idx.size(0), op,
              ": counts must be [B] with B = idx.size(0)");
  TORCH_CHECK(counts.scalar_type() == at::kInt, op, ": counts must be int32");
}

// The active pairs grouped by feature (compressed sparse columns). For feature i, the pairs are
// entries[col_ptr[i] .. col_ptr[i+1]) and each entry is the flat slot t * K + k, in increasing t:
// a counting sort, so the grouping (and every sum built on it) is deterministic.
struct FeatureGroups {
  std::vector<int64_t> col_ptr;
  std::vector<int64_t> entries;
};

inline FeatureGroups group_by_feature(const int32_t* idx, const int32_t* counts, int64_t B,
                                      int64_t K, int64_t d_sae, const char* op) {
  FeatureGroups g;
  g.col_ptr.assign(d_sae + 1, 0);
  for (int64_t t = 0; t < B; ++t) {
    const int64_t c = counts[t];
    TORCH_CHECK(c >= 0 && c <= K, op, ": counts[", t, "] = ", c, " is outside [0, ", K, "]");
    for (int64_t k = 0; k < c; ++k) {
      const int64_t i = idx[t * K + k];
      TORCH_CHECK(i >= 0 && i < d_sae, op, ": feature index ", i, " at row ", t,
                  " is outside [0, ", d_sae, ")");
      ++g.col_ptr[i + 1];
    }
  }
  for (int64_t i = 0; i < d_sae; ++i) g.col_ptr[i + 1] += g.col_ptr[i];
  g.entries.resize(g.col_ptr[d_sae]);
  std::vector<int64_t> next(g.col_ptr.begin(), g.col_ptr.end() - 1);
  for (int64_t t = 0; t < B; ++t)
    for (int64_t k = 0; k < counts[t]; ++k) g.entries[next[idx[t * K + k]]++] = t * K + k;
  return g;
}

}  // namespace gsae_fast
