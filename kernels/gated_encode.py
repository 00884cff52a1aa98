"""Fused gated encode: one GEMM whose epilogue computes the gate and the magnitude path and
writes only the active features.

Per output tile ``z[BM, BN]`` (fp32/fp64 accumulator, registers):

- centring folded in as a bias of the GEMM: ``z = x @ W_enc - c`` with ``c = b_dec @ W_enc``
  (one GEMV per call), so x is read once, as is, and bf16/fp16 products stay exact;
- ``pi_gate = z + b_gate``, ``gate = pi_gate > 0``, ``f = relu(exp(r_mag) * z + b_mag)``;
- compaction: count the actives of each row of the tile, reserve that many slots of the row
  with one ``atomic_add`` on the row's counter (it returns the first free slot), and place them
  with an in-tile prefix sum. Slots past the capacity are not written; the counter still counts
  them, so the host sees the true count and re-runs with room (no feature is dropped);
- a NaN/Inf in z sets a status flag.

Tiles of one row finish in any order, so the host sorts each row's slots by feature afterwards:
the output does not depend on scheduling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_tl, dot_precision, on_device, slot_mask, vec_mat


def _configs():
    if INTERPRET:  # one config: the interpreter cannot benchmark, and small tiles test the tails
        return [triton.Config(dict(BM=32, BN=32, BK=32, GROUP_M=2), num_warps=4)]
    # Hopper (H100/H200) and Ampere (A100): 128-row tiles, 64-256 features, K steps of 32-64.
    shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 32, 8, 3),
              (64, 256, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
    return [triton.Config(dict(BM=m, BN=n, BK=k, GROUP_M=8), num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _fits_in_shared_memory(configs, named_args, **kwargs):
    """Drop tiles whose pipelined K slices exceed the device's shared memory (they would only
    fail at launch): stages x (BM + BN) x BK elements; the smallest tile if none fits."""
    x = named_args["x_ptr"]
    if not x.is_cuda:
        return configs
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin

    def need(c):
        return c.num_stages * (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"] * x.element_size()

    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


# The counters are restored after each autotuning run, so the tuned launch counts from zero.
@triton.autotune(configs=_configs(), key=["d_in", "d_sae"],
                 prune_configs_by={"early_config_prune": _fits_in_shared_memory},
                 restore_value=["counts_ptr", "status_ptr"])
@triton.jit
def _gated_encode_kernel(x_ptr, w_ptr, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr,
                         f_ptr, pi_ptr, idx_ptr, counts_ptr, status_ptr,
                         B, d_in, d_sae, K,
                         ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # Grouped tile order (GROUP_M row tiles share the W_enc columns they read, in L2).
    pid = tl.program_id(0)
    n_m = tl.cdiv(B, BM)
    n_n = tl.cdiv(d_sae, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < B
    n_ok = rn < d_sae
    # Out-of-range rows/columns read a valid row/column (wrapped) and are masked at the end.
    x_ptrs = x_ptr + (rm % B)[:, None].to(tl.int64) * d_in + rk[None, :]
    w_ptrs = w_ptr + rk[:, None].to(tl.int64) * d_sae + (rn % d_sae)[None, :]
    acc = tl.zeros((BM, BN), ACC)
    for k0 in range(0, d_in, BK):
        k_ok = rk < d_in - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BK
        w_ptrs += BK * d_sae

    # Epilogue, all in registers.
    c = tl.load(c_ptr + rn, mask=n_ok, other=0.0)
    b_gate = tl.load(b_gate_ptr + rn, mask=n_ok, other=0.0).to(ACC)
    scale = tl.exp(tl.load(r_mag_ptr + rn, mask=n_ok, other=0.0).to(ACC))
    b_mag = tl.load(b_mag_ptr + rn, mask=n_ok, other=0.0).to(ACC)
    z = acc - c[None, :]
    pi_gate = z + b_gate[None, :]
    f = tl.maximum(scale[None, :] * z + b_mag[None, :], 0.0)
    valid = m_ok[:, None] & n_ok[None, :]

    bad = valid & ((z != z) | (tl.abs(z) == float("inf")))
    if tl.max(bad.to(tl.int32)) > 0:
        tl.atomic_max(status_ptr + 1, 1)

    active = (valid & (pi_gate > 0)).to(tl.int32)
    n_row = tl.sum(active, axis=1)
    base = tl.atomic_add(counts_ptr + rm, n_row, mask=m_ok & (n_row > 0))
    slot = base[:, None] + tl.cumsum(active, axis=1) - active
    keep = (active > 0) & (slot < K)
    out = rm[:, None].to(tl.int64) * K + slot
    tl.store(idx_ptr + out, (rn[None, :] + tl.zeros((BM, BN), tl.int32)), mask=keep)
    tl.store(f_ptr + out, f, mask=keep)
    tl.store(pi_ptr + out, pi_gate, mask=keep)


def gated_encode(x, W_enc, b_dec, b_gate, r_mag, b_mag, capacity: int):
    """The ``gated_encode`` kernel contract (see gsae_fast.torch_executor)."""
    B, d_in = x.shape
    d_sae = W_enc.shape[1]
    K = capacity
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = torch.zeros(B, K, dtype=acc, device=x.device)
    pi_gate = torch.zeros_like(f)
    idx = torch.zeros(B, K, dtype=torch.int32, device=x.device)
    counts = torch.zeros(B, dtype=torch.int32, device=x.device)
    status = torch.zeros(2, dtype=torch.int32, device=x.device)
    if B == 0 or d_sae == 0:
        return f, pi_gate, idx, counts, status
    c = vec_mat(b_dec, W_enc)
    # With capacity 0 nothing is written, but the kernel still counts: give it 1-slot outputs.
    outs = (f, pi_gate, idx) if K else (f.new_zeros(B, 1), f.new_zeros(B, 1), idx.new_zeros(B, 1))
    grid = lambda meta: (triton.cdiv(B, meta["BM"]) * triton.cdiv(d_sae, meta["BN"]),)  # noqa: E731
    with on_device(x):
        _gated_encode_kernel[grid](
            x, W_enc, c, b_gate, r_mag, b_mag, *outs, counts, status,
            B, d_in, d_sae, K, ACC=acc_tl(x.dtype), PRECISION=dot_precision(x.dtype),
            UPCAST=INTERPRET and x.dtype in (torch.bfloat16, torch.float16))
    status[0] = counts.max()
    if K > 1:  # tiles land in any order: sort each row's slots by feature
        valid = slot_mask(idx, counts)
        keys, perm = torch.where(valid, idx, torch.full_like(idx, d_sae)).sort(dim=1)
        idx = torch.where(valid, keys, torch.zeros_like(keys))
        f, pi_gate = f.gather(1, perm), pi_gate.gather(1, perm)
    return f, pi_gate, idx, counts, status
