"""gsae_fast.interp: SAE splicing with an error node, node effects (AtP, IG, exact patching),
ablation and steering, on a tiny random GPT-2 in float64 with two spliced Gated SAEs
(resid:0 and resid:1), on the "cpu" and "reference" executors.

Oracles: the unspliced model (splicing is the identity), SFC's dense formulation (dense
activation and error leaves set through the splice, gradients by autograd), manual
interventions through the splice context, and a model whose logits are linear in the last
spliced layer's output (there AtP, IG and exact patching must agree exactly)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gsae_fast
from gsae_fast import activations as A
from gsae_fast import interp
from gsae_fast.types import SparseActs

transformers = pytest.importorskip("transformers")

LAYERS = ("resid:0", "resid:1")
BACKENDS = ["cpu", "reference"]
D, D_SAE, B, POS = 32, 64, 2, 8
A_TOK, B_TOK = 5, 7


def metric(logits):
    """Logit difference at the last position, summed over the batch."""
    return (logits[:, -1, A_TOK] - logits[:, -1, B_TOK]).sum()


def _tokens():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 100, (B, POS), generator=g)
    patch = clean.clone()
    patch[:, 3] = (patch[:, 3] + 17) % 100  # positions 0..2 stay clean at every layer
    patch[:, 6] = (patch[:, 6] + 5) % 100
    return clean, patch


def _random_sae(x, seed, frac=0.2):
    """A GatedSAE with a real gate: W_enc scaled to the layer's activations and b_gate at the
    (1 - frac) quantile of each feature's pre-activation on these activations, so ~frac of the
    features fire (gates are not within rounding of the threshold); magnitudes start at a positive
    offset above the gate (a real jump)."""
    g = torch.Generator().manual_seed(seed)
    xs = x.reshape(-1, D)
    sd = xs.std()
    sae = gsae_fast.GatedSAE(D, D_SAE, dtype=torch.float64, backend="cpu")
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        sae.b_dec.copy_(xs.mean(0) + 0.1 * sd * r(D))
        sae.W_enc.copy_(r(D, D_SAE) / (sd * D ** 0.5))
        # The threshold halfway between two neighbouring pre-activations of distinct tokens,
        # never at one (a quantile can land on a repeated token's value: that gate would then
        # flip on the rounding of the splice).
        z = ((xs.unique(dim=0) - sae.b_dec) @ sae.W_enc).sort(0).values
        k = int(z.shape[0] * (1 - frac))
        sae.b_gate.copy_(-(z[k - 1] + z[k]) / 2)
        sae.r_mag.copy_(0.3 * r(D_SAE))
        sae.b_mag.copy_(torch.exp(sae.r_mag) * sae.b_gate
                        + 0.3 * torch.rand(D_SAE, generator=g, dtype=torch.float64))
        sae.W_dec.copy_(r(D_SAE, D) * sd / (frac * D_SAE) ** 0.5)
    return sae


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=D, n_head=2, vocab_size=100,
                                  n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    clean, patch = _tokens()
    both = torch.cat([clean, patch])
    base = {L: _random_sae(A.layer_output(model, both, L), seed=i) for i, L in enumerate(LAYERS)}
    saes = {}
    for be in BACKENDS:
        saes[be] = {}
        for L, s in base.items():
            t = gsae_fast.GatedSAE(D, D_SAE, dtype=torch.float64, backend=be)
            t.load_state_dict(s.state_dict())
            saes[be][L] = t
    # The same model with logits linear in resid:1: block 2 adds nothing (zero output
    # projections) and ln_f is the identity, so logits = out_1 @ W_U.
    lin = copy.deepcopy(model)
    with torch.no_grad():
        blk = lin.transformer.h[2]
        for p in (blk.attn.c_proj.weight, blk.attn.c_proj.bias, blk.mlp.c_proj.weight,
                  blk.mlp.c_proj.bias):
            p.zero_()
    lin.transformer.ln_f = torch.nn.Identity()
    return dict(model=model, lin=lin, saes=saes, clean=clean, patch=patch)


def _run(model, tokens):
    return model(input_ids=tokens, use_cache=False).logits


def _records(model, saes, tokens):
    with interp.splice(model, saes) as sp, torch.no_grad():
        m = metric(_run(model, tokens))
    return m, sp.records


# ---------------------------------------------------------------------------------- splice


@pytest.mark.parametrize("backend", BACKENDS)
def test_splice_is_identity_and_records(setup, backend):
    model, saes, clean = setup["model"], setup["saes"][backend], setup["clean"]
    with torch.no_grad():
        ref = _run(model, clean)
        x1_ref = A.layer_output(model, clean, "resid:1")
        with interp.splice(model, saes) as sp:
            out = _run(model, clean)
    assert (out - ref).abs().max() < 1e-12
    assert sp.order == list(LAYERS)
    for L in LAYERS:
        r, sae = sp[L], saes[L]
        assert isinstance(r.acts, SparseActs) and r.patched_acts is None
        assert 0.1 <= r.acts.l0().item() / D_SAE <= 0.3       # a real gate
        assert torch.allclose(r.x_hat, sae.decode(r.acts))
        assert torch.allclose(r.err, r.x - r.x_hat)
        assert (r.out - r.x).abs().max() < 1e-12
    assert (sp["resid:1"].x - x1_ref).abs().max() < 1e-12
    # hooks are gone after the block
    with torch.no_grad():
        assert torch.equal(_run(model, clean), ref)


@pytest.mark.parametrize("model_dtype,sae_dtype", [(torch.float32, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32)])
def test_splice_is_identity_across_dtypes(setup, model_dtype, sae_dtype):
    """A bf16 SAE in an fp32 model (or the reverse): the error node holds what the SAE misses
    in the wider dtype, so the spliced model computes the model's logits up to one fp32
    rounding per layer (with the error node in bf16 the logits moved by 1.5e-3)."""
    model = copy.deepcopy(setup["model"]).to(model_dtype)
    saes = {L: copy.deepcopy(s).to(sae_dtype) for L, s in setup["saes"]["cpu"].items()}
    with torch.no_grad():
        ref = _run(model, setup["clean"])
        with interp.splice(model, saes):
            out = _run(model, setup["clean"])
    assert (out.float() - ref.float()).abs().max() <= 1e-5 * ref.float().abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_splice_interventions(setup, backend):
    """Replaced activations (dense or sparse) and a held error set the layer output to
    decode(acts) + err, and the downstream SAE encodes the spliced output."""
    model, saes, clean = setup["model"], setup["saes"][backend], setup["clean"]
    s0 = saes["resid:0"]
    E = 0.01 * torch.randn(B, POS, D, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    with interp.splice(model, saes) as sp, torch.no_grad():
        sp.set("resid:0", acts=lambda a: torch.zeros(a.shape, dtype=torch.float64), err=E)
        _run(model, clean)
        assert torch.allclose(sp["resid:0"].out, s0.b_dec + E, atol=1e-14)
        x1 = sp["resid:1"].x
        # dense and sparse replacements agree
        half = lambda a: SparseActs(a.idx, 0.5 * a.f, a.pi_gate, a.counts, a.d_sae)  # noqa
        sp.set("resid:0", acts=half, err=None)
        sparse_logits = _run(model, clean)
        sp.set("resid:0", acts=lambda a: 0.5 * a.to_dense())
        assert (_run(model, clean) - sparse_logits).abs().max() < 1e-12
        sp.reset()
        assert sp["resid:0"].patched_acts is not None
        _run(model, clean)
        assert sp["resid:0"].patched_acts is None
    with torch.no_grad():
        with A.splice(model, "resid:0", lambda x: (s0.b_dec + E).expand_as(x)):
            want = A.layer_output(model, clean, "resid:1", stop=False)
    assert (x1 - want).abs().max() < 1e-12


def test_retain_grad_gives_layer_output_gradient(setup):
    model, saes, clean = setup["model"], setup["saes"]["cpu"], setup["clean"]
    with interp.splice(model, saes, retain_grad=True) as sp:
        metric(_run(model, clean)).backward()
    model.zero_grad(set_to_none=True)
    for s in saes.values():
        s.zero_grad(set_to_none=True)
    for L in LAYERS:
        assert sp[L].out.grad is not None and sp[L].out.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ node effects


def _sfc_dense_oracle(model, saes, clean, patch, alphas, other_errors="live"):
    """SFC's definition, densely: for each layer L, its dense activations and error as leaves
    a(alpha) = a_c + alpha (a_p - a_c) (and err likewise) set through the splice, the gradient by
    autograd, averaged over alphas (AtP: alphas = [0]); effects = delta * mean gradient."""
    _, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    out = {}
    for L in LAYERS:
        Ac, Ap = rc[L].acts.to_dense(), rp[L].acts.to_dense()
        Ec, Ep = rc[L].err.detach(), rp[L].err.detach()
        ga, ge = torch.zeros_like(Ac), torch.zeros_like(Ec)
        for alpha in alphas:
            a = (Ac + alpha * (Ap - Ac)).requires_grad_()
            e = (Ec + alpha * (Ep - Ec)).requires_grad_()
            with interp.splice(model, saes) as sp:
                sp.set(L, acts=a, err=e)
                if other_errors == "clean":
                    for M in LAYERS:
                        if M != L:
                            sp.set(M, err=rc[M].err.detach())
                m = metric(_run(model, clean))
            da, de = torch.autograd.grad(m, [a, e])
            ga += da / len(alphas)
            ge += de / len(alphas)
        out[L] = (((Ap - Ac) * ga).sum(0), ((Ep - Ec) * ge).sum((0, 2)))  # [pos, d_sae], [pos]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_atp_equals_sfc_dense_gradient(setup, backend):
    """AtP (one backward to the layer outputs, W_dec rows of the changed features only) equals
    SFC's dense-leaf gradient times difference, per position, with live or held errors."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes[backend]
    totals = {}
    for other in ("live", "clean"):
        want = _sfc_dense_oracle(model, saes, clean, patch, [0.0], other)
        got = interp.node_effects(model, saes, clean, patch, metric, method="atp",
                                  per_position=True, other_errors=other)
        tot = interp.node_effects(model, saes, clean, patch, metric, method="atp",
                                  other_errors=other)
        for L in LAYERS:
            wf, we = want[L]
            assert got[L].features.shape == (POS, D_SAE) and got[L].error.shape == (POS,)
            torch.testing.assert_close(got[L].features, wf, atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(got[L].error, we, atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(tot[L].features, wf.sum(0), atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(tot[L].error, we.sum(), atol=1e-12, rtol=1e-9)
            assert (wf[:3] == 0).all()   # unchanged positions have no effect
            assert (wf != 0).sum() > 20 and wf.abs().sum() > 0.1 * we.abs().sum()
        totals[other] = tot
    # with held errors, layer 0's effects reach the metric only through layer 1's features:
    # other numbers than with live errors (whose downstream splice is the identity); the last
    # spliced layer has nothing downstream, the same numbers
    assert not torch.allclose(totals["live"]["resid:0"].features,
                              totals["clean"]["resid:0"].features, rtol=1e-3)
    torch.testing.assert_close(totals["live"]["resid:1"].features,
                               totals["clean"]["resid:1"].features)


def test_ig_equals_sfc_dense_path_average(setup):
    """IG through the injected out_L(alpha) (steps batched, micro-batched by batch_size)
    equals SFC's average of dense-leaf gradients along the path, for both alpha rules and with
    live or held downstream errors."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    for rule, alphas, other in (("midpoint", [0.125, 0.375, 0.625, 0.875], "live"),
                                ("left", [0.0, 0.25, 0.5, 0.75], "live"),
                                ("midpoint", [0.125, 0.375, 0.625, 0.875], "clean")):
        want = _sfc_dense_oracle(model, saes, clean, patch, alphas, other)
        got = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=4,
                                  ig_alphas=rule, per_position=True, batch_size=4,
                                  other_errors=other)
        for L in LAYERS:
            torch.testing.assert_close(got[L].features, want[L][0], atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(got[L].error, want[L][1], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ig_completeness(setup, backend):
    """Each layer's effects (features + error) add up to m(layer patched whole) - m(clean),
    measured through the splice, up to the Riemann error, which shrinks with steps."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes[backend]
    m_clean, rc = _records(model, saes, clean)
    m_patch, rp = _records(model, saes, patch)
    ig2 = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=2)
    ig32 = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=32)
    for L in LAYERS:
        with interp.splice(model, saes) as sp, torch.no_grad():
            sp.set(L, acts=rp[L].acts, err=rp[L].err)
            target = metric(_run(model, clean)) - m_clean
        # resid:N is the whole residual stream: patching it whole is the patch run
        assert abs(target - (m_patch - m_clean)) < 1e-12
        e2, e32 = (abs(r[L].total() - target).item() for r in (ig2, ig32))
        assert e32 < e2 / 20, (L, e2, e32)
        assert e32 < 1e-3 * abs(target), (L, e32, target)
        assert ig32[L].metric_clean == pytest.approx(m_clean.item(), abs=1e-12)
        assert ig32[L].metric_patch == pytest.approx(m_patch.item(), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_atp_equals_exact_when_metric_is_linear(setup, backend):
    """In ``lin`` the logits are a linear function of resid:1's output (block 2 adds nothing,
    ln_f is the identity) and the patched nodes of resid:1 are set directly (no gate of
    resid:1 re-encodes, no SAE downstream): the metric is linear in resid:1's nodes and
    first-order is exact, so AtP, IG (any steps) and exact patching agree to rounding, per
    feature, per (position, feature) and for the error node. resid:0's effects pass through
    block 1 (nonlinear): there AtP only approximates exact patching."""
    model, saes, clean, patch = (setup[k] for k in ("lin", "saes", "clean", "patch"))
    saes = saes[backend]
    with torch.no_grad(), interp.splice(model, saes) as sp:
        logits = _run(model, clean)
        assert (logits - sp["resid:1"].out @ model.lm_head.weight.T).abs().max() < 1e-12
    for pp in (False, True):
        atp = interp.node_effects(model, saes, clean, patch, metric, method="atp",
                                  per_position=pp)
        ex = interp.node_effects(model, saes, clean, patch, metric, method="exact",
                                 per_position=pp, batch_size=64)
        ig = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=1,
                                 per_position=pp)
        L = "resid:1"
        assert (ex[L].features != 0).sum() > 20
        for other in (ex, ig):
            torch.testing.assert_close(atp[L].features, other[L].features, atol=1e-12,
                                       rtol=1e-8)
            torch.testing.assert_close(atp[L].error, other[L].error, atol=1e-12, rtol=1e-8)
    a, e = atp["resid:0"].features.sum(0), ex["resid:0"].features.sum(0)
    nz = e != 0
    assert torch.corrcoef(torch.stack([a[nz], e[nz]]))[0, 1] > 0.9


@pytest.mark.parametrize("other", ["live", "clean"])
def test_exact_equals_manual_interventions(setup, other):
    """Exact effects of a few candidate features (all positions, and one position) and of the
    error node equal the same patches made by hand through the splice context."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    m_clean, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    cands = {}
    for L in LAYERS:
        Ac, Ap = rc[L].acts.to_dense(), rp[L].acts.to_dense()
        changed = ((Ap - Ac) != 0).any(0).any(0).nonzero().flatten()
        cands[L] = changed[:3].tolist()
    got = interp.node_effects(model, saes, clean, patch, metric, method="exact",
                              features=cands, other_errors=other, batch_size=4)
    got_pp = interp.node_effects(model, saes, clean, patch, metric, method="exact",
                                 features=cands, other_errors=other, per_position=True)

    def manual(L, **setting):
        with interp.splice(model, saes) as sp, torch.no_grad():
            sp.set(L, **setting)
            if other == "clean":
                for M in LAYERS[LAYERS.index(L) + 1:]:
                    sp.set(M, err=rc[M].err)
            return (metric(_run(model, clean)) - m_clean).item()

    for L in LAYERS:
        Ac, Ap = rc[L].acts.to_dense(), rp[L].acts.to_dense()
        for i in cands[L]:
            def put(a, i=i, pos=slice(None)):
                d = a.to_dense().clone()
                d[:, pos, i] = Ap[:, pos, i]
                return d
            want = manual(L, acts=put, err=rc[L].err)
            assert got[L].features[i].item() == pytest.approx(want, abs=1e-12, rel=1e-9)
            t = int(((Ap - Ac)[:, :, i] != 0).any(0).nonzero()[-1])
            want_t = manual(L, acts=lambda a, i=i, t=t: put(a, i, t), err=rc[L].err)
            assert got_pp[L].features[t, i].item() == pytest.approx(want_t, abs=1e-12,
                                                                    rel=1e-9)
        want_err = manual(L, err=rp[L].err)
        assert got[L].error.item() == pytest.approx(want_err, abs=1e-12, rel=1e-9)
        assert got_pp[L].error[:3].abs().max() == 0
        # changed features left out of the candidates are NaN (not measured), unchanged 0
        changed = ((Ap - Ac) != 0).any(0).any(0)
        left_out = changed.clone()
        left_out[cands[L]] = False
        assert torch.isnan(got[L].features[left_out]).all()
        assert (got[L].features[~changed] == 0).all()


def test_other_architectures(setup):
    """JumpReLU and TopK SAEs (the latter with rescale_acts_by_decoder_norm, whose decoder
    rows are W_dec[i] / |W_dec[i]|) splice, and their AtP equals SFC's dense gradient."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    jump = {L: s.to_jumprelu() for L, s in saes["cpu"].items()}
    topk = {}
    for L, s in saes["cpu"].items():
        t = gsae_fast.TopKSAE(D, D_SAE, k=10, rescale_acts_by_decoder_norm=True,
                              dtype=torch.float64, backend="cpu")
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_dec"):
                getattr(t, name).copy_(getattr(s, name))
            t.b_enc.copy_(s.b_gate)
        topk[L] = t
    with torch.no_grad():
        ref = _run(model, clean)
    for group in (jump, topk):
        with torch.no_grad(), interp.splice(model, group):
            assert (_run(model, clean) - ref).abs().max() < 1e-12
        want = _sfc_dense_oracle(model, group, clean, patch, [0.0])
        got = interp.node_effects(model, group, clean, patch, metric, method="atp",
                                  per_position=True)
        for L in LAYERS:
            assert (want[L][0] != 0).sum() > 10
            torch.testing.assert_close(got[L].features, want[L][0], atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(got[L].error, want[L][1], atol=1e-12, rtol=1e-9)


def test_node_effects_stay_sparse(setup, monkeypatch):
    """Neither the estimators nor the ablations build a dense [tokens, d_sae] tensor."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]

    def refuse(*a, **k):
        raise AssertionError("dense [tokens, d_sae] built")

    monkeypatch.setattr(SparseActs, "to_dense", refuse)
    monkeypatch.setattr(gsae_fast.GatedSAE, "encode", refuse)
    for method in interp.METHODS:
        interp.node_effects(model, saes, clean, patch, metric, method=method, steps=2,
                            batch_size=64, other_errors="clean" if method == "jump_ig" else "live")
    for method in ("atp", "exact"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1",
                            method=method, features=[0, 1, 2])
    with torch.no_grad(), interp.ablate(model, saes, {"resid:0": [1, 2]}, mode="mean",
                                        values=torch.rand(D_SAE, dtype=torch.float64)):
        _run(model, clean)


# --------------------------------------------------------------------- ablation and steering


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablate_everything_is_zero_ablation(setup, backend):
    model, saes, clean = setup["model"], setup["saes"][backend], setup["clean"]
    sae = saes["resid:1"]
    with torch.no_grad():
        with A.splice(model, "resid:1", lambda x: sae.b_dec + (x - sae(x))):
            want = _run(model, clean)
        with interp.ablate(model, saes, {"resid:1": range(D_SAE)}) as sp:
            got = _run(model, clean)
    assert (got - want).abs().max() < 1e-12
    assert (sp["resid:1"].patched_acts.counts == 0).all()


def test_ablate_mean_and_value(setup):
    """Mean / value ablation of a few features equals decoding the dense activations with those
    columns replaced, error kept; mean_activations equals the dense mean."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    toks = torch.cat([clean, patch])
    means = interp.mean_activations(model, saes, toks, batch_size=3)
    _, rec = _records(model, saes, toks)
    for L in LAYERS:
        torch.testing.assert_close(means[L], rec[L].acts.to_dense().mean((0, 1)))
    ids = [0, 5, 9, 40]
    for mode, vals in (("mean", means["resid:0"]), ("value", 0.7)):
        v = torch.as_tensor(vals, dtype=torch.float64).expand(D_SAE)

        def dense(a):
            d = a.to_dense().clone()
            d[..., ids] = v[ids]
            return d

        with torch.no_grad():
            with interp.splice(model, {"resid:0": saes["resid:0"]}) as sp:  # as ablate
                sp.set("resid:0", acts=dense)
                want = _run(model, clean)
            with interp.ablate(model, saes, {"resid:0": ids}, mode=mode, values=vals) as sp:
                got = _run(model, clean)
        assert (got - want).abs().max() < 1e-12
        a = sp["resid:0"].patched_acts
        assert ((a.idx[..., 1:] > a.idx[..., :-1]) | ~a.mask()[..., 1:]).all()  # increasing


def test_steer(setup):
    model, saes, clean = setup["model"], setup["saes"]["cpu"], setup["clean"]
    W = saes["resid:0"].W_dec.detach()
    with torch.no_grad():
        with A.splice(model, "resid:0", lambda x: x + 3.0 * W[7]):
            want = _run(model, clean)
        with interp.steer(model, saes, "resid:0", 7, 3.0) as name:
            got = _run(model, clean)
        assert name == "transformer.h.0"
        assert (got - want).abs().max() < 1e-12

        def at_pos(x):
            x = x.clone()
            x[:, 2] += 3.0 * W[7] - W[9]
            return x

        with A.splice(model, "resid:0", at_pos):
            want = _run(model, clean)
        with interp.steer(model, saes["resid:0"], "resid:0", [7, 9], [3.0, -1.0],
                          positions=[2]):
            got = _run(model, clean)
        assert (got - want).abs().max() < 1e-12
        # a TopK SAE with rescaled activations: one unit adds the unit row, as its decode does
        topk = gsae_fast.TopKSAE(D, D_SAE, k=8, dtype=torch.float64, backend="cpu",
                                 rescale_acts_by_decoder_norm=True)
        with torch.no_grad():
            topk.W_dec.mul_(3.0)
        one = torch.zeros(1, D_SAE, dtype=torch.float64)
        one[0, 7] = 1.0
        unit = topk.decode(one)[0] - topk.decode(torch.zeros_like(one))[0]
        torch.testing.assert_close(unit, topk.W_dec[7].detach() / topk.W_dec[7].norm().item())
        with A.splice(model, "resid:0", lambda x: x + 2.0 * unit):
            want = _run(model, clean)
        with interp.steer(model, topk, "resid:0", 7, 2.0):
            got = _run(model, clean)
        assert (got - want).abs().max() < 1e-12


def test_nested_splices_are_refused(setup):
    """Two splices on one layer would stack (the second SAE encoding the first's output)."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    with interp.splice(model, {"resid:0": saes["resid:0"]}):
        with pytest.raises(RuntimeError, match=r"\['resid:0'\] are already spliced"):
            interp.node_effects(model, saes, clean, patch, metric)
        with pytest.raises(RuntimeError, match="already spliced"):
            with interp.ablate(model, saes, {"resid:0": [1]}):
                pass
    with interp.splice(model, {"resid:1": saes["resid:1"]}):   # other layers: fine
        with interp.splice(model, {"resid:0": saes["resid:0"]}), torch.no_grad():
            _run(model, clean)
    interp.node_effects(model, saes, clean, patch, metric)      # released on exit


# ---------------------------------------------------------------------------------- errors


class _FlatOut(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, D)
        self.flat = _FlatOut()

    def forward(self, input_ids):
        return self.flat(self.emb(input_ids))


def test_errors(setup):
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    with pytest.raises(ValueError, match="no module"):
        interp.splice(model, {"transformer.h.9": saes["resid:0"]})
    with pytest.raises(ValueError, match="blocks 0..2"):
        interp.node_effects(model, {"resid:7": saes["resid:0"]}, clean, patch, metric)
    narrow = gsae_fast.GatedSAE(16, D_SAE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'resid:1' \(transformer.h.1\) has width 32 but its "
                                         r"SAE has d_in=16"):
        with interp.splice(model, {"resid:0": saes["resid:0"], "resid:1": narrow}):
            _run(model, clean)
    with pytest.raises(ValueError, match="same shape"):
        interp.node_effects(model, saes, clean, patch[:, :5], metric)
    with pytest.raises(ValueError, match="scalar"):
        interp.node_effects(model, saes, clean, patch, lambda lg: lg[:, -1, A_TOK])
    with pytest.raises(ValueError, match="method='exact'"):
        interp.node_effects(model, saes, clean, patch, metric, features={"resid:0": [1]})
    with pytest.raises(ValueError, match="not a \\[batch, pos, d\\] tensor"):
        with interp.splice(_Toy(), {"flat": saes["resid:0"]}) as sp:
            sp.model(clean)
    with pytest.raises(ValueError, match="replacement activations"):
        with interp.splice(model, saes) as sp, torch.no_grad():
            sp.set("resid:0", acts=torch.zeros(B, POS, D_SAE + 1, dtype=torch.float64))
            _run(model, clean)
    with pytest.raises(ValueError, match="mode='mean' needs values"):
        interp.ablate(model, saes, {"resid:0": [1]}, mode="mean")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
        interp.steer(model, saes, "resid:0", 64, 1.0).__enter__()


# --------------------------------------------------------------------------- jump-aware IG

ALPHA_STAR = 0.37


def _path_metric(model, saes, clean, out_c, out_p, alpha, grad=False):
    """The metric with resid:0 outputting out_c + alpha (out_p - out_c) and resid:1 spliced
    with its clean error held, by hand (activations.splice + a one-layer interp splice); with
    ``grad`` also dm / d(resid:0 output) and the resid:1 input."""
    value = (out_c + alpha * (out_p - out_c)).detach().requires_grad_(grad)
    _, rc = _records(model, saes, clean)
    with A.splice(model, "resid:0", lambda x: value), \
            interp.splice(model, {"resid:1": saes["resid:1"]}) as sp, \
            torch.set_grad_enabled(grad):
        sp.set("resid:1", err=rc["resid:1"].err.detach())
        m = metric(_run(model, clean))
    return m, value, sp["resid:1"].x


@pytest.fixture(scope="module")
def one_crossing(setup):
    """resid:1's SAE reduced to one live feature j whose gate crosses exactly once along
    resid:0's IG path, at alpha = ALPHA_STAR (row 0, position 6); the magnitude is 3 above
    the gate there (a real jump)."""
    model, clean, patch = setup["model"], setup["clean"], setup["patch"]
    saes = {L: copy.deepcopy(s) for L, s in setup["saes"]["cpu"].items()}
    sae1 = saes["resid:1"]
    _, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    out_c, out_p = rc["resid:0"].out.detach(), rp["resid:0"].out.detach()
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    with torch.no_grad():
        z = torch.stack([(_path_metric(model, saes, clean, out_c, out_p, a)[2] - sae1.b_dec)
                         @ sae1.W_enc for a in grid])  # [alpha, B, pos, d_sae]
        z_star = (_path_metric(model, saes, clean, out_c, out_p, ALPHA_STAR)[2]
                  - sae1.b_dec) @ sae1.W_enc
    for j in (z[-1, 0, 6] - z[0, 0, 6]).abs().argsort(descending=True).tolist():
        theta = z_star[0, 6, j]
        crossings = ((z[1:, ..., j] > theta) != (z[:-1, ..., j] > theta)).sum()
        if crossings == 1:
            break
    else:
        pytest.fail("no feature with a single crossing")
    with torch.no_grad():
        sae1.b_gate.fill_(-1e3)
        sae1.b_gate[j] = -theta
        sae1.b_mag[j] = torch.exp(sae1.r_mag[j]) * sae1.b_gate[j] + 3.0
    return dict(saes=saes, j=j, out_c=out_c, out_p=out_p)


def test_jump_ig_on_one_crossing(setup, one_crossing):
    """Jump-aware IG at steps=4 finds the one crossing, adds the metric's jump there (measured
    by hand on both sides of alpha*), splits it among resid:0's nodes by their share of the
    gate pre-activation's change (its gradient by hand), matches plain IG at steps=2048 on the
    smooth part, and is complete (plain IG misses the layer's total by the jump, at any N)."""
    model, clean, patch = setup["model"], setup["clean"], setup["patch"]
    saes, j = one_crossing["saes"], one_crossing["j"]
    out_c, out_p = one_crossing["out_c"], one_crossing["out_p"]
    kw = dict(other_errors="clean")
    ji = interp.node_effects(model, saes, clean, patch, metric, method="jump_ig", steps=4,
                             **kw)["resid:0"]
    ig4 = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=4,
                              **kw)["resid:0"]
    ig_big = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=2048,
                                 batch_size=1024, **kw)["resid:0"]
    pm = lambda a: _path_metric(model, saes, clean, out_c, out_p, a)[0].item()  # noqa: E731
    jump = pm(ALPHA_STAR + 1e-9) - pm(ALPHA_STAR - 1e-9)
    assert abs(jump) > 1e-4
    assert len(ji.jumps) == 1 and ji.jumps[0] == pytest.approx(jump, rel=1e-4)
    jump_part = ji.jump_features.sum() + ji.jump_error
    assert jump_part.item() == pytest.approx(jump, rel=1e-4)
    # the smooth part: within 1% of plain IG at N=2048 already at N=4, and converging as the
    # midpoint rule on smooth pieces does (1/N^2: the kink at alpha* is a piece boundary);
    # measured: 5.9e-6 at N=4, 3.9e-7 at N=16, 1.1e-7 at N=32 (plain IG: 2.7e-5, 4.7e-7, 7.5e-7)
    ji16 = interp.node_effects(model, saes, clean, patch, metric, method="jump_ig", steps=16,
                               **kw)["resid:0"]
    scale = ig_big.features.abs().max().item()
    err4, err16 = ((r.features - r.jump_features - ig_big.features).abs().max().item()
                   for r in (ji, ji16))
    assert err4 < 0.01 * scale and err16 < err4 / 10, (err4, err16, scale)
    assert ji16.jumps[0] == pytest.approx(jump, rel=1e-4)
    # completeness: m(resid:0 patched whole, errors downstream held) - m(clean)
    target = pm(1.0) - pm(0.0)
    assert ji.total().item() == pytest.approx(target, rel=3e-3)     # Riemann error at N=4
    assert ji16.total().item() == pytest.approx(target, rel=1e-4)
    assert abs(ig_big.total().item() - target) == pytest.approx(abs(jump), rel=1e-2)
    assert abs(ig4.total().item() - target) > 0.5 * abs(jump)  # small N does not find it either
    assert abs(jump) > 0.05 * abs(target)   # what plain IG misses at any N: 7% here
    # the split, by hand: node v gets jump * (dv . grad pi_j) / (d out . grad pi_j)
    _, value, x1 = _path_metric(model, saes, clean, out_c, out_p, ALPHA_STAR, grad=True)
    sae1 = saes["resid:1"]
    pi = (x1[0, 6] - sae1.b_dec) @ sae1.W_enc[:, j] + sae1.b_gate[j]
    (g,) = torch.autograd.grad(pi, value)
    _, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    d_acts = rp["resid:0"].acts.to_dense() - rc["resid:0"].acts.to_dense()  # [B, pos, d_sae]
    share = torch.einsum("bti,id,btd->i", d_acts, saes["resid:0"].W_dec.detach(), g)
    err_share = ((rp["resid:0"].err - rc["resid:0"].err) * g).sum()
    speed = ((out_p - out_c) * g).sum()
    torch.testing.assert_close(ji.jump_features, jump * share / speed, rtol=1e-4, atol=1e-10)
    assert ji.jump_error.item() == pytest.approx((jump * err_share / speed).item(), rel=1e-4)


def test_jump_ig_on_many_crossings(setup):
    """On the unmodified SAEs (many downstream gates flip along resid:0's path), jump-aware IG
    is complete at steps=4 where plain IG misses by the sum of the jumps, and the last spliced
    layer (nothing downstream) gets plain IG's numbers."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    _, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    out_c, out_p = rc["resid:0"].out.detach(), rp["resid:0"].out.detach()
    target = (_path_metric(model, saes, clean, out_c, out_p, 1.0)[0]
              - _path_metric(model, saes, clean, out_c, out_p, 0.0)[0]).item()
    ji = interp.node_effects(model, saes, clean, patch, metric, method="jump_ig", steps=4,
                             other_errors="clean")
    ig = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=512,
                             other_errors="clean", batch_size=256)
    r0 = ji["resid:0"]
    assert len(r0.jumps) > 5
    assert r0.total().item() == pytest.approx(target, abs=1e-5 * abs(target))
    assert abs(ig["resid:0"].total().item() - target) > 10 * abs(r0.total().item() - target)
    # plain IG converges to the total without the jumps (slowly: each crossing is a kink)
    assert (ig["resid:0"].total() + sum(r0.jumps)).item() == pytest.approx(target, rel=2e-4)
    r1 = ji["resid:1"]
    assert r1.jumps == [] and (r1.jump_features == 0).all()
    ig2 = interp.node_effects(model, saes, clean, patch, metric, method="ig", steps=4,
                              other_errors="clean")["resid:1"]
    torch.testing.assert_close(r1.features, ig2.features)


def test_jump_ig_bad_input(setup):
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    with pytest.raises(ValueError, match="other_errors='clean'"):
        interp.node_effects(model, saes, clean, patch, metric, method="jump_ig")
    with pytest.raises(ValueError, match="jump_tol"):
        interp.node_effects(model, saes, clean, patch, metric, method="jump_ig", steps=4,
                            other_errors="clean", jump_tol=0.5)
    topk = gsae_fast.TopKSAE(D, D_SAE, k=8, dtype=torch.float64, backend="cpu")
    with pytest.raises(ValueError, match="fixed gate"):
        interp.node_effects(model, {"resid:0": saes["resid:0"], "resid:1": topk}, clean, patch,
                            metric, method="jump_ig", other_errors="clean")


# ----------------------------------------------------------------------------- edge effects


def test_edges_atp_add_up_to_node_atp(setup):
    """AtP edges u -> d of resid:0 -> resid:1 plus u -> metric add up to u's AtP node effect
    with held downstream errors (the chain rule through resid:1's features)."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    e = interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1")
    node = interp.node_effects(model, saes, clean, patch, metric, method="atp",
                               other_errors="clean")["resid:0"]
    assert e.effects.shape == (e.upstream.numel(), e.downstream.numel())
    assert e.upstream.numel() > 10 and e.downstream.numel() > 10
    assert (e.effects != 0).sum() > 100
    torch.testing.assert_close(e.effects.sum(1) + e.to_metric, node.features[e.upstream],
                               atol=1e-14, rtol=1e-9)
    # resid:1 is the whole residual stream: no path avoids it
    assert (e.to_metric == 0).all()


def test_edges_atp_equal_exact_when_linear(setup):
    """With blocks 1 and 2 adding nothing and ln_f the identity, resid:1's input is resid:0's
    output and the logits are linear in resid:1's output; a resid:1 feature whose gate does not
    flip is then linear in resid:0's output (its magnitude stays above 0), so AtP edges equal
    exact path patching on every pair without a flip, and differ on pairs with one. With mlp:1
    downstream instead (block 1's attention still off), the path u -> metric around it is
    linear too: AtP and exact agree on it."""
    lin = copy.deepcopy(setup["model"])
    with torch.no_grad():
        for i in (1, 2):
            blk = lin.transformer.h[i]
            for p in (blk.attn.c_proj.weight, blk.attn.c_proj.bias):
                p.zero_()
            if i == 2:
                blk.mlp.c_proj.weight.zero_()
                blk.mlp.c_proj.bias.zero_()
    lin.transformer.ln_f = torch.nn.Identity()
    clean, patch = setup["clean"], setup["patch"]
    both = torch.cat([clean, patch])
    for up_layer, down_layer, mlp_on in (("resid:0", "resid:1", False),
                                         ("resid:0", "mlp:1", True)):
        model = copy.deepcopy(lin)
        if not mlp_on:
            with torch.no_grad():
                model.transformer.h[1].mlp.c_proj.weight.zero_()
                model.transformer.h[1].mlp.c_proj.bias.zero_()
        saes = {L: _random_sae(A.layer_output(model, both, L), seed=10 + i)
                for i, L in enumerate((up_layer, down_layer))}
        first = interp.edge_effects(model, saes, clean, patch, metric, up_layer, down_layer)
        cand = first.upstream[:6]
        atp = interp.edge_effects(model, saes, clean, patch, metric, up_layer, down_layer,
                                  features=cand)
        ex = interp.edge_effects(model, saes, clean, patch, metric, up_layer, down_layer,
                                 method="exact", features=cand, batch_size=64)
        assert torch.equal(atp.upstream, cand) and torch.equal(ex.upstream, cand)
        if not mlp_on:
            # exact's downstream features (those that change) are active at clean or patch;
            # compare where both methods have a column
            cols = torch.isin(ex.downstream, atp.downstream)
            a = atp.effects[:, torch.searchsorted(atp.downstream, ex.downstream[cols])]
            x, fl = ex.effects[:, cols], ex.flips[:, cols]
            assert (~fl & (x != 0)).sum() > 10
            torch.testing.assert_close(a[~fl], x[~fl], atol=1e-12, rtol=1e-8)
            # a flip at a position the metric reads (the last) is a jump AtP does not see
            assert fl.any() and (a[fl] - x[fl]).abs().max() > 1e-9
            assert (ex.to_metric == 0).all() and (atp.to_metric == 0).all()
        else:
            assert (ex.to_metric != 0).sum() >= 3  # the others change at unread positions
            torch.testing.assert_close(atp.to_metric, ex.to_metric, atol=1e-12, rtol=1e-8)


def test_edges_bad_input(setup):
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    with pytest.raises(ValueError, match="upstream must come first"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:1", "resid:0")
    with pytest.raises(ValueError, match="two different"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:0")
    with pytest.raises(KeyError, match="not a spliced layer"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:2")
    with pytest.raises(ValueError, match="method"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1",
                            method="ig")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
        interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1",
                            features=[64])


def test_exact_flips(setup):
    """Exact patching with held errors flags the features whose patch alone turns a gate of
    resid:1 on or off; checked by hand for flagged and unflagged features."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    ex = interp.node_effects(model, saes, clean, patch, metric, method="exact",
                             other_errors="clean", batch_size=64)
    flips = ex["resid:0"].flips
    assert ex["resid:1"].flips is not None and not ex["resid:1"].flips.any()  # none downstream
    assert interp.node_effects(model, saes, clean, patch, metric, method="exact")[
        "resid:0"].flips is None                                             # live errors
    _, rc = _records(model, saes, clean)
    _, rp = _records(model, saes, patch)
    d = rp["resid:0"].acts.to_dense() - rc["resid:0"].acts.to_dense()
    changed = (d != 0).any(0).any(0)
    assert flips.any() and (changed & ~flips).any() and not (flips & ~changed).any()

    def on(acts):
        return acts.to_dense() > 0

    W = saes["resid:0"].W_dec.detach()
    picks = flips.nonzero().flatten()[:3].tolist() + \
        (changed & ~flips).nonzero().flatten()[:3].tolist()
    for i in picks:
        value = rc["resid:0"].out.detach() + d[..., i:i + 1] * W[i]
        with torch.no_grad(), A.splice(model, "resid:0", lambda x: value), \
                interp.splice(model, {"resid:1": saes["resid:1"]}) as sp:
            sp.set("resid:1", err=rc["resid:1"].err.detach())
            _run(model, clean)
            moved = not torch.equal(on(sp["resid:1"].acts), on(rc["resid:1"].acts))
        assert moved == bool(flips[i]), i


def test_exact_flips_and_edges_against_the_batched_baseline(setup):
    """Flips (node and edge exact) and the downstream changes of edge exact are measured
    against the baseline copy of the same batched forward, not the clean forward of B rows: a
    GPU forward of another batch size may round differently (GEMMs pick their algorithm by
    shape), and a gate at its threshold would then "flip" in every copy. Simulated here: a
    resid:1 gate sits 1e-9 above its threshold at (row 0, position 0), which no patch
    reaches, and a hook moves resid:1's output by a rounding-sized step in every forward of
    more than B rows, closing that gate there. The flags must be those of the run without it."""
    model, clean, patch = setup["model"], setup["clean"], setup["patch"]
    saes = {L: copy.deepcopy(s) for L, s in setup["saes"]["cpu"].items()}
    sae1 = saes["resid:1"]
    _, rc = _records(model, saes, clean)
    j = 5
    W = sae1.W_enc.detach()[:, j]
    with torch.no_grad():
        z = (rc["resid:1"].x[0, 0] - sae1.b_dec) @ W
        sae1.b_gate[j] = -z + 1e-9
    step = 2e-9 * W / W.dot(W)          # moves pi_gate[j] by -2e-9
    _, rc = _records(model, saes, clean)

    def rounding(x):
        return x - step if x.shape[0] != clean.shape[0] else x

    kw = dict(method="exact", batch_size=1024)
    ref = interp.node_effects(model, saes, clean, patch, metric, other_errors="clean", **kw)
    cand = ref["resid:0"].flips.nonzero().flatten()[:3].tolist() + \
        (~ref["resid:0"].flips & (ref["resid:0"].features != 0)).nonzero().flatten()[:3].tolist()
    e_ref = interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1",
                                features=cand, **kw)
    assert ref["resid:0"].flips.any() and not ref["resid:0"].flips.all()
    with A.splice(model, "resid:1", rounding):
        with torch.no_grad():   # the gate does close in a forward of more than B rows
            _, rc_big = _records(model, saes, clean.repeat(2, 1))
            assert (rc_big["resid:1"].acts.to_dense(values="pi_gate")[0, 0, j] == 0
                    and rc["resid:1"].acts.to_dense(values="pi_gate")[0, 0, j] > 0)
        got = interp.node_effects(model, saes, clean, patch, metric, other_errors="clean",
                                  **kw)
        e = interp.edge_effects(model, saes, clean, patch, metric, "resid:0", "resid:1",
                                features=cand, **kw)
    assert torch.equal(got["resid:0"].flips, ref["resid:0"].flips)
    torch.testing.assert_close(got["resid:0"].features, ref["resid:0"].features,
                               atol=1e-6 * ref["resid:0"].features.abs().max().item(), rtol=0)
    assert torch.equal(e.downstream, e_ref.downstream) and torch.equal(e.flips, e_ref.flips)
    torch.testing.assert_close(e.effects, e_ref.effects,
                               atol=1e-6 * e_ref.effects.abs().max().item(), rtol=0)


def test_jump_ig_warns_in_16_bit(setup):
    """In bf16 (the model or an SAE) the path moves in rounding steps: downstream gates flip
    on and off by rounding (404 crossings on the test setup instead of 74) and the per-node
    split is noise, so jump_ig says so; float64 does not warn."""
    model, saes, clean, patch = (setup[k] for k in ("model", "saes", "clean", "patch"))
    saes = saes["cpu"]
    kw = dict(method="jump_ig", steps=1, other_errors="clean")
    bf16 = {L: copy.deepcopy(s).to(torch.bfloat16) for L, s in saes.items()}
    for m, s in ((copy.deepcopy(model).to(torch.bfloat16), saes), (model, bf16)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*16-bit")   # stop at the warning
            with pytest.raises(UserWarning, match="16-bit floats"):
                interp.node_effects(m, s, clean, patch, metric, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*16-bit")
        interp.node_effects(model, saes, clean, patch, metric, **kw)
