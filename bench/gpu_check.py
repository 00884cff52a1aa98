"""The one command for a machine with a GPU: build, GPU tests, sanitizers, a one-GPU torchrun
training run and the headline benchmark, in at most 540 s of wall time.

    python3 bench/gpu_check.py OUT          # or: make gpu OUT=OUT
    python3 bench/gpu_check.py --dry OUT    # no GPU (CI): the same steps, with CPU stand-ins

Steps (every one runs, even after an earlier one failed; each has its own time cap, and may use
the time earlier steps left unused, so the run never exceeds the sum of the caps):
  environment  nvidia-smi -L, python / torch / triton / nvcc versions, git commit (record only)
  build        GSAE_FAST_CUDA=1 GSAE_FAST_REQUIRE_EXT=1 pip install --no-build-isolation
               --no-deps -e . (MAX_JOBS = cores, TORCH_CUDA_ARCH_LIST from the visible GPU),
               then the "cuda" executor must be available       [dry: the extension imports]
  pytest       python -m pytest -v -m gpu tests (-n 4 with pytest-xdist), CUBLAS_WORKSPACE_CONFIG
               set                                                      [dry: --collect-only]
  memcheck     compute-sanitizer --tool memcheck on bench/gpu_sanitize.py (CUDA kernels only)
  racecheck    the same with --tool racecheck
               "refused" when compute-sanitizer is missing or refuses the device ("Device not
               supported", error 999): not a failure   [dry: gpu_sanitize.py --quick on CPU
               with --backend cuda_emulated, or cpu where that is not built; no sanitizer]
  torchrun     torchrun --nproc-per-node 1 -m gsae_fast.cli train --parallel feature on a small
               synthetic activation cache (NCCL; gloo on CPU), then its log must hold finite
               losses                                                      [dry: --device cpu]
  bench        bench/bench_gpu.py --quick --dtype bf16 (the encode / GEMM ratio and the step
               speed-up)                                                        [dry: --smoke]
Writes OUT/summary.md, OUT/summary.json and one log per step (sanitizer.log holds both
sanitizers): 8 files. Prints the table last; exits 1 if a step failed or timed out
(refused is not a failure; the environment step never fails the run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import ROOT, git_commit, md_table, stamp, triton_version, write_pair  # noqa: E402

PY = sys.executable
SELF = os.path.abspath(__file__)
# step: (time cap in seconds, log file); the caps add up to 540 s
STEPS = {"environment": (20, "environment.log"), "build": (120, "build.log"),
         "pytest": (180, "pytest.log"), "memcheck": (45, "sanitizer.log"),
         "racecheck": (45, "sanitizer.log"), "torchrun": (40, "torchrun.log"),
         "bench": (90, "bench.log")}
# compute-sanitizer missing, or refusing the device (seen on gVisor: "Device not supported",
# then error 999 at the first allocation)
REFUSED = r"(?i:device not supported|error\W{0,3}999\b)|compute-sanitizer: command not found"
LOG_LIMIT = 8 << 20  # bytes kept of one log (head and tail)
MARK = "GPU_CHECK "  # helper output lines the steps' headlines are read from


# ---------------------------------------------------------------------------- running steps

def run_step(name, commands, cap_s, log_path, env=None, refused=None, check=True):
    """Run commands (argv lists) one after another, within cap_s seconds in all, stdout and
    stderr appended to log_path. Outcome: "timeout" (the running command's process group is
    killed, later commands are skipped), "ok" (every command exited 0, or check=False),
    "refused" (output matches the regex `refused`), else "FAILED"."""
    t0 = time.monotonic()
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    rcs, timed_out = [], False
    with open(log_path, "a") as log:
        log.write(f"\n===== {name} (cap {cap_s:.0f} s) =====\n")
        for cmd in commands:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            left = cap_s - (time.monotonic() - t0)
            if left <= 0:
                timed_out = True
                break
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT, start_new_session=True)
            except OSError as e:  # not installed
                log.write(f"{cmd[0]}: command not found ({e})\n")
                rcs.append(127)
                continue
            try:
                rcs.append(proc.wait(timeout=left))
            except subprocess.TimeoutExpired:
                _kill(proc)
                log.write(f"\n[timed out after {cap_s:.0f} s: killed]\n")
                timed_out = True
                break
            log.write(f"[exit {rcs[-1]}]\n")
    seconds = time.monotonic() - t0
    with open(log_path, errors="replace") as f:
        f.seek(start)
        output = f.read()
    if timed_out:
        outcome = "timeout"
    elif refused and re.search(refused, output):
        outcome = "refused"
    elif not check or all(rc == 0 for rc in rcs):
        outcome = "ok"
    else:
        outcome = "FAILED"
    return {"step": name, "outcome": outcome, "seconds": round(seconds, 1), "exit": rcs,
            "log": os.path.basename(log_path), "output": output}


def _kill(proc):
    """SIGTERM to the step's process group (torchrun passes it on to its workers), then
    SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def exit_code(results):
    """1 if a step that counts failed or timed out; "refused" and the environment step never
    fail the run."""
    return int(any(r["outcome"] in ("FAILED", "timeout") and r.get("required", True)
                   for r in results))


def table(results):
    rows = [("step", "outcome", "seconds", "headline")]
    rows += [(r["step"], r["outcome"], f"{r['seconds']:.1f}", r.get("headline", ""))
             for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows)


def _trim(path, limit=LOG_LIMIT):
    """Keep a log under `limit` bytes: its first quarter and its end."""
    if os.path.getsize(path) <= limit:
        return
    with open(path, "rb") as f:
        data = f.read()
    cut = b"\n[... %d bytes cut ...]\n" % (len(data) - limit)
    with open(path, "wb") as f:
        f.write(data[:limit // 4] + cut + data[-(limit - limit // 4 - len(cut)):])


# ------------------------------------------------------------------------------- headlines

def marked(output, key):
    """The JSON a helper printed as `GPU_CHECK key {...}` (the last one), or None."""
    found = re.findall(rf"^{MARK}{key} (.*)$", output, re.M)
    return json.loads(found[-1]) if found else None


def pytest_headline(output):
    m = re.findall(r"^(\d+)(?:/\d+)? tests? collected", output, re.M)
    if m:
        return f"{m[-1]} gpu tests collected"
    for line in reversed(output.splitlines()):  # the final "N passed, M failed ... in Xs"
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", line)
        if counts and re.search(r" in [\d.]+s", line):
            return ", ".join(f"{n} {w}" for n, w in counts)
    seen = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR)\b", output)  # killed: -v lines so far
    return ", ".join(f"{seen.count(w)} {w.lower()}" for w in ("PASSED", "FAILED", "SKIPPED",
                                                              "ERROR") if w in seen) + " so far"


def sanitizer_headline(output):
    parts = re.findall(r"(?:ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: .*)$", output, re.M)
    if re.search(REFUSED, output):
        parts.insert(0, "refused: " + re.search(REFUSED, output).group(0))
    elif not parts:
        parts = ["no compute-sanitizer (dry)"]
    m = re.findall(r"gpu_sanitize: backend (\S+) on \S+: (\d+) cases, (\d+) mismatches, worst "
                   r"max rel error (\S+)", output)
    if m:
        be, n, bad, worst = m[-1]
        parts.append(f"{be}: {n} cases, {bad} mismatches, worst rel err {worst}")
    return "; ".join(parts)


def bench_headline(rows, meta):
    parts = [f"{r['dtype']} {r['executor']}: encode/GEMM {r['encode_op_over_gemm']:.3g}, "
             f"step {r['step_speedup_vs_reference']:.3g}x ref" for r in rows]
    parts += [f"{case}: failed" for case in (meta or {}).get("errors", {})]
    return "; ".join(parts) or "no rows"


# ----------------------------------------------------------------- helpers run as commands

def helper(name, arg=None):
    """The small checks the steps run in their own processes (so this one never imports
    torch)."""
    sys.path.insert(0, ROOT)  # this tree's gsae_fast, also where the install failed
    if name == "--env-json":
        import platform

        import torch
        cuda = torch.cuda.is_available()
        env = {"python": platform.python_version(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "triton": triton_version(),
               "device": torch.cuda.get_device_name() if cuda else "no CUDA device (CPU)",
               "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda
               else None, "cpus": os.cpu_count()}
        print(MARK + "env " + json.dumps(env))
    elif name == "--check-build":  # the extension loads; the device's compiled executor is there
        import gsae_fast
        from gsae_fast import backends
        avail = {d: gsae_fast.available_backends(d) for d in ("cpu", arg)}
        print(MARK + "backends " + json.dumps(avail))
        need = "cuda" if arg == "cuda" else "cpu"
        if backends._ext_error is not None or need not in avail[arg]:
            sys.exit(f"gsae_fast: the {need!r} executor is not available on {arg}: "
                     f"{backends.why_unavailable(need, __import__('torch').device(arg))}")
    elif name == "--make-cache":  # 4 x 256 synthetic activations, d_in 16 (as the tests)
        from gsae_fast.activations import write_cache
        from gsae_fast.synthetic import SyntheticConfig, SyntheticFeatures
        data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=40, target_l0=4),
                                 batch_size=256)
        write_cache((data.batch(i) for i in range(4)), arg, d_in=16)
        print(f"wrote a synthetic activation cache to {arg}")
    elif name == "--check-train-log":  # every step logged, with finite losses
        import math
        log = [json.loads(line) for line in open(os.path.join(arg, "log.jsonl"))]
        for r in log:
            print(json.dumps(r))
        if not log:
            sys.exit("empty log.jsonl")
        keys = ("loss", "mse", "sparsity", "aux", "l0")
        bad = [(r["step"], k) for r in log for k in keys if not math.isfinite(r[k])]
        summary = json.load(open(os.path.join(arg, "summary.json")))
        out = {"steps": len(log), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
               "fve": summary["metrics"].get("fve"), "not_finite": bad}
        print(MARK + "train " + json.dumps(out))
        if bad:
            sys.exit(f"not finite: {bad}")
    else:
        sys.exit(f"unknown helper {name}")


# -------------------------------------------------------------------------------- the run

def cuda_home():
    home = os.environ.get("CUDA_HOME") or ""
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    if not home and os.path.isdir("/usr/local/cuda"):
        home = "/usr/local/cuda"
    return home


def tool(name):
    home = cuda_home()
    for p in (shutil.which(name), home and os.path.join(home, "bin", name),
              home and os.path.join(home, name, name)):  # the sanitizer's own folder
        if p and os.path.exists(p):
            return p
    return name  # run_step records "command not found"


def main(argv):
    dry = "--dry" in argv
    args = [a for a in argv if a != "--dry"]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit(__doc__)
    out = os.path.abspath(args[0])
    os.makedirs(out, exist_ok=True)
    for _, log in STEPS.values():
        open(os.path.join(out, log), "w").close()
    commit = git_commit()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GSAE_FAST_COMMIT=commit)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = "cpu" if dry else "cuda"
    scratch = tempfile.mkdtemp(prefix="gsae_gpu_check_")  # the cache, the run, bench files
    results, spare, t_run = [], 0.0, time.monotonic()
    meta = {"mode": "dry (no GPU: CPU stand-ins)" if dry else "GPU",
            "date": stamp(), "commit": commit}
    bench = {}

    def step(name, commands, step_env=None, **kw):
        nonlocal spare
        cap, log = STEPS[name]
        print(f"[{len(results) + 1}/{len(STEPS)}] {name} (cap {cap + spare:.0f} s) ...",
              flush=True)
        r = run_step(name, commands, cap + spare, os.path.join(out, log), step_env or env, **kw)
        spare = max(0.0, cap + spare - r["seconds"])
        _trim(os.path.join(out, log))
        results.append(r)
        return r

    def done(r, headline):  # headline: a function of what the step printed
        try:
            r["headline"] = headline()
        except Exception as e:  # noqa: BLE001 - a step that printed too little
            r["headline"] = f"(no headline: {type(e).__name__}: {e})"
        print(f"    {r['outcome']} in {r['seconds']:.1f} s: {r['headline']}", flush=True)

    try:
        # 1. environment: a record; never fails the run
        r = step("environment", [["nvidia-smi", "-L"], [tool("nvcc"), "--version"],
                                 [PY, SELF, "--env-json"]], check=False)
        r["required"] = False
        meta.update(marked(r["output"], "env") or {})
        nvcc = re.search(r"release ([\d.]+)", r["output"])
        meta["nvcc"] = nvcc.group(1) if nvcc else "not found"
        meta["gpus"] = re.findall(r"^GPU \d+: .*$", r["output"], re.M)
        done(r, lambda: f"{meta.get('device', '?')}; torch {meta.get('torch', '?')}, triton "
                        f"{meta.get('triton', '?')}, nvcc {meta['nvcc']}, commit {commit}")

        # 2. build
        if dry:
            r = step("build", [[PY, SELF, "--check-build", "cpu"]])
        else:
            b_env = dict(env, GSAE_FAST_CUDA="1", GSAE_FAST_REQUIRE_EXT="1",
                         CUDA_HOME=cuda_home(), MAX_JOBS=str(os.cpu_count()))
            b_env.pop("TORCH_CUDA_ARCH_LIST", None)  # torch reads it off the visible GPU
            r = step("build", [[PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                "-e", "."], [PY, SELF, "--check-build", "cuda"]], b_env)
        avail = marked(r["output"], "backends") or {}
        done(r, lambda: f"executors on {device}: {', '.join(avail.get(device, [])) or 'none'}")

        # 3. the GPU tests
        flags = ["-m", "gpu", "-p", "no:cacheprovider", "tests"]
        # 4 processes where pytest-xdist is installed: Triton compiles each kernel
        # configuration on first use, one at a time per process
        par = ["-n", "4"] if importlib.util.find_spec("xdist") else []
        r = step("pytest", [[PY, "-m", "pytest", "--collect-only", "-q", *flags]] if dry else
                 [[PY, "-m", "pytest", "-v", "-rfE", "--tb=short",
                   "--continue-on-collection-errors", *par, *flags]])
        done(r, lambda: pytest_headline(r["output"]))

        # 4. the sanitizers on one small case per CUDA kernel
        if dry:
            backend = "cuda_emulated" if "cuda_emulated" in avail.get("cpu", []) else "cpu"
            sanitize = [PY, "bench/gpu_sanitize.py", "--device", "cpu", "--backend", backend,
                        "--quick"]
        s_env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # each tensor its own allocation
        for name in ("memcheck", "racecheck"):
            cmd = sanitize if dry else [
                tool("compute-sanitizer"), "--tool", name, "--error-exitcode", "1",
                "--report-api-errors", "no", "--kernel-name", "kns=gsae_fast",
                PY, "bench/gpu_sanitize.py"]
            r = step(name, [cmd], s_env, refused=REFUSED)
            done(r, lambda: sanitizer_headline(r["output"]))

        # 5. torchrun, one process, feature sharding (NCCL on a GPU, gloo on CPU)
        cache, run = os.path.join(scratch, "acts"), os.path.join(scratch, "run")
        r = step("torchrun", [
            [PY, SELF, "--make-cache", cache],
            [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
             "-m", "gsae_fast.cli", "train", "--out", run, "--parallel", "feature", "--cache",
             cache, "--d-sae", "37", "--steps", "6", "--batch-size", "64", "--lr", "3e-3",
             "--warmup-steps", "1", "--sparsity-warmup-steps", "2", "--log-every", "1",
             "--eval-tokens", "256", "--quiet", "--device", device],
            [PY, SELF, "--check-train-log", run]], dict(env, OMP_NUM_THREADS="1"))
        t = marked(r["output"], "train")
        done(r, lambda: f"{t['steps']} steps on {device}, loss {t['first_loss']:.4g} -> "
                        f"{t['last_loss']:.4g}, FVE {t['fve']:.3f}")

        # 6. the headline benchmark
        b_out = os.path.join(scratch, "bench")
        r = step("bench", [[PY, "bench/bench_gpu.py", "--out", b_out,
                            *(["--smoke"] if dry else ["--quick", "--dtype", "bf16"])]])
        for f in sorted(os.listdir(b_out)) if os.path.isdir(b_out) else []:
            if f.endswith(".json"):
                bench = json.load(open(os.path.join(b_out, f)))
                bench["markdown"] = open(os.path.join(b_out, f[:-5] + ".md")).read()
        done(r, lambda: bench_headline(bench.get("rows", []), bench.get("meta")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    code = exit_code(results)
    meta["seconds"] = round(time.monotonic() - t_run, 1)
    text = table(results)
    write_summary(out, meta, results, bench, text, code)
    print(f"\nGPU check ({meta['mode']}) on {meta.get('device', '?')}, commit {commit}, "
          f"{meta['seconds']:.0f} s; logs and summary.md in {out}\n"
          f"exit {code}: {'a step failed or timed out' if code else 'no step failed'} "
          f"('refused' is not a failure)\n")
    print(text, flush=True)
    return code


def write_summary(out, meta, results, bench, text, code):
    steps = [{k: v for k, v in r.items() if k != "output"} for r in results]
    lines = [f"# GPU check: {meta.get('device', '?')}", "",
             f"- mode: {meta['mode']}", f"- device: {meta.get('device', '?')}"
             + "".join(f"; {g}" for g in meta.get("gpus", [])),
             f"- commit: {meta['commit']}", f"- date: {meta['date']}",
             f"- python: {meta.get('python', '?')}",
             f"- torch: {meta.get('torch', '?')} (CUDA {meta.get('torch_cuda', '?')})",
             f"- triton: {meta.get('triton', '?')}", f"- nvcc: {meta.get('nvcc', '?')}",
             f"- wall time: {meta['seconds']:.0f} s; exit code {code} ('refused' is not a "
             "failure; the environment step never fails the run)", ""]
    lines += md_table(["step", "outcome", "seconds", "headline", "log"],
                      [[r["step"], r["outcome"], f"{r['seconds']:.1f}",
                        r.get("headline", "").replace("|", "/"), r["log"]] for r in results])
    lines += ["", "```", text, "```", ""]
    if bench.get("markdown"):
        lines += ["## Benchmark (bench/bench_gpu.py)", ""]
        lines += ["##" + x if x.startswith("#") else x for x in bench["markdown"].splitlines()]
    write_pair(os.path.join(out, "summary"), "\n".join(lines) + "\n",
               {"meta": meta, "steps": steps, "exit_code": code,
                "bench": {k: v for k, v in bench.items() if k != "markdown"}})


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] in ("--env-json", "--check-build", "--make-cache",
                                              "--check-train-log"):
        helper(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        sys.exit(main(sys.argv[1:]))
