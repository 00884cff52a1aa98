"""Every GPU executor ("triton", "cuda") at real sizes against the float64 reference, in every
dtype, forward and backward, with both decoder-gradient scatters (marked ``gpu``: skipped
without a CUDA device)."""
import pytest
import torch

from conftest import GPU_TOL, loss_and_grads_twice, make_params, make_x, rel_err
from gsae_fast import ops, reference

EXECUTORS = ["triton", "cuda"]


@pytest.fixture
def scatter():
    """set(backend, mode): the grad W_dec scatter for one test (one setting for every executor:
    backends.set_scatter), restored after."""
    from gsae_fast import backends
    yield lambda backend, mode: backends.set_scatter(mode)
    backends.set_scatter(None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EXECUTORS)
def test_auto_backend_is_triton_on_cuda(backend):
    from gsae_fast import backends
    assert backends.resolve("auto", "cuda") == "triton"
    assert backends.why_unavailable(backend, torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EXECUTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 768, 24576), (1000, 2304, 16411)])
def test_gpu_encode_decode_at_real_sizes(backend, dtype, shape):
    B, d_in, d_sae = shape
    p, W_dec = make_params(d_in, d_sae, dtype, l0_frac=64 / d_sae, device="cuda")
    x = make_x((B, d_in), dtype, device="cuda")
    acts = ops.gated_encode(x, *p.values(), capacity=64, backend=backend)
    x64, p64 = x.double(), {k: v.double() for k, v in p.items()}
    pi_ref, _ = reference.pre_activations(x64, *p64.values())
    f_ref = reference.encode(x64, *p64.values())
    # fp32 accumulation in another order can flip a gate within rounding of zero: allow 1e-5.
    flips = (acts.counts.long() - (pi_ref > 0).sum(-1)).abs().sum().item()
    assert flips <= 1e-5 * B * d_sae + 1
    assert rel_err(acts.to_dense(), f_ref) < GPU_TOL[dtype] * 10
    x_hat = ops.sparse_decode(acts, W_dec, p["b_dec"], backend=backend)
    x_hat_ref = acts.to_dense(torch.float64) @ W_dec.double() + p["b_dec"].double()
    assert rel_err(x_hat, x_hat_ref) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EXECUTORS)
@pytest.mark.parametrize("mode", ["grouped", "atomic"])
@pytest.mark.parametrize("dtype", list(GPU_TOL))
def test_gpu_loss_and_grads_at_real_sizes(scatter, backend, mode, dtype):
    scatter(backend, mode)
    B, d_in, d_sae = (512, 256, 4096) if dtype == torch.float64 else (2048, 1024, 16384)
    p, W_dec = make_params(d_in, d_sae, dtype, l0_frac=64 / d_sae, device="cuda")
    x = make_x((B, d_in), dtype, device="cuda")
    names = ["W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"]

    def run(fn, cast):
        t = {k: cast(v).requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
        xx = cast(x).requires_grad_()
        out = fn(xx, *[t[k] for k in names], 0.05, sparsity="decoder_norm", aux="shared")
        out.loss.backward()
        return out, dict({k: t[k].grad for k in names}, x=xx.grad)

    out, grads = run(lambda *a, **k: ops.gated_sae_loss(*a, **k, backend=backend, capacity=128),
                     lambda v: v.clone())
    ref, ref_grads = run(reference.gated_sae_loss, lambda v: v.double())
    tol = GPU_TOL[dtype]
    for field in ("loss", "mse", "sparsity", "aux"):
        assert rel_err(getattr(out, field), getattr(ref, field)) < tol, field
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) < tol * 5, k


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EXECUTORS)
@pytest.mark.parametrize("mode", ["grouped", "atomic"])
@pytest.mark.parametrize("sparsity", ["unit", "decoder_norm"])
def test_gpu_deterministic_mode_is_bitwise_reproducible(scatter, backend, mode, sparsity):
    """What a user asks for with torch.use_deterministic_algorithms(True): two runs of the loss
    and its backward bit for bit equal, whichever scatter was set (the atomic one is overridden)
    and with decoder-norm sparsity (its per-feature index_add is deterministic only in that
    mode). cuBLAS needs CUBLAS_WORKSPACE_CONFIG for it (set in conftest.py)."""
    scatter(backend, mode)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = loss_and_grads_twice(backend, (1024, 512, 8192), device="cuda",
                                             sparsity=sparsity)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
