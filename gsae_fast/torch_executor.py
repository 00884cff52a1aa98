"""The PyTorch executor of the sparse kernels (backend ``"reference"`` at the op level).

Same contract as the compiled kernels (csrc/ops.cpp), written with plain torch ops so that the
ops work on any device and on a machine where nothing could be compiled. It computes the dense
``[B, d_sae]`` pre-activations and compacts them: correct and portable, not fast. Its scatters
are torch's (``deterministic`` is not needed: torch's deterministic mode governs them).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .types import acc_dtype, slot_mask


def _coo(idx: Tensor, counts: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The active slots as a sparse COO ``[B, d_sae]`` matrix of ``values``."""
    mask = slot_mask(idx, counts)
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)[mask]
    indices = torch.stack([rows, idx[mask].long()])
    return torch.sparse_coo_tensor(indices, values[mask], (idx.shape[0], d_sae),
                                   check_invariants=False).coalesce()


def gated_encode(x, W_enc, b_dec, b_gate, r_mag, b_mag, capacity: int):
    # Contract of every executor: counts are the true counts; a row with more than `capacity`
    # actives keeps `capacity` of them (which ones is unspecified; this one keeps the lowest
    # indices), and status[0] > capacity tells the caller to re-run.
    acc = acc_dtype(x.dtype)
    B = x.shape[0]
    z = (x.to(acc) - b_dec.to(acc)) @ W_enc.to(acc)
    pi = z + b_gate.to(acc)
    active = pi > 0
    counts = active.sum(1)
    slot = active.cumsum(1) - 1
    rows, cols = active.nonzero(as_tuple=True)  # row-major: columns increase within a row
    keep = slot[rows, cols] < capacity
    rows, cols = rows[keep], cols[keep]
    slots = slot[rows, cols]
    idx = torch.zeros(B, capacity, dtype=torch.int32, device=x.device)
    f = torch.zeros(B, capacity, dtype=acc, device=x.device)
    pi_out = torch.zeros_like(f)
    mag = torch.relu(torch.exp(r_mag.to(acc)) * z + b_mag.to(acc))
    idx[rows, slots] = cols.to(torch.int32)
    f[rows, slots] = mag[rows, cols]
    pi_out[rows, slots] = pi[rows, cols]
    status = torch.stack([counts.max() if B else counts.new_zeros(()),
                          (~torch.isfinite(z)).any().to(counts.dtype)]).to(torch.int32)
    return f, pi_out, idx, counts.to(torch.int32), status


def encode_grad_scatter(x, b_dec, idx, counts, per_slot, d_sae: int):
    acc = per_slot.dtype
    xc = x.to(acc) - b_dec.to(acc)
    mask = slot_mask(idx, counts)
    i = torch.where(mask, idx, 0).long()[mask]  # padding never indexes (it may hold anything)
    # [d_in, d_sae] = xc^T @ S with S [B, d_sae] the sparse matrix of per_slot[0].
    grad_W = torch.sparse.mm(_coo(idx, counts, per_slot[0], d_sae).t(), xc).t()
    sums = torch.zeros(per_slot.shape[0], d_sae, dtype=acc, device=x.device)
    sums.index_add_(1, i, per_slot[:, mask])
    return grad_W.to(x.dtype).contiguous(), sums


def sparse_decode(idx, val, counts, W_dec, bias: Optional[Tensor]):
    acc = acc_dtype(W_dec.dtype)
    out = torch.sparse.mm(_coo(idx, counts, val, W_dec.shape[0]), W_dec.to(acc))
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(W_dec.dtype)


def sparse_decode_backward(grad_out, idx, val, counts, W_dec, need_val: bool, need_W_dec: bool,
                           deterministic: bool):
    acc = acc_dtype(W_dec.dtype)
    g = grad_out.to(acc)
    empty = torch.empty(0, dtype=acc, device=val.device)
    grad_val = empty
    if need_val:
        mask = slot_mask(idx, counts)
        rows = torch.where(mask, idx, 0).long()  # padding never indexes (it may hold anything)
        # Row chunks keep the gathered [rows, K, d_in] block small.
        chunk = max(1, (1 << 22) // max(1, idx.shape[1] * W_dec.shape[1]))
        parts = [torch.einsum("bkd,bd->bk", W_dec[rows[s:s + chunk]].to(acc), g[s:s + chunk])
                 for s in range(0, idx.shape[0], chunk)]
        dots = torch.cat(parts) if parts else torch.zeros_like(val)
        grad_val = torch.where(mask, dots, torch.zeros((), dtype=acc, device=val.device))
    grad_W = torch.empty(0, dtype=W_dec.dtype, device=val.device)
    if need_W_dec:
        grad_W = torch.sparse.mm(_coo(idx, counts, val, W_dec.shape[0]).t(), g).to(W_dec.dtype)
    return grad_val, grad_W


def _gathered_rows(idx, counts, W_dec):
    """The rows W_dec[idx] of the active slots, gathered once per chunk of tokens:
    yields (start, end, rows [end - start, K, d_in] in the accumulation dtype, mask)."""
    acc = acc_dtype(W_dec.dtype)
    mask = slot_mask(idx, counts)
    i = torch.where(mask, idx, 0).long()  # padding never indexes (it may hold anything)
    chunk = max(1, (1 << 22) // max(1, idx.shape[1] * W_dec.shape[1]))
    for s in range(0, idx.shape[0], chunk):
        yield s, min(s + chunk, idx.shape[0]), W_dec[i[s:s + chunk]].to(acc), mask[s:s + chunk]


def sparse_decode_pair(idx, val_a, val_b, counts, W_dec, bias: Optional[Tensor]):
    """(val_a @ W_dec + bias, val_b @ W_dec + bias) over the same slots: one gather of the rows,
    two contractions."""
    acc = acc_dtype(W_dec.dtype)
    B, d_in = idx.shape[0], W_dec.shape[1]
    zero = torch.zeros((), dtype=acc, device=idx.device)
    out_a = torch.zeros(B, d_in, dtype=acc, device=idx.device)
    out_b = torch.zeros_like(out_a)
    for s, e, rows, m in _gathered_rows(idx, counts, W_dec):
        out_a[s:e] = torch.einsum("bkd,bk->bd", rows, torch.where(m, val_a[s:e], zero))
        out_b[s:e] = torch.einsum("bkd,bk->bd", rows, torch.where(m, val_b[s:e], zero))
    if bias is not None:
        out_a, out_b = out_a + bias.to(acc), out_b + bias.to(acc)
    return out_a.to(W_dec.dtype), out_b.to(W_dec.dtype)


def sparse_decode_pair_backward(grad_a, grad_b, idx, val_a, val_b, counts, W_dec,
                                need_val_a: bool, need_val_b: bool, need_W_dec: bool,
                                W_from_b: bool, deterministic: bool):
    acc = acc_dtype(W_dec.dtype)
    ga, gb = grad_a.to(acc), grad_b.to(acc)
    empty = torch.empty(0, dtype=acc, device=idx.device)
    gva = torch.zeros_like(val_a) if need_val_a else empty
    gvb = torch.zeros_like(val_b) if need_val_b else empty.clone()
    if need_val_a or need_val_b:
        zero = torch.zeros((), dtype=acc, device=idx.device)
        for s, e, rows, m in _gathered_rows(idx, counts, W_dec):  # one gather, two dots
            if need_val_a:
                gva[s:e] = torch.where(m, torch.einsum("bkd,bd->bk", rows, ga[s:e]), zero)
            if need_val_b:
                gvb[s:e] = torch.where(m, torch.einsum("bkd,bd->bk", rows, gb[s:e]), zero)
    grad_W = torch.empty(0, dtype=W_dec.dtype, device=idx.device)
    if need_W_dec:
        if W_from_b:  # both paths as one scatter over the stacked rows [grad_a; grad_b]
            S = _coo(torch.cat([idx, idx]), torch.cat([counts, counts]),
                     torch.cat([val_a, val_b]), W_dec.shape[0])
            grad_W = torch.sparse.mm(S.t(), torch.cat([ga, gb])).to(W_dec.dtype)
        else:
            grad_W = torch.sparse.mm(_coo(idx, counts, val_a, W_dec.shape[0]).t(),
                                     ga).to(W_dec.dtype)
    return gva, gvb, grad_W
