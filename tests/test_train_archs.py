"""The trainer for every architecture: each learns the synthetic features, resumes bitwise after
a kill, and takes the step SAELens' trainer takes (float64: loss, every gradient, the updated
parameters); bad configurations are refused in one line."""
import json

import pytest
import torch
from test_peers import assert_rel

import gsae_fast
from gsae_fast import BatchTopKSAE, GatedSAE, JumpReLUSAE, TopKSAE
from gsae_fast.synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from gsae_fast.train import TrainConfig, Trainer

ARCHS = ("gated", "jumprelu", "topk", "batchtopk")
CLASSES = dict(gated=GatedSAE, jumprelu=JumpReLUSAE, topk=TopKSAE, batchtopk=BatchTopKSAE)
SMALL = SyntheticConfig(d_in=16, n_features=40, target_l0=4)

# Per architecture, a recipe that learns the demo's synthetic features in 400 steps.
LEARN = dict(gated=dict(lr=1e-2, l1_coefficient=1.5, sparsity_warmup_steps=100),
             jumprelu=dict(lr=3e-3, l1_coefficient=0.2, sparsity_warmup_steps=100),
             topk=dict(lr=3e-3, k=8), batchtopk=dict(lr=3e-3, k=8))
# The mean max cosine similarity of the decoder rows to the true directions after 400 steps
# with the data's and the trainer's seed 0, 1, 2: gated 0.71 0.72 0.75, jumprelu 0.91 0.88 0.90,
# topk 0.87 0.81 0.82, batchtopk 0.82 0.83 0.81; an untrained decoder scores 0.36. The
# thresholds leave room for float differences between machines.
RECOVERY = dict(gated=0.65, jumprelu=0.8, topk=0.72, batchtopk=0.72)


def small(arch, **kw):
    base = dict(arch=arch, d_sae=48, l1_coefficient=0.5, steps=8, batch_size=64, lr=3e-3,
                warmup_steps=2, sparsity_warmup_steps=3, log_every=1, dead_after_tokens=256,
                k=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_learns_the_synthetic_features(arch, tmp_path):
    data = SyntheticFeatures(SyntheticConfig(d_in=64, n_features=128, target_l0=8),
                             batch_size=1024)
    cfg = TrainConfig(arch=arch, d_sae=256, steps=400, batch_size=1024, warmup_steps=20,
                      log_every=50, dead_after_tokens=200_000, **LEARN[arch])
    tr = Trainer(cfg, 64, data, str(tmp_path))
    records = tr.train()
    assert type(tr.sae) is CLASSES[arch]
    rec = feature_recovery(tr.sae.W_dec.detach(), data.directions).mean().item()
    assert rec > RECOVERY[arch], rec
    assert records[-1]["mse"] < 0.5 * records[0]["mse"]
    if arch in ("topk", "batchtopk"):
        assert records[-1]["l0"] == pytest.approx(8, abs=0.5)
    if arch == "batchtopk":  # the inference threshold was learned and saved
        assert tr.sae.topk_threshold > 0
    loaded = gsae_fast.load(tmp_path / "sae")
    x = next(data)[:64]
    assert type(loaded) is CLASSES[arch]  # (BatchTopK: SAELens' training format)
    torch.testing.assert_close(loaded(x), tr.sae(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_is_exact_for_each_architecture(tmp_path, arch):
    """Killed after step 7 with a checkpoint at 5: the resumed run equals an uninterrupted one
    bitwise (losses, parameters and buffers, e.g. BatchTopK's threshold)."""
    cfg = small(arch, steps=10, checkpoint_every=5, dead_after_tokens=128)
    straight = Trainer(cfg, 16, SyntheticFeatures(SMALL, batch_size=64), str(tmp_path / "a"))
    full = straight.train()
    first = Trainer(cfg, 16, SyntheticFeatures(SMALL, batch_size=64), str(tmp_path / "b"))

    def kill(step, total, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.train(progress=kill)
    second = Trainer(cfg, 16, SyntheticFeatures(SMALL, batch_size=64), str(tmp_path / "b"),
                     resume=True)
    assert second.step == 5
    second.train()
    logged = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 11))
    for a, b in zip(full, logged):
        assert (a["loss"], a["l0"], a["aux"]) == (b["loss"], b["l0"], b["aux"]), (a, b)
    for name, t in straight.sae.state_dict().items():
        assert torch.equal(t, second.sae.state_dict()[name]), name


# --------------------------------------------------------------------- against SAELens' step

def _sae_lens_step(arch, theirs, x, cfg, dead):
    """SAELens' SAETrainer._train_step on ``theirs``: the training forward pass, backward,
    gradient norm clipped at 1, Adam."""
    from sae_lens.saes.sae import TrainStepInput
    coefficients = {"gated": {"l1": cfg.l1_coefficient}, "jumprelu": {"l0": cfg.l1_coefficient}}
    out = theirs.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients=coefficients.get(arch, {}), dead_neuron_mask=dead,
        n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in theirs.named_parameters()}
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    clipped = {n: p.grad.clone() for n, p in theirs.named_parameters()}
    torch.optim.Adam(theirs.parameters(), lr=cfg.lr, betas=cfg.betas).step()
    return out, grads, clipped


SAE_LENS_OPTIONS = dict(
    gated=dict(cfg=dict(decoder="norm_penalty", aux="shared", max_grad_norm=1.0, lr=3e-4,
                        betas=(0.9, 0.999), l1_coefficient=0.3),
               theirs=dict(l1_coefficient=0.3)),
    jumprelu=dict(cfg=dict(l1_coefficient=0.3, pre_act_loss_coefficient=0.01,
                           jumprelu_bandwidth=0.5),
                  theirs=dict(l0_coefficient=0.3, pre_act_loss_coefficient=0.01,
                              jumprelu_bandwidth=0.5)),
    topk=dict(cfg=dict(aux_loss_coefficient=0.5), theirs=dict(aux_loss_coefficient=0.5)),
    batchtopk=dict(cfg=dict(aux_loss_coefficient=0.5), theirs=dict(aux_loss_coefficient=0.5)))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_equals_sae_lens_training_step(arch):
    pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install sae-lens)")
    x = SyntheticFeatures(SMALL, batch_size=64).batch(0).double()
    torch.set_default_dtype(torch.float64)  # the trainer's fp32 masters become fp64
    try:
        opts = SAE_LENS_OPTIONS[arch]
        cfg = small(arch, warmup_steps=0, sparsity_warmup_steps=0, compute_dtype="float64",
                    backend="cpu", **opts["cfg"])
        tr = Trainer(cfg, 16, iter([x]))
        with torch.no_grad():  # not a fresh initialisation: every parameter matters
            g = torch.Generator().manual_seed(1)
            for p in tr.sae.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if arch == "jumprelu":
                tr.sae.threshold.uniform_(0.0, 0.3, generator=g)
        tr.since_fired[::3] = cfg.dead_after_tokens  # some dead features: AuxK, pre-act loss
        dead = tr.since_fired >= cfg.dead_after_tokens
        theirs = tr.sae.to_sae_lens(training=True, **opts["theirs"])
        before = {n: t.clone() for n, t in tr.sae.state_dict().items()}
        record = tr.train_step(x)
        t_out, t_grads, t_clipped = _sae_lens_step(arch, theirs, x, cfg, dead)
    finally:
        torch.set_default_dtype(torch.float32)
    # float64; the sums run in other orders (|relative error| 4e-12 seen)
    assert record["loss"] == pytest.approx(t_out.loss.item(), rel=1e-10)
    ours = dict(tr.sae.named_parameters())
    norm = torch.cat([g.flatten() for g in t_grads.values()]).norm()
    assert norm > 1.0, "the gradient must be clipped for the test to check the clipping"
    # JumpReLU's threshold gradient (the estimators on pre-activations rebuilt from the gate)
    # agrees to 1e-6 (tests/saes/test_jumprelu.py); through the clipping's norm the others then
    # agree to that times the threshold's share of the norm (1.2e-9 seen).
    # (SAELens keeps its threshold in fp32 whatever the dtype: 3.5e-8 after the step.)
    tol = dict(jumprelu=1e-8).get(arch, 1e-10)
    for name, g in t_clipped.items():
        t = 1e-6 if name == "threshold" else tol
        assert_rel(ours[name].grad, g, t, f"grad {name}")
        assert_rel(ours[name].detach(), dict(theirs.named_parameters())[name].detach(), t,
                   f"{name} after the step")
        assert not torch.equal(ours[name].detach(), before[name]), name
    if arch == "batchtopk":  # the threshold moved as SAELens' forward pass moves it
        assert float(tr.sae.topk_threshold) == pytest.approx(float(theirs.topk_threshold),
                                                             rel=1e-12)
        assert float(tr.sae.topk_threshold) > 0


# ------------------------------------------------------------------------------- refusals

def test_bad_architecture_configurations_are_refused():
    with pytest.raises(ValueError, match="arch must be one of"):
        TrainConfig(arch="sparse").check()
    with pytest.raises(ValueError, match="k must be an integer for topk"):
        small("topk", k=2.5).check()
    small("batchtopk", k=2.5).check()  # a mean over the batch
    with pytest.raises(ValueError, match=r"k must be in \(0, d_sae=48\]"):
        small("topk", k=100).check()
    with pytest.raises(ValueError, match="decoder 'norm_penalty' is not one of jumprelu's"):
        small("jumprelu", decoder="norm_penalty").check()
    with pytest.raises(ValueError, match="target_l0 is a jumprelu option"):
        small("topk", target_l0=10).check()
    with pytest.raises(ValueError, match="quadratic"):
        small("jumprelu", jumprelu_sparsity_loss_mode="quadratic").check()
    with pytest.raises(ValueError, match="parallel='feature' trains Gated SAEs only"):
        small("topk", parallel="feature").check()


def test_recipe_defaults_follow_each_architecture():
    gated, topk = TrainConfig(), TrainConfig(arch="topk")
    assert (gated.lr, gated.betas, gated.decoder, gated.max_grad_norm) == \
        (5e-5, (0.0, 0.999), "unit_norm", 0.0)
    assert (topk.lr, topk.betas, topk.decoder, topk.max_grad_norm) == \
        (3e-4, (0.9, 0.999), "free", 1.0)
    assert TrainConfig(arch="jumprelu", lr=1e-3).lr == 1e-3  # a value given wins


# --------------------------------------------------------------------------- normalisation

class Scaled:
    """SyntheticFeatures times ``factor`` (activations far from unit scale), resumable."""

    def __init__(self, factor, **kw):
        self.inner, self.factor = SyntheticFeatures(SMALL, batch_size=64, **kw), factor

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner) * self.factor

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("arch", ["gated", "batchtopk"])
def test_expected_average_only_in_is_estimated_kept_and_folded(tmp_path, arch):
    cfg = small(arch, steps=10, checkpoint_every=5, norm_estimate_batches=3,
                normalize_activations="expected_average_only_in")
    first = Trainer(cfg, 16, Scaled(40.0), str(tmp_path))
    # SAELens' estimate: sqrt(d_in) / the mean norm of the first 3 batches (not trained on)
    probe = Scaled(40.0)
    norms = torch.cat([next(probe).double().norm(dim=-1) for _ in range(3)])
    want = 16 ** 0.5 / norms.mean().item()

    def kill(step, total, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.train(progress=kill)
    assert first.norm_scale == pytest.approx(want, rel=1e-12)
    second = Trainer(cfg, 16, Scaled(40.0), str(tmp_path), resume=True)
    assert second.norm_scale == first.norm_scale  # from the checkpoint, not re-estimated
    second.train()
    straight = Trainer(cfg, 16, Scaled(40.0), str(tmp_path / "straight"))
    straight.train()
    for name, t in straight.sae.state_dict().items():
        assert torch.equal(t, second.sae.state_dict()[name]), name
    # sae/ takes raw activations: the scale is folded in, as SAELens saves it
    x = next(Scaled(40.0))
    saved = gsae_fast.load(tmp_path / "sae")
    torch.testing.assert_close(saved(x), second.sae(x * second.norm_scale) / second.norm_scale,
                               rtol=1e-4, atol=1e-3)
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg_json["normalize_activations"] == "none"
    assert cfg_json["metadata"]["norm_scaling_factor"] == pytest.approx(second.norm_scale)
