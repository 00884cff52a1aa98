"""JumpReLU SAEs on the Gated kernels against SAELens' JumpReLUSAE / JumpReLUTrainingSAE and
dictionary_learning's JumpReluAutoEncoder: encode, forward, the training loss in every sparsity
mode and every gradient (the threshold's straight-through ones included); converters,
checkpoints and the Gated <-> JumpReLU equivalence."""
import math

import pytest
import torch
from test_peers import TOL64, assert_rel, dictlearn, make_x  # noqa: F401

import gsae_fast
from conftest import CPU_BACKENDS
from gsae_fast import GatedSAE, JumpReLUSAE
from gsae_fast.interop import UnsupportedSAEError

D_IN, D_SAE, BATCH = 13, 47, 37
NAMES = ("W_enc", "W_dec", "b_dec", "b_enc", "threshold")
BANDWIDTH = 0.4  # wide, so that many pre-activations fall in the estimators' band


def make_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    p = dict(W_enc=randn(D_IN, D_SAE) / math.sqrt(D_IN), W_dec=randn(D_SAE, D_IN) / math.sqrt(D_IN),
             b_dec=0.3 * randn(D_IN), b_enc=0.3 * randn(D_SAE),
             threshold=(0.5 + 0.3 * randn(D_SAE)).abs())
    p["threshold"] = p["threshold"].float().double()  # SAELens keeps the threshold in fp32
    return {k: v.to(dtype) for k, v in p.items()}


@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens.saes.jumprelu_sae", reason="sae-lens not installed")


def sae_lens_sae(sl, p, training=False, **cfg):
    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float64", device="cpu")
    sae = (sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(**common, **cfg)) if training
           else sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common)))
    with torch.no_grad():
        for k in NAMES:
            getattr(sae, k).copy_(p[k])
    return sae


def dictlearn_jumprelu(p):
    import dictionary_learning.dictionary as dl
    ae = dl.JumpReluAutoEncoder(D_IN, D_SAE).double()
    with torch.no_grad():
        for k in NAMES:
            getattr(ae, k).copy_(p[k])
    return ae


def ours_with(p, backend="auto"):
    m = JumpReLUSAE(D_IN, D_SAE, dtype=torch.float64, backend=backend)
    with torch.no_grad():
        for k in NAMES:
            getattr(m, k).copy_(p[k])
    return m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encode_and_forward_match_sae_lens(sl, backend):
    p = make_params(1)
    theirs = sae_lens_sae(sl, p)
    m = ours_with(p, backend)
    x = make_x((BATCH,), D_IN, seed=1)
    f = theirs.encode(x)
    assert 0.05 < (f > 0).double().mean() < 0.6
    assert_rel(m.encode(x), f, TOL64, "encode")
    assert_rel(m(x), theirs(x), TOL64, "forward")


MODES = [dict(jumprelu_sparsity_loss_mode="step"),
         dict(jumprelu_sparsity_loss_mode="step", jumprelu_ste_to_input=True),
         dict(jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=2.5),
         dict(jumprelu_sparsity_loss_mode="quadratic", target_l0=6.0),
         dict(jumprelu_sparsity_loss_mode="step", pre_act_loss_coefficient=0.3)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_training_loss_and_grads_match_sae_lens(sl, backend, mode):
    p = make_params(2)
    x = make_x((BATCH,), D_IN, seed=2)
    coef = 0.7
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::5] = True
    theirs = sae_lens_sae(sl, p, training=True, jumprelu_bandwidth=BANDWIDTH, **mode)
    step = sl.TrainStepInput(sae_in=x, coefficients={"l0": coef}, dead_neuron_mask=dead,
                             n_training_steps=0, is_logging_step=False)
    t_out = theirs.training_forward_pass(step)
    t_out.loss.backward()

    m = ours_with(p, backend)
    opts = dict(bandwidth=BANDWIDTH, sparsity_mode=mode["jumprelu_sparsity_loss_mode"],
                ste_to_input=mode.get("jumprelu_ste_to_input", False),
                tanh_scale=mode.get("jumprelu_tanh_scale", 4.0),
                target_l0=mode.get("target_l0"),
                pre_act_loss_coefficient=mode.get("pre_act_loss_coefficient"),
                dead_neuron_mask=dead)
    out = m.loss(x, coef, **opts)
    out.loss.backward()
    assert_rel(out.loss.detach(), t_out.loss.detach(), TOL64, "loss")
    assert_rel(out.mse.detach(), t_out.losses["mse_loss"].detach(), TOL64, "mse")
    assert_rel(out.l0_loss.detach(), t_out.losses["l0_loss"].detach(), TOL64, "l0_loss")
    if "pre_act_loss" in t_out.losses:
        assert out.pre_act_loss.item() > 0
        assert_rel(out.pre_act_loss.detach(), t_out.losses["pre_act_loss"].detach(), TOL64,
                   "pre_act_loss")
    assert_rel(out.x_hat.detach(), t_out.sae_out.detach(), TOL64, "x_hat")
    assert theirs.threshold.grad.abs().sum() > 0  # the band is not empty: the check has power
    for k in NAMES:  # SAELens keeps the threshold (so its gradient) in fp32
        tol = 1e-6 if k == "threshold" else TOL64
        assert_rel(getattr(m, k).grad, getattr(theirs, k).grad, tol, f"grad {k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dims_and_dense_switch(backend):
    """[2, n, d_in] inputs give the flattened batch's loss; a capacity hint above the dense
    switch takes the dense path, with the same numbers."""
    p = make_params(6)
    x = make_x((2, 9), D_IN, seed=6)
    flat = ours_with(p, backend).loss(x.reshape(18, D_IN), 0.3, bandwidth=BANDWIDTH)
    m = ours_with(p, backend)
    lead = m.loss(x, 0.3, bandwidth=BANDWIDTH)
    assert lead.x_hat.shape == x.shape
    assert_rel(lead.loss.detach(), flat.loss.detach(), TOL64, "leading dims")
    m._capacity = D_SAE  # as after a batch with near-dense rows
    dense = m.loss(x, 0.3, bandwidth=BANDWIDTH)
    assert dense.f is not None and dense.acts is None
    assert_rel(dense.loss.detach(), flat.loss.detach(), TOL64, "dense switch")
    # the dense path reports the band's largest row, so the hint can fall back below the switch
    assert m._capacity == gsae_fast.ops.next_capacity(dense.max_count, D_SAE)
    assert dense.max_count == lead.max_count or backend == "reference"


def test_bf16_weights_with_an_fp32_threshold():
    """SAELens trains bf16 SAEs with an fp32 threshold: the loss takes it (cast at use)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    p = make_params(7)
    x = make_x((BATCH,), D_IN, seed=7)
    b16 = {k: (v.float() if k == "threshold" else v.to(torch.bfloat16)) for k, v in p.items()}
    args = [b16[k] for k in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold")]
    out = gsae_fast.jumprelu.jumprelu_sae_loss(x.to(torch.bfloat16), *args, 0.5,
                                               bandwidth=BANDWIDTH, backend="cpu")
    ref = gsae_fast.jumprelu.jumprelu_sae_loss(
        x, *[p[k] for k in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold")], 0.5,
        bandwidth=BANDWIDTH, backend="reference")
    assert abs(out.loss.item() - ref.loss.item()) < 0.03 * ref.loss.item()


def test_bad_loss_options():
    m = ours_with(make_params())
    x = make_x((4,), D_IN, seed=0)
    with pytest.raises(ValueError, match="sparsity_mode"):
        m.loss(x, 1.0, sparsity_mode="l1")
    with pytest.raises(ValueError, match="target_l0"):
        m.loss(x, 1.0, sparsity_mode="quadratic")
    with pytest.raises(ValueError, match="bandwidth"):
        m.loss(x, 1.0, bandwidth=0.0)


def test_gated_and_jumprelu_are_the_same_encoder():
    g = GatedSAE(D_IN, D_SAE, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in g.parameters():
            prm.copy_(0.3 * torch.randn(prm.shape, generator=gen, dtype=torch.float64))
    x = make_x((BATCH,), D_IN, seed=3)
    j = g.to_jumprelu()
    assert isinstance(j, JumpReLUSAE)
    assert g.to_jumprelu().backend == "auto"
    if "cpu" in CPU_BACKENDS:  # an explicit backend survives the conversion
        assert GatedSAE(4, 8, backend="cpu").to_jumprelu().to_gated().backend == "cpu"
    assert_rel(j.encode(x), g.encode(x), 1e-12, "gated -> jumprelu")
    assert_rel(j.to_gated().encode(x), j.encode(x), 1e-12, "jumprelu -> gated")
    assert torch.equal(j.to_gated().r_mag, torch.zeros(D_SAE, dtype=torch.float64))


def test_converters_and_checkpoints(sl, dictlearn, tmp_path):
    from sae_lens import SAE
    p = make_params(4)
    x = make_x((BATCH,), D_IN, seed=4)
    theirs = sae_lens_sae(sl, p)
    m = JumpReLUSAE.from_sae_lens(theirs)
    assert_rel(m(x), theirs(x), TOL64, "from_sae_lens")
    assert type(m.to_sae_lens(training=True)).__name__ == "JumpReLUTrainingSAE"
    with pytest.raises(UnsupportedSAEError, match="JumpReLUSAE"):
        GatedSAE.from_sae_lens(theirs)

    m.save_pretrained(tmp_path / "ours")
    loaded = SAE.load_from_disk(tmp_path / "ours")
    assert type(loaded).__name__ == "JumpReLUSAE"
    assert_rel(loaded(x), theirs(x), TOL64, "SAELens loads ours")
    back = gsae_fast.load(tmp_path / "ours")
    assert isinstance(back, JumpReLUSAE)
    for k in NAMES:
        assert torch.equal(getattr(back, k), p[k]), k
    with pytest.raises(UnsupportedSAEError, match="JumpReLUSAE"):
        GatedSAE.load(tmp_path / "ours")

    ae = m.to_dictionary_learning()
    assert type(ae).__name__ == "JumpReluAutoEncoder"
    assert_rel(ae(x), theirs(x), TOL64, "to_dictionary_learning")
    assert_rel(JumpReLUSAE.from_dictionary_learning(ae)(x), theirs(x), TOL64,
               "from_dictionary_learning")
    # dictionary_learning's own default: no centring (its trainer's ae.pt files): folded into b_enc
    native = dictlearn_jumprelu(p)
    assert native.apply_b_dec_to_input is False
    assert_rel(JumpReLUSAE.from_dictionary_learning(native)(x), native(x), TOL64, "uncentred")
    with pytest.raises(UnsupportedSAEError, match="share=True"):
        JumpReLUSAE.from_dictionary_learning(native, share=True)
    torch.save(native.state_dict(), tmp_path / "ae.pt")
    from_disk = gsae_fast.load(tmp_path)
    assert isinstance(from_disk, JumpReLUSAE)
    assert_rel(from_disk(x), native(x), TOL64, "ae.pt")
    # ours -> dictionary_learning -> its ae.pt -> ours: its (uncentred) convention round-trips
    torch.save(m.to_dictionary_learning().state_dict(), tmp_path / "ae.pt")
    assert_rel(gsae_fast.load(tmp_path)(x), m(x), TOL64, "our ae.pt")


def test_sparse_training_never_builds_the_dense_matrix():
    """The sparse path's slot tensors are [tokens, K] with K well below d_sae."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    m = JumpReLUSAE(D_IN, 400, backend="cpu")
    with torch.no_grad():
        m.threshold.fill_(0.3)
    x = torch.randn(BATCH, D_IN)
    for _ in range(2):  # the second call sizes its capacity from the first
        out = m.loss(x, 0.5)
    assert out.acts is not None and out.f is None
    assert out.max_count < out.acts.capacity < 100


def test_threshold_stays_fp32_beside_half_weights(tmp_path):
    m = JumpReLUSAE(D_IN, D_SAE, dtype=torch.bfloat16)
    assert m.W_enc.dtype == torch.bfloat16 and m.threshold.dtype == torch.float32
    m = JumpReLUSAE(D_IN, D_SAE).to(torch.float16)
    assert m.W_enc.dtype == torch.float16 and m.threshold.dtype == torch.float32
    m.to(torch.bfloat16).save_pretrained(tmp_path)
    back = gsae_fast.load(tmp_path)
    assert back.W_dec.dtype == torch.bfloat16 and back.threshold.dtype == torch.float32
    assert torch.equal(back.threshold, m.threshold)
