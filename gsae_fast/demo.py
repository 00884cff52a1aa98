"""The demo (``gsae-fast demo``): a Gated SAE trained on synthetic features with a known ground
truth, no download, then its feature recovery, held-out metrics and step time per executor.

    from gsae_fast.demo import run_demo
    summary = run_demo(steps=600, out="gsae_demo")     # the dict written to summary.json

Holds the demo's recipe (:data:`DEMO`, :func:`demo_train_config`, shared with
:mod:`gsae_fast.study`), its body (:func:`run_demo`), its plot (:func:`plot`), the step timing
it reports (:func:`step_time_ms`, :func:`sized_for_timing`) and the optional matplotlib import
(:func:`pyplot`).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Optional

import torch

from . import backends, files, metrics
from .progress import Progress
from .saes import GatedSAE
from .synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from .train import TrainConfig, Trainer

# The demo's defaults: ~1 minute on 2 CPU cores. The recovery goal is checked in
# tests/test_train.py on a shorter run (see the threshold there for how it was measured).
DEMO = dict(d_in=64, n_features=128, d_sae=256, batch_size=1024, steps=1500, lr=1e-2,
            l1_coefficient=1.5, warmup_steps=20, sparsity_warmup_steps=150)

# The larger SAE whose training step the demo also times (a realistic width and sparsity).
TIMING = dict(time_d_in=256, time_d_sae=16384, time_l0=32.0)


def demo_train_config(steps: int, **overrides) -> TrainConfig:
    """The demo's recipe (the study's too): DEMO's sizes and rates, Adam betas (0.9, 0.999),
    fp32 compute, the learning rate decayed over the last 20% of the steps."""
    keys = ("d_sae", "l1_coefficient", "batch_size", "lr", "warmup_steps",
            "sparsity_warmup_steps")
    cfg = dict({k: DEMO[k] for k in keys}, steps=steps, betas=(0.9, 0.999),
               decay_start=int(0.8 * steps), compute_dtype="float32")
    cfg.update(overrides)
    return TrainConfig(**cfg)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _say(*args) -> None:
    print(*args, flush=True)  # flushed: the lines interleave with the progress bar on stderr


# ------------------------------------------------------------------------------------- timing


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
    data = SyntheticFeatures(SyntheticConfig(d_in=d_in, n_features=4 * d_in, target_l0=32,
                                             seed=seed), batch_size=DEMO["batch_size"],
                             device=device)
    torch.manual_seed(seed)
    sae = GatedSAE(d_in, d_sae, device=device, decoder_init_norm=1.0)
    with torch.no_grad():
        z = (data.batch(0) - sae.b_dec) @ sae.W_enc
        sae.b_gate.copy_(-torch.quantile(z[:256].float(), 1 - l0 / d_sae, dim=0))
    return sae, data


# --------------------------------------------------------------------------------------- plot


def plot(records: list[dict], recovery_curve: list, final_recovery, path: str) -> Optional[str]:
    """Loss curves and feature recovery as a PNG (needs matplotlib; None without it)."""
    plt = pyplot()
    if plt is None:
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
    with files.atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- demo


def run_demo(*, d_in: int = DEMO["d_in"], n_features: int = DEMO["n_features"],
             d_sae: int = DEMO["d_sae"], batch_size: int = DEMO["batch_size"],
             steps: int = DEMO["steps"], lr: float = DEMO["lr"],
             l1_coefficient: float = DEMO["l1_coefficient"],
             warmup_steps: int = DEMO["warmup_steps"],
             sparsity_warmup_steps: int = DEMO["sparsity_warmup_steps"],
             time_d_in: int = TIMING["time_d_in"], time_d_sae: int = TIMING["time_d_sae"],
             time_l0: float = TIMING["time_l0"], seed: int = 0, backend: str = "auto",
             device="cpu", out: str = "gsae_demo", quiet: bool = False) -> dict:
    """Train a ``d_sae``-feature Gated SAE on ``n_features`` synthetic features in ``d_in``
    dimensions (the demo's recipe), then measure it; prints the results and returns them.

    Writes ``out/{summary.json, log.jsonl, checkpoint.pt, sae/}`` and, with matplotlib,
    ``demo.png``. The returned dict (= summary.json): ``mean_max_cosine_similarity`` and
    ``fraction_recovered_0.9`` (each true feature against its closest decoder row),
    ``true_l0``, ``metrics`` (:func:`gsae_fast.metrics.evaluate` on 8 held-out batches),
    ``train_seconds``, ``step_ms`` per executor and ``speedup_vs_reference`` on this SAE,
    ``step_ms_large`` on a ``time_d_in x time_d_sae`` SAE at L0 ~ ``time_l0``, ``executor``,
    ``config`` (these arguments) and ``plot`` (the PNG's path or None). ``quiet``: no
    progress bar.
    """
    config = dict(d_in=d_in, n_features=n_features, d_sae=d_sae, batch_size=batch_size,
                  steps=steps, lr=lr, l1_coefficient=l1_coefficient, warmup_steps=warmup_steps,
                  sparsity_warmup_steps=sparsity_warmup_steps, time_d_in=time_d_in,
                  time_d_sae=time_d_sae, time_l0=time_l0, seed=seed, backend=backend,
                  device=str(device), out=out, quiet=quiet)
    device = torch.device(device)
    syn = SyntheticConfig(d_in=d_in, n_features=n_features, seed=seed)
    data = SyntheticFeatures(syn, batch_size=batch_size, device=device)
    cfg = demo_train_config(steps, d_sae=d_sae, l1_coefficient=l1_coefficient,
                            batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                            sparsity_warmup_steps=sparsity_warmup_steps, backend=backend,
                            seed=seed, extra={"data": "synthetic", "synthetic": vars(syn)})
    os.makedirs(out, exist_ok=True)
    with Trainer(cfg, syn.d_in, data, out, device=device, overwrite=True) as trainer:
        return _train_and_measure(trainer, data, cfg, config, quiet)


def _train_and_measure(trainer: Trainer, data: SyntheticFeatures, cfg: TrainConfig,
                       config: dict, quiet: bool) -> dict:
    """The demo's body once its trainer holds the output folder: train, measure, write
    summary.json (and demo.png), print."""
    syn, device, out, backend = data.cfg, trainer.device, config["out"], config["backend"]
    time_d_in, time_d_sae, time_l0 = (config[k] for k in ("time_d_in", "time_d_sae", "time_l0"))
    executor = backends.resolve(backend, device)
    truth = data.directions
    _say(f"gsae-fast demo: {syn.n_features} true features in {syn.d_in} dimensions "
         f"(superposition), ~{syn.target_l0:g} active per token; a Gated SAE of {cfg.d_sae} "
         f"features, {cfg.steps} steps of {cfg.batch_size} tokens on {device} "
         f"(executor: {executor})")
    bar = Progress(cfg.steps, "train", enabled=not quiet)
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
    executors = list(dict.fromkeys([executor, "reference"]))
    times = {b: step_time_ms(trainer.sae, data, cfg, b) for b in executors}
    big_sae, big_data = sized_for_timing(time_d_in, time_d_sae, time_l0, device)
    big_times = {b: step_time_ms(big_sae, big_data, cfg, b, steps=5, warmup=1)
                 for b in executors}
    summary = {
        "mean_max_cosine_similarity": float(recovery.mean()),
        "fraction_recovered_0.9": float((recovery > 0.9).float().mean()),
        "true_l0": float((data.coefficients(20_000_000) > 0).sum(-1).float().mean()),
        "metrics": m, "train_seconds": train_s, "step_ms": times,
        "speedup_vs_reference": times["reference"] / times[executor],
        "step_ms_large": {"d_in": time_d_in, "d_sae": time_d_sae, "l0": time_l0,
                          "batch_size": cfg.batch_size, "ms": big_times,
                          "speedup_vs_reference": big_times["reference"] / big_times[executor]},
        "executor": executor, "config": config,
    }
    summary["plot"] = plot(records, curve, recovery, os.path.join(out, "demo.png"))
    files.write_json(summary, os.path.join(out, "summary.json"))
    _report(summary, executors)
    return summary


def _report(summary: dict, executors: list) -> None:
    """The demo's printed results, from its summary."""
    m, large, out = summary["metrics"], summary["step_ms_large"], summary["config"]["out"]
    times, big_times = summary["step_ms"], large["ms"]
    _say("")
    _say(f"feature recovery: mean max cosine similarity {summary['mean_max_cosine_similarity']:.3f}"
         f"; {100 * summary['fraction_recovered_0.9']:.0f}% of true features have a decoder row "
         f"with cosine > 0.9")
    _say(f"held-out metrics ({m['tokens']} tokens): L0 {m['l0']:.2f} (true "
         f"{summary['true_l0']:.2f}), FVE {m['fve']:.3f}, nMSE {m['nmse']:.3f}, relative "
         f"reconstruction bias {m['relative_reconstruction_bias']:.3f}, dead "
         f"{100 * m['dead_fraction']:.1f}%, dense {100 * m['dense_fraction']:.1f}%")
    _say(f"training step (loss + backward + Adam) of {large['batch_size']} tokens, median ms:")
    big = "d_in=%d, d_sae=%d, L0~%g" % (large["d_in"], large["d_sae"], large["l0"])
    _say(f"  {'executor':10s} {'this SAE':>10s} {big:>32s}")
    for b in executors:
        _say(f"  {b:10s} {times[b]:10.2f} {big_times[b]:22.1f} "
             f"({big_times['reference'] / big_times[b]:.2f}x the reference)")
    _say(f"wrote {out}/summary.json, log.jsonl, sae/ (SAELens format)"
         + (f", {summary['plot']}" if summary["plot"] else
            " (no plot: pip install matplotlib for demo.png)"))
