"""Converters and checkpoints (gsae_fast.interop) against the real SAELens and dictionary_learning
packages: converted modules give the originals' outputs, losses and gradients; save -> load round
trips are exact in each direction; unsupported settings raise UnsupportedSAEError."""
import json

import pytest
import torch
from test_peers import (  # noqa: F401
    L1,
    PARAM_NAMES,
    TOL64,
    assert_rel,
    dictlearn,
    dl_grads_in_our_layout,
    dl_trainer,
    load_dl_params,
    make_params,
    make_x,
    saelens,
    saelens_sae,
)

from gsae_fast import GatedSAE, interop
from gsae_fast.interop import UnsupportedSAEError

D_IN, D_SAE, BATCH = 17, 45, 33


def params(seed=0, dtype=torch.float64):
    return make_params(D_IN, D_SAE, seed=seed, dtype=dtype)


def ours_with(p, backend="auto"):
    g = GatedSAE(D_IN, D_SAE, dtype=p["W_enc"].dtype, backend=backend)
    with torch.no_grad():
        for k in PARAM_NAMES:
            getattr(g, k).copy_(p[k])
    return g


def assert_same_params(a, b, exact=True):
    for k in PARAM_NAMES:
        ta, tb = a[k] if isinstance(a, dict) else getattr(a, k), b[k] if isinstance(b, dict) \
            else getattr(b, k)
        assert ta.dtype == tb.dtype and torch.equal(ta.detach(), tb.detach()), k


# ------------------------------------------------------------------------------------- SAELens

@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_from_sae_lens_gives_the_same_outputs(saelens, training, share):
    p = params()
    sae = saelens_sae(saelens, p, training=training)
    g = GatedSAE.from_sae_lens(sae, share=share)
    x = make_x((BATCH,), D_IN, seed=1)
    assert_rel(g.encode(x), sae.encode(x), TOL64, "encode")
    f = sae.encode(x)
    assert_rel(g.decode(f), sae.decode(f), TOL64, "decode")
    assert_rel(g(x), sae(x), TOL64, "forward")
    assert (g.W_enc is sae.W_enc) == share
    with torch.no_grad():
        sae.b_gate.add_(1.0)  # visible through g only when shared
    assert torch.equal(g.b_gate, sae.b_gate) == share


def test_from_sae_lens_training_loss_and_grads(saelens):
    p = params(seed=3)
    sae = saelens_sae(saelens, p, training=True)
    g = GatedSAE.from_sae_lens(sae)
    x = make_x((BATCH,), D_IN, seed=3)
    step = saelens.TrainStepInput(sae_in=x, coefficients={"l1": L1}, dead_neuron_mask=None,
                                  n_training_steps=0, is_logging_step=False)
    theirs = sae.training_forward_pass(step)
    theirs.loss.backward()
    ours = g.loss(x, L1, sparsity="decoder_norm", aux="shared")
    ours.loss.backward()
    assert_rel(ours.loss.detach(), theirs.loss.detach(), TOL64, "loss")
    for k in PARAM_NAMES:
        assert_rel(getattr(g, k).grad, getattr(sae, k).grad, TOL64, f"grad {k}")


@pytest.mark.parametrize("training", [False, True])
def test_to_sae_lens_round_trip(saelens, training):
    g = ours_with(params(seed=5))
    sae = g.to_sae_lens(training=training, **({"l1_coefficient": L1} if training else {}))
    assert type(sae).__name__ == ("GatedTrainingSAE" if training else "GatedSAE")
    x = make_x((BATCH,), D_IN, seed=5)
    assert_rel(sae(x), g(x), TOL64, "forward")
    assert_same_params(GatedSAE.from_sae_lens(sae), g)
    shared = g.to_sae_lens(share=True)
    assert shared.W_dec is g.W_dec


def test_sae_lens_settings_gsae_fast_lacks_are_refused(saelens):
    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float64", device="cpu")
    sae = saelens.GatedSAE(saelens.GatedSAEConfig(**common, apply_b_dec_to_input=False))
    with pytest.raises(UnsupportedSAEError, match="apply_b_dec_to_input"):
        GatedSAE.from_sae_lens(sae)
    sae = saelens.GatedSAE(saelens.GatedSAEConfig(**common, normalize_activations="layer_norm"))
    with pytest.raises(UnsupportedSAEError, match="normalize_activations='layer_norm'"):
        GatedSAE.from_sae_lens(sae)
    sae = saelens.GatedSAE(saelens.GatedSAEConfig(**common), use_error_term=True)
    with pytest.raises(UnsupportedSAEError, match="use_error_term"):
        GatedSAE.from_sae_lens(sae)
    with pytest.raises(UnsupportedSAEError, match="hook_z"):
        interop.check_sae_lens_cfg(dict(common, reshape_activations="hook_z"))
    with pytest.raises(UnsupportedSAEError, match="'standard'"):
        interop.check_sae_lens_cfg(dict(common, architecture="standard"))
    with pytest.raises(TypeError, match="expected a SAELens SAE"):
        GatedSAE.from_sae_lens(torch.nn.Linear(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trips_with_sae_lens(saelens, tmp_path, dtype):
    from sae_lens import SAE
    g = ours_with({k: v.to(dtype) for k, v in params(seed=7).items()})
    g.save_pretrained(tmp_path / "ours")
    theirs = SAE.load_from_disk(tmp_path / "ours")
    assert type(theirs).__name__ == "GatedSAE" and theirs.W_enc.dtype == dtype
    assert_same_params(theirs, g)
    theirs.cfg.metadata["hook_name"] = "blocks.3.hook_resid_post"
    theirs.save_model(tmp_path / "theirs")
    back = GatedSAE.load(tmp_path / "theirs")
    assert_same_params(back, g)
    assert back.sae_lens_metadata["hook_name"] == "blocks.3.hook_resid_post"
    back.save_pretrained(tmp_path / "again")  # the metadata survives our save too
    assert SAE.load_from_disk(tmp_path / "again").cfg.metadata.hook_name == \
        "blocks.3.hook_resid_post"
    assert GatedSAE.load(tmp_path / "ours", dtype="float32").W_enc.dtype == torch.float32


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAELens"):
        GatedSAE.load(tmp_path)
    g = ours_with(params())
    g.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(dict(cfg, architecture="topk")))
    with pytest.raises(UnsupportedSAEError, match="'topk'"):
        GatedSAE.load(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        GatedSAE.load(tmp_path / "a")


# --------------------------------------------------------------------------- dictionary_learning

@pytest.mark.parametrize("share", [False, True])
def test_from_dictionary_learning_gives_the_same_outputs(dictlearn, share):
    p = params(seed=11)
    ae = load_dl_params(dictlearn.GatedAutoEncoder(D_IN, D_SAE), p)
    g = GatedSAE.from_dictionary_learning(ae, share=share)
    assert_same_params(g, p)
    x = make_x((BATCH,), D_IN, seed=11)
    assert_rel(g.encode(x), ae.encode(x), TOL64, "encode")
    assert_rel(g(x), ae(x), TOL64, "forward")
    with torch.no_grad():
        ae.encoder.weight.mul_(2.0)  # visible through g only when shared
    assert torch.equal(g.W_enc, ae.encoder.weight.T) == share


def test_dictionary_learning_loss_and_round_trip(dictlearn):
    p = params(seed=13)
    trainer = dl_trainer(dictlearn, p, L1)
    g = GatedSAE.from_dictionary_learning(trainer.ae)
    x = make_x((BATCH,), D_IN, seed=13)
    theirs = trainer.loss(x, step=10_000)
    theirs.backward()
    ours = g.loss(x, L1, sparsity="unit", aux="frozen")
    ours.loss.backward()
    assert_rel(ours.loss.detach(), theirs.detach(), TOL64, "loss")
    theirs_grads = dl_grads_in_our_layout(trainer.ae)
    for k in PARAM_NAMES:
        assert_rel(getattr(g, k).grad, theirs_grads[k], TOL64, f"grad {k}")
    ae = g.to_dictionary_learning()
    assert type(ae).__name__ == "GatedAutoEncoder"
    assert_rel(ae(x), g(x), TOL64, "forward after to_dictionary_learning")
    assert_same_params(GatedSAE.from_dictionary_learning(ae), g)


def test_dictionary_learning_checkpoint(dictlearn, tmp_path):
    p = params(seed=17)
    ae = load_dl_params(dictlearn.GatedAutoEncoder(D_IN, D_SAE), p)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    cfg = {"trainer": {"dict_class": "GatedAutoEncoder", "activation_dim": D_IN,
                       "dict_size": D_SAE}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = GatedSAE.load(tmp_path)
    assert_same_params(g, p)
    assert g.W_enc.is_contiguous()
    cfg["trainer"]["dict_class"] = "AutoEncoder"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedSAEError, match="'AutoEncoder'"):
        GatedSAE.load(tmp_path)


def test_load_refuses_unknown_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    ours_with(params()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "sae_weights.safetensors")
    save_file(dict(state, scaling_factor=torch.ones(D_SAE, dtype=torch.float64)),
              tmp_path / "sae_weights.safetensors")
    GatedSAE.load(tmp_path)  # a unit scaling factor changes nothing
    save_file(dict(state, scaling_factor=torch.full((D_SAE,), 2.0, dtype=torch.float64)),
              tmp_path / "sae_weights.safetensors")
    with pytest.raises(UnsupportedSAEError, match="scaling_factor"):
        GatedSAE.load(tmp_path)
