"""gsae_fast.GatedSAE against the dense reference, on every CPU backend."""
import pytest
import torch

import gsae_fast
from conftest import CPU_BACKENDS, make_params, make_x, rel_err
from gsae_fast import GatedSAE, SparseActs, reference

NAMES = ["W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"]


def random_sae(d_in, d_sae, backend, dtype=torch.float64, seed=0, l0_frac=0.15):
    sae = GatedSAE(d_in, d_sae, dtype=dtype, backend=backend)
    p, W_dec = make_params(d_in, d_sae, dtype, seed=seed, l0_frac=l0_frac)
    with torch.no_grad():
        for k, v in dict(p, W_dec=W_dec).items():
            getattr(sae, k).copy_(v)
    return sae


def ref_params(sae):
    return [getattr(sae, k).detach().double() for k in NAMES]


def test_init_follows_sae_lens():
    sae = GatedSAE(48, 200, dtype=torch.float32)
    assert sae.W_enc.shape == (48, 200) and sae.W_dec.shape == (200, 48)
    for k, n in (("b_dec", 48), ("b_gate", 200), ("r_mag", 200), ("b_mag", 200)):
        assert getattr(sae, k).shape == (n,) and (getattr(sae, k) == 0).all()
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((200,), 0.1), atol=1e-6)
    assert {n for n, _ in sae.named_parameters()} == set(NAMES)
    assert GatedSAE(4, 8, dtype=torch.bfloat16).W_enc.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_encode_decode_forward(backend, lead):
    d_in, d_sae = 17, 61
    sae = random_sae(d_in, d_sae, backend)
    x = make_x((*lead, d_in))
    W_enc, W_dec, b_dec, b_gate, r_mag, b_mag = ref_params(sae)
    f_ref = reference.encode(x, W_enc, b_dec, b_gate, r_mag, b_mag)
    f = sae.encode(x)
    assert f.shape == (*lead, d_sae) and f.dtype == x.dtype
    assert rel_err(f, f_ref) < 1e-12
    acts = sae.encode_sparse(x)
    assert isinstance(acts, SparseActs) and acts.counts.shape == lead
    x_ref = reference.decode(f_ref, W_dec, b_dec)
    assert rel_err(sae.decode(acts), x_ref) < 1e-12
    assert rel_err(sae.decode(f), x_ref) < 1e-12
    assert rel_err(sae(x), x_ref) < 1e-12
    with pytest.raises(ValueError, match="d_sae=61"):
        sae.decode(torch.zeros(3, 60, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_grads(backend, dtype):
    d_in, d_sae = 21, 90
    sae = random_sae(d_in, d_sae, backend, dtype=dtype)
    x = make_x((4, 10, d_in), dtype)
    out = sae.loss(x, 0.02, sparsity="decoder_norm", aux="shared")
    out.loss.backward()
    ref_t = [t.clone().requires_grad_() for t in ref_params(sae)]
    W_enc, W_dec, b_dec, b_gate, r_mag, b_mag = ref_t
    ref = reference.gated_sae_loss(x.double(), W_enc, W_dec, b_dec, b_gate, r_mag, b_mag, 0.02,
                                   sparsity="decoder_norm", aux="shared")
    ref.loss.backward()
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert rel_err(out.loss, ref.loss) < tol
    for k, t in zip(NAMES, ref_t):
        assert rel_err(getattr(sae, k).grad, t.grad) < 5 * tol, k


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_capacity_hint_follows_l0(backend):
    # L0 ~ 8 of 400: the hint stays under the dense switch (DENSE_SWITCH_FRACTION * d_sae)
    sae = random_sae(16, 400, backend, dtype=torch.float32, l0_frac=0.02)
    assert sae.encode_sparse(make_x((50, 16), torch.float32)).max_count < 40
    sae._capacity = None
    x = make_x((50, 16), torch.float32)
    assert sae._capacity is None
    acts = sae.encode_sparse(x)
    assert sae._capacity == gsae_fast.ops.next_capacity(acts.max_count, 400)
    out = sae.loss(x, 0.1)
    assert out.acts.capacity == sae._capacity  # no overflow, no re-run
    with torch.no_grad():
        sae.b_gate.add_(10.0)  # L0 jumps: one re-run with the exact capacity, then a new hint
    acts = sae.encode_sparse(x)
    assert acts.max_count == 400 and sae._capacity == 400


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        GatedSAE(4, 8, backend="gpu")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        GatedSAE(4, 8, backend="cuda")
    sae = GatedSAE(4, 8, backend="reference")
    assert sae(torch.randn(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="positive"):
        GatedSAE(0, 8)


def test_auto_picks_the_compiled_cpu_kernels_when_built():
    expected = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert gsae_fast.backends.resolve("auto", "cpu") == expected


def test_training_step_reduces_loss():
    """A few Adam steps on the kernels lower the loss as they do on the reference."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    losses = {}
    for backend in CPU_BACKENDS:
        torch.manual_seed(1)
        sae = GatedSAE(32, 128, backend=backend)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        hist = []
        for _ in range(20):
            opt.zero_grad()
            out = sae.loss(x, 1e-2)
            out.loss.backward()
            opt.step()
            hist.append(out.loss.item())
        assert hist[-1] < 0.9 * hist[0]
        losses[backend] = hist
    for backend, hist in losses.items():  # every executor follows the reference's trajectory
        ref = losses["reference"]
        assert max(abs(u - v) / abs(v) for u, v in zip(hist, ref)) < 1e-4, backend


def test_package_works_without_the_extension():
    """A machine where nothing compiled still gets a working package on the reference path,
    with one warning saying what is missing, and a clear error for backend="cpu"."""
    import subprocess
    import sys
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import gsae_fast\n"
        "assert any('compiled kernels not available' in str(m.message) for m in w), w\n"
        "assert gsae_fast.available_backends('cpu') == ['reference']\n"
        "sae = gsae_fast.GatedSAE(6, 20)\n"
        "out = sae.loss(torch.randn(5, 6), 0.1); out.loss.backward()\n"
        "acts = sae.encode_sparse(torch.randn(5, 6))\n"
        "try:\n"
        "    gsae_fast.GatedSAE(6, 20, backend='cpu')\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "print('ok')\n")
    env = dict(__import__("os").environ, GSAE_FAST_DISABLE_EXT="1")
    env.pop("TRITON_INTERPRET", None)  # no interpreted Triton either: only the reference is left
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
