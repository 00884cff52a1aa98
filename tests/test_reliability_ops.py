"""Nothing silently wrong at the op boundary: user-built SparseActs validated with one error
text on every executor (indices and counts out of range, shapes that disagree), NaN / Inf
per-feature parameters refused by the encode (the magnitude path's relu would hide them), dtype
mixes refused on every backend, and the loss under torch.compile(fullgraph=True)."""
import pytest
import torch

from conftest import CPU_BACKENDS, make_params, make_x, rel_err
from gsae_fast import GatedSAE, SparseActs, ops

D_IN, D_SAE = 8, 16


def _acts(idx, counts, d_sae=D_SAE):
    idx = torch.tensor(idx, dtype=torch.int32)
    counts = torch.tensor(counts, dtype=torch.int32)
    v = torch.rand(idx.shape) + 0.5
    return SparseActs(idx, v, v.clone(), counts, d_sae)


BAD_ACTS = [
    ("index past d_sae", lambda: _acts([[1, 5000]], [2]),
     r"acts.idx holds feature indices from 1 to 5000 on active slots; they must be within "
     r"\[0, d_sae=16\)"),
    ("negative index", lambda: _acts([[-2, 3]], [2]), r"from -2 to 3 on active slots"),
    ("count past K", lambda: _acts([[1, 2]], [3]),
     r"acts.counts must be within \[0, K=2\] \(the slots per row\), got values from 3 to 3"),
    ("negative count", lambda: _acts([[1, 2]], [-1]), r"got values from -1 to -1"),
    ("values of another shape", lambda: SparseActs(
        torch.zeros(1, 2, dtype=torch.int32), torch.zeros(3), torch.zeros(3),
        torch.tensor([1], dtype=torch.int32), D_SAE),
     r"acts.f must be a floating-point tensor of acts.idx's shape \[1, 2\]"),
    ("counts of another shape", lambda: SparseActs(
        torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2), torch.zeros(2, 2),
        torch.tensor([1], dtype=torch.int32), D_SAE),
     r"acts.counts must be int32 of shape \[2\]"),
    ("int64 indices", lambda: SparseActs(
        torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2), torch.zeros(1, 2),
        torch.tensor([1], dtype=torch.int32), D_SAE), r"acts.idx must be an int32 tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,make,message", BAD_ACTS, ids=[c[0] for c in BAD_ACTS])
def test_bad_sparse_acts_give_one_error_on_every_executor(backend, case, make, message):
    W = make_x((D_SAE, D_IN), torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.sparse_decode(make(), W, backend=backend)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.sparse_decode_pair(make(), W, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_good_sparse_acts_are_checked_once_and_encoder_outputs_never(backend, monkeypatch):
    a = _acts([[1, 15], [0, 0]], [2, 0])
    W = make_x((D_SAE, D_IN), torch.float64)
    a = SparseActs(a.idx, a.f.double(), a.pi_gate.double(), a.counts, D_SAE)
    out = ops.sparse_decode(a, W, backend=backend)
    assert a.checked
    assert rel_err(out, a.to_dense(torch.float64) @ W) < 1e-12
    p, _ = make_params(D_IN, D_SAE, torch.float32)
    acts = ops.gated_encode(make_x((5, D_IN), torch.float32), *p.values(), backend=backend)
    assert acts.checked  # the encoders' own outputs skip the check


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,value,message", [
    ("b_mag", float("nan"), r"b_mag holds NaN/Inf at feature\(s\) \[5\] \(1 in all\)"),
    ("b_gate", float("inf"), r"b_gate holds NaN/Inf at feature\(s\) \[5\]"),
    ("r_mag", float("nan"), r"exp\(r_mag\) overflows or r_mag is NaN at feature\(s\) \[5\]"),
    ("r_mag", 89.0, r"exp\(r_mag\) overflows or r_mag is NaN at feature\(s\) \[5\]"),
])
def test_non_finite_feature_parameters_are_refused(backend, name, value, message):
    """With b_mag[5] = NaN the magnitude path's relu returned a finite loss (the reference a NaN
    one); exp(89) overflows fp32."""
    sae = GatedSAE(D_IN, D_SAE, backend=backend)
    with torch.no_grad():
        getattr(sae, name)[5] = value
    x = make_x((4, D_IN), torch.float32)
    if backend == "reference":  # the dense oracle: the NaN / Inf shows in the loss itself
        assert not torch.isfinite(sae.loss(x, 0.1).loss)
        return
    with pytest.raises(ValueError, match=message):
        sae.loss(x, 0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dtype_mixes_are_refused_on_every_backend(backend):
    sae = GatedSAE(D_IN, D_SAE, backend=backend)
    x64 = make_x((4, D_IN), torch.float64)
    message = "W_enc has dtype torch.float32 but x has torch.float64; all inputs must share"
    for call in (lambda: sae.loss(x64, 0.1), lambda: sae(x64), lambda: sae.encode(x64)):
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(TypeError, match="b_gate has dtype torch.float64 but x has"):
        ops.gated_sae_loss(make_x((4, D_IN), torch.float32), sae.W_enc, sae.W_dec, sae.b_dec,
                           sae.b_gate.double(), sae.r_mag, sae.b_mag, 0.1, backend=backend)
    with pytest.raises(TypeError, match="W_dec has dtype torch.float32 but acts has"):
        sae.decode(make_x((4, D_SAE), torch.float64))


def test_the_loss_compiles_as_one_graph():
    """torch.compile(fullgraph=True): the backend is chosen at trace time, the capacity protocol
    stays in the graph; loss and gradients as in eager mode."""
    torch.manual_seed(0)
    sae = GatedSAE(D_IN, D_SAE, backend="cpu" if "cpu" in CPU_BACKENDS else "reference")
    x = make_x((6, D_IN), torch.float32)

    def step(x):
        return sae.loss(x, 0.1).loss

    eager = step(x)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(x)
    compiled.backward()
    assert rel_err(compiled.detach(), eager.detach()) < 1e-6
    for n, p in sae.named_parameters():
        assert rel_err(p.grad, grads[n]) < 1e-5, n
