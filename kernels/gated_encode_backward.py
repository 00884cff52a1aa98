"""Backward of the fused gated encode, on the sparse slots only.

Per active slot (token b, feature i; ``[B, K]`` tensors, never ``[B, d_sae]``):
``dz = grad_pi_gate + exp(r_mag[i]) * grad_f * [f > 0]``. Then, grouped by feature
(kernels._common.grouped_scatter, deterministic):

- ``grad W_enc[:, i] = sum_b dz[b, i] * (x[b] - b_dec)``, written straight into W_enc's
  ``[d_in, d_sae]`` layout;
- the per-feature sums of dz, of the gate gradient (``grad b_gate``), of the magnitude gradient
  (``grad b_mag``) and of magnitude gradient * z (``grad r_mag / exp(r_mag)``);
- ``grad b_dec = -W_enc @ sum_i dz[:, i]`` (a GEMV), and ``grad x = dz @ W_enc^T`` as a sparse
  decode through the transposed encoder (only when x needs a gradient).
"""
from __future__ import annotations

import torch

from ._common import group_by_feature, grouped_scatter, slot_mask, vec_mat
from .sparse_decode import sparse_decode


def gated_encode_backward(x, W_enc, b_dec, b_gate, r_mag, b_mag, idx, f, pi_gate, counts,
                          grad_f, grad_pi_gate, need_x: bool):
    """The ``gated_encode_backward`` kernel contract (see gsae_fast.torch_executor)."""
    B, K = idx.shape
    d_in, d_sae = W_enc.shape
    acc = f.dtype
    zero = torch.zeros((), dtype=acc, device=x.device)
    valid = slot_mask(idx, counts)
    i = torch.where(valid, idx, 0).long()  # padding never indexes (it may hold anything)
    scale = torch.exp(r_mag.to(acc))[i]
    grad_mag = torch.where(valid & (f > 0), grad_f, zero)
    grad_gate = torch.where(valid, grad_pi_gate, zero)
    dz = grad_gate + scale * grad_mag
    z = pi_gate - b_gate.to(acc)[i]

    groups = group_by_feature(idx, counts, d_sae)
    order = groups[2]
    per_pair = torch.stack([dz, grad_gate, grad_mag, grad_mag * z], dim=-1).reshape(B * K, 4)
    sums = torch.empty(d_sae, 4, dtype=acc, device=x.device)
    grouped_scatter(groups, order, None, per_pair, sums, precision_dtype=x.dtype)
    grad_W = torch.empty_like(W_enc)
    grouped_scatter(groups, order // max(K, 1), dz.reshape(-1)[order], x, grad_W, sub=b_dec,
                    transpose_out=True, precision_dtype=x.dtype)
    grad_b_dec = -vec_mat(sums[:, 0].contiguous(), W_enc.t())
    dt = x.dtype
    grad_x = torch.empty(0, dtype=dt, device=x.device)
    if need_x:
        grad_x = sparse_decode(idx, dz, counts, W_enc.t().contiguous(), None)
    # copy=True: the outputs of a custom op must not alias each other (columns of one tensor).
    return (grad_x, grad_W, grad_b_dec.to(dt), sums[:, 1].to(dt, copy=True),
            (torch.exp(r_mag.to(acc)) * sums[:, 3]).to(dt), sums[:, 2].to(dt, copy=True))
