"""The dense PyTorch Gated SAE: the oracle every executor is tested against.

The paper's equations (Rajamanoharan et al. 2024) in SAELens' parameter layout, written to be
obviously right rather than fast. Every function works on ``[..., d_in]`` inputs and computes in
the dtype of its arguments (use float64 for an exact oracle).

    z        = (x - b_dec) @ W_enc
    pi_gate  = z + b_gate            gate = 1[pi_gate > 0]
    pi_mag   = exp(r_mag) * z + b_mag
    f        = gate * relu(pi_mag)
    x_hat    = f @ W_dec + b_dec
    loss     = mse + lambda * sum_i w_i relu(pi_gate_i) + aux        (means over tokens)
    mse      = |x - x_hat|^2         aux = |x - (relu(pi_gate) @ W_dec' + b_dec')|^2

``sparsity="unit"``: w_i = 1 (dictionary_learning, decoder rows kept at unit norm);
``sparsity="decoder_norm"``: w_i = |W_dec[i]| (SAELens).
``aux="frozen"``: W_dec' and b_dec' are stop-gradient copies (the paper, dictionary_learning);
``aux="shared"``: the live decoder (SAELens); ``aux="none"``: no auxiliary term.

The other architectures' dense math is here too, each beside the result type its fast path
(gsae_fast.saes) returns: JumpReLU (:func:`jumprelu_sae_loss`, SAELens' ``JumpReLUTrainingSAE``
with its straight-through estimators) and TopK / BatchTopK (:func:`dense_topk`,
:func:`topk_sae_loss`, SAELens' ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` with AuxK).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .types import GatedLoss, SparseActs

SPARSITY_CHOICES = ("unit", "decoder_norm")
AUX_CHOICES = ("frozen", "shared", "none")


def check_loss_options(sparsity: str, aux: str) -> None:
    if sparsity not in SPARSITY_CHOICES:
        raise ValueError(f"sparsity must be one of {SPARSITY_CHOICES}, got {sparsity!r}")
    if aux not in AUX_CHOICES:
        raise ValueError(f"aux must be one of {AUX_CHOICES}, got {aux!r}")


def aux_decoder(W_dec: Tensor, b_dec: Tensor, aux: str) -> tuple[Tensor, Tensor]:
    """The decoder of the auxiliary reconstruction: stop-gradient copies for ``aux="frozen"``
    (the paper), the live parameters for ``aux="shared"`` (SAELens)."""
    return (W_dec.detach(), b_dec.detach()) if aux == "frozen" else (W_dec, b_dec)


# The loss terms, one definition for every loss that computes them (this dense oracle, the sparse
# path of gsae_fast.ops, the feature-sharded loss of gsae_fast.distributed, the other
# architectures' losses).

def squared_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over tokens of the squared L2 error ``|x - x_hat|^2`` (the mse and aux terms)."""
    return (x_hat - x).pow(2).sum(-1).mean()


def sparsity_sum(g: Tensor, W_dec: Tensor, sparsity: str, idx: Optional[Tensor] = None) -> Tensor:
    """``sum over tokens and features of w_i g_i``, with ``g = relu(pi_gate)`` and ``w_i = 1``
    (``"unit"``) or ``|W_dec[i]|`` (``"decoder_norm"``); divide by the tokens for the mean.
    ``g`` is dense ``[..., d_sae]``, or the slot values ``[..., K]`` of the features ``idx``
    (padding: g = 0 at any valid index). The decoder norms weigh the per-feature sums (an
    ``index_add``: deterministic on CPU, and on CUDA in torch's deterministic mode; the backward
    of a gather of the norms would not be)."""
    if sparsity == "unit":
        return g.sum()
    if idx is None:
        per_feature = g.reshape(-1, g.shape[-1]).sum(0)
    else:
        per_feature = g.new_zeros(W_dec.shape[0]).index_add(0, idx.reshape(-1).long(),
                                                            g.reshape(-1))
    return W_dec.norm(dim=1).to(g.dtype) @ per_feature


def zero_term(like: Tensor) -> Tensor:
    """A loss term that is off (``aux="none"``): a zero scalar of ``like``'s dtype and device."""
    return torch.zeros((), dtype=like.dtype, device=like.device)


def pre_activations(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_gate: Tensor, r_mag: Tensor,
                    b_mag: Tensor) -> tuple[Tensor, Tensor]:
    """(pi_gate, pi_mag), both ``[..., d_sae]``."""
    z = (x - b_dec) @ W_enc
    return z + b_gate, torch.exp(r_mag) * z + b_mag


def encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_gate: Tensor, r_mag: Tensor,
           b_mag: Tensor) -> Tensor:
    """Feature activations f, dense ``[..., d_sae]`` (SAELens ``GatedSAE.encode``)."""
    pi_gate, pi_mag = pre_activations(x, W_enc, b_dec, b_gate, r_mag, b_mag)
    return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)


def decode(f: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return f @ W_dec + b_dec


def gated_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_gate: Tensor,
                   r_mag: Tensor, b_mag: Tensor, l1_coefficient: float, *,
                   sparsity: str = "unit", aux: str = "frozen") -> GatedLoss:
    """The Gated SAE training loss; ``GatedLoss.sparsity`` includes the coefficient."""
    check_loss_options(sparsity, aux)
    pi_gate, pi_mag = pre_activations(x, W_enc, b_dec, b_gate, r_mag, b_mag)
    active = pi_gate > 0
    f = active.to(pi_mag.dtype) * torch.relu(pi_mag)
    x_hat = f @ W_dec + b_dec
    mse = squared_error(x_hat, x)
    g = torch.relu(pi_gate)
    n_tokens = g.shape[:-1].numel()
    sparsity_term = l1_coefficient * sparsity_sum(g, W_dec, sparsity) / n_tokens
    if aux == "none":
        aux_term = zero_term(mse)
    else:
        W, b = aux_decoder(W_dec, b_dec, aux)
        aux_term = squared_error(g @ W + b, x)
    counts = active.sum(-1)
    return GatedLoss(
        loss=mse + sparsity_term + aux_term,
        mse=mse,
        sparsity=sparsity_term,
        aux=aux_term,
        l0=counts.to(torch.float32).mean(),
        x_hat=x_hat,
        max_count=int(counts.max()) if counts.numel() else 0,
    )


# ------------------------------------------------------------------------------------ JumpReLU
#   pre = (x - b_dec) @ W_enc + b_enc        f = relu(pre) * 1[pre > threshold]
# (the threshold cast to the compute dtype, as SAELens does). The straight-through estimators
# below are shared with the sparse path (gsae_fast.saes.jumprelu), which applies them to slots.

JUMPRELU_SPARSITY_MODES = ("step", "tanh", "quadratic")


def check_jumprelu_options(sparsity_mode: str, target_l0: Optional[float],
                           bandwidth: float) -> None:
    if sparsity_mode not in JUMPRELU_SPARSITY_MODES:
        raise ValueError(f"sparsity_mode must be one of {JUMPRELU_SPARSITY_MODES}, got "
                         f"{sparsity_mode!r}")
    if sparsity_mode == "quadratic" and (target_l0 is None or target_l0 <= 0):
        raise ValueError("sparsity_mode='quadratic' needs target_l0 > 0")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLUFn(torch.autograd.Function):
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


class StepFn(torch.autograd.Function):
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


def jumprelu_sparsity(l0_rows, f_weighted, l0_coefficient, sparsity_mode, tanh_scale,
                      target_l0):
    """Per-token sparsity penalty, averaged: L0 rows (step), tanh of |W_dec|-weighted f."""
    if sparsity_mode == "tanh":
        per_token = torch.tanh(tanh_scale * f_weighted).sum(-1)
    elif sparsity_mode == "quadratic":
        per_token = 2 / target_l0 * (l0_rows - target_l0) ** 2
    else:
        per_token = l0_rows
    return (l0_coefficient * per_token).mean()


def jumprelu_pre_act_loss(x2: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor,
                          threshold: Tensor, W_dec_norm: Tensor,
                          coefficient: Optional[float], dead_neuron_mask: Optional[Tensor]
                          ) -> Tensor:
    """Anthropic's pre-activation loss over the dead features of ``x2 [tokens, d_in]`` (0 when
    off or nothing is dead): a GEMM over their columns alone."""
    pre_act = x2.new_zeros(())
    if coefficient is not None and dead_neuron_mask is not None and \
            bool(dead_neuron_mask.any()):
        dead = dead_neuron_mask.nonzero().squeeze(1)
        pre_dead = (x2 - b_dec) @ W_enc[:, dead] + b_enc[dead]
        pre_act = coefficient * (
            (threshold[dead] - pre_dead).relu() * W_dec_norm[dead]).sum(-1).mean()
    return pre_act


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


def jumprelu_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_enc: Tensor,
                      threshold: Tensor, l0_coefficient: float, *, bandwidth: float = 0.05,
                      sparsity_mode: str = "step", tanh_scale: float = 4.0,
                      target_l0: Optional[float] = None, ste_to_input: bool = False,
                      pre_act_loss_coefficient: Optional[float] = None,
                      dead_neuron_mask: Optional[Tensor] = None) -> JumpReLULoss:
    """SAELens' JumpReLU training loss, dense (``JumpReLUTrainingSAE.training_forward_pass``,
    the threshold already clamped at 0). ``max_count``: the largest row count of
    ``pre > threshold - bandwidth / 2`` (what the sparse path emits)."""
    check_jumprelu_options(sparsity_mode, target_l0, bandwidth)
    threshold = threshold.to(b_enc.dtype)  # SAELens casts its fp32 threshold to the compute dtype
    x2 = x.reshape(-1, x.shape[-1])
    band = bandwidth / 2
    W_dec_norm = W_dec.norm(dim=1)
    pre_act = jumprelu_pre_act_loss(x2, W_enc, b_dec, b_enc, threshold, W_dec_norm,
                                    pre_act_loss_coefficient, dead_neuron_mask)
    pre = (x2 - b_dec) @ W_enc + b_enc
    f = JumpReLUFn.apply(pre, threshold.expand_as(pre), bandwidth, ste_to_input)
    x_hat = f @ W_dec + b_dec
    l0_rows = StepFn.apply(pre, threshold.expand_as(pre), bandwidth, ste_to_input).sum(-1)
    sparsity = jumprelu_sparsity(l0_rows, f * W_dec_norm, l0_coefficient, sparsity_mode,
                                 tanh_scale, target_l0)
    mse = squared_error(x_hat, x2)
    l0 = (pre > threshold).sum(-1).float().mean()
    max_count = int((pre > threshold - band).sum(-1).max()) if pre.shape[0] else 0
    return JumpReLULoss(mse + sparsity + pre_act, mse, sparsity, pre_act, l0,
                        x_hat.view(x.shape), f=f.view(*x.shape[:-1], -1), max_count=max_count)


# ---------------------------------------------------------------------------- TopK, BatchTopK
#   hidden_pre = ((x - b_dec) @ W_enc + b_enc) * |W_dec[i]|   (the norm: SAELens'
#   rescale_acts_by_decoder_norm, else 1); f = the k largest per token of hidden_pre, ReLU'd
#   (BatchTopK: the k * tokens largest of relu(hidden_pre) in the batch); x_hat = f / |W_dec[i]|
#   @ W_dec + b_dec. AuxK: the aux_k largest pre-activations of the dead features reconstruct
#   the detached residual x - x_hat through the decoder without bias.

TOPK_AUX_STYLES = ("sae_lens", "dictionary_learning")


def check_topk_loss_options(dead_neuron_mask, d_sae: int, aux_style: str) -> None:
    if aux_style not in TOPK_AUX_STYLES:
        raise ValueError(f"aux_style must be one of {TOPK_AUX_STYLES}, got {aux_style!r}")
    if dead_neuron_mask is not None and (dead_neuron_mask.dtype != torch.bool or
                                         tuple(dead_neuron_mask.shape) != (d_sae,)):
        raise ValueError(f"dead_neuron_mask must be a bool tensor of shape [{d_sae}], got "
                         f"{dead_neuron_mask.dtype} {list(dead_neuron_mask.shape)}")


def dense_topk(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor, k: float, *,
               batch: bool = False, decoder_norm: Optional[Tensor] = None):
    """SAELens' dense math: (activations [..., d_sae], hidden_pre [..., d_sae]) where
    hidden_pre includes the decoder-norm rescaling."""
    hidden_pre = (x - b_dec) @ W_enc + b_enc
    if decoder_norm is not None:
        hidden_pre = hidden_pre * decoder_norm
    if batch:
        flat = hidden_pre.relu().flatten()
        top = flat.topk(int(k * hidden_pre.shape[:-1].numel()))
        acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values)
        return acts.view(hidden_pre.shape), hidden_pre
    top = hidden_pre.topk(int(k), dim=-1, sorted=False)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    return acts, hidden_pre


@dataclass
class TopKLoss:
    """``loss = mse + aux`` (the AuxK term, coefficient included). ``acts``: the sparse
    activations (sparse path); ``f``: the dense ones (``backend="reference"``)."""

    loss: Tensor
    mse: Tensor
    aux: Tensor
    l0: Tensor
    x_hat: Tensor
    acts: Optional[SparseActs] = None
    f: Optional[Tensor] = None

    def min_positive(self) -> Optional[Tensor]:
        """The smallest positive activation of the batch (BatchTopK's threshold update), or
        None when nothing fired."""
        with torch.no_grad():
            v = self.acts.f[self.acts.mask()] if self.acts is not None else self.f[self.f > 0]
            v = v[v > 0]
            return v.min() if v.numel() else None


def topk_aux_scale(num_dead: int, k_aux: int, style: str) -> float:
    # SAELens scales the loss down when few latents are dead; dictionary_learning does not.
    return min(num_dead / k_aux, 1.0) if style == "sae_lens" else 1.0


def topk_aux_budget(num_dead: int, d_in: int, aux_k: Optional[int],
                    style: str) -> tuple[int, float]:
    """AuxK's (k_aux, loss scale): ``aux_k`` dead latents (default d_in / 2), at most the dead
    ones there are, the scale taken before that cut (as both peers do)."""
    k_aux = d_in // 2 if aux_k is None else aux_k
    return min(k_aux, num_dead), topk_aux_scale(num_dead, k_aux, style)


def topk_aux_reduce(recons: Tensor, residual: Tensor, style: str) -> Tensor:
    if style == "sae_lens":
        return squared_error(recons, residual)
    # dictionary_learning (from OpenAI): in fp32, normalised by the residual's variance.
    r = residual.float()
    l2 = (r - recons.float()).pow(2).sum(-1).mean()
    denom = (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return (l2 / denom).nan_to_num(0.0)


def topk_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_enc: Tensor,
                  k: float, *, batch: bool = False, rescale_acts_by_decoder_norm: bool = False,
                  dead_neuron_mask: Optional[Tensor] = None, aux_loss_coefficient: float = 1.0,
                  aux_k: Optional[int] = None, aux_style: str = "sae_lens") -> TopKLoss:
    """The TopK / BatchTopK training loss, dense: ``mse + aux_loss_coefficient * AuxK`` (the
    options of gsae_fast.topk.topk_sae_loss, which checks ``k`` and ``aux_k``)."""
    d_in, d_sae = W_enc.shape
    check_topk_loss_options(dead_neuron_mask, d_sae, aux_style)
    x2 = x.reshape(-1, d_in)
    norm = W_dec.norm(dim=1) if rescale_acts_by_decoder_norm else None
    f, hidden_pre = dense_topk(x2, W_enc, b_dec, b_enc, k, batch=batch, decoder_norm=norm)
    x_hat = (f if norm is None else f / norm) @ W_dec + b_dec
    l0 = (f > 0).sum(-1).float().mean()
    mse = squared_error(x_hat, x2)
    aux = mse.new_zeros(())
    num_dead = 0 if dead_neuron_mask is None else int(dead_neuron_mask.sum())
    if num_dead and aux_loss_coefficient:
        k_aux, scale = topk_aux_budget(num_dead, d_in, aux_k, aux_style)
        residual = (x2 - x_hat).detach()
        pre = hidden_pre.relu() if aux_style == "dictionary_learning" else hidden_pre
        top = torch.where(dead_neuron_mask, pre, -torch.inf).topk(k_aux, sorted=False)
        a = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        recons = (a if norm is None else a / norm) @ W_dec
        aux = aux_loss_coefficient * scale * topk_aux_reduce(recons, residual, aux_style)
    return TopKLoss(loss=mse + aux, mse=mse, aux=aux, l0=l0, x_hat=x_hat.view(x.shape), f=f)
