"""SAEs spliced into a model with an error node (:func:`splice`, :class:`Splice`,
:class:`LayerRecord`), and the small helpers every analysis in this package shares (checking
SAEs and inputs, the logits and the metric of a forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from ..hooks import first_output, forward_kwargs, resolve_hook
from ..types import SparseActs, acc_dtype

_UNSET = object()


# ----------------------------------------------------------------------------------- helpers

def check_sae(key, sae) -> None:
    """TypeError unless ``sae`` has what splicing needs (a gsae_fast SAE)."""
    for attr in ("encode_sparse", "decode", "W_dec", "d_in", "d_sae"):
        if not hasattr(sae, attr):
            raise TypeError(f"the SAE for layer {key!r} ({type(sae).__name__}) has no {attr!r}: "
                            f"use a gsae_fast SAE (GatedSAE, JumpReLUSAE, TopKSAE, ...)")


def sae_dtype(sae) -> torch.dtype:
    """The dtype the SAE computes in: its weights'."""
    return sae.W_dec.dtype


def decoder_rows(sae, feats: Tensor) -> Tensor:
    """The vectors ``decode`` adds per unit of each feature in ``feats``: ``W_dec[feats]``
    (divided by the rows' norms for a TopK SAE that rescales its activations by them)."""
    rows = sae.W_dec[feats]
    if getattr(sae, "rescale_acts_by_decoder_norm", False):
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows


def describe(t) -> str:
    """A tensor's shape, or another value's type name, for error messages."""
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def model_logits(model, tokens: Tensor) -> Tensor:
    """The model's logits, in fp32 at least: a bf16 metric would quantise the small differences
    the estimators are compared on."""
    out = model(input_ids=tokens, **forward_kwargs(model))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return logits if logits.dtype == torch.float64 else logits.float()


def metric_value(metric, logits: Tensor) -> Tensor:
    """``metric(logits)``, checked to be a scalar tensor."""
    m = metric(logits)
    if not isinstance(m, Tensor) or m.dim() != 0:
        raise ValueError(f"metric must return a scalar (0-dim) tensor, got {describe(m)}: "
                         f"reduce over the batch (e.g. .sum() or .mean())")
    return m


def check_tokens(clean: Tensor, patch: Tensor, device) -> tuple[Tensor, Tensor]:
    """The clean and patch tokens, checked to be integer [batch, pos] of one shape, on
    ``device``."""
    for name, t in (("clean_tokens", clean), ("patch_tokens", patch)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor [batch, pos], got "
                             f"{describe(t)}")
    if clean.shape != patch.shape:
        raise ValueError(f"clean_tokens {tuple(clean.shape)} and patch_tokens "
                         f"{tuple(patch.shape)} must have the same shape (the nodes are "
                         f"compared position by position)")
    return clean.to(device), patch.to(device)


# ------------------------------------------------------------------------------------ splice

@dataclass
class LayerRecord:
    """What one spliced layer did in the last forward.

    ``x``: the layer's own output (the SAE input, the model's dtype); ``acts``: ``encode_sparse``
    of ``x`` (SparseActs, the clean activations of this forward); ``x_hat``: ``decode(acts)``;
    ``err``: the error node used (``x - x_hat``, or the held tensor); ``out``: what the layer
    output instead, ``decode(patched_acts or acts) + err`` in the model's dtype (its ``.grad``
    after a backward with ``retain_grad=True``); ``patched_acts``: the replacement activations
    when an intervention set them (SparseActs or dense ``[..., d_sae]``), else None. ``acts``
    has fp32 / fp64 values; ``x_hat`` and ``err`` are in the wider of the model's dtype and the
    SAE's accumulation dtype (so that ``x_hat + err`` is ``x``); all three are None for a layer
    that :func:`node_effects` ran without its SAE.
    """

    name: str
    x: Tensor
    acts: Optional[SparseActs]
    x_hat: Optional[Tensor]
    err: Optional[Tensor]
    out: Optional[Tensor] = None
    patched_acts: Optional[Union[SparseActs, Tensor]] = None


class Splice:
    """SAEs spliced into a model, as a context manager (make it with :func:`splice`).

    Inside the ``with`` block every forward of the model replaces each named layer's output
    ``x`` by ``decode(acts) + err`` (see :mod:`gsae_fast.interp`), records it (``sp[layer]``: a
    :class:`LayerRecord`; ``sp.order``: the layers in the order they ran) and applies the
    interventions set with :meth:`set`. Everything stays differentiable w.r.t. the model's
    input path and the SAE parameters (``encode_sparse`` and ``decode`` carry autograd).
    """

    def __init__(self, model: torch.nn.Module, saes: Mapping, *, retain_grad: bool = False):
        if not isinstance(saes, Mapping) or not saes:
            raise ValueError("saes must be a non-empty dict {layer: sae}")
        self.model = model
        self.saes = dict(saes)
        self.retain_grad = retain_grad
        self.names: dict = {}
        self._modules: dict = {}
        owner: dict = {}
        for key, sae in self.saes.items():
            check_sae(key, sae)
            name, module = resolve_hook(model, key)  # ValueError naming valid layers
            if name in owner:
                raise ValueError(f"layers {owner[name]!r} and {key!r} both name module {name!r}")
            owner[name] = key
            self.names[key], self._modules[key] = name, module
        self.records: dict = {}
        self._fired: list = []
        self._acts: dict = {}
        self._err: dict = {}
        # The analyses' per-layer forward rules (node_effects, edge_effects; set by them for a
        # forward and cleared after): key -> fn(key, x, sae) -> (out, LayerRecord).
        self.layer_rules: dict = {}
        # node_effects' AtP: make every layer output part of the autograd graph (for
        # autograd.grad).
        self.need_grad = False
        self._handles: list = []

    # -- context ---------------------------------------------------------------------------

    def __enter__(self) -> "Splice":
        if self._handles:
            raise RuntimeError("this Splice is already active")
        # Two splices on one module would stack their hooks (the second SAE encoding the
        # first one's output): refuse rather than compute something else silently.
        taken = [k for k, m in self._modules.items() if getattr(m, "_gsae_fast_spliced", False)]
        if taken:
            raise RuntimeError(f"layers {taken} are already spliced by another active splice "
                               f"(node_effects, ablate and splice each splice the model "
                               f"themselves: do not nest them)")
        for key, module in self._modules.items():
            module._gsae_fast_spliced = True
            self._handles.append(module.register_forward_hook(
                lambda mod, args, output, key=key: self._hook(key, output)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for module in self._modules.values():
            module._gsae_fast_spliced = False
        self._handles = []

    # -- interventions and records -----------------------------------------------------------

    @property
    def layers(self) -> tuple:
        return tuple(self.saes)

    @property
    def order(self) -> list:
        """The spliced layers in the order they ran in the last forward."""
        return list(self._fired)

    def __getitem__(self, layer) -> LayerRecord:
        self.check_layer(layer)
        if layer not in self.records:
            raise KeyError(f"layer {layer!r} has not run yet under this splice")
        return self.records[layer]

    def check_layer(self, layer) -> None:
        if layer not in self.saes:
            raise KeyError(f"{layer!r} is not a spliced layer; spliced: {list(self.saes)}")

    def set(self, layer, *, acts=_UNSET, err=_UNSET) -> "Splice":
        """Intervene on ``layer`` in the forwards that follow.

        ``acts``: the feature activations to decode instead of the encoded ones: a function of
        the clean ``SparseActs`` of that forward returning ``SparseActs`` or a dense
        ``[batch, pos, d_sae]`` tensor (e.g. ``lambda a: a.to_dense()`` edited), or such a value
        directly; None removes it. ``err``: hold the error node at this tensor (broadcastable
        to ``[batch, pos, d_in]``) instead of ``x - x_hat``; None makes it live again.
        """
        self.check_layer(layer)
        if acts is not _UNSET:
            if acts is not None and not (callable(acts) or isinstance(acts, (SparseActs, Tensor))):
                raise TypeError(f"acts must be a function, SparseActs or a tensor, got "
                                f"{type(acts).__name__}")
            if acts is None:
                self._acts.pop(layer, None)
            else:
                self._acts[layer] = acts
        if err is not _UNSET:
            if err is not None and not isinstance(err, Tensor):
                raise TypeError(f"err must be a tensor or None, got {type(err).__name__}")
            if err is None:
                self._err.pop(layer, None)
            else:
                self._err[layer] = err
        return self

    def reset(self, layer=None) -> "Splice":
        """Remove the interventions on ``layer`` (all layers with None)."""
        for key in (self.saes if layer is None else [layer]):
            self.check_layer(key)
            self._acts.pop(key, None)
            self._err.pop(key, None)
        return self

    # -- the hook ----------------------------------------------------------------------------

    def _hook(self, key, output):
        x = first_output(output)
        name, sae = self.names[key], self.saes[key]
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"splice: layer {key!r} ({name}) outputs {describe(x)}, not a "
                             f"[batch, pos, d] tensor: splice a block (resid:N), its attention "
                             f"(attn:N) or its MLP (mlp:N)")
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"splice: layer {key!r} ({name}) has width {x.shape[-1]} but its "
                             f"SAE has d_in={sae.d_in}")
        if key in self._fired:  # a new forward began
            self._fired = []
        self._fired.append(key)
        rule = self.layer_rules.get(key)
        out, rec = rule(key, x, sae) if rule is not None else self._splice(key, x, sae)
        out = out.to(x.dtype)  # an fp32 SAE in a bf16 model: the model keeps its dtype
        if torch.is_grad_enabled() and (self.retain_grad or self.need_grad):
            if not out.requires_grad:
                # Nothing upstream needs gradients (frozen weights, first layer): a leaf, so
                # that the metric's gradient w.r.t. this layer output still exists.
                out = out.detach().requires_grad_()
            if self.retain_grad:
                out.retain_grad()
        rec.out = out
        self.records[key] = rec
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    def _splice(self, key, x: Tensor, sae):
        xs = x.to(sae_dtype(sae))  # the kernels take one dtype: the SAE's
        acts = sae.encode_sparse(xs)
        x_hat = sae.decode(acts)
        # The error node and the output in a dtype holding both x and x_hat exactly (a bf16 SAE
        # in an fp32 model: fp32), so that decode + err gives x back, not x rounded to bf16.
        wide = torch.promote_types(x.dtype, acc_dtype(xs.dtype))
        x_hat = x_hat.to(wide)
        held = self._err.get(key)
        if held is None:
            err = x.to(wide) - x_hat
        else:
            err = held.to(device=xs.device, dtype=wide)
            try:
                ok = torch.broadcast_shapes(err.shape, xs.shape) == xs.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"splice: the error held at layer {key!r} has shape "
                                 f"{tuple(err.shape)}, not broadcastable to {tuple(xs.shape)}")
        spec = self._acts.get(key)
        patched = None
        if spec is None:
            decoded = x_hat
        else:
            patched = spec(acts) if callable(spec) else spec
            decoded = sae.decode(_check_acts(patched, key, xs.shape[:-1], sae)).to(wide)
        out = decoded + err
        return out, LayerRecord(self.names[key], x, acts, x_hat, err, patched_acts=patched)


def _check_acts(new, key, lead, sae):
    if isinstance(new, SparseActs):
        if new.d_sae != sae.d_sae or tuple(new.counts.shape) != tuple(lead):
            raise ValueError(f"splice: replacement activations for layer {key!r} are "
                             f"{tuple(new.shape)}, expected {tuple(lead) + (sae.d_sae,)}")
        return new
    if isinstance(new, Tensor):
        if tuple(new.shape) != tuple(lead) + (sae.d_sae,):
            raise ValueError(f"splice: replacement activations for layer {key!r} are "
                             f"{tuple(new.shape)}, expected {tuple(lead) + (sae.d_sae,)}")
        return new.to(sae_dtype(sae))
    raise TypeError(f"splice: the activations function for layer {key!r} returned "
                    f"{type(new).__name__}, not SparseActs or a tensor")


def splice(model: torch.nn.Module, saes: Mapping, *, retain_grad: bool = False) -> Splice:
    """Splice ``saes`` (``{layer: sae}``) into ``model``: ``with splice(model, saes) as sp:``.

    Each layer's output ``x`` becomes ``sae.decode(sae.encode_sparse(x)) + err`` with
    ``err = x - x_hat`` at the current input, so the logits are unchanged (up to rounding)
    until an intervention (:meth:`Splice.set`) replaces the activations or holds the error.
    Layers are resolved now (unknown names raise ValueError listing valid ones); the SAE width
    and the layer output's shape are checked at each forward. ``retain_grad``: keep ``.grad`` on
    each record's ``out`` after a backward (``dm/d out_L``). See :mod:`gsae_fast.interp`.
    """
    return Splice(model, saes, retain_grad=retain_grad)

