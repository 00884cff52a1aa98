"""The dense switch: above which capacity (expected largest row count) the Gated SAE loss runs the
dense math instead of the sparse kernels, per device type. On the CPU it is measured
(DENSE_SWITCH_FRACTION); on CUDA devices it comes from a byte/flop model of the two steps
(dense_switch_model, bench/NOTES.md "dense switch per device"; bench/traffic.py counts the same
per op); the user can override it (set_dense_switch, GSAE_FAST_DENSE_SWITCH).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

# --------------------------------------------------------------------------------------------
# The loss goes dense when the capacity (the expected largest row count, ~1.25x the last one)
# exceeds a fraction of d_sae. That fraction is a property of the device:
#   1. set_dense_switch(fraction, device_type=...) (device_type=None: every device type);
#   2. the environment variable GSAE_FAST_DENSE_SWITCH, read at each call: "0.05" (every device
#      type) or "cuda=0.02,cpu=0.2" (per device type);
#   3. the default: CPU (and any device type without a model) DENSE_SWITCH_FRACTION, measured;
#      CUDA: dense_switch_model(...) for the device's roofline (DEVICE_ROOFLINES), computed.
# DENSE_SWITCH_FRACTION, from bench/results/step_cpu.md at 2222b28 (bench/NOTES.md, "dense
# switch"): at mean L0 = d_sae / 8 (largest row 0.147 d_sae, capacity 0.185 d_sae) the sparse
# step (777 ms) and the dense one (797 ms) cost the same on 2 CPU cores then (with the pair decode
# the sparse step is faster there now: NOTES.md section 6; not yet re-measured). (Change it with
# set_dense_switch(fraction, "cpu"), not by assignment.)
DENSE_SWITCH_FRACTION = 0.2
DENSE_SWITCH_ENV = "GSAE_FAST_DENSE_SWITCH"
_dense_switch_override: dict = {}  # device type (None = every type) -> fraction


@dataclass(frozen=True)
class Roofline:
    """What a device can do: datasheet dense FLOP/s per compute dtype and HBM bytes/s, and the
    achievable fractions of each (a large cuBLAS GEMM, a device-to-device copy)."""
    name: str
    flops: dict  # "bf16" / "fp16" / "tf32" / "fp32" / "fp64" -> datasheet dense FLOP/s
    bandwidth: float  # datasheet HBM bytes/s
    flops_efficiency: float = 795 / 989  # H100: ~795 of 989 TFLOP/s in a large bf16 GEMM
    bandwidth_efficiency: float = 0.9  # H100 ~3.0 of 3.35 TB/s, H200 ~4.3 of 4.8 (copy)

    def peak_flops(self, dtype: torch.dtype = torch.bfloat16, achievable: bool = True) -> float:
        key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype)
        if key is None:  # fp32: TF32 tensor cores only where torch allows them
            key = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
        return self.flops[key] * (self.flops_efficiency if achievable else 1.0)

    def peak_bandwidth(self, achievable: bool = True) -> float:
        return self.bandwidth * (self.bandwidth_efficiency if achievable else 1.0)


_H100_FLOPS = dict(bf16=989e12, fp16=989e12, tf32=494.7e12, fp32=66.9e12, fp64=66.9e12)
# Matched against torch.cuda.get_device_name() (first match wins; most specific first).
DEVICE_ROOFLINES = (
    ("H200", Roofline("H200", _H100_FLOPS, 4.8e12, bandwidth_efficiency=4.3 / 4.8)),
    ("GH200", Roofline("GH200", _H100_FLOPS, 4.0e12)),
    ("H100 PCIe", Roofline("H100 PCIe", dict(bf16=756e12, fp16=756e12, tf32=378e12,
                                             fp32=51.2e12, fp64=51.2e12), 2.0e12)),
    ("H100", Roofline("H100 SXM", _H100_FLOPS, 3.35e12, bandwidth_efficiency=3.0 / 3.35)),
    ("H800", Roofline("H800", _H100_FLOPS, 3.35e12)),
    ("A100", Roofline("A100 80GB SXM", dict(bf16=312e12, fp16=312e12, tf32=156e12,
                                            fp32=19.5e12, fp64=19.5e12), 2.039e12)),
)
DEFAULT_ROOFLINE = DEVICE_ROOFLINES[3][1]  # an unknown CUDA device: the H100's balance


def device_roofline(device_name: str) -> Roofline:
    """The Roofline of a CUDA device by name (torch.cuda.get_device_name); H100 SXM if unknown."""
    for key, roof in DEVICE_ROOFLINES:
        if key.lower() in device_name.lower():
            return roof
    return DEFAULT_ROOFLINE


# The byte/flop model of one training step (bench/NOTES.md, "dense switch per device";
# bench/traffic.py counts the same per op). Per token, with s = bytes per element:
#   dense  = DENSE_GEMMS * 2 * d_in * d_sae flops  +  DENSE_ELEMENTWISE_BYTES * d_sae bytes
#   sparse = 1 * 2 * d_in * d_sae flops (the encode)  +  SPARSE_ROW_PASSES * L0 * d_in * s bytes
# (the [d_sae, d_in] terms, the gradient writes and Adam, are the same in both and cancel). They
# cross at L0* / d_sae = ((DENSE_GEMMS - 1) * 2 * BW / F + DENSE_ELEMENTWISE_BYTES / d_in)
#                        / (SPARSE_ROW_PASSES * s),
# and the switch compares the capacity, CAPACITY_OVER_L0 * L0, with fraction * d_sae.
# The dense step's GEMMs (reference.gated_sae_loss, sparsity "unit", aux "frozen", forward and
# backward): z, x_hat, the aux decode; grad f, grad W_dec, grad relu(pi_gate) (aux), grad W_enc,
# grad (x - b_dec) (for grad b_dec). tests/test_traffic.py counts them with a dispatch mode.
DENSE_GEMMS = 8
# Bytes per [B, d_sae] element of the dense step's elementwise ops (forward + backward, bf16,
# matmuls excluded): counted from reference.gated_sae_loss by bench/traffic.py
# (dense_elementwise_bytes; checked by tests/test_traffic.py).
DENSE_ELEMENTWISE_BYTES = 81.0
# Whole d_in-rows gathered per active (token, feature) pair in today's sparse step: W_dec once
# in the pair decode (x_hat and the aux reconstruction) and once in its backward (both value
# gradients) (2), the grad_out row in grad W_dec and the x row in grad W_enc (2).
# bench/traffic.py counts them from the kernels' loops.
SPARSE_ROW_PASSES = 4
# The capacity the loss is handed (ops.next_capacity of the last batch's largest row) over the
# mean L0: 1.25 headroom x largest row / mean (0.147 / 0.125 = 1.18 in bench/results/step_cpu.md
# at 2222b28).
CAPACITY_OVER_L0 = 1.25 * 0.147 / 0.125
# d_in the per-device default is computed for (the headline shape, d_in = 2304).
MODEL_D_IN = 2304


def dense_switch_model(roofline: Roofline, dtype: torch.dtype = torch.bfloat16,
                       d_in: int = MODEL_D_IN, achievable: bool = True) -> dict:
    """The model's crossing for a device: ``l0_fraction`` (mean L0 / d_sae where the sparse and
    the dense step cost the same) and ``fraction`` (the capacity switch, l0_fraction *
    CAPACITY_OVER_L0). Shape-free but for the elementwise term's d_in."""
    s = torch.finfo(dtype).bits // 8
    F, BW = roofline.peak_flops(dtype, achievable), roofline.peak_bandwidth(achievable)
    gemm_term = (DENSE_GEMMS - 1) * 2 * BW / F
    elementwise_term = DENSE_ELEMENTWISE_BYTES * (s / 2) / d_in  # counted in bf16
    l0_fraction = (gemm_term + elementwise_term) / (SPARSE_ROW_PASSES * s)
    return dict(l0_fraction=l0_fraction, fraction=l0_fraction * CAPACITY_OVER_L0,
                gemm_term=gemm_term, elementwise_term=elementwise_term, flops=F, bandwidth=BW)


def _parse_env(value: str) -> dict:
    out = {}
    for part in value.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, _, num = part.rpartition("=") if "=" in part else ("", "", part)
        try:
            out[key.strip() or None] = _check_fraction(float(num))
        except ValueError as e:
            raise ValueError(f"{DENSE_SWITCH_ENV}={value!r}: expected a fraction or "
                             f"'device_type=fraction,...' ({e})") from None
    return out


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not fraction >= 0:  # NaN too
        raise ValueError(f"the dense switch fraction must be >= 0, got {fraction}")
    return fraction


def set_dense_switch(fraction: Optional[float], device_type: Optional[str] = None) -> None:
    """Override the dense switch: the loss runs the dense math when the capacity exceeds
    ``fraction * d_sae`` on devices of ``device_type`` ("cpu", "cuda", ...; None: every type
    without an override of its own). ``fraction=None`` removes the override (back to the
    environment variable GSAE_FAST_DENSE_SWITCH, then the default); 0 always runs dense, >= 1
    never does."""
    if device_type is not None:
        device_type = torch.device(device_type).type
    if fraction is None:
        _dense_switch_override.pop(device_type, None)
    else:
        _dense_switch_override[device_type] = _check_fraction(fraction)


def _device_of(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=None)
def _cuda_default(index: Optional[int], dtype: torch.dtype, tf32: bool) -> float:
    name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else ""
    return dense_switch_model(device_roofline(name), dtype)["fraction"]


def default_dense_switch(device=None, dtype: Optional[torch.dtype] = None) -> float:
    """The built-in fraction (no override, no environment variable) for a device and a compute
    dtype (default bf16): the model's for CUDA, the measured DENSE_SWITCH_FRACTION elsewhere."""
    dev = _device_of(device)
    if dev.type != "cuda":
        return DENSE_SWITCH_FRACTION
    dtype = torch.bfloat16 if dtype is None else dtype
    return _cuda_default(dev.index, dtype, bool(torch.backends.cuda.matmul.allow_tf32))


def dense_switch_fraction(device=None, dtype: Optional[torch.dtype] = None) -> float:
    """The fraction of d_sae above which the loss goes dense on ``device`` (default CPU) for a
    compute ``dtype``: the override, else GSAE_FAST_DENSE_SWITCH, else the default."""
    t = _device_of(device).type
    for table in (_dense_switch_override, _parse_env(os.environ.get(DENSE_SWITCH_ENV, ""))):
        for key in (t, None):
            if key in table:
                return table[key]
    return default_dense_switch(device, dtype)


def dense_is_faster(capacity: Optional[int], d_sae: int, device=None,
                    dtype: Optional[torch.dtype] = None) -> bool:
    """The loss switch: a capacity (expected largest row) above ``dense_switch_fraction(device,
    dtype) * d_sae`` (``device`` None: the CPU's figure)."""
    return capacity is not None and capacity > dense_switch_fraction(device, dtype) * d_sae
