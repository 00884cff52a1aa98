"""Parity of ``gsae_fast.reference`` with the two public Gated SAE implementations.

* SAELens (``pip install sae-lens``): ``sae_lens.saes.gated_sae.GatedSAE`` / ``GatedTrainingSAE``.
  Its training loss is ours with ``sparsity="decoder_norm", aux="shared"``.
* dictionary_learning (``pip install --no-deps dictionary-learning einops tqdm``):
  ``GatedAutoEncoder`` and ``trainers.gdm.GatedSAETrainer``. Its loss is ours with
  ``sparsity="unit", aux="frozen"``.

Each group skips (``pytest.importorskip``) when its peer is not installed; see
requirements-peers.txt and requirements-peers-nodeps.txt. Everything runs on the CPU, in float64
(relative error ``|ours - peer| / |peer|`` at most 1e-12), plus a float32 forward check at 1e-5.
Parameters are random (not the peers' zero/unit init), the decoder rows have non-unit norms (so
``decoder_norm`` and ``unit`` sparsity differ), and ``b_gate`` is chosen so that roughly a third of
the gates are open; the data also contain open gates whose magnitude path is negative (f = 0).
Shapes have d_in and d_sae that are not multiples of 8.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch

from gsae_fast import reference as ref

# (d_in, d_sae, batch): none of d_in, d_sae a multiple of 8.
SHAPES = [(5, 13, 7), (17, 45, 33), (30, 97, 64)]
LEADING = [(2, 3), (4, 1, 5)]  # leading batch dims for the encode / decode / forward checks
L1 = 0.37
TOL64 = 1e-12
TOL32 = 1e-5
PARAM_NAMES = ("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag")


# --------------------------------------------------------------------------------------- helpers

def make_params(d_in: int, d_sae: int, seed: int, dtype=torch.float64, unit_decoder=False):
    """Random Gated SAE parameters in SAELens layout (ours)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    W_enc = randn(d_in, d_sae) / math.sqrt(d_in)
    # decoder rows with norms spread over about [0.5, 1.5]
    W_dec = randn(d_sae, d_in) / math.sqrt(d_in)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    if not unit_decoder:
        W_dec = W_dec * (0.5 + torch.rand(d_sae, 1, generator=g, dtype=torch.float64))
    p = dict(
        W_enc=W_enc,
        W_dec=W_dec,
        b_dec=0.3 * randn(d_in),
        b_gate=0.5 * randn(d_sae) - 0.3,  # z ~ N(0, ~1): roughly 30-45% of the gates open
        r_mag=0.3 * randn(d_sae),
        b_mag=0.2 * randn(d_sae),
    )
    return {k: v.to(dtype) for k, v in p.items()}


def make_x(shape, d_in: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(10_000 + seed)
    return (torch.randn(*shape, d_in, generator=g, dtype=torch.float64) + 0.1).to(dtype)


def rel_err(actual, expected) -> float:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel(actual, expected, tol, what):
    e = rel_err(actual, expected)
    assert e <= tol, f"{what}: |ours - peer| / |peer| = {e:.3e} > {tol:.0e}"


def ref_encode(x, p):
    return ref.encode(x, p["W_enc"], p["b_dec"], p["b_gate"], p["r_mag"], p["b_mag"])


def ref_loss_and_grads(x, p, l1, sparsity, aux):
    """Our loss and the gradients of its total w.r.t. every parameter and the input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    xl = x.detach().clone().requires_grad_(True)
    out = ref.gated_sae_loss(xl, leaves["W_enc"], leaves["W_dec"], leaves["b_dec"],
                             leaves["b_gate"], leaves["r_mag"], leaves["b_mag"], l1,
                             sparsity=sparsity, aux=aux)
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in PARAM_NAMES] + [xl])
    return out, dict(zip(PARAM_NAMES + ("x",), grads))


def check_data_is_interesting(x, p):
    """The test data exercise both branches of the gate and of the magnitude ReLU."""
    pi_gate, pi_mag = ref.pre_activations(x, p["W_enc"], p["b_dec"], p["b_gate"], p["r_mag"],
                                          p["b_mag"])
    frac = (pi_gate > 0).double().mean().item()
    assert 0.1 < frac < 0.9, f"fraction of open gates {frac:.2f}"
    assert ((pi_gate > 0) & (pi_mag <= 0)).any(), "no open gate with a negative magnitude path"
    assert ((pi_gate > 0) & (pi_mag > 0)).any()


# ------------------------------------------------------------------------------------- SAELens

@pytest.fixture(scope="module")
def saelens():
    mod = pytest.importorskip("sae_lens.saes.gated_sae",
                              reason="sae-lens not installed (pip install sae-lens)")
    sae_mod = pytest.importorskip("sae_lens.saes.sae", reason="sae-lens not installed")
    return types.SimpleNamespace(GatedSAE=mod.GatedSAE, GatedSAEConfig=mod.GatedSAEConfig,
                                 GatedTrainingSAE=mod.GatedTrainingSAE,
                                 GatedTrainingSAEConfig=mod.GatedTrainingSAEConfig,
                                 TrainStepInput=sae_mod.TrainStepInput)


def saelens_sae(sl, p, training: bool, l1: float = L1):
    """A SAELens Gated SAE carrying our parameters.

    The config is explicit about what our reference assumes: apply_b_dec_to_input=True (the
    input is centred by b_dec before the encoder) and normalize_activations="none" (no input
    scaling), plus the dtype of the parameters.
    """
    d_in, d_sae = p["W_enc"].shape
    dtype = {torch.float64: "float64", torch.float32: "float32"}[p["W_enc"].dtype]
    common = dict(d_in=d_in, d_sae=d_sae, dtype=dtype, device="cpu",
                  apply_b_dec_to_input=True, normalize_activations="none")
    if training:
        sae = sl.GatedTrainingSAE(sl.GatedTrainingSAEConfig(**common, l1_coefficient=l1))
    else:
        sae = sl.GatedSAE(sl.GatedSAEConfig(**common))
    assert sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.normalize_activations == "none"
    params = dict(sae.named_parameters())
    assert set(params) == set(PARAM_NAMES), sorted(params)
    with torch.no_grad():
        for k in PARAM_NAMES:
            assert params[k].shape == p[k].shape and params[k].dtype == p[k].dtype, k
            params[k].copy_(p[k])
    return sae


@pytest.mark.parametrize("training", [False, True], ids=["GatedSAE", "GatedTrainingSAE"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_saelens_encode_decode_forward(saelens, shape, training):
    d_in, d_sae, batch = shape
    p = make_params(d_in, d_sae, seed=d_sae)
    x = make_x((batch,), d_in, seed=d_sae)
    check_data_is_interesting(x, p)
    sae = saelens_sae(saelens, p, training)
    with torch.no_grad():
        f_ref = ref_encode(x, p)
        f = sae.encode(x)
        assert_rel(f, f_ref, TOL64, "encode")
        assert_rel(sae.decode(f_ref), ref.decode(f_ref, p["W_dec"], p["b_dec"]), TOL64, "decode")
        assert_rel(sae(x), ref.decode(f_ref, p["W_dec"], p["b_dec"]), TOL64, "forward")
        # same support: exactly the same features are nonzero
        assert torch.equal(f != 0, f_ref != 0)


def check_module_against_reference(model, x, p, tol, what):
    """A peer module's encode, decode and forward on x equal the reference's, shape and dtype
    included."""
    with torch.no_grad():
        f_ref = ref_encode(x, p)
        assert f_ref.shape == (*x.shape[:-1], p["W_enc"].shape[1]) and f_ref.dtype == x.dtype
        f = model.encode(x)
        assert f.shape == f_ref.shape and f.dtype == x.dtype
        assert_rel(f, f_ref, tol, f"encode {what}")
        x_hat_ref = ref.decode(f_ref, p["W_dec"], p["b_dec"])
        assert_rel(model.decode(f_ref), x_hat_ref, tol, f"decode {what}")
        assert_rel(model(x), x_hat_ref, tol, f"forward {what}")


@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "x".join(map(str, s)))
def test_saelens_leading_batch_dims(saelens, lead):
    d_in, d_sae = 17, 45
    p = make_params(d_in, d_sae, seed=1)
    x = make_x(lead, d_in, seed=1)
    check_module_against_reference(saelens_sae(saelens, p, training=False), x, p, TOL64,
                                   "[..., d]")


def test_saelens_float32(saelens):
    d_in, d_sae, batch = 30, 97, 64
    p = make_params(d_in, d_sae, seed=3, dtype=torch.float32)
    x = make_x((batch,), d_in, seed=3, dtype=torch.float32)
    check_module_against_reference(saelens_sae(saelens, p, training=False), x, p, TOL32, "fp32")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_saelens_training_loss_and_grads(saelens, shape):
    d_in, d_sae, batch = shape
    p = make_params(d_in, d_sae, seed=100 + d_sae)
    x = make_x((batch,), d_in, seed=100 + d_sae)
    check_data_is_interesting(x, p)

    ours, g_ours = ref_loss_and_grads(x, p, L1, sparsity="decoder_norm", aux="shared")

    sae = saelens_sae(saelens, p, training=True)
    xl = x.clone().requires_grad_(True)
    step = saelens.TrainStepInput(sae_in=xl, coefficients={"l1": L1}, dead_neuron_mask=None,
                                  n_training_steps=0, is_logging_step=False)
    out = sae.training_forward_pass(step)
    assert set(out.losses) == {"mse_loss", "l1_loss", "auxiliary_reconstruction_loss"}
    assert_rel(ours.loss.detach(), out.loss.detach(), TOL64, "total loss")
    assert_rel(ours.mse.detach(), out.losses["mse_loss"].detach(), TOL64, "mse")
    # SAELens' l1_loss already includes the coefficient, as does GatedLoss.sparsity
    assert_rel(ours.sparsity.detach(), out.losses["l1_loss"].detach(), TOL64, "l1 term")
    assert_rel(ours.aux.detach(), out.losses["auxiliary_reconstruction_loss"].detach(), TOL64,
               "aux term")
    assert_rel(ours.x_hat.detach(), out.sae_out.detach(), TOL64, "x_hat")

    params = dict(sae.named_parameters())
    g_theirs = torch.autograd.grad(out.loss, [params[k] for k in PARAM_NAMES] + [xl])
    for name, g in zip(PARAM_NAMES + ("x",), g_theirs):
        assert_rel(g_ours[name], g, TOL64, f"d loss / d {name}")

    # L0 convention: ours counts open gates (pi_gate > 0); SAELens' trainer logs
    # feature_acts.bool() (f != 0), which leaves out open gates whose magnitude path is <= 0.
    gates_open = ((x - p["b_dec"]) @ p["W_enc"] + p["b_gate"] > 0).sum(-1).double().mean()
    assert ours.l0.item() == pytest.approx(gates_open.item())
    their_l0 = out.feature_acts.detach().bool().double().sum(-1).mean().item()
    assert ours.l0.item() >= their_l0

    # The comparison has power: the other conventions do not match SAELens.
    frozen, g_frozen = ref_loss_and_grads(x, p, L1, sparsity="decoder_norm", aux="frozen")
    assert rel_err(g_frozen["W_dec"], g_ours["W_dec"]) > 1e-6
    unit = ref.gated_sae_loss(x, *(p[k] for k in PARAM_NAMES), L1, sparsity="unit",
                              aux="shared")
    assert rel_err(unit.sparsity, out.losses["l1_loss"].detach()) > 1e-6


# --------------------------------------------------------------------------- dictionary_learning

def _import_dictionary_learning():
    reason = ("dictionary-learning or one of its needed deps (einops, tqdm) not installed "
              "(pip install --no-deps dictionary-learning einops tqdm)")
    if importlib.util.find_spec("dictionary_learning") is None:
        pytest.importorskip("dictionary_learning", reason=reason)  # skips
    # The package __init__ imports dictionary_learning.buffer, which does
    # `from nnsight import LanguageModel` at import time; nnsight (and its torch/transformers pins)
    # is not needed for the autoencoder or the trainer's loss, so a stub stands in for it when
    # the real one is absent. It is only used during the import and removed afterwards, so no
    # other test sees it. No other dependency needs a stub: the modules imported here
    # (dictionary, buffer, config, trainers/*) need only torch, einops and tqdm.
    stubbed = False
    if "nnsight" not in sys.modules and importlib.util.find_spec("nnsight") is None:
        stub = types.ModuleType("nnsight")
        stub.__doc__ = "stub registered by tests/test_peers.py"

        class LanguageModel:  # noqa: D401 - placeholder only
            def __init__(self, *args, **kwargs):
                raise RuntimeError("nnsight stub: LanguageModel is not available")

        stub.LanguageModel = LanguageModel
        sys.modules["nnsight"] = stub
        stubbed = True
    try:
        dl = pytest.importorskip("dictionary_learning", reason=reason)
        gdm = pytest.importorskip("dictionary_learning.trainers.gdm", reason=reason)
        top_k = pytest.importorskip("dictionary_learning.trainers.top_k", reason=reason)
        batch_top_k = pytest.importorskip("dictionary_learning.trainers.batch_top_k",
                                          reason=reason)
    finally:
        if stubbed:
            sys.modules.pop("nnsight", None)
    return types.SimpleNamespace(GatedAutoEncoder=dl.GatedAutoEncoder,
                                 GatedSAETrainer=gdm.GatedSAETrainer,
                                 AutoEncoderTopK=top_k.AutoEncoderTopK,
                                 TopKTrainer=top_k.TopKTrainer,
                                 BatchTopKSAE=batch_top_k.BatchTopKSAE,
                                 BatchTopKTrainer=batch_top_k.BatchTopKTrainer)


@pytest.fixture(scope="module")
def dictlearn():
    return _import_dictionary_learning()


def load_dl_params(ae, p):
    """Copy our parameters (SAELens layout) into a dictionary_learning GatedAutoEncoder."""
    ae.to(p["W_enc"].dtype)
    mapping = {
        "encoder.weight": p["W_enc"].T,   # nn.Linear(d_in, d_sae): weight [d_sae, d_in]
        "decoder.weight": p["W_dec"].T,   # nn.Linear(d_sae, d_in): weight [d_in, d_sae]
        "decoder_bias": p["b_dec"],
        "gate_bias": p["b_gate"],
        "mag_bias": p["b_mag"],
        "r_mag": p["r_mag"],
    }
    params = dict(ae.named_parameters())
    assert set(params) == set(mapping), sorted(params)
    with torch.no_grad():
        for k, v in mapping.items():
            assert params[k].shape == v.shape and params[k].dtype == v.dtype, k
            params[k].copy_(v)
    return ae


def dl_grads_in_our_layout(ae):
    return {
        "W_enc": ae.encoder.weight.grad.T,
        "W_dec": ae.decoder.weight.grad.T,
        "b_dec": ae.decoder_bias.grad,
        "b_gate": ae.gate_bias.grad,
        "r_mag": ae.r_mag.grad,
        "b_mag": ae.mag_bias.grad,
    }


def dl_trainer(dictlearn, p, l1, sparsity_warmup_steps=None):
    d_in, d_sae = p["W_enc"].shape
    trainer = dictlearn.GatedSAETrainer(
        steps=10_000, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="none",
        l1_penalty=l1, warmup_steps=0, sparsity_warmup_steps=sparsity_warmup_steps,
        device="cpu", wandb_name=None)
    load_dl_params(trainer.ae, p)
    return trainer


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dictlearn_encode_decode_forward(dictlearn, shape):
    d_in, d_sae, batch = shape
    p = make_params(d_in, d_sae, seed=200 + d_sae)
    x = make_x((batch,), d_in, seed=200 + d_sae)
    check_data_is_interesting(x, p)
    ae = load_dl_params(dictlearn.GatedAutoEncoder(d_in, d_sae), p)
    with torch.no_grad():
        f_ref = ref_encode(x, p)
        f, f_gate = ae.encode(x, return_gate=True)
        assert_rel(f, f_ref, TOL64, "encode")
        pi_gate, _ = ref.pre_activations(x, p["W_enc"], p["b_dec"], p["b_gate"], p["r_mag"],
                                         p["b_mag"])
        assert_rel(f_gate, torch.relu(pi_gate), TOL64, "relu(pi_gate)")
        assert torch.equal(f != 0, f_ref != 0)
        x_hat_ref = ref.decode(f_ref, p["W_dec"], p["b_dec"])
        assert_rel(ae.decode(f_ref), x_hat_ref, TOL64, "decode")
        x_hat, f2 = ae(x, output_features=True)
        assert_rel(x_hat, x_hat_ref, TOL64, "forward")
        assert_rel(f2, f_ref, TOL64, "forward features")


@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "x".join(map(str, s)))
def test_dictlearn_leading_batch_dims(dictlearn, lead):
    d_in, d_sae = 17, 45
    p = make_params(d_in, d_sae, seed=2)
    x = make_x(lead, d_in, seed=2)
    ae = load_dl_params(dictlearn.GatedAutoEncoder(d_in, d_sae), p)
    check_module_against_reference(ae, x, p, TOL64, "[..., d]")


def test_dictlearn_float32(dictlearn):
    d_in, d_sae, batch = 30, 97, 64
    p = make_params(d_in, d_sae, seed=4, dtype=torch.float32)
    x = make_x((batch,), d_in, seed=4, dtype=torch.float32)
    ae = load_dl_params(dictlearn.GatedAutoEncoder(d_in, d_sae), p)
    check_module_against_reference(ae, x, p, TOL32, "fp32")


@pytest.mark.parametrize("unit_decoder", [False, True], ids=["free_decoder", "unit_decoder"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dictlearn_trainer_loss_and_grads(dictlearn, shape, unit_decoder):
    d_in, d_sae, batch = shape
    p = make_params(d_in, d_sae, seed=300 + d_sae, unit_decoder=unit_decoder)
    x = make_x((batch,), d_in, seed=300 + d_sae)
    check_data_is_interesting(x, p)

    ours, g_ours = ref_loss_and_grads(x, p, L1, sparsity="unit", aux="frozen")

    # sparsity_warmup_steps=None: the l1 scale is 1 at every step (see the warm-up test below)
    trainer = dl_trainer(dictlearn, p, L1)
    xl = x.clone().requires_grad_(True)
    loss = trainer.loss(xl, step=0)
    assert_rel(ours.loss.detach(), loss.detach(), TOL64, "total loss")
    ae = trainer.ae
    g_theirs = torch.autograd.grad(loss, [ae.encoder.weight, ae.decoder.weight, ae.decoder_bias,
                                          ae.gate_bias, ae.r_mag, ae.mag_bias, xl])
    g_theirs = dict(zip(PARAM_NAMES + ("x",),
                        [g_theirs[0].T, g_theirs[1].T, *g_theirs[2:]]))
    for name in PARAM_NAMES + ("x",):
        assert_rel(g_ours[name], g_theirs[name], TOL64, f"d loss / d {name}")

    # the same through .backward() into .grad (how GatedSAETrainer.update uses it), before the
    # ConstrainedAdam projection, which belongs to the optimizer step, not to the loss
    trainer.ae.zero_grad(set_to_none=True)
    trainer.loss(x, step=0).backward()
    for name, g in dl_grads_in_our_layout(trainer.ae).items():
        assert_rel(g_ours[name], g, TOL64, f".grad of {name}")

    # the logged components: its sparsity_loss is the plain L1 (without the coefficient)
    log = trainer.loss(x, step=0, logging=True).losses
    assert log["mse_loss"] == pytest.approx(ours.mse.item(), rel=TOL64)
    assert L1 * log["sparsity_loss"] == pytest.approx(ours.sparsity.item(), rel=TOL64)
    assert log["aux_loss"] == pytest.approx(ours.aux.item(), rel=TOL64)
    assert log["loss"] == pytest.approx(ours.loss.item(), rel=TOL64)

    # The comparison has power: the SAELens aux convention does not match.
    _, g_shared = ref_loss_and_grads(x, p, L1, sparsity="unit", aux="shared")
    assert rel_err(g_shared["W_dec"], g_theirs["W_dec"]) > 1e-6
    if not unit_decoder:
        dn = ref.gated_sae_loss(x, *(p[k] for k in PARAM_NAMES), L1, sparsity="decoder_norm",
                                aux="frozen")
        assert rel_err(dn.loss, loss.detach()) > 1e-6


def test_dictlearn_sparsity_warmup_convention(dictlearn):
    """GatedSAETrainer scales the l1 coefficient by min(step / sparsity_warmup_steps, 1), default
    2000 warm-up steps: at step 0 its loss has no sparsity term at all. gsae_fast takes the
    effective coefficient as an argument."""
    d_in, d_sae, batch = 17, 45, 33
    p = make_params(d_in, d_sae, seed=5)
    x = make_x((batch,), d_in, seed=5)
    trainer = dl_trainer(dictlearn, p, L1, sparsity_warmup_steps=2000)
    for step, scale in [(0, 0.0), (500, 0.25), (2000, 1.0), (5000, 1.0)]:
        ours = ref.gated_sae_loss(x, *(p[k] for k in PARAM_NAMES), L1 * scale, sparsity="unit",
                                  aux="frozen")
        with torch.no_grad():
            theirs = trainer.loss(x, step=step)
        assert_rel(ours.loss, theirs, TOL64, f"loss at step {step}")
