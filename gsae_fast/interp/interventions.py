"""Interventions on SAE features in a running model: ablating features of spliced layers
(:func:`ablate`), steering a layer's output along decoder directions (:func:`steer`), and the
per-feature mean activations that mean ablation uses (:func:`mean_activations`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..hooks import model_device, replace_output, resolve_hook
from ..types import SparseActs, acc_dtype
from .splice import Splice, check_sae, decoder_rows, describe, model_logits, splice

ABLATION_MODES = ("zero", "mean", "value")


def _set_features(acts: SparseActs, feats: Tensor, values: Optional[Tensor]) -> SparseActs:
    """``acts`` with features ``feats`` (sorted, unique) set to ``values`` at every token (None:
    removed, i.e. 0), still sparse: the kept slots and the set features, merged by sorting so
    the indices stay strictly increasing. Differentiable w.r.t. ``acts.f``. ``pi_gate`` of a set
    feature is 0 (it is forced, not gated); only ``f`` is decoded."""
    d_sae = acts.d_sae
    lead = acts.counts.shape
    member = torch.zeros(d_sae, dtype=torch.bool, device=acts.idx.device)
    member[feats] = True
    idx = acts.idx.long()
    keep = acts.mask() & ~member[idx]
    sentinel = d_sae  # sorts after every feature: the padding goes to the end
    idx = torch.where(keep, idx, torch.full_like(idx, sentinel))
    zero = torch.zeros((), dtype=acts.f.dtype, device=acts.f.device)
    f = torch.where(keep, acts.f, zero)
    pi = torch.where(keep, acts.pi_gate, zero)
    if values is not None and feats.numel():
        n = feats.numel()
        idx = torch.cat([idx, feats.expand(*lead, n)], -1)
        f = torch.cat([f, values.to(f.dtype).expand(*lead, n)], -1)
        pi = torch.cat([pi, zero.expand(*lead, n)], -1)
    idx, order = idx.sort(-1)
    f, pi = f.gather(-1, order), pi.gather(-1, order)
    counts = (idx < sentinel).sum(-1)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    idx, f, pi = idx[..., :width], f[..., :width], pi[..., :width]
    pad = idx >= sentinel
    idx = torch.where(pad, torch.zeros_like(idx), idx)
    f, pi = torch.where(pad, zero, f), torch.where(pad, zero, pi)
    return SparseActs(idx=idx.to(acts.idx.dtype), f=f, pi_gate=pi,
                      counts=counts.to(acts.counts.dtype), d_sae=d_sae,
                      max_count=int(counts.max()) if counts.numel() else 0)


def ablate(model: torch.nn.Module, saes: Mapping, features: Mapping, mode: str = "zero",
           values=None) -> Splice:
    """A context manager splicing the layers of ``features`` (``{layer: feature ids}``) with
    those features ablated and the error term kept: ``out = decode(a') + (x - x_hat)``, where
    ``a'`` is ``a`` with the listed features set to 0 (``mode="zero"``), to the caller's
    per-feature means (``"mean"``: ``values`` a ``[d_sae]`` tensor, e.g. from
    :func:`mean_activations`) or to given values (``"value"``: a ``[d_sae]`` tensor or a number)
    at every token; ``values`` is ``{layer: ...}``, or the value itself for one layer.
    Equivalently ``out = x + sum_i (a'_i - a_i) W_dec[i]``: with every feature zero-ablated the
    layer outputs ``b_dec + err``. Activations stay sparse. ``with ablate(...) as sp:`` (a
    :class:`Splice`: records as :func:`splice`).
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}, got {mode!r}")
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty dict {layer: feature ids}")
    missing = [k for k in features if k not in saes]
    if missing:
        raise ValueError(f"no SAE given for layers {missing}")
    if mode != "zero":
        if values is None:
            raise ValueError(f"mode={mode!r} needs values (per-feature [d_sae] tensors)")
        if not isinstance(values, Mapping):
            if len(features) != 1:
                raise ValueError("with several layers, values must be a dict {layer: values}")
            values = {next(iter(features)): values}
    sp = Splice(model, {k: saes[k] for k in features})
    for key, ids in features.items():
        sae = saes[key]
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
        if ids.numel() and (ids.min() < 0 or ids.max() >= sae.d_sae):
            raise ValueError(f"features[{key!r}]: ids must be in [0, {sae.d_sae})")
        ids = ids.to(sae.W_dec.device)
        vals = None
        if mode != "zero":
            if key not in values:
                raise ValueError(f"no values given for layer {key!r}")
            # In the activations' dtype (fp64 for an fp64 SAE): a Python number would
            # otherwise become fp32 and round.
            v = torch.as_tensor(values[key], dtype=acc_dtype(sae.W_dec.dtype),
                                device=sae.W_dec.device)
            if v.dim() == 0 and mode == "value":
                v = v.expand(sae.d_sae)
            if tuple(v.shape) != (sae.d_sae,):
                raise ValueError(f"values[{key!r}] must be a [d_sae={sae.d_sae}] tensor"
                                 + (" or a number" if mode == "value" else "")
                                 + f", got {tuple(v.shape)}")
            vals = v[ids]
        sp.set(key, acts=lambda a, ids=ids, vals=vals: _set_features(a, ids, vals))
    return sp


@contextmanager
def steer(model: torch.nn.Module, saes, layer: str, feature, scale, *, positions=None):
    """Within the ``with`` block, ``layer``'s output gets ``scale * W_dec[feature]`` added (at
    every position, or at ``positions``; for a TopK SAE that rescales its activations by the
    decoder norms, the unit row ``W_dec[feature] / |W_dec[feature]|``, what one unit of
    activation adds); no SAE is spliced. ``saes``: ``{layer: sae}`` or the
    SAE; ``feature`` an id or a list (with ``scale`` a number or a list of the same length).
    Yields the module's name."""
    sae = saes[layer] if isinstance(saes, Mapping) else saes
    check_sae(layer, sae)
    ids = torch.as_tensor(feature, dtype=torch.long, device=sae.W_dec.device).reshape(-1)
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= sae.d_sae:
        raise ValueError(f"steer: feature ids must be in [0, {sae.d_sae})")
    s = torch.as_tensor(scale, dtype=sae.W_dec.dtype, device=sae.W_dec.device).reshape(-1)
    if s.numel() not in (1, ids.numel()):
        raise ValueError("steer: scale must be a number or one per feature")
    with torch.no_grad():  # the decoder's vector per unit of activation (as in node effects)
        direction = (s.unsqueeze(-1) * decoder_rows(sae, ids)).sum(0)
    name, _ = resolve_hook(model, layer)

    def add(x):
        if x.dim() != 3 or x.shape[-1] != sae.d_in:
            raise ValueError(f"steer: layer {layer!r} ({name}) outputs {tuple(x.shape)}, "
                             f"expected [batch, pos, d_in={sae.d_in}]")
        v = direction.to(device=x.device, dtype=x.dtype)
        if positions is None:
            return x + v
        mask = torch.zeros(x.shape[1], 1, dtype=x.dtype, device=x.device)
        mask[positions] = 1
        return x + mask * v

    with replace_output(model, layer, add) as hooked:
        yield hooked


def mean_activations(model: torch.nn.Module, saes: Mapping, tokens: Tensor, *,
                     batch_size: int = 32) -> dict:
    """Per-feature mean activations ``{layer: [d_sae]}`` of the spliced model over every
    position of ``tokens [n, pos]`` (inactive = 0): the ``values`` of ``ablate(...,
    mode="mean")``. Summed from the sparse activations, no ``[tokens, d_sae]`` tensor."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, pos], got {describe(tokens)}")
    tokens = tokens.to(model_device(model))
    sums, n = {}, 0
    with splice(model, saes) as sp, torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            sp.records.clear()
            model_logits(model, tokens[s:s + batch_size])
            for key in sp.layers:
                if key not in sp.records:
                    raise ValueError(f"layer {key!r} did not run in the model's forward")
                a = sp.records[key].acts
                f = torch.where(a.mask(), a.f, torch.zeros((), dtype=a.f.dtype,
                                                          device=a.f.device))
                acc = sums.setdefault(key, torch.zeros(a.d_sae, dtype=f.dtype, device=f.device))
                acc.index_add_(0, a.idx.reshape(-1).long(), f.reshape(-1))
            n += tokens[s:s + batch_size].numel()
    return {k: v / n for k, v in sums.items()}
