"""Node effects of SAE features and error nodes on a metric (:func:`node_effects`): attribution
patching (AtP), integrated gradients (IG) and exact activation patching; jump-aware IG is in
:mod:`gsae_fast.interp.jump_ig`. The graph the nodes live on is described in
:mod:`gsae_fast.interp`.

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
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..hooks import model_device
from ..types import acc_dtype
from .jump_ig import gate_params, jump_ig_grad
from .run import (
    Path,
    RunContext,
    activation_delta,
    active_keys,
    add_features,
    copies_per_forward,
    error_effect,
    gradient_effects,
    reencode_rule,
    rows_of,
)
from .splice import Splice, check_tokens, metric_value, model_logits, sae_dtype, splice

METHODS = ("atp", "ig", "jump_ig", "exact")
OTHER_ERRORS = ("live", "clean")
IG_ALPHAS = ("midpoint", "left")


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
        sp.check_layer(key)
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        d_sae = sp.saes[key].d_sae
        if ids.numel() and (ids.min() < 0 or ids.max() >= d_sae):
            raise ValueError(f"features[{key!r}]: ids must be in [0, {d_sae})")
        out[key] = torch.unique(ids)
    return out


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
    them and two passes per crossing; see :mod:`gsae_fast.interp.jump_ig`) or
    ``"exact"`` (one forward copy per changed feature, and ``per_position`` per changed
    (position, feature); ``features={layer: ids}`` limits it to candidates). ``batch_size``:
    the most sequences per forward of IG and exact (whole copies of the batch).
    ``other_errors``: "live" or "clean", see this module's docstring.

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
    clean, patch = check_tokens(clean_tokens, patch_tokens, model_device(model))
    B, n_pos = clean.shape

    with splice(model, saes) as sp:
        cand = _check_features(features, sp, method)

        def run_plain(tokens, what):
            sp.records.clear()
            with torch.no_grad():
                m = metric_value(metric, model_logits(model, tokens))
            missing = [k for k in sp.layers if k not in sp.records]
            if missing:
                raise ValueError(f"layers {missing} did not run in the model's forward on the "
                                 f"{what} tokens (a container such as a ModuleList?)")
            return m, dict(sp.records), list(sp.order)

        m_patch, rec_p, _ = run_plain(patch, "patch")
        if method == "atp":
            # One forward with the gradient reaching every layer output: live errors pass it
            # straight through each splice (d out/dx = I), held ("clean") ones through the SAE.
            sp.layer_rules = {k: (reencode_rule(sp, None, sae_grad=False, err_grad=True)
                                if other_errors == "live" else
                                reencode_rule(sp, None, sae_grad=True, err_grad=False))
                            for k in sp.layers}
            sp.need_grad = True
            sp.records.clear()
            try:
                with torch.enable_grad():
                    m_clean = metric_value(metric, model_logits(model, clean))
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
                sp.layer_rules, sp.need_grad = {}, False
            grad = {k: (torch.zeros_like(o) if gr is None else gr)
                    for k, o, gr in zip(sp.layers, outs, grads)}
            order = None
        else:
            m_clean, rec_c, order = run_plain(clean, "clean")
        ctx = RunContext(model, sp, clean, metric, order, rec_c, batch_size, other_errors,
                         per_position)

        if method == "jump_ig":
            half = (torch.float16, torch.bfloat16)
            low = [k for k in sp.layers if rec_c[k].out.dtype in half
                   or sae_dtype(sp.saes[k]) in half]
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
            dtype = torch.promote_types(acc_dtype(sae_dtype(sae)), acc_dtype(rc.out.dtype))
            delta = activation_delta(rc.acts, rp.acts)
            d_err = (rp.err - rc.err).detach()
            if method == "atp":
                g = grad[key]
                feats = gradient_effects(sae, delta, g, n_pos, per_position, dtype)
                err = error_effect(d_err, g, per_position, dtype)
            elif method in ("ig", "jump_ig"):
                path = Path(ctx, key, rc.out.detach(), rp.out.detach())
                if method == "ig":
                    g = _ig_mean_grad(path, steps, ig_alphas)
                else:
                    for k in path.after:
                        gate_params(sp.saes[k], k)
                    g, G_jump, jumps = jump_ig_grad(path, steps, jump_tol)
                    extra = dict(
                        jump_features=gradient_effects(sae, delta, G_jump, n_pos,
                                                       per_position, dtype),
                        jump_error=error_effect(d_err, G_jump, per_position, dtype),
                        jumps=jumps)
                    g = g + G_jump
                feats = gradient_effects(sae, delta, g, n_pos, per_position, dtype)
                err = error_effect(d_err, g, per_position, dtype)
            else:
                feats, err, flips = _exact(ctx, key, d_err, delta, cand.get(key), dtype)
                if other_errors == "clean":
                    extra = dict(flips=flips)
            results[key] = NodeEffects(feats, err, float(m_clean.detach()), float(m_patch), method,
                                       **extra)
    return results


def _ig_mean_grad(path: Path, steps: int, ig_alphas: str) -> Tensor:
    """``mean_alpha dm/d out_L`` along ``out_L(alpha) = out_c + alpha (out_p - out_c)``, the
    line every node of L moving together traces (the decoder is affine)."""
    shift = 0.5 if ig_alphas == "midpoint" else 0.0
    alphas = ((torch.arange(steps, dtype=torch.float64) + shift) / steps).view(-1, 1)
    _, g, _ = path.run(alphas.expand(steps, path.B), grad="metric")
    return g.sum(0) / steps


def _exact(ctx: RunContext, key, d_err: Tensor, delta, candidates: Optional[Tensor],
           dtype: torch.dtype):
    """Activation patching of each candidate node of layer ``key``, batched as copies of the
    clean batch: a feature copy outputs ``out_c + (a_patch - a_clean)_i W_dec[i]`` at ``key``
    (at every position, or at one with ``per_position``), an error copy ``out_c + err_patch -
    err_clean``; copy 0 patches nothing and is the baseline, run in the same configuration.
    ``d_err``: ``err_patch - err_clean``; ``delta``: ``a_patch - a_clean`` as triplets;
    ``candidates``: the feature ids to measure (None: every feature that changes)."""
    model, sp, order, clean, metric, rec_c = (ctx.model, ctx.sp, ctx.order, ctx.clean,
                                              ctx.metric, ctx.rec_c)
    per_position, batch_size, other_errors, n_pos = (ctx.per_position, ctx.batch_size,
                                                     ctx.other_errors, ctx.n_pos)
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
    per = copies_per_forward(batch_size, B)
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
                    add_features(value, sae, copy, rows[sel], feats[sel], vals[sel])
                for ci, (kind, t) in enumerate(chunk):
                    if kind == "err":
                        if t is None:
                            value[ci] += d_err.to(value.dtype)
                        else:
                            value[ci, :, t] += d_err[:, t].to(value.dtype)
                value = value.reshape(c * B, *out_c.shape[1:])
                sp.layer_rules = ctx.rules(key, c, value, grad=False)
                logits = model_logits(model, clean.repeat(c, 1))
                metrics += [metric_value(metric, logits[ci * B:(ci + 1) * B])
                            for ci in range(c)]
                keys = [{k: active_keys(rows_of(sp.records[k].acts, ci * B, (ci + 1) * B))
                         for k in downstream} for ci in range(c)]
                if s == 0:
                    base_keys = keys[0]
                flipped += [any(not torch.equal(kc[k], base_keys[k]) for k in downstream)
                            for kc in keys]
    finally:
        sp.layer_rules = {}
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

