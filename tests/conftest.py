"""Shared fixtures: random Gated SAE parameters and inputs, tolerances, the executors to test."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter (read when the
# kernels are decorated, so before gsae_fast.kernels is imported): the "triton" backend then
# joins the CPU executors below and every op test runs on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests that run under torch.use_deterministic_algorithms(True) on a GPU: cuBLAS (at::mm, the
# CUDA executor's encoder GEMM) refuses to run deterministically without this (read when the
# first cuBLAS handle is made, so before any GPU matmul).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import gsae_fast  # noqa: E402

# Every op-level executor that runs on CPU here ("reference" = gsae_fast.torch_executor).
CPU_BACKENDS = gsae_fast.available_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bounds against the float64 reference, per input dtype: the loss and its gradients
# on the CPU executors (small shapes), and every GPU executor at real sizes (tests marked gpu).
LOSS_TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2e-2}
GPU_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def emulated_schedule(order: str, seed: int = 0) -> None:
    """The order in which the emulated CUDA executor runs blocks and threads from now on
    ("forward", "reverse", "shuffle" with a seed; see csrc/emu/runtime.h)."""
    torch.ops.gsae_fast_emu.set_schedule(order, seed)


def default_emulated_schedule() -> tuple[str, int]:
    """The schedule this test run started with (GSAE_FAST_EMU_SCHEDULE, as the emulator reads
    it)."""
    value = os.environ.get("GSAE_FAST_EMU_SCHEDULE", "forward")
    if value.startswith("shuffle"):
        return "shuffle", int(value.partition(":")[2] or 0)
    return value, 0


def make_params(d_in, d_sae, dtype=torch.float64, l0_frac=0.15, seed=0, device="cpu"):
    """Random parameters (nothing zero) with b_gate set so about l0_frac of features fire."""
    g = torch.Generator().manual_seed(seed)
    p = dict(
        W_enc=torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in ** 0.5,
        b_dec=0.1 * torch.randn(d_in, generator=g, dtype=torch.float64),
        b_gate=0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64),
        r_mag=0.3 * torch.randn(d_sae, generator=g, dtype=torch.float64),
        b_mag=0.2 * torch.randn(d_sae, generator=g, dtype=torch.float64),
    )
    # z ~ N(0, ~1): a shift of b_gate by the normal quantile gives the wanted active fraction.
    if l0_frac is not None:
        q = min(max(1 - l0_frac, 1e-4), 1 - 1e-4)  # 0 and 1 would shift b_gate to -inf / inf
        normal = torch.distributions.Normal(0, 1)
        p["b_gate"] -= normal.icdf(torch.tensor(q, dtype=torch.float64)).item()
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64) / d_sae ** 0.5
    return {k: v.to(dtype=dtype, device=device) for k, v in p.items()}, W_dec.to(dtype=dtype,
                                                                                device=device)


def make_x(shape, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def params64(p):
    return {k: v.double() for k, v in p.items()}


def loss_and_grads_twice(backend, shape, device="cpu", sparsity="decoder_norm"):
    """Two runs of the loss (shared aux) and its backward on the same inputs: [loss, grads...]
    per run, for determinism checks."""
    from gsae_fast import ops
    B, d_in, d_sae = shape
    p, W_dec = make_params(d_in, d_sae, torch.float32, l0_frac=0.3, device=device)
    x = make_x((B, d_in), torch.float32, device=device)
    runs = []
    for _ in range(2):
        t = {k: v.clone().requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
        out = ops.gated_sae_loss(x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"], t["r_mag"],
                                 t["b_mag"], 0.1, sparsity=sparsity, aux="shared",
                                 backend=backend)
        out.loss.backward()
        runs.append([out.loss.detach()] + [v.grad for v in t.values()])
    return runs

