"""Traffic model of one Gated SAE training step: per op, the bytes and flops it must move and do
at minimum, what the implementation moves (counted from the kernels' loops), and the floor time
on an H100 and an H200.

    python bench/traffic.py          # headline shape (B=4096, d_in=2304, d_sae=65536), L0 32
                                     # and 128, bf16 -> bench/results/traffic_model.md

Symbols: s = bytes per element of the compute dtype, a = 4 (fp32 accumulators: f, pi_gate and
their gradients in the sparse format), i = 4 (int32 idx), P = B * L0 active (token, feature)
pairs, BK = B * K slots (K = the capacity, padding included). "min" is HBM traffic of the op as
defined (every used W_dec row read once forward, once backward; rows of x and grad_out, B * d_in
* s = 19 MB at the headline shape, gathered from L2 after one HBM read); "triton" / "cuda" count
the loads and stores of each executor's loops with no reuse across programs (so every gathered
row is HBM traffic), the torch glue around them counted per tensor pass. Floor = max(bytes / BW,
flops / F) at the achievable rates (gsae_fast.dense_switch.Roofline). The step's aux term is
"frozen" (the default), sparsity "unit", x needs no gradient; the grouped (deterministic) scatters.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported
from _harness import RESULTS, ROOT, git_commit, md_table, stamp  # noqa: E402

sys.path.insert(0, ROOT)  # this tree's gsae_fast

from gsae_fast import dense_switch, ops, reference  # noqa: E402

HEADLINE = (4096, 2304, 65536)
A, I4, I8 = 4, 4, 8  # fp32 accumulator, int32 index, int64 index / position
# Triton tiles the counts use (kernels/*.py; the autotuner may pick others: the count is per
# program, so only the re-read factors of small per-slot data depend on them).
TRITON_DECODE_BD = 256  # sparse_decode: columns per program (idx / val re-read per block)
TRITON_DOT_BS = 16  # _sparse_dot_kernel: slots per program (the grad_out row re-read per block)
TRITON_SCATTER_BF, TRITON_SCATTER_BC = 32, 128  # grouped_scatter: features x columns per tile
# torch.sort of BK int32 keys with int64 positions (radix sort, 4 passes of 8-bit digits, each
# reading and writing key + position) plus the key / mask building: per slot. An estimate of
# torch's kernels, not counted from ours.
SORT_BYTES_PER_SLOT = 4 * 2 * (I4 + I8) + 16
# The per-slot prologue of the encode backward (torch glue on [B, K] tensors: mask, where,
# exp(r_mag)[idx], dz, z, the stacked per-pair values): ~30 passes of 4 bytes. An estimate.
PROLOGUE_BYTES_PER_SLOT = 30 * A


@dataclass
class Op:
    name: str
    flops: float  # minimum flops (fp32 accumulate counted as 2 per multiply-add)
    min_bytes: float
    triton_bytes: float
    cuda_bytes: float
    triton_flops: float = 0.0  # when the implementation does more than ``flops`` (0: same)
    in_step: bool = True
    group: str = ""  # "encode" / "decode" (bench_gpu's decode fwd+bwd) / ""
    row_passes: tuple = (0, 0)  # (min, implementation) whole d_in-rows read per active pair
    note: str = ""


def capacity_for(l0: float, d_sae: int) -> int:
    """The capacity a training loop hands the encode at mean L0 (ops.next_capacity of the
    largest row, modelled as dense_switch.CAPACITY_OVER_L0 / 1.25 times the mean)."""
    return ops.next_capacity(int(round(l0 * dense_switch.CAPACITY_OVER_L0 / 1.25)), d_sae)


def step_ops(B: int, d_in: int, d_sae: int, l0: float, s: int = 2, K: int = None) -> list:
    """The ops of one training step, their minimum and counted traffic (bytes) and flops."""
    K = capacity_for(l0, d_sae) if K is None else K
    P, BK = B * l0, B * K
    X = B * d_in * s  # one [B, d_in] matrix (x, x_hat, grad_out)
    W = d_in * d_sae * s  # one weight matrix
    V = d_sae * s  # one per-feature vector
    rows = P * d_in * s  # one gather of a d_in-row per active pair
    gemm = 2.0 * B * d_in * d_sae
    nd = math.ceil(d_in / TRITON_DECODE_BD)
    nc = math.ceil(d_in / TRITON_SCATTER_BC)
    one_hot = 2.0 * TRITON_SCATTER_BF * P * d_in  # grouped_scatter's tl.dot with a one-hot tile
    slot = I4 + 2 * A  # idx, f, pi_gate
    ops_ = [
        Op("encode: GEMM + gate/magnitude epilogue + compaction", gemm,
           min_bytes=X + W + 3 * V + d_in * s + P * slot + 4 * B,
           # zeroed outputs, the kernel's active stores, the host's row sort + gather of f, pi
           triton_bytes=X + W + 3 * V + 2 * d_in * s + BK * slot + P * slot + 4 * B
           + BK * (SORT_BYTES_PER_SLOT + 2 * (I8 + 2 * A)),
           # + the fp32 z blocks written by cuBLAS and read by the epilogue, centre = b_dec @ W
           cuda_bytes=X + 2 * W + 3 * (V + d_sae * A) + 2 * B * d_sae * A + BK * slot
           + P * slot + 4 * B,
           group="encode"),
        Op("decode fwd (x_hat = f @ W_dec + b_dec)", 2.0 * P * d_in,
           min_bytes=rows + P * (I4 + A) + X + d_in * s,
           triton_bytes=rows + nd * P * (I4 + A) + X + B * d_in * s,
           cuda_bytes=rows + nd * P * (I4 + A) + X + B * d_in * s,
           group="decode", row_passes=(1, 1),
           note="W_dec rows: the one forward read"),
        Op("aux decode fwd (relu(pi_gate) @ W_dec' + b_dec')", 2.0 * P * d_in,
           min_bytes=P * A + X + d_in * s,
           # the pair kernel (sparse_decode_pair): the rows and indices the x_hat decode reads
           # serve both accumulators; only the second values and output are extra
           triton_bytes=nd * P * A + B * d_in * s,
           cuda_bytes=nd * P * A + B * d_in * s,
           row_passes=(0, 0), note="one kernel with the x_hat decode (sparse_decode_pair)"),
        Op("decode bwd: value grad (grad f = grad_out . W_dec[idx])", 2.0 * P * d_in,
           min_bytes=rows + P * (I4 + A) + X,
           # grad_val zeroed and stored on every slot; grad_out row re-read per slot block
           triton_bytes=rows + P * I4 + math.ceil(K / TRITON_DOT_BS) * X + 2 * BK * A,
           # grad_out converted to fp32 once, then one fp32 grad_out row per slot (warp dot)
           cuda_bytes=rows + P * I4 + X + B * d_in * A + P * d_in * A + BK * A,
           group="decode", row_passes=(1, 1), note="W_dec rows: the one backward read"),
        Op("decode bwd: grad W_dec (grouped by feature)", 2.0 * P * d_in,
           min_bytes=X + P * (I4 + A) + W,
           triton_bytes=BK * SORT_BYTES_PER_SLOT + BK * (I8 + A + 2 * I8) + rows
           + nc * P * (I8 + I4 + A) + W,
           cuda_bytes=BK * SORT_BYTES_PER_SLOT + BK * (I8 + A) + P * d_in * A
           + P * (I8 + A) + W,
           triton_flops=one_hot, group="decode", row_passes=(0, 1),
           note="a grad_out row per pair (min: from L2); cuda: fp32 rows"),
        Op("aux decode bwd: value grad (grad relu(pi_gate))", 2.0 * P * d_in,
           min_bytes=P * A + X,
           # the pair kernel: a second dot per row the value grad above reads; extra are the
           # second gradient's rows and the second output
           triton_bytes=math.ceil(K / TRITON_DOT_BS) * X + 2 * BK * A,
           cuda_bytes=X + B * d_in * A + P * d_in * A + BK * A,
           row_passes=(0, 0), note="two dots per row read by the value grad above (one kernel)"),
        Op("encode bwd: grad W_enc, bias grads, grad b_dec", 2.0 * P * d_in + 2.0 * W / s,
           min_bytes=X + P * (I4 + 4 * A) + W + W + 4 * V + 3 * V,
           # both: grad W_enc written once in W_enc's layout and dtype; grad b_dec: Triton's
           # GEMV reads W_enc as it is, the CUDA executor's runs in ops.py over fp32 copies of
           # 16 MiB blocks of W_enc (written and read back: from L2 on an H100 / H200, counted
           # here as HBM); cuda: xc = x - b_dec in fp32, fp32 rows per pair
           triton_bytes=BK * (PROLOGUE_BYTES_PER_SLOT + SORT_BYTES_PER_SLOT) + rows
           + nc * P * (I8 + I4 + A) + P * 4 * A + d_sae * 4 * A + W + W + 4 * (V + d_sae * A),
           cuda_bytes=BK * (PROLOGUE_BYTES_PER_SLOT + SORT_BYTES_PER_SLOT) + X + B * d_in * A
           + P * d_in * A + P * (I8 + 4 * A) + W + W + 2 * d_in * d_sae * A
           + 4 * (V + d_sae * A),
           triton_flops=one_hot + 2.0 * W / s, row_passes=(0, 1),
           note="an x row per pair (min: from L2)"),
        Op("encode bwd: grad x (only when x needs a gradient)", 2.0 * P * d_in,
           min_bytes=P * (I4 + A) + rows + X,
           triton_bytes=2 * W + rows + nd * P * (I4 + A) + X,
           cuda_bytes=2 * W + rows + nd * P * (I4 + A) + X, in_step=False,
           note="a sparse decode through W_enc^T (transposed copy of W_enc first)"),
        Op("loss glue (mse, aux, sparsity on [B, d_in] and [B, K])", 0.0,
           min_bytes=4 * X, triton_bytes=12 * X + 8 * BK * A, cuda_bytes=12 * X + 8 * BK * A,
           note="torch elementwise; an estimate (passes counted by hand)"),
        Op("Adam (fused; params, grads, m, v in the compute dtype)", 0.0,
           min_bytes=7 * (2 * W + 3 * V + d_in * s), triton_bytes=7 * (2 * W + 3 * V + d_in * s),
           cuda_bytes=7 * (2 * W + 3 * V + d_in * s),
           note="read param, grad, m, v; write param, m, v"),
    ]
    return ops_


def op_floor_s(flops: float, nbytes: float, roofline: "dense_switch.Roofline", dtype=torch.bfloat16,
               achievable: bool = True, bandwidth: float = None) -> float:
    """max(bytes / BW, flops / F): the op's time at the roofline (``bandwidth`` overrides)."""
    bw = bandwidth or roofline.peak_bandwidth(achievable)
    return max(nbytes / bw, flops / roofline.peak_flops(dtype, achievable))


def floors_ms(shape, l0, dtype, roofline, bandwidth=None) -> dict:
    """Floors (ms) of what bench_gpu.py times: the encode op, the decode forward + backward (one
    decode, value grad and grad W_dec) and the training step, at mean ``l0``."""
    s = torch.finfo(dtype).bits // 8
    out = {"encode_floor_ms": 0.0, "decode_floor_ms": 0.0, "step_floor_ms": 0.0}
    for op in step_ops(*shape, l0, s):
        t = op_floor_s(op.flops, op.min_bytes, roofline, dtype, bandwidth=bandwidth) * 1e3
        if op.group:
            out[f"{op.group}_floor_ms"] += t
        if op.in_step:
            out["step_floor_ms"] += t
    return out


def row_passes(shape=HEADLINE, l0=32) -> tuple:
    """(min, implementation) d_in-rows gathered per active pair in one step."""
    step = [op for op in step_ops(*shape, l0) if op.in_step]
    return sum(op.row_passes[0] for op in step), sum(op.row_passes[1] for op in step)


# --------------------------------------------------------------------------------------------
# The dense step's traffic, counted from reference.gated_sae_loss with a dispatch mode.
# --------------------------------------------------------------------------------------------

GEMM_OPS = {"mm", "addmm", "bmm", "matmul", "mv", "dot", "baddbmm"}


def dense_step_counts(dtype=torch.bfloat16, sparsity="unit", aux="frozen") -> dict:
    """Per [B, d_sae] element of the dense reference step (forward + backward): the bytes its
    non-GEMM ops read and write of [B, d_sae] tensors (views move nothing), and the number of
    GEMMs of B * d_in * d_sae multiply-adds. Counted on a tiny CPU problem."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    B, d_in, d_sae = 16, 8, 64
    big = B * d_sae

    class Count(TorchDispatchMode):
        nbytes = 0
        gemm_flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if func.__name__.split(".")[0] in GEMM_OPS:
                a, b = [t for t in ins if t.dim() == 2][-2:]
                Count.gemm_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            elif not func.is_view:
                Count.nbytes += sum(t.numel() * t.element_size() for t in ins + outs
                                    if t.numel() == big)
            return out

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g).to(dtype)
    shapes = [(d_in, d_sae), (d_sae, d_in), (d_in,), (d_sae,), (d_sae,), (d_sae,)]
    params = [(0.3 * torch.randn(sh, generator=g)).to(dtype).requires_grad_() for sh in shapes]
    with Count():
        out = reference.gated_sae_loss(x, *params, 0.1, sparsity=sparsity, aux=aux)
        out.loss.backward()
    return {"elementwise_bytes": Count.nbytes / big,
            "gemms": Count.gemm_flops / (2 * B * d_in * d_sae)}


def dense_step_s(shape, dtype, roofline, achievable=True) -> float:
    B, d_in, d_sae = shape
    F, BW = roofline.peak_flops(dtype, achievable), roofline.peak_bandwidth(achievable)
    s = torch.finfo(dtype).bits // 8
    adam = 7 * (2 * d_in * d_sae + 3 * d_sae + d_in) * s  # as the sparse step's (step_ops)
    return (dense_switch.DENSE_GEMMS * 2 * B * d_in * d_sae / F
            + (dense_switch.DENSE_ELEMENTWISE_BYTES * (s / 2) * B * d_sae + adam) / BW)


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

DEVICES = ("H100", "H200")


def table(shape=HEADLINE, l0s=(32, 128), dtype=torch.bfloat16) -> str:
    B, d_in, d_sae = shape
    s = torch.finfo(dtype).bits // 8
    roofs = {d: dense_switch.device_roofline(d) for d in DEVICES}
    out = []
    cols = (["op", "min GB", "GFLOP", "triton GB", "cuda GB"]
            + [f"{d} {x} us" for d in DEVICES for x in ("floor", "triton")] + ["note"])
    for l0 in l0s:
        K = capacity_for(l0, d_sae)
        out += ["", f"## L0 = {l0} (capacity K = {K}), B, d_in, d_sae = {B}, {d_in}, {d_sae}, "
                f"{str(dtype).split('.')[1]}", ""]
        rows = []
        tot = {k: 0.0 for k in ["min", "flops", "tr", "cu"] + [f"{d}{x}" for d in DEVICES
                                                                 for x in "ft"]}
        for op in step_ops(B, d_in, d_sae, l0, s):
            cells = [op.name + ("" if op.in_step else " (not in the step)"),
                     f"{op.min_bytes / 1e9:.3f}", f"{op.flops / 1e9:.1f}",
                     f"{op.triton_bytes / 1e9:.3f}", f"{op.cuda_bytes / 1e9:.3f}"]
            for d in DEVICES:
                fl = op_floor_s(op.flops, op.min_bytes, roofs[d], dtype) * 1e6
                tr = op_floor_s(op.triton_flops or op.flops, op.triton_bytes, roofs[d],
                                dtype) * 1e6
                cells += [f"{fl:.0f}", f"{tr:.0f}"]
                if op.in_step:
                    tot[d + "f"] += fl
                    tot[d + "t"] += tr
            if op.in_step:
                tot["min"] += op.min_bytes
                tot["flops"] += op.flops
                tot["tr"] += op.triton_bytes
                tot["cu"] += op.cuda_bytes
            rows.append(cells + [op.note])
        cells = ["**step**", f"{tot['min'] / 1e9:.3f}", f"{tot['flops'] / 1e9:.1f}",
                 f"{tot['tr'] / 1e9:.3f}", f"{tot['cu'] / 1e9:.3f}"]
        cells += [f"{tot[d + x]:.0f}" for d in DEVICES for x in "ft"]
        out += md_table(cols, rows + [cells + ["sum of the ops in the step"]])
        dense = {d: dense_step_s(shape, dtype, roofs[d]) * 1e6 for d in DEVICES}
        out += ["", "Dense reference step (model: "
                f"{dense_switch.DENSE_GEMMS} GEMMs + "
                f"{dense_switch.DENSE_ELEMENTWISE_BYTES:.0f} bytes per "
                "[B, d_sae] element + Adam): "
                + ", ".join(f"{d} {dense[d]:.0f} us" for d in DEVICES)
                + "; sparse floor / dense: " + ", ".join(
                    f"{d} {tot[d + 'f'] / dense[d]:.3f}" for d in DEVICES)]
    return "\n".join(out)


def switch_table(dtype=torch.bfloat16) -> str:
    rows = []
    for d in DEVICES + ("A100",):
        m = dense_switch.dense_switch_model(dense_switch.device_roofline(d), dtype)
        rows.append([dense_switch.device_roofline(d).name, f"{m['flops'] / 1e12:.0f}",
                     f"{m['bandwidth'] / 1e12:.2f}", f"{m['gemm_term']:.4f}",
                     f"{m['elementwise_term']:.4f}", f"{m['l0_fraction']:.4f}",
                     f"{m['l0_fraction'] * 65536:.0f}", f"{m['fraction']:.4f}"])
    return "\n".join(md_table(["device", "F (TFLOP/s)", "BW (TB/s)", "GEMM term",
                                "elementwise term", "L0* / d_sae", "L0* at d_sae 65536",
                                "capacity switch (fraction of d_sae)"], rows))


def markdown(commit: str) -> str:
    rmin, rimpl = row_passes()
    roofs = ", ".join(f"{r.name} {r.peak_flops(torch.bfloat16, False) / 1e12:.0f} TFLOP/s bf16 "
                      f"({r.peak_flops() / 1e12:.0f} achievable), HBM "
                      f"{r.peak_bandwidth(False) / 1e12:.2f} TB/s "
                      f"({r.peak_bandwidth() / 1e12:.2f} achievable)"
                      for r in map(dense_switch.device_roofline, DEVICES))
    return "\n".join([
        "# Traffic model of a Gated SAE training step", "",
        f"Generated by `bench/traffic.py` ({stamp(minutes=False)}, commit {commit}); a model, "
        "nothing measured. " + roofs + ". Floor = max(bytes / BW, flops / F) at the achievable "
        "rates; 'triton us' is the same for the Triton executor's counted bytes (and its "
        "one-hot scatter flops). Symbols and what each column counts: the module docstring.",
        "", f"d_in-rows gathered per active pair per step: {rimpl} today (W_dec in the x_hat "
        "decode and the value gradient, each shared with the aux term by the pair kernels; "
        "grad_out in grad W_dec; x in grad "
        f"W_enc), {rmin} at the floor (each used W_dec row once forward, once backward).",
        table(), "", "## The dense switch (gsae_fast.dense_switch.dense_switch_model, bf16, d_in = "
        f"{dense_switch.MODEL_D_IN})", "",
        f"Dense step: {dense_switch.DENSE_GEMMS} GEMMs of 2 B d_in d_sae flops + "
        f"{dense_switch.DENSE_ELEMENTWISE_BYTES:.0f} bytes per [B, d_sae] element; "
        "sparse step: 1 GEMM + "
        f"{dense_switch.SPARSE_ROW_PASSES} row gathers of d_in * s bytes per active pair. "
        "Crossing: "
        "L0* / d_sae = ((G - 1) * 2 * BW / F + E / d_in) / (R * s); capacity switch = L0* / "
        f"d_sae * {dense_switch.CAPACITY_OVER_L0:.3f}.", "", switch_table(), ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(RESULTS, "traffic_model.md"))
    ap.add_argument("--print", action="store_true", help="print only")
    args = ap.parse_args()
    text = markdown(git_commit())
    print(text)
    if not args.print:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
