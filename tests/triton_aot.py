"""Compile every Triton kernel of gsae_fast for a GPU target, without a GPU (ahead of time).

The interpreter tests check the kernels' logic; this checks that the real compiler accepts them
(types, layouts, dynamic loops) for every autotune configuration, and reports each one's shared
memory. Run without TRITON_INTERPRET (tests/test_triton.py does, in a subprocess):

    python tests/triton_aot.py --arch 90 --arch 80
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _mod(name):
    return importlib.import_module(f"gsae_fast.kernels.{name}")


def cases(dt: str):
    """(name, jit function, argument types, constexprs, [(meta, num_warps, num_stages)])."""
    common, enc, dec = _mod("_common"), _mod("gated_encode"), _mod("sparse_decode")
    acc = tl.float32
    prec = "tf32" if dt != "fp32" else "ieee"

    def configs(autotuned):
        return [(c.kwargs, c.num_warps, c.num_stages) for c in autotuned.configs]

    yield ("gemv", common._gemv_kernel,
           dict(a_ptr=f"*{dt}", v_ptr=f"*{dt}", out_ptr="*fp32", n_i="i32", n_j="i32",
                stride_i="i32", stride_j="i32", rows_per_split="i32"),
           dict(ACC=acc), [(dict(BI=32, BJ=128), 4, 3)])
    for has_w in (True, False):
        yield (f"grouped_scatter(HAS_W={has_w})", common._grouped_scatter_kernel,
               dict(ptr_ptr="*i64", feats_ptr="*i32", rows_ptr="*i64", w_ptr="*fp32",
                    src_ptr=f"*{dt}", sub_ptr=f"*{dt}", out_ptr=f"*{dt}", d_sae="i32",
                    n_cols="i32", src_stride="i32", out_stride_f="i32", out_stride_c="i32"),
               dict(HAS_W=has_w, HAS_SUB=has_w, ACC=acc, PRECISION=prec),
               [(dict(BF=32, BC=128, BP=32), 4, 3)])
    yield ("gated_encode", enc._gated_encode_kernel.fn,
           dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", c_ptr="*fp32", b_gate_ptr=f"*{dt}",
                r_mag_ptr=f"*{dt}", b_mag_ptr=f"*{dt}", f_ptr="*fp32", pi_ptr="*fp32",
                idx_ptr="*i32", counts_ptr="*i32", status_ptr="*i32", B="i32", d_in="i32",
                d_sae="i32", K="i32"),
           dict(ACC=acc, PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False),
           configs(enc._gated_encode_kernel))
    yield ("sparse_decode", dec._sparse_decode_kernel.fn,
           dict(idx_ptr="*i32", val_ptr="*fp32", counts_ptr="*i32", w_ptr=f"*{dt}",
                bias_ptr=f"*{dt}", out_ptr=f"*{dt}", K="i32", d_in="i32"),
           dict(HAS_BIAS=True, ACC=acc), configs(dec._sparse_decode_kernel))
    yield ("sparse_dot", dec._sparse_dot_kernel.fn,
           dict(grad_ptr=f"*{dt}", idx_ptr="*i32", counts_ptr="*i32", w_ptr=f"*{dt}",
                out_ptr="*fp32", K="i32", d_in="i32"),
           dict(ACC=acc), configs(dec._sparse_dot_kernel))
    yield ("scatter_atomic", dec._scatter_atomic_kernel,
           dict(grad_ptr=f"*{dt}", idx_ptr="*i32", val_ptr="*fp32", counts_ptr="*i32",
                out_ptr="*fp32", K="i32", d_in="i32"),
           dict(ACC=acc), [(dict(BS=16, BD=512), 4, 3)])


def compile_one(fn, types, consts, meta, warps, stages, arch):
    values = dict(consts, **meta)
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in types and n not in values]
    if missing:
        raise ValueError(f"no value for {missing}")
    constexprs = {(fn.arg_names.index(k),): v for k, v in values.items()}
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="SM version (90, 80); repeatable")
    ap.add_argument("--dtype", action="append", help="fp32, bf16, fp16; repeatable")
    args = ap.parse_args()
    failures = 0
    for arch in args.arch or [90]:
        for dt in args.dtype or ["fp32", "bf16", "fp16"]:
            for name, fn, types, consts, confs in cases(dt):
                for meta, warps, stages in confs:
                    t0 = time.time()
                    label = f"sm_{arch} {dt} {name} {meta} w{warps} s{stages}"
                    try:
                        k = compile_one(fn, types, consts, meta, warps, stages, arch)
                        print(f"ok    {label}: shared {k.metadata.shared} B, "
                              f"{time.time() - t0:.1f} s", flush=True)
                    except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
                        failures += 1
                        msg = str(e).strip().splitlines()
                        print(f"FAIL  {label}: {type(e).__name__}: {msg[-1] if msg else ''}",
                              flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
