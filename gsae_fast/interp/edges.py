"""Edge effects (:func:`edge_effects`): from the features of an upstream spliced layer to those of
a downstream one and to the metric, on the graph with held downstream errors; first-order
("atp", SFC's edges) or exact path patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..hooks import model_device
from ..types import acc_dtype
from .run import (
    RunContext,
    activation_delta,
    active_keys,
    add_features,
    copies_per_forward,
    gradient_effects,
    inject_rule,
    reencode_rule,
    rows_of,
)
from .splice import check_tokens, decoder_rows, metric_value, model_logits, sae_dtype, splice


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
    """Raised by :func:`_stop_after` with D's record. A BaseException, so that no ``except
    Exception`` in model code can swallow it."""

    def __init__(self, record):
        self.record = record


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
    clean, patch = check_tokens(clean_tokens, patch_tokens, model_device(model))
    B = clean.shape[0]
    U, D = upstream, downstream
    with splice(model, saes) as sp:
        sp.check_layer(U)
        sp.check_layer(D)
        recs = []
        for tokens in (clean, patch):
            sp.records.clear()
            with torch.no_grad():
                m = metric_value(metric, model_logits(model, tokens))
            recs.append((m, dict(sp.records), list(sp.order)))
        (m_clean, rec_c, order), (m_patch, rec_p, _) = recs
        if U not in order or D not in order:
            raise ValueError(f"layers {[k for k in (U, D) if k not in order]} did not run in the "
                             f"model's forward")
        if order.index(U) > order.index(D):
            raise ValueError(f"{U!r} runs after {D!r}: upstream must come first")
        sae_u = sp.saes[U]
        dtype = torch.promote_types(acc_dtype(sae_dtype(sae_u)),
                                    acc_dtype(rec_c[U].out.dtype))
        delta = activation_delta(rec_c[U].acts, rec_p[U].acts)
        up = torch.unique(delta[1])
        if features is not None:
            cand = torch.unique(torch.as_tensor(features, dtype=torch.long).reshape(-1))
            if cand.numel() and (cand.min() < 0 or cand.max() >= sae_u.d_sae):
                raise ValueError(f"features: ids must be in [0, {sae_u.d_sae})")
            up = up[torch.isin(up, cand.to(up.device))]
        # Edges live on the graph with held downstream errors: other_errors="clean".
        ctx = RunContext(model, sp, clean, metric, order, rec_c, batch_size, "clean")
        run = _EdgeRun(ctx, U, D, delta, up, rec_c[U].out.detach(), rec_c[D].out.detach(),
                       copies_per_forward(batch_size, B), dtype)
        if method == "atp":
            effects, to_metric, down, flips = _edges_atp(run)
        else:
            effects, to_metric, down, flips = _edges_exact(run)
    return EdgeEffects(up, down, effects, to_metric, float(m_clean), float(m_patch), method,
                       flips)


@dataclass
class _EdgeRun:
    """What :func:`_edges_atp` and :func:`_edges_exact` share: the run context (with
    ``other_errors="clean"``), the upstream and downstream layers, upstream's ``a_patch -
    a_clean`` as triplets (``delta``), the upstream features measured (``up``), both layers'
    clean outputs, the copies of the batch per forward and the effects' dtype."""

    ctx: RunContext
    U: str
    D: str
    delta: tuple
    up: Tensor
    out_u: Tensor
    out_d: Tensor
    per: int
    dtype: torch.dtype

    @property
    def sae_u(self):
        return self.ctx.sp.saes[self.U]

    @property
    def sae_d(self):
        return self.ctx.sp.saes[self.D]

    def rules(self, c: int, value_u: Tensor, grad: bool, d_rule=None) -> dict:
        """The forward rules with ``U`` outputting ``value_u`` (and ``D`` following
        ``d_rule`` when given)."""
        r = self.ctx.rules(self.U, c, value_u, grad=grad)
        if d_rule is not None:
            r[self.D] = d_rule
        return r

    def forward(self, c: int, rule_set: dict):
        """Run ``c`` copies of the clean batch; returns the metric per copy, or D's record
        when D's rule stops the forward."""
        ctx, sp, B = self.ctx, self.ctx.sp, self.ctx.B
        sp.layer_rules = rule_set
        try:
            logits = model_logits(ctx.model, ctx.clean.repeat(c, 1))
        except _Reached as reached:
            return reached.record
        finally:
            sp.layer_rules = {}
        return [metric_value(ctx.metric, logits[j * B:(j + 1) * B]) for j in range(c)]

    def patched_u(self, jobs: list) -> Tensor:
        """``out_U`` per copy with upstream feature ``jobs[i]`` patched in copy ``i``
        (None: nothing patched, a baseline copy)."""
        rows, feats, vals = self.delta
        out_u, B = self.out_u, self.ctx.B
        value = out_u.unsqueeze(0).repeat(len(jobs), 1, 1, 1)
        for ci, u in enumerate(jobs):
            if u is None:
                continue
            sel = feats == u
            add_features(value, self.sae_u, torch.full_like(rows[sel], ci), rows[sel],
                         feats[sel], vals[sel])
        return value.reshape(len(jobs) * B, *out_u.shape[1:])


def _edges_atp(run: _EdgeRun):
    ctx, D, sae_u, sae_d, delta, up = run.ctx, run.D, run.sae_u, run.sae_d, run.delta, run.up
    sp, rec_c, n_pos = ctx.sp, ctx.rec_c, ctx.n_pos
    out_u, out_d, per, dtype = run.out_u, run.out_d, run.per, run.dtype
    rules, forward = run.rules, run.forward
    # dm/d out_D at the clean point (the layers after D re-encode with their clean errors).
    value_d = out_d.clone().requires_grad_()
    with torch.enable_grad():
        m = sum(forward(1, ctx.rules(D, 1, value_d, grad=True)))
        (g_d,) = torch.autograd.grad(m, value_d, allow_unused=True)
    g_d = torch.zeros_like(value_d) if g_d is None else g_d
    acts_d = rec_c[D].acts
    down = torch.unique(acts_d.idx[acts_d.mask()].long())
    # w[t, d] = dm/da_d[t] = W_dec_D[d] . g_D[t], for the downstream candidates.
    g_flat = g_d.reshape(-1, g_d.shape[-1]).to(dtype)
    w = g_flat @ decoder_rows(sae_d, down).to(dtype).T  # [tokens, n_d]
    effects = torch.zeros(up.numel(), down.numel(), dtype=dtype, device=out_u.device)

    def on_up(grad):  # the effects on the metric of a gradient w.r.t. out_U, per u
        return gradient_effects(sae_u, delta, grad, n_pos, False, dtype)[up]

    for s in range(0, down.numel(), per):
        ds = down[s:s + per]
        c = ds.numel()
        value = out_u.repeat(c, 1, 1).requires_grad_()
        with torch.enable_grad():
            rec = forward(c, rules(c, value, True, _stop_after(reencode_rule(
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
        m = sum(forward(1, rules(1, value, True, inject_rule(sp, out_d))))
        (g,) = torch.autograd.grad(m, value, allow_unused=True) if m.requires_grad else (None,)
    to_metric = on_up(torch.zeros_like(out_u) if g is None else g)
    return effects, to_metric, down, None


def _edges_exact(run: _EdgeRun):
    ctx, D, sae_d, up = run.ctx, run.D, run.sae_d, run.up
    sp, rec_c, B = ctx.sp, ctx.rec_c, ctx.B
    out_u, out_d, per, dtype = run.out_u, run.out_d, run.per, run.dtype
    rules, forward, patched_u = run.rules, run.forward, run.patched_u
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
            encode = reencode_rule(sp, err_d.repeat(c, 1, 1), sae_grad=False, err_grad=False)
            held = out_d.repeat(c, 1, 1)
            around += forward(c, rules(c, patched_u(chunk), False,
                                       lambda key, x, sae: (held, encode(key, x, sae)[1])))
            acts = sp.records[D].acts
            for ci, u in enumerate(chunk):
                a = rows_of(acts, ci * B, (ci + 1) * B)
                if u is None:
                    base_acts, on_clean = a, active_keys(a)
                    continue
                changes.append(activation_delta(base_acts, a))
                on = active_keys(a)
                diff = torch.cat([on[~torch.isin(on, on_clean)],
                                  on_clean[~torch.isin(on_clean, on)]])
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
                add_features(value, sae_d, torch.full_like(r[sel], ci), r[sel], f[sel], v[sel])
            value = value.reshape(c * B, *out_d.shape[1:])
            metrics += forward(c, ctx.rules(D, c, value, grad=False))
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

