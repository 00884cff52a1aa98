"""What a trained SAE carries for SAELens (gsae_fast.interop.training_metadata) and the input
scale folded into its weights (fold_input_scale), against the real SAELens package: the
checkpoint loads with sae_lens' load_from_disk with its metadata and hyperparameters, for every
architecture; a folded SAE on raw inputs computes what the unfolded one did on scaled inputs,
with the weights SAELens' own fold gives."""
import copy
import json

import pytest
import torch

from gsae_fast import interop
from gsae_fast.saes import ARCHS

D_IN, D_SAE, K, BATCH = 12, 40, 5, 33
SCALE = 0.37
TOL = dict(rtol=1e-10, atol=1e-12)
# (architecture, rescale_acts_by_decoder_norm)
CASES = [("gated", False), ("jumprelu", False), ("topk", False), ("topk", True),
         ("batchtopk", False), ("batchtopk", True)]


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install "
                                                  "gsae_fast[interop])")


def random_sae(arch: str, rescale: bool = False, seed: int = 0):
    """An SAE of ``arch`` with random float64 weights: some JumpReLU gates shut, a BatchTopK
    threshold that drops some of the activations."""
    torch.manual_seed(seed)
    kw = {} if arch in ("gated", "jumprelu") else dict(k=K, rescale_acts_by_decoder_norm=rescale)
    sae = ARCHS[arch].cls(D_IN, D_SAE, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, dtype=torch.float64) * 0.5)
        if arch == "batchtopk":
            sae.topk_threshold.fill_(0.3)
    return sae


def sae_lens_loader(sae_lens, arch):
    # SAELens has BatchTopK as a training class only
    return sae_lens.TrainingSAE if arch == "batchtopk" else sae_lens.SAE


@pytest.mark.parametrize("layer, hook", [
    ("resid:6", "blocks.6.hook_resid_post"),
    ("attn:0", "blocks.0.hook_attn_out"),
    ("mlp:11", "blocks.11.hook_mlp_out"),
    ("transformer.h.6", "blocks.6.hook_resid_post"),
    ("transformer.h.2.attn", "blocks.2.hook_attn_out"),
    ("h.3.mlp", "blocks.3.hook_mlp_out"),  # GPT2Model, without the LM head's wrapper
    ("model.layers.4.self_attn", "blocks.4.hook_attn_out"),
    ("layers.4", "blocks.4.hook_resid_post"),
    ("gpt_neox.layers.1.attention", "blocks.1.hook_attn_out"),
    ("gpt_neox.layers.1.mlp", "blocks.1.hook_mlp_out"),
    ("transformer.h.6.ln_1", "transformer.h.6.ln_1"),  # no TransformerLens hook: as it is
    ("model.norm", "model.norm"),
    ("resid:x", "resid:x"),
])
def test_transformer_lens_hook(layer, hook):
    assert interop.transformer_lens_hook(layer) == hook


def test_training_metadata_reads_the_data_record():
    described = {"model": "/m/gpt2", "layer": "mlp:3", "data": ["/d/a.txt"], "context_len": 64,
                 "prepend_bos": True, "exclude_special_tokens": True}
    assert interop.training_metadata(described) == dict(
        model_name="/m/gpt2", hook_name="blocks.3.hook_mlp_out", hook_head_index=None,
        context_size=64, prepend_bos=True, exclude_special_tokens=True,
        dataset_path="/d/a.txt", layer="mlp:3")
    several = interop.training_metadata(dict(described, data=["/d/a.txt", "/d/b.txt"]))
    assert several["dataset_path"] == ["/d/a.txt", "/d/b.txt"]
    # a cache names neither the model nor the layer: the caller does; unknown fields are None
    meta = interop.training_metadata({"cache": "/c/acts", "n_tokens": 10},
                                     layer="transformer.h.2", model_name="gpt2",
                                     context_size=128, prepend_bos=False)
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["layer"] == "transformer.h.2"
    assert meta["dataset_path"] == "/c/acts" and meta["model_name"] == "gpt2"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is False
    assert interop.training_metadata({})["hook_name"] is None
    json.dumps(meta)  # cfg.json holds it


@pytest.mark.parametrize("arch, rescale", CASES)
def test_sae_lens_loads_the_metadata_and_hyperparameters(sae_lens, tmp_path, arch, rescale):
    sae = random_sae(arch, rescale)
    described = {"model": "/m/gpt2", "layer": "resid:6", "data": ["/d/a.txt"],
                 "context_len": 128, "prepend_bos": True}
    sae.sae_lens_metadata = interop.training_metadata(described)
    sae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and "hook_name" not in cfg
    theirs = sae_lens_loader(sae_lens, arch).load_from_disk(tmp_path)
    meta = theirs.cfg.metadata
    assert meta.hook_name == "blocks.6.hook_resid_post" and meta.layer == "resid:6"
    assert meta.model_name == "/m/gpt2" and meta.context_size == 128
    assert meta.prepend_bos is True and meta.dataset_path == "/d/a.txt"
    assert theirs.cfg.normalize_activations == "none"
    for name in ARCHS[arch].hyper:
        assert getattr(theirs.cfg, name) == getattr(sae, name), name
    for name in ARCHS[arch].params + ARCHS[arch].buffers:
        assert torch.equal(getattr(theirs, name).detach(), getattr(sae, name).detach()), name
    back = interop.load(tmp_path)
    assert back.sae_lens_metadata["hook_name"] == "blocks.6.hook_resid_post"


@pytest.mark.parametrize("arch, rescale", CASES)
def test_folded_sae_on_raw_inputs_equals_the_sae_on_scaled_inputs(arch, rescale):
    sae = random_sae(arch, rescale, seed=1)
    x = torch.randn(BATCH, D_IN, dtype=torch.float64) * 3
    expected = sae(x * SCALE) / SCALE
    active = sae.encode(x * SCALE) != 0
    folded = interop.fold_input_scale(copy.deepcopy(sae), SCALE)
    torch.testing.assert_close(folded(x), expected, **TOL)
    assert torch.equal(folded.encode(x) != 0, active)  # the same features fire
    assert 0 < int(active.sum()) < active.numel()
    if not rescale:  # the pre-activations are the same, so are the activations
        torch.testing.assert_close(folded.encode(x), sae.encode(x * SCALE), **TOL)


@pytest.mark.parametrize("arch, rescale", CASES)
def test_fold_gives_sae_lens_fold_and_is_recorded_as_sae_lens_does(sae_lens, tmp_path, arch,
                                                                   rescale):
    sae = random_sae(arch, rescale, seed=2)
    theirs = sae.to_sae_lens(training=arch == "batchtopk")
    theirs.fold_activation_norm_scaling_factor(SCALE)
    interop.fold_input_scale(sae, SCALE)
    for name in ARCHS[arch].params + ARCHS[arch].buffers:
        ours, th = getattr(sae, name).detach(), getattr(theirs, name).detach()
        torch.testing.assert_close(ours.to(th.dtype), th, rtol=0, atol=0, msg=name)
    assert theirs.cfg.normalize_activations == "none"
    sae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["norm_scaling_factor"] == SCALE
    loaded = sae_lens_loader(sae_lens, arch).load_from_disk(tmp_path)
    assert loaded.cfg.normalize_activations == "none"
    if arch != "batchtopk":  # (SAELens' BatchTopK forward is the training one)
        x = torch.randn(BATCH, D_IN, dtype=torch.float64)
        torch.testing.assert_close(loaded(x), theirs(x), **TOL)


def test_fold_records_the_product_and_refuses_bad_scales():
    sae = random_sae("topk")
    interop.fold_input_scale(interop.fold_input_scale(sae, 2.0), 0.25)
    assert sae.sae_lens_metadata["norm_scaling_factor"] == 0.5
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            interop.fold_input_scale(sae, bad)
