"""TopK and BatchTopK SAEs on the sparse kernels against SAELens' TopKSAE / TopKTrainingSAE /
BatchTopKTrainingSAE and dictionary_learning's AutoEncoderTopK / BatchTopKSAE and their trainers:
encode, forward, the training loss with AuxK and every gradient; the chunked selection; the
BatchTopK threshold; converters and checkpoints; refused input."""
import json
import math

import pytest
import torch
from test_peers import TOL64, dictlearn  # noqa: F401
from test_peers import assert_rel as _assert_rel

import gsae_fast
from conftest import CPU_BACKENDS, make_x
from gsae_fast import BatchTopKSAE, TopKSAE, topk
from gsae_fast.interop import UnsupportedSAEError


def assert_rel(actual, expected, tol, what=""):
    _assert_rel(actual, expected, tol, what)

D_IN, D_SAE, BATCH, K = 14, 53, 37, 6
NAMES = ("W_enc", "W_dec", "b_dec", "b_enc")


def make_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # Decoder rows of varied norms, so that the decoder-norm rescaling changes the selection.
    W_dec = randn(D_SAE, D_IN) / math.sqrt(D_IN) * (0.5 + torch.rand(D_SAE, 1, generator=g,
                                                                     dtype=torch.float64))
    p = dict(W_enc=randn(D_IN, D_SAE) / math.sqrt(D_IN), W_dec=W_dec, b_dec=0.3 * randn(D_IN),
             b_enc=0.3 * randn(D_SAE))
    return {k: v.to(dtype) for k, v in p.items()}


def dead_mask(seed=3, frac=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(D_SAE, generator=g) < frac


@pytest.fixture(scope="module")
def sl():
    pytest.importorskip("sae_lens", reason="sae-lens not installed")
    import sae_lens.saes.batchtopk_sae as b
    import sae_lens.saes.topk_sae as t
    return t, b


def sae_lens_training(sl, p, batch, rescale, dtype="float64"):
    t, b = sl
    cls, cfg = ((b.BatchTopKTrainingSAE, b.BatchTopKTrainingSAEConfig) if batch else
                (t.TopKTrainingSAE, t.TopKTrainingSAEConfig))
    sae = cls(cfg(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, dtype=dtype))
    with torch.no_grad():
        for n in NAMES:
            getattr(sae, n).copy_(p[n])
    return sae


def ours_with(p, batch=False, rescale=False, backend="auto"):
    cls = BatchTopKSAE if batch else TopKSAE
    m = cls(D_IN, D_SAE, K, rescale_acts_by_decoder_norm=rescale, dtype=p["W_enc"].dtype,
            backend=backend)
    with torch.no_grad():
        for n in NAMES:
            getattr(m, n).copy_(p[n])
    return m


def grads(module):
    return {n: getattr(module, n).grad.clone() for n in NAMES}


# ------------------------------------------------------------------------ SAELens training


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
@pytest.mark.parametrize("rescale", [False, True], ids=["raw", "rescaled"])
def test_training_loss_and_grads_match_sae_lens(sl, backend, batch, rescale):
    from sae_lens.saes.sae import TrainStepInput
    p = make_params()
    x = make_x((BATCH, D_IN))
    dead = dead_mask()
    theirs = sae_lens_training(sl, p, batch, rescale)
    out = theirs.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    out.loss.backward()
    ours = ours_with(p, batch, rescale, backend)
    res = ours.loss(x, dead_neuron_mask=dead)
    res.loss.backward()
    aux = out.losses["auxiliary_reconstruction_loss"]
    assert aux.item() > 0.01 * out.loss.item()  # the AuxK term is really exercised
    assert_rel(res.mse, out.losses["mse_loss"], TOL64)
    assert_rel(res.aux, aux, TOL64)
    assert_rel(res.loss, out.loss, TOL64)
    assert_rel(res.x_hat, out.sae_out, TOL64)
    f = res.f if res.acts is None else res.acts.to_dense()
    assert_rel(f, out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts,
               TOL64)
    for n in NAMES:
        assert_rel(getattr(ours, n).grad, getattr(theirs, n).grad, TOL64, n)
    if batch:  # the threshold moves as SAELens' does
        assert math.isclose(float(ours.topk_threshold), float(theirs.topk_threshold),
                            rel_tol=1e-12)
        assert float(ours.topk_threshold) > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_rows_hold_k_positive_features(backend):
    p = make_params()
    x = make_x((BATCH, D_IN))
    acts = ours_with(p, backend=backend).encode_sparse(x)
    dense_pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    expected = dense_pre.topk(K).values.gt(0).sum(-1)
    assert torch.equal(acts.counts.long(), expected)
    assert acts.counts.max() <= K and acts.counts.sum() > BATCH  # most rows are full
    i = acts.idx.long()
    assert bool(((i[:, 1:] > i[:, :-1]) | ~acts.mask()[:, 1:]).all())  # increasing indices


def test_no_dead_features_means_no_aux_and_mse_only(sl):
    p = make_params()
    x = make_x((BATCH, D_IN))
    res = ours_with(p).loss(x, dead_neuron_mask=torch.zeros(D_SAE, dtype=torch.bool))
    assert res.aux.item() == 0 and res.loss.item() == res.mse.item()
    res = ours_with(p).loss(x)
    assert res.aux.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_training_matches_sae_lens(sl, dtype):
    from sae_lens.saes.sae import TrainStepInput
    p = make_params(dtype=dtype)
    x = make_x((BATCH, D_IN)).to(dtype)
    dead = dead_mask()
    theirs = sae_lens_training(sl, p, False, True, dtype=str(dtype).removeprefix("torch."))
    out = theirs.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    out.loss.backward()
    ours = ours_with(p, rescale=True)
    res = ours.loss(x, dead_neuron_mask=dead)
    res.loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_rel(res.loss, out.loss, tol)
    for n in NAMES:
        assert_rel(getattr(ours, n).grad, getattr(theirs, n).grad, tol, n)


# ------------------------------------------------------------------------- selection chunks


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_chunked_selection_equals_one_chunk(monkeypatch, batch):
    p = make_params()
    x = make_x((BATCH, D_IN))
    norm = p["W_dec"].norm(dim=1)
    whole = topk.topk_encode(x, p["W_enc"], p["b_dec"], p["b_enc"], K, batch=batch,
                             decoder_norm=norm, backend="cpu")
    monkeypatch.setattr(topk, "ROW_BUDGET", 3 * D_SAE + 1)  # 3 rows per chunk
    chunked = topk.topk_encode(x, p["W_enc"], p["b_dec"], p["b_enc"], K, batch=batch,
                               decoder_norm=norm, backend="cpu")
    assert torch.equal(whole.idx, chunked.idx) and torch.equal(whole.counts, chunked.counts)
    # The values come from a GEMM over 3 rows vs over all rows: BLAS picks its kernel by shape
    # (MKL on some CPUs rounds a 3-row product differently, ~1e-15), so equal to fp64 rounding.
    assert_rel(chunked.f, whole.f, 1e-14)
    dense = topk.dense_topk(x, p["W_enc"], p["b_dec"], p["b_enc"], K, batch=batch,
                            decoder_norm=norm)[0]
    assert_rel(chunked.to_dense(), dense, TOL64)
    if batch:
        assert int(chunked.counts.sum()) == K * BATCH  # all positive here: exactly k per token
        assert chunked.counts.min() != chunked.counts.max()  # not k per row


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_leading_dims_match_sae_lens(sl, batch):
    """BatchTopK counts its k * tokens over every leading dim, as SAELens does."""
    p = make_params()
    x = make_x((5, 3, D_IN))
    theirs = sae_lens_training(sl, p, batch, True)
    ours = ours_with(p, batch, True)
    acts = ours.encode_batch_topk(x) if batch else ours.encode_sparse(x)
    assert acts.counts.shape == (5, 3)
    assert_rel(acts.to_dense(), theirs.encode(x), TOL64)
    assert_rel(ours.decode(acts), theirs.decode(theirs.encode(x)), TOL64)


def test_sparse_path_on_the_torch_executor_has_dense_gradients():
    """The op-level "reference" executor (gsae_fast.torch_executor) under _SlotPre: the same
    values and gradients as dense autograd through torch.topk."""
    p = {k: v.requires_grad_() for k, v in make_params().items()}
    x = make_x((BATCH, D_IN)).requires_grad_()
    for batch in (False, True):
        norm = p["W_dec"].norm(dim=1)
        acts = topk.topk_encode(x, p["W_enc"], p["b_dec"], p["b_enc"], K, batch=batch,
                                decoder_norm=norm, backend="reference")
        dense, _ = topk.dense_topk(x, p["W_enc"], p["b_dec"], p["b_enc"], K, batch=batch,
                                   decoder_norm=p["W_dec"].norm(dim=1))
        w = make_x((BATCH, D_SAE), seed=9)
        ours = torch.autograd.grad((acts.to_dense() * w).sum(), [x, *p.values()])
        theirs = torch.autograd.grad((dense * w).sum(), [x, *p.values()])
        for name, a, b in zip(["x", *p], ours, theirs):
            assert_rel(a, b, TOL64, name)


def test_empty_batch():
    m = ours_with(make_params())
    acts = m.encode_sparse(torch.zeros(0, 4, D_IN, dtype=torch.float64))
    assert acts.counts.shape == (0, 4) and m.decode(acts).shape == (0, 4, D_IN)
    with pytest.raises(ValueError, match="no tokens"):
        m.loss(torch.zeros(0, D_IN, dtype=torch.float64))


# ------------------------------------------------------------------------ SAELens inference


@pytest.mark.parametrize("rescale", [False, True], ids=["raw", "rescaled"])
@pytest.mark.parametrize("share", [False, True])
def test_from_sae_lens_topk_outputs(sl, rescale, share):
    t, _ = sl
    p = make_params()
    x = make_x((BATCH, D_IN))
    theirs = t.TopKSAE(t.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64",
                                       rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        for n in NAMES:
            getattr(theirs, n).copy_(p[n])
    ours = TopKSAE.from_sae_lens(theirs, share=share)
    assert ours.k == K and ours.rescale_acts_by_decoder_norm == rescale
    assert (ours.W_enc is theirs.W_enc) == share
    assert_rel(ours.encode(x), theirs.encode(x), TOL64)
    assert_rel(ours(x), theirs(x), TOL64)
    assert_rel(ours.decode(ours.encode_sparse(x)), theirs.decode(theirs.encode(x)), TOL64)
    back = ours.to_sae_lens(training=True)
    assert type(back).__name__ == "TopKTrainingSAE" and back.cfg.k == K
    assert_rel(back(x), theirs(x), TOL64)


@pytest.mark.parametrize("rescale", [False, True], ids=["raw", "rescaled"])
def test_batchtopk_inference_is_sae_lens_jumprelu(sl, rescale, tmp_path):
    from sae_lens import SAE
    p = make_params()
    x = make_x((BATCH, D_IN))
    theirs = sae_lens_training(sl, p, True, rescale)
    theirs.topk_threshold.fill_(0.4)
    ours = BatchTopKSAE.from_sae_lens(theirs)
    assert float(ours.topk_threshold) == 0.4 and ours.k == K
    theirs.save_inference_model(tmp_path / "inference")  # SAELens: BatchTopK -> JumpReLU
    jump = SAE.load_from_disk(tmp_path / "inference")
    assert type(jump).__name__ == "JumpReLUSAE"
    assert_rel(ours(x), jump(x), TOL64)
    # the activations: SAELens' JumpReLU has the decoder norms folded into its encoder
    assert_rel(ours.encode(x), jump.encode(x), TOL64)
    counts = ours.encode_sparse(x).counts
    assert 0 < counts.min() and counts.max() < D_SAE
    mine = ours.to_sae_lens()  # no inference class: the JumpReLU form, as SAELens saves it
    assert type(mine).__name__ == "JumpReLUSAE"
    assert_rel(mine(x), jump(x), TOL64)
    assert_rel(ours.to_jumprelu()(x), ours(x), TOL64)


def test_checkpoints_round_trip_with_sae_lens(sl, tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAE
    p = make_params(dtype=torch.float32)
    x = make_x((BATCH, D_IN), torch.float32)
    topk_sae = ours_with(p, rescale=True)
    topk_sae.save_pretrained(tmp_path / "topk")
    cfg = json.loads((tmp_path / "topk" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"]
    theirs = SAE.load_from_disk(tmp_path / "topk")
    assert type(theirs).__name__ == "TopKSAE"
    assert_rel(theirs(x), topk_sae(x), 1e-6)
    again = gsae_fast.load(tmp_path / "topk")
    assert isinstance(again, TopKSAE) and again.k == K and again.rescale_acts_by_decoder_norm
    for n in NAMES:
        assert torch.equal(getattr(again, n), getattr(topk_sae, n))

    batch_sae = ours_with(p, batch=True)
    batch_sae.topk_threshold.fill_(0.25)
    batch_sae.topk_threshold_lr = 0.05
    batch_sae.save_pretrained(tmp_path / "batch")
    theirs = TrainingSAE.load_from_disk(tmp_path / "batch")
    assert type(theirs).__name__ == "BatchTopKTrainingSAE" and theirs.cfg.topk_threshold_lr == 0.05
    assert float(theirs.topk_threshold) == 0.25
    again = BatchTopKSAE.load(tmp_path / "batch")
    assert float(again.topk_threshold) == 0.25 and again.topk_threshold.dtype == torch.float64
    assert again.topk_threshold_lr == 0.05
    with pytest.raises(UnsupportedSAEError, match="batchtopk"):
        TopKSAE.load(tmp_path / "batch")


# ----------------------------------------------------------------------- dictionary_learning


def dl_with(cls, p, threshold=None):
    ae = cls(D_IN, D_SAE, K).double()
    with torch.no_grad():
        ae.encoder.weight.copy_(p["W_enc"].T)
        ae.encoder.bias.copy_(p["b_enc"])
        ae.decoder.weight.copy_(p["W_dec"].T)
        ae.b_dec.copy_(p["b_dec"])
        if threshold is not None:
            ae.threshold.fill_(threshold)
    return ae


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_dictionary_learning_trainer_loss_and_grads(dictlearn, batch):
    """TopKTrainer / BatchTopKTrainer.loss (AuxK normalised by the residual variance) against
    loss(aux_style="dictionary_learning", aux_loss_coefficient=auxk_alpha)."""
    p = make_params()
    x = make_x((BATCH, D_IN))
    trainer_cls = dictlearn.BatchTopKTrainer if batch else dictlearn.TopKTrainer
    trainer = trainer_cls(steps=10, activation_dim=D_IN, dict_size=D_SAE, k=K, layer=0,
                          lm_name="none", warmup_steps=1, device="cpu")
    trainer.ae = dl_with(dictlearn.BatchTopKSAE if batch else dictlearn.AutoEncoderTopK, p)
    stale = dead_mask()
    trainer.num_tokens_since_fired = torch.where(stale, trainer.dead_feature_threshold, 0)
    loss = trainer.loss(x, step=0)
    loss.backward()
    ours = ours_with(p, batch)
    fired = ours.encode_batch_topk(x) if batch else ours.encode_sparse(x)
    fired_mask = torch.zeros(D_SAE, dtype=torch.bool)
    fired_mask[fired.idx[fired.mask()].long()] = True
    dead = stale & ~fired_mask  # the trainer resets the features that fired before its AuxK
    assert trainer.dead_features == int(dead.sum()) > 0
    res = ours.loss(x, dead_neuron_mask=dead, aux_loss_coefficient=trainer.auxk_alpha,
                    aux_style="dictionary_learning")
    res.loss.backward()
    tol = 1e-6  # dictionary_learning computes its AuxK term in fp32, even for fp64 SAEs
    assert_rel(res.loss, loss, tol)
    with torch.no_grad():
        f = trainer.ae.encode(x, use_threshold=False)
        their_aux = loss - (x - trainer.ae.decode(f)).pow(2).sum(-1).mean()
    assert res.aux.item() > 0
    assert_rel(res.aux, their_aux, 1e-5, "AuxK")
    theirs = {"W_enc": trainer.ae.encoder.weight.grad.T, "b_enc": trainer.ae.encoder.bias.grad,
              "W_dec": trainer.ae.decoder.weight.grad.T, "b_dec": trainer.ae.b_dec.grad}
    for n in NAMES:
        assert_rel(getattr(ours, n).grad, theirs[n], tol, n)


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_dictionary_learning_converters_and_ae_pt(dictlearn, batch, tmp_path):
    p = make_params()
    x = make_x((BATCH, D_IN))
    dl_cls = dictlearn.BatchTopKSAE if batch else dictlearn.AutoEncoderTopK
    ae = dl_with(dl_cls, p, threshold=0.3)
    ours = (BatchTopKSAE if batch else TopKSAE).from_dictionary_learning(ae)
    assert type(ours) is (BatchTopKSAE if batch else TopKSAE) and ours.k == K
    assert_rel(ours.encode(x), ae.encode(x), TOL64)  # BatchTopK: the threshold inference
    assert_rel(ours(x), ae(x), TOL64)
    if batch:
        assert_rel(ours.encode_batch_topk(x).to_dense(), ae.encode(x, use_threshold=False),
                   TOL64)
    back = ours.to_dictionary_learning()
    assert type(back) is dl_cls and int(back.k) == K and float(back.threshold) == pytest.approx(0.3)
    for key, value in ae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # ae.pt + config.json, as dictionary_learning's training writes them
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dl_cls.__name__}}))
    loaded = gsae_fast.load(tmp_path)
    assert type(loaded) is type(ours)
    assert_rel(loaded(x), ae(x), TOL64)


def test_dictionary_learning_refuses_what_it_cannot_hold(dictlearn):
    with pytest.raises(UnsupportedSAEError, match="rescale_acts_by_decoder_norm"):
        ours_with(make_params(), rescale=True).to_dictionary_learning()
    m = BatchTopKSAE(D_IN, D_SAE, 2.5)
    with pytest.raises(UnsupportedSAEError, match="integer k"):
        m.to_dictionary_learning()


# --------------------------------------------------------------------------------- errors


def test_batchtopk_threshold_update():
    """SAELens' moving average, and dictionary_learning's unset (-1) threshold replaced by the
    first smallest activation."""
    p = make_params()
    x = make_x((BATCH, D_IN))
    m = ours_with(p, batch=True)
    m.topk_threshold.fill_(-1.0)
    out = m.loss(x)
    low = float(out.min_positive())
    assert 0 < low and float(m.topk_threshold) == low
    out = m.loss(x)
    assert math.isclose(float(m.topk_threshold), 0.99 * low + 0.01 * float(out.min_positive()),
                        rel_tol=1e-12)


def test_share_keeps_the_sae_lens_threshold_buffer(sl):
    p = make_params()
    theirs = sae_lens_training(sl, p, True, False)
    ours = BatchTopKSAE.from_sae_lens(theirs, share=True)
    assert ours.topk_threshold is theirs.topk_threshold
    ours.loss(make_x((BATCH, D_IN)))
    assert float(theirs.topk_threshold) > 0


def test_dictionary_learning_threshold_survives_checkpoints(dictlearn, tmp_path):
    ae = dl_with(dictlearn.AutoEncoderTopK, make_params(), threshold=0.3)
    ours = TopKSAE.from_dictionary_learning(ae)
    ours.save_pretrained(tmp_path)
    again = TopKSAE.load(tmp_path)
    assert again.dl_threshold == pytest.approx(0.3)
    assert float(again.to_dictionary_learning().threshold) == pytest.approx(0.3)


def test_ambiguous_dictionary_learning_state_dict_needs_the_class(dictlearn, tmp_path):
    ae = dl_with(dictlearn.BatchTopKSAE, make_params(), threshold=0.3)
    with pytest.raises(UnsupportedSAEError, match="AutoEncoderTopK and BatchTopKSAE"):
        gsae_fast.interop.from_dictionary_learning(ae.state_dict())
    assert type(BatchTopKSAE.from_dictionary_learning(ae.state_dict())) is BatchTopKSAE
    torch.save(ae.state_dict(), tmp_path / "ae.pt")  # no config.json to tell
    with pytest.raises(UnsupportedSAEError, match="BatchTopKSAE"):
        gsae_fast.load(tmp_path)
    assert type(BatchTopKSAE.load(tmp_path)) is BatchTopKSAE


def test_bad_input_is_refused():
    p = make_params()
    with pytest.raises(ValueError, match="positive integer"):
        TopKSAE(D_IN, D_SAE, 2.5)
    with pytest.raises(ValueError, match="positive"):
        BatchTopKSAE(D_IN, D_SAE, 0)
    m = ours_with(p)
    x = make_x((BATCH, D_IN))
    with pytest.raises(ValueError, match="dead_neuron_mask"):
        m.loss(x, dead_neuron_mask=torch.zeros(D_SAE + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="aux_style"):
        m.loss(x, aux_style="openai")
    with pytest.raises(ValueError, match="d_in"):
        m.encode_sparse(make_x((3, D_IN + 1)))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.encode_sparse(bad)
    with pytest.raises(ValueError, match="larger than d_sae"):
        TopKSAE(D_IN, D_SAE, D_SAE + 1)
    with pytest.raises(ValueError, match="aux_k"):
        m.loss(x, dead_neuron_mask=dead_mask(), aux_k=0)
    rescaled = ours_with(p, rescale=True)
    with torch.no_grad():
        rescaled.W_dec[5, 0] = float("nan")  # a NaN decoder norm must not vanish in the filter
    with pytest.raises(ValueError, match="NaN"):
        rescaled.encode_sparse(x)
