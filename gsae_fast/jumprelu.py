"""Moved: JumpReLU SAEs now live in gsae_fast.saes.jumprelu (JumpReLUSAE, :func:`as_gated`,
:func:`jumprelu_sae_loss`), their dense math and straight-through estimators in
gsae_fast.reference (``jumprelu_sae_loss``, ``JumpReLUFn``, ``StepFn``, ``JumpReLULoss``).
These names stay importable from here.
"""
from .saes.jumprelu import (  # noqa: F401
                            SPARSITY_MODES,
                            JumpReLULoss,
                            JumpReLUSAE,
                            as_gated,
                            check_options,
                            jumprelu_sae_loss,
)
