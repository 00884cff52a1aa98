"""EleutherAI sparsify's checkpoint folder (gsae_fast.sparsify_format): a TopKSAE saved there
reads back exactly through gsae_fast.load, and computes what sparsify computes from the folder,
checked against sparsify's forward written here in plain torch from its documented math
(sparsify itself is not a dependency); settings a TopKSAE cannot represent are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gsae_fast
from gsae_fast import GatedSAE, TopKSAE, interop
from gsae_fast.interop import UnsupportedSAEError

D_IN, D_SAE, K, BATCH = 12, 48, 5, 33
# sparsify's SparseCoderConfig fields (and d_in, which save_to_disk adds)
SPARSIFY_FIELDS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
                   "multi_topk", "skip_connection", "transcode", "d_in"}
SPARSIFY_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def sparsify_forward(folder, x):
    """sparsify's SparseCoder on ``x``, from its folder: ``pre = relu((x - b_dec) @
    encoder.weight.T + encoder.bias)``, the ``k`` largest per token, decoded as
    ``sum(acts * W_dec[indices]) + b_dec``. Returns (dense activations, reconstruction)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae.safetensors")
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    acts, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
    dense = torch.zeros_like(pre).scatter(-1, indices, acts)
    return dense, (acts.unsqueeze(-1) * w["W_dec"][indices]).sum(-2) + w["b_dec"]


def random_topk(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    sae = TopKSAE(D_IN, D_SAE, K, dtype=dtype, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def write_sparsify(folder, cfg: dict, tensors: dict):
    """A folder as sparsify's save_to_disk writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_and_sparsify_forward(tmp_path, dtype):
    sae = random_topk(dtype)
    interop.save_sparsify(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert set(cfg) == SPARSIFY_FIELDS  # sparsify's config reads every field
    assert cfg["activation"] == "topk" and cfg["num_latents"] == D_SAE and cfg["k"] == K
    assert cfg["d_in"] == D_IN and not cfg["skip_connection"] and not cfg["transcode"]
    tensors = load_file(tmp_path / "sae.safetensors")
    assert set(tensors) == SPARSIFY_TENSORS  # sparsify loads strictly: these keys, no others
    assert tensors["encoder.weight"].shape == (D_SAE, D_IN)
    assert tensors["W_dec"].shape == (D_SAE, D_IN)

    back = gsae_fast.load(tmp_path)
    assert type(back) is TopKSAE and back.k == K and not back.rescale_acts_by_decoder_norm
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    x = torch.randn(BATCH, D_IN, dtype=dtype)
    dense, x_hat = sparsify_forward(tmp_path, x)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.encode(x), dense, **tol)
    torch.testing.assert_close(back(x), x_hat, **tol)
    assert TopKSAE.load(tmp_path, dtype="float32").W_enc.dtype == torch.float32


def test_reads_a_folder_sparsify_wrote(tmp_path):
    # sparsify's defaults: the width from expansion_factor (num_latents 0), unit decoder rows
    torch.manual_seed(3)
    W_dec = torch.randn(4 * D_IN, D_IN)
    tensors = {"encoder.weight": torch.randn(4 * D_IN, D_IN), "encoder.bias": torch.randn(4 * D_IN),
               "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(D_IN)}
    cfg = dict(activation="topk", expansion_factor=4, normalize_decoder=True, num_latents=0, k=7,
               multi_topk=True, skip_connection=False, transcode=False, d_in=D_IN)
    write_sparsify(tmp_path, cfg, tensors)
    sae = gsae_fast.load(tmp_path)
    assert sae.d_sae == 4 * D_IN and sae.k == 7
    x = torch.randn(BATCH, D_IN)
    dense, x_hat = sparsify_forward(tmp_path, x)
    torch.testing.assert_close(sae.encode(x), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), x_hat, rtol=1e-5, atol=1e-5)
    interop.save_sparsify(sae, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again["normalize_decoder"] is True and again["num_latents"] == 4 * D_IN


@pytest.mark.parametrize("change, match", [
    (dict(activation="groupmax"), "activation='groupmax'"),
    (dict(transcode=True), "transcode=True"),
    (dict(skip_connection=True), "skip_connection=True"),
    (dict(signed=True), "signed=True"),
    (dict(k=0), "'k' is 0"),
])
def test_load_refuses_what_a_topk_sae_cannot_compute(tmp_path, change, match):
    interop.save_sparsify(random_topk(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises((UnsupportedSAEError, ValueError), match=match):
        gsae_fast.load(tmp_path)


def test_load_refuses_other_tensors_and_other_classes(tmp_path):
    interop.save_sparsify(random_topk(), tmp_path)
    tensors = load_file(tmp_path / "sae.safetensors")
    with pytest.raises(UnsupportedSAEError, match="TopKSAE"):
        GatedSAE.load(tmp_path)
    save_file(dict(tensors, W_skip=torch.zeros(D_IN, D_IN, dtype=torch.float64)),
              tmp_path / "sae.safetensors")
    with pytest.raises(UnsupportedSAEError, match="W_skip"):
        gsae_fast.load(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "W_dec"}, tmp_path / "sae.safetensors")
    with pytest.raises(UnsupportedSAEError, match=r"missing \['W_dec'\]"):
        gsae_fast.load(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    save_file(tensors, tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(dict(cfg, num_latents=D_SAE + 1)))
    with pytest.raises(UnsupportedSAEError, match="encoder.weight has shape"):
        gsae_fast.load(tmp_path)


def test_save_refuses_what_sparsify_cannot_hold(tmp_path):
    with pytest.raises(UnsupportedSAEError, match="rescale_acts_by_decoder_norm"):
        interop.save_sparsify(random_topk(rescale_acts_by_decoder_norm=True), tmp_path)
    with pytest.raises(UnsupportedSAEError, match="BatchTopKSAE"):
        interop.save_sparsify(gsae_fast.BatchTopKSAE(D_IN, D_SAE, K), tmp_path)
    sae = random_topk()
    sae.k = 2.5  # (the constructor refuses it; an attribute set later is caught here)
    with pytest.raises(UnsupportedSAEError, match="integer k"):
        interop.save_sparsify(sae, tmp_path)
    assert not (tmp_path / "cfg.json").exists()
