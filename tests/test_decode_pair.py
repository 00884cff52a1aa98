"""The pair decode (gsae_fast::sparse_decode_pair): x_hat and the auxiliary reconstruction of the
Gated SAE loss from one gather of each used W_dec row, forward and backward, on every executor."""
from __future__ import annotations

import pytest
import torch

from conftest import CPU_BACKENDS, DTYPES, make_params, make_x, rel_err
from gsae_fast import ops
from gsae_fast.types import SparseActs

RTOL_OUT = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _acts(backend, dtype, d_in=29, d_sae=71, lead=(3, 5), seed=0, l0_frac=0.15):
    p, W_dec = make_params(d_in, d_sae, dtype, seed=seed, l0_frac=l0_frac)
    x = make_x((*lead, d_in), dtype, seed=seed + 1)
    return ops.gated_encode(x, *p.values(), backend=backend), p, W_dec


def _dense(acts, val):
    return torch.zeros(*acts.counts.shape, acts.d_sae, dtype=torch.float64).scatter_add(
        -1, acts.idx.long(), torch.where(acts.mask(), val, 0).double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("grad_b", [True, False])
def test_pair_matches_reference(backend, dtype, grad_b):
    acts, p, W_dec = _acts(backend, dtype)
    va = acts.f.detach().clone().requires_grad_()
    vb = acts.pi_gate.detach().clone().requires_grad_()
    a = SparseActs(acts.idx, va, vb, acts.counts, acts.d_sae)
    W = W_dec.clone().requires_grad_()
    bias = p["b_dec"].clone().requires_grad_()
    out_a, out_b = ops.sparse_decode_pair(a, W, bias, grad_b=grad_b, backend=backend)
    assert out_a.shape == out_b.shape == (3, 5, W.shape[1]) and out_a.dtype == dtype
    ga, gb = make_x(out_a.shape, dtype, seed=7), make_x(out_a.shape, dtype, seed=8)
    ((out_a.double() * ga.double()).sum() + (out_b.double() * gb.double()).sum()).backward()

    va64, vb64 = (v.detach().double().requires_grad_() for v in (va, vb))
    W64 = W_dec.double().requires_grad_()
    b64 = p["b_dec"].double().requires_grad_()
    ref_a = _dense(acts, va64) @ W64 + b64
    W_b, b_b = (W64, b64) if grad_b else (W64.detach(), b64.detach())
    ref_b = _dense(acts, vb64) @ W_b + b_b
    ((ref_a * ga.double()).sum() + (ref_b * gb.double()).sum()).backward()
    tol = RTOL_OUT[dtype]
    assert rel_err(out_a, ref_a) < tol and rel_err(out_b, ref_b) < tol
    assert rel_err(W.grad, W64.grad) < tol
    assert rel_err(bias.grad, b64.grad) < tol
    vtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(va.grad, va64.grad) < vtol and rel_err(vb.grad, vb64.grad) < vtol
    assert (va.grad[~acts.mask()] == 0).all() and (vb.grad[~acts.mask()] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_equals_two_single_decodes(backend):
    """Forward: each output is the single decode of its values (same sums, same order)."""
    acts, p, W_dec = _acts(backend, torch.float32, d_sae=300, lead=(40,), l0_frac=0.2)
    out_a, out_b = ops.sparse_decode_pair(acts, W_dec, p["b_dec"], backend=backend)
    one_a = ops.sparse_decode(acts, W_dec, p["b_dec"], backend=backend)
    one_b = ops.sparse_decode(acts, W_dec, p["b_dec"], values="pi_gate", backend=backend)
    tol = 0 if backend in ("cpu", "triton") else 1e-6
    assert rel_err(out_a, one_a) <= tol and rel_err(out_b, one_b) <= tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_gradcheck(backend):
    acts, p, W_dec = _acts(backend, torch.float64, d_in=6, d_sae=12, lead=(5,), l0_frac=0.4)
    inputs = [acts.f.detach().clone().requires_grad_(),
              acts.pi_gate.detach().clone().requires_grad_(),
              W_dec.clone().requires_grad_(), p["b_dec"].clone().requires_grad_()]

    def fn(va, vb, W, b):
        return ops.sparse_decode_pair(SparseActs(acts.idx, va, vb, acts.counts, acts.d_sae), W,
                                      b, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_one_output_used(backend):
    """Only one output in the loss: the other's gradient is None inside the autograd."""
    acts, p, W_dec = _acts(backend, torch.float64)
    for which in (0, 1):
        W = W_dec.clone().requires_grad_()
        va = acts.f.detach().clone().requires_grad_()
        vb = acts.pi_gate.detach().clone().requires_grad_()
        outs = ops.sparse_decode_pair(SparseActs(acts.idx, va, vb, acts.counts, acts.d_sae), W,
                                      backend=backend)
        outs[which].sum().backward()
        W1 = W_dec.clone().requires_grad_()
        v1 = (va if which == 0 else vb).detach().clone().requires_grad_()
        single = SparseActs(acts.idx, v1, v1, acts.counts, acts.d_sae)
        ops.sparse_decode(single, W1, backend=backend).sum().backward()
        assert rel_err(W.grad, W1.grad) < 1e-12
        assert rel_err((va, vb)[which].grad, v1.grad) < 1e-12
        assert ((va, vb)[1 - which].grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aux", ["frozen", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_same_as_two_decodes(backend, aux, dtype, monkeypatch):
    """The loss with the pair decode against the loss with two single decodes: same forward,
    gradients equal to rounding (1e-12 in float64)."""
    p, W_dec = make_params(23, 300, dtype, l0_frac=0.05)
    x = make_x((64, 23), dtype)

    def run():
        t = {k: v.clone().requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
        out = ops.gated_sae_loss(x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"], t["r_mag"],
                                 t["b_mag"], 0.1, sparsity="decoder_norm", aux=aux,
                                 backend=backend, capacity=40)
        out.loss.backward()
        return out, {k: v.grad for k, v in t.items()}

    pair, pair_grads = run()
    monkeypatch.setattr(ops, "_DECODE_PAIR", False)
    two, two_grads = run()
    fwd_tol = 1e-12 if dtype == torch.float64 else 1e-6
    if backend in ("cpu", "triton"):  # same sums in the same order: the same bits
        fwd_tol = 0  # (cuda_emulated: the C++ compiler may contract the two loops differently)
    for field in ("loss", "mse", "aux", "sparsity"):
        assert rel_err(getattr(pair, field), getattr(two, field)) <= fwd_tol, field
    gtol = 1e-12 if dtype == torch.float64 else 1e-5
    for k in pair_grads:
        assert rel_err(pair_grads[k], two_grads[k]) < gtol, k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_opcheck(backend):
    acts, p, W_dec = _acts(backend, torch.float32, d_in=6, d_sae=10, lead=(5,), l0_frac=0.4)
    idx, counts = acts.idx, acts.counts
    W = W_dec.requires_grad_()
    b = p["b_dec"].requires_grad_()
    va = acts.f.detach().requires_grad_()
    vb = acts.pi_gate.detach().requires_grad_()
    for grad_b in (True, False):
        torch.library.opcheck(torch.ops.gsae_fast.sparse_decode_pair.default,
                              (idx, va, vb, counts, W, b, grad_b, backend))
    for W_from_b in (True, False):
        torch.library.opcheck(torch.ops.gsae_fast.sparse_decode_pair_backward.default,
                              (torch.randn(5, 6), torch.randn(5, 6), idx, va.detach(),
                               vb.detach(), counts, W.detach(), True, True, True, W_from_b,
                               True, backend))
    torch.library.opcheck(torch.ops.gsae_fast.sparse_decode_pair_backward.default,
                          (torch.randn(5, 6), torch.randn(5, 6), idx, va.detach(), vb.detach(),
                           counts, W.detach(), False, True, False, False, False, backend))


@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda_emulated") if b in CPU_BACKENDS])
@pytest.mark.parametrize("mode", ["grouped", "atomic"])
@pytest.mark.parametrize("W_from_b", [True, False])
def test_pair_decoder_gradient_scatter_modes(backend, mode, W_from_b):
    """grad W_dec of the pair (one scatter over the stacked rows, or the a rows alone) in both
    scatter modes of the executors that have them."""
    acts, p, W_dec = _acts(backend, torch.float32, d_in=19, d_sae=83, lead=(41,), l0_frac=0.3)
    ga, gb = make_x((41, 19), torch.float32, seed=5), make_x((41, 19), torch.float32, seed=6)
    _, _, gW = torch.ops.gsae_fast.sparse_decode_pair_backward(
        ga, gb, acts.idx, acts.f, acts.pi_gate, acts.counts, W_dec, False, False, True,
        W_from_b, mode == "grouped", backend)
    ref = _dense(acts, acts.f).t() @ ga.double()
    if W_from_b:
        ref = ref + _dense(acts, acts.pi_gate).t() @ gb.double()
    assert rel_err(gW, ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_with_no_slots_is_the_bias_twice(backend):
    """Capacity 0 (no slot at all: the value tensors are empty, their data pointers null): both
    outputs are the bias, and the backward gives empty value gradients and a zero grad W_dec."""
    B, d_in, d_sae = 3, 5, 7
    idx = torch.zeros(B, 0, dtype=torch.int32)
    val = torch.zeros(B, 0, dtype=torch.float64)
    counts = torch.zeros(B, dtype=torch.int32)
    W = make_x((d_sae, d_in), torch.float64, seed=2)
    bias = make_x((d_in,), torch.float64, seed=3)
    a, b = torch.ops.gsae_fast.sparse_decode_pair(idx, val, val.clone(), counts, W, bias, True,
                                                  backend)
    assert torch.equal(a, bias.expand(B, d_in)) and torch.equal(b, bias.expand(B, d_in))
    g = make_x((B, d_in), torch.float64, seed=4)
    gva, gvb, gW = torch.ops.gsae_fast.sparse_decode_pair_backward(
        g, g, idx, val, val.clone(), counts, W, True, True, True, True, True, backend)
    assert gva.shape == gvb.shape == (B, 0) and torch.equal(gW, torch.zeros_like(W))
