"""EleutherAI sparsify's checkpoint folder (``SparseCoder.save_to_disk`` / ``load_from_disk``)
for :class:`gsae_fast.TopKSAE`: :func:`save_sparsify` writes it, :func:`load_sparsify` (and
``gsae_fast.load``) reads it.

The folder: ``cfg.json`` (sparsify's ``SparseCoderConfig`` fields and ``d_in``) and
``sae.safetensors`` with ``encoder.weight [num_latents, d_in]``, ``encoder.bias
[num_latents]``, ``W_dec [num_latents, d_in]`` and ``b_dec [d_in]``. The width is
``num_latents``, or ``d_in * expansion_factor`` when ``num_latents`` is 0.

With ``activation="topk"`` sparsify computes ``relu((x - b_dec) @ encoder.weight.T +
encoder.bias)``, keeps each token's ``k`` largest and decodes ``acts @ W_dec[indices] + b_dec``:
a TopKSAE without ``rescale_acts_by_decoder_norm``, ``W_enc = encoder.weight.T``, ``b_enc =
encoder.bias``. ``normalize_decoder`` and ``multi_topk`` only shape sparsify's training and are
read as they are. Refused with :class:`UnsupportedSAEError`: ``activation="groupmax"``, a skip
connection (``W_skip``), a transcoder (``transcode``: no input centring, another target) and the
early ``signed`` SAEs.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from .interop import (
    _check_floating,
    _load_safetensors,
    _new_module,
    _parse_dtype,
    _read_json_object,
    _safetensors,
    write_checkpoint,
)
from .saes import ARCHS, UnsupportedSAEError

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

# Settings sparsify writes that a TopKSAE cannot compute: the field, the value it must have, why.
_REFUSED = (
    ("activation", "topk", "groupmax keeps one latent per group, not the k largest"),
    ("skip_connection", False, "a skip connection adds x @ W_skip.T to the output"),
    ("transcode", False, "a transcoder predicts another layer's output from uncentred inputs"),
    ("signed", False, "a signed SAE keeps the k largest |pre| without ReLU"),
)


def _check_cfg(cfg: dict, where: str) -> None:
    for name, wanted, why in _REFUSED:
        value = cfg.get(name, wanted)
        if value != wanted:
            raise UnsupportedSAEError(f"{where}: sparsify {name}={value!r} is not supported "
                                      f"({why}); gsae_fast loads {name}={wanted!r} only")
    for name in ("d_in", "k"):
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}: field {name!r} is {value!r}, expected a positive "
                             f"integer: not a sparsify config")


def load_sparsify(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                  dtype: Union[str, torch.dtype, None] = None, backend: str = "auto"):
    """The :class:`gsae_fast.TopKSAE` of the sparsify folder ``path`` (``dtype``: the
    checkpoint's by default)."""
    path = os.fspath(path)
    cfg_path, weights_path = (os.path.join(path, n) for n in (SPARSIFY_CFG, SPARSIFY_WEIGHTS))
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: has {SPARSIFY_WEIGHTS} but no {SPARSIFY_CFG}")
    cfg = _read_json_object(cfg_path)
    _check_cfg(cfg, cfg_path)
    state = _load_safetensors(weights_path, device)
    if "W_skip" in state:
        raise UnsupportedSAEError(f"{weights_path}: has W_skip (a skip connection), which "
                                  f"gsae_fast does not implement")
    missing = [k for k in KEYS if k not in state]
    extra = [k for k in state if k not in KEYS]
    if missing or extra:
        raise UnsupportedSAEError(f"{weights_path}: expected the tensors {list(KEYS)} of a "
                                  f"sparsify SAE; missing {missing}, unknown {extra}")
    _check_floating(state, KEYS, weights_path)
    width = cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 32)
    if tuple(state["encoder.weight"].shape) != (width, cfg["d_in"]):
        raise UnsupportedSAEError(f"{weights_path}: encoder.weight has shape "
                                  f"{list(state['encoder.weight'].shape)}, the config says "
                                  f"[{width}, {cfg['d_in']}] (num_latents, d_in)")
    dtype = _parse_dtype(dtype)
    params = {"W_enc": state["encoder.weight"].t(), "b_enc": state["encoder.bias"],
              "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    params = {n: t.to(dtype=dtype or t.dtype).contiguous() for n, t in params.items()}
    return _new_module(ARCHS["topk"], params, backend, None,
                       {"k": cfg["k"], "rescale_acts_by_decoder_norm": False})


def save_sparsify(sae, path: Union[str, os.PathLike]) -> None:
    """Write the :class:`gsae_fast.TopKSAE` ``sae`` as a sparsify folder ``path``
    (``sparsify.SparseCoder.load_from_disk(path)`` reads it). Refused: another architecture, a
    non-integer ``k`` and ``rescale_acts_by_decoder_norm``, which sparsify has no setting for.
    Both files are replaced atomically, as :func:`gsae_fast.interop.save_pretrained` does."""
    if getattr(sae, "ARCH", None) != "topk":
        raise UnsupportedSAEError(f"sparsify's format holds TopK SAEs; this is a "
                                  f"{type(sae).__name__}")
    if int(sae.k) != sae.k:
        raise UnsupportedSAEError(f"sparsify needs an integer k, got {sae.k}")
    if sae.rescale_acts_by_decoder_norm:
        raise UnsupportedSAEError("sparsify has no rescale_acts_by_decoder_norm: fold the "
                                  "decoder norms first (W_enc, b_enc times them, W_dec rows "
                                  "divided by them) and save a TopKSAE without it")
    W_dec = sae.W_dec.detach()
    tensors = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": W_dec, "b_dec": sae.b_dec.detach()}
    weights = _safetensors().save({k: t.contiguous() for k, t in tensors.items()})
    norms = W_dec.norm(dim=1)
    cfg = dict(activation="topk",
               expansion_factor=sae.d_sae // sae.d_in,  # (sparsify reads num_latents first)
               # sparsify keeps unit decoder rows while it trains with this: say whether ours are
               normalize_decoder=bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)),
               num_latents=sae.d_sae, k=int(sae.k), multi_topk=False, skip_connection=False,
               transcode=False, d_in=sae.d_in)
    os.makedirs(path, exist_ok=True)
    write_checkpoint(os.fspath(path), SPARSIFY_WEIGHTS, weights, SPARSIFY_CFG, cfg)
