"""Synthetic activations with known ground-truth features: now :mod:`gsae_fast.data.synthetic`,
re-exported here so that ``from gsae_fast.synthetic import ...`` keeps working."""
from .data.synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery

__all__ = ["SyntheticConfig", "SyntheticFeatures", "feature_recovery"]
