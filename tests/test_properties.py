"""Property tests over shapes, L0 and capacity guesses (hypothesis)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import CPU_BACKENDS, make_params, make_x, rel_err  # noqa: E402
from gsae_fast import ops, reference  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(0, 40),
    lead=st.sampled_from([(), (2,), (3, 1)]),
    d_in=st.integers(1, 45),
    d_sae=st.integers(1, 90),
    l0_frac=st.floats(0.0, 1.0),
    cap=st.one_of(st.none(), st.integers(0, 100)),
    backend=st.sampled_from(CPU_BACKENDS),
    seed=st.integers(0, 10_000),
)
def test_encode_decode_loss_any_shape(B, lead, d_in, d_sae, l0_frac, cap, backend, seed):
    p, W_dec = make_params(d_in, d_sae, torch.float64, l0_frac=l0_frac, seed=seed)
    x = make_x((*lead, B, d_in), seed=seed + 1)
    acts = ops.gated_encode(x, *p.values(), capacity=cap, backend=backend)
    f_ref = reference.encode(x, *p.values())
    assert acts.counts.shape == (*lead, B)
    assert torch.equal(acts.counts.long(), (f_ref.new_ones(()) * (
        reference.pre_activations(x, *p.values())[0] > 0)).sum(-1).long())
    assert torch.allclose(acts.to_dense(), f_ref, rtol=1e-12, atol=1e-12)
    x_hat = ops.sparse_decode(acts, W_dec, p["b_dec"], backend=backend)
    assert torch.allclose(x_hat, reference.decode(f_ref, W_dec, p["b_dec"]), rtol=1e-10,
                          atol=1e-12)
    if x.shape[:-1].numel():
        out = ops.gated_sae_loss(x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"],
                                 p["b_mag"], 0.1, backend=backend, capacity=cap)
        ref = reference.gated_sae_loss(x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"],
                                       p["r_mag"], p["b_mag"], 0.1)
        assert rel_err(out.loss, ref.loss) < 1e-10
