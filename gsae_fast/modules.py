"""``gsae_fast.GatedSAE``: a Gated SAE module with SAELens' parameters, on the fast ops."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import backends, interop, jumprelu, ops, reference, topk
from .types import GatedLoss, SparseActs


@torch.no_grad()
def init_decoder(d_in: int, d_sae: int, norm: Optional[float], *, rows: Optional[tuple] = None,
                 dtype=None, device=None) -> Tensor:
    """SAELens' decoder initialisation: Kaiming-uniform ``[d_sae, d_in]``, rows scaled to
    ``norm`` (None: left as drawn). ``rows=(start, stop)``: only those rows of the same draw
    (a feature shard starts where the whole dictionary would)."""
    W = torch.empty(d_sae, d_in, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(W)
    if rows is not None:
        W = W[rows[0]:rows[1]].clone()
    if norm is not None:
        W *= norm / W.norm(dim=1, keepdim=True)
    return W


class _SparseSAE(nn.Module):
    """What the SAE modules share: the decoder, SAELens' initialisation, the backend choice,
    the capacity hint (the largest row count seen, so the next sparse encode rarely re-runs) and
    the converters and checkpoints."""

    ARCH = ""  # SAELens' architecture name (gsae_fast.interop.ARCHS)

    def __init__(self, d_in: int, d_sae: int, *, dtype, device, backend: str,
                 decoder_init_norm: Optional[float]):
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from "
                             f"{('auto',) + backends.BACKENDS}")
        self.d_in, self.d_sae, self.backend = d_in, d_sae, backend
        if backend not in ("auto", "reference"):
            dev = torch.device(device) if device is not None else torch.device("cpu")
            backends.resolve(backend, dev)  # fail now, with the reason, not at the first call
        kw = dict(dtype=dtype, device=device)
        W_dec = init_decoder(d_in, d_sae, decoder_init_norm, **kw)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self._capacity: Optional[int] = None
        # SAELens metadata of a converted/loaded SAE, written back by save_pretrained.
        self.sae_lens_metadata: Optional[dict] = None

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, backend={self.backend!r}"

    def _backend_for(self, x: Tensor) -> str:
        return backends.resolve(self.backend, x.device)

    def _remember(self, max_count: Optional[int]) -> None:
        if max_count is not None:
            self._capacity = ops.next_capacity(max_count, self.d_sae)

    def _encoder_params(self) -> tuple[Tensor, ...]:
        """The encoder as Gated SAE parameters (W_enc, b_dec, b_gate, r_mag, b_mag)."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Active features of ``x [..., d_in]`` in the sparse format (any backend)."""
        acts = ops.gated_encode(x, *self._encoder_params(), capacity=self._capacity,
                                backend=self._backend_for(x))
        self._remember(acts.max_count)
        return acts

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations ``[..., d_sae]`` (SAELens ``encode`` semantics)."""
        if self._backend_for(x) == "reference":
            return reference.encode(x, *self._encoder_params())
        return self.encode_sparse(x).to_dense(dtype=x.dtype)

    def decode(self, acts: Union[SparseActs, Tensor]) -> Tensor:
        """``acts @ W_dec + b_dec`` for dense ``[..., d_sae]`` or sparse activations."""
        if isinstance(acts, SparseActs):
            return ops.sparse_decode(acts, self.W_dec, self.b_dec,
                                     backend=self._backend_for(self.W_dec))
        if acts.shape[-1] != self.d_sae:
            raise ValueError(f"decode: acts must be [..., d_sae={self.d_sae}], got "
                             f"{list(acts.shape)}")
        return reference.decode(acts, self.W_dec, self.b_dec)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``x_hat [..., d_in]``."""
        if self._backend_for(x) == "reference":
            return self.decode(self.encode(x))  # dense: reference.decode (TopK: rescaled)
        return self.decode(self.encode_sparse(x))


    # -- interop (gsae_fast.interop has the details and the refused settings) --------------

    @classmethod
    def from_sae_lens(cls, sae, *, share: bool = False, backend: str = "auto"):
        """From the SAELens SAE of this architecture (inference or training class; ``share``:
        the same Parameters)."""
        return interop.from_sae_lens(sae, share=share, backend=backend, expected=cls.ARCH)

    def to_sae_lens(self, *, training: bool = False, share: bool = False, **cfg_overrides):
        """The SAELens SAE of this architecture (its training class with ``training=True``)."""
        return interop.to_sae_lens(self, training=training, share=share, **cfg_overrides)

    @classmethod
    def from_dictionary_learning(cls, ae, *, share: bool = False, backend: str = "auto"):
        """From the dictionary_learning autoencoder of this architecture (or its state dict)."""
        return interop.from_dictionary_learning(ae, share=share, backend=backend,
                                                expected=cls.ARCH)

    def to_dictionary_learning(self, *, share: bool = False):
        """The dictionary_learning autoencoder of this architecture."""
        return interop.to_dictionary_learning(self, share=share)

    def save_pretrained(self, path) -> None:
        """Save in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``)."""
        interop.save_pretrained(self, path)

    @classmethod
    def load(cls, path, *, device="cpu", dtype=None, backend: str = "auto"):
        """Load a SAELens checkpoint folder or a dictionary_learning one (``ae.pt``)."""
        return interop.load(path, device=device, dtype=dtype, backend=backend, expected=cls.ARCH)


class GatedSAE(_SparseSAE):
    """Gated Sparse Autoencoder (Rajamanoharan et al. 2024) with weight sharing.

    Parameters, SAELens' names, shapes and initialisation: ``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]`` (Kaiming-uniform rows scaled to norm ``decoder_init_norm``),
    ``W_enc = W_dec.T`` at init, ``b_dec``, ``b_gate``, ``r_mag``, ``b_mag`` zeros.

    ``backend`` picks the executor: ``"auto"`` (the fastest built one for the input's device),
    ``"reference"`` (dense PyTorch), ``"cpu"`` (C++ kernels), ``"cuda"``, ``"triton"``. A backend
    that is not built, or does not run on the input's device, raises a RuntimeError saying why.

    The module remembers the largest row count it has seen and sizes the next sparse encode from
    it, so a training loop almost never pays for a capacity overflow.
    """

    ARCH = "gated"

    def __init__(self, d_in: int, d_sae: int, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[torch.device, str]] = None, backend: str = "auto",
                 decoder_init_norm: Optional[float] = 0.1):
        super().__init__(d_in, d_sae, dtype=dtype, device=device, backend=backend,
                         decoder_init_norm=decoder_init_norm)
        kw = dict(dtype=dtype, device=device)
        self.b_gate = nn.Parameter(torch.zeros(d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, **kw))

    def _encoder_params(self) -> tuple[Tensor, ...]:
        return self.W_enc, self.b_dec, self.b_gate, self.r_mag, self.b_mag


    def loss(self, x: Tensor, l1_coefficient: float, *, sparsity: str = "unit",
             aux: str = "frozen") -> GatedLoss:
        """The Gated SAE training loss of a batch (see gsae_fast.reference for the options).

        Defaults follow the paper: unit sparsity weights (keep decoder rows at unit norm) and a
        frozen decoder in the auxiliary term; SAELens trains with ``sparsity="decoder_norm",
        aux="shared"``.
        """
        out = ops.gated_sae_loss(x, self.W_enc, self.W_dec, self.b_dec, self.b_gate, self.r_mag,
                                 self.b_mag, l1_coefficient, sparsity=sparsity, aux=aux,
                                 backend=self._backend_for(x), capacity=self._capacity)
        self._remember(out.max_count)
        return out

    def to_jumprelu(self) -> "JumpReLUSAE":
        """The JumpReLU SAE computing the same activations (the paper's equivalence):
        ``W_enc' = W_enc * exp(r_mag)``, ``b_enc = b_mag``,
        ``threshold = b_mag - exp(r_mag) b_gate``."""
        with torch.no_grad():
            scale = torch.exp(self.r_mag)
            out = JumpReLUSAE(self.d_in, self.d_sae, device="meta", decoder_init_norm=None)
            out.backend, out.sae_lens_metadata = self.backend, self.sae_lens_metadata
            out.W_enc = nn.Parameter(self.W_enc * scale)
            out.W_dec = nn.Parameter(self.W_dec.clone())
            out.b_dec = nn.Parameter(self.b_dec.clone())
            out.b_enc = nn.Parameter(self.b_mag.clone())
            out.threshold = nn.Parameter(self.b_mag - scale * self.b_gate)
        return out


def _threshold_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class JumpReLUSAE(_SparseSAE):
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
                                                 dtype=_threshold_dtype(dtype)))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to(dtype), .half(), ... reach the threshold
        t = self._parameters.get("threshold")
        if t is not None and t.dtype in (torch.bfloat16, torch.float16):
            t.data = t.data.float()
        return out

    def _encoder_params(self) -> tuple[Tensor, ...]:
        return jumprelu.as_gated(self.W_enc, self.b_dec, self.b_enc,
                                 self.threshold.to(self.b_enc.dtype))

    def loss(self, x: Tensor, l0_coefficient: float, **options) -> "jumprelu.JumpReLULoss":
        """SAELens' JumpReLU training loss (options of gsae_fast.jumprelu.jumprelu_sae_loss:
        bandwidth, sparsity_mode, tanh_scale, target_l0, ste_to_input,
        pre_act_loss_coefficient, dead_neuron_mask). Clamps the threshold at 0 first, in place,
        as SAELens does."""
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        out = jumprelu.jumprelu_sae_loss(
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
                                   self._encoder_params()):
                setattr(out, name, nn.Parameter(value.clone()))
            out.W_dec = nn.Parameter(self.W_dec.clone())
        return out


class TopKSAE(_SparseSAE):
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
        topk._check_k(k, self.BATCH, type(self).__name__, d_sae)
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
        return topk.topk_encode(x, self.W_enc, self.b_dec, self.b_enc, self.k,
                                batch=self.BATCH, decoder_norm=self._decoder_norm(),
                                backend=self._backend_for(x))

    def encode(self, x: Tensor) -> Tensor:
        if self._backend_for(x) == "reference":
            return topk.dense_topk(x, self.W_enc, self.b_dec, self.b_enc, self.k,
                                   batch=self.BATCH, decoder_norm=self._decoder_norm())[0]
        return self.encode_sparse(x).to_dense(dtype=x.dtype)

    def decode(self, acts: Union[SparseActs, Tensor]) -> Tensor:
        norm = self._decoder_norm()
        if isinstance(acts, SparseActs):
            acts = topk.decode_values(acts, norm)
        elif norm is not None:
            acts = acts / norm
        return super().decode(acts)

    def loss(self, x: Tensor, *, dead_neuron_mask: Optional[Tensor] = None,
             aux_loss_coefficient: float = 1.0, aux_k: Optional[int] = None,
             aux_style: str = "sae_lens") -> "topk.TopKLoss":
        """The training loss: ``mse + aux_loss_coefficient * AuxK`` over the dead features
        (see gsae_fast.topk.topk_sae_loss; SAELens' ``TopKTrainingSAE`` by default)."""
        return topk.topk_sae_loss(x, self.W_enc, self.W_dec, self.b_dec, self.b_enc, self.k,
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

    def _encoder_params(self) -> tuple[Tensor, ...]:
        """The inference encoder as Gated parameters: gate ``pre * n > t`` and magnitude
        ``relu(pre * n)`` with ``n`` the decoder norms (1 without rescaling)."""
        t = self.topk_threshold.clamp(min=0).to(self.b_enc.dtype)
        if not self.rescale_acts_by_decoder_norm:
            return self.W_enc, self.b_dec, self.b_enc - t, torch.zeros_like(self.b_enc), self.b_enc
        n = self.W_dec.norm(dim=1)
        return self.W_enc, self.b_dec, self.b_enc - t / n, torch.log(n), self.b_enc * n

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Inference activations (the threshold JumpReLU) of ``x [..., d_in]``."""
        return _SparseSAE.encode_sparse(self, x)

    def encode(self, x: Tensor) -> Tensor:
        return _SparseSAE.encode(self, x)

    def encode_batch_topk(self, x: Tensor) -> SparseActs:
        """Training activations: the ``k * tokens`` largest of the batch."""
        return TopKSAE.encode_sparse(self, x)

    def loss(self, x: Tensor, **options) -> "topk.TopKLoss":
        out = super().loss(x, **options)
        self.update_threshold(out)
        return out

    @torch.no_grad()
    def update_threshold(self, out: "topk.TopKLoss") -> None:
        low = out.min_positive()
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
                                                         dtype=_threshold_dtype(self.b_enc.dtype)))
        return out
