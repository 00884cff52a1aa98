"""The one kernel of the encoder's backward: grad W_enc and the per-feature sums.

gsae_fast.ops computes the per-slot values (``dz`` and the bias-gradient terms, ``[C, B, K]``)
and the per-feature epilogue; this scatters them, grouped by feature
(kernels._common.grouped_scatter, deterministic, written straight in the weights' dtype):

- ``grad W_enc[:, i] = sum over the pairs (b, i) of per_slot[0, b, k] * (x[b] - b_dec)``, written
  into W_enc's ``[d_in, d_sae]`` layout;
- ``sums[c, i]`` = the per-feature sums of each ``per_slot[c]``.
"""
from __future__ import annotations

import torch

from ._common import group_by_feature, grouped_scatter


def encode_grad_scatter(x, b_dec, idx, counts, per_slot, d_sae: int):
    """The ``encode_grad_scatter`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    C = per_slot.shape[0]
    groups = group_by_feature(idx, counts, d_sae)
    order = groups[2]
    # The sums as one more grouped scatter: the per-slot values are the source rows.
    sums_t = torch.empty(d_sae, C, dtype=per_slot.dtype, device=x.device)
    grouped_scatter(groups, order, None, per_slot.reshape(C, B * K).t().contiguous(), sums_t,
                    precision_dtype=x.dtype)
    grad_W = torch.empty(x.shape[1], d_sae, dtype=x.dtype, device=x.device)
    grouped_scatter(groups, order // max(K, 1), per_slot[0].reshape(-1)[order], x, grad_W,
                    sub=b_dec, transpose_out=True, precision_dtype=x.dtype)
    return grad_W, sums_t.t().contiguous()
