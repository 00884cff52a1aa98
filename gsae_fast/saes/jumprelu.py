"""JumpReLU SAEs on the Gated kernels: :class:`JumpReLUSAE`, its loss
(:func:`jumprelu_sae_loss`) and its formats in SAELens and dictionary_learning
(:data:`JUMPRELU`).

A JumpReLU SAE computes ``pre = (x - b_dec) @ W_enc + b_enc`` and
``f = relu(pre) * 1[pre > threshold]``. A Gated SAE with ``r_mag = 0``, ``b_mag = b_enc`` and
``b_gate = b_enc - threshold`` computes exactly that (the paper's equivalence), so the fused
gated encode, the sparse decode and their backward serve JumpReLU SAEs unchanged.

Training follows SAELens' ``JumpReLUTrainingSAE`` (DeepMind's straight-through estimators with a
rectangle kernel of width ``bandwidth``; Anthropic's tanh sparsity and pre-activation loss as
options). The estimators need the pre-activations within ``bandwidth / 2`` of the threshold,
below it too, so the training encode lowers the gate by ``bandwidth / 2`` and rebuilds ``pre`` on
the emitted slots from ``pi_gate``: everything stays ``[tokens, K]``, never ``[tokens, d_sae]``.
The dense math (and the estimators, shared with the sparse path) is gsae_fast.reference's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import backends, ops, reference
from ..reference import JUMPRELU_SPARSITY_MODES as SPARSITY_MODES  # noqa: F401
from ..reference import JumpReLUFn, JumpReLULoss, StepFn
from ..reference import check_jumprelu_options as check_options
from ..types import SparseActs
from .base import Arch, SparseSAE
from .gated import GatedSAE


def as_gated(W_enc, b_dec, b_enc, threshold, band: float = 0.0):
    """The Gated SAE encoder parameters computing this JumpReLU encoder, with the gate lowered by
    ``band`` (differentiable in b_enc and threshold)."""
    return (W_enc, b_dec, b_enc - threshold + band, torch.zeros_like(b_enc), b_enc)


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
    if backends.resolve(backend, x.device) == "reference" or \
            ops.dense_is_faster(capacity, W_enc.shape[1], x.device, W_enc.dtype):
        # the reference, or so many slots (band included) that dense is faster
        return reference.jumprelu_sae_loss(
            x, W_enc, W_dec, b_dec, b_enc, threshold, l0_coefficient, bandwidth=bandwidth,
            sparsity_mode=sparsity_mode, tanh_scale=tanh_scale, target_l0=target_l0,
            ste_to_input=ste_to_input, pre_act_loss_coefficient=pre_act_loss_coefficient,
            dead_neuron_mask=dead_neuron_mask)
    threshold = threshold.to(b_enc.dtype)  # SAELens casts its fp32 threshold to the compute dtype
    x2 = x.reshape(-1, x.shape[-1])
    band = bandwidth / 2
    W_dec_norm = W_dec.norm(dim=1)
    pre_act = reference.jumprelu_pre_act_loss(x2, W_enc, b_dec, b_enc, threshold, W_dec_norm,
                                              pre_act_loss_coefficient, dead_neuron_mask)

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
    f = JumpReLUFn.apply(pre, th, bandwidth, ste_to_input)
    l0_rows = StepFn.apply(pre, th, bandwidth, ste_to_input).sum(-1)
    slots = SparseActs(acts.idx, f, acts.pi_gate, acts.counts, acts.d_sae, acts.max_count,
                       checked=acts.checked)
    x_hat = ops.sparse_decode(slots, W_dec, b_dec, backend=backend)
    sparsity = reference.jumprelu_sparsity(l0_rows, f * W_dec_norm.to(acc)[i], l0_coefficient,
                                           sparsity_mode, tanh_scale, target_l0)
    mse = reference.squared_error(x_hat, x2)
    l0 = (pre > th).sum(-1).float().mean()
    return JumpReLULoss(mse + sparsity + pre_act, mse, sparsity, pre_act, l0, x_hat.view(x.shape),
                        acts=slots, max_count=acts.max_count)


def threshold_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype a JumpReLU threshold is kept in beside weights of ``dtype``: fp32 for bf16 and
    fp16 (as SAELens: small Adam steps on an O(0.01-1) threshold would round away)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class JumpReLUSAE(SparseSAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024b) on the Gated kernels (gsae_fast.jumprelu):
    ``f = relu(pre) * 1[pre > threshold]``, ``pre = (x - b_dec) @ W_enc + b_enc``.

    SAELens' parameter names and shapes (``W_enc, W_dec, b_enc, b_dec, threshold``); training as
    SAELens' ``JumpReLUTrainingSAE`` (:meth:`loss`).
    """

    ARCH = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[torch.device, str]] = None, backend: str = "auto",
                 decoder_init_norm: Optional[float] = 0.1, init_threshold: float = 0.01):
        super().__init__(d_in, d_sae, dtype=dtype, device=device, backend=backend,
                         decoder_init_norm=decoder_init_norm)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        # fp32 beside bf16/fp16 weights, as SAELens: small Adam steps on an O(0.01-1) threshold
        # would round away in bf16. Cast to the compute dtype where it is used.
        self.threshold = nn.Parameter(torch.full((d_sae,), init_threshold, device=device,
                                                 dtype=threshold_dtype(dtype)))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to(dtype), .half(), ... reach the threshold
        t = self._parameters.get("threshold")
        if t is not None and t.dtype in (torch.bfloat16, torch.float16):
            t.data = t.data.float()
        return out

    def encoder_params(self) -> tuple[Tensor, ...]:
        return as_gated(self.W_enc, self.b_dec, self.b_enc, self.threshold.to(self.b_enc.dtype))

    def loss(self, x: Tensor, l0_coefficient: float, **options) -> JumpReLULoss:
        """SAELens' JumpReLU training loss (options of gsae_fast.jumprelu.jumprelu_sae_loss:
        bandwidth, sparsity_mode, tanh_scale, target_l0, ste_to_input,
        pre_act_loss_coefficient, dead_neuron_mask). Clamps the threshold at 0 first, in place,
        as SAELens does."""
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        out = jumprelu_sae_loss(
            x, self.W_enc, self.W_dec, self.b_dec, self.b_enc, self.threshold, l0_coefficient,
            backend=self._backend_for(x), capacity=self._capacity, **options)
        self._remember(out.max_count)
        return out

    def to_gated(self) -> GatedSAE:
        """The Gated SAE computing the same activations (r_mag = 0, b_mag = b_enc,
        b_gate = b_enc - threshold)."""
        with torch.no_grad():
            out = GatedSAE(self.d_in, self.d_sae, device="meta", decoder_init_norm=None)
            out.backend, out.sae_lens_metadata = self.backend, self.sae_lens_metadata
            for name, value in zip(("W_enc", "b_dec", "b_gate", "r_mag", "b_mag"),
                                   self.encoder_params()):
                setattr(out, name, nn.Parameter(value.clone()))
            out.W_dec = nn.Parameter(self.W_dec.clone())
        return out


# SAELens' JumpReLUSAE / JumpReLUTrainingSAE and dictionary_learning's JumpReluAutoEncoder.
JUMPRELU = Arch(
    name="jumprelu", cls=JumpReLUSAE,
    params=("W_enc", "W_dec", "b_dec", "b_enc", "threshold"),
    sae_lens=("sae_lens.saes.jumprelu_sae", "JumpReLUSAE", "JumpReLUSAEConfig",
              "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
    dl_class="JumpReluAutoEncoder",
    dl_keys={k: (k, False) for k in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold")})
