"""The SAE architectures, one module each (its class, its loss and its :class:`Arch`, the formats
SAELens and dictionary_learning give it), and their registry keyed by SAELens' architecture name:

    gsae_fast.saes.ARCHS               # {"gated": Arch, "jumprelu": ..., "topk": ..., ...}
    gsae_fast.saes.get_arch("topk")    # its Arch: .cls (TopKSAE), .params, .sae_lens, ...

What the modules share (base class, decoder initialisation, capacity hint) is in ``base.py``;
gsae_fast.interop converts and loads through the registry; the dense math of every architecture
is gsae_fast.reference's.
"""
from __future__ import annotations

from . import base, gated, jumprelu, topk
from .base import Arch, SparseSAE, UnsupportedSAEError, init_decoder
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .topk import BatchTopKSAE, TopKSAE

# In this order: the dictionary_learning lookups of gsae_fast.interop try them in turn.
ARCHS: dict[str, Arch] = {a.name: a for a in (gated.GATED, jumprelu.JUMPRELU, topk.TOPK,
                                               topk.BATCHTOPK)}


def get_arch(name: str) -> Arch:
    """The architecture registered as ``name``; :class:`UnsupportedSAEError` (a ValueError)
    names the ones there are otherwise."""
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise UnsupportedSAEError(f"SAE architecture {name!r}: gsae_fast implements "
                                  f"{sorted(ARCHS)}") from None


__all__ = ["ARCHS", "get_arch", "Arch", "SparseSAE", "UnsupportedSAEError", "init_decoder",
           "GatedSAE", "JumpReLUSAE", "TopKSAE", "BatchTopKSAE", "base", "gated", "jumprelu",
           "topk"]
