"""Evaluation metrics of an SAE on activations (streamed: accumulate batches, then summarise).

- ``l0``: mean number of active features per token.
- ``mse``: ``E_t |x - x_hat|^2`` (summed over dimensions, averaged over tokens), the training
  loss's reconstruction term; ``nmse = mse / E_t |x - E[x]|^2`` and
  ``fve = 1 - nmse`` (fraction of variance explained).
- ``relative_reconstruction_bias`` (the Gated SAE paper's gamma, section 5.1): defined as
  ``gamma = argmin_g E|x_hat / g - x|^2``; with ``u = 1/g`` the objective is a quadratic
  ``u^2 E|x_hat|^2 - 2u E[x_hat . x] + E|x|^2``, minimal at ``u = E[x_hat . x] / E|x_hat|^2``, so
  ``gamma = E[|x_hat|^2] / E[x_hat . x]`` (the form used here; the closed form printed as the
  paper's eq. 10 was publicly pointed out to be inverted; ``tests/test_train.py`` checks this
  one against a brute-force minimisation). ``x_hat = c x`` gives ``gamma = c``: gamma < 1 means
  shrinkage, 1 is unbiased.
- feature density (fraction of tokens on which each feature fires), ``dead_fraction`` (never
  fired in the evaluated tokens), ``dense_fraction`` (fires on more than ``DENSE`` of the tokens)
  and a histogram of ``log10(density)``.
- CE loss recovered (:func:`evaluate_ce_loss`): the model's next-token loss with the SAE's
  reconstruction spliced into a layer, against the clean loss and the loss with the layer
  zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .hooks import ce_loss, replace_output
from .types import SparseActs

DENSE = 0.1  # a feature firing on more than 10% of tokens counts as dense
HIST_BINS = [-8, -7, -6, -5, -4, -3, -2, -1, 0]  # log10 density bin edges (dead features apart)


def relative_reconstruction_bias(x_hat: Tensor, x: Tensor) -> float:
    """``gamma = E|x_hat|^2 / E[x_hat . x]`` over the tokens of ``x [..., d]``."""
    xh, xx = x_hat.double().reshape(-1, x.shape[-1]), x.double().reshape(-1, x.shape[-1])
    return float(xh.pow(2).sum() / (xh * xx).sum())


@dataclass
class MetricsAccumulator:
    """Sums over evaluated batches; :meth:`summary` gives the metrics."""

    d_sae: int
    n_tokens: int = 0
    sum_sq_err: float = 0.0
    sum_x: Optional[Tensor] = None
    sum_sq_x: float = 0.0
    sum_xhat_sq: float = 0.0
    sum_xhat_x: float = 0.0
    sum_l0: float = 0.0
    fired: Optional[Tensor] = field(default=None, repr=False)

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts) -> None:
        """One batch: inputs, reconstructions, and the activations (SparseActs or dense)."""
        x2 = x.detach().double().reshape(-1, x.shape[-1])
        xh = x_hat.detach().double().reshape(-1, x.shape[-1])
        self.n_tokens += x2.shape[0]
        self.sum_sq_err += float((x2 - xh).pow(2).sum())
        self.sum_x = x2.sum(0) if self.sum_x is None else self.sum_x + x2.sum(0)
        self.sum_sq_x += float(x2.pow(2).sum())
        self.sum_xhat_sq += float(xh.pow(2).sum())
        self.sum_xhat_x += float((xh * x2).sum())
        if self.fired is None:
            self.fired = torch.zeros(self.d_sae, dtype=torch.long, device=x.device)
        if isinstance(acts, SparseActs):
            mask = acts.mask()
            # Dropped zero-valued slots: a feature "fires" where its activation is positive.
            live = mask & (acts.f > 0)
            self.sum_l0 += float(live.sum())
            self.fired += torch.bincount(acts.idx[live].long(), minlength=self.d_sae)
        else:
            live = acts.detach().reshape(-1, self.d_sae) > 0
            self.sum_l0 += float(live.sum())
            self.fired += live.sum(0)

    def summary(self) -> dict:
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated")
        n = self.n_tokens
        mean = self.sum_x / n
        var = self.sum_sq_x / n - float(mean.pow(2).sum())  # E|x - E[x]|^2
        mse = self.sum_sq_err / n
        density = self.fired.double() / n
        live = density[density > 0]
        hist = torch.histc(live.log10(), bins=len(HIST_BINS) - 1, min=HIST_BINS[0],
                           max=HIST_BINS[-1]) if live.numel() else torch.zeros(len(HIST_BINS) - 1)
        return {
            "tokens": n,
            "l0": self.sum_l0 / n,
            "mse": mse,
            "nmse": mse / var if var > 0 else float("nan"),
            "fve": 1 - mse / var if var > 0 else float("nan"),
            "relative_reconstruction_bias": (self.sum_xhat_sq / self.sum_xhat_x
                                             if self.sum_xhat_x != 0 else float("nan")),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > DENSE).double().mean()),
            "density_histogram": {"log10_edges": HIST_BINS, "counts": [int(c) for c in hist],
                                  "dead": int((density == 0).sum())},
        }


@torch.no_grad()
def evaluate(sae, batches, *, max_tokens: Optional[int] = None) -> dict:
    """The metrics of ``sae`` (a gsae_fast SAE module) over an iterable of ``[tokens, d_in]``
    batches (up to ``max_tokens``)."""
    acc = MetricsAccumulator(sae.d_sae)
    for x in batches:
        x = x.to(sae.W_dec.device, sae.W_dec.dtype).reshape(-1, sae.d_in)
        if max_tokens is not None:
            x = x[:max_tokens - acc.n_tokens]
        acts = sae.encode_sparse(x)
        acc.add(x, sae.decode(acts), acts)
        if max_tokens is not None and acc.n_tokens >= max_tokens:
            break
    return acc.summary()


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """``(CE_zero_ablated - CE_with_SAE) / (CE_zero_ablated - CE_clean)``: 1 when splicing the
    SAE in costs nothing, 0 when it is as bad as zeroing the layer."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")


def evaluate_ce_loss(sae, model, layer: str, tokens: Tensor) -> dict:
    """The CE loss recovered by ``sae`` spliced into ``model`` at ``layer``.

    ``tokens``: ``[contexts, ctx]`` token ids (e.g. ``ModelActivations.token_contexts(n)``);
    ``layer``: a module name or ``resid:N`` / ``mlp:N`` / ``attn:N``
    (:func:`gsae_fast.hooks.resolve_hook`). Three next-token losses
    (:func:`gsae_fast.hooks.ce_loss`): clean, with the layer's output replaced by the SAE's
    reconstruction (computed in the SAE's dtype, cast back to the layer's), and with the output
    replaced by zeros. Position 0 of each context keeps its clean output in both replacements:
    the SAEs are trained without it (its activations are outliers), so replacing it would
    measure inputs the SAE never saw.

    Returns ``{"clean", "with_sae", "zero_ablated", "recovered", "contexts"}``, ``recovered``
    being :func:`ce_loss_recovered` of the three (meaningless unless ``zero_ablated > clean``).
    """
    def keep_first(fn):
        return lambda out: torch.cat([out[:, :1], fn(out[:, 1:])], dim=1)

    with torch.no_grad():
        clean = ce_loss(model, tokens)
        with replace_output(model, layer, keep_first(
                lambda h: sae(h.to(sae.W_dec.dtype)).to(h.dtype))):
            with_sae = ce_loss(model, tokens)
        with replace_output(model, layer, keep_first(torch.zeros_like)):
            zero = ce_loss(model, tokens)
    return {"clean": clean, "with_sae": with_sae, "zero_ablated": zero,
            "recovered": ce_loss_recovered(clean, with_sae, zero),
            "contexts": int(tokens.shape[0])}

