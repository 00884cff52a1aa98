"""The "cuda" executor (csrc/cuda): built whenever a CUDA toolkit is found (checked here without
a GPU, so a compile error is a red CI), and, marked ``gpu``, checked against the torch executor
at odd sizes in every dtype (real sizes, forward and backward, and bitwise reproducibility under
deterministic mode are in tests/test_gpu.py with the Triton executor; the same kernels run on the
CPU in tests/test_cuda_emulated.py)."""
import os
import shutil

import pytest
import torch

from conftest import GPU_TOL, make_params, make_x, rel_err
from gsae_fast import backends, ops

OPS = ("gated_encode", "encode_grad_scatter", "sparse_decode", "sparse_decode_backward",
       "sparse_decode_pair", "sparse_decode_pair_backward")


def _toolkit() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return torch.version.cuda is not None and (
        os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None)


def test_cuda_kernels_are_built_when_a_toolkit_is_present():
    if not _toolkit():
        pytest.skip("no CUDA toolkit on this machine: the CUDA sources are not built")
    assert backends._ext_error is None, backends._ext_error
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gsae_fast_C::{op}", "CUDA"), op


def _cuda_vs_torch_executor(B, d_in, d_sae, dtype, capacity, l0_frac=0.2):
    p, W_dec = make_params(d_in, d_sae, dtype, l0_frac=l0_frac, device="cuda")
    x = make_x((B, d_in), dtype, device="cuda")
    ours = ops.gated_encode(x, *p.values(), capacity=capacity, backend="cuda")
    ref = ops.gated_encode(x, *p.values(), capacity=capacity, backend="reference")
    return p, W_dec, x, ours, ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_TOL))
@pytest.mark.parametrize("shape,capacity", [((37, 19, 53), 8), ((150, 600, 500), None),
                                            ((1, 33, 7), 7), ((0, 16, 40), 4)])
def test_gpu_odd_shapes_match_the_torch_executor(dtype, shape, capacity):
    B, d_in, d_sae = shape
    p, W_dec, x, ours, ref = _cuda_vs_torch_executor(B, d_in, d_sae, dtype, capacity)
    assert ours.capacity == ref.capacity
    if B:
        flips = (ours.counts.long() - ref.counts.long()).abs().sum().item()
        assert flips <= 1e-4 * B * d_sae + 1
        assert rel_err(ours.to_dense(), ref.to_dense()) < GPU_TOL[dtype] * 10
    x_hat = ops.sparse_decode(ours, W_dec, p["b_dec"], backend="cuda")
    x_ref = ops.sparse_decode(ours, W_dec, p["b_dec"], backend="reference")
    assert x_hat.shape == (B, d_in) and x_hat.dtype == dtype
    if B:
        assert rel_err(x_hat, x_ref) < GPU_TOL[dtype]


@pytest.mark.gpu
def test_gpu_encode_backward_matches_the_torch_executor():
    """The op's backward alone (sparse dz, grad W_enc, biases, x) against the torch executor."""
    p, W_dec, x, acts, _ = _cuda_vs_torch_executor(300, 200, 1000, torch.float32, None)
    g = make_x(acts.f.shape, torch.float32, seed=5, device="cuda")
    args = (x, *p.values(), acts.idx, acts.f.detach(), acts.pi_gate.detach(), acts.counts, g,
            2 * g, True)
    ours = ops.gated_encode_backward(*args, "cuda")
    ref = ops.gated_encode_backward(*args, "reference")
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5
