"""Moved: the SAE modules now live in gsae_fast.saes, one module per architecture
(``saes/gated.py``: GatedSAE; ``saes/jumprelu.py``: JumpReLUSAE; ``saes/topk.py``: TopKSAE,
BatchTopKSAE), with what they share in ``saes/base.py``. These names stay importable from here.
"""
from .saes.base import SparseSAE, init_decoder  # noqa: F401
from .saes.gated import GatedSAE  # noqa: F401
from .saes.jumprelu import JumpReLUSAE  # noqa: F401
from .saes.topk import BatchTopKSAE, TopKSAE  # noqa: F401
