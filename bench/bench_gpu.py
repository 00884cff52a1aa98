"""GPU benchmark of the GPU executors ("triton" and "cuda"), side by side in one run, at stated L0s.

Every executor that is available on the device is measured on the same parameters and batch and
reported in the same tables, one row per (dtype, L0, executor), each with its ratio to the
roofline and to the reference. Sections, per dtype (fp32, bf16) and L0:
  encode  the fused gated encode (op = the whole ops.gated_encode call with its host sync;
          kernel = the executor call alone) against one cuBLAS GEMM ``x @ W_enc`` of the same
          shape and dtype (goal: op <= 1.15x the GEMM) and against the dense reference encode
  decode  sparse decode forward + backward (grad values and grad W_dec; both scatters) against
          the dense decode (dense acts @ W_dec, forward + backward) and against the measured copy
          bandwidth: effective bandwidth = bytes the sparse forward must move / its time (goal:
          >= 70% of a device-to-device copy)
  step    a training step (zero_grad + loss + backward + fused Adam) of each executor, of the
          dense reference and of SAELens' GatedTrainingSAE when installed (goal: >= 4x faster
          than the reference), with the peak memory allocated during the step
Adam runs with lr=1e-9 so L0 stays where the row says across repeats.

    python bench/bench_gpu.py            # full: B=4096, d_in=2304, d_sae=65536, L0 32 and 128,
                                         # fp32 and bf16 -> bench/results/gpu_<device>.{md,json}
    python bench/bench_gpu.py --quick --dtype bf16   # the headline figures only: the full shape,
                                         # L0 32, 5 repeats, no peers -> gpu_<device>_quick.*
    python bench/bench_gpu.py --smoke    # tiny shapes, prints only; on CPU it runs the Triton
                                         # interpreter (TRITON_INTERPRET=1), without cuda rows
    python bench/bench_gpu.py --sweep --dtype bf16   # the dense switch: the sparse and the dense
                                         # step at L0 128 .. 8192, the measured crossing next to
                                         # the model's (gsae_fast.dense_switch.dense_switch_model)
                                         # -> gpu_<device>_sweep.*; with --smoke: L0 4 .. 64
On a GPU every row also gets its floor from the traffic model (bench/traffic.py: max(bytes /
measured copy bandwidth, flops / the device's achievable FLOP/s), per op) and time / floor.
--dtype (float32/bfloat16/float16 or fp32/bf16/fp16) and --executor (triton/cuda) are repeatable
filters. Executors run one after the other, each row written as soon as it is measured; an
executor that raises is recorded (meta "errors") and the script exits 1 after the others ran.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback

# Deterministic-algorithm runs need it; read when cuBLAS starts, so set before torch loads.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
if "--smoke" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported
from _harness import RESULTS, ROOT, git_commit, md_table, stamp, timeit, triton_version, write_pair  # noqa: E402

sys.path.insert(0, ROOT)  # this tree's gsae_fast

import traffic  # noqa: E402
from bench_step import make_step, peers  # noqa: E402

import gsae_fast  # noqa: E402
from gsae_fast import SparseActs, backends, dense_switch, ops, reference  # noqa: E402

FULL = (4096, 2304, 65536)
SMOKE = (64, 32, 256)
SWEEP_L0S = (128, 256, 512, 1024, 2048, 4096, 8192)
SMOKE_SWEEP_L0S = (4, 16, 64)
EXECUTORS = ("triton", "cuda")
SCATTER_MODES = ("grouped", "atomic")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def peak_mb(fn):
    """Peak device memory allocated during fn() above what was allocated before (MB)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth_gbs(device, repeats):
    n = (1 << 28) if device == "cuda" else (1 << 20)  # 1 GiB of fp32 on a GPU
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def set_scatter(be, mode):
    """Pick how grad W_dec is scattered ("grouped" or "atomic", one setting for every
    executor); returns the previous override (None: none)."""
    from gsae_fast import backends
    before = backends._scatter_override
    backends.set_scatter(mode)
    return before


def make_case(shape, dtype, l0, device):
    B, d_in, d_sae = shape
    torch.manual_seed(0)
    x = torch.randn(B, d_in, device=device, dtype=dtype)
    sae = gsae_fast.GatedSAE(d_in, d_sae, backend="reference", device=device, dtype=dtype)
    with torch.no_grad():  # one b_gate for all features: mean L0 of the batch = l0 (fp32 z)
        z = ((x.float() - sae.b_dec.float()) @ sae.W_enc.float()).flatten()
        k = max(1, int(round(l0 * B)))
        sae.b_gate.fill_(-torch.topk(z, k + 1).values[-2:].mean().item())
    return x, sae


def bench_encode(x, sae, exes, repeats):
    """Shared columns (GEMM, reference) once, then one dict per executor; and the acts."""
    p = [getattr(sae, k).detach() for k in ("W_enc", "b_dec", "b_gate", "r_mag", "b_mag")]
    acts = ops.gated_encode(x, *p, backend=exes[0])
    cap = ops.next_capacity(acts.max_count, sae.d_sae)
    acts = ops.gated_encode(x, *p, capacity=cap, backend=exes[0])
    W = p[0]
    shared = {"l0": round(acts.l0().item(), 1), "max_count": acts.max_count, "capacity": cap,
              "gemm_ms": timeit(lambda: x @ W, repeats),
              "reference_encode_ms": timeit(lambda: reference.encode(x, *p), repeats),
              "reference_encode_mem_mb": peak_mb(lambda: reference.encode(x, *p))}
    per = {}
    for be in exes:
        op = lambda be=be: ops.gated_encode(x, *p, capacity=cap, backend=be)  # noqa: E731
        kernel = backends.executor(be).gated_encode
        r = {"encode_op_ms": timeit(op, repeats),
             "encode_kernel_ms": timeit(lambda: kernel(x, *p, cap), repeats),
             "encode_mem_mb": peak_mb(op)}
        r["encode_op_over_gemm"] = r["encode_op_ms"] / shared["gemm_ms"]
        r["encode_speedup_vs_reference"] = shared["reference_encode_ms"] / r["encode_op_ms"]
        per[be] = r
    return shared, per, acts


def bench_decode(acts, sae, exes, repeats, copy_gbs):
    W = sae.W_dec.detach().clone().requires_grad_()
    b = sae.b_dec.detach()
    val = acts.f.detach().clone().requires_grad_()
    a = SparseActs(acts.idx, val, acts.pi_gate, acts.counts, acts.d_sae)
    g = torch.randn(acts.counts.shape[0], W.shape[1], device=W.device, dtype=W.dtype)
    B, d_in = g.shape
    pairs = acts.counts.sum().item()
    nbytes = pairs * d_in * W.element_size() + B * d_in * W.element_size() + B * acts.capacity * 8
    dense = acts.to_dense(W.dtype).requires_grad_()

    def dense_fwd_bwd():
        W.grad = dense.grad = None
        ((dense @ W + b) * g).sum().backward()

    shared = {"dense_decode_fwd_bwd_ms": timeit(dense_fwd_bwd, repeats)}
    per = {}
    for be in exes:
        def fwd_bwd(be=be):
            W.grad = val.grad = None
            (ops.sparse_decode(a, W, b, backend=be) * g).sum().backward()

        r = {"decode_fwd_ms": timeit(lambda: ops.sparse_decode(a, W, b, backend=be), repeats)}
        r["decode_fwd_gbs"] = nbytes / (r["decode_fwd_ms"] * 1e-3) / 1e9
        r["decode_fwd_of_copy_bw"] = r["decode_fwd_gbs"] / copy_gbs
        for mode in SCATTER_MODES:
            before = set_scatter(be, mode)
            try:
                r[f"decode_fwd_bwd_{mode}_ms"] = timeit(fwd_bwd, repeats)
            finally:
                set_scatter(be, before)
        r["decode_speedup_vs_dense"] = (shared["dense_decode_fwd_bwd_ms"]
                                        / r["decode_fwd_bwd_grouped_ms"])
        per[be] = r
    return shared, per


def bench_step(x, sae, exes, repeats, gemm_ms, with_peers, l1=1e-3):
    def clone(backend):
        m = gsae_fast.GatedSAE(sae.d_in, sae.d_sae, backend=backend, device=x.device,
                               dtype=x.dtype)
        m.load_state_dict(sae.state_dict())
        return m

    def measure(module, loss):
        step = make_step(module, loss, torch.optim.Adam(module.parameters(), lr=1e-9, fused=True))
        return {"step_ms": timeit(step, repeats), "step_mem_mb": peak_mb(step)}

    ref = clone("reference")
    r = measure(ref, lambda ref=ref: ref.loss(x, l1).loss)
    shared = {"step_reference_ms": r["step_ms"], "step_reference_mem_mb": r["step_mem_mb"]}
    del ref
    if with_peers:
        for name, (module, loss) in peers(sae, x, l1).items():
            if name == "sae_lens":
                r = measure(module, loss)
                shared.update(step_sae_lens_ms=r["step_ms"], step_sae_lens_mem_mb=r["step_mem_mb"])
    per = {}
    for be in exes:
        m = clone(be)
        r = measure(m, lambda m=m: m.loss(x, l1).loss)
        r["step_over_gemm"] = r["step_ms"] / gemm_ms
        r["step_speedup_vs_reference"] = shared["step_reference_ms"] / r["step_ms"]
        per[be] = r
        del m
    return shared, per


def add_floors(row, shape, dtype, device, copy_gbs):
    """On a GPU: each measured time over its floor from the traffic model (bench/traffic.py) at
    the row's L0, the device's achievable FLOP/s and the measured copy bandwidth."""
    if device != "cuda":
        return row
    roof = dense_switch.device_roofline(torch.cuda.get_device_name())
    floors = traffic.floors_ms(shape, row["l0"], dtype, roof, bandwidth=copy_gbs * 1e9)
    row.update(floors)
    for name, measured in (("encode", "encode_op_ms"), ("decode", "decode_fwd_bwd_grouped_ms"),
                           ("step", "step_ms")):
        if row.get(measured) is not None:
            row[f"{name}_over_floor"] = row[measured] / floors[f"{name}_floor_ms"]
    return row


def crossing(points):
    """The L0 where the dense step becomes faster than the sparse one: log-linear interpolation
    of log(sparse / dense) between the two sweep points around its sign change (None if none)."""
    ratio = [(l0, math.log(sp / de)) for l0, sp, de in points if sp > 0 and de > 0]
    for (l0a, ra), (l0b, rb) in zip(ratio, ratio[1:]):
        if ra < 0 <= rb:
            t = -ra / (rb - ra)
            return math.exp(math.log(l0a) + t * (math.log(l0b) - math.log(l0a)))
    if ratio and ratio[0][1] >= 0:
        return float(ratio[0][0])  # dense already wins at the lowest L0: at most that
    return None


def sweep(shape, dtype, be, l0s, repeats, device, l1=1e-3):
    """The sparse and the dense training step of executor ``be`` at each L0 (the switch forced
    either way with dense_switch.set_dense_switch); rows and the measured / modelled crossing."""
    rows = []
    dev_type = torch.device(device).type
    for l0 in l0s:
        x, sae = make_case(shape, dtype, l0, device)
        m = gsae_fast.GatedSAE(sae.d_in, sae.d_sae, backend=be, device=x.device, dtype=x.dtype)
        m.load_state_dict(sae.state_dict())
        step = make_step(m, lambda m=m, x=x: m.loss(x, l1).loss,
                         torch.optim.Adam(m.parameters(), lr=1e-9, fused=True))
        row = {"executor": be, "target_l0": l0}
        for path, fraction in (("sparse", 1.0), ("dense", 0.0)):
            dense_switch.set_dense_switch(fraction, dev_type)
            try:  # timeit's warm-ups set the capacity hint before the timed calls
                row[f"{path}_step_ms"] = timeit(step, repeats)
            finally:
                dense_switch.set_dense_switch(None, dev_type)
        with torch.no_grad():
            out = m.loss(x, l1)
        row.update(l0=round(out.l0.item(), 1), capacity=m._capacity,
                   sparse_over_dense=row["sparse_step_ms"] / row["dense_step_ms"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del x, sae, m
        if device == "cuda":
            torch.cuda.empty_cache()
    l0_star = crossing([(r["l0"], r["sparse_step_ms"], r["dense_step_ms"]) for r in rows])
    d_sae = shape[2]
    first = rows[0]["sparse_step_ms"] >= rows[0]["dense_step_ms"] if rows else False
    result = {"measured_l0": l0_star, "dense_wins_everywhere": first,
              "measured_fraction": None if l0_star is None
              else l0_star * dense_switch.CAPACITY_OVER_L0 / d_sae,
              "default_fraction": dense_switch.default_dense_switch(device, dtype)}
    if device == "cuda":
        roofline = dense_switch.device_roofline(torch.cuda.get_device_name())
        model = dense_switch.dense_switch_model(roofline, dtype, d_in=shape[1])
        result.update(model_l0=model["l0_fraction"] * d_sae, model_fraction=model["fraction"])
    return rows, result


SWEEP_COLS = ["executor", "target_l0", "l0", "capacity", "sparse_step_ms", "dense_step_ms",
              "sparse_over_dense"]


def sweep_markdown(rows, results, meta, dtype_name):
    out = [f"# Dense switch sweep on {meta['device']}", "",
           f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton "
           f"{meta['triton']}; {dtype_name}; B, d_in, d_sae = "
           + ", ".join(map(str, meta["shape"])) + f"; median of {meta['repeats']}. The "
           "training step (zero_grad + loss + backward + fused Adam) forced sparse and forced "
           "dense (dense_switch.set_dense_switch); crossing = where dense becomes faster "
           "(log-linear "
           "interpolation), as mean L0 and as the capacity switch (L0 * "
           f"{dense_switch.CAPACITY_OVER_L0:.3f} / d_sae).", ""]
    out += md_table(SWEEP_COLS, [[cell(r.get(c)) for c in SWEEP_COLS] for r in rows])
    out.append("")
    for be, res in results.items():
        def num(v, fmt):
            return "none in the sweep" if v is None else format(v, fmt)
        at = "<= " if res.get("dense_wins_everywhere") else ""
        line = (f"{be}: measured crossing L0 = {at}{num(res['measured_l0'], '.0f')} (switch "
                f"fraction {num(res['measured_fraction'], '.4f')})")
        if "model_l0" in res:
            line += (f"; model L0 = {res['model_l0']:.0f} (fraction "
                     f"{res['model_fraction']:.4f})")
        line += f"; default fraction in use {res['default_fraction']:.4f}."
        out.append(line)
    return "\n".join(out) + "\n"


SECTIONS = [
    ("Fused encode vs one cuBLAS GEMM of the same shape (goal: op / gemm <= 1.15)",
     ["dtype", "l0", "executor", "capacity", "gemm_ms", "encode_op_ms", "encode_kernel_ms",
      "encode_op_over_gemm", "encode_floor_ms", "encode_over_floor", "reference_encode_ms",
      "encode_speedup_vs_reference", "encode_mem_mb", "reference_encode_mem_mb"]),
    ("Sparse decode (goal: forward >= 70% of copy bandwidth)",
     ["dtype", "l0", "executor", "decode_fwd_ms", "decode_fwd_gbs", "decode_fwd_of_copy_bw",
      "decode_fwd_bwd_grouped_ms", "decode_fwd_bwd_atomic_ms", "decode_floor_ms",
      "decode_over_floor", "dense_decode_fwd_bwd_ms",
      "decode_speedup_vs_dense"]),
    ("Training step (goal: >= 4x faster than the reference)",
     ["dtype", "l0", "executor", "step_ms", "gemm_ms", "step_over_gemm", "step_floor_ms",
      "step_over_floor", "step_reference_ms",
      "step_speedup_vs_reference", "step_sae_lens_ms", "step_mem_mb", "step_reference_mem_mb",
      "step_sae_lens_mem_mb"]),
]


def cell(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def markdown(rows, meta):
    out = [f"# GPU executors ({', '.join(meta['executors'])}) on {meta['device']}", "",
           f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']} (CUDA "
           f"{meta['cuda']}), triton {meta['triton']}; median of {meta['repeats']} after 2 "
           "warm-ups; measured copy "
           f"bandwidth {meta['copy_gbs']:.0f} GB/s. One row per executor; ratios: *_over_gemm "
           "= time / cuBLAS GEMM of the encoder's shape, *_speedup_vs_* = other / this.", ""]
    out += [f"Not measured: {be} executor ({why})." for be, why in meta["missing"].items()]
    out += [f"Failed: {case} ({err})." for case, err in meta["errors"].items()]
    for title, cols in SECTIONS:
        out += ["", f"## {title}", "", "B, d_in, d_sae = " + ", ".join(map(str, meta["shape"])),
                ""]
        out += md_table(cols, [[cell(r.get(c)) for c in cols] for r in rows])
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, print only")
    ap.add_argument("--quick", action="store_true",
                    help="the full shape at L0 32 only, 5 repeats, no peers")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                    help="measure only this dtype (repeatable; default float32 and bfloat16)")
    ap.add_argument("--executor", action="append", choices=EXECUTORS,
                    help="measure only this executor (repeatable; default every one built)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="the dense switch: sparse vs dense step at L0 128 .. 8192 (--smoke: "
                         "4 .. 64), measured crossing next to the model's")
    ap.add_argument("--l0", type=int, action="append",
                    help="with --sweep: measure at this L0 (repeatable) instead")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = args.executor or EXECUTORS
    why = {be: backends.why_unavailable(be, torch.device(device)) for be in wanted}
    exes = [be for be in wanted if why[be] is None]
    if not exes:
        sys.exit(f"bench_gpu: no GPU executor can run on {device}: {why}")
    shape = SMOKE if args.smoke else FULL
    repeats = args.repeats or (1 if args.smoke else 5 if args.quick else 10)
    dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtype or ("float32", "bfloat16")))
    l0s = (8,) if args.smoke else (32,) if args.quick else (32, 128)
    cases = [(dt, l0) for dt in dtypes for l0 in l0s][:1 if args.smoke else None]
    copy_gbs = copy_bandwidth_gbs(device, repeats)
    meta = {"date": stamp(), "commit": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
            "repeats": repeats,
            "device": torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)",
            "shape": shape, "copy_gbs": copy_gbs, "executors": exes,
            "missing": {be: r for be, r in why.items() if r is not None}, "errors": {}}
    for be, r in meta["missing"].items():
        print(f"bench_gpu: {be} executor not measured: {r}", file=sys.stderr)
    stem = None
    if args.out is not None or not args.smoke:
        out_dir = args.out or RESULTS
        os.makedirs(out_dir, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "_", meta["device"].lower()).strip("_")
        stem = os.path.join(out_dir, f"gpu_{slug}" + ("_sweep" if args.sweep else
                                                      "_quick" if args.quick else ""))
    rows = []
    if args.sweep:
        return run_sweep(args, shape, dtypes, exes, repeats, device, meta, stem)

    def save():  # after every row: a crash later keeps what was measured
        if stem is not None:
            write_pair(stem, markdown(rows, meta), {"meta": meta, "rows": rows})

    for i, (dtype, l0) in enumerate(cases):
        name = str(dtype).split(".")[1]
        print(f"[{i + 1}/{len(cases)}] {name} L0={l0}: {', '.join(exes)}", file=sys.stderr,
              flush=True)
        x, sae = make_case(shape, dtype, l0, device)
        for be in exes:  # one at a time: an executor that fails leaves the others' rows
            try:
                enc, enc_per, acts = bench_encode(x, sae, [be], repeats)
                dec, dec_per = bench_decode(acts, sae, [be], repeats, copy_gbs)
                step, step_per = bench_step(x, sae, [be], repeats, enc["gemm_ms"],
                                            with_peers=not (args.no_peers or args.smoke
                                                            or args.quick))
            except Exception as e:  # noqa: BLE001 - recorded, and the exit code says so
                traceback.print_exc()
                meta["errors"][f"{name} L0={l0} {be}"] = f"{type(e).__name__}: {e}"
                save()
                continue
            row = {"dtype": name, **enc, **dec, **step, "executor": be, **enc_per[be],
                   **dec_per[be], **step_per[be]}
            add_floors(row, shape, dtype, device, copy_gbs)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save()
            del acts
        del x, sae
        if device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(rows, meta))
    if stem is not None:
        print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    if meta["errors"]:
        sys.exit(f"bench_gpu: failed: {meta['errors']}")


def run_sweep(args, shape, dtypes, exes, repeats, device, meta, stem):
    l0s = tuple(args.l0 or (SMOKE_SWEEP_L0S if args.smoke else SWEEP_L0S))
    errors = meta["errors"]
    for dtype in dtypes:
        name = str(dtype).split(".")[1]
        rows, results = [], {}
        for be in exes:
            print(f"sweep {name} {be}: L0 {', '.join(map(str, l0s))}", file=sys.stderr,
                  flush=True)
            try:
                r, results[be] = sweep(shape, dtype, be, l0s, repeats, device)
            except Exception as e:  # noqa: BLE001 - recorded, and the exit code says so
                traceback.print_exc()
                errors[f"sweep {name} {be}"] = f"{type(e).__name__}: {e}"
                continue
            rows += r
        text = sweep_markdown(rows, results, meta, name)
        print(text)
        if stem is not None:
            path = stem + ("" if len(dtypes) == 1 else f"_{name}")
            write_pair(path, text, {"meta": meta, "rows": rows, "results": results})
            print(f"wrote {path}.md and {path}.json", file=sys.stderr)
    if errors:
        sys.exit(f"bench_gpu: failed: {errors}")


if __name__ == "__main__":
    main()
