"""Triton kernels of gsae_fast, installed as ``gsae_fast.kernels``.

The Triton executor (fused gated encode with compaction, sparse decode and its backward) is the
subject of a later issue; this package is its home. Until it lands, ``backend="triton"`` is
reported as not built by :func:`gsae_fast.backends.available_backends`.
"""
