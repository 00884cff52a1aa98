"""The ``gsae-fast`` command: ``demo``, ``train``, ``cache``, ``eval``.

    gsae-fast demo                       # synthetic features, no download: train, recover, time
    gsae-fast cache --model DIR --data a.txt b.jsonl --layer resid:6 --out acts/
    gsae-fast train --cache acts/ --out run/ --d-sae 16384 --l1-coefficient 1 --steps 20000
    gsae-fast train --model DIR --data a.txt --layer resid:6 --out run/ ...
    gsae-fast eval run/sae --cache acts/ [--model DIR --data a.txt --layer resid:6]

Every TrainConfig field is a ``train`` flag (``--d-sae``, ``--lr``, ...); ``--resume`` continues
a run from its ``checkpoint.pt``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import fields
from typing import Optional

import torch

from . import backends, metrics
from .progress import Progress
from .synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from .train import TrainConfig, Trainer

# The demo's defaults: ~1 minute on 2 CPU cores. The recovery goal is checked in
# tests/test_train.py on a shorter run (see the threshold there for how it was measured).
DEMO = dict(d_in=64, n_features=128, d_sae=256, batch_size=1024, steps=1500, lr=1e-2,
            l1_coefficient=1.5, warmup_steps=20, sparsity_warmup_steps=150)


def _say(*args) -> None:
    print(*args, flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------- demo


def step_time_ms(sae_proto, data: SyntheticFeatures, cfg: TrainConfig, backend: str,
                 steps: int = 10, warmup: int = 2) -> float:
    """Median wall time of a training step (loss, backward, Adam) of a copy of ``sae_proto``
    on ``backend`` (``"reference"``: the dense PyTorch math)."""
    sae = copy.deepcopy(sae_proto)
    sae.backend = backend
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    times = []
    for i in range(warmup + steps):
        x = data.batch(10_000_000 + i)
        t0 = time.perf_counter()
        out = sae.loss(x, cfg.l1_coefficient)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def sized_for_timing(d_in: int, d_sae: int, l0: float, device, seed: int = 0):
    """A Gated SAE with L0 ~ ``l0`` on its synthetic data (b_gate at the matching quantile of
    the pre-activations: a trained SAE's sparsity, without training one) and that data."""
    from .modules import GatedSAE
    data = SyntheticFeatures(SyntheticConfig(d_in=d_in, n_features=4 * d_in, target_l0=32,
                                             seed=seed), batch_size=DEMO["batch_size"],
                             device=device)
    torch.manual_seed(seed)
    sae = GatedSAE(d_in, d_sae, device=device, decoder_init_norm=1.0)
    with torch.no_grad():
        z = (data.batch(0) - sae.b_dec) @ sae.W_enc
        sae.b_gate.copy_(-torch.quantile(z[:256].float(), 1 - l0 / d_sae, dim=0))
    return sae, data


def plot(records: list[dict], recovery_curve: list, final_recovery, path: str) -> Optional[str]:
    """Loss curves and feature recovery as a PNG (needs matplotlib; None without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in records]
    for key in ("loss", "mse", "sparsity", "aux"):
        ax[0].plot(steps, [r[key] for r in records], label=key)
    ax[0].set_yscale("log"), ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("loss")
    ax[1].plot(*zip(*recovery_curve), label="mean max cosine similarity")
    ax[1].plot(steps, [r["l0"] / max(r["l0"] for r in records) for r in records],
               label="L0 (relative)", alpha=0.6)
    ax[1].set_xlabel("step"), ax[1].set_ylim(0, 1.02), ax[1].legend()
    ax[1].set_title("feature recovery")
    ax[2].hist(final_recovery.cpu().numpy(), bins=40, range=(0, 1))
    ax[2].set_xlabel("max cosine similarity with a decoder row"), ax[2].set_ylabel("true features")
    ax[2].set_title("recovery of each true feature")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def demo(args) -> dict:
    device = torch.device(args.device)
    syn = SyntheticConfig(d_in=args.d_in, n_features=args.n_features, seed=args.seed)
    data = SyntheticFeatures(syn, batch_size=args.batch_size, device=device)
    cfg = TrainConfig(d_sae=args.d_sae, l1_coefficient=args.l1_coefficient, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, betas=(0.9, 0.999),
                      warmup_steps=args.warmup_steps,
                      sparsity_warmup_steps=args.sparsity_warmup_steps, backend=args.backend,
                      seed=args.seed, log_every=10, compute_dtype="float32",
                      extra={"data": "synthetic", "synthetic": vars(syn)})
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(cfg, syn.d_in, data, args.out, device=device)
    backend = backends.resolve(args.backend, device)
    truth = data.directions
    _say(f"gsae-fast demo: {syn.n_features} true features in {syn.d_in} dimensions "
         f"(superposition), ~{syn.target_l0:g} active per token; a Gated SAE of {cfg.d_sae} "
         f"features, {cfg.steps} steps of {cfg.batch_size} tokens on {device} "
         f"(executor: {backend})")
    bar = Progress(cfg.steps, "train", enabled=not args.quiet)
    curve = [(0, float(feature_recovery(trainer.sae.W_dec, truth).mean()))]
    every = max(1, cfg.steps // 30)

    def progress(step, total, rec):
        if step % every == 0 or step == total:
            curve.append((step, float(feature_recovery(trainer.sae.W_dec, truth).mean())))
        bar(step, total, f"loss={rec['loss']:.3g} L0={rec['l0']:.3g} mmcs={curve[-1][1]:.3f}")

    t0 = time.perf_counter()
    records = trainer.train(progress=progress)
    train_s = time.perf_counter() - t0
    recovery = feature_recovery(trainer.sae.W_dec, truth)
    held_out = (data.batch(20_000_000 + i) for i in range(8))  # batches training never saw
    m = metrics.evaluate(trainer.sae, held_out)
    _say("measuring the step time of each executor on the same batches ...")
    executors = list(dict.fromkeys([backend, "reference"]))
    times = {b: step_time_ms(trainer.sae, data, cfg, b) for b in executors}
    big_sae, big_data = sized_for_timing(args.time_d_in, args.time_d_sae, args.time_l0, device)
    big_times = {b: step_time_ms(big_sae, big_data, cfg, b, steps=5, warmup=1)
                 for b in executors}
    summary = {
        "mean_max_cosine_similarity": float(recovery.mean()),
        "fraction_recovered_0.9": float((recovery > 0.9).float().mean()),
        "true_l0": float((data.coefficients(20_000_000) > 0).sum(-1).float().mean()),
        "metrics": m, "train_seconds": train_s, "step_ms": times,
        "speedup_vs_reference": times["reference"] / times[backend],
        "step_ms_large": {"d_in": args.time_d_in, "d_sae": args.time_d_sae, "l0": args.time_l0,
                          "batch_size": cfg.batch_size, "ms": big_times,
                          "speedup_vs_reference": big_times["reference"] / big_times[backend]},
        "executor": backend, "config": {k: v for k, v in vars(args).items() if k != "func"},
    }
    summary["plot"] = plot(records, curve, recovery, os.path.join(args.out, "demo.png"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _say("")
    _say(f"feature recovery: mean max cosine similarity {summary['mean_max_cosine_similarity']:.3f}"
         f"; {100 * summary['fraction_recovered_0.9']:.0f}% of true features have a decoder row "
         f"with cosine > 0.9")
    _say(f"held-out metrics ({m['tokens']} tokens): L0 {m['l0']:.2f} (true "
         f"{summary['true_l0']:.2f}), FVE {m['fve']:.3f}, nMSE {m['nmse']:.3f}, relative "
         f"reconstruction bias {m['relative_reconstruction_bias']:.3f}, dead "
         f"{100 * m['dead_fraction']:.1f}%, dense {100 * m['dense_fraction']:.1f}%")
    _say(f"training step (loss + backward + Adam) of {cfg.batch_size} tokens, median ms:")
    _say(f"  {'executor':10s} {'this SAE':>10s} {'d_in=%d, d_sae=%d, L0~%g' % (args.time_d_in, args.time_d_sae, args.time_l0):>32s}")
    for b in executors:
        _say(f"  {b:10s} {times[b]:10.2f} {big_times[b]:22.1f} "
             f"({big_times['reference'] / big_times[b]:.2f}x the reference)")
    _say(f"wrote {args.out}/summary.json, log.jsonl, sae/ (SAELens format)"
         + (f", {summary['plot']}" if summary["plot"] else
            " (no plot: pip install matplotlib for demo.png)"))
    return summary


# -------------------------------------------------------------------------------------- parser


def _add_train_config_flags(p: argparse.ArgumentParser, skip=()) -> None:
    for f in fields(TrainConfig):
        if f.name in skip or f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=list(default))
        elif f.name == "decay_start":
            p.add_argument(flag, type=int, default=None)
        else:
            p.add_argument(flag, type=type(default), default=default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsae-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on synthetic features with known ground truth "
                                    "(no download) and report recovery, metrics and speed")
    for k, v in DEMO.items():
        d.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    d.add_argument("--time-d-in", type=int, default=256,
                   help="the larger SAE whose step is also timed (input width)")
    d.add_argument("--time-d-sae", type=int, default=16384)
    d.add_argument("--time-l0", type=float, default=32.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--out", default="gsae_demo")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
