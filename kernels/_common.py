"""What the Triton kernels share: the interpreter switch, dtype and precision policy, and the
two generic kernels (a GEMV, and the grouped scatter that every sparse backward uses).

Grouping by feature (:func:`group_by_feature`) turns the padded rows into a CSR list of the active
(token, feature) pairs sorted by feature; :func:`grouped_scatter` then computes, for every
feature ``i``, ``out[i, :] = sum over its pairs p of weight[p] * src[row[p], :]`` with one
program per (block of features, block of columns) writing its own output tile. That is the
gradient of a decoder (rows of ``grad W_dec``), of an encoder (columns of ``grad W_enc``, written
transposed) and the per-feature bias gradients, without atomics: the results are bitwise
reproducible. The scatter into the tile is a ``tl.dot`` with a one-hot matrix: on the tensor
cores (TF32) for bf16/fp16 inputs and where torch allows TF32; an FMA loop for exact fp32.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Absolute, not relative: run from the repository root, this folder is also importable as a
# top-level "kernels" (transformers probes that name at import), where ".." does not exist.
from gsae_fast.types import slot_mask

# Read when the kernels are decorated (as Triton does): set TRITON_INTERPRET=1 before importing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_tl(dtype: torch.dtype):
    """Accumulation dtype of the kernels (as gsae_fast.types.acc_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the fp32/fp64 ``tl.dot`` calls for inputs of ``dtype``.

    fp64 is exact; fp32 follows torch (TF32 only if ``torch.backends.cuda.matmul.allow_tf32``);
    bf16/fp16 inputs use TF32 for the fp32 products of the backward, whose 10-bit mantissa is
    no coarser than the gradients' own rounding to the input dtype.
    """
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"
    return "ieee" if INTERPRET else "tf32"


def on_device(t: torch.Tensor):
    """Launch context: Triton launches on the current CUDA device, so make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# --------------------------------------------------------------------------------------------
# GEMV: out[j] = sum_i A[i, j] * v[i] with fp32 (fp64) accumulation, A in any layout.
# --------------------------------------------------------------------------------------------

@triton.jit
def _gemv_kernel(a_ptr, v_ptr, out_ptr, n_i, n_j, stride_i, stride_j, rows_per_split,
                 ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Partial sums over one split of i: out[split, j] = sum_{i in split} A[i, j] v[i]."""
    rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
    j_ok = rj < n_j
    i_start = tl.program_id(1) * rows_per_split
    i_end = tl.minimum(i_start + rows_per_split, n_i)
    acc = tl.zeros((BJ,), ACC)
    for i0 in range(i_start, i_end, BI):
        ri = i0 + tl.arange(0, BI)
        i_ok = ri < i_end
        offs = ri[:, None].to(tl.int64) * stride_i + rj[None, :].to(tl.int64) * stride_j
        a = tl.load(a_ptr + offs, mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
        v = tl.load(v_ptr + ri, mask=i_ok, other=0.0).to(ACC)
        acc += tl.sum(a * v[:, None], axis=0)
    tl.store(out_ptr + tl.program_id(1).to(tl.int64) * n_j + rj, acc, mask=j_ok)


def vec_mat(v: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``v @ A`` for ``A [n, m]`` (any strides) in the accumulation dtype, without upcasting A.

    When m is small (``W_enc @ s``: m = d_in) the reduction over n is split across programs so
    the whole GPU reads A; the partial sums are added in a fixed order (deterministic)."""
    n, m = A.shape
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    if m == 0 or n == 0:
        return torch.zeros(m, dtype=acc, device=A.device)
    BI, BJ = 32, (64 if INTERPRET else 128)
    j_blocks = triton.cdiv(m, BJ)
    splits = max(1, min(triton.cdiv(n, 8 * BI), 1024 // j_blocks))
    rows_per_split = max(BI, triton.cdiv(triton.cdiv(n, splits), BI) * BI)
    splits = max(1, triton.cdiv(n, rows_per_split))
    partial = torch.empty(splits, m, dtype=acc, device=A.device)
    with on_device(A):
        _gemv_kernel[(j_blocks, splits)](A, v, partial, n, m, A.stride(0), A.stride(1),
                                        rows_per_split, ACC=acc_tl(A.dtype), BI=BI, BJ=BJ)
    return partial[0] if splits == 1 else partial.sum(0)


# --------------------------------------------------------------------------------------------
# Grouping by feature and the grouped scatter.
# --------------------------------------------------------------------------------------------

def group_by_feature(idx: torch.Tensor, counts: torch.Tensor, d_sae: int):
    """The active slots of ``idx [B, K]`` sorted by feature (stable: token order within a feature).

    Returns ``(ptr [d_sae + 1] int64, feats [B*K] int32, order [B*K] int64)``: the pairs of
    feature ``i`` are positions ``ptr[i]:ptr[i+1]`` of the sorted list; ``order`` maps a position
    to its flat slot ``b * K + k`` and ``feats`` holds its feature (padding sorts last, key d_sae).
    No host synchronisation: the sizes are fixed.
    """
    B, K = idx.shape
    valid = slot_mask(idx, counts)
    keys = torch.where(valid, idx, torch.full_like(idx, d_sae)).reshape(-1)
    feats, order = torch.sort(keys, stable=True)
    # int64 positions: B * K can pass 2**31 (a million tokens, an outlier row of 2048 actives).
    ptr = torch.searchsorted(feats, torch.arange(d_sae + 1, device=idx.device, dtype=feats.dtype))
    return ptr, feats, order


@triton.jit
def _grouped_scatter_kernel(ptr_ptr, feats_ptr, rows_ptr, w_ptr, src_ptr, sub_ptr, out_ptr,
                            d_sae, n_cols, src_stride, out_stride_f, out_stride_c,
                            HAS_W: tl.constexpr, HAS_SUB: tl.constexpr, ACC: tl.constexpr,
                            PRECISION: tl.constexpr,
                            BF: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    rf = tl.program_id(0) * BF + tl.arange(0, BF)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    f_ok = rf < d_sae
    c_ok = rc < n_cols
    start = tl.load(ptr_ptr + tl.program_id(0) * BF)
    end = tl.load(ptr_ptr + tl.minimum(tl.program_id(0) * BF + BF, d_sae))
    if HAS_SUB:
        sub = tl.load(sub_ptr + rc, mask=c_ok, other=0.0).to(ACC)
    acc = tl.zeros((BF, BC), ACC)
    for p0 in range(start, end, BP):
        rp = p0 + tl.arange(0, BP)
        p_ok = rp < end
        feat = tl.load(feats_ptr + rp, mask=p_ok, other=-1)
        row = tl.load(rows_ptr + rp, mask=p_ok, other=0)
        src = tl.load(src_ptr + row[:, None].to(tl.int64) * src_stride + rc[None, :],
                      mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        if HAS_SUB:
            src = src - sub[None, :]
        if HAS_W:
            w = tl.load(w_ptr + rp, mask=p_ok, other=0.0).to(ACC)
        else:
            w = tl.full((BP,), 1.0, ACC)
        # one_hot[f, p] = w[p] if pair p belongs to feature f: the scatter as a matrix product.
        one_hot = tl.where(feat[None, :] == rf[:, None], w[None, :], 0.0).to(ACC)
        acc = tl.dot(one_hot, src, acc, input_precision=PRECISION, out_dtype=ACC)
    out = (out_ptr + rf[:, None].to(tl.int64) * out_stride_f
           + rc[None, :].to(tl.int64) * out_stride_c)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=f_ok[:, None] & c_ok[None, :])


def grouped_scatter(groups, rows: torch.Tensor, weights, src: torch.Tensor, out: torch.Tensor,
                    sub=None, transpose_out: bool = False, precision_dtype=None) -> torch.Tensor:
    """``out[i, :] = sum_p weights[p] * (src[rows[p], :] - sub)`` over the pairs of feature i.

    ``groups`` = group_by_feature(...); ``rows``/``weights`` are per sorted position (weights
    None = 1). ``out`` is ``[d_sae, C]``, or ``[C, d_sae]`` with ``transpose_out`` (written as the
    transpose, coalesced along features). Every element of ``out`` is written.
    """
    ptr, feats, _ = groups
    d_sae = ptr.numel() - 1
    n_cols = src.shape[1]
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    sf, sc = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    if d_sae == 0 or n_cols == 0:
        return out
    if INTERPRET:
        BF, BC, BP = 32, 32, 32
    else:
        BF, BC, BP = 32, min(128, next_pow2(n_cols)), 32
    grid = (triton.cdiv(d_sae, BF), triton.cdiv(n_cols, BC))
    dtype = precision_dtype or src.dtype
    with on_device(src):
        _grouped_scatter_kernel[grid](
            ptr, feats, rows, weights if weights is not None else src, src,
            sub if sub is not None else src, out, d_sae, n_cols, src.stride(0), sf, sc,
            HAS_W=weights is not None, HAS_SUB=sub is not None, ACC=acc_tl(acc),
            PRECISION=dot_precision(dtype), BF=BF, BC=BC, BP=BP)
    return out
