"""pytest-benchmark suite of the single ops, per executor, at a moderate shape.

    python -m pytest bench/test_ops_benchmark.py --benchmark-only
    python -m pytest bench/test_ops_benchmark.py --benchmark-only --benchmark-json out.json

Not part of the test suite (CI runs tests/); the training-step comparison with the reference,
the floor and the peers is bench/bench_step.py. L0 is stated in every test id.
"""
import pytest
import torch
from bench_step import BASE, set_l0

import gsae_fast
from gsae_fast import ops

B, D_IN, D_SAE = BASE
BACKENDS = gsae_fast.available_backends("cpu")


def setup(l0, backend):
    torch.manual_seed(0)
    x = torch.randn(B, D_IN)
    sae = gsae_fast.GatedSAE(D_IN, D_SAE, backend=backend)
    set_l0(sae, x, l0)
    with torch.no_grad():
        acts = sae.encode_sparse(x)
    return x, sae, acts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l0", [16, 64, 256])
def test_encode_sparse(benchmark, backend, l0):
    x, sae, _ = setup(l0, backend)
    with torch.no_grad():
        benchmark(sae.encode_sparse, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l0", [16, 64, 256])
def test_sparse_decode_forward_backward(benchmark, backend, l0):
    x, sae, acts = setup(l0, backend)
    f = acts.f.detach().requires_grad_()
    acts = gsae_fast.SparseActs(acts.idx, f, acts.pi_gate.detach(), acts.counts, D_SAE)
    g = torch.randn(B, D_IN)

    def run():
        out = ops.sparse_decode(acts, sae.W_dec, sae.b_dec, backend=backend)
        torch.autograd.grad(out, [f, sae.W_dec], g)

    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l0", [16, 64, 256])
def test_loss_forward_backward(benchmark, backend, l0):
    x, sae, _ = setup(l0, backend)

    def run():
        sae.zero_grad(set_to_none=True)
        sae.loss(x, 1e-3).loss.backward()

    benchmark(run)


def test_gemm_floor(benchmark):
    x = torch.randn(B, D_IN)
    W = torch.randn(D_IN, D_SAE)
    benchmark(torch.mm, x, W)
