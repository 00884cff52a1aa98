"""The benchmark scripts run end to end on tiny shapes (their figures are not checked here:
speed is measured by bench/, never by unit tests)."""
import os
import subprocess
import sys

import pytest
import torch

import gsae_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif("triton" not in gsae_fast.available_backends(
    "cuda" if torch.cuda.is_available() else "cpu"), reason="triton is not installed")
def test_bench_gpu_smoke():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for section in ("Fused encode", "Sparse decode", "Training step"):
        assert section in res.stdout
    assert "| float32 |" in res.stdout
    # One row per available GPU executor; an absent one (cuda on CPU) is named as not measured.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for be in ("triton", "cuda"):
        if be in gsae_fast.available_backends(device):
            assert f"| {be} |" in res.stdout, be
        else:
            assert f"Not measured: {be} executor" in res.stdout, be


@pytest.mark.skipif("cpu" not in gsae_fast.available_backends("cpu"),
                    reason="the C++ extension is not built")
def test_bench_interp_quick():
    """bench_interp.py --quick: both implementations and the floor run in fresh processes and
    the dense and sparse effects agree (the script compares them)."""
    pytest.importorskip("transformers")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_interp.py"),
                          "--quick", "--repeats", "1"], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| atp")
            or line.startswith("| ig")]
    assert len(rows) == 2
    for r in rows:
        assert float(r[-2]) < 1e-4  # max relative difference dense vs sparse
