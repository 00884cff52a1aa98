"""The data types every executor shares: sparse activations and the loss result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32



def slot_mask(idx: Tensor, counts: Tensor) -> Tensor:
    """True on the active slots of padded rows ``idx [..., K]`` with ``counts [...]``."""
    return torch.arange(idx.shape[-1], device=idx.device) < counts.unsqueeze(-1)

@dataclass
class SparseActs:
    """Gated SAE activations in the padded-row sparse format (the one format of gsae_fast).

    For every token (leading dims ``...``) with ``n = counts[...]`` active features:

    - ``idx[..., :n]``: the active feature indices, int32, strictly increasing;
    - ``f[..., :n]``: their activations ``f = relu(exp(r_mag) * z + b_mag)`` (may be 0 when the
      magnitude path is negative although the gate is open);
    - ``pi_gate[..., :n]``: their gate pre-activations ``z + b_gate`` (> 0), which is also
      ``relu(pi_gate)``, the quantity the sparsity and auxiliary terms use;
    - slots ``k >= n`` are padding: index 0 and values 0.

    Values are in the accumulation dtype (fp32, or fp64 for fp64 inputs) whatever the input
    dtype. ``f`` and ``pi_gate`` carry autograd back to the encoder parameters and the input.
    ``max_count`` is the largest row count of this batch (known on the host, used to size the
    next batch's capacity). ``checked``: the shapes, dtypes and index ranges are known good (the
    package's encoders set it); a SparseActs built or edited by hand is validated by the first op
    that reads it (``gsae_fast.ops.check_acts``), which then sets it.
    """

    idx: Tensor
    f: Tensor
    pi_gate: Tensor
    counts: Tensor
    d_sae: int
    max_count: Optional[int] = None
    checked: bool = field(default=False, compare=False, repr=False)

    @property
    def capacity(self) -> int:
        return self.idx.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense equivalent, ``[..., d_sae]``."""
        return torch.Size((*self.counts.shape, self.d_sae))

    def mask(self) -> Tensor:
        """Boolean ``[..., K]``: True on the active slots."""
        return slot_mask(self.idx, self.counts)

    def l0(self) -> Tensor:
        """Mean number of active features per token (float32 scalar)."""
        return self.counts.to(torch.float32).mean()

    def to_dense(self, dtype: Optional[torch.dtype] = None, values: str = "f") -> Tensor:
        """Dense ``[..., d_sae]`` tensor of ``values`` ("f" or "pi_gate"), differentiable.

        Builds the dense matrix the sparse path exists to avoid: for inspection and interop.
        """
        v = {"f": self.f, "pi_gate": self.pi_gate}[values]
        v = torch.where(self.mask(), v, torch.zeros((), dtype=v.dtype, device=v.device))
        out = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        # scatter_add, not scatter: padding slots also point at index 0 (with value 0).
        out = out.scatter_add(-1, self.idx.long(), v)
        return out if dtype is None else out.to(dtype)


@dataclass
class GatedLoss:
    """The Gated SAE loss and its parts (scalar tensors; ``loss = mse + sparsity + aux``).

    ``sparsity`` already includes the coefficient (it is ``lambda * sum_i w_i relu(pi_gate_i)``,
    averaged over tokens); ``l0`` is the batch mean of active features per token, no gradient.
    """

    loss: Tensor
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    l0: Tensor
    x_hat: Optional[Tensor] = None
    acts: Optional[SparseActs] = None
    max_count: Optional[int] = None
