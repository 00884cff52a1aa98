"""Circuit analysis with SAEs spliced into a ``transformers`` model (Sparse Feature Circuits,
Marks et al. 2024): splicing with an error node, node effects by attribution patching (AtP),
integrated gradients (IG) and exact activation patching, feature ablation and steering.

The graph
---------
Splicing an SAE into layer ``L`` (a block, attention or MLP output, named as
:func:`gsae_fast.activations.resolve_hook` names it: ``"resid:3"``, ``"mlp:0"``,
``"transformer.h.2"``, ...) replaces that layer's output ``x`` by

    out_L = decode(a_L) + err_L,      a_L = encode(x),      err_L = x - decode(a_L)

so the model computes exactly what it did (``out_L = x`` up to one rounding), but ``out_L`` is
now a function of *nodes*: the feature activations ``a_L`` (all ``d_sae`` of them, per token;
inactive ones are 0) and the error node ``err_L`` (what the SAE misses). With several layers
spliced, a downstream SAE encodes the upstream layer's spliced output. Every SAE here has an
affine decoder, ``decode(a) = sum_i a_i W_dec[i] + b_dec`` (TopK SAEs with
``rescale_acts_by_decoder_norm`` use the rows ``W_dec[i] / |W_dec[i]|``), which the estimators
below rely on.

Node effects
------------
For a metric ``m`` of the logits (e.g. a logit difference), clean tokens and patch tokens (same
shape), the indirect effect of a node ``v`` is ``m(do(v = v_patch)) - m(clean)`` (the
"exact" method, one forward per node). Its estimators:

- AtP (first order): ``IE(v) ~ (v_patch - v_clean) . dm/dv`` at the clean point. Since
  ``out_L = decode(a_L) + err_L``, ``dm/da_{L,i}[t] = W_dec[i] . g_L[t]`` and
  ``dm/derr_L[t] = g_L[t]`` with ``g_L = dm/d out_L``: one backward gives ``g_L`` for every
  layer, and only the features active at the clean or at the patch point (where ``a_patch -
  a_clean`` is not zero) need their decoder row. No ``[tokens, d_sae]`` tensor is built.
- IG (Sundararajan et al. 2017, SFC's form): for each layer ``L`` separately, every node of
  ``L`` moves together along the straight line ``v(alpha) = v_clean + alpha (v_patch -
  v_clean)``; ``IE(v) = (v_patch - v_clean) . mean_alpha dm/dv(alpha)``. As the decoder is
  affine, moving all of ``L``'s nodes together moves ``out_L`` along the straight line from
  the clean run's ``out_L`` to the patch run's, so the gradient at each ``alpha`` is again
  ``W_dec[i] . g_L(alpha)``: the ``steps`` points run as one batch (micro-batched by
  ``batch_size``), with ``out_L`` injected. Completeness: the effects of layer ``L``'s nodes
  (features + error) add up to ``sum_t (out_patch - out_clean)[t] . mean_alpha g_L(alpha)[t]``,
  a Riemann sum of ``m(L patched whole) - m(clean)``, exact as ``steps`` grows. The default
  ``alpha`` are the midpoints ``(k + 0.5) / steps`` (error O(1/steps^2));
  ``ig_alphas="left"`` gives SFC's ``k / steps`` (error O(1/steps)).
- exact: per feature ``i`` of layer ``L``, ``a_{L,i}`` is set to its patch value at every
  position (every other feature and ``err_L`` clean), i.e. ``out_L = out_clean + (a_patch -
  a_clean)_i W_dec[i]``; candidates run as copies of the clean batch along the batch dimension.
  The error node likewise (``out_L = out_clean + err_patch - err_clean``). With
  ``per_position`` each (position, feature) pair is patched on its own.

The other spliced layers (``other_errors``): with ``"live"`` (default: SFC's code, which leaves
them unspliced when intervening on ``L``) their error nodes are recomputed at their current input,
so their splices are the identity and an intervention on ``L`` reaches the metric by every path;
those layers then run unchanged (their SAE is skipped in the IG and exact forwards, and AtP's
backward goes straight through them). With ``"clean"`` the error nodes of the layers after ``L``
are held at their clean values and their SAEs re-encode, so ``L``'s effects reach the metric only
through the downstream features, gates included. A Gated (or JumpReLU, TopK) feature is a
discontinuous function of its input: where a downstream gate flips between the clean and the
patch point, the gradient does not see the jump, so AtP and IG miss it (IG's completeness then
fails by the jump whatever ``steps``), and only "exact" measures it. With ``"live"`` no downstream
gate is in the way and completeness holds.

Jump-aware IG (``method="jump_ig"``, with ``other_errors="clean"``): along layer ``L``'s path
the sets of downstream gates that are on are compared at ``alpha = k / steps``; where they differ
the interval is bisected down to ``jump_tol`` (per batch row; every crossing separately). Each
crossing adds the metric's jump there, ``J = m(alpha*+) - m(alpha*-)`` (measured, less the
smooth change over the final interval), split among ``L``'s nodes in proportion to their share
of the flipping gate pre-activation's change: node ``v`` gets ``J (dv . grad pi) / (d out_L .
grad pi)`` (``pi``: the sum of the flipping gates' pre-activations, signed so that it rises;
the gates of the first downstream layer that flips, since later ones flip because of its jump).
The gradient part is the midpoint rule on the pieces between crossings, so the kinks at the
crossings cost no accuracy. The layer's effects then add up to ``m(L patched whole) -
m(clean)`` up to the smooth part's O(1/steps^2) error, where plain IG misses every jump at any
``steps``.

Edge effects (:func:`edge_effects`): from the features of an upstream spliced layer to those of
a downstream one and to the metric, on the graph with held downstream errors; first-order
("atp", SFC's edges) or exact path patching.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from . import activations
from .activations import _first, _forward_kwargs, _model_device, resolve_hook
from .types import SparseActs, acc_dtype

__all__ = ["splice", "Splice", "LayerRecord", "NodeEffects", "node_effects", "EdgeEffects",
           "edge_effects", "ablate", "steer", "mean_activations", "METHODS"]

METHODS = ("atp", "ig", "jump_ig", "exact")
OTHER_ERRORS = ("live", "clean")
IG_ALPHAS = ("midpoint", "left")
ABLATION_MODES = ("zero", "mean", "value")

# Rows of W_dec gathered at once by the effect reductions (elements): bounds the [nnz, d_in]
# gather where a batch has many active (token, feature) pairs.
_GATHER_BUDGET = 1 << 22

_UNSET = object()


# ----------------------------------------------------------------------------------- helpers

def _check_sae(key, sae) -> None:
    for attr in ("encode_sparse", "decode", "W_dec", "d_in", "d_sae"):
        if not hasattr(sae, attr):
            raise TypeError(f"the SAE for layer {key!r} ({type(sae).__name__}) has no {attr!r}: "
                            f"use a gsae_fast SAE (GatedSAE, JumpReLUSAE, TopKSAE, ...)")


def _sae_dtype(sae) -> torch.dtype:
    return sae.W_dec.dtype


def _decoder_rows(sae, feats: Tensor) -> Tensor:
    """The vectors ``decode`` adds per unit of each feature in ``feats``: ``W_dec[feats]``
    (divided by the rows' norms for a TopK SAE that rescales its activations by them)."""
    rows = sae.W_dec[feats]
    if getattr(sae, "rescale_acts_by_decoder_norm", False):
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows


def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _logits(model, tokens: Tensor) -> Tensor:
    """The model's logits, in fp32 at least: a bf16 metric would quantise the small differences
    the estimators are compared on."""
    out = model(input_ids=tokens, **_forward_kwargs(model))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return logits if logits.dtype == torch.float64 else logits.float()


def _metric_value(metric, logits: Tensor) -> Tensor:
    m = metric(logits)
    if not isinstance(m, Tensor) or m.dim() != 0:
        raise ValueError(f"metric must return a scalar (0-dim) tensor, got {_describe(m)}: "
                         f"reduce over the batch (e.g. .sum() or .mean())")
    return m


def _check_tokens(clean: Tensor, patch: Tensor, device) -> tuple[Tensor, Tensor]:
    for name, t in (("clean_tokens", clean), ("patch_tokens", patch)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor [batch, pos], got "
                             f"{_describe(t)}")
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
    ``x`` by ``decode(acts) + err`` (module docstring), records it (``sp[layer]``: a
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
            _check_sae(key, sae)
            name, module = resolve_hook(model, key)  # ValueError naming valid layers
            if name in owner:
                raise ValueError(f"layers {owner[name]!r} and {key!r} both name module {name!r}")
            owner[name] = key
            self.names[key], self._modules[key] = name, module
        self.records: dict = {}
        self._fired: list = []
        self._acts: dict = {}
        self._err: dict = {}
        # node_effects' per-layer forward rules: key -> fn(key, x, sae) -> (out, LayerRecord).
        self._internal: dict = {}
        # node_effects: make every layer output part of the autograd graph (for autograd.grad).
        self._need_grad = False
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
        self._check_layer(layer)
        if layer not in self.records:
            raise KeyError(f"layer {layer!r} has not run yet under this splice")
        return self.records[layer]

    def _check_layer(self, layer) -> None:
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
        self._check_layer(layer)
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
            self._check_layer(key)
            self._acts.pop(key, None)
            self._err.pop(key, None)
        return self

    # -- the hook ----------------------------------------------------------------------------

    def _hook(self, key, output):
        x = _first(output)
        name, sae = self.names[key], self.saes[key]
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"splice: layer {key!r} ({name}) outputs {_describe(x)}, not a "
                             f"[batch, pos, d] tensor: splice a block (resid:N), its attention "
                             f"(attn:N) or its MLP (mlp:N)")
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"splice: layer {key!r} ({name}) has width {x.shape[-1]} but its "
                             f"SAE has d_in={sae.d_in}")
        if key in self._fired:  # a new forward began
            self._fired = []
        self._fired.append(key)
        rule = self._internal.get(key)
        out, rec = rule(key, x, sae) if rule is not None else self._splice(key, x, sae)
        out = out.to(x.dtype)  # an fp32 SAE in a bf16 model: the model keeps its dtype
        if torch.is_grad_enabled() and (self.retain_grad or self._need_grad):
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
        xs = x.to(_sae_dtype(sae))  # the kernels take one dtype: the SAE's
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
        return new.to(_sae_dtype(sae))
    raise TypeError(f"splice: the activations function for layer {key!r} returned "
                    f"{type(new).__name__}, not SparseActs or a tensor")


def splice(model: torch.nn.Module, saes: Mapping, *, retain_grad: bool = False) -> Splice:
    """Splice ``saes`` (``{layer: sae}``) into ``model``: ``with splice(model, saes) as sp:``.

    Each layer's output ``x`` becomes ``sae.decode(sae.encode_sparse(x)) + err`` with
    ``err = x - x_hat`` at the current input, so the logits are unchanged (up to rounding)
    until an intervention (:meth:`Splice.set`) replaces the activations or holds the error.
    Layers are resolved now (unknown names raise ValueError listing valid ones); the SAE width
    and the layer output's shape are checked at each forward. ``retain_grad``: keep ``.grad`` on
    each record's ``out`` after a backward (``dm/d out_L``). See the module docstring.
    """
    return Splice(model, saes, retain_grad=retain_grad)


# --------------------------------------------------------------------- node_effects: internals

def _passthrough(sp: Splice):
    """The layer runs as without a splice. With live errors the splice is the identity
    (``x_hat + (x - x_hat) = x``), so this is the same function without the SAE's cost."""
    def rule(key, x, sae):
        return x, LayerRecord(sp.names[key], x, None, None, None)
    return rule


def _inject(sp: Splice, value: Tensor):
    """The layer outputs ``value`` (IG's interpolated or exact's patched ``out_L``)."""
    def rule(key, x, sae):
        if x.shape != value.shape:
            raise RuntimeError(f"layer {key!r}: output {tuple(x.shape)} in a batched run, "
                               f"expected {tuple(value.shape)}")
        return value, LayerRecord(sp.names[key], x, None, None, None)
    return rule


def _reencode(sp: Splice, err_held: Optional[Tensor], sae_grad: bool, err_grad: bool):
    """The splice, with the error held at ``err_held`` (downstream layers, other_errors="clean")
    or live; ``sae_grad=False`` encodes without autograd and ``err_grad=True`` lets the
    gradient through ``err = x - x_hat``: the straight-through of AtP with live errors, whose
    d out / d x is exactly the identity. ``err_grad=False``: the error is a constant."""
    def rule(key, x, sae):
        xs = x.to(_sae_dtype(sae))
        with torch.set_grad_enabled(sae_grad and torch.is_grad_enabled()):
            acts = sae.encode_sparse(xs)
            x_hat = sae.decode(acts)
        if err_held is not None:
            err = err_held
        else:
            err = xs - x_hat if err_grad else (xs - x_hat).detach()
        return x_hat + err, LayerRecord(sp.names[key], x, acts, x_hat, err)
    return rule


def _delta(acts_c: SparseActs, acts_p: SparseActs):
    """``a_patch - a_clean`` as coalesced triplets (row, feature, value != 0): the features
    active at the clean or the patch point, the only ones with a nonzero difference."""
    rows, feats, vals = [], [], []
    for acts, sign in ((acts_p, 1.0), (acts_c, -1.0)):
        K = acts.capacity
        idx = acts.idx.reshape(-1, K)
        f = acts.f.detach().reshape(-1, K)
        r, k = acts.mask().reshape(-1, K).nonzero(as_tuple=True)
        rows.append(r)
        feats.append(idx[r, k].long())
        vals.append(sign * f[r, k])
    d_sae = acts_c.d_sae
    key = torch.cat(rows) * d_sae + torch.cat(feats)
    vals = torch.cat(vals)
    uniq, inv = torch.unique(key, return_inverse=True)
    summed = vals.new_zeros(uniq.shape[0]).index_add_(0, inv, vals)
    keep = summed != 0
    uniq, summed = uniq[keep], summed[keep]
    return uniq // d_sae, uniq % d_sae, summed


def _gradient_effects(sae, delta, grad: Tensor, n_pos: int, per_position: bool,
                      dtype: torch.dtype) -> Tensor:
    """``sum (a_patch - a_clean)[t, i] * W_dec[i] . grad[t]`` per feature (and position):
    ``grad`` is ``dm/d out_L`` (AtP) or its mean along the IG path, [batch, pos, d_in]."""
    rows, feats, vals = delta
    d_sae = sae.d_sae
    g = grad.reshape(-1, grad.shape[-1]).to(dtype)
    out = torch.zeros(n_pos * d_sae if per_position else d_sae, dtype=dtype, device=g.device)
    chunk = max(1, _GATHER_BUDGET // max(1, g.shape[1]))
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            r, i = rows[s:s + chunk], feats[s:s + chunk]
            dots = (_decoder_rows(sae, i).to(dtype) * g[r]).sum(-1)
            target = (r % n_pos) * d_sae + i if per_position else i
            out.index_add_(0, target, vals[s:s + chunk].to(dtype) * dots)
    return out.view(n_pos, d_sae) if per_position else out


def _error_effect(d_err: Tensor, grad: Tensor, per_position: bool, dtype) -> Tensor:
    e = (d_err.to(dtype) * grad.to(dtype)).sum(-1).sum(0)  # [pos]
    return e if per_position else e.sum()


@dataclass
class NodeEffects:
    """Node effects of one layer on the metric.

    ``features``: dense ``[d_sae]`` (summed over positions and batch), or ``[pos, d_sae]``
    with ``per_position``; features that never change between clean and patch have effect 0.
    With method "exact" and a ``features`` candidate list, the changed features left out are
    NaN (not measured). ``error``: the error node's effect, a scalar (or ``[pos]``).
    ``metric_clean`` and ``metric_patch``: the metric of the spliced model on the clean and the
    patch tokens. ``method``: "atp", "ig", "jump_ig" or "exact". With "jump_ig":
    ``jump_features`` and ``jump_error``, the parts of ``features`` and ``error`` that come from
    the jumps at downstream gate crossings, and ``jumps``, the metric's jump at each crossing
    found (a list, one per crossing and row; their sum is what plain IG misses). With "exact"
    and ``other_errors="clean"``: ``flips``, shaped as ``features``, True where patching that
    node alone turned a downstream gate on or off (its effect has a jump in it).
    """

    features: Tensor
    error: Tensor
    metric_clean: float
    metric_patch: float
    method: str
    jump_features: Optional[Tensor] = None
    jump_error: Optional[Tensor] = None
    jumps: Optional[list] = None
    flips: Optional[Tensor] = None

    def total(self) -> Tensor:
        """The sum of the layer's node effects (IG: ``~ m(layer patched whole) - m(clean)``)."""
        return self.features.sum() + self.error.sum()


def _check_features(features, sp: Splice, method: str) -> dict:
    if features is None:
        return {}
    if method != "exact":
        raise ValueError(f"features (a candidate list) is for method='exact'; {method!r} "
                         f"gives every feature's effect at once")
    if not isinstance(features, Mapping):
        raise ValueError("features must be a dict {layer: feature ids}")
    out = {}
    for key, ids in features.items():
        sp._check_layer(key)
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        d_sae = sp.saes[key].d_sae
        if ids.numel() and (ids.min() < 0 or ids.max() >= d_sae):
            raise ValueError(f"features[{key!r}]: ids must be in [0, {d_sae})")
        out[key] = torch.unique(ids)
    return out


def _copies_per_forward(batch_size: Optional[int], B: int) -> int:
    # Whole copies only: the metric sees one copy's [B, pos, vocab] logits at a time.
    return max(1, (batch_size or B) // B)


def node_effects(model: torch.nn.Module, saes: Mapping, clean_tokens: Tensor,
                 patch_tokens: Tensor, metric: Callable[[Tensor], Tensor], *,
                 method: str = "atp", steps: int = 10, per_position: bool = False,
                 features: Optional[Mapping] = None, batch_size: Optional[int] = 32,
                 other_errors: str = "live", ig_alphas: str = "midpoint",
                 jump_tol: float = 1e-5) -> dict:
    """Indirect effects of every SAE feature and error node of the spliced layers on ``metric``.

    ``metric(logits [batch, pos, vocab]) -> scalar tensor`` (e.g. a logit difference summed over
    the batch; it must add over the rows, as the batched methods call it on each copy of the
    batch). ``clean_tokens`` and ``patch_tokens``: ``[batch, pos]``, the same shape. The clean
    and patch values of the nodes are those of the spliced model on each.

    ``method``: ``"atp"`` (one forward per input, one backward), ``"ig"`` (``steps`` points per
    layer, ``ig_alphas`` "midpoint" ``(k + 0.5) / steps`` or SFC's "left" ``k / steps``),
    ``"jump_ig"`` (jump-aware IG, with ``other_errors="clean"``: plain IG's cost plus ``steps +
    1`` forwards to find crossings, ~``log2(1 / (steps * jump_tol))`` batched forwards to bisect
    them and two passes per crossing; see the module docstring) or
    ``"exact"`` (one forward copy per changed feature, and ``per_position`` per changed
    (position, feature); ``features={layer: ids}`` limits it to candidates). ``batch_size``:
    the most sequences per forward of IG and exact (whole copies of the batch).
    ``other_errors``: "live" or "clean", see the module docstring.

    Returns ``{layer: NodeEffects}``. The model runs in its current mode (call ``model.eval()``:
    dropout would make each forward different); parameter gradients are left untouched.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if other_errors not in OTHER_ERRORS:
        raise ValueError(f"other_errors must be one of {OTHER_ERRORS}, got {other_errors!r}")
    if ig_alphas not in IG_ALPHAS:
        raise ValueError(f"ig_alphas must be one of {IG_ALPHAS}, got {ig_alphas!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if method == "jump_ig":
        if other_errors != "clean":
            raise ValueError("method='jump_ig' needs other_errors='clean': with live error "
                             "nodes no downstream gate is on the path, and it is plain IG")
        if ig_alphas != "midpoint":
            raise ValueError("method='jump_ig' uses the midpoint rule (ig_alphas='midpoint')")
        if not 0 < jump_tol < 1 / steps:
            raise ValueError(f"jump_tol must be in (0, 1/steps), got {jump_tol!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if getattr(model, "training", False):
        warnings.warn("node_effects: the model is in training mode (dropout makes every "
                      "forward different); call model.eval()", stacklevel=2)
    clean, patch = _check_tokens(clean_tokens, patch_tokens, _model_device(model))
    B, n_pos = clean.shape

    with splice(model, saes) as sp:
        cand = _check_features(features, sp, method)

        def run_plain(tokens, what):
            sp.records.clear()
            with torch.no_grad():
                m = _metric_value(metric, _logits(model, tokens))
            missing = [k for k in sp.layers if k not in sp.records]
            if missing:
                raise ValueError(f"layers {missing} did not run in the model's forward on the "
                                 f"{what} tokens (a container such as a ModuleList?)")
            return m, dict(sp.records), list(sp.order)

        m_patch, rec_p, _ = run_plain(patch, "patch")
        if method == "atp":
            # One forward with the gradient reaching every layer output: live errors pass it
            # straight through each splice (d out/dx = I), held ("clean") ones through the SAE.
            sp._internal = {k: (_reencode(sp, None, sae_grad=False, err_grad=True)
                                if other_errors == "live" else
                                _reencode(sp, None, sae_grad=True, err_grad=False))
                            for k in sp.layers}
            sp._need_grad = True
            sp.records.clear()
            try:
                with torch.enable_grad():
                    m_clean = _metric_value(metric, _logits(model, clean))
                    rec_c = dict(sp.records)
                    missing = [k for k in sp.layers if k not in rec_c]
                    if missing:
                        raise ValueError(f"layers {missing} did not run in the model's forward")
                    outs = [rec_c[k].out for k in sp.layers]
                    if not m_clean.requires_grad:
                        raise ValueError("the metric does not depend on the logits through "
                                         "autograd (detached?): AtP needs its gradient")
                    grads = torch.autograd.grad(m_clean, outs, allow_unused=True)
            finally:
                sp._internal, sp._need_grad = {}, False
            grad = {k: (torch.zeros_like(o) if gr is None else gr)
                    for k, o, gr in zip(sp.layers, outs, grads)}
            order = None
        else:
            m_clean, rec_c, order = run_plain(clean, "clean")

        if method == "jump_ig":
            half = (torch.float16, torch.bfloat16)
            low = [k for k in sp.layers if rec_c[k].out.dtype in half
                   or _sae_dtype(sp.saes[k]) in half]
            if low:
                warnings.warn(f"node_effects(method='jump_ig'): layers {low} run in 16-bit floats "
                              f"(the model or the SAE): along the path their outputs move in "
                              f"rounding steps, so downstream gates at their thresholds flip on "
                              f"and off by rounding and the metric's jumps are quantised; the "
                              f"crossings found are then mostly rounding and their split among "
                              f"the nodes is noise (the layer total still holds). Run the model "
                              f"and the SAEs in float32 for jump-aware IG.", stacklevel=2)
        results = {}
        for key in sp.layers:
            sae = sp.saes[key]
            rc, rp = rec_c[key], rec_p[key]
            extra = {}
            dtype = torch.promote_types(acc_dtype(_sae_dtype(sae)), acc_dtype(rc.out.dtype))
            delta = _delta(rc.acts, rp.acts)
            d_err = (rp.err - rc.err).detach()
            if method == "atp":
                g = grad[key]
                feats = _gradient_effects(sae, delta, g, n_pos, per_position, dtype)
                err = _error_effect(d_err, g, per_position, dtype)
            elif method in ("ig", "jump_ig"):
                path = _Path(model, sp, key, order, clean, metric, rc.out.detach(),
                             rp.out.detach(), rec_c, batch_size, other_errors)
                if method == "ig":
                    g = _ig_mean_grad(path, steps, ig_alphas)
                else:
                    for k in path.after:
                        _gate_params(sp.saes[k], k)
                    g, G_jump, jumps = _jump_ig_grad(path, steps, jump_tol)
                    extra = dict(
                        jump_features=_gradient_effects(sae, delta, G_jump, n_pos,
                                                        per_position, dtype),
                        jump_error=_error_effect(d_err, G_jump, per_position, dtype),
                        jumps=jumps)
                    g = g + G_jump
                feats = _gradient_effects(sae, delta, g, n_pos, per_position, dtype)
                err = _error_effect(d_err, g, per_position, dtype)
            else:
                feats, err, flips = _exact(model, sp, key, order, clean, metric, rec_c, d_err,
                                           delta, cand.get(key), per_position, batch_size,
                                           other_errors, dtype, n_pos)
                if other_errors == "clean":
                    extra = dict(flips=flips)
            results[key] = NodeEffects(feats, err, float(m_clean.detach()), float(m_patch), method,
                                       **extra)
    return results


def _rules(sp: Splice, key, order, rec_c, copies: int, value: Tensor, other_errors: str,
           grad: bool) -> dict:
    """Forward rules of a batched IG / exact run on ``copies`` copies of the clean batch:
    ``key`` outputs ``value``; the layers before it run plain (their input is clean: with live or
    held-clean errors their splice gives the clean output); those after it run plain
    (other_errors="live") or re-encode with their clean error (other_errors="clean")."""
    rules, after = {}, False
    for k in order:
        if k == key:
            rules[k], after = _inject(sp, value), True
        elif after and other_errors == "clean":
            err = rec_c[k].err.detach().repeat(copies, 1, 1)
            rules[k] = _reencode(sp, err, sae_grad=grad, err_grad=False)
        else:
            rules[k] = _passthrough(sp)
    return rules


class _Path:
    """Forwards of the spliced model on copies of the clean batch with layer ``key``'s output
    on the straight line ``out_c + alpha (out_p - out_c)``, one ``alpha`` per copy and row (IG
    and jump-aware IG); the other layers follow :func:`_rules`."""

    def __init__(self, model, sp, key, order, clean, metric, out_c, out_p, rec_c, batch_size,
                 other_errors):
        self.model, self.sp, self.key, self.order, self.clean = model, sp, key, order, clean
        self.metric, self.out_c, self.out_p, self.rec_c = metric, out_c, out_p, rec_c
        self.batch_size, self.other_errors = batch_size, other_errors
        self.B = clean.shape[0]
        self.dtype = torch.promote_types(out_c.dtype, torch.float32)
        self.after = order[order.index(key) + 1:] if other_errors == "clean" else []
        # Keys of the downstream gates in one flat space: layer offset + pos * d_sae + feature.
        n_pos, self.offsets, off = clean.shape[1], [], 0
        for k in self.after:
            self.offsets.append(off)
            off += n_pos * sp.saes[k].d_sae

    def run(self, alphas: Tensor, *, grad=None, sets: bool = False):
        """``alphas [copies, B]``. ``grad``: None, ``"metric"`` (``dm/d out_L``) or a function
        ``(records, first_copy, copies) -> scalar`` to differentiate w.r.t. ``out_L``.
        Returns (metric per copy [copies], gradient [copies, B, pos, d] or None, and with
        ``sets`` the downstream active gates: per copy, per row, a sorted key tensor)."""
        B, out_c, out_p = self.B, self.out_c, self.out_p
        per = _copies_per_forward(self.batch_size, B)
        metrics, grads, active = [], [], []
        try:
            for s in range(0, alphas.shape[0], per):
                a = alphas[s:s + per].to(device=out_c.device, dtype=self.dtype)
                c = a.shape[0]
                value = (out_c + a.view(c, B, 1, 1) * (out_p - out_c)).reshape(
                    c * B, *out_c.shape[1:])
                if grad is not None:
                    value.requires_grad_()
                self.sp._internal = _rules(self.sp, self.key, self.order, self.rec_c, c, value,
                                           self.other_errors, grad=grad is not None)
                self.sp.records.clear()
                with torch.set_grad_enabled(grad is not None):
                    logits = _logits(self.model, self.clean.repeat(c, 1))
                    ms = [_metric_value(self.metric, logits[j * B:(j + 1) * B])
                          for j in range(c)]
                    if grad is not None:
                        target = sum(ms) if grad == "metric" else grad(self.sp.records, s, c)
                        if grad == "metric" and not target.requires_grad:
                            raise ValueError("the metric does not depend on the logits through "
                                             "autograd (detached?): IG needs its gradient")
                        (g,) = torch.autograd.grad(target, value, allow_unused=True)
                        grads.append(torch.zeros_like(value) if g is None else g)
                metrics.append(torch.stack([m.detach() for m in ms]))
                if sets:
                    active += self._active_sets(c)
        finally:
            self.sp._internal = {}
        g = torch.cat(grads).view(alphas.shape[0], *out_c.shape) if grads else None
        return torch.cat(metrics), g, (active if sets else None)

    def _active_sets(self, c: int) -> list:
        """Per copy, per row: the sorted keys of the downstream gates that are on."""
        rows = [[] for _ in range(c * self.B)]
        for k, off in zip(self.after, self.offsets):
            acts = self.sp.records[k].acts
            span = acts.idx.shape[1] * acts.d_sae  # one batch row's keys
            # One transfer per layer (not one per row: c * B syncs per forward on a GPU);
            # (row * pos + t) * d_sae + feature, sorted: each batch row's keys are a run.
            keys = _active_keys(acts).cpu()
            row = keys // span
            counts = torch.bincount(row, minlength=c * self.B).tolist()
            for r, part in enumerate(torch.split(keys - row * span + off, counts)):
                rows[r].append(part)
        flat = [torch.cat(r) if r else torch.zeros(0, dtype=torch.long) for r in rows]
        return [flat[j * self.B:(j + 1) * self.B] for j in range(c)]

    def gate(self, key: int) -> tuple:
        """(downstream layer, position, feature) of a gate key."""
        i = max(j for j, off in enumerate(self.offsets) if off <= key)
        layer, rest = self.after[i], key - self.offsets[i]
        d_sae = self.sp.saes[layer].d_sae
        return layer, rest // d_sae, rest % d_sae


def _ig_mean_grad(path: _Path, steps: int, ig_alphas: str) -> Tensor:
    """``mean_alpha dm/d out_L`` along ``out_L(alpha) = out_c + alpha (out_p - out_c)``, the
    line every node of L moving together traces (the decoder is affine)."""
    shift = 0.5 if ig_alphas == "midpoint" else 0.0
    alphas = ((torch.arange(steps, dtype=torch.float64) + shift) / steps).view(-1, 1)
    _, g, _ = path.run(alphas.expand(steps, path.B), grad="metric")
    return g.sum(0) / steps


def _gate_params(sae, layer) -> tuple:
    """``(W_enc, b_dec, b_gate)`` of an SAE whose gate is a fixed threshold of a linear
    function of its input (Gated, JumpReLU, BatchTopK at inference)."""
    try:
        W_enc, b_dec, b_gate, _, _ = sae._encoder_params()
    except (AttributeError, NotImplementedError):
        raise ValueError(f"method='jump_ig' needs the SAEs downstream of the patched layer to "
                         f"have a fixed gate (Gated, JumpReLU, BatchTopK): layer {layer!r} has a "
                         f"{type(sae).__name__}, whose TopK selection has none") from None
    return W_enc.detach(), b_dec.detach(), b_gate.detach()


def _pack(items: list, B: int) -> list:
    """Pack ``(row, ...)`` items into copies of the batch, at most one item per row per copy."""
    copies: list = []
    for it in items:
        for cp in copies:
            if it[0] not in cp:
                cp[it[0]] = it
                break
        else:
            copies.append({it[0]: it})
    return copies


def _locate_crossings(path: _Path, steps: int, tol: float) -> list:
    """Where the downstream gates flip along the path, per row: ``(row, lo, hi, gates_lo,
    gates_hi)`` with ``hi - lo <= tol``. The sets of gates that are on are compared at ``alpha
    = k / steps``; an interval where they differ is bisected (both halves when the midpoint
    differs from both ends) until it is shorter than ``tol``. A gate that flips and flips back
    between two grid points is not seen."""
    B = path.B
    grid = (torch.arange(steps + 1, dtype=torch.float64) / steps).view(-1, 1)
    _, _, sets = path.run(grid.expand(steps + 1, B), sets=True)
    pending = [(b, k / steps, (k + 1) / steps, sets[k][b], sets[k + 1][b])
               for b in range(B) for k in range(steps) if not torch.equal(sets[k][b],
                                                                           sets[k + 1][b])]
    events = []
    while pending:
        events += [p for p in pending if p[2] - p[1] <= tol]
        todo = _pack([p for p in pending if p[2] - p[1] > tol], B)
        pending = []
        if not todo:
            break
        alphas = torch.zeros(len(todo), B, dtype=torch.float64)
        for ci, cp in enumerate(todo):
            for b, (_, lo, hi, _, _) in cp.items():
                alphas[ci, b] = (lo + hi) / 2
        _, _, mid_sets = path.run(alphas, sets=True)
        for ci, cp in enumerate(todo):
            for b, (_, lo, hi, s_lo, s_hi) in cp.items():
                mid, s_mid = (lo + hi) / 2, mid_sets[ci][b]
                if not torch.equal(s_mid, s_lo):
                    pending.append((b, lo, mid, s_lo, s_mid))
                if not torch.equal(s_mid, s_hi):
                    pending.append((b, mid, hi, s_mid, s_hi))
    return events


def _jump_gradients(path: _Path, events: list) -> tuple[Tensor, list]:
    """For each crossing, the metric's jump ``J = m_row(hi) - m_row(lo)`` and the gradient
    ``G`` w.r.t. ``out_L`` (at ``lo``, row ``b``) of the flipping gates' pre-activation
    (``sum_g s_g pi_g``, ``s_g = +1`` for a gate turning on, -1 off; only the gates of the
    first downstream layer that flips: later ones flip because of its jump). Returns
    ``sum_e J_e G_e / (G_e . (out_p - out_c))`` (so that the node shares ``dv . G_e /
    (G_e . d out)`` of one crossing add up to its jump) and the jumps.

    Each crossing gets two copies of the batch, its row at ``lo`` and at ``hi`` and every other
    row at the clean point: the metric's difference between the two is that row's jump."""
    B = path.B
    d_out = (path.out_p - path.out_c).to(path.dtype)
    gates = []
    for b, lo, hi, s_lo, s_hi in events:
        on = s_hi[~torch.isin(s_hi, s_lo)].tolist()
        off = s_lo[~torch.isin(s_lo, s_hi)].tolist()
        flips = [(path.gate(k), 1.0) for k in on] + [(path.gate(k), -1.0) for k in off]
        first = min(path.after.index(g[0]) for g, _ in flips)
        gates.append([(g, s) for g, s in flips if path.after.index(g[0]) == first])
    alphas = torch.zeros(2 * len(events), B, dtype=torch.float64)
    for e, (b, lo, hi, _, _) in enumerate(events):
        alphas[2 * e, b], alphas[2 * e + 1, b] = lo, hi

    def preact(records, first_copy, copies):  # run on the lo copies: copy i is event i
        total = 0.0
        for ci in range(copies):
            e = first_copy + ci
            b = events[e][0]
            for (layer, t, j), sign in gates[e]:
                W_enc, b_dec, b_gate = _gate_params(path.sp.saes[layer], layer)
                x = records[layer].x[ci * B + b, t].to(W_enc.dtype)
                total = total + sign * ((x - b_dec) @ W_enc[:, j] + b_gate[j])
        return total

    m, gm, _ = path.run(alphas, grad="metric")
    _, g, _ = path.run(alphas[0::2], grad=preact)
    G_jump = torch.zeros_like(path.out_c, dtype=path.dtype)
    jumps = []
    for e, (b, lo, hi, _, _) in enumerate(events):
        # The smooth change over [lo, hi] (trapezoid) is not part of the jump: the Riemann
        # sum over the pieces already has it.
        smooth = (hi - lo) / 2 * float(((gm[2 * e, b] + gm[2 * e + 1, b]) * d_out[b]).sum())
        J = float(m[2 * e + 1] - m[2 * e]) - smooth
        G = g[e, b].to(path.dtype)
        speed = float((G * d_out[b]).sum())  # d(sum s pi)/d alpha at the crossing
        jumps.append(J)
        if speed != 0.0:
            G_jump[b] += (J / speed) * G
        else:
            warnings.warn(f"jump_ig: a gate flips at alpha={lo:.6g} (row {b}) with no "
                          f"first-order change of its pre-activation; its jump {J:.3g} is left "
                          f"unassigned", stacklevel=3)
    return G_jump, jumps


def _jump_ig_grad(path: _Path, steps: int, tol: float) -> tuple[Tensor, Tensor, list]:
    """Jump-aware IG: the mean gradient by the midpoint rule on the pieces between crossings
    (a crossing splits its grid interval; the gradient is smooth within a piece), plus the
    jumps, each split among the nodes by their share of the flipping gate pre-activation's
    change. Returns (mean gradient, jump gradient G_jump, the jumps)."""
    B = path.B
    events = _locate_crossings(path, steps, tol)
    cuts: dict = {}
    for b, lo, hi, _, _ in events:
        cuts.setdefault(b, []).append((lo + hi) / 2)
    samples = []
    for b in range(B):
        edges = sorted(set([k / steps for k in range(steps + 1)] + cuts.get(b, [])))
        samples.append([((a0 + a1) / 2, a1 - a0) for a0, a1 in zip(edges, edges[1:])])
    n = max(len(s) for s in samples)
    alphas = torch.full((n, B), 0.5, dtype=torch.float64)
    weights = torch.zeros(n, B, dtype=torch.float64)
    for b, s in enumerate(samples):
        for i, (a, w) in enumerate(s):
            alphas[i, b], weights[i, b] = a, w
    _, g, _ = path.run(alphas, grad="metric")
    w = weights.to(device=g.device, dtype=g.dtype).view(n, B, *([1] * (g.dim() - 2)))
    mean_grad = (w * g).sum(0)
    G_jump, jumps = _jump_gradients(path, events) if events else (torch.zeros_like(mean_grad),
                                                                  [])
    return mean_grad, G_jump, jumps


def _add_features(value: Tensor, sae, copy: Tensor, rows: Tensor, feats: Tensor,
                  vals: Tensor) -> None:
    """``value[copy, row] += val * W_dec[feat]`` for each triplet (``value [c, B, pos, d]``;
    ``rows`` index the flat ``B * pos`` tokens): a change of activations, decoded."""
    tokens = value.shape[1] * value.shape[2]
    contrib = vals.to(value.dtype).unsqueeze(-1) * _decoder_rows(sae, feats).to(value.dtype)
    value.view(-1, value.shape[-1]).index_add_(0, copy * tokens + rows, contrib)


def _exact(model, sp, key, order, clean, metric, rec_c, d_err, delta, candidates, per_position,
           batch_size, other_errors, dtype, n_pos):
    """Activation patching of each candidate node of layer ``key``, batched as copies of the
    clean batch: a feature copy outputs ``out_c + (a_patch - a_clean)_i W_dec[i]`` at ``key``
    (at every position, or at one with ``per_position``), an error copy ``out_c + err_patch -
    err_clean``; copy 0 patches nothing and is the baseline, run in the same configuration."""
    sae = sp.saes[key]
    B, d_sae = clean.shape[0], sae.d_sae
    out_c = rec_c[key].out.detach()
    device = out_c.device
    rows, feats, vals = delta
    # A node is a feature, or a (position, feature) pair: its key in the flat result.
    nkey = (rows % n_pos) * d_sae + feats if per_position else feats
    changed = torch.unique(nkey)
    n_nodes = n_pos * d_sae if per_position else d_sae
    feat_eff = torch.zeros(n_nodes, dtype=dtype, device=device)
    if candidates is None:
        todo = changed
    else:
        is_cand = torch.isin(changed % d_sae, candidates.to(device))
        todo = changed[is_cand]
        feat_eff[changed[~is_cand]] = float("nan")  # changed but not measured
    # Which job (index into todo) each triplet of the difference belongs to, -1 for none.
    job_of = torch.full_like(nkey, -1)
    if todo.numel():
        pos_in = torch.searchsorted(todo, nkey).clamp(max=todo.numel() - 1)
        job_of = torch.where(todo[pos_in] == nkey, pos_in, job_of)
    err_changes = (d_err != 0).flatten(2).any(-1).any(0)  # [pos]
    err_jobs = (err_changes.nonzero().flatten().tolist() if per_position
                else ([None] if bool(err_changes.any()) else []))
    n_feat = todo.numel()
    jobs = [("base", None)] + [("feat", j) for j in range(n_feat)] + \
        [("err", t) for t in err_jobs]
    per = _copies_per_forward(batch_size, B)
    metrics, flipped = [], []
    # With held downstream errors: which patches flip a downstream gate (NodeEffects.flips),
    # against the gates of the baseline copy (job 0), like the metric: the clean forward's own
    # records come from a forward of another batch size, which may round differently (GPU
    # GEMMs pick their algorithm by shape) and move a gate that sits at its threshold.
    downstream = order[order.index(key) + 1:] if other_errors == "clean" else []
    base_keys: dict = {}
    try:
        with torch.no_grad():
            for s in range(0, len(jobs), per):
                chunk = jobs[s:s + per]
                c = len(chunk)
                value = out_c.unsqueeze(0).repeat(c, 1, 1, 1)
                feat_jobs = {j: ci for ci, (kind, j) in enumerate(chunk) if kind == "feat"}
                if feat_jobs:
                    lo, hi = min(feat_jobs), max(feat_jobs)  # consecutive job indices
                    sel = (job_of >= lo) & (job_of <= hi)
                    copy = job_of[sel] - lo + feat_jobs[lo]
                    _add_features(value, sae, copy, rows[sel], feats[sel], vals[sel])
                for ci, (kind, t) in enumerate(chunk):
                    if kind == "err":
                        if t is None:
                            value[ci] += d_err.to(value.dtype)
                        else:
                            value[ci, :, t] += d_err[:, t].to(value.dtype)
                value = value.reshape(c * B, *out_c.shape[1:])
                sp._internal = _rules(sp, key, order, rec_c, c, value, other_errors, grad=False)
                logits = _logits(model, clean.repeat(c, 1))
                metrics += [_metric_value(metric, logits[ci * B:(ci + 1) * B])
                            for ci in range(c)]
                keys = [{k: _active_keys(_rows_of(sp.records[k].acts, ci * B, (ci + 1) * B))
                         for k in downstream} for ci in range(c)]
                if s == 0:
                    base_keys = keys[0]
                flipped += [any(not torch.equal(kc[k], base_keys[k]) for k in downstream)
                            for kc in keys]
    finally:
        sp._internal = {}
    eff = [(m - metrics[0]).to(dtype) for m in metrics[1:]]
    flips = torch.zeros(n_nodes, dtype=torch.bool, device=device)
    if n_feat:
        feat_eff[todo] = torch.stack(eff[:n_feat]).to(device)
        flips[todo] = torch.tensor(flipped[1:1 + n_feat], dtype=torch.bool, device=device)
    if per_position:
        err_eff = torch.zeros(n_pos, dtype=dtype, device=device)
        for t, e in zip(err_jobs, eff[n_feat:]):
            err_eff[t] = e
    else:
        err_eff = eff[n_feat] if err_jobs else torch.zeros((), dtype=dtype, device=device)
    shape = (n_pos, d_sae) if per_position else (d_sae,)
    return feat_eff.view(shape), err_eff, flips.view(shape)


# ------------------------------------------------------------------------------ edge effects

@dataclass
class EdgeEffects:
    """Edge effects from the features of an upstream spliced layer ``U`` to those of a
    downstream one ``D`` and to the metric (summed over positions and the batch).

    ``upstream [n_u]``: the ``U`` features that change between clean and patch (or the
    candidates among them); ``downstream [n_d]``: the ``D`` features an edge can reach
    ("atp": those active somewhere on the clean tokens, the only ones with a gradient;
    "exact": those that change when some upstream feature is patched). ``effects [n_u, n_d]``:
    the effect of ``u`` on the metric through ``d``; ``to_metric [n_u]``: through every path
    that avoids ``D``'s output. ``flips [n_u, n_d]`` ("exact" only): patching ``u`` turned
    ``d``'s gate on or off at some position (a jump the first-order "atp" cannot see).
    """

    upstream: Tensor
    downstream: Tensor
    effects: Tensor
    to_metric: Tensor
    metric_clean: float
    metric_patch: float
    method: str
    flips: Optional[Tensor] = None


def _stop_after(rule):
    """A forward rule that runs ``rule`` and then stops the forward (edges need D's features,
    not the logits)."""
    def stop(key, x, sae):
        out, rec = rule(key, x, sae)
        rec.out = out
        raise _Reached(rec)
    return stop


class _Reached(BaseException):
    def __init__(self, record):
        self.record = record


def _rows_of(acts: SparseActs, lo: int, hi: int) -> SparseActs:
    return SparseActs(idx=acts.idx[lo:hi], f=acts.f[lo:hi], pi_gate=acts.pi_gate[lo:hi],
                      counts=acts.counts[lo:hi], d_sae=acts.d_sae)


def edge_effects(model: torch.nn.Module, saes: Mapping, clean_tokens: Tensor,
                 patch_tokens: Tensor, metric: Callable[[Tensor], Tensor], upstream: str,
                 downstream: str, *, method: str = "atp", features=None,
                 batch_size: Optional[int] = 32) -> EdgeEffects:
    """Edge effects between the features of two spliced layers, ``upstream`` -> ``downstream``
    and ``upstream`` -> metric (:class:`EdgeEffects`), on the graph of
    ``node_effects(..., other_errors="clean")``: the error nodes of the layers after
    ``upstream`` are held at their clean values, so every path from an upstream feature ``u``
    through ``downstream``'s output goes through its features.

    ``"atp"`` (SFC's first-order edges): ``e(u, d) = sum dm/da_d . da_d/da_u . (a_u,patch -
    a_u,clean)`` at the clean point, one backward per downstream feature active on the clean
    tokens (batched as copies); ``to_metric(u)`` the same with ``downstream``'s output held.
    They add up to ``u``'s AtP node effect (with ``other_errors="clean"``).
    ``"exact"`` (path patching): ``e(u, d) = m(clean, a_d set to its value when u is patched)
    - m(clean)``; ``to_metric(u) = m(u patched, downstream's output held clean) - m(clean)``.
    ``features``: candidate ids of ``upstream`` (default: every feature that changes).
    """
    if method not in ("atp", "exact"):
        raise ValueError(f"method must be 'atp' or 'exact', got {method!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if upstream == downstream:
        raise ValueError("upstream and downstream must be two different spliced layers")
    clean, patch = _check_tokens(clean_tokens, patch_tokens, _model_device(model))
    B, n_pos = clean.shape
    U, D = upstream, downstream
    with splice(model, saes) as sp:
        sp._check_layer(U)
        sp._check_layer(D)
        recs = []
        for tokens in (clean, patch):
            sp.records.clear()
            with torch.no_grad():
                m = _metric_value(metric, _logits(model, tokens))
            recs.append((m, dict(sp.records), list(sp.order)))
        (m_clean, rec_c, order), (m_patch, rec_p, _) = recs
        if U not in order or D not in order:
            raise ValueError(f"layers {[k for k in (U, D) if k not in order]} did not run in the "
                             f"model's forward")
        if order.index(U) > order.index(D):
            raise ValueError(f"{U!r} runs after {D!r}: upstream must come first")
        sae_u, sae_d = sp.saes[U], sp.saes[D]
        dtype = torch.promote_types(acc_dtype(_sae_dtype(sae_u)),
                                    acc_dtype(rec_c[U].out.dtype))
        delta = _delta(rec_c[U].acts, rec_p[U].acts)
        rows, feats, vals = delta
        up = torch.unique(feats)
        if features is not None:
            cand = torch.unique(torch.as_tensor(features, dtype=torch.long).reshape(-1))
            if cand.numel() and (cand.min() < 0 or cand.max() >= sae_u.d_sae):
                raise ValueError(f"features: ids must be in [0, {sae_u.d_sae})")
            up = up[torch.isin(up, cand.to(up.device))]
        out_u = rec_c[U].out.detach()
        out_d = rec_c[D].out.detach()
        per = _copies_per_forward(batch_size, B)

        def rules(c, value_u, grad, d_rule=None):
            r = _rules(sp, U, order, rec_c, c, value_u, "clean", grad=grad)
            if d_rule is not None:
                r[D] = d_rule
            return r

        def forward(c, rule_set):
            """Run ``c`` copies of the clean batch; returns the metric per copy, or D's record
            when D's rule stops the forward."""
            sp._internal = rule_set
            try:
                logits = _logits(model, clean.repeat(c, 1))
            except _Reached as reached:
                return reached.record
            finally:
                sp._internal = {}
            return [_metric_value(metric, logits[j * B:(j + 1) * B]) for j in range(c)]

        def patched_u(jobs):
            """``out_U`` per copy with upstream feature ``jobs[i]`` patched in copy ``i``
            (None: nothing patched, a baseline copy)."""
            value = out_u.unsqueeze(0).repeat(len(jobs), 1, 1, 1)
            for ci, u in enumerate(jobs):
                if u is None:
                    continue
                sel = feats == u
                _add_features(value, sae_u, torch.full_like(rows[sel], ci), rows[sel],
                              feats[sel], vals[sel])
            return value.reshape(len(jobs) * B, *out_u.shape[1:])

        if method == "atp":
            effects, to_metric, down, flips = _edges_atp(
                sp, sae_u, sae_d, D, rec_c, delta, up, out_u, out_d, n_pos, per, dtype, rules,
                forward, order)
        else:
            effects, to_metric, down, flips = _edges_exact(
                sp, sae_u, sae_d, D, rec_c, up, out_u, out_d, B, per, dtype, rules, forward,
                patched_u, order)
    return EdgeEffects(up, down, effects, to_metric, float(m_clean), float(m_patch), method,
                       flips)


def _edges_atp(sp, sae_u, sae_d, D, rec_c, delta, up, out_u, out_d, n_pos, per, dtype, rules,
               forward, order):
    # dm/d out_D at the clean point (the layers after D re-encode with their clean errors).
    value_d = out_d.clone().requires_grad_()
    with torch.enable_grad():
        m = sum(forward(1, _rules(sp, D, order, rec_c, 1, value_d, "clean", grad=True)))
        (g_d,) = torch.autograd.grad(m, value_d, allow_unused=True)
    g_d = torch.zeros_like(value_d) if g_d is None else g_d
    acts_d = rec_c[D].acts
    down = torch.unique(acts_d.idx[acts_d.mask()].long())
    # w[t, d] = dm/da_d[t] = W_dec_D[d] . g_D[t], for the downstream candidates.
    g_flat = g_d.reshape(-1, g_d.shape[-1]).to(dtype)
    w = g_flat @ _decoder_rows(sae_d, down).to(dtype).T  # [tokens, n_d]
    effects = torch.zeros(up.numel(), down.numel(), dtype=dtype, device=out_u.device)

    def on_up(grad):  # the effects on the metric of a gradient w.r.t. out_U, per u
        return _gradient_effects(sae_u, delta, grad, n_pos, False, dtype)[up]

    for s in range(0, down.numel(), per):
        ds = down[s:s + per]
        c = ds.numel()
        value = out_u.repeat(c, 1, 1).requires_grad_()
        with torch.enable_grad():
            rec = forward(c, rules(c, value, True, _stop_after(_reencode(
                sp, rec_c[D].err.detach().repeat(c, 1, 1), sae_grad=True, err_grad=False))))
            a = rec.acts  # [c * B, pos] rows
            K = a.capacity
            idx, f, mask = a.idx.reshape(c, -1, K).long(), a.f.reshape(c, -1, K), \
                a.mask().reshape(c, -1, K)
            hit = mask & (idx == ds.view(c, 1, 1))  # slot of feature ds[ci] in copy ci
            f_d = torch.where(hit, f, f.new_zeros(())).sum(-1)  # [c, tokens]
            y = (f_d.to(dtype) * w[:, s:s + c].T).sum()
            (g,) = torch.autograd.grad(y, value, allow_unused=True)
        if g is None:
            continue
        g = g.view(c, *out_u.shape)
        for ci in range(c):
            effects[:, s + ci] = on_up(g[ci])
    # to the metric avoiding D: D outputs its clean value (a constant).
    value = out_u.clone().requires_grad_()
    with torch.enable_grad():
        m = sum(forward(1, rules(1, value, True, _inject(sp, out_d))))
        (g,) = torch.autograd.grad(m, value, allow_unused=True) if m.requires_grad else (None,)
    to_metric = on_up(torch.zeros_like(out_u) if g is None else g)
    return effects, to_metric, down, None


def _active_keys(acts: SparseActs) -> Tensor:
    """``row * d_sae + feature`` of the active slots."""
    r, k = acts.mask().reshape(-1, acts.capacity).nonzero(as_tuple=True)
    return r * acts.d_sae + acts.idx.reshape(-1, acts.capacity)[r, k].long()


def _edges_exact(sp, sae_u, sae_d, D, rec_c, up, out_u, out_d, B, per, dtype, rules, forward,
                 patched_u, order):
    device, d_sae = out_u.device, sae_d.d_sae
    err_d = rec_c[D].err.detach()
    # 1. One forward per upstream feature patched (job None: nothing patched, the baseline),
    # D encoding its input but outputting its clean value: D's activations give the change u
    # causes in D (against the baseline copy of the same batched forward, not the clean
    # forward's records: a forward of another batch size may round differently, and on a GPU
    # every active feature would then "change" and a gate at its threshold "flip"); the metric
    # gives u's effect avoiding D (step 3).
    changes, flipped = [], []  # per u: (rows, feats, vals) of D's change; features that flipped
    base_acts = on_clean = None
    jobs = [None] + up.tolist()
    around = []  # the metric per job
    with torch.no_grad():
        for s in range(0, len(jobs), per):
            chunk = jobs[s:s + per]
            c = len(chunk)
            encode = _reencode(sp, err_d.repeat(c, 1, 1), sae_grad=False, err_grad=False)
            held = out_d.repeat(c, 1, 1)
            around += forward(c, rules(c, patched_u(chunk), False,
                                       lambda key, x, sae: (held, encode(key, x, sae)[1])))
            acts = sp.records[D].acts
            for ci, u in enumerate(chunk):
                a = _rows_of(acts, ci * B, (ci + 1) * B)
                if u is None:
                    base_acts, on_clean = a, _active_keys(a)
                    continue
                changes.append(_delta(base_acts, a))
                on = _active_keys(a)
                diff = torch.cat([on[~torch.isin(on, on_clean)], on_clean[~torch.isin(on_clean, on)]])
                flipped.append(torch.unique(diff % d_sae))
    down = torch.unique(torch.cat([ch[1] for ch in changes] + [torch.zeros(0, dtype=torch.long,
                                                                          device=device)]))
    effects = torch.zeros(up.numel(), down.numel(), dtype=dtype, device=device)
    flips = torch.zeros(up.numel(), down.numel(), dtype=torch.bool, device=device)
    # 2. Each (u, d) pair: D's feature d set to its value under u, all else clean.
    pairs = [(ui, int(torch.searchsorted(down, d))) for ui, ch in enumerate(changes)
             for d in torch.unique(ch[1]).tolist()]
    jobs = [None] + pairs  # job 0: nothing patched, the baseline in the same configuration
    metrics = []
    with torch.no_grad():
        for s in range(0, len(jobs), per):
            chunk = jobs[s:s + per]
            c = len(chunk)
            value = out_d.unsqueeze(0).repeat(c, 1, 1, 1)
            for ci, job in enumerate(chunk):
                if job is None:
                    continue
                r, f, v = changes[job[0]]
                sel = f == down[job[1]]
                _add_features(value, sae_d, torch.full_like(r[sel], ci), r[sel], f[sel], v[sel])
            value = value.reshape(c * B, *out_d.shape[1:])
            metrics += forward(c, _rules(sp, D, order, rec_c, c, value, "clean", grad=False))
        base = metrics[0]
        for (ui, di), m in zip(pairs, metrics[1:]):
            effects[ui, di] = (m - base).to(dtype)
        for ui, fl in enumerate(flipped):
            flips[ui] = torch.isin(down, fl)
        # 3. To the metric avoiding D: u patched, D's output held at its clean value (step 1).
        to_metric = torch.zeros(up.numel(), dtype=dtype, device=device)
        for ui, m in enumerate(around[1:]):
            to_metric[ui] = (m - around[0]).to(dtype)
    return effects, to_metric, down, flips


# ------------------------------------------------------------------ ablation, steering, means

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
    _check_sae(layer, sae)
    ids = torch.as_tensor(feature, dtype=torch.long, device=sae.W_dec.device).reshape(-1)
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= sae.d_sae:
        raise ValueError(f"steer: feature ids must be in [0, {sae.d_sae})")
    s = torch.as_tensor(scale, dtype=sae.W_dec.dtype, device=sae.W_dec.device).reshape(-1)
    if s.numel() not in (1, ids.numel()):
        raise ValueError("steer: scale must be a number or one per feature")
    with torch.no_grad():  # the decoder's vector per unit of activation (as in node effects)
        direction = (s.unsqueeze(-1) * _decoder_rows(sae, ids)).sum(0)
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

    with activations.splice(model, layer, add) as hooked:
        yield hooked


def mean_activations(model: torch.nn.Module, saes: Mapping, tokens: Tensor, *,
                     batch_size: int = 32) -> dict:
    """Per-feature mean activations ``{layer: [d_sae]}`` of the spliced model over every
    position of ``tokens [n, pos]`` (inactive = 0): the ``values`` of ``ablate(...,
    mode="mean")``. Summed from the sparse activations, no ``[tokens, d_sae]`` tensor."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, pos], got {_describe(tokens)}")
    tokens = tokens.to(_model_device(model))
    sums, n = {}, 0
    with splice(model, saes) as sp, torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            sp.records.clear()
            _logits(model, tokens[s:s + batch_size])
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
