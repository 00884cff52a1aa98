"""The one dispatch point: which executors are built, and which one runs a call.

Backends (``backend=`` everywhere):

- ``"reference"``: plain PyTorch on any device (module level: the dense reference math;
  op level: gsae_fast.torch_executor);
- ``"cpu"``: the compiled C++ kernels (gsae_fast._C) on CPU tensors;
- ``"cuda"``: compiled CUDA kernels on CUDA tensors (when the extension was built with them);
- ``"triton"``: Triton kernels in gsae_fast.kernels on CUDA tensors (CPU tensors under
  TRITON_INTERPRET=1, for testing);
- ``"cuda_emulated"``: the CUDA executor's host code and kernels compiled for the CPU and run by
  an emulator of the CUDA execution model, on CPU tensors (csrc/emu): it tests the CUDA
  executor's logic without a GPU, slowly; never chosen by ``"auto"``;
- ``"auto"``: the fastest built executor for the tensors' device.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

from . import torch_executor

BACKENDS = ("reference", "cpu", "cuda", "triton", "cuda_emulated")
# Fastest first, per device type; "auto" takes the first one that is built.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

_ext_error: Optional[str] = None
if os.environ.get("GSAE_FAST_DISABLE_EXT") == "1":  # behave as a build without a compiler
    _ext_error = "disabled by GSAE_FAST_DISABLE_EXT=1"
else:
    try:
        from . import _C  # noqa: F401  (loading it registers the gsae_fast_C kernel ops)
    except ImportError as e:  # pragma: no cover - depends on the build
        _ext_error = str(e)
if _ext_error is not None:
    warnings.warn(f"gsae_fast: compiled kernels not available ({_ext_error}); using the "
                  "PyTorch reference executor", RuntimeWarning, stacklevel=2)
else:
    from ._build import cuda_build_warning  # a CUDA compile that failed or was skipped at install
    _cuda_warning = cuda_build_warning()
    if _cuda_warning is not None:
        warnings.warn(_cuda_warning, RuntimeWarning, stacklevel=2)


def _has_kernel(op: str, key: str) -> bool:
    return _ext_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _triton_kernels():
    try:
        return importlib.import_module("gsae_fast.kernels")
    except ImportError:
        return None


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got a tensor on {device}"
        if not _has_kernel("gsae_fast_C::gated_encode", "CPU"):
            return f"the C++ extension gsae_fast._C is not built ({_ext_error})"
        return None
    if backend == "cuda_emulated":
        if device.type != "cpu":
            return f"backend 'cuda_emulated' runs on CPU tensors, got a tensor on {device}"
        if not _has_kernel("gsae_fast_emu::gated_encode", "CPU"):
            return f"the C++ extension gsae_fast._C is not built ({_ext_error})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}"
        if not _has_kernel("gsae_fast_C::gated_encode", "CUDA"):
            return ("gsae_fast._C was built without CUDA kernels (rebuild on a machine with a "
                    "CUDA toolkit, or GSAE_FAST_CUDA=1)")
        return None
    # triton: CUDA tensors, or CPU tensors under the Triton interpreter (for testing).
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        return (f"backend 'triton' runs on CUDA tensors (or on CPU tensors with "
                f"TRITON_INTERPRET=1), got a tensor on {device}")
    kernels = _triton_kernels()
    if kernels is None:
        return "the Triton executor is not available (triton is not installed)"
    if not kernels.EXECUTOR_READY:
        return f"the Triton executor is not available: {kernels.NOT_READY}"
    if device.type == "cpu" and not kernels.INTERPRET:
        return "TRITON_INTERPRET=1 was set after gsae_fast.kernels was imported"
    return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


# Under torch.compile the choice is made once, at trace time (it reads the dispatcher's tables,
# which a graph cannot hold), and the graph keeps the result.
@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device | str) -> str:
    """The concrete backend for a call on ``device``; a clear error if it cannot run there."""
    device = torch.device(device)
    if backend == "auto":
        for b in _AUTO_ORDER.get(device.type, ("reference",)):
            if why_unavailable(b, device) is None:
                return b
        return "reference"
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"gsae_fast: backend {backend!r} is not usable: {reason}")
    return backend


def executor(backend: str):
    """The kernel functions of a concrete backend (gated_encode, encode_grad_scatter,
    sparse_decode, sparse_decode_backward, sparse_decode_pair, sparse_decode_pair_backward: the
    contract of gsae_fast.torch_executor)."""
    if backend == "reference":
        return torch_executor
    if backend in ("cpu", "cuda"):
        return torch.ops.gsae_fast_C
    if backend == "cuda_emulated":
        return torch.ops.gsae_fast_emu
    if backend == "triton":
        return _triton_kernels()  # resolve() has checked that it is ready
    raise ValueError(f"unknown backend {backend!r}")



# --------------------------------------------------------------------------------------------
# How the GPU executors scatter the decoder gradient: one setting for every executor.
# --------------------------------------------------------------------------------------------

SCATTER_MODES = ("auto", "grouped", "atomic")
_scatter_override: Optional[str] = None


def _check_scatter(mode: str, where: str) -> str:
    if mode not in SCATTER_MODES:
        raise ValueError(f"{where} must be one of {SCATTER_MODES}, got {mode!r}")
    return mode


def set_scatter(mode: Optional[str]) -> None:
    """Choose how ``grad W_dec`` is scattered on the GPU executors (Triton, CUDA):

    - ``"grouped"``: the active pairs sorted by feature, one program per output tile, added in a
      fixed order: bitwise reproducible;
    - ``"atomic"``: fp32 atomic adds in arrival order: no sort, faster, the last bits vary from
      run to run;
    - ``"auto"`` (the default): grouped under ``torch.use_deterministic_algorithms(True)``,
      atomic otherwise.

    Deterministic mode always gets the grouped scatter. ``None`` drops the override and goes back
    to the environment variable ``GSAE_FAST_SCATTER`` (read at every call; default ``"auto"``).
    The CPU executors always group (reproducible, and on a CPU the fastest); every encoder
    gradient is grouped (it is written straight in the weights' dtype, no fp32 staging copy)."""
    global _scatter_override
    _scatter_override = None if mode is None else _check_scatter(mode, "scatter mode")


def deterministic_scatter() -> bool:
    """Whether the decoder gradient is to be scattered in a fixed order (see set_scatter).
    The op layer asks once per call and passes the answer to the executor."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    mode = _scatter_override or _check_scatter(os.environ.get("GSAE_FAST_SCATTER", "auto"),
                                               "GSAE_FAST_SCATTER")
    return mode == "grouped"
