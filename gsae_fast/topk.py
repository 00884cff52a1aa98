"""Moved: TopK and BatchTopK SAEs now live in gsae_fast.saes.topk (TopKSAE, BatchTopKSAE, the
selection, :func:`topk_encode`, :func:`topk_sae_loss`), their dense math in gsae_fast.reference
(``dense_topk``, ``topk_sae_loss``, ``TopKLoss``).

``gsae_fast.topk`` is that same module object, not a copy of its names, so that settings read at
call time (``ROW_BUDGET``) apply whichever name they are set through.
"""
import sys

from .saes import topk as _topk

sys.modules[__name__] = _topk
