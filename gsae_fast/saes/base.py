"""What every SAE architecture shares: the module base class (decoder, SAELens' initialisation,
the backend choice, the capacity hint, the converter and checkpoint methods), the capacity hint
itself (also kept by gsae_fast.patch on patched SAELens / dictionary_learning objects), and
:class:`Arch`, the description of an architecture's formats that gsae_fast.interop reads.

Each architecture module (gated.py, jumprelu.py, topk.py) holds its class, its loss and its
:class:`Arch`; gsae_fast.saes.ARCHS is the registry of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import backends, ops, reference
from ..types import SparseActs


class UnsupportedSAEError(ValueError):
    """An SAE (or checkpoint) uses a setting gsae_fast does not implement."""


@dataclass(frozen=True)
class Arch:
    """One SAE architecture: its gsae_fast class and how each library names it (the table
    gsae_fast.interop converts and loads with)."""
    name: str          # SAELens "architecture" (the registry key)
    cls: type          # the gsae_fast module class
    params: tuple      # our parameter names (SAELens' too)
    sae_lens: tuple    # SAELens module, inference class, its config, training class, its config
    dl_class: str      # dictionary_learning class (in dl_module)
    dl_keys: dict      # dictionary_learning state-dict key -> (our name, transposed)
    hyper: tuple = ()  # SAELens config fields that define the SAE (module attributes too)
    buffers: tuple = ()  # SAELens state-dict tensors beside the parameters (module buffers)
    dl_module: str = "dictionary_learning.dictionary"
    dl_extra: dict = field(default_factory=dict)  # dictionary_learning buffer -> our attribute

    @property
    def module(self) -> str:
        """The class's name (``gsae_fast.<module>``), for messages."""
        return self.cls.__name__


# ------------------------------------------------------------------------------ capacity hint

CAPACITY_ATTR = "_capacity"  # where a gsae_fast module keeps its hint


def capacity_hint(holder, attr: str = CAPACITY_ATTR) -> Optional[int]:
    """The capacity hint kept on ``holder`` (None before its first sparse encode): the capacity
    to try for its next sparse encode, so that it rarely re-runs on an overflow."""
    return getattr(holder, attr, None)


def remember_capacity(holder, max_count: Optional[int], d_sae: int,
                      attr: str = CAPACITY_ATTR) -> None:
    """Keep on ``holder`` the capacity to try after a batch whose largest row had ``max_count``
    actives (``ops.next_capacity``; None: nothing learned, the hint stays)."""
    if max_count is not None:
        setattr(holder, attr, ops.next_capacity(max_count, d_sae))


def hinted_encode(holder, x: Tensor, params: Sequence[Tensor], backend: str, *,
                  d_sae: Optional[int] = None, attr: str = CAPACITY_ATTR) -> SparseActs:
    """``ops.gated_encode(x, *params)`` sized by ``holder``'s capacity hint, which then follows
    this batch (``d_sae``: the cap of the hint, default the encoder's width)."""
    acts = ops.gated_encode(x, *params, capacity=capacity_hint(holder, attr), backend=backend)
    remember_capacity(holder, acts.max_count, acts.d_sae if d_sae is None else d_sae, attr)
    return acts


# ------------------------------------------------------------------------------- the modules

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


def _interop():
    # The converters build modules through the registry (gsae_fast.saes), so they are imported
    # when a converter method is called, not with this module.
    from .. import interop
    return interop


class SparseSAE(nn.Module):
    """What the SAE modules share: the decoder, SAELens' initialisation, the backend choice,
    the capacity hint (the largest row count seen, so the next sparse encode rarely re-runs) and
    the converters and checkpoints."""

    ARCH = ""  # SAELens' architecture name (the key of gsae_fast.saes.ARCHS)

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
        remember_capacity(self, max_count, self.d_sae)

    def encoder_params(self) -> tuple[Tensor, ...]:
        """The encoder as Gated SAE parameters (W_enc, b_dec, b_gate, r_mag, b_mag)."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Active features of ``x [..., d_in]`` in the sparse format (any backend)."""
        return hinted_encode(self, x, self.encoder_params(), self._backend_for(x),
                             d_sae=self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations ``[..., d_sae]`` (SAELens ``encode`` semantics)."""
        if self._backend_for(x) == "reference":
            W_enc, b_dec, b_gate, r_mag, b_mag = params = self.encoder_params()
            # the checks of the sparse encode, so that every backend refuses the same inputs
            ops.check_encoder("gsae_fast encode", x, W_enc, b_dec, b_gate=b_gate, r_mag=r_mag,
                              b_mag=b_mag)
            return reference.encode(x, *params)
        return self.encode_sparse(x).to_dense(dtype=x.dtype)

    def decode(self, acts: Union[SparseActs, Tensor]) -> Tensor:
        """``acts @ W_dec + b_dec`` for dense ``[..., d_sae]`` or sparse activations."""
        if isinstance(acts, SparseActs):
            return ops.sparse_decode(acts, self.W_dec, self.b_dec,
                                     backend=self._backend_for(self.W_dec))
        if acts.shape[-1] != self.d_sae:
            raise ValueError(f"decode: acts must be [..., d_sae={self.d_sae}], got "
                             f"{list(acts.shape)}")
        ops.check_same(dict(acts=acts, W_dec=self.W_dec, b_dec=self.b_dec), "gsae_fast decode")
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
        return _interop().from_sae_lens(sae, share=share, backend=backend, expected=cls.ARCH)

    def to_sae_lens(self, *, training: bool = False, share: bool = False, **cfg_overrides):
        """The SAELens SAE of this architecture (its training class with ``training=True``)."""
        return _interop().to_sae_lens(self, training=training, share=share, **cfg_overrides)

    @classmethod
    def from_dictionary_learning(cls, ae, *, share: bool = False, backend: str = "auto"):
        """From the dictionary_learning autoencoder of this architecture (or its state dict)."""
        return _interop().from_dictionary_learning(ae, share=share, backend=backend,
                                                   expected=cls.ARCH)

    def to_dictionary_learning(self, *, share: bool = False):
        """The dictionary_learning autoencoder of this architecture."""
        return _interop().to_dictionary_learning(self, share=share)

    def save_pretrained(self, path) -> None:
        """Save in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``)."""
        _interop().save_pretrained(self, path)

    @classmethod
    def load(cls, path, *, device="cpu", dtype=None, backend: str = "auto"):
        """Load a SAELens checkpoint folder or a dictionary_learning one (``ae.pt``)."""
        return _interop().load(path, device=device, dtype=dtype, backend=backend,
                               expected=cls.ARCH)
