"""What the batched analyses of :mod:`gsae_fast.interp` share: the run context of one
``node_effects`` / ``edge_effects`` call (:class:`RunContext`), the forward rules that make a
spliced layer pass through, output a given value or re-encode, the IG path (:class:`Path`),
and the arithmetic on sparse activation differences (``a_patch - a_clean`` as triplets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..types import SparseActs
from .splice import LayerRecord, Splice, decoder_rows, metric_value, model_logits, sae_dtype

# Rows of W_dec gathered at once by the effect reductions (elements): bounds the [nnz, d_in]
# gather where a batch has many active (token, feature) pairs.
_GATHER_BUDGET = 1 << 22


# ------------------------------------------------------------------------------ forward rules

def passthrough_rule(sp: Splice):
    """The layer runs as without a splice. With live errors the splice is the identity
    (``x_hat + (x - x_hat) = x``), so this is the same function without the SAE's cost."""
    def rule(key, x, sae):
        return x, LayerRecord(sp.names[key], x, None, None, None)
    return rule


def inject_rule(sp: Splice, value: Tensor):
    """The layer outputs ``value`` (IG's interpolated or exact's patched ``out_L``)."""
    def rule(key, x, sae):
        if x.shape != value.shape:
            raise RuntimeError(f"layer {key!r}: output {tuple(x.shape)} in a batched run, "
                               f"expected {tuple(value.shape)}")
        return value, LayerRecord(sp.names[key], x, None, None, None)
    return rule


def reencode_rule(sp: Splice, err_held: Optional[Tensor], sae_grad: bool, err_grad: bool):
    """The splice, with the error held at ``err_held`` (downstream layers, other_errors="clean")
    or live; ``sae_grad=False`` encodes without autograd and ``err_grad=True`` lets the
    gradient through ``err = x - x_hat``: the straight-through of AtP with live errors, whose
    d out / d x is exactly the identity. ``err_grad=False``: the error is a constant."""
    def rule(key, x, sae):
        xs = x.to(sae_dtype(sae))
        with torch.set_grad_enabled(sae_grad and torch.is_grad_enabled()):
            acts = sae.encode_sparse(xs)
            x_hat = sae.decode(acts)
        if err_held is not None:
            err = err_held
        else:
            err = xs - x_hat if err_grad else (xs - x_hat).detach()
        return x_hat + err, LayerRecord(sp.names[key], x, acts, x_hat, err)
    return rule


# ------------------------------------------------------------ sparse activation differences

def activation_delta(acts_c: SparseActs, acts_p: SparseActs):
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


def gradient_effects(sae, delta, grad: Tensor, n_pos: int, per_position: bool,
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
            dots = (decoder_rows(sae, i).to(dtype) * g[r]).sum(-1)
            target = (r % n_pos) * d_sae + i if per_position else i
            out.index_add_(0, target, vals[s:s + chunk].to(dtype) * dots)
    return out.view(n_pos, d_sae) if per_position else out


def error_effect(d_err: Tensor, grad: Tensor, per_position: bool, dtype) -> Tensor:
    """The error node's effect ``sum (err_patch - err_clean)[t] . grad[t]`` (per position)."""
    e = (d_err.to(dtype) * grad.to(dtype)).sum(-1).sum(0)  # [pos]
    return e if per_position else e.sum()


def add_features(value: Tensor, sae, copy: Tensor, rows: Tensor, feats: Tensor,
                 vals: Tensor) -> None:
    """``value[copy, row] += val * W_dec[feat]`` for each triplet (``value [c, B, pos, d]``;
    ``rows`` index the flat ``B * pos`` tokens): a change of activations, decoded."""
    tokens = value.shape[1] * value.shape[2]
    contrib = vals.to(value.dtype).unsqueeze(-1) * decoder_rows(sae, feats).to(value.dtype)
    value.view(-1, value.shape[-1]).index_add_(0, copy * tokens + rows, contrib)


def active_keys(acts: SparseActs) -> Tensor:
    """``row * d_sae + feature`` of the active slots."""
    r, k = acts.mask().reshape(-1, acts.capacity).nonzero(as_tuple=True)
    return r * acts.d_sae + acts.idx.reshape(-1, acts.capacity)[r, k].long()


def rows_of(acts: SparseActs, lo: int, hi: int) -> SparseActs:
    """Batch rows ``lo:hi`` of ``acts`` (one copy of a batched run)."""
    return SparseActs(idx=acts.idx[lo:hi], f=acts.f[lo:hi], pi_gate=acts.pi_gate[lo:hi],
                      counts=acts.counts[lo:hi], d_sae=acts.d_sae, checked=acts.checked)


# ---------------------------------------------------------------------------- batched runs

def copies_per_forward(batch_size: Optional[int], B: int) -> int:
    """How many copies of a ``B``-row batch one forward of at most ``batch_size`` rows runs."""
    # Whole copies only: the metric sees one copy's [B, pos, vocab] logits at a time.
    return max(1, (batch_size or B) // B)


@dataclass
class RunContext:
    """What the batched forwards of one ``node_effects`` or ``edge_effects`` call share: the
    model with its SAEs spliced in (``sp``; ``sp.saes`` are the SAEs, ``sp.names`` the hooked
    modules), the clean tokens and the metric, and the spliced model's clean forward.

    ``order``: the spliced layers in the order they ran on the clean tokens (None where no
    batched run follows, as for AtP); ``rec_c``: their records (:class:`LayerRecord`);
    ``batch_size``: the most sequences per batched forward; ``other_errors``: "live" or
    "clean" (``node_effects``); ``per_position``: node effects per position.
    """

    model: torch.nn.Module
    sp: Splice
    clean: Tensor
    metric: Callable[[Tensor], Tensor]
    order: Optional[list]
    rec_c: dict
    batch_size: Optional[int]
    other_errors: str = "live"
    per_position: bool = False

    @property
    def B(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def rules(self, key, copies: int, value: Tensor, grad: bool) -> dict:
        """Forward rules of a batched IG / exact run on ``copies`` copies of the clean batch:
        ``key`` outputs ``value``; the layers before it run plain (their input is clean: with
        live or held-clean errors their splice gives the clean output); those after it run
        plain (other_errors="live") or re-encode with their clean error
        (other_errors="clean")."""
        sp = self.sp
        rules, after = {}, False
        for k in self.order:
            if k == key:
                rules[k], after = inject_rule(sp, value), True
            elif after and self.other_errors == "clean":
                err = self.rec_c[k].err.detach().repeat(copies, 1, 1)
                rules[k] = reencode_rule(sp, err, sae_grad=grad, err_grad=False)
            else:
                rules[k] = passthrough_rule(sp)
        return rules


class Path:
    """Forwards of the spliced model on copies of the clean batch with layer ``key``'s output
    on the straight line ``out_c + alpha (out_p - out_c)``, one ``alpha`` per copy and row (IG
    and jump-aware IG); the other layers follow :meth:`RunContext.rules`."""

    def __init__(self, ctx: RunContext, key, out_c: Tensor, out_p: Tensor):
        self.ctx, self.sp, self.key, self.out_c, self.out_p = ctx, ctx.sp, key, out_c, out_p
        self.B = ctx.B
        self.dtype = torch.promote_types(out_c.dtype, torch.float32)
        order = ctx.order
        self.after = order[order.index(key) + 1:] if ctx.other_errors == "clean" else []
        # Keys of the downstream gates in one flat space: layer offset + pos * d_sae + feature.
        n_pos, self.offsets, off = ctx.n_pos, [], 0
        for k in self.after:
            self.offsets.append(off)
            off += n_pos * self.sp.saes[k].d_sae

    def run(self, alphas: Tensor, *, grad=None, sets: bool = False):
        """``alphas [copies, B]``. ``grad``: None, ``"metric"`` (``dm/d out_L``) or a function
        ``(records, first_copy, copies) -> scalar`` to differentiate w.r.t. ``out_L``.
        Returns (metric per copy [copies], gradient [copies, B, pos, d] or None, and with
        ``sets`` the downstream active gates: per copy, per row, a sorted key tensor)."""
        B, out_c, out_p = self.B, self.out_c, self.out_p
        ctx = self.ctx
        per = copies_per_forward(ctx.batch_size, B)
        metrics, grads, active = [], [], []
        try:
            for s in range(0, alphas.shape[0], per):
                a = alphas[s:s + per].to(device=out_c.device, dtype=self.dtype)
                c = a.shape[0]
                value = (out_c + a.view(c, B, 1, 1) * (out_p - out_c)).reshape(
                    c * B, *out_c.shape[1:])
                if grad is not None:
                    value.requires_grad_()
                self.sp.layer_rules = ctx.rules(self.key, c, value, grad=grad is not None)
                self.sp.records.clear()
                with torch.set_grad_enabled(grad is not None):
                    logits = model_logits(ctx.model, ctx.clean.repeat(c, 1))
                    ms = [metric_value(ctx.metric, logits[j * B:(j + 1) * B])
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
            self.sp.layer_rules = {}
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
            keys = active_keys(acts).cpu()
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

