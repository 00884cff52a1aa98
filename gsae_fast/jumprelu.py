"""JumpReLU SAEs on the Gated kernels.

A JumpReLU SAE computes ``pre = (x - b_dec) @ W_enc + b_enc`` and
``f = relu(pre) * 1[pre > threshold]``. A Gated SAE with ``r_mag = 0``, ``b_mag = b_enc`` and
``b_gate = b_enc - threshold`` computes exactly that (the paper's equivalence), so the fused
gated encode, the sparse decode and their backward serve JumpReLU SAEs unchanged.

Training follows SAELens' ``JumpReLUTrainingSAE`` (DeepMind's straight-through estimators with a
rectangle kernel of width ``bandwidth``; Anthropic's tanh sparsity and pre-activation loss as
options). The estimators need the pre-activations within ``bandwidth / 2`` of the threshold,
below it too, so the training encode lowers the gate by ``bandwidth / 2`` and rebuilds ``pre`` on
the emitted slots from ``pi_gate``: everything stays ``[tokens, K]``, never ``[tokens, d_sae]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .types import SparseActs

SPARSITY_MODES = ("step", "tanh", "quadratic")


def as_gated(W_enc, b_dec, b_enc, threshold, band: float = 0.0):
    """The Gated SAE encoder parameters computing this JumpReLU encoder, with the gate lowered by
    ``band`` (differentiable in b_enc and threshold)."""
    return (W_enc, b_dec, b_enc - threshold + band, torch.zeros_like(b_enc), b_enc)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class _JumpReLU(torch.autograd.Function):
    """``pre * 1[pre > threshold]`` with the straight-through threshold gradient."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        ste = threshold / ctx.bandwidth * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        grad_pre = (pre > threshold).to(grad.dtype) * grad
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, -ste, None, None


class _Step(torch.autograd.Function):
    """``1[pre > threshold]`` with the straight-through gradient (the L0 of a row)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        ste = _rectangle((pre - threshold) / ctx.bandwidth) * grad / ctx.bandwidth
        return (ste if ctx.ste_to_input else None), -ste, None, None


@dataclass
class JumpReLULoss:
    """``loss = mse + l0_loss + pre_act_loss`` (coefficients included), as SAELens names them.

    On the sparse path ``acts`` are the training slots, flattened to ``[tokens, K]``: every
    pre-activation above ``threshold - bandwidth / 2`` (the estimators' band), ``f`` holding
    JumpReLU(pre) (0 below the threshold), so ``acts.counts`` include the band; ``l0`` counts only
    ``pre > threshold``."""

    loss: Tensor
    mse: Tensor
    l0_loss: Tensor
    pre_act_loss: Tensor
    l0: Tensor
    x_hat: Tensor
    f: Optional[Tensor] = None  # dense [..., d_sae] (dense path) or None
    acts: Optional[SparseActs] = None  # the slots (sparse path); f holds JumpReLU(pre)
    max_count: Optional[int] = None


def check_options(sparsity_mode: str, target_l0: Optional[float], bandwidth: float) -> None:
    if sparsity_mode not in SPARSITY_MODES:
        raise ValueError(f"sparsity_mode must be one of {SPARSITY_MODES}, got {sparsity_mode!r}")
    if sparsity_mode == "quadratic" and (target_l0 is None or target_l0 <= 0):
        raise ValueError("sparsity_mode='quadratic' needs target_l0 > 0")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def _sparsity(l0_rows, f_weighted, l0_coefficient, sparsity_mode, tanh_scale, target_l0):
    """Per-token sparsity penalty, averaged: L0 rows (step), tanh of |W_dec|-weighted f."""
    if sparsity_mode == "tanh":
        per_token = torch.tanh(tanh_scale * f_weighted).sum(-1)
    elif sparsity_mode == "quadratic":
        per_token = 2 / target_l0 * (l0_rows - target_l0) ** 2
    else:
        per_token = l0_rows
    return (l0_coefficient * per_token).mean()


def jumprelu_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_enc: Tensor,
                      threshold: Tensor, l0_coefficient: float, *, bandwidth: float = 0.05,
                      sparsity_mode: str = "step", tanh_scale: float = 4.0,
                      target_l0: Optional[float] = None, ste_to_input: bool = False,
                      pre_act_loss_coefficient: Optional[float] = None,
                      dead_neuron_mask: Optional[Tensor] = None, backend: str = "auto",
                      capacity: Optional[int] = None) -> JumpReLULoss:
    """SAELens' JumpReLU training loss (``JumpReLUTrainingSAE.training_forward_pass``, the
    threshold already clamped at 0). ``backend="reference"`` runs the dense math."""
    check_options(sparsity_mode, target_l0, bandwidth)
    threshold = threshold.to(b_enc.dtype)  # SAELens casts its fp32 threshold to the compute dtype
    x2 = x.reshape(-1, x.shape[-1])
    band = bandwidth / 2
    dense = backend == "reference" or ops.dense_is_faster(capacity, W_enc.shape[1], x.device,
                                                             W_enc.dtype)
    W_dec_norm = W_dec.norm(dim=1)
    pre_act = x2.new_zeros(())
    if pre_act_loss_coefficient is not None and dead_neuron_mask is not None and \
            bool(dead_neuron_mask.any()):
        # Only dead features count: a GEMM over their columns alone.
        dead = dead_neuron_mask.nonzero().squeeze(1)
        pre_dead = (x2 - b_dec) @ W_enc[:, dead] + b_enc[dead]
        pre_act = pre_act_loss_coefficient * (
            (threshold[dead] - pre_dead).relu() * W_dec_norm[dead]).sum(-1).mean()

    if dense:  # the reference, or so many slots (band included) that dense is faster
        pre = (x2 - b_dec) @ W_enc + b_enc
        f = _JumpReLU.apply(pre, threshold.expand_as(pre), bandwidth, ste_to_input)
        x_hat = f @ W_dec + b_dec
        l0_rows = _Step.apply(pre, threshold.expand_as(pre), bandwidth, ste_to_input).sum(-1)
        sparsity = _sparsity(l0_rows, f * W_dec_norm, l0_coefficient, sparsity_mode, tanh_scale,
                             target_l0)
        mse = (x_hat - x2).pow(2).sum(-1).mean()
        l0 = (pre > threshold).sum(-1).float().mean()
        max_count = int((pre > threshold - band).sum(-1).max()) if pre.shape[0] else 0
        return JumpReLULoss(mse + sparsity + pre_act, mse, sparsity, pre_act, l0,
                            x_hat.view(x.shape), f=f.view(*x.shape[:-1], -1),
                            max_count=max_count)

    # Sparse path: slots for every pre > threshold - bandwidth / 2. The gate is built from a
    # detached threshold, so the threshold's gradient comes from the estimators alone (two
    # large opposite paths through b_gate and pre would cancel only up to rounding in bf16).
    gated = as_gated(W_enc, b_dec, b_enc, threshold.detach(), band)
    acts = ops.gated_encode(x2, *gated, capacity=capacity, backend=backend)
    valid = acts.mask()
    i = acts.idx.long()
    acc = acts.pi_gate.dtype
    th = threshold.to(acc)[i]
    offset = (b_enc.to(acc) - gated[2].to(acc)).detach()[i]  # pi_gate + offset = z + b_enc
    pre = torch.where(valid, acts.pi_gate + offset, th - bandwidth)  # padding: out of band
    f = _JumpReLU.apply(pre, th, bandwidth, ste_to_input)
    l0_rows = _Step.apply(pre, th, bandwidth, ste_to_input).sum(-1)
    slots = SparseActs(acts.idx, f, acts.pi_gate, acts.counts, acts.d_sae, acts.max_count)
    x_hat = ops.sparse_decode(slots, W_dec, b_dec, backend=backend)
    sparsity = _sparsity(l0_rows, f * W_dec_norm.to(acc)[i], l0_coefficient, sparsity_mode,
                         tanh_scale, target_l0)
    mse = (x_hat - x2).pow(2).sum(-1).mean()
    l0 = (pre > th).sum(-1).float().mean()
    return JumpReLULoss(mse + sparsity + pre_act, mse, sparsity, pre_act, l0, x_hat.view(x.shape),
                        acts=slots, max_count=acts.max_count)
