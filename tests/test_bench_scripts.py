"""The benchmark scripts run end to end on tiny shapes (their figures are not checked here:
speed is measured by bench/, never by unit tests)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gsae_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif("triton" not in gsae_fast.available_backends(
    "cuda" if torch.cuda.is_available() else "cpu"), reason="triton is not installed")
def test_bench_gpu_smoke(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--smoke",
                          "--dtype", "fp32", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the results record what produced them
    [name] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    meta = json.loads((tmp_path / name).read_text())["meta"]
    for key in ("device", "commit", "date", "torch", "triton"):
        assert meta[key], key
        assert str(meta[key]) in (tmp_path / name.replace(".json", ".md")).read_text()
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


@pytest.mark.skipif("triton" not in gsae_fast.available_backends(
    "cuda" if torch.cuda.is_available() else "cpu"), reason="triton is not installed")
def test_bench_gpu_quick_cases_and_failures(monkeypatch, tmp_path):
    """--quick --dtype: the full shape at L0 32 in the dtypes asked for; an executor that raises
    is recorded in the results (written anyway) and the exit code. Nothing is measured: the
    case builder and the encode are replaced."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_gpu
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    made = []

    def make_case(shape, dtype, l0, device):
        made.append((shape, dtype, l0))
        return None, None

    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(bench_gpu, "make_case", make_case)
    monkeypatch.setattr(bench_gpu, "bench_encode", broken)
    monkeypatch.setattr(bench_gpu, "copy_bandwidth_gbs", lambda device, repeats: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--quick", "--dtype", "bf16", "--dtype",
                                      "float16", "--executor", "triton", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="kernel failed"):
        bench_gpu.main()
    assert made == [(bench_gpu.FULL, torch.bfloat16, 32), (bench_gpu.FULL, torch.float16, 32)]
    [name] = [f for f in os.listdir(tmp_path) if f.endswith("_quick.json")]
    meta = json.loads((tmp_path / name).read_text())["meta"]
    assert meta["repeats"] == 5 and meta["executors"] == ["triton"]
    assert sorted(meta["errors"]) == ["bfloat16 L0=32 triton", "float16 L0=32 triton"]
    assert "Failed: bfloat16 L0=32 triton (RuntimeError: kernel failed)" in \
        (tmp_path / name.replace(".json", ".md")).read_text()


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


def test_bench_gpu_crossing():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_gpu
    # sparse / dense = 0.5 at L0 100, 2 at L0 400: log-linear midpoint 200
    assert abs(bench_gpu.crossing([(100, 1.0, 2.0), (400, 2.0, 1.0)]) - 200) < 1e-9
    assert bench_gpu.crossing([(100, 1.0, 2.0), (400, 1.0, 1.5)]) is None
    assert bench_gpu.crossing([(100, 3.0, 2.0), (400, 4.0, 1.0)]) == 100  # dense everywhere


@pytest.mark.skipif("triton" not in gsae_fast.available_backends(
    "cuda" if torch.cuda.is_available() else "cpu"), reason="triton is not installed")
def test_bench_gpu_sweep_smoke(tmp_path):
    """--sweep: the sparse and the dense step at each L0, the crossing printed (two tiny L0s)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--smoke",
                          "--sweep", "--dtype", "fp32", "--executor", "triton", "--l0", "4",
                          "--l0", "16", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "measured crossing L0" in res.stdout and "| triton | 4 |" in res.stdout
    [name] = [f for f in os.listdir(tmp_path) if f.endswith("_sweep.json")]
    data = json.loads((tmp_path / name).read_text())
    assert [r["target_l0"] for r in data["rows"]] == [4, 16]
    assert all(r["sparse_step_ms"] > 0 and r["dense_step_ms"] > 0 for r in data["rows"])
    if torch.cuda.is_available():
        assert "model_l0" in data["results"]["triton"]
