"""What a trained SAE carries into SAELens: its metadata (:func:`training_metadata`, the layer as
a TransformerLens hook name: :func:`transformer_lens_hook`) and, after SAELens'
``expected_average_only_in`` normalisation, the input scale folded into its weights
(:func:`fold_input_scale`). gsae_fast.train writes both into ``sae/``; gsae_fast.interop
re-exports them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .hooks import BLOCK_LAYOUTS

# TransformerLens' hook of each layer alias of gsae_fast.hooks: a block's output is the residual
# stream after it; attn / mlp are their outputs before they are added to the residual stream.
TL_HOOKS = {"resid": "blocks.{}.hook_resid_post", "attn": "blocks.{}.hook_attn_out",
            "mlp": "blocks.{}.hook_mlp_out"}


def transformer_lens_hook(layer: str) -> str:
    """TransformerLens' hook name of a gsae_fast layer (see gsae_fast.hooks.resolve_hook):
    ``resid:N`` -> ``blocks.N.hook_resid_post``, ``attn:N`` -> ``blocks.N.hook_attn_out``,
    ``mlp:N`` -> ``blocks.N.hook_mlp_out``, and the same for the module names these aliases
    stand for (``transformer.h.N``, ``model.layers.N.mlp``, ...: hooks.BLOCK_LAYOUTS). Any other
    name is returned as it is. (A model that normalises the attention or MLP output inside the
    block, as Gemma 2 does, has TransformerLens' hook after that norm, the module's before it.)"""
    kind, colon, index = layer.partition(":")
    if colon:
        return TL_HOOKS[kind].format(int(index)) if kind in TL_HOOKS and index.isdigit() \
            else layer
    for prefix, attn, mlp in BLOCK_LAYOUTS:
        for blocks in (prefix, prefix.split(".", 1)[1]):  # with and without the LM head's wrapper
            if not layer.startswith(blocks + "."):
                continue
            index, _, sub = layer[len(blocks) + 1:].partition(".")
            kind = {"": "resid", attn: "attn", mlp: "mlp"}.get(sub)
            if index.isdigit() and kind is not None:
                return TL_HOOKS[kind].format(int(index))
    return layer


def training_metadata(described: dict, *, layer: Optional[str] = None,
                      model_name: Optional[str] = None, context_size: Optional[int] = None,
                      prepend_bos: Optional[bool] = None, dataset_path=None) -> dict:
    """SAELens' metadata of an SAE trained on the data ``described`` (the record a data source of
    gsae_fast.data returns, kept as ``TrainConfig.extra``): set it as the SAE's
    ``sae_lens_metadata`` before :func:`save_pretrained`, which writes it to cfg.json's
    ``metadata``, where ``sae_lens.SAE.load_from_disk`` reads it (``sae.cfg.metadata``).

    The fields SAELens' own trainer sets, from ``described``'s: ``model_name`` (``model``),
    ``hook_name`` (``layer``, in TransformerLens' form where it has one:
    :func:`transformer_lens_hook`), ``hook_head_index`` (None), ``context_size``
    (``context_len``), ``prepend_bos``, ``exclude_special_tokens``, ``dataset_path``
    (``dataset``, ``data`` or ``cache``: one path, or a list of several); and ``layer``, the
    layer as gsae_fast names it. A keyword argument given overrides ``described``; a field
    known from neither is None (SAELens' ``ActivationsStore.from_sae`` then asks for it).
    ``normalize_activations`` is a field of the config, not of the metadata: see
    :func:`fold_input_scale`."""
    def given(value, key):
        return described.get(key) if value is None else value

    layer = given(layer, "layer")
    if dataset_path is None:
        dataset_path = next((described[k] for k in ("dataset", "data", "cache")
                             if described.get(k) is not None), None)
    if isinstance(dataset_path, (list, tuple)):
        dataset_path = [str(p) for p in dataset_path]
        dataset_path = dataset_path[0] if len(dataset_path) == 1 else dataset_path
    elif dataset_path is not None:
        dataset_path = str(dataset_path)
    return dict(model_name=given(model_name, "model"),
                hook_name=None if layer is None else transformer_lens_hook(layer),
                hook_head_index=None, context_size=given(context_size, "context_len"),
                prepend_bos=given(prepend_bos, "prepend_bos"),
                exclude_special_tokens=described.get("exclude_special_tokens"),
                dataset_path=dataset_path, layer=layer)


@torch.no_grad()
def fold_input_scale(sae, scale: float):
    """Fold an input scale into ``sae``'s weights, in place, and return it: an SAE trained on
    ``x * scale`` then takes raw ``x`` and returns raw ``x_hat`` (its old ``sae(x * scale) /
    scale``). This is SAELens' ``fold_activation_norm_scaling_factor``, with which its trainer
    ends a run with ``normalize_activations="expected_average_only_in"``: ``W_enc * scale``,
    ``W_dec / scale``, ``b_dec / scale``. The pre-activations stay the same, so the JumpReLU
    threshold, the Gated biases and the TopK choice do too; a BatchTopK ``topk_threshold``
    compares ``pre * |W_dec[i]|`` under ``rescale_acts_by_decoder_norm``, so it is divided by
    ``scale`` there. As in SAELens, the folded SAE is one with ``normalize_activations="none"``
    (what :func:`save_pretrained` writes); the scale folded is kept as ``norm_scaling_factor``
    (SAELens' name for it) in ``sae.sae_lens_metadata`` (multiplied in if one is there)."""
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"fold_input_scale: the scale must be a positive finite number, got "
                         f"{scale}")
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)
    if getattr(sae, "BATCH", False) and sae.rescale_acts_by_decoder_norm:
        sae.topk_threshold.div_(scale)
    metadata = dict(sae.sae_lens_metadata or {})
    metadata["norm_scaling_factor"] = metadata.get("norm_scaling_factor", 1.0) * scale
    sae.sae_lens_metadata = metadata
    return sae
