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
"""
from __future__ import annotations

import torch
from torch import Tensor

from .types import GatedLoss

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
    mse = (x_hat - x).pow(2).sum(-1).mean()
    g = torch.relu(pi_gate)
    if sparsity == "unit":
        sparsity_term = l1_coefficient * g.sum(-1).mean()
    else:
        sparsity_term = l1_coefficient * (g * W_dec.norm(dim=1)).sum(-1).mean()
    if aux == "none":
        aux_term = torch.zeros((), dtype=mse.dtype, device=mse.device)
    else:
        W, b = aux_decoder(W_dec, b_dec, aux)
        aux_term = (g @ W + b - x).pow(2).sum(-1).mean()
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
