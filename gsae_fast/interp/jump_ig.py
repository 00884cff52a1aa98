"""Jump-aware integrated gradients (``node_effects(..., method="jump_ig")``): IG that also
counts the metric's jumps where a downstream gate flips along the path.

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
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .run import Path


def gate_params(sae, layer) -> tuple:
    """``(W_enc, b_dec, b_gate)`` of an SAE whose gate is a fixed threshold of a linear
    function of its input (Gated, JumpReLU, BatchTopK at inference)."""
    try:
        W_enc, b_dec, b_gate, _, _ = sae.encoder_params()
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


def _locate_crossings(path: Path, steps: int, tol: float) -> list:
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


def _jump_gradients(path: Path, events: list) -> tuple[Tensor, list]:
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
                W_enc, b_dec, b_gate = gate_params(path.sp.saes[layer], layer)
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


def jump_ig_grad(path: Path, steps: int, tol: float) -> tuple[Tensor, Tensor, list]:
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

