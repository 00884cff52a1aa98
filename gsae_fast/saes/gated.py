"""The Gated SAE: :class:`GatedSAE` (its loss is gsae_fast.ops.gated_sae_loss, the dense math
gsae_fast.reference.gated_sae_loss) and its formats in SAELens and dictionary_learning
(:data:`GATED`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..types import GatedLoss
from .base import Arch, SparseSAE

if TYPE_CHECKING:
    from .jumprelu import JumpReLUSAE


class GatedSAE(SparseSAE):
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

    def encoder_params(self) -> tuple[Tensor, ...]:
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
        from .jumprelu import JumpReLUSAE  # (jumprelu.py builds on this module)
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


# SAELens' GatedSAE / GatedTrainingSAE and dictionary_learning's GatedAutoEncoder.
GATED = Arch(
    name="gated", cls=GatedSAE,
    params=("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"),
    sae_lens=("sae_lens.saes.gated_sae", "GatedSAE", "GatedSAEConfig", "GatedTrainingSAE",
              "GatedTrainingSAEConfig"),
    dl_class="GatedAutoEncoder",
    dl_keys={"encoder.weight": ("W_enc", True), "decoder.weight": ("W_dec", True),
             "decoder_bias": ("b_dec", False), "gate_bias": ("b_gate", False),
             "r_mag": ("r_mag", False), "mag_bias": ("b_mag", False)})
