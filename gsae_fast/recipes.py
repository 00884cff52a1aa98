"""How each SAE architecture trains: what :class:`gsae_fast.train.Trainer` asks of it.

A :class:`Recipe` builds the architecture's module from a :class:`~gsae_fast.train_config.
TrainConfig`, computes a batch's loss on the compute-dtype copies of the parameters (the
kernels of gsae_fast.ops / .jumprelu / .topk, never a ``[tokens, d_sae]`` tensor), says which
features fired, and does what follows an applied update (BatchTopK's threshold). Everything the
architectures share (the optimiser, the schedules, the decoder constraint, gradient clipping,
dead-feature counts, the checks and the checkpoints) stays in the Trainer.

The logged parts of the loss are ``mse``, ``sparsity`` (Gated: the L1 term; JumpReLU: the L0
term; TopK: 0) and ``aux`` (Gated: the auxiliary reconstruction; JumpReLU: the pre-activation
loss; TopK / BatchTopK: AuxK), each with its coefficient, ``loss`` their sum.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import distributed, ops
from .saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, TopKSAE
from .saes.jumprelu import jumprelu_sae_loss
from .saes.topk import topk_sae_loss


class StepLoss(NamedTuple):
    """A batch's loss (differentiable) and what the Trainer logs and counts from it."""
    loss: Tensor
    parts: list           # [mse, sparsity, aux, l0] as tensors (no gradient needed)
    acts: object          # SparseActs of the batch (None: the dense path ran)
    max_count: Optional[int]
    out: object           # the architecture's own loss record


class Recipe:
    """The Gated SAE (the paper; dictionary_learning's GatedSAETrainer)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def decoder_init_norm(self) -> float:
        return 1.0 if self.cfg.decoder == "unit_norm" else 0.1

    def build(self, d_in: int, device, features=None):
        cfg = self.cfg
        if features is not None:  # parallel="feature": this rank's slice
            return distributed.init_shard(d_in, cfg.d_sae, features, device=device,
                                          backend=cfg.backend,
                                          decoder_init_norm=self.decoder_init_norm())
        return GatedSAE(d_in, cfg.d_sae, device=device, backend=cfg.backend,
                        decoder_init_norm=self.decoder_init_norm())

    def loss(self, trainer, x: Tensor, coef: float, dead: Tensor) -> StepLoss:
        cfg, sae = self.cfg, trainer.sae
        params = trainer.in_compute_dtype(sae.W_enc, sae.W_dec, sae.b_dec, sae.b_gate,
                                          sae.r_mag, sae.b_mag)
        sparsity = "unit" if cfg.decoder == "unit_norm" else "decoder_norm"
        (x,) = trainer.in_compute_dtype(x)
        if cfg.parallel == "feature":
            # The dense/sparse choice as a single process makes it (global capacity, d_sae):
            # the dead-feature counts depend on it.
            out, local_max = distributed.feature_sharded_loss(
                x, *params, coef, sparsity=sparsity, aux=cfg.aux, backend=sae._backend_for(x),
                capacity=trainer.local_capacity,
                dense=ops.dense_is_faster(trainer.capacity, cfg.d_sae, x.device, params[0].dtype))
            trainer.local_capacity = ops.next_capacity(local_max, sae.d_sae)
        else:
            out = ops.gated_sae_loss(x, *params, coef, sparsity=sparsity, aux=cfg.aux,
                                     backend=sae._backend_for(x), capacity=trainer.capacity)
        return StepLoss(out.loss, [out.mse, out.sparsity, out.aux, out.l0], out.acts,
                        out.max_count, out)

    def fired_in(self, acts) -> Tensor:
        """The firing slots of ``acts`` (Gated: the open gates, as its L0 counts them)."""
        return acts.mask()

    @torch.no_grad()
    def fired(self, trainer, x: Tensor, step: StepLoss) -> Tensor:
        """Which of this rank's features fired on ``x`` (bool ``[sae.d_sae]``)."""
        sae, acts = trainer.sae, step.acts
        dense = getattr(step.out, "f", None)
        if acts is None and dense is not None:  # the dense path, with its activations
            return (dense.reshape(-1, dense.shape[-1]) > 0).any(0)
        if acts is None:  # the dense path ran (L0 near d_sae): find the firing features
            acts = ops.gated_encode(*trainer.in_compute_dtype(x, *sae.encoder_params()),
                                    backend=sae._backend_for(x))
        slots = self.fired_in(acts)
        return torch.bincount(acts.idx[slots].long(), minlength=sae.d_sae) > 0

    def extra_parameters(self, sae, dtype) -> list:
        """(name, tensor) beside the parameters whose finiteness the kernels need."""
        return [("exp(r_mag)", torch.exp(sae.r_mag.detach().to(dtype)))]

    def after_update(self, trainer, step: StepLoss) -> None:
        """What follows an applied update (nothing for most architectures)."""


class JumpReLURecipe(Recipe):
    """SAELens' JumpReLUTrainingSAE (step / tanh / quadratic sparsity with the rectangle
    straight-through estimators; Anthropic's pre-activation loss as an option)."""

    def build(self, d_in: int, device, features=None):
        cfg = self.cfg
        return JumpReLUSAE(d_in, cfg.d_sae, device=device, backend=cfg.backend,
                           decoder_init_norm=self.decoder_init_norm(),
                           init_threshold=cfg.jumprelu_init_threshold)

    def loss(self, trainer, x: Tensor, coef: float, dead: Tensor) -> StepLoss:
        cfg, sae = self.cfg, trainer.sae
        with torch.no_grad():  # SAELens clamps the threshold at 0 before each forward pass
            sae.threshold.clamp_(min=0.0)
        x, W_enc, W_dec, b_dec, b_enc = trainer.in_compute_dtype(x, sae.W_enc, sae.W_dec,
                                                                 sae.b_dec, sae.b_enc)
        out = jumprelu_sae_loss(
            x, W_enc, W_dec, b_dec, b_enc, sae.threshold, coef,
            bandwidth=cfg.jumprelu_bandwidth, sparsity_mode=cfg.jumprelu_sparsity_loss_mode,
            tanh_scale=cfg.jumprelu_tanh_scale, target_l0=cfg.target_l0,
            ste_to_input=cfg.jumprelu_ste_to_input,
            pre_act_loss_coefficient=cfg.pre_act_loss_coefficient, dead_neuron_mask=dead,
            backend=sae._backend_for(x), capacity=trainer.capacity)
        return StepLoss(out.loss, [out.mse, out.l0_loss, out.pre_act_loss, out.l0], out.acts,
                        out.max_count, out)

    def fired_in(self, acts) -> Tensor:
        return acts.mask() & (acts.f > 0)  # the band's slots below the threshold hold 0

    def extra_parameters(self, sae, dtype) -> list:
        return []


class TopKRecipe(Recipe):
    """SAELens' TopKTrainingSAE / BatchTopKTrainingSAE (AuxK over the dead features, the
    selection scaled by the decoder norms unless ``rescale_acts_by_decoder_norm`` is off;
    BatchTopK keeps its inference threshold as a moving average of the smallest activation)."""

    def build(self, d_in: int, device, features=None):
        cfg = self.cfg
        kw = dict(rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm, device=device,
                  backend=cfg.backend, decoder_init_norm=self.decoder_init_norm())
        if cfg.arch == "batchtopk":
            return BatchTopKSAE(d_in, cfg.d_sae, cfg.k, topk_threshold_lr=cfg.topk_threshold_lr,
                                **kw)
        return TopKSAE(d_in, cfg.d_sae, int(cfg.k), **kw)

    def loss(self, trainer, x: Tensor, coef: float, dead: Tensor) -> StepLoss:
        cfg, sae = self.cfg, trainer.sae
        x, W_enc, W_dec, b_dec, b_enc = trainer.in_compute_dtype(x, sae.W_enc, sae.W_dec,
                                                                 sae.b_dec, sae.b_enc)
        out = topk_sae_loss(x, W_enc, W_dec, b_dec, b_enc, sae.k, batch=sae.BATCH,
                            rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm,
                            dead_neuron_mask=dead, aux_loss_coefficient=cfg.aux_loss_coefficient,
                            aux_k=cfg.aux_k, backend=sae._backend_for(x))
        sparsity = out.mse.new_zeros(())
        return StepLoss(out.loss, [out.mse, sparsity, out.aux, out.l0], out.acts,
                        None if out.acts is None else out.acts.max_count, out)

    def fired_in(self, acts) -> Tensor:
        return acts.mask() & (acts.f > 0)

    def extra_parameters(self, sae, dtype) -> list:
        return []

    def after_update(self, trainer, step: StepLoss) -> None:
        sae = trainer.sae
        if not isinstance(sae, BatchTopKSAE):
            return
        low = step.out.min_positive()
        if self.cfg.parallel == "data":  # one threshold on every rank: the global minimum
            v = torch.tensor([float("inf") if low is None else float(low)],
                             dtype=torch.float64, device=trainer.device)
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MIN)
            low = None if v.item() == float("inf") else v[0]
        sae.move_threshold(low)


def recipe(cfg) -> Recipe:
    """The recipe of ``cfg.arch``."""
    return {"gated": Recipe, "jumprelu": JumpReLURecipe, "topk": TopKRecipe,
            "batchtopk": TopKRecipe}[cfg.arch](cfg)
