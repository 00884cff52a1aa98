"""bench/gpu_check.py, the one command for a GPU machine: its dry mode (no GPU) runs every step
with its CPU stand-in and passes; the step runner's outcomes (ok, FAILED, timeout, refused), the
exit code, and the headlines read from the outputs the real steps print."""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402  (imports no torch)

PY = sys.executable


def test_dry_run_passes_every_step(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    res = subprocess.run([PY, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry", str(out)],
                         capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, TMPDIR=str(scratch)))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    # the table comes last: a header and one row per step, in order, each ok
    lines = res.stdout.rstrip().splitlines()[-len(gpu_check.STEPS) - 1:]
    assert lines[0].split() == ["step", "outcome", "seconds", "headline"]
    for name, line in zip(gpu_check.STEPS, lines[1:]):
        assert line.split()[:2] == [name, "ok"], line
    files = sorted(os.listdir(out))
    assert files == sorted({"summary.md", "summary.json"}
                           | {log for _, log in gpu_check.STEPS.values()})
    assert len(files) <= 8
    md = (out / "summary.md").read_text()
    for key in ("device", "commit", "date", "torch", "triton"):
        assert re.search(rf"^- {key}: \S", md, re.M), key
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["meta"][k] for k in ("device", "commit", "date", "torch", "triton"))
    assert [s["outcome"] for s in summary["steps"]] == ["ok"] * len(gpu_check.STEPS)
    assert summary["exit_code"] == 0
    head = {s["step"]: s["headline"] for s in summary["steps"]}
    assert re.match(r"\d+ gpu tests collected", head["pytest"])
    assert re.search(r"\d+ cases, 0 mismatches", head["memcheck"])
    assert re.match(r"6 steps on cpu", head["torchrun"])
    assert summary["bench"]["rows"] and "encode/GEMM" in head["bench"]
    # the cache, the training run and the benchmark files went to a scratch folder, removed
    assert not [p for p in os.listdir(scratch) if p.startswith("gsae_gpu_check_")]


def test_step_outcomes_and_exit_code(tmp_path):
    log = str(tmp_path / "step.log")

    def run(cmds, cap=60, **kw):
        return gpu_check.run_step("s", [[PY, "-c", c] for c in cmds], cap, log, **kw)

    r = run(["print('hello')"])
    assert (r["outcome"], r["exit"]) == ("ok", [0]) and "hello" in r["output"]
    r = run(["raise SystemExit(3)", "print('after')"])  # later commands still run
    assert (r["outcome"], r["exit"]) == ("FAILED", [3, 0]) and "after" in r["output"]
    assert run(["raise SystemExit(3)"], check=False)["outcome"] == "ok"  # a record only
    t0 = time.monotonic()
    r = run(["import time; time.sleep(60)", "print('never')"], cap=1)
    assert r["outcome"] == "timeout" and time.monotonic() - t0 < 20
    assert "never" not in r["output"]
    r = run(["print('========= Error: Device not supported'); raise SystemExit(1)"],
            refused=gpu_check.REFUSED)
    assert r["outcome"] == "refused"
    assert run(["raise SystemExit(1)"], refused=gpu_check.REFUSED)["outcome"] == "FAILED"
    r = gpu_check.run_step("s", [["compute-sanitizer-missing-here"]], 10, log)
    assert r["outcome"] == "FAILED" and r["exit"] == [127]
    assert "command not found" in r["output"]
    assert re.search(gpu_check.REFUSED, "compute-sanitizer: command not found (...)")

    def steps(*outcomes, required=True):
        return [{"step": str(i), "outcome": o, "required": required}
                for i, o in enumerate(outcomes)]

    assert gpu_check.exit_code(steps("ok", "refused", "ok")) == 0
    assert gpu_check.exit_code(steps("ok", "FAILED")) == 1
    assert gpu_check.exit_code(steps("timeout", "ok")) == 1
    assert gpu_check.exit_code(steps("FAILED", "timeout", required=False)) == 0
    assert sum(cap for cap, _ in gpu_check.STEPS.values()) <= 540


def test_headlines_from_the_gpu_outputs():
    """The formats the real steps print (pytest, compute-sanitizer, gpu_sanitize)."""
    ph = gpu_check.pytest_headline
    assert ph("...\n===== 40 passed, 2 failed, 7 skipped in 151.20s (0:02:31) =====\n") == \
        "40 passed, 2 failed, 7 skipped"
    assert ph("49/473 tests collected (424 deselected) in 4.28s\n") == "49 gpu tests collected"
    killed = ("tests/test_cuda.py::a PASSED  [ 2%]\ntests/test_cuda.py::b FAILED  [ 4%]\n"
              "[gw1] [  6%] PASSED tests/test_gpu.py::c\n")  # serial and pytest-xdist lines
    assert ph(killed) == "2 passed, 1 failed so far"
    tail = ("gpu_sanitize: backend cuda on cuda: 11 cases, 0 mismatches, worst max rel error "
            "3.62e-07 (4.2 s)\n")
    sh = gpu_check.sanitizer_headline
    assert sh(tail + "========= ERROR SUMMARY: 0 errors\n") == \
        "ERROR SUMMARY: 0 errors; cuda: 11 cases, 0 mismatches, worst rel err 3.62e-07"
    assert sh(tail + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
              "\n").startswith("RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings);")
    assert sh("========= Error: Device not supported\n").startswith("refused: Device not")
    rows = [{"dtype": "bfloat16", "executor": "triton", "encode_op_over_gemm": 1.1234,
             "step_speedup_vs_reference": 5.678}]
    assert gpu_check.bench_headline(rows, {"errors": {"bfloat16 L0=32 cuda": "x"}}) == \
        "bfloat16 triton: encode/GEMM 1.12, step 5.68x ref; bfloat16 L0=32 cuda: failed"


def test_gpu_mode_commands_and_summary(monkeypatch, tmp_path):
    """The GPU mode's plumbing without a GPU: each step's commands (recorded, not run, by a
    stand-in step runner fed the outputs the GPU machine prints), the headlines, a refused
    sanitizer that does not fail the run, and the summary files."""
    env_json = json.dumps({"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                           "triton": "3.6.0", "device": "NVIDIA H200", "capability": "9.0",
                           "cpus": 16})
    outputs = {
        "environment": "GPU 0: NVIDIA H200 (UUID: GPU-1)\nCuda compilation tools, release "
                       f"13.0, V13.0.88\nGPU_CHECK env {env_json}\n",
        "build": 'GPU_CHECK backends {"cpu": ["reference", "cpu"], '
                 '"cuda": ["reference", "cuda", "triton"]}\n',
        "pytest": "== 45 passed, 4 skipped in 150.00s (0:02:30) ==\n",
        "memcheck": "gpu_sanitize: backend cuda on cuda: 11 cases, 0 mismatches, worst max rel "
                    "error 1.00e-07 (3.0 s)\n========= ERROR SUMMARY: 0 errors\n",
        "racecheck": "========= Error: Device not supported\n",
        "torchrun": 'GPU_CHECK train {"steps": 6, "first_loss": 45.0, "last_loss": 40.0, '
                    '"fve": 0.1, "not_finite": []}\n'}
    calls = {}

    def fake_run_step(name, commands, cap_s, log_path, env=None, refused=None, check=True):
        calls[name] = (commands, env, cap_s)
        if name == "bench":  # bench_gpu.py's results file
            out = commands[0][commands[0].index("--out") + 1]
            os.makedirs(out)
            rows = [{"dtype": "bfloat16", "executor": "triton", "encode_op_over_gemm": 1.1,
                     "step_speedup_vs_reference": 5.0}]
            json.dump({"meta": {"errors": {}}, "rows": rows}, open(f"{out}/gpu_h200.json", "w"))
            open(f"{out}/gpu_h200.md", "w").write("# GPU executors\n\n| table |\n")
        output = outputs.get(name, "")
        outcome = "refused" if refused and re.search(refused, output) else "ok"
        return {"step": name, "outcome": outcome, "seconds": 1.0, "exit": [0],
                "log": os.path.basename(log_path), "output": output}

    monkeypatch.setattr(gpu_check, "run_step", fake_run_step)
    assert gpu_check.main([str(tmp_path)]) == 0
    build, b_env, _ = calls["build"]
    assert build[0][1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    assert (b_env["GSAE_FAST_CUDA"], b_env["GSAE_FAST_REQUIRE_EXT"]) == ("1", "1")
    assert b_env["MAX_JOBS"] == str(os.cpu_count()) and "TORCH_CUDA_ARCH_LIST" not in b_env
    assert build[1][-2:] == ["--check-build", "cuda"]
    pytest = [a for a in calls["pytest"][0][0][3:] if a not in ("-n", "4")]  # xdist or not
    assert pytest == ["-v", "-rfE", "--tb=short", "--continue-on-collection-errors", "-m", "gpu",
                      "-p", "no:cacheprovider", "tests"]
    assert calls["pytest"][1]["CUBLAS_WORKSPACE_CONFIG"]
    for tool in ("memcheck", "racecheck"):
        cmd = calls[tool][0][0]
        assert cmd[0].endswith("compute-sanitizer") and cmd[1:3] == ["--tool", tool]
        assert cmd[-1] == "bench/gpu_sanitize.py"
    train = calls["torchrun"][0][1]
    assert train[-2:] == ["--device", "cuda"] and "--parallel" in train
    assert calls["bench"][0][0][-3:] == ["--quick", "--dtype", "bf16"]
    for name, (_, _, cap) in calls.items():  # its own cap and what earlier steps left
        assert cap >= gpu_check.STEPS[name][0], name
    summary = json.loads((tmp_path / "summary.json").read_text())
    head = {s["step"]: (s["outcome"], s["headline"]) for s in summary["steps"]}
    assert head["pytest"] == ("ok", "45 passed, 4 skipped")
    assert head["memcheck"] == ("ok", "ERROR SUMMARY: 0 errors; cuda: 11 cases, 0 mismatches, "
                                      "worst rel err 1.00e-07")
    assert head["racecheck"][0] == "refused" and summary["exit_code"] == 0
    assert head["torchrun"][1] == "6 steps on cuda, loss 45 -> 40, FVE 0.100"
    assert head["bench"][1] == "bfloat16 triton: encode/GEMM 1.1, step 5x ref"
    assert summary["meta"]["device"] == "NVIDIA H200" and summary["meta"]["nvcc"] == "13.0"
    md = (tmp_path / "summary.md").read_text()
    assert "- torch: 2.11.0+cu130" in md and "GPU 0: NVIDIA H200" in md and "| table |" in md
