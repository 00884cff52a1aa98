"""SAELens' ``expected_average_only_in`` normalisation of a stream of activations: the scale
``sqrt(d_in) / mean |x|`` estimated from its next batches. gsae_fast.train multiplies every batch
by it and folds it into the saved SAE (gsae_fast.sae_lens_export.fold_input_scale).
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def estimate_norm_scale(data, batches: int, d_in: int, device, distributed: bool = False) -> float:
    """SAELens' ``expected_average_only_in`` scale, ``sqrt(d_in) / mean |x|`` over the next
    ``batches`` batches of ``data`` (``distributed``: over all ranks' shares)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(batches):
        try:
            x = next(data)
        except StopIteration:
            raise RuntimeError(f"the data ran out after {i} of the {batches} batches that "
                               f"estimate the activations' norm (--norm-estimate-batches)"
                               ) from None
        x = x.to(device).reshape(-1, d_in).to(torch.float64)
        total += torch.stack([x.norm(dim=-1).sum(), x.new_tensor(x.shape[0])])
    if distributed:
        torch.distributed.all_reduce(total)
    mean = (total[0] / total[1]).item()
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"the activations' mean norm over {batches} batches is {mean}: "
                         f"expected_average_only_in cannot scale them (normalize_activations "
                         f"none)")
    return math.sqrt(d_in) / mean
