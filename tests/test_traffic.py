"""The traffic model (bench/traffic.py) against hand computations, and the per-device dense
switch (gsae_fast.dense_switch): override, environment variable, device types, the CPU default,
and the loss choosing dense or sparse by it."""
import os
import sys

import pytest
import torch

from conftest import CPU_BACKENDS, make_params, make_x
from gsae_fast import dense_switch, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import traffic  # noqa: E402

SPARSE = [b for b in CPU_BACKENDS if b != "reference"]


@pytest.fixture(autouse=True)
def clean_switch(monkeypatch):
    monkeypatch.delenv(dense_switch.DENSE_SWITCH_ENV, raising=False)
    saved = dict(dense_switch._dense_switch_override)
    dense_switch._dense_switch_override.clear()
    yield
    dense_switch._dense_switch_override.clear()
    dense_switch._dense_switch_override.update(saved)


def by_name(ops_, prefix):
    [op] = [o for o in ops_ if o.name.startswith(prefix)]
    return op


def test_traffic_by_hand():
    # B=2 tokens, d_in=3, d_sae=5, L0=2, K=4 slots, bf16 (s=2), fp32 values, int32 idx.
    B, d_in, d_sae, l0, K, s = 2, 3, 5, 2, 4, 2
    m = traffic.step_ops(B, d_in, d_sae, l0, s=s, K=K)
    P = 4  # active pairs
    enc = by_name(m, "encode: GEMM")
    assert enc.flops == 2 * 2 * 3 * 5 == 60
    # x 12 + W_enc 30 + b_gate/r_mag/b_mag 30 + b_dec 6 + 4 pairs * (4 + 8) + counts 8
    assert enc.min_bytes == 12 + 30 + 30 + 6 + 48 + 8
    dec = by_name(m, "decode fwd")
    # 4 gathered rows of 3 bf16 + (idx 4 + val 4) per pair + x_hat 12 + bias 6
    assert dec.min_bytes == 4 * 6 + 4 * 8 + 12 + 6 == 74
    assert dec.flops == 2 * P * d_in == 24
    # Triton: one column block (d_in <= 256), the bias read by each of the B programs
    assert dec.triton_bytes == 24 + 32 + 12 + 2 * 6
    vg = by_name(m, "decode bwd: value grad")
    # rows 24 + pairs (idx 4 + grad_val 4) 32 + grad_out 12
    assert vg.min_bytes == 24 + 32 + 12
    # Triton: idx of the active slots 16, grad_out re-read per 16-slot block (1), grad_val
    # zeroed and stored on all 8 slots (2 * 8 * 4)
    assert vg.triton_bytes == 24 + 16 + 12 + 64
    gw = by_name(m, "decode bwd: grad W_dec")
    assert gw.min_bytes == 12 + 4 * 8 + 30  # grad_out once, pairs, the [5, 3] gradient
    adam = by_name(m, "Adam")
    assert adam.min_bytes == 7 * 2 * (15 + 15 + 15 + 3)
    # row passes: 2 at the floor (W_dec once forward, once backward), 4 today (W_dec once
    # forward and once backward through the pair kernels, a grad_out row in grad W_dec, an x row
    # in grad W_enc)
    assert traffic.row_passes((B, d_in, d_sae), l0) == (2, 4)
    assert traffic.row_passes()[1] == dense_switch.SPARSE_ROW_PASSES


def test_floors_by_hand():
    roof = dense_switch.device_roofline("NVIDIA H200")
    assert roof.name == "H200"
    assert roof.peak_bandwidth() == pytest.approx(4.3e12)
    assert roof.peak_flops(torch.bfloat16) == pytest.approx(795e12, rel=1e-3)
    h100 = dense_switch.device_roofline("NVIDIA H100 80GB HBM3")
    assert h100.peak_bandwidth() == pytest.approx(3.0e12)
    assert dense_switch.device_roofline("Some future GPU") is dense_switch.DEFAULT_ROOFLINE
    # the encode at the headline shape is GEMM-bound: 2 * 4096 * 2304 * 65536 / 795e12
    f = traffic.floors_ms(traffic.HEADLINE, 32, torch.bfloat16, roof)
    gemm_ms = 2 * 4096 * 2304 * 65536 / (989e12 * 795 / 989) * 1e3
    assert f["encode_floor_ms"] == pytest.approx(gemm_ms, rel=1e-9)
    # decode fwd + bwd floor: memory-bound, by hand at 4.3 TB/s
    B, d_in, d_sae = traffic.HEADLINE
    P = B * 32
    fwd = P * d_in * 2 + P * 8 + B * d_in * 2 + d_in * 2
    val = P * d_in * 2 + P * 8 + B * d_in * 2
    gw = B * d_in * 2 + P * 8 + d_in * d_sae * 2
    assert f["decode_floor_ms"] == pytest.approx((fwd + val + gw) / 4.3e12 * 1e3, rel=1e-9)


def test_dense_step_counts_match_the_model_constants():
    c = traffic.dense_step_counts()
    assert c["gemms"] == dense_switch.DENSE_GEMMS
    assert c["elementwise_bytes"] == dense_switch.DENSE_ELEMENTWISE_BYTES


def test_switch_model_by_hand():
    roof = dense_switch.device_roofline("H100")
    m = dense_switch.dense_switch_model(roof, torch.bfloat16, d_in=2304)
    F, BW = 989e12 * 795 / 989, 3.0e12
    l0f = ((8 - 1) * 2 * BW / F + 81 / 2304) / (4 * 2)
    assert m["l0_fraction"] == pytest.approx(l0f, rel=1e-9)
    assert m["fraction"] == pytest.approx(l0f * 1.25 * 0.147 / 0.125, rel=1e-9)
    h200 = dense_switch.dense_switch_model(dense_switch.device_roofline("H200"))["fraction"]
    # far below the CPU's 0.2 on both; more bandwidth per flop switches later
    assert 0.005 < m["fraction"] < h200 < 0.03


def test_cpu_default_unchanged():
    assert dense_switch.DENSE_SWITCH_FRACTION == 0.2
    assert dense_switch.dense_switch_fraction() == 0.2
    assert dense_switch.dense_switch_fraction("cpu", torch.float32) == 0.2
    assert dense_switch.default_dense_switch("cpu") == 0.2
    assert not dense_switch.dense_is_faster(200, 1000) and dense_switch.dense_is_faster(201, 1000)
    assert not dense_switch.dense_is_faster(None, 1000)


def test_cuda_default_is_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    dense_switch._cuda_default.cache_clear()
    try:
        want = dense_switch.dense_switch_model(dense_switch.device_roofline("H200"),
                                               torch.bfloat16)["fraction"]
        assert dense_switch.dense_switch_fraction("cuda:0", torch.bfloat16) == pytest.approx(want)
        assert dense_switch.dense_switch_fraction("cuda") == pytest.approx(want)  # bf16 by default
        assert dense_switch.dense_is_faster(int(0.03 * 65536), 65536, "cuda", torch.bfloat16)
        assert not dense_switch.dense_is_faster(int(0.03 * 65536), 65536, "cpu", torch.bfloat16)
    finally:
        dense_switch._cuda_default.cache_clear()


def test_override_env_and_device_types(monkeypatch):
    dense_switch.set_dense_switch(0.5, device_type="cpu")
    assert dense_switch.dense_switch_fraction("cpu") == 0.5
    dense_switch.set_dense_switch(0.05)  # every device type without its own override
    assert dense_switch.dense_switch_fraction("cpu") == 0.5
    assert dense_switch.dense_switch_fraction("cuda") == 0.05
    dense_switch.set_dense_switch(None, device_type="cpu")
    assert dense_switch.dense_switch_fraction("cpu") == 0.05
    dense_switch.set_dense_switch(None)
    assert dense_switch.dense_switch_fraction("cpu") == 0.2
    monkeypatch.setenv(dense_switch.DENSE_SWITCH_ENV, "0.3")
    fraction = dense_switch.dense_switch_fraction
    assert fraction("cpu") == 0.3 == fraction("cuda")
    monkeypatch.setenv(dense_switch.DENSE_SWITCH_ENV, "cuda=0.01, cpu=0.4")
    assert fraction("cpu") == 0.4 and fraction("cuda:1") == 0.01
    dense_switch.set_dense_switch(0.25, "cpu")  # the override beats the environment
    assert dense_switch.dense_switch_fraction("cpu") == 0.25
    monkeypatch.setenv(dense_switch.DENSE_SWITCH_ENV, "cpu=lots")
    dense_switch.set_dense_switch(None, "cpu")
    with pytest.raises(ValueError, match=dense_switch.DENSE_SWITCH_ENV):
        dense_switch.dense_switch_fraction("cpu")
    with pytest.raises(ValueError):
        dense_switch.set_dense_switch(-0.1)
    with pytest.raises(ValueError):
        dense_switch.set_dense_switch(float("nan"))
    monkeypatch.delenv(dense_switch.DENSE_SWITCH_ENV)
    # the old way still works
    dense_switch.DENSE_SWITCH_FRACTION, saved = 1.0, dense_switch.DENSE_SWITCH_FRACTION
    try:
        assert dense_switch.dense_switch_fraction("cpu") == 1.0
    finally:
        dense_switch.DENSE_SWITCH_FRACTION = saved


def test_the_loss_follows_the_switch(monkeypatch):
    p, W_dec = make_params(10, 64, torch.float64, l0_frac=0.5)
    x = make_x((30, 10))
    args = (x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"], p["b_mag"], 0.1)
    run = lambda: ops.gated_sae_loss(*args, backend=SPARSE[0],  # noqa: E731
                                     capacity=20)
    assert run().acts is None  # 20 > 0.2 * 64: dense by the CPU default
    dense_switch.set_dense_switch(0.5, "cpu")
    assert run().acts is not None  # 20 <= 32: sparse
    # another device type's override changes nothing here
    dense_switch.set_dense_switch(0.5, "cuda")
    dense_switch.set_dense_switch(None, "cpu")
    assert run().acts is None
    monkeypatch.setenv(dense_switch.DENSE_SWITCH_ENV, "cpu=0.9")
    assert run().acts is not None
