"""Static resource report of every GPU kernel, without a GPU: bench/results/gpu_static.{md,json}.

For sm_90 (H100/H200) and sm_80 (A100):

- every Triton kernel and autotune configuration, compiled as the JIT specialises it at real
  sizes (tests/triton_aot.py's cases and compiler call), in fp32, bf16 and fp16, and fp64 for the
  encode;
- every CUDA kernel of csrc/cuda/kernels.cu, per template instantiation (nvcc -Xptxas -v);

each one's registers per thread, spill instructions (STL/LDL in the SASS) and stack bytes, shared
memory per block, the blocks per SM that registers, shared memory and threads allow, and its
tensor-core opcodes (HGMMA = Hopper's wgmma; HMMA/DMMA = mma.sync).

    python bench/gpu_static.py [--jobs 2] [--arch 90 --arch 80] [--out bench/results/gpu_static]

Blocks per SM: min(32, 2048 // threads, warps the register file holds // warps per block, shared
memory per SM // (shared per block + 1 KB the driver reserves per block)); registers are
allocated per warp in units of 256 (65536 per SM), shared memory per SM is 228 KB on the H100,
164 KB on the A100 (227 / 163 KB at most per block). A kernel over the per-block limit gets 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from _harness import RESULTS, ROOT, git_commit, md_table, stamp, triton_version, write_pair

sys.path.insert(0, os.path.join(ROOT, "tests"))

import triton_aot  # noqa: E402  (pops TRITON_INTERPRET, imports triton)

# name, registers per SM, shared memory per SM, most per block (opt-in), threads, blocks
SM_LIMITS = {90: ("H100", 65536, 228 * 1024, 227 * 1024, 2048, 32),
             80: ("A100", 65536, 164 * 1024, 163 * 1024, 2048, 32)}
DTYPES = ("fp32", "bf16", "fp16")
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")


def blocks_per_sm(arch: int, regs: int, threads: int, shared: int) -> dict:
    """Resident blocks per SM and what limits them."""
    _, sm_regs, sm_shared, block_shared, sm_threads, sm_blocks = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = dict(threads=sm_threads // threads, regs=(sm_regs // per_warp) // warps,
                  shared=sm_shared // (shared + 1024) if shared else sm_blocks,
                  blocks=sm_blocks)
    if shared > block_shared:
        limits["shared"] = 0
    n = min(limits.values())
    return dict(blocks_per_sm=n, limited_by=min(limits, key=limits.get) if n < sm_blocks else "")


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

def triton_tasks(archs):
    for arch in archs:
        for dt in DTYPES + ("fp64",):
            for i, (name, _, _, _, confs) in enumerate(triton_aot.cases(dt)):
                if dt == "fp64" and name != "gated_encode":
                    continue
                for j in range(len(confs)):
                    yield (arch, dt, i, j)


def triton_records(archs, jobs):
    tasks = list(triton_tasks(archs))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, no forked MLIR state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        records = list(pool.map(triton_aot.compile_task, tasks))
    for rec in records:
        res = rec.get("resources")
        if rec["ok"] and res:
            threads = 32 * rec["num_warps"]
            shared = rec["shared"] + res["static_shared"]
            rec.update(threads=threads, shared_total=shared,
                       **blocks_per_sm(rec["arch"], res["regs"], threads, shared))
    return records


# --------------------------------------------------------------------------------------------
# CUDA (nvcc)
# --------------------------------------------------------------------------------------------

PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
LAUNCH = re.compile(r'launch_kernel\(\s*"(\w+)".*?dim3\((\d+)\)', re.S)


def _cuda_tool(name):
    """A CUDA toolkit binary: on PATH, in /usr/local/cuda/bin, or next to nvcc (None if not)."""
    for path in (shutil.which(name), os.path.join("/usr/local/cuda/bin", name),
                 os.path.join(os.path.dirname(os.path.realpath(NVCC)), name)):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _demangle(names):
    tool = _cuda_tool("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = [re.sub(r"^void |gsae_fast_cuda::\w+::\(anonymous namespace\)::", "", line.strip())
              for line in out.splitlines()]
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def _sass_by_function(obj: str) -> dict:
    """STL/LDL and tensor-core opcode counts per function of an object file's SASS."""
    tool = _cuda_tool("cuobjdump") or os.path.join(
        os.path.dirname(triton_aot.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    res = subprocess.run([tool, "-sass", obj], capture_output=True, text=True)
    out, name = {}, None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = dict(spills=0, mma={})
        elif name:
            out[name]["spills"] += len(triton_aot.SASS_SPILLS.findall(line))
            for op in triton_aot.SASS_MMA.findall(line):
                out[name]["mma"][op] = out[name]["mma"].get(op, 0) + 1
    return out


def cuda_records(archs):
    if not os.access(NVCC, os.X_OK):
        return [], None
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    version = (re.findall(r"release [\d.]+, V[\d.]+", version) or ["?"])[0]
    with open(CUDA_SOURCE) as fh:
        threads = {name: int(n) for name, n in LAUNCH.findall(fh.read())}
    records = []
    with tempfile.TemporaryDirectory() as d:
        for arch in archs:
            obj = os.path.join(d, f"k{arch}.o")
            res = subprocess.run([NVCC, f"-arch=sm_{arch}", "-Xptxas", "-v", "-c",
                                  "-I" + os.path.join(ROOT, "csrc"), CUDA_SOURCE, "-o", obj],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                records.append(dict(arch=arch, ok=False, error=res.stderr[-2000:]))
                continue
            sass = _sass_by_function(obj)
            entries, cur = {}, None
            for line in res.stderr.splitlines():
                if m := PTXAS_ENTRY.search(line):
                    cur = entries[m.group(1)] = dict(stack=0, spill_bytes=0, regs=0, smem=0)
                elif cur is not None and (m := PTXAS_FRAME.search(line)):
                    cur.update(stack=int(m.group(1)),
                               spill_bytes=int(m.group(2)) + int(m.group(3)))
                elif cur is not None and (m := PTXAS_REGS.search(line)):
                    cur.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
            pretty = _demangle(list(entries))
            for mangled, e in entries.items():
                name = pretty[mangled]
                base = name.split("<")[0].split("(")[0].split("::")[-1]
                n = threads.get(base, 256)
                s = sass.get(mangled, dict(spills=None, mma={}))
                records.append(dict(arch=arch, ok=True, kernel=name.split("(")[0], threads=n,
                                    regs=e["regs"], stack=e["stack"], spill_bytes=e["spill_bytes"],
                                    spills=s["spills"], mma=s["mma"], shared_total=e["smem"],
                                    **blocks_per_sm(arch, e["regs"], n, e["smem"])))
    return records, version


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _mma(m):
    return ", ".join(f"{k} {v}" for k, v in sorted(m.items())) if m else "-"


def _meta(meta):
    return " ".join(f"{k}={v}" for k, v in meta.items() if k != "GROUP_M")


def _limit(r):
    return f" ({r['limited_by']})" if r["limited_by"] else ""


def markdown(report) -> str:
    t_recs = report["triton"]["records"]
    lines = ["# Static GPU resources (no GPU needed)", "",
             f"Generated by `bench/gpu_static.py` on {report['date']}: commit {report['commit']}, "
             f"triton {report['triton']['version']}, {report['cuda']['nvcc'] or 'no nvcc'}. "
             "Registers per thread and stack bytes from `cuobjdump -res-usage` (Triton) and "
             "`ptxas -v` (CUDA); spills = STL/LDL instructions in the SASS; shared = bytes per "
             "block (dynamic + static); blocks/SM on the H100 (sm_90) and A100 (sm_80) limits, "
             "with what limits them; MMA = tensor-core opcodes in the SASS (HGMMA: Hopper wgmma).",
             ""]
    enc = [r for r in t_recs if r["ok"] and r["kernel"] == "gated_encode" and r.get("resources")]
    spilling = [r for r in enc if r["resources"]["spills"] and r["arch"] == 90
                and r["dtype"] != "fp64"]
    no_hgmma = [r for r in enc if r["arch"] == 90 and r["dtype"] in ("bf16", "fp16")
                and not r["resources"]["mma"].get("HGMMA")]
    lines += ["## Targets", "",
              f"- sm_90 encode configurations (bf16/fp16/fp32) that spill: {len(spilling)} of "
              f"{sum(r['arch'] == 90 and r['dtype'] != 'fp64' for r in enc)}"
              + ("" if not spilling else ": " + "; ".join(
                  f"{r['dtype']} {_meta(r['meta'])} w{r['num_warps']} ({r['resources']['spills']})"
                  for r in spilling)),
              f"- sm_90 16-bit encode configurations without HGMMA: {len(no_hgmma)}", ""]
    failed = [r for r in t_recs if not r["ok"]]
    if failed:
        lines += ["## Failed compilations", ""] + [
            f"- sm_{r['arch']} {r['dtype']} {r['kernel']} {_meta(r['meta'])}: {r['error']}"
            for r in failed] + [""]
    for arch in sorted({r["arch"] for r in t_recs}):
        gpu = SM_LIMITS[arch][0]
        rows = []
        for r in t_recs:
            if r["arch"] != arch or not r["ok"] or not r.get("resources"):
                continue
            res = r["resources"]
            rows.append([r["kernel"], _meta(r["meta"]), f"{r['num_warps']}/{r['num_stages']}",
                         r["dtype"], res["regs"], res["spills"], res["stack"], r["shared_total"],
                         f"{r['blocks_per_sm']}{_limit(r)}", _mma(res["mma"])])
        lines += [f"## Triton, sm_{arch} ({gpu})", ""]
        lines += md_table(["kernel", "config", "warps/stages", "dtype", "regs", "spills",
                           "stack B", "shared B", "blocks/SM", "MMA"], rows,
                          ["---"] * 4 + ["---:"] * 5 + ["---"])
        lines.append("")
    c_recs = report["cuda"]["records"]
    for arch in sorted({r["arch"] for r in c_recs}):
        gpu = SM_LIMITS[arch][0]
        recs = [r for r in c_recs if r["arch"] == arch]
        lines += [f"## CUDA (csrc/cuda/kernels.cu), sm_{arch} ({gpu})", ""]
        lines += md_table(["kernel", "threads", "regs", "spills", "spill B", "stack B",
                           "shared B", "blocks/SM", "MMA"],
                          [[f"`{r['kernel']}`", r["threads"], r["regs"], r["spills"],
                            r["spill_bytes"], r["stack"], r["shared_total"],
                            f"{r['blocks_per_sm']}{_limit(r)}", _mma(r["mma"])]
                           for r in recs if r["ok"]], ["---"] + ["---:"] * 7 + ["---"])
        # a failed compilation is the arch's only record: its line alone under the header
        lines += [f"| compile failed | | | | | | | | {r['error'][-200:]} |"
                  for r in recs if not r["ok"]]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="90, 80 (default both)")
    ap.add_argument("--jobs", type=int, default=min(4, len(os.sched_getaffinity(0))))
    ap.add_argument("--out", default=os.path.join(RESULTS, "gpu_static"),
                    help="path without extension: writes .md and .json")
    args = ap.parse_args()
    archs = args.arch or [90, 80]
    t0 = time.time()
    t_recs = triton_records(archs, args.jobs)
    print(f"triton: {len(t_recs)} compilations, {time.time() - t0:.0f} s", flush=True)
    c_recs, nvcc = cuda_records(archs)
    print(f"cuda: {len(c_recs)} kernels, {time.time() - t0:.0f} s", flush=True)
    report = dict(commit=git_commit(), date=stamp(minutes=False),
                  triton=dict(version=triton_version(), records=t_recs),
                  cuda=dict(nvcc=nvcc, records=c_recs), seconds=round(time.time() - t0))
    write_pair(args.out, markdown(report) + "\n", report)
    print(f"wrote {args.out}.md and .json ({time.time() - t0:.0f} s)")
    failed = sum(not r["ok"] for r in t_recs + c_recs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
