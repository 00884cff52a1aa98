"""Sparse decode ``out = sum_k val[:, k] * W_dec[idx[:, k]] + bias`` and its backward.

Each program owns one token and a block of ``d_in``: it walks the token's active slots in blocks
of BS and gathers whole row segments of W_dec (wide contiguous loads along d_in). The backward
has the same shape: the value gradient is a dot of the output gradient with each gathered row,
and the W_dec gradient is either grouped by feature (deterministic, kernels._common) or scattered
with fp32 atomics, as the caller says (gsae_fast.backends.set_scatter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_tl, group_by_feature, grouped_scatter, next_pow2, on_device


def _configs():
    if INTERPRET:
        return [triton.Config(dict(BS=16, BD=32))]
    return [triton.Config(dict(BS=bs, BD=bd), num_warps=w)
            for bs, bd, w in [(16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 512, 8),
                              (16, 1024, 8), (64, 128, 4)]]


# Tuned per d_in only: the capacity K drifts with L0 and would re-tune at every new value.
@triton.autotune(configs=_configs(), key=["d_in"])
@triton.jit
def _sparse_decode_kernel(idx_ptr, val_ptr, counts_ptr, w_ptr, bias_ptr, out_ptr, K, d_in,
                          HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                          BS: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < d_in
    n = tl.minimum(tl.load(counts_ptr + row), K)
    acc = tl.zeros((BD,), ACC)
    for s0 in range(0, n, BS):
        rs = s0 + tl.arange(0, BS)
        s_ok = rs < n
        i = tl.load(idx_ptr + row * K + rs, mask=s_ok, other=0)
        v = tl.load(val_ptr + row * K + rs, mask=s_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + i[:, None].to(tl.int64) * d_in + rd[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += tl.sum(w * v[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(ACC)
    tl.store(out_ptr + row * d_in + rd, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.autotune(configs=_configs(), key=["d_in"])
@triton.jit
def _sparse_dot_kernel(grad_ptr, idx_ptr, counts_ptr, w_ptr, out_ptr, K, d_in,
                       ACC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """out[row, s] = grad[row] . W_dec[idx[row, s]] on the active slots, 0 on padding."""
    row = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BS + tl.arange(0, BS)
    n = tl.minimum(tl.load(counts_ptr + row), K)
    s_ok = rs < n
    i = tl.load(idx_ptr + row * K + rs, mask=s_ok, other=0)
    acc = tl.zeros((BS,), ACC)
    d_end = tl.where(tl.program_id(1) * BS < n, d_in, 0)  # blocks of padding only: no work
    for d0 in range(0, d_end, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < d_in
        g = tl.load(grad_ptr + row * d_in + rd, mask=d_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + i[:, None].to(tl.int64) * d_in + rd[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + rs, acc, mask=rs < K)


# The pair decode (x_hat and the auxiliary reconstruction): each gathered W_dec segment feeds two
# accumulators, forward, and two dot products, backward. Same blocks and order as the single
# kernels, so each output equals its single decode.
@triton.autotune(configs=_configs(), key=["d_in"])
@triton.jit
def _sparse_decode_pair_kernel(idx_ptr, va_ptr, vb_ptr, counts_ptr, w_ptr, bias_ptr, out_a_ptr,
                               out_b_ptr, K, d_in, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                               BS: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < d_in
    n = tl.minimum(tl.load(counts_ptr + row), K)
    acc_a = tl.zeros((BD,), ACC)
    acc_b = tl.zeros((BD,), ACC)
    for s0 in range(0, n, BS):
        rs = s0 + tl.arange(0, BS)
        s_ok = rs < n
        i = tl.load(idx_ptr + row * K + rs, mask=s_ok, other=0)
        va = tl.load(va_ptr + row * K + rs, mask=s_ok, other=0.0).to(ACC)
        vb = tl.load(vb_ptr + row * K + rs, mask=s_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + i[:, None].to(tl.int64) * d_in + rd[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc_a += tl.sum(w * va[:, None], axis=0)
        acc_b += tl.sum(w * vb[:, None], axis=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(ACC)
        acc_a += bias
        acc_b += bias
    tl.store(out_a_ptr + row * d_in + rd, acc_a.to(out_a_ptr.dtype.element_ty), mask=d_ok)
    tl.store(out_b_ptr + row * d_in + rd, acc_b.to(out_b_ptr.dtype.element_ty), mask=d_ok)


@triton.autotune(configs=_configs(), key=["d_in"])
@triton.jit
def _sparse_dot_pair_kernel(ga_ptr, gb_ptr, idx_ptr, counts_ptr, w_ptr, out_a_ptr, out_b_ptr, K,
                            d_in, ACC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """out_a/b[row, s] = grad_a/b[row] . W_dec[idx[row, s]] on the active slots, 0 on padding."""
    row = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BS + tl.arange(0, BS)
    n = tl.minimum(tl.load(counts_ptr + row), K)
    s_ok = rs < n
    i = tl.load(idx_ptr + row * K + rs, mask=s_ok, other=0)
    acc_a = tl.zeros((BS,), ACC)
    acc_b = tl.zeros((BS,), ACC)
    d_end = tl.where(tl.program_id(1) * BS < n, d_in, 0)  # blocks of padding only: no work
    for d0 in range(0, d_end, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < d_in
        ga = tl.load(ga_ptr + row * d_in + rd, mask=d_ok, other=0.0).to(ACC)
        gb = tl.load(gb_ptr + row * d_in + rd, mask=d_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + i[:, None].to(tl.int64) * d_in + rd[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc_a += tl.sum(w * ga[None, :], axis=1)
        acc_b += tl.sum(w * gb[None, :], axis=1)
    tl.store(out_a_ptr + row * K + rs, acc_a, mask=rs < K)
    tl.store(out_b_ptr + row * K + rs, acc_b, mask=rs < K)


@triton.jit
def _scatter_atomic_kernel(grad_ptr, idx_ptr, val_ptr, counts_ptr, out_ptr, K, d_in,
                           ACC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """out[idx[row, s]] += val[row, s] * grad[row] with atomics (out in the accumulation dtype)."""
    row = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < d_in
    n = tl.minimum(tl.load(counts_ptr + row), K)
    g = tl.load(grad_ptr + row * d_in + rd, mask=d_ok, other=0.0).to(ACC)
    for s0 in range(0, n, BS):
        rs = s0 + tl.arange(0, BS)
        s_ok = rs < n
        i = tl.load(idx_ptr + row * K + rs, mask=s_ok, other=0)
        v = tl.load(val_ptr + row * K + rs, mask=s_ok, other=0.0).to(ACC)
        tl.atomic_add(out_ptr + i[:, None].to(tl.int64) * d_in + rd[None, :],
                      v[:, None] * g[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      sem="relaxed")


def sparse_decode(idx, val, counts, W_dec, bias):
    """The ``sparse_decode`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    d_in = W_dec.shape[1]
    out = torch.empty(B, d_in, dtype=W_dec.dtype, device=W_dec.device)
    if B == 0 or d_in == 0:
        return out
    if K == 0:
        return (bias.expand(B, d_in).clone() if bias is not None
                else torch.zeros_like(out))
    grid = lambda meta: (B, triton.cdiv(d_in, meta["BD"]))  # noqa: E731
    with on_device(W_dec):
        _sparse_decode_kernel[grid](idx, val, counts, W_dec, bias if bias is not None else W_dec,
                                    out, K, d_in, HAS_BIAS=bias is not None,
                                    ACC=acc_tl(W_dec.dtype))
    return out


def _grad_W_dec(src, idx, val, counts, W_dec, deterministic: bool):
    """``grad W_dec[i] = sum over the slots (b, k) with idx[b, k] = i of val[b, k] * src[b]``:
    grouped by feature (fixed order) when ``deterministic``, else fp32 atomics."""
    B, K = idx.shape
    d_sae, d_in = W_dec.shape
    if deterministic:
        groups = group_by_feature(idx, counts, d_sae)
        order = groups[2]
        grad_W = torch.empty_like(W_dec)
        grouped_scatter(groups, order // max(K, 1), val.reshape(-1)[order], src, grad_W,
                        precision_dtype=W_dec.dtype)
        return grad_W
    acc = torch.float64 if W_dec.dtype == torch.float64 else torch.float32
    buf = torch.zeros(d_sae, d_in, dtype=acc, device=val.device)
    if B and K and d_in:
        BD = 32 if INTERPRET else next_pow2(d_in, hi=512)
        with on_device(W_dec):
            _scatter_atomic_kernel[(B, triton.cdiv(d_in, BD))](
                src, idx, val, counts, buf, K, d_in, ACC=acc_tl(W_dec.dtype), BS=16, BD=BD)
    return buf.to(W_dec.dtype)


def sparse_decode_backward(grad_out, idx, val, counts, W_dec, need_val: bool, need_W_dec: bool,
                           deterministic: bool):
    """The ``sparse_decode_backward`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    d_in = W_dec.shape[1]
    acc = torch.float64 if W_dec.dtype == torch.float64 else torch.float32
    grad_val = torch.empty(0, dtype=acc, device=val.device)
    grad_W = torch.empty(0, dtype=W_dec.dtype, device=val.device)
    if need_val:
        grad_val = torch.zeros(B, K, dtype=acc, device=val.device)
        if B and K and d_in:
            grid = lambda meta: (B, triton.cdiv(K, meta["BS"]))  # noqa: E731
            with on_device(W_dec):
                _sparse_dot_kernel[grid](grad_out, idx, counts, W_dec, grad_val, K, d_in,
                                         ACC=acc_tl(W_dec.dtype))
    if need_W_dec:
        grad_W = _grad_W_dec(grad_out, idx, val, counts, W_dec, deterministic)
    return grad_val, grad_W


def sparse_decode_pair(idx, val_a, val_b, counts, W_dec, bias):
    """The ``sparse_decode_pair`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    d_in = W_dec.shape[1]
    out_a = torch.empty(B, d_in, dtype=W_dec.dtype, device=W_dec.device)
    out_b = torch.empty_like(out_a)
    if B == 0 or d_in == 0:
        return out_a, out_b
    if K == 0:
        if bias is not None:
            return bias.expand(B, d_in).clone(), bias.expand(B, d_in).clone()
        return torch.zeros_like(out_a), torch.zeros_like(out_b)
    grid = lambda meta: (B, triton.cdiv(d_in, meta["BD"]))  # noqa: E731
    with on_device(W_dec):
        _sparse_decode_pair_kernel[grid](idx, val_a, val_b, counts, W_dec,
                                         bias if bias is not None else W_dec, out_a, out_b, K,
                                         d_in, HAS_BIAS=bias is not None,
                                         ACC=acc_tl(W_dec.dtype))
    return out_a, out_b


def sparse_decode_pair_backward(grad_a, grad_b, idx, val_a, val_b, counts, W_dec,
                                need_val_a: bool, need_val_b: bool, need_W_dec: bool,
                                W_from_b: bool, deterministic: bool):
    """The ``sparse_decode_pair_backward`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    d_in = W_dec.shape[1]
    acc = torch.float64 if W_dec.dtype == torch.float64 else torch.float32
    empty = torch.empty(0, dtype=acc, device=val_a.device)
    grad_val_a, grad_val_b = empty, empty.clone()
    grad_W = torch.empty(0, dtype=W_dec.dtype, device=val_a.device)
    if need_val_a or need_val_b:
        gva = torch.zeros(B, K, dtype=acc, device=val_a.device)
        gvb = torch.zeros_like(gva)
        if B and K and d_in:
            grid = lambda meta: (B, triton.cdiv(K, meta["BS"]))  # noqa: E731
            with on_device(W_dec):
                _sparse_dot_pair_kernel[grid](grad_a, grad_b, idx, counts, W_dec, gva, gvb, K,
                                              d_in, ACC=acc_tl(W_dec.dtype))
        grad_val_a = gva if need_val_a else grad_val_a
        grad_val_b = gvb if need_val_b else grad_val_b
    if need_W_dec:
        # Both paths as one scatter over the stacked rows [grad_a; grad_b] (the pairs of the b
        # path are those of the a path, B rows further on).
        sidx = torch.cat([idx, idx]) if W_from_b else idx
        scounts = torch.cat([counts, counts]) if W_from_b else counts
        sval = torch.cat([val_a, val_b]) if W_from_b else val_a
        src = torch.cat([grad_a, grad_b]) if W_from_b else grad_a
        grad_W = _grad_W_dec(src, sidx, sval, scounts, W_dec, deterministic)
    return grad_val_a, grad_val_b, grad_W
