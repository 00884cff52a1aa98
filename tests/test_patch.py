"""gsae_fast.patch_sae_lens / patch_dictionary_learning: existing code gets the same numbers
(outputs, losses, gradients) from the kernels, falls back to the original methods for what the
kernels do not implement, and unpatch restores the classes."""
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

import gsae_fast

D_IN, D_SAE, BATCH = 19, 53, 40


@pytest.fixture
def patched_sae_lens(saelens):
    gsae_fast.patch_sae_lens()
    yield saelens
    gsae_fast.unpatch_sae_lens()


@pytest.fixture
def patched_dl(dictlearn):
    gsae_fast.patch_dictionary_learning()
    yield dictlearn
    gsae_fast.unpatch_dictionary_learning()


def assert_patch_keeps_the_numbers(run, patch, unpatch, cls, name):
    """run() -> (dict of tensors, whether the kernels ran): equal before and after patch()."""
    before, used = run()
    assert not used
    patch()
    try:
        assert getattr(cls, name).__module__ == "gsae_fast.patch"
        after, used = run()
        assert used
    finally:
        unpatch()
    assert getattr(cls, name).__module__ != "gsae_fast.patch"
    assert set(before) == set(after)
    for k in before:
        assert_rel(after[k].detach(), before[k].detach(), TOL64, k)


def sae_lens_outputs(sl, p, x, training):
    sae = saelens_sae(sl, p, training=training)
    out = {"encode": sae.encode(x), "forward": sae(x)}
    if training:
        step = sl.TrainStepInput(sae_in=x, coefficients={"l1": L1}, dead_neuron_mask=None,
                                 n_training_steps=0, is_logging_step=False)
        res = sae.training_forward_pass(step)
        res.loss.backward()
        out.update(loss=res.loss, sae_out=res.sae_out, feature_acts=res.feature_acts.to_dense(),
                   **{k: v for k, v in res.losses.items()},
                   **{f"grad {k}": getattr(sae, k).grad for k in PARAM_NAMES})
    return out, hasattr(sae, "_gsae_fast_capacity")  # set only by the kernel path


@pytest.mark.parametrize("training", [False, True])
def test_patched_sae_lens_gives_the_same_numbers(saelens, training):
    p = make_params(D_IN, D_SAE, seed=21)
    x = make_x((BATCH,), D_IN, seed=21)
    from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE
    cls = GatedTrainingSAE if training else GatedSAE
    assert_patch_keeps_the_numbers(lambda: sae_lens_outputs(saelens, p, x, training),
                                   gsae_fast.patch_sae_lens, gsae_fast.unpatch_sae_lens, cls,
                                   "training_forward_pass" if training else "encode")


def test_patched_sae_lens_feature_acts_are_sparse(patched_sae_lens):
    sae = saelens_sae(patched_sae_lens, make_params(D_IN, D_SAE, seed=2), training=True)
    step = patched_sae_lens.TrainStepInput(sae_in=make_x((BATCH,), D_IN, seed=2),
                                           coefficients={"l1": L1}, dead_neuron_mask=None,
                                           n_training_steps=0, is_logging_step=False)
    out = sae.training_forward_pass(step)
    assert out.feature_acts.is_sparse and out.hidden_pre.is_sparse
    # what SAELens' trainer does with them
    did_fire = out.feature_acts.bool().float().sum(-2).bool().to_dense()
    assert did_fire.shape == (D_SAE,) and did_fire.any()


def test_patched_sae_lens_falls_back_for_hooks(patched_sae_lens):
    sae = saelens_sae(patched_sae_lens, make_params(D_IN, D_SAE, seed=4), training=False)
    x = make_x((BATCH,), D_IN, seed=4)
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.shape) or t * 2)
    assert gsae_fast.patch._sae_lens_ok(sae) is False
    doubled = sae.encode(x)  # the original method, with the hook's effect
    sae.reset_hooks()
    assert seen == [torch.Size([BATCH, D_SAE])]
    assert_rel(doubled, 2 * sae.encode(x), TOL64, "hooked encode")


def test_dictionary_learning_patch_gives_the_same_numbers(dictlearn):
    p = make_params(D_IN, D_SAE, seed=23)
    x = make_x((BATCH,), D_IN, seed=23)

    def run():
        tr = dl_trainer(dictlearn, p, L1, sparsity_warmup_steps=100)
        ae = tr.ae
        out = {"encode": ae.encode(x), "gate": ae.encode(x, return_gate=True)[1], "forward": ae(x),
               "features": ae(x, output_features=True)[1]}
        loss = tr.loss(x, step=30)  # inside the sparsity warm-up: the coefficient is scaled
        loss.backward()
        log = tr.loss(x, step=30, logging=True)
        out.update(loss=loss, log_f=log.f, **{f"log {k}": torch.tensor(v)
                                              for k, v in log.losses.items()},
                   **{f"grad {k}": g for k, g in dl_grads_in_our_layout(ae).items()})
        return out, hasattr(ae, "_gsae_fast_capacity")  # set only by the kernel path

    from dictionary_learning.trainers.gdm import GatedSAETrainer
    assert_patch_keeps_the_numbers(run, gsae_fast.patch_dictionary_learning,
                                   gsae_fast.unpatch_dictionary_learning, GatedSAETrainer, "loss")


def test_dictionary_learning_patch_falls_back_for_normalize_decoder(patched_dl):
    ae = load_dl_params(patched_dl.GatedAutoEncoder(D_IN, D_SAE),
                        make_params(D_IN, D_SAE, seed=5))
    x = make_x((BATCH,), D_IN, seed=5)
    f = ae.encode(x, normalize_decoder=True)
    norms = ae.decoder.weight.norm(dim=0, keepdim=True)
    assert_rel(f, ae.encode(x) * norms, TOL64, "normalize_decoder")


def test_fallback_works_for_subclasses(patched_sae_lens):
    """A subclass of a patched class falls back to the original method, not to itself."""
    from sae_lens.saes.gated_sae import GatedSAE

    class MySAE(GatedSAE):
        pass

    base = saelens_sae(patched_sae_lens, make_params(D_IN, D_SAE, seed=6), training=False)
    sae = MySAE(base.cfg)
    sae.load_state_dict(base.state_dict())
    x = make_x((BATCH,), D_IN, seed=6)
    plain = sae.encode(x)  # kernel path
    sae.hook_sae_acts_post.add_hook(lambda t, hook: t * 3)
    assert_rel(sae.encode(x), 3 * plain, TOL64, "hooked subclass encode")


def test_dictionary_learning_patch_promotes_dtypes_like_torch(patched_dl, dictlearn):
    """bf16 activations into an fp32 autoencoder: the original promotes, so does the patch."""
    ae = load_dl_params(dictlearn.GatedAutoEncoder(D_IN, D_SAE),
                        {k: v.float() for k, v in make_params(D_IN, D_SAE, seed=8).items()})
    x = make_x((BATCH,), D_IN, seed=8, dtype=torch.bfloat16)
    patched = ae(x)
    gsae_fast.unpatch_dictionary_learning()
    try:
        original = ae(x)
    finally:
        gsae_fast.patch_dictionary_learning()
    assert patched.dtype == original.dtype == torch.float32
    assert_rel(patched, original, 1e-5, "bf16 input, fp32 autoencoder")
