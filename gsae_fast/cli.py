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
from .saes import GatedSAE

# The demo's defaults: ~1 minute on 2 CPU cores. The recovery goal is checked in
# tests/test_train.py on a shorter run (see the threshold there for how it was measured).
DEMO = dict(d_in=64, n_features=128, d_sae=256, batch_size=1024, steps=1500, lr=1e-2,
            l1_coefficient=1.5, warmup_steps=20, sparsity_warmup_steps=150)


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
    print(*args, flush=True)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def demo(args) -> dict:
    device = torch.device(args.device)
    syn = SyntheticConfig(d_in=args.d_in, n_features=args.n_features, seed=args.seed)
    data = SyntheticFeatures(syn, batch_size=args.batch_size, device=device)
    cfg = demo_train_config(args.steps, d_sae=args.d_sae, l1_coefficient=args.l1_coefficient,
                            batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup_steps,
                            sparsity_warmup_steps=args.sparsity_warmup_steps,
                            backend=args.backend, seed=args.seed,
                            extra={"data": "synthetic", "synthetic": vars(syn)})
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(cfg, syn.d_in, data, args.out, device=device, overwrite=True)
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


# ------------------------------------------------------------------- model, cache, train, eval


def _model_source(args, dtype=torch.float32):
    """The model, its layer's activations over the texts (ModelActivations), from the flags.
    The model is loaded once per command (kept on ``args``)."""
    from . import activations as A
    if not args.data:
        raise ValueError("--model needs --data (text files: .txt, .jsonl, or a directory of "
                         "them)")
    if not args.layer:
        raise ValueError("--model needs --layer (a module name of the model, or resid:N / "
                         "mlp:N / attn:N)")
    if getattr(args, "_loaded", None) is None:
        args._loaded = A.load_model(args.model, device=args.device)
    model, tokenizer = args._loaded
    paths = list(args.data)
    A.read_texts(paths)  # fail now on missing files, not mid-run
    source = A.ModelActivations(model, tokenizer, lambda: A.read_texts(paths), args.layer,
                                context_len=args.context_len, batch_contexts=args.batch_contexts,
                                dtype=dtype)
    return model, source


def cache(args) -> dict:
    from . import activations as A
    model, source = _model_source(args)
    meta = dict(model=str(args.model), layer=source.layer, context_len=args.context_len,
                data=[str(p) for p in args.data])
    bar = Progress(args.max_tokens or 0, "cache", enabled=not args.quiet and bool(args.max_tokens))
    out = A.write_cache(source, args.out, d_in=source.d_in, dtype=args.dtype,
                        shard_tokens=args.shard_tokens, metadata=meta, max_tokens=args.max_tokens,
                        overwrite=args.overwrite, progress=lambda n, total: bar(n, total))
    _say(f"wrote {out['n_tokens']} activations of width {out['d_in']} ({args.dtype}) from "
         f"{source.layer} to {args.out}")
    return out


def _train_data(args, rank: int = 0, world: int = 1):
    """(batches iterator with state, d_in, description) from --cache or --model; with
    ``world`` ranks, rank ``rank``'s share of every step's tokens."""
    if args.cache:
        from .activations import ActivationCache
        from .distributed import RankShard
        c = ActivationCache(args.cache)
        if c.n_tokens < args.batch_size:
            raise ValueError(f"the cache holds {c.n_tokens} activations, fewer than one batch "
                             f"(--batch-size {args.batch_size})")
        data = c.batches(args.batch_size, seed=args.seed, epochs=None, drop_last=True,
                         device=args.device)
        # Every rank reads the global batch and keeps its slice: the position is global, so
        # the run resumes on any number of ranks and equals a one-process run.
        return (data if world == 1 else RankShard(data, rank, world),
                c.d_in, {"cache": os.path.abspath(args.cache), "n_tokens": c.n_tokens})
    if args.model:
        from . import activations as A
        _, source = _model_source(args)
        d_in = source.d_in
        if world > 1:  # each rank runs the model over every world-th document, its own stream
            if args.batch_size % world:
                raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the "
                                 f"{world} ranks when training from a model")
            import itertools
            paths = list(args.data)
            source = A.ModelActivations(
                source.model, source.tokenizer,
                lambda: itertools.islice(A.read_texts(paths), rank, None, world), source.layer,
                context_len=args.context_len, batch_contexts=args.batch_contexts,
                dtype=source.dtype)
        batch = args.batch_size // world
        data = A.MixingBuffer(source, buffer_tokens=args.buffer_tokens, batch_size=batch,
                              seed=args.seed + rank, repeat=True)
        return FullBatches(data, batch), d_in, {
            "model": os.path.abspath(args.model), "layer": args.layer,
            "data": [os.path.abspath(p) for p in args.data]}
    raise ValueError("give --cache DIR (from gsae-fast cache) or --model DIR --data FILES "
                     "--layer NAME")


class FullBatches:
    """The batches of a stream that are full (a mixing buffer ends each pass with a short one,
    which would count as a whole step); resumable as the stream is."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(1000):
            x = next(self.data)
            if x.shape[0] == self.batch_size:
                return x
        raise ValueError(f"the data yields no full batch of {self.batch_size}: lower "
                         "--batch-size or raise --buffer-tokens")

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def train(args) -> dict:
    rank, world = 0, 1
    if args.parallel != "none":  # under torchrun
        from . import distributed
        rank, world, device = distributed.init(args.device)
        args.device = str(device)
    data, d_in, described = _train_data(args, rank, world)
    cfg_fields = {f.name for f in fields(TrainConfig)} - {"extra"}
    cfg = TrainConfig(**{k: getattr(args, k) for k in cfg_fields}, extra=described)
    cfg.betas = tuple(cfg.betas)
    trainer = Trainer(cfg, d_in, data, args.out, device=args.device, resume=args.resume,
                      overwrite=args.overwrite)
    bar = Progress(cfg.steps, "train", enabled=not args.quiet and rank == 0)
    trainer.train(progress=lambda step, total, r: bar(
        step, total, f"loss={r['loss']:.4g} mse={r['mse']:.4g} L0={r['l0']:.3g} "
                     f"dead={100 * r['dead_fraction']:.0f}%"))
    sae = trainer.sae
    if args.parallel != "none":
        import torch.distributed as dist
        dist.destroy_process_group()  # the evaluation runs on rank 0 alone
        if rank != 0:
            return {}
        if args.parallel == "feature":  # the whole SAE the trainer exported, once this
            del trainer, sae                # rank's slice is freed
            sae = GatedSAE.load(os.path.join(args.out, "sae"), device=args.device,
                                backend=cfg.backend)
    _say(f"trained {cfg.steps} steps; SAE in {args.out}/sae (SAELens format)")
    summary = evaluate_sae(sae, args)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def evaluate_sae(sae, args) -> dict:
    """Metrics over --eval-tokens activations (of the cache or the model: the training data
    unless they point elsewhere), and with a model the CE loss recovered: the layer's output
    replaced by the SAE's reconstruction vs by zeros, position 0 of each context (left out of
    training: its activations are outliers) kept as it was."""
    from . import activations as A
    sae.eval()
    model = source = None
    if args.model:
        model, source = _model_source(args)
    if args.cache:
        c = A.ActivationCache(args.cache)
        c.check_width(sae.d_in)
        batches = c.batches(4096, seed=args.seed + 1, epochs=1, device=args.device)
    elif source is not None:
        batches = source
    else:
        raise ValueError("give --cache DIR or --model DIR --data FILES --layer NAME")
    summary = {"metrics": metrics.evaluate(sae, batches, max_tokens=args.eval_tokens)}
    if source is not None:
        source.rewind()  # the CE contexts from the start of the texts
        tokens = source.token_contexts(args.ce_contexts)

        def keep_first(fn):
            return lambda out: torch.cat([out[:, :1], fn(out[:, 1:])], dim=1)

        with torch.no_grad():
            clean = A.ce_loss(model, tokens)
            with A.splice(model, args.layer, keep_first(
                    lambda h: sae(h.to(sae.W_dec.dtype)).to(h.dtype))):
                with_sae = A.ce_loss(model, tokens)
            with A.splice(model, args.layer, keep_first(torch.zeros_like)):
                zero = A.ce_loss(model, tokens)
        summary["ce_loss"] = {"clean": clean, "with_sae": with_sae, "zero_ablated": zero,
                              "recovered": metrics.ce_loss_recovered(clean, with_sae, zero),
                              "contexts": int(tokens.shape[0])}
    m = summary["metrics"]
    _say(f"L0 {m['l0']:.2f}  FVE {m['fve']:.4f}  nMSE {m['nmse']:.4f}  relative reconstruction "
         f"bias {m['relative_reconstruction_bias']:.4f}  dead {100 * m['dead_fraction']:.1f}%  "
         f"dense {100 * m['dense_fraction']:.1f}%  ({m['tokens']} tokens)")
    if "ce_loss" in summary:
        ce = summary["ce_loss"]
        _say(f"CE loss: clean {ce['clean']:.4f}, SAE spliced in {ce['with_sae']:.4f}, zero-"
             f"ablated {ce['zero_ablated']:.4f}: {100 * ce['recovered']:.1f}% recovered")
        if ce["zero_ablated"] <= ce["clean"]:
            _say("warning: zero-ablating this layer does not raise the loss on these texts, so "
                 "the recovered fraction means nothing here (more --ce-contexts, another layer?)")
    return summary


def eval_command(args) -> dict:
    from .interop import load
    sae = load(args.sae, device=args.device)
    summary = evaluate_sae(sae, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _provenance(args) -> str:
    """"on DEVICE (CPU), commit C, DATE": the header line of a results file."""
    import datetime
    import platform
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor() or platform.machine()
    return (f"on {args.device} ({cpu}), commit {commit or 'unknown'}, "
            f"{datetime.date.today().isoformat()}")


def study(args) -> dict:
    """The studies of gsae_fast/study.py on the embedded setup, written to --out:
    ``aux`` (the loss design: study_aux.md, .json, .png) and ``estimators`` (feature-effect
    estimators vs exact patching: study_estimators.md, .json, .png)."""
    from . import study as S
    out = {}
    if args.which in ("aux", "all"):
        bar = Progress(3 * args.steps, "study aux", enabled=not args.quiet)
        done = {m: 0 for m in S.AUX_MODES}

        def progress(aux, step, total):
            done[aux] = step
            bar(sum(done.values()), 3 * total, f"aux={aux}")

        rows = S.aux_study(steps=args.steps, seed=args.seed, device=args.device,
                           backend=args.backend, progress=progress)
        header = (f"# Gated SAE loss design: the auxiliary term\n\n`gsae-fast study --which aux "
                  f"--steps {args.steps} --seed {args.seed}` {_provenance(args)}. The demo's "
                  f"synthetic data (128 true features in 64 dimensions), SAE (256 features) "
                  f"and hyperparameters; metrics on 8 held-out batches; mean relu(pi_gate) and "
                  f"mean f over the open gates.")
        paths = S.write_aux_study(rows, args.out, header)
        for r in rows:
            _say(f"aux={r['aux']:7s} recovery {r['mean_max_cosine_similarity']:.3f}  L0 "
                 f"{r['l0']:.2f}  FVE {r['fve']:.3f}  bias "
                 f"{r['relative_reconstruction_bias']:.3f}  relu(pi_gate) "
                 f"{r['mean_relu_pi_gate']:.3g} (f {r['mean_f']:.3g})")
        _say("wrote " + ", ".join(paths))
        out["aux"] = rows
    if args.which in ("estimators", "all"):
        import importlib.util
        if importlib.util.find_spec("transformers") is None:
            raise SystemExit("the estimator study runs a random-weight transformers model: "
                             "pip install transformers (or make study)")
        # One pair costs about as much as 300 training steps (2 CPU cores): the bar's units.
        per_pair, ts = 300, args.train_steps
        bar = Progress(2 * ts + per_pair * args.pairs, "study estimators",
                       enabled=not args.quiet)
        first = {"train resid:0": 0, "train resid:1": ts, "estimators": 2 * ts}

        def progress(what, i, n):
            bar(first[what] + (i * per_pair if what == "estimators" else i), info=what)

        result = S.estimator_study(seed=args.seed, train_steps=ts, n_pairs=args.pairs,
                                   backend=args.backend, progress=progress)
        st = result["setup"]
        header = (f"# Feature-effect estimators across the Gated SAE's gate\n\n`gsae-fast "
                  f"study --which estimators --train-steps {args.train_steps} --pairs "
                  f"{args.pairs} --seed {args.seed}` {_provenance(args)}. A random-weight GPT-2 "
                  f"(3 blocks, d_model 64, vocab 256) on random tokens; Gated SAEs "
                  f"({st['d_sae']} features) trained by the trainer on resid:0 and resid:1 "
                  f"and both spliced; {st['n_pairs']} clean/patch pairs of {st['ctx']} "
                  f"tokens ({st['patched_positions']} positions resampled); metric: the "
                  f"logit difference of two tokens at the last position. Effects of resid:0's "
                  f"nodes, per (pair, position, feature), with resid:1's error node held "
                  f"(`other_errors=\"clean\"`: every effect passes resid:1's gates), against "
                  f"exact activation patching of each node alone. Relative error: "
                  f"sum|est - exact| / sum|exact|. Time: wall time of the `node_effects` "
                  f"calls (both layers) per 1000 changed nodes, on this CPU.")
        paths = S.write_estimator_study(result, args.out, header)
        by = {(r["estimator"], r["steps"], r["group"]): r for r in result["rows"]}
        for g in ("flip", "no flip"):
            _say(f"{g:8s}: correlation with exact: atp {by[('atp', 1, g)]['correlation']:.3f}"
                 f", ig N=64 {by[('ig', 64, g)]['correlation']:.3f}, jump_ig N=4 "
                 f"{by[('jump_ig', 4, g)]['correlation']:.3f}")
        _say("wrote " + ", ".join(paths))
        out["estimators"] = result
    return out


# -------------------------------------------------------------------------------------- parser


TRAIN_HELP = {
    "d_sae": "dictionary size (features)",
    "l1_coefficient": "sparsity coefficient lambda",
    "steps": "optimisation steps",
    "batch_size": "tokens per step",
    "lr": "Adam learning rate (peak)",
    "betas": "Adam betas (dictionary_learning: 0 0.999)",
    "warmup_steps": "linear lr warm-up from 0",
    "decay_start": "step where the linear lr decay to 0 starts (default: no decay)",
    "sparsity_warmup_steps": "linear warm-up of the sparsity coefficient from 0",
    "decoder": "unit_norm: unit decoder rows, unit sparsity weights (paper); norm_penalty: "
               "|W_dec|-weighted sparsity (SAELens)",
    "aux": "auxiliary reconstruction through a frozen decoder (paper), the live one (SAELens), "
           "or none",
    "backend": "executor: auto, reference, cpu, triton, cuda",
    "compute_dtype": "dtype of the kernels (fp32 master weights): auto = bfloat16 on CUDA",
    "dead_after_tokens": "a feature that has not fired for this many tokens counts as dead",
    "seed": "seed of the initialisation and the data order",
    "log_every": "steps between log.jsonl lines",
    "checkpoint_every": "steps between checkpoints (0: at the end only)",
    "parallel": "under torchrun: data (each rank a share of every batch, gradients "
                "all-reduced) or feature (each rank a slice of the dictionary); none: one "
                "process",
}
TRAIN_CHOICES = {"decoder": ["unit_norm", "norm_penalty"], "aux": ["frozen", "shared", "none"],
                 "backend": ["auto", "reference", "cpu", "triton", "cuda"],
                 "compute_dtype": ["auto", "float32", "bfloat16", "float16", "float64"],
                 "parallel": ["none", "data", "feature"]}


def _add_train_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = dict(help=TRAIN_HELP.get(f.name, "") + " (default: %(default)s)")
        if f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=list(f.default), **kw)
        elif f.name == "decay_start":
            p.add_argument(flag, type=int, default=None, **kw)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           choices=TRAIN_CHOICES.get(f.name), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsae-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

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
    d.add_argument("--device", default=device)
    d.add_argument("--out", default="gsae_demo")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=demo)

    def model_flags(p, required=False):
        p.add_argument("--model", required=required,
                       help="a local transformers model directory (nothing is downloaded)")
        p.add_argument("--data", nargs="+", help="text files (.txt: a document per line; "
                                                  ".jsonl: a 'text' field) or directories")
        p.add_argument("--layer", default=None,
                       help="module name (model.named_modules) or resid:N / mlp:N / attn:N")
        p.add_argument("--context-len", type=int, default=128)
        p.add_argument("--batch-contexts", type=int, default=8)

    c = sub.add_parser("cache", help="run a model over texts and write a layer's activations "
                                     "to disk")
    model_flags(c, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--shard-tokens", type=int, default=2 ** 20)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--device", default=device)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cache)

    t = sub.add_parser("train", help="train a Gated SAE from a cache or a model")
    t.add_argument("--cache", help="an activation cache (gsae-fast cache)")
    model_flags(t)
    t.add_argument("--buffer-tokens", type=int, default=2 ** 16,
                   help="mixing buffer size (from a model)")
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    t.add_argument("--eval-tokens", type=int, default=2 ** 16)
    t.add_argument("--ce-contexts", type=int, default=32)
    t.add_argument("--device", default=device)
    t.add_argument("--quiet", action="store_true")
    _add_train_config_flags(t)
    t.set_defaults(func=train)

    e = sub.add_parser("eval", help="metrics of a saved SAE (and the CE loss recovered on the "
                                    "model)")
    e.add_argument("sae", help="an SAE folder (SAELens format, e.g. OUT/sae) or ae.pt folder")
    e.add_argument("--cache")
    model_flags(e)
    e.add_argument("--eval-tokens", type=int, default=2 ** 16)
    e.add_argument("--ce-contexts", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the results here")
    e.add_argument("--device", default=device)
    e.set_defaults(func=eval_command)

    s = sub.add_parser("study", help="measured studies on the embedded setup: the Gated SAE's "
                                     "auxiliary term (frozen / shared / none) and the "
                                     "feature-effect estimators (AtP, IG, jump-aware IG) "
                                     "against exact patching")
    s.add_argument("--which", choices=("aux", "estimators", "all"), default="all")
    s.add_argument("--steps", type=int, default=DEMO["steps"],
                   help="training steps of the aux study")
    s.add_argument("--train-steps", type=int, default=600,
                   help="training steps of each SAE of the estimator study")
    s.add_argument("--pairs", type=int, default=16,
                   help="clean/patch pairs of the estimator study")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", default="auto")
    s.add_argument("--device", default=device)
    s.add_argument("--out", default=os.path.join("bench", "results"))
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=study)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError,
            FloatingPointError) as e:  # bad input or a failed run: the message, no traceback
        print(f"gsae-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
