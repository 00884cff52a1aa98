"""The Triton executor's own cases (the op tests in test_ops.py also run it, on CPU tensors under
the interpreter): capacity edges, both decoder-gradient scatters, determinism; and, marked
``gpu``, the kernels at real sizes on a GPU in fp32, bf16 and fp16."""
import pytest
import torch

from conftest import loss_and_grads_twice, make_params, make_x, params64, rel_err
from gsae_fast import GatedSAE, SparseActs, available_backends, ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu = the Triton interpreter
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason="triton is not installed")


@pytest.fixture
def scatter():
    """Sets the grad W_dec scatter mode for one test and restores it after."""
    from gsae_fast import kernels
    before = kernels._common._scatter
    yield kernels.set_scatter
    kernels.set_scatter(before)


def dense_ref(x, p):
    x, p = x.double(), params64(p)
    pi_gate, _ = reference.pre_activations(x, *p.values())
    return reference.encode(x, *p.values()), pi_gate


def test_capacity_edges_are_exact():
    """A capacity equal to the largest row count, one less (overflow: re-run) and zero."""
    p, _ = make_params(21, 70, torch.float32, l0_frac=0.2, device=DEVICE)
    x = make_x((45, 21), torch.float32, device=DEVICE)
    f_ref, pi_ref = dense_ref(x, p)
    true_max = int((pi_ref > 0).sum(-1).max())
    for capacity in (true_max, true_max - 1, 0):
        acts = ops.gated_encode(x, *p.values(), capacity=capacity, backend="triton")
        assert acts.max_count == true_max and acts.capacity == true_max, capacity
        assert rel_err(acts.to_dense(), f_ref) < 1e-5


@pytest.mark.parametrize("mode", ["grouped", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decoder_gradient_scatter_modes(scatter, mode, dtype):
    scatter(mode)
    p, W_dec = make_params(19, 83, dtype, l0_frac=0.3, device=DEVICE)
    x = make_x((41, 19), dtype, device=DEVICE)
    acts = ops.gated_encode(x, *p.values(), backend="triton")
    W = W_dec.clone().requires_grad_()
    val = acts.f.detach().requires_grad_()
    a = SparseActs(acts.idx, val, acts.pi_gate, acts.counts, acts.d_sae)
    g = make_x((41, 19), dtype, seed=5, device=DEVICE)
    (ops.sparse_decode(a, W, backend="triton") * g).sum().backward()
    dense = acts.to_dense(torch.float64)
    grad_W_ref = dense.t() @ g.double()
    grad_val_ref = (g.double() @ W_dec.double().t()).gather(1, acts.idx.long()) * acts.mask()
    tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(W.grad, grad_W_ref) < tol
    assert rel_err(val.grad, grad_val_ref) < tol


def test_deterministic_mode_forces_grouped_scatter(scatter):
    from gsae_fast import kernels
    scatter("atomic")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert kernels.scatter_mode() == "grouped"
    finally:
        torch.use_deterministic_algorithms(before)
    assert kernels.scatter_mode() == "atomic"
    with pytest.raises(ValueError, match="scatter mode"):
        kernels.set_scatter("fast")


def test_grouped_backward_is_bitwise_reproducible():
    # "unit": decoder_norm's per-feature sum is torch's index_add, atomic on CUDA
    runs = loss_and_grads_twice("triton", (40, 24, 100), device=DEVICE, sparsity="unit")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_module_runs_on_triton():
    sae = GatedSAE(16, 64, backend="triton", device=DEVICE)
    ref = GatedSAE(16, 64, backend="reference", device=DEVICE)
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(33, 16, device=DEVICE)
    assert rel_err(sae(x), ref(x)) < 1e-5
    out = sae.loss(x, 0.1)
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())


# --------------------------------------------------------------------------------------------
# On a GPU: real sizes, fp32 / bf16 / fp16, against the float64 reference on the same inputs.
# --------------------------------------------------------------------------------------------

def test_kernels_compile_for_hopper_and_ampere():
    """Every kernel and autotune configuration goes through the real Triton compiler (to PTX and
    cubin, ahead of time: no GPU needed) for sm_90 and sm_80 in fp32, bf16 and fp16."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, script, "--arch", "90", "--arch", "80"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.stdout.count("ok ") >= 2 * 3 * 20  # archs x dtypes x kernel configurations


@pytest.mark.parametrize("n,m,transposed", [(0, 5, False), (6, 0, False), (7, 13, False),
                                            (3000, 5, True),
                                            (300, 200, False)])
def test_vec_mat_matches_torch(n, m, transposed):
    """The GEMV behind b_dec @ W_enc and W_enc @ grad: split reductions, any strides."""
    from gsae_fast.kernels import _common
    g = torch.Generator().manual_seed(0)
    A = torch.randn(m, n, generator=g, dtype=torch.float64).t() if transposed else \
        torch.randn(n, m, generator=g, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    A, v = A.to(DEVICE), v.to(DEVICE)
    out = _common.vec_mat(v, A)
    assert out.shape == (m,) and out.dtype == torch.float64
    assert torch.allclose(out, v @ A, rtol=1e-12, atol=1e-12)
