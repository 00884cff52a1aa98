"""TopK and BatchTopK SAEs on the sparse kernels.

A TopK SAE keeps, per token, the ``k`` largest pre-activations ``pre = (x - b_dec) @ W_enc +
b_enc`` and applies ReLU (SAELens ``TopKSAE``, dictionary_learning ``AutoEncoderTopK``); a
BatchTopK SAE keeps the ``k * tokens`` largest ReLU'd pre-activations of the whole batch
(SAELens ``BatchTopKTrainingSAE``, dictionary_learning ``BatchTopKSAE``). With
``rescale_acts_by_decoder_norm`` (SAELens) the selection and the activations use
``pre * |W_dec[i]|`` and the decoder divides by ``|W_dec[i]|`` again.

How it runs without a ``[tokens, d_sae]`` tensor surviving the call:

- **selection** (no autograd): the encoder GEMM over row chunks of at most ``ROW_BUDGET``
  elements, each followed by ``torch.topk`` (BatchTopK: a running top-``k * tokens`` merged across
  chunks); the winners are packed into the padded-row format of :class:`SparseActs`, feature
  indices increasing. Slots whose activation is 0 are dropped (they add nothing to the decode,
  and ReLU passes them no gradient), so a row may hold fewer than ``k``.
- **values** (autograd): the selected pre-activations, whose backward is the Gated encoder's
  sparse backward op (``gsae_fast::gated_encode_backward`` with the gate gradient = d pre): grad
  ``W_enc``, ``b_enc``, ``b_dec`` and ``x`` from the ``[tokens, k]`` slots alone.
- decode and its backward: the sparse decode op, as for the Gated SAE.

Caveats: BatchTopK rows are padded to the largest row count of the batch, so one outlier token
holding many of the batch's ``k * tokens`` slots widens every row (the memory is then
``tokens x that count``, at worst ``tokens x d_sae``); and exact ties at the cut-off (likely in
bf16) are broken by ``torch.topk``, so which of the tied features is kept may depend on the
chunking (as it does on the device for SAELens).

The selection GEMM runs in the parameters' dtype (as SAELens computes ``hidden_pre``); the
selected values are in the accumulation dtype (fp32, fp64 for fp64).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops
from .types import SparseActs, acc_dtype

# Largest [rows, d_sae] pre-activation chunk of the selection (elements): 64 MiB in fp32.
ROW_BUDGET = 1 << 24
AUX_STYLES = ("sae_lens", "dictionary_learning")


# --------------------------------------------------------------------------------- selection

def _pack(rows: Tensor, feats: Tensor, pre: Tensor, n_rows: int, d_sae: int):
    """Entries (row, feature, value) -> padded rows: idx int32 [n_rows, K] increasing, counts."""
    order = torch.argsort(rows * d_sae + feats)
    rows, feats, pre = rows[order], feats[order], pre[order]
    counts = torch.bincount(rows, minlength=n_rows)
    K = int(counts.max()) if n_rows and rows.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    idx = torch.zeros(n_rows, K, dtype=torch.int32, device=rows.device)
    val = torch.zeros(n_rows, K, dtype=pre.dtype, device=rows.device)
    idx[rows, slot] = feats.to(torch.int32)
    val[rows, slot] = pre
    return idx, counts.to(torch.int32), val


@torch.no_grad()
def select(x2: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor, k: float, *,
           batch: bool = False, scale: Optional[Tensor] = None, cols: Optional[Tensor] = None,
           positive: bool = True):
    """The top-k slots of ``x2 [B, d_in]``: (idx int32 [B, K], counts int32 [B], pre [B, K]).

    Ranks ``score = pre * scale`` (``scale``: decoder norms, or None) over the features ``cols``
    (all when None): per row (``k`` per token) or over the batch (``batch``: ``int(k * B)`` in
    all, ranking ``relu(score)``). ``positive`` drops slots with ``score <= 0``. ``pre`` holds the
    unscaled pre-activations of the slots, in the accumulation dtype.
    """
    B, d_sae = x2.shape[0], W_enc.shape[1]
    W, b, s = W_enc, b_enc, scale
    if cols is not None:
        W, b = W_enc[:, cols], b_enc[cols]
        s = None if scale is None else scale[cols]
    width, acc = W.shape[1], acc_dtype(x2.dtype)
    step = max(1, ROW_BUDGET // max(1, width))
    kk = min(int(k), width) if not batch else None
    m = int(k * B) if batch else None
    rows_l, feats_l, pre_l, score_l = [], [], [], []
    for r in range(0, B, step):
        pre = (x2[r:r + step] - b_dec) @ W + b
        score = pre if s is None else pre * s
        if batch:
            flat = score.relu().flatten()
            top, j = flat.topk(min(m, flat.numel()), sorted=False)
            rows_l.append(j // width + r)
            feats_l.append(j % width)
            pre_l.append(pre.flatten()[j])
            score_l.append(top)
            if sum(t.numel() for t in score_l) > m:  # keep the running top-m only
                keep = torch.cat(score_l).topk(m, sorted=False).indices
                rows_l, feats_l, pre_l, score_l = ([torch.cat(t)[keep]] for t in
                                                   (rows_l, feats_l, pre_l, score_l))
        else:
            top, j = score.topk(kk, dim=-1, sorted=False)
            rows_l.append(torch.arange(r, r + pre.shape[0], device=x2.device)
                          .repeat_interleave(kk))
            feats_l.append(j.flatten())
            pre_l.append(pre.gather(1, j).flatten())
            score_l.append(top.flatten())
    if not rows_l:
        empty = torch.zeros(0, dtype=torch.long, device=x2.device)
        rows_l, feats_l, pre_l, score_l = [empty], [empty], [empty.to(acc)], [empty.to(acc)]
    rows, feats, pre, score = (torch.cat(t) for t in (rows_l, feats_l, pre_l, score_l))
    if not bool(torch.isfinite(pre).all() and torch.isfinite(score).all()):
        raise ValueError("gsae_fast.topk: the pre-activations contain NaN or Inf: x, the "
                         "encoder parameters (W_enc, b_enc, b_dec) or the decoder norms hold "
                         "NaN/Inf values")
    if positive:
        keep = score > 0
        rows, feats, pre = rows[keep], feats[keep], pre[keep]
    if cols is not None:
        feats = cols[feats]
    return _pack(rows, feats.long(), pre.to(acc), B, d_sae)


class _SlotPre(torch.autograd.Function):
    """The selected pre-activations, differentiable in x, W_enc, b_dec and b_enc: the backward
    is the Gated encoder's sparse backward with the gate gradient = d pre (b_gate = b_enc,
    no magnitude path)."""

    @staticmethod
    def forward(ctx, x2, W_enc, b_dec, b_enc, idx, counts, pre, backend):
        ctx.save_for_backward(x2, W_enc, b_dec, b_enc, idx, counts, pre)
        ctx.backend = backend
        return pre.clone()

    @staticmethod
    def backward(ctx, grad):
        x2, W_enc, b_dec, b_enc, idx, counts, pre = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        zero = torch.zeros_like(b_enc)
        dx, dW, db_dec, db_enc, _, _ = ops._encode_backward_op(
            x2, W_enc, b_dec, b_enc, zero, zero, idx, pre, pre, counts, torch.zeros_like(pre),
            grad.contiguous(), need_x, ctx.backend)
        return dx if need_x else None, dW, db_dec, db_enc, None, None, None, None


def _check_k(k: float, batch: bool, op: str, d_sae: Optional[int] = None) -> None:
    if not k > 0 or (not batch and int(k) != k):
        raise ValueError(f"{op}: k must be a positive {'number' if batch else 'integer'}, "
                         f"got {k!r}")
    if d_sae is not None and k > d_sae:
        raise ValueError(f"{op}: k={k} is larger than d_sae={d_sae}")


def topk_encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor, k: float, *,
                batch: bool = False, decoder_norm: Optional[Tensor] = None,
                backend: str = "auto") -> SparseActs:
    """TopK (``batch=False``: ``k`` per token) or BatchTopK (``k * tokens`` in the batch) encode
    of ``x [..., d_in]`` to :class:`SparseActs`, differentiable.

    ``f`` holds the activations ``relu(pre * decoder_norm)`` (``decoder_norm``: SAELens'
    ``rescale_acts_by_decoder_norm``, differentiable; None: ``relu(pre)``); ``pi_gate`` holds the
    same values (there is no gate). ``backend`` is an executor name (not ``"reference"``'s
    dense math: that is :func:`dense_topk`).
    """
    op = "gsae_fast.topk_encode"
    ops._check_encoder(op, x, W_enc, b_dec, b_enc=b_enc)
    _check_k(k, batch, op, W_enc.shape[1])
    be = backends.resolve(backend, x.device)
    d_in, d_sae = W_enc.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).contiguous()
    params = [p.contiguous() for p in (W_enc, b_dec, b_enc)]
    scale = None if decoder_norm is None else decoder_norm.detach().to(W_enc.dtype)
    idx, counts, pre = select(x2, *params, k, batch=batch, scale=scale)
    f = _SlotPre.apply(x2, *params, idx, counts, pre, be)
    if decoder_norm is not None:
        f = f * decoder_norm.to(f.dtype)[idx.long()]
    K = idx.shape[1]
    return SparseActs(idx=idx.view(*lead, K), f=f.view(*lead, K), pi_gate=f.view(*lead, K),
                      counts=counts.view(lead), d_sae=d_sae, max_count=K)


def decode_values(acts: SparseActs, decoder_norm: Optional[Tensor]) -> SparseActs:
    """The activations the decoder multiplies: ``f / decoder_norm`` under SAELens'
    ``rescale_acts_by_decoder_norm`` (0 on padding slots), else ``f``."""
    if decoder_norm is None:
        return acts
    v = acts.f / decoder_norm.to(acts.f.dtype)[acts.idx.long()]
    v = torch.where(acts.mask(), v, torch.zeros((), dtype=v.dtype, device=v.device))
    return replace(acts, f=v, pi_gate=v)


# ----------------------------------------------------------------------- the dense reference

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


# ------------------------------------------------------------------------------------- loss

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


def _aux_scale(num_dead: int, k_aux: int, style: str) -> float:
    # SAELens scales the loss down when few latents are dead; dictionary_learning does not.
    return min(num_dead / k_aux, 1.0) if style == "sae_lens" else 1.0


def _aux_reduce(recons: Tensor, residual: Tensor, style: str) -> Tensor:
    if style == "sae_lens":
        return (recons - residual).pow(2).sum(-1).mean()
    # dictionary_learning (from OpenAI): in fp32, normalised by the residual's variance.
    r = residual.float()
    l2 = (r - recons.float()).pow(2).sum(-1).mean()
    denom = (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return (l2 / denom).nan_to_num(0.0)


def check_loss_options(dead_neuron_mask, d_sae: int, aux_style: str) -> None:
    if aux_style not in AUX_STYLES:
        raise ValueError(f"aux_style must be one of {AUX_STYLES}, got {aux_style!r}")
    if dead_neuron_mask is not None and (dead_neuron_mask.dtype != torch.bool or
                                         tuple(dead_neuron_mask.shape) != (d_sae,)):
        raise ValueError(f"dead_neuron_mask must be a bool tensor of shape [{d_sae}], got "
                         f"{dead_neuron_mask.dtype} {list(dead_neuron_mask.shape)}")


def topk_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_enc: Tensor,
                  k: float, *, batch: bool = False, rescale_acts_by_decoder_norm: bool = False,
                  dead_neuron_mask: Optional[Tensor] = None, aux_loss_coefficient: float = 1.0,
                  aux_k: Optional[int] = None, aux_style: str = "sae_lens",
                  backend: str = "auto") -> TopKLoss:
    """The TopK / BatchTopK training loss: ``mse + aux_loss_coefficient * AuxK``.

    AuxK (Gao et al. 2024, Appendix A.2): the ``aux_k`` (default ``d_in // 2``) largest
    pre-activations among the dead features (``dead_neuron_mask``) reconstruct the detached
    residual ``x - x_hat`` through the decoder without bias. ``aux_style="sae_lens"``
    (``TopKTrainingSAE.calculate_topk_aux_loss``: raw pre-activations, scaled by
    ``min(num_dead / aux_k, 1)``) or ``"dictionary_learning"`` (``TopKTrainer``: ReLU'd, in fp32,
    divided by the residual's variance; pass ``aux_loss_coefficient=auxk_alpha``).
    ``backend="reference"`` runs SAELens' dense math.
    """
    op = "gsae_fast.topk_sae_loss"
    ops._check_encoder(op, x, W_enc, b_dec, b_enc=b_enc)
    _check_k(k, batch, op, W_enc.shape[1])
    d_in, d_sae = W_enc.shape
    check_loss_options(dead_neuron_mask, d_sae, aux_style)
    if aux_k is not None and (int(aux_k) != aux_k or aux_k <= 0):
        raise ValueError(f"{op}: aux_k must be a positive integer, got {aux_k!r}")
    ops._check_same(dict(x=x, W_dec=W_dec), op)
    ops._check_shape(W_dec, (d_sae, d_in), "W_dec", op)
    if x.shape[:-1].numel() == 0:
        raise ValueError(f"{op}: x has no tokens (the loss is a mean over tokens)")
    x2 = x.reshape(-1, d_in)
    norm = W_dec.norm(dim=1) if rescale_acts_by_decoder_norm else None
    be = backends.resolve(backend, x.device)
    acts = f = None
    if be == "reference":
        f, hidden_pre = dense_topk(x2, W_enc, b_dec, b_enc, k, batch=batch, decoder_norm=norm)
        x_hat = (f if norm is None else f / norm) @ W_dec + b_dec
        l0 = (f > 0).sum(-1).float().mean()
    else:
        acts = topk_encode(x2, W_enc, b_dec, b_enc, k, batch=batch, decoder_norm=norm,
                           backend=be)
        x_hat = ops.sparse_decode(decode_values(acts, norm), W_dec, b_dec, backend=be)
        l0 = acts.l0()
    mse = (x_hat - x2).pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    num_dead = 0 if dead_neuron_mask is None else int(dead_neuron_mask.sum())
    if num_dead and aux_loss_coefficient:
        k_aux = d_in // 2 if aux_k is None else aux_k
        scale = _aux_scale(num_dead, k_aux, aux_style)
        k_aux = min(k_aux, num_dead)
        residual = (x2 - x_hat).detach()
        positive = aux_style == "dictionary_learning"
        if be == "reference":
            pre = hidden_pre.relu() if positive else hidden_pre
            top = torch.where(dead_neuron_mask, pre, -torch.inf).topk(k_aux, sorted=False)
            a = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            recons = (a if norm is None else a / norm) @ W_dec
        else:
            # The dead columns only: a GEMM of [tokens, num_dead], then [tokens, k_aux] slots.
            # Their values are the pre-activations (pre * norm / norm under rescaling).
            params = [p.contiguous() for p in (W_enc, b_dec, b_enc)]
            x2c = x2.contiguous()
            idx, counts, pre = select(x2c, *params, k_aux, positive=positive,
                                      scale=None if norm is None else norm.detach().to(W_enc.dtype),
                                      cols=dead_neuron_mask.nonzero().squeeze(1))
            v = _SlotPre.apply(x2c, *params, idx, counts, pre, be)
            recons = ops.sparse_decode(SparseActs(idx, v, v, counts, d_sae), W_dec, None,
                                       backend=be)
        aux = aux_loss_coefficient * scale * _aux_reduce(recons, residual, aux_style)
    return TopKLoss(loss=mse + aux, mse=mse, aux=aux, l0=l0, x_hat=x_hat.view(x.shape),
                    acts=acts, f=f)
