"""gsae_fast: fast kernels for Gated Sparse Autoencoders.

    import gsae_fast
    sae = gsae_fast.GatedSAE(d_in=512, d_sae=16384)       # backend="auto"
    out = sae.loss(x, l1_coefficient=1e-3)                  # out.loss.backward()
    acts = sae.encode_sparse(x)                             # SparseActs: idx, f, pi_gate, counts
    gsae_fast.patch_sae_lens()                              # existing SAELens Gated SAEs too

See README.md, and docs/design.md for the math, the conventions and the layout.
"""
from . import backends, interop, jumprelu, modules, ops, reference, saes, topk  # noqa: F401  (the old homes, re-exports: gsae_fast.saes)
from .backends import available_backends
from .interop import UnsupportedSAEError, load
from .ops import gated_encode, gated_sae_loss, sparse_decode
from .patch import (
                    patch_dictionary_learning,
                    patch_sae_lens,
                    unpatch_dictionary_learning,
                    unpatch_sae_lens,
)
from .saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, TopKSAE
from .types import GatedLoss, SparseActs

__version__ = "0.1.0"
__all__ = ["GatedSAE", "JumpReLUSAE", "TopKSAE", "BatchTopKSAE", "load", "SparseActs",
           "GatedLoss", "available_backends", "gated_encode", "sparse_decode", "gated_sae_loss",
           "ops", "reference", "backends", "interop", "saes", "topk", "UnsupportedSAEError",
           "patch_sae_lens", "unpatch_sae_lens", "patch_dictionary_learning",
           "unpatch_dictionary_learning"]
