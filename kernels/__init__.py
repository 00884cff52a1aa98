"""Triton kernels of gsae_fast, installed as ``gsae_fast.kernels``: the ``"triton"`` executor.

The functions with the kernel contract of gsae_fast.torch_executor (the custom ops in
gsae_fast.ops call them when ``backend="triton"``):

- :func:`gated_encode` (gated_encode.py): one GEMM with the gate/magnitude epilogue and
  compaction to the padded-row sparse format;
- :func:`sparse_decode`, :func:`sparse_decode_backward` (sparse_decode.py): gather-sum of W_dec
  rows and its backward; :func:`sparse_decode_pair` and its backward: two value sets over the
  same slots (x_hat and the aux reconstruction) from one gather of each row;
- :func:`encode_grad_scatter` (gated_encode_backward.py): grad W_enc and the per-feature sums
  of the encoder's backward, grouped by feature (_common.py); gsae_fast.ops does the rest;
- :func:`vec_mat` (_common.py): the mixed-precision GEMV of grad b_dec (bf16 / fp16 weights read
  as they are).

They run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before import; slow, for testing the logic). How ``grad W_dec`` is scattered (grouped by
feature, or atomics) is the caller's argument (gsae_fast.backends.set_scatter).
"""
import triton

from ._common import INTERPRET, vec_mat  # noqa: F401
from .gated_encode import gated_encode  # noqa: F401
from .gated_encode_backward import encode_grad_scatter  # noqa: F401
from .sparse_decode import (  # noqa: F401
                            sparse_decode,
                            sparse_decode_backward,
                            sparse_decode_pair,
                            sparse_decode_pair_backward,
)

# Before triton 3.5, tl.atomic_add handed its old value only to one of the threads holding a
# replicated element (triton-lang/triton#7402); the encode reserves its slots with an atomic on
# a row sum, so older versions would write activations into the wrong slots.
_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
NOT_READY = (None if _VERSION >= (3, 5) or INTERPRET else
             f"triton {triton.__version__} is too old (>= 3.5 needed: triton-lang/triton#7402)")
EXECUTOR_READY = NOT_READY is None
