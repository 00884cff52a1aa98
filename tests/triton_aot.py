"""Compile every Triton kernel of gsae_fast for a GPU target, without a GPU (ahead of time).

The interpreter tests check the kernels' logic; this checks that the real compiler accepts them
(types, layouts, dynamic loops) for every autotune configuration in fp32, bf16, fp16 and fp64,
and reports each one's shared memory, its atomics and memory fences (in the PTX, and in the
SASS), and its registers, spills (STL/LDL) and tensor-core opcodes (from the SASS and
``cuobjdump -res-usage``, when triton ships cuobjdump; bench/gpu_static.py tabulates them).
Arguments get the specialisation of real sizes: pointers and integers divisible by 16 (what the
JIT compiles when sizes are multiples of 16). Run without TRITON_INTERPRET (tests/test_triton.py
does, once, in a subprocess, and reads the JSON report):

    python tests/triton_aot.py --arch 90 --arch 80 [--dtype bf16] [--kernel gated_encode]
                               [--jobs 2] [--json report.json]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = ("fp32", "bf16", "fp16", "fp64")
TORCH_DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16,
                    fp64=torch.float64)
# Memory-ordering instructions (not wgmma.fence / fence.proxy.async, which order the tensor-core
# and async-copy proxies of one CTA).
PTX_FENCE = re.compile(r"\b(?:fence\.(?:sc|acq_rel|acquire|release)|membar)\b[\w.:]*")
PTX_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.:]+")
SASS_OPS = re.compile(r"\b(?:ATOMG?|REDG?|MEMBAR|ERRBAR|CCTL|FENCE)\b[\w.]*")


def _mod(name):
    return importlib.import_module(f"gsae_fast.kernels.{name}")


def cases(dt: str):
    """(name, jit function, argument types, constexprs, [(meta, num_warps, num_stages)]), with the
    argument types of the calls in gsae_fast.kernels (accumulators and values in fp64 for fp64
    inputs, fp32 otherwise)."""
    common, enc, dec = _mod("_common"), _mod("gated_encode"), _mod("sparse_decode")
    a = "fp64" if dt == "fp64" else "fp32"  # the accumulation dtype
    acc = tl.float64 if dt == "fp64" else tl.float32
    prec = common.dot_precision(TORCH_DTYPES[dt])  # torch's default: no TF32 for fp32

    def configs(autotuned):
        return [(c.kwargs, c.num_warps, c.num_stages) for c in autotuned.configs]

    yield ("gemv", common._gemv_kernel,
           dict(a_ptr=f"*{dt}", v_ptr=f"*{dt}", out_ptr=f"*{a}", n_i="i32", n_j="i32",
                stride_i="i32", stride_j="i32", rows_per_split="i32"),
           dict(ACC=acc), [(dict(BI=32, BJ=128), 4, 3)])
    for has_w in (True, False):
        yield (f"grouped_scatter(HAS_W={has_w})", common._grouped_scatter_kernel,
               dict(ptr_ptr="*i64", feats_ptr="*i32", rows_ptr="*i64", w_ptr=f"*{a}",
                    src_ptr=f"*{dt}", sub_ptr=f"*{dt}", out_ptr=f"*{dt}", d_sae="i32",
                    n_cols="i32", src_stride="i32", out_stride_f="i32", out_stride_c="i32"),
               dict(HAS_W=has_w, HAS_SUB=has_w, ACC=acc, PRECISION=prec),
               [(dict(BF=32, BC=128, BP=32), 4, 3)])
    yield ("gated_encode", enc._gated_encode_kernel.fn,
           dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", c_ptr=f"*{a}", b_gate_ptr=f"*{dt}",
                r_mag_ptr=f"*{dt}", b_mag_ptr=f"*{dt}", f_ptr=f"*{a}", pi_ptr=f"*{a}",
                idx_ptr="*i32", counts_ptr="*i32", status_ptr="*i32", B="i32", d_in="i32",
                d_sae="i32", K="i32"),
           dict(ACC=acc, PRECISION=prec, UPCAST=False),
           [c for c, keep in zip(configs(enc._gated_encode_kernel),
                                 (enc.fits_registers(c, TORCH_DTYPES[dt])
                                  for c in enc._gated_encode_kernel.configs)) if keep])
    yield ("sparse_decode", dec._sparse_decode_kernel.fn,
           dict(idx_ptr="*i32", val_ptr=f"*{a}", counts_ptr="*i32", w_ptr=f"*{dt}",
                bias_ptr=f"*{dt}", out_ptr=f"*{dt}", K="i32", d_in="i32"),
           dict(HAS_BIAS=True, ACC=acc), configs(dec._sparse_decode_kernel))
    yield ("sparse_dot", dec._sparse_dot_kernel.fn,
           dict(grad_ptr=f"*{dt}", idx_ptr="*i32", counts_ptr="*i32", w_ptr=f"*{dt}",
                out_ptr=f"*{a}", K="i32", d_in="i32"),
           dict(ACC=acc), configs(dec._sparse_dot_kernel))
    yield ("sparse_decode_pair", dec._sparse_decode_pair_kernel.fn,
           dict(idx_ptr="*i32", va_ptr=f"*{a}", vb_ptr=f"*{a}", counts_ptr="*i32",
                w_ptr=f"*{dt}", bias_ptr=f"*{dt}", out_a_ptr=f"*{dt}", out_b_ptr=f"*{dt}",
                K="i32", d_in="i32"),
           dict(HAS_BIAS=True, ACC=acc), configs(dec._sparse_decode_pair_kernel))
    yield ("sparse_dot_pair", dec._sparse_dot_pair_kernel.fn,
           dict(ga_ptr=f"*{dt}", gb_ptr=f"*{dt}", idx_ptr="*i32", counts_ptr="*i32",
                w_ptr=f"*{dt}", out_a_ptr=f"*{a}", out_b_ptr=f"*{a}", K="i32", d_in="i32"),
           dict(ACC=acc), configs(dec._sparse_dot_pair_kernel))
    yield ("scatter_atomic", dec._scatter_atomic_kernel,
           dict(grad_ptr=f"*{dt}", idx_ptr="*i32", val_ptr=f"*{a}", counts_ptr="*i32",
                out_ptr=f"*{a}", K="i32", d_in="i32"),
           dict(ACC=acc), [(dict(BS=16, BD=512), 4, 3)])


def compile_one(fn, types, consts, meta, warps, stages, arch):
    values = dict(consts, **meta)
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in types and n not in values]
    if missing:
        raise ValueError(f"no value for {missing}")
    constexprs = {(fn.arg_names.index(k),): v for k, v in values.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in types}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _opcode_counts(pattern, text):
    return dict(collections.Counter(m.group(0) for m in pattern.finditer(text)))


def _cuobjdump(cubin: bytes, flag: str):
    """``cuobjdump <flag>`` of a cubin (the one triton ships): its stdout, or None without the
    tool or on failure."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        res = subprocess.run([tool, flag, path], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def sass_ops(cubin: bytes, sass: str | None = None):
    """Counts of the atomic, barrier and cache-control opcodes of a cubin's SASS (None when
    triton ships no cuobjdump)."""
    sass = _cuobjdump(cubin, "-sass") if sass is None else sass
    return None if sass is None else _opcode_counts(SASS_OPS, sass)


# Local-memory traffic (register spills: the kernels use no local arrays) and tensor-core
# instructions (HGMMA: Hopper's wgmma; HMMA/DMMA: mma.sync in 16-bit/TF32 and fp64).
SASS_SPILLS = re.compile(r"\b(?:STL|LDL)\b")
SASS_MMA = re.compile(r"\b(?:HGMMA|HMMA|DMMA|IMMA)\b")
RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(cubin: bytes, sass: str | None = None):
    """Registers per thread, stack and local bytes per thread, static shared bytes (from
    ``cuobjdump -res-usage``), the number of spill instructions (STL/LDL in the SASS) and the
    tensor-core opcodes; None without cuobjdump."""
    usage = _cuobjdump(cubin, "-res-usage")
    sass = _cuobjdump(cubin, "-sass") if sass is None else sass
    m = RES_USAGE.search(usage or "")
    if m is None or sass is None:
        return None
    regs, stack, static_shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, local=local, static_shared=static_shared,
                spills=len(SASS_SPILLS.findall(sass)),
                spill_ops=_opcode_counts(re.compile(r"\b(?:STL|LDL)\b[\w.]*"), sass),
                mma=_opcode_counts(SASS_MMA, sass))


def inspect_kernel(kernel) -> dict:
    """Shared memory (the launch's dynamic size), PTX atomics and fences, and from the cubin's
    SASS its resources (registers, spills, tensor-core opcodes; :func:`resources`)."""
    ptx = kernel.asm["ptx"]
    out = dict(shared=kernel.metadata.shared, ptx_atomics=_opcode_counts(PTX_ATOMIC, ptx),
               ptx_fences=_opcode_counts(PTX_FENCE, ptx))
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    if out["ptx_atomics"] or out["ptx_fences"]:
        out["sass"] = sass_ops(kernel.asm["cubin"], sass)
    out["resources"] = resources(kernel.asm["cubin"], sass) if sass is not None else None
    return out


def compile_task(task) -> dict:
    """Compile one (arch, dtype, kernel number, config number) and inspect it: a report record."""
    arch, dt, i, j = task
    name, fn, types, consts, confs = list(cases(dt))[i]
    meta, warps, stages = confs[j]
    rec = dict(arch=arch, dtype=dt, kernel=name, meta=meta, num_warps=warps, num_stages=stages)
    t0 = time.time()
    try:
        kernel = compile_one(fn, types, consts, meta, warps, stages, arch)
        rec.update(inspect_kernel(kernel), ok=True)
    except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
        msg = str(e).strip().splitlines()
        rec.update(ok=False, error=f"{type(e).__name__}: {msg[-1] if msg else ''}")
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="SM version (90, 80); repeatable")
    ap.add_argument("--dtype", action="append", choices=DTYPES,
                    help=f"{', '.join(DTYPES)} (default: all); repeatable")
    ap.add_argument("--kernel", action="append", help="only kernels whose name starts so")
    ap.add_argument("--jobs", type=int, default=min(4, len(os.sched_getaffinity(0))),
                    help="compiler processes (default: the usable CPUs, at most 4)")
    ap.add_argument("--json", help="write the report (one record per compilation) there")
    args = ap.parse_args()
    tasks = [(arch, dt, i, j)
             for arch in args.arch or [90] for dt in args.dtype or DTYPES
             for i, (name, _, _, _, confs) in enumerate(cases(dt))
             if not args.kernel or any(name.startswith(k) for k in args.kernel)
             for j in range(len(confs))]
    t_all = time.time()
    records = []
    with contextlib.ExitStack() as stack:
        run = map
        if args.jobs > 1 and len(tasks) > 1:  # spawn: fresh interpreters, no forked MLIR state
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn")))
            run = pool.map
        for rec in run(compile_task, tasks):
            label = (f"sm_{rec['arch']} {rec['dtype']} {rec['kernel']} {rec['meta']} "
                     f"w{rec['num_warps']} s{rec['num_stages']}")
            res = rec.get("resources") or {}
            regs = f", {res['regs']} regs, {res['spills']} spills" if res else ""
            print(f"ok    {label}: shared {rec['shared']} B{regs}, {rec['seconds']:.1f} s"
                  if rec["ok"] else f"FAIL  {label}: {rec['error']}", flush=True)
            records.append(rec)
    failures = sum(not r["ok"] for r in records)
    print(f"{len(records) - failures} compiled, {failures} failed, {time.time() - t_all:.0f} s, "
          f"{args.jobs} jobs (triton {triton.__version__})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, records=records), fh, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
