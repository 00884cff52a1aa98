"""TopK and BatchTopK SAEs on the sparse kernels: :class:`TopKSAE`, :class:`BatchTopKSAE`, their
math (selection, encode, loss: :func:`topk_sae_loss`) and their formats in SAELens and
dictionary_learning (:data:`TOPK`, :data:`BATCHTOPK`). The dense math is gsae_fast.reference's
(:func:`dense_topk`, ``reference.topk_sae_loss``).

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
  sparse backward (``ops.gated_encode_backward`` with the gate gradient = d pre): grad
  ``W_enc``, ``b_enc``, ``b_dec`` and ``x`` from the ``[tokens, k]`` slots alone.
- decode and its backward: the sparse decode op, as for the Gated SAE.

Caveats: BatchTopK rows are padded to the largest row count of the batch, so one outlier token
holding many of the batch's ``k * tokens`` slots widens every row (the memory is then
``tokens x that count``, at worst ``tokens x d_sae``); and exact ties at the cut-off (likely in
bf16) are broken by ``torch.topk``, so which of the tied features is kept may depend on the
chunking (as it does on the device for SAELens).

The selection GEMM runs in the parameters' dtype (as SAELens computes ``hidden_pre``); the
selected values are in the accumulation dtype (fp32, fp64 for fp64).

gsae_fast.topk is this module (one module under both names, so that a setting such as
``ROW_BUDGET`` changed through either applies).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import backends, ops, reference
from ..reference import TOPK_AUX_STYLES as AUX_STYLES  # noqa: F401
from ..reference import TopKLoss, dense_topk, topk_aux_reduce
from ..reference import check_topk_loss_options as check_loss_options
from ..types import SparseActs, acc_dtype
from .base import Arch, SparseSAE
from .jumprelu import JumpReLUSAE, threshold_dtype

# Largest [rows, d_sae] pre-activation chunk of the selection (elements): 64 MiB in fp32.
ROW_BUDGET = 1 << 24


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
        dx, dW, db_dec, db_enc, _, _ = ops.gated_encode_backward(
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
    ops.check_encoder(op, x, W_enc, b_dec, b_enc=b_enc)
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
                      counts=counts.view(lead), d_sae=d_sae, max_count=K, checked=True)


def decode_values(acts: SparseActs, decoder_norm: Optional[Tensor]) -> SparseActs:
    """The activations the decoder multiplies: ``f / decoder_norm`` under SAELens'
    ``rescale_acts_by_decoder_norm`` (0 on padding slots), else ``f``."""
    if decoder_norm is None:
        return acts
    v = acts.f / decoder_norm.to(acts.f.dtype)[acts.idx.long()]
    v = torch.where(acts.mask(), v, torch.zeros((), dtype=v.dtype, device=v.device))
    return replace(acts, f=v, pi_gate=v)


# ------------------------------------------------------------------------------------- loss

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
    ``backend="reference"`` runs SAELens' dense math (``reference.topk_sae_loss``).
    """
    op = "gsae_fast.topk_sae_loss"
    ops.check_encoder(op, x, W_enc, b_dec, b_enc=b_enc)
    _check_k(k, batch, op, W_enc.shape[1])
    d_in, d_sae = W_enc.shape
    check_loss_options(dead_neuron_mask, d_sae, aux_style)
    if aux_k is not None and (int(aux_k) != aux_k or aux_k <= 0):
        raise ValueError(f"{op}: aux_k must be a positive integer, got {aux_k!r}")
    ops.check_same(dict(x=x, W_dec=W_dec), op)
    ops.check_shape(W_dec, (d_sae, d_in), "W_dec", op)
    if x.shape[:-1].numel() == 0:
        raise ValueError(f"{op}: x has no tokens (the loss is a mean over tokens)")
    be = backends.resolve(backend, x.device)
    if be == "reference":
        return reference.topk_sae_loss(
            x, W_enc, W_dec, b_dec, b_enc, k, batch=batch,
            rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm,
            dead_neuron_mask=dead_neuron_mask, aux_loss_coefficient=aux_loss_coefficient,
            aux_k=aux_k, aux_style=aux_style)
    x2 = x.reshape(-1, d_in)
    norm = W_dec.norm(dim=1) if rescale_acts_by_decoder_norm else None
    acts = topk_encode(x2, W_enc, b_dec, b_enc, k, batch=batch, decoder_norm=norm, backend=be)
    x_hat = ops.sparse_decode(decode_values(acts, norm), W_dec, b_dec, backend=be)
    l0 = acts.l0()
    mse = reference.squared_error(x_hat, x2)
    aux = mse.new_zeros(())
    num_dead = 0 if dead_neuron_mask is None else int(dead_neuron_mask.sum())
    if num_dead and aux_loss_coefficient:
        k_aux, scale = reference.topk_aux_budget(num_dead, d_in, aux_k, aux_style)
        residual = (x2 - x_hat).detach()
        positive = aux_style == "dictionary_learning"
        # The dead columns only: a GEMM of [tokens, num_dead], then [tokens, k_aux] slots.
        # Their values are the pre-activations (pre * norm / norm under rescaling).
        params = [p.contiguous() for p in (W_enc, b_dec, b_enc)]
        x2c = x2.contiguous()
        idx, counts, pre = select(x2c, *params, k_aux, positive=positive,
                                  scale=None if norm is None else norm.detach().to(W_enc.dtype),
                                  cols=dead_neuron_mask.nonzero().squeeze(1))
        v = _SlotPre.apply(x2c, *params, idx, counts, pre, be)
        recons = ops.sparse_decode(SparseActs(idx, v, v, counts, d_sae, checked=True), W_dec, None,
                                   backend=be)
        aux = aux_loss_coefficient * scale * topk_aux_reduce(recons, residual, aux_style)
    return TopKLoss(loss=mse + aux, mse=mse, aux=aux, l0=l0, x_hat=x_hat.view(x.shape),
                    acts=acts)


class TopKSAE(SparseSAE):
    """TopK SAE (Gao et al. 2024) on the sparse kernels (gsae_fast.topk): per token the ``k``
    largest ``pre = (x - b_dec) @ W_enc + b_enc``, ReLU'd.

    SAELens' parameters (``W_enc, W_dec, b_enc, b_dec``) and options: with
    ``rescale_acts_by_decoder_norm`` the selection and the activations use
    ``pre * |W_dec[i]|`` and the decoder divides it out again (SAELens' training default; its
    inference default, and dictionary_learning's ``AutoEncoderTopK``, have it off).
    ``dl_threshold``: dictionary_learning's learned inference threshold (``use_threshold=True``),
    carried through its converters, unused here.
    """

    ARCH = "topk"
    BATCH = False

    def __init__(self, d_in: int, d_sae: int, k: float = 100, *,
                 rescale_acts_by_decoder_norm: bool = False,
                 dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[torch.device, str]] = None, backend: str = "auto",
                 decoder_init_norm: Optional[float] = 0.1):
        super().__init__(d_in, d_sae, dtype=dtype, device=device, backend=backend,
                         decoder_init_norm=decoder_init_norm)
        _check_k(k, self.BATCH, type(self).__name__, d_sae)
        self.k = k
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.dl_threshold: Optional[float] = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, k={self.k}, "
                f"rescale_acts_by_decoder_norm={self.rescale_acts_by_decoder_norm}")

    def _decoder_norm(self) -> Optional[Tensor]:
        return self.W_dec.norm(dim=1) if self.rescale_acts_by_decoder_norm else None

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """The top-k activations of ``x [..., d_in]`` (``f``; ``pi_gate`` holds the same)."""
        return topk_encode(x, self.W_enc, self.b_dec, self.b_enc, self.k,
                                batch=self.BATCH, decoder_norm=self._decoder_norm(),
                                backend=self._backend_for(x))

    def encode(self, x: Tensor) -> Tensor:
        if self._backend_for(x) == "reference":
            return dense_topk(x, self.W_enc, self.b_dec, self.b_enc, self.k,
                                   batch=self.BATCH, decoder_norm=self._decoder_norm())[0]
        return self.encode_sparse(x).to_dense(dtype=x.dtype)

    def decode(self, acts: Union[SparseActs, Tensor]) -> Tensor:
        norm = self._decoder_norm()
        if isinstance(acts, SparseActs):
            acts = decode_values(acts, norm)
        elif norm is not None:
            acts = acts / norm
        return super().decode(acts)

    def loss(self, x: Tensor, *, dead_neuron_mask: Optional[Tensor] = None,
             aux_loss_coefficient: float = 1.0, aux_k: Optional[int] = None,
             aux_style: str = "sae_lens") -> TopKLoss:
        """The training loss: ``mse + aux_loss_coefficient * AuxK`` over the dead features
        (see gsae_fast.topk.topk_sae_loss; SAELens' ``TopKTrainingSAE`` by default)."""
        return topk_sae_loss(x, self.W_enc, self.W_dec, self.b_dec, self.b_enc, self.k,
                                  batch=self.BATCH,
                                  rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
                                  dead_neuron_mask=dead_neuron_mask,
                                  aux_loss_coefficient=aux_loss_coefficient, aux_k=aux_k,
                                  aux_style=aux_style, backend=self._backend_for(x))


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): in training (:meth:`loss`,
    :meth:`encode_batch_topk`), the ``k * tokens`` largest activations of the whole batch
    (``k`` on average per token); in inference (``encode``, ``encode_sparse``, ``forward``), a
    JumpReLU with one learned threshold ``topk_threshold`` on the same activations: what
    dictionary_learning's ``BatchTopKSAE.encode`` does by default and what SAELens saves a
    ``BatchTopKTrainingSAE`` as (its own ``encode`` stays batch top-k). :meth:`loss` updates the
    threshold as SAELens' training forward pass does:
    ``t <- (1 - topk_threshold_lr) t + topk_threshold_lr * (smallest positive activation)``; a
    negative threshold (dictionary_learning's "not yet set") acts as 0 and is replaced by the
    first smallest activation, as dictionary_learning does.
    """

    ARCH = "batchtopk"
    BATCH = True

    def __init__(self, d_in: int, d_sae: int, k: float = 100, *, topk_threshold_lr: float = 0.01,
                 **kwargs):
        super().__init__(d_in, d_sae, k, **kwargs)
        self.topk_threshold_lr = topk_threshold_lr
        # fp64, as SAELens keeps it (the EMA of small steps), whatever the weights' dtype.
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64,
                                                           device=kwargs.get("device")))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.topk_threshold.dtype != torch.float64:  # .half() etc. keep the threshold fp64
            self.topk_threshold = self.topk_threshold.double()
        return out

    def encoder_params(self) -> tuple[Tensor, ...]:
        """The inference encoder as Gated parameters: gate ``pre * n > t`` and magnitude
        ``relu(pre * n)`` with ``n`` the decoder norms (1 without rescaling)."""
        t = self.topk_threshold.clamp(min=0).to(self.b_enc.dtype)
        if not self.rescale_acts_by_decoder_norm:
            return self.W_enc, self.b_dec, self.b_enc - t, torch.zeros_like(self.b_enc), self.b_enc
        n = self.W_dec.norm(dim=1)
        return self.W_enc, self.b_dec, self.b_enc - t / n, torch.log(n), self.b_enc * n

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Inference activations (the threshold JumpReLU) of ``x [..., d_in]``."""
        return SparseSAE.encode_sparse(self, x)

    def encode(self, x: Tensor) -> Tensor:
        return SparseSAE.encode(self, x)

    def encode_batch_topk(self, x: Tensor) -> SparseActs:
        """Training activations: the ``k * tokens`` largest of the batch."""
        return TopKSAE.encode_sparse(self, x)

    def loss(self, x: Tensor, **options) -> TopKLoss:
        out = super().loss(x, **options)
        self.update_threshold(out)
        return out

    def update_threshold(self, out: TopKLoss) -> None:
        self.move_threshold(out.min_positive())

    @torch.no_grad()
    def move_threshold(self, low: Optional[Tensor]) -> None:
        """One step of the threshold toward ``low``, a batch's smallest positive activation
        (None: nothing fired, the threshold stays)."""
        if low is None:
            return
        if self.topk_threshold < 0:  # not yet set (dictionary_learning's -1)
            self.topk_threshold.copy_(low.double())
        else:
            lr = self.topk_threshold_lr
            self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * low.double())

    def to_jumprelu(self) -> JumpReLUSAE:
        """The JumpReLU SAE of the inference encoder (how SAELens saves a BatchTopK SAE): the
        decoder norms folded in under rescaling, ``threshold = topk_threshold`` everywhere."""
        with torch.no_grad():
            out = JumpReLUSAE(self.d_in, self.d_sae, device="meta", decoder_init_norm=None)
            out.backend, out.sae_lens_metadata = self.backend, self.sae_lens_metadata
            n = self.W_dec.norm(dim=1) if self.rescale_acts_by_decoder_norm else \
                torch.ones_like(self.b_enc)
            out.W_enc = nn.Parameter(self.W_enc * n)
            out.b_enc = nn.Parameter(self.b_enc * n)
            out.W_dec = nn.Parameter(self.W_dec / n.unsqueeze(1))
            out.b_dec = nn.Parameter(self.b_dec.clone())
            t = self.topk_threshold.clamp(min=0)
            out.threshold = nn.Parameter(torch.full_like(self.b_enc, float(t),
                                                         dtype=threshold_dtype(self.b_enc.dtype)))
        return out


# SAELens' TopKSAE / TopKTrainingSAE and dictionary_learning's AutoEncoderTopK; BatchTopK:
# SAELens' BatchTopKTrainingSAE and dictionary_learning's BatchTopKSAE.
_TOPK_DL_KEYS = {"encoder.weight": ("W_enc", True), "decoder.weight": ("W_dec", True),
                 "encoder.bias": ("b_enc", False), "b_dec": ("b_dec", False)}
_TOPK_PARAMS = ("W_enc", "W_dec", "b_dec", "b_enc")

TOPK = Arch(
    name="topk", cls=TopKSAE, params=_TOPK_PARAMS,
    sae_lens=("sae_lens.saes.topk_sae", "TopKSAE", "TopKSAEConfig", "TopKTrainingSAE",
              "TopKTrainingSAEConfig"),
    dl_class="AutoEncoderTopK", dl_keys=_TOPK_DL_KEYS,
    hyper=("k", "rescale_acts_by_decoder_norm"),
    dl_module="dictionary_learning.trainers.top_k",
    dl_extra={"k": "k", "threshold": "dl_threshold"})

# SAELens has no inference class for it: a trained BatchTopK SAE is saved as a JumpReLU one.
BATCHTOPK = Arch(
    name="batchtopk", cls=BatchTopKSAE, params=_TOPK_PARAMS,
    sae_lens=("sae_lens.saes.batchtopk_sae", None, None, "BatchTopKTrainingSAE",
              "BatchTopKTrainingSAEConfig"),
    dl_class="BatchTopKSAE", dl_keys=_TOPK_DL_KEYS,
    hyper=("k", "rescale_acts_by_decoder_norm", "topk_threshold_lr"),
    buffers=("topk_threshold",),
    dl_module="dictionary_learning.trainers.batch_top_k",
    dl_extra={"k": "k", "threshold": "topk_threshold"})
