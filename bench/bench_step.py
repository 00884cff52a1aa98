"""One Gated SAE training step, side by side in one run, at stated L0s.

Rows per (shape, L0), all on the same parameters and batch:
  reference  the dense PyTorch step (gsae_fast.reference: ~7 GEMMs of the encoder's size)
  cpu        the C++ kernels (sparse path; above the dense switch gsae_fast goes dense itself,
             the "cpu-sparse" column forces the sparse path to show where the switch belongs)
  sae_lens / dictionary_learning   their Gated training losses (fwd + bwd + the same Adam),
             when the packages are installed (base shape only)
  gemm       one x @ W_enc GEMM of the same shape (fresh output, as in a step)
  floor      gemm + the Adam step (the work no Gated SAE step can avoid)
A step is zero_grad + loss + backward + torch.optim.Adam(fused=True).step(). Adam runs with
lr=1e-9 so the parameters, hence L0, stay where the row says across repeats (the optimizer does
the same work at any lr). b_gate is set so that the batch's mean L0 is the target.

Memory: the peak resident memory added by one call (fresh subprocess each), for encode_sparse
and for the reference encode, next to the size of one [B, d_sae] fp32 matrix.

    python bench/bench_step.py --quick          # README main job: ~1 minute, prints the table
    python bench/bench_step.py                  # full: both shapes, L0 in {16, 64, 256, 2048}
A full run writes bench/results/step_cpu.md and .json (or to --out DIR).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from _harness import (  # bench/
    RESULTS,
    ROOT,
    cpu_name,
    git_commit,
    md_table,
    reset_peak,
    rss_kb,
    stamp,
    timeit,
    write_pair,
)

sys.path.insert(0, ROOT)  # this tree's gsae_fast

import gsae_fast  # noqa: E402
from gsae_fast import ops, reference  # noqa: E402

BASE = (1024, 512, 16384)   # (B, d_in, d_sae)
LARGE = (2048, 1024, 32768)
L0S = (16, 64, 256, 2048)
PARAMS = ("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag")


def set_l0(sae, x, l0):
    """One b_gate for all features so that the batch mean of active features is l0."""
    with torch.no_grad():
        z = ((x - sae.b_dec) @ sae.W_enc).flatten()
        k = max(1, int(round(l0 * x.shape[0])))
        sae.b_gate.fill_(-torch.topk(z, k + 1).values[-2:].mean().item())


def make_step(sae, loss_fn, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        out = loss_fn()
        out.backward()
        opt.step()
    return step


def peers(sae, x, l1):
    """Loss closures of SAELens / dictionary_learning on sae's parameters, if installed."""
    found = {}
    p = {k: getattr(sae, k).detach() for k in PARAMS}
    d_in, d_sae = p["W_enc"].shape
    try:
        from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
        s = GatedTrainingSAE(GatedTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, dtype=str(x.dtype).split(".")[1], device=str(x.device),
            apply_b_dec_to_input=True,
            normalize_activations="none", l1_coefficient=l1))
        with torch.no_grad():
            for k in PARAMS:
                getattr(s, k).copy_(p[k])
        inp = TrainStepInput(sae_in=x, coefficients={"l1": l1}, dead_neuron_mask=None,
                             n_training_steps=0, is_logging_step=False)
        found["sae_lens"] = (s, lambda: s.training_forward_pass(inp).loss)
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"  (sae_lens not timed: {type(e).__name__}: {e})", file=sys.stderr)
    try:
        import types
        if "nnsight" not in sys.modules:  # its package import needs only nnsight's name
            stub = types.ModuleType("nnsight")
            stub.LanguageModel = object
            sys.modules["nnsight"] = stub
        from dictionary_learning.trainers.gdm import GatedSAETrainer
        tr = GatedSAETrainer(steps=10_000, activation_dim=d_in, dict_size=d_sae, layer=0,
                             lm_name="none", l1_penalty=l1, warmup_steps=0,
                             sparsity_warmup_steps=None, device=str(x.device), wandb_name=None)
        ae = tr.ae
        with torch.no_grad():
            ae.encoder.weight.copy_(p["W_enc"].T)
            ae.decoder.weight.copy_(p["W_dec"].T)
            ae.decoder_bias.copy_(p["b_dec"])
            ae.gate_bias.copy_(p["b_gate"])
            ae.mag_bias.copy_(p["b_mag"])
            ae.r_mag.copy_(p["r_mag"])
        found["dictionary_learning"] = (ae, lambda: tr.loss(x, step=10_000))
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"  (dictionary_learning not timed: {type(e).__name__}: {e})", file=sys.stderr)
    return found


def bench_case(shape, l0, repeats, with_peers, l1=1e-3):
    B, d_in, d_sae = shape
    torch.manual_seed(0)
    x = torch.randn(B, d_in)
    sae = gsae_fast.GatedSAE(d_in, d_sae, backend="cpu")
    set_l0(sae, x, l0)
    ref = gsae_fast.GatedSAE(d_in, d_sae, backend="reference")
    ref.load_state_dict(sae.state_dict())
    row = {"B": B, "d_in": d_in, "d_sae": d_sae, "target_l0": l0}
    with torch.no_grad():
        row["l0"] = round(sae.loss(x, l1).l0.item(), 1)
    W = sae.W_enc.detach()
    row["gemm_ms"] = timeit(lambda: x @ W, repeats)
    adam = torch.optim.Adam(sae.parameters(), lr=1e-9, fused=True)
    for prm in sae.parameters():
        prm.grad = torch.zeros_like(prm)
    row["adam_ms"] = timeit(adam.step, repeats)
    row["floor_ms"] = row["gemm_ms"] + row["adam_ms"]
    row["cpu_ms"] = timeit(make_step(sae, lambda: sae.loss(x, l1).loss, adam), repeats)
    ops.set_dense_switch(1.0, "cpu")  # force the sparse path whatever the L0
    try:
        row["cpu_sparse_ms"] = timeit(make_step(sae, lambda: sae.loss(x, l1).loss, adam), repeats)
    finally:
        ops.set_dense_switch(None, "cpu")
    ref_adam = torch.optim.Adam(ref.parameters(), lr=1e-9, fused=True)
    row["reference_ms"] = timeit(make_step(ref, lambda: ref.loss(x, l1).loss, ref_adam), repeats)
    if with_peers:
        for name, (module, loss) in peers(sae, x, l1).items():
            opt = torch.optim.Adam(module.parameters(), lr=1e-9, fused=True)
            row[f"{name}_ms"] = timeit(make_step(module, loss, opt), repeats)
    row["speedup_vs_reference"] = row["reference_ms"] / row["cpu_ms"]
    row["cpu_over_floor"] = row["cpu_ms"] / row["floor_ms"]
    row["cpu_over_gemm"] = row["cpu_ms"] / row["gemm_ms"]
    return row


# ------------------------------------------------------------------------------- memory probe

def memory_probe(what, B, d_in, d_sae, l0):
    """Run in a fresh process: peak RSS added by one call of `what`, in MB."""
    torch.manual_seed(0)
    x = torch.randn(B, d_in)
    sae = gsae_fast.GatedSAE(d_in, d_sae, backend="cpu")
    set_l0(sae, x, l0)
    with torch.no_grad():
        sae._capacity = ops.next_capacity(sae.encode_sparse(x[:64]).max_count * 2, d_sae)
        fn = {"encode_sparse": lambda: sae.encode_sparse(x),
              "reference_encode": lambda: reference.encode(x, sae.W_enc, sae.b_dec, sae.b_gate,
                                                           sae.r_mag, sae.b_mag)}[what]
        base = rss_kb("VmRSS:")
        reset_peak()
        out = fn()
        peak = rss_kb("VmHWM:")
    del out
    return (peak - base) / 1024


def memory_rows(shape, l0):
    B, d_in, d_sae = shape
    rows = {}
    for what in ("encode_sparse", "reference_encode"):
        cmd = [sys.executable, __file__, "--memory-probe", what, str(B), str(d_in), str(d_sae),
               str(l0)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[what] = float(res.stdout.strip().splitlines()[-1])
    rows["B_x_d_sae_fp32_mb"] = B * d_sae * 4 / 2 ** 20
    return rows


# ------------------------------------------------------------------------------------ report

def markdown(rows, mem, meta):
    cols = ["B", "d_in", "d_sae", "l0", "reference_ms", "cpu_ms", "cpu_sparse_ms", "gemm_ms",
            "adam_ms", "floor_ms", "speedup_vs_reference", "cpu_over_floor", "cpu_over_gemm"]
    cols += [c for c in ("sae_lens_ms", "dictionary_learning_ms") if any(c in r for r in rows)]
    out = [f"# Gated SAE training step, {meta['device']}", "",
           f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
           f"{meta['threads']} threads, fp32, Adam(fused=True). Median of {meta['repeats']} "
           "(after 2 warm-ups). Step = zero_grad + loss + backward + Adam.", ""]
    out += md_table(cols, [[
        f"{r[c]:.2f}" if isinstance(r.get(c), float)
        and c.endswith(("over_floor", "over_gemm", "reference"))
        else (f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")))
        for c in cols] for r in rows])
    if mem:
        out += ["", "Peak resident memory added by one call (MB), fresh process each:", ""]
        out += md_table(["shape (B, d_in, d_sae)", "L0", "encode_sparse", "reference encode",
                         "one B x d_sae fp32"],
                        [[m["shape"], m["l0"], f"{m['encode_sparse']:.1f}",
                          f"{m['reference_encode']:.1f}", f"{m['B_x_d_sae_fp32_mb']:.1f}"]
                         for m in mem])
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="base shape, L0 16 and 64, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true", help="skip SAELens / dictionary_learning")
    ap.add_argument("--no-large", action="store_true", help="skip the larger shape")
    ap.add_argument("--out", default=None,
                    help="results folder (default: bench/results for a full run; --quick only "
                    "prints unless --out is given)")
    ap.add_argument("--memory-probe", nargs=5, metavar=("WHAT", "B", "D_IN", "D_SAE", "L0"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        what, *nums = args.memory_probe
        print(memory_probe(what, *map(int, nums)))
        return
    if "cpu" not in gsae_fast.available_backends("cpu"):
        sys.exit("bench_step: the C++ extension is not built "
                 "(pip install --no-build-isolation -e .)")
    repeats = args.repeats or (2 if args.quick else 3)
    cases = [(BASE, l0) for l0 in ((16, 64) if args.quick else L0S)]
    if not args.quick and not args.no_large:
        cases += [(LARGE, l0) for l0 in (64, 256)]
    meta = {"date": stamp(), "commit": git_commit(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
            "device": f"CPU ({cpu_name()}, {os.cpu_count()} cores)",
            "quick": args.quick}
    rows = []
    for i, (shape, l0) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] B={shape[0]} d_in={shape[1]} d_sae={shape[2]} L0={l0}",
              file=sys.stderr, flush=True)
        # Peers (10-15x the GEMM per step) only at the base shape, to keep the run short.
        with_peers = not args.no_peers and not args.quick and shape == BASE
        rows.append(bench_case(shape, l0, repeats, with_peers=with_peers))
    mem = []
    for shape, l0 in ([(BASE, 64)] if args.quick else [(BASE, 64), (LARGE, 64)]):
        mem.append({"shape": shape, "l0": l0, **memory_rows(shape, l0)})
    md = markdown(rows, mem, meta)
    print(md)
    out_dir = args.out or (None if args.quick else RESULTS)
    if out_dir is None:
        return
    stem = os.path.join(out_dir, f"step_cpu{'_quick' if args.quick else ''}")
    write_pair(stem, md, {"meta": meta, "rows": rows, "memory": mem})
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
