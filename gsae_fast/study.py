"""Measured studies on the embedded setup (no download): ``gsae-fast study``.

Loss design (issue 10, part b): what the Gated SAE's auxiliary reconstruction term does. The
reconstruction loss reaches ``pi_gate`` through nothing (the Heaviside gate has no gradient), so
``b_gate`` is pushed only by the sparsity penalty (down) and by the auxiliary term
``|x - (relu(pi_gate) @ W_dec + b_dec)|^2`` (``W_enc``, shared with the magnitude path, also gets
the reconstruction gradient); the term is what makes ``relu(pi_gate)`` a reconstruction in its
own right. The study trains the same
Gated SAE on the synthetic ground-truth data with ``aux`` = frozen (the paper), shared (SAELens)
and none, and reports feature recovery, L0, FVE, relative reconstruction bias and the scale of
``relu(pi_gate)`` against that of the activations ``f``.

Feature-effect estimators (issue 10, part a): see the section comment below.

:func:`run_aux_study` and :func:`run_estimator_study` are the ``gsae-fast study`` command's
bodies: the study, its results files under a header saying how they were made, a printed
summary.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import files, metrics, reference
from .demo import DEMO, demo_train_config, pyplot
from .progress import Progress
from .synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from .train import Trainer

AUX_MODES = reference.AUX_CHOICES


@torch.no_grad()
def _gate_scale(sae, batches) -> dict:
    """Mean relu(pi_gate) and mean f over the open gates of ``batches``."""
    pi_sum = f_sum = n = 0.0
    for x in batches:
        acts = sae.encode_sparse(x)
        m = acts.mask()
        pi_sum += float(acts.pi_gate[m].sum())
        f_sum += float(acts.f[m].sum())
        n += float(m.sum())
    return {"mean_relu_pi_gate": pi_sum / max(n, 1), "mean_f": f_sum / max(n, 1)}


def aux_study(*, steps: int = 1500, seed: int = 0, device="cpu", backend: str = "auto",
              progress: Optional[Callable[[str, int, int], None]] = None) -> list[dict]:
    """One row per ``aux`` mode: the same data, initialisation and hyperparameters (the demo's)."""
    if steps < 30:
        raise ValueError(f"the study needs at least 30 steps (warm-ups and decay), got {steps}")
    rows = []
    for aux in AUX_MODES:
        syn = SyntheticConfig(d_in=DEMO["d_in"], n_features=DEMO["n_features"], seed=seed)
        data = SyntheticFeatures(syn, batch_size=DEMO["batch_size"], device=device)
        cfg = demo_train_config(steps, warmup_steps=min(DEMO["warmup_steps"], steps - 1),
                                sparsity_warmup_steps=steps // 10, aux=aux, backend=backend,
                                seed=seed)
        trainer = Trainer(cfg, syn.d_in, data, device=device)
        trainer.train(progress=None if progress is None else
                      (lambda s, t, r, aux=aux: progress(aux, s, t)))
        held_out = [data.batch(30_000_000 + i) for i in range(8)]
        m = metrics.evaluate(trainer.sae, held_out)
        rec = feature_recovery(trainer.sae.W_dec, data.directions)
        rows.append(dict(aux=aux, mean_max_cosine_similarity=float(rec.mean()),
                         fraction_recovered_0_9=float((rec > 0.9).float().mean()),
                         l0=m["l0"], fve=m["fve"],
                         relative_reconstruction_bias=m["relative_reconstruction_bias"],
                         dead_fraction=m["dead_fraction"], **_gate_scale(trainer.sae, held_out),
                         steps=steps, seed=seed))
    return rows


def _write_results(out_dir: str, name: str, lines: list, data) -> list[str]:
    """``name.md`` (the lines) and ``name.json`` (the data) in ``out_dir``; their paths."""
    paths = [os.path.join(out_dir, name + ".md"), os.path.join(out_dir, name + ".json")]
    files.write_text("\n".join(lines) + "\n", paths[0])
    files.write_json(data, paths[1])
    return paths


def write_aux_study(rows: list[dict], out_dir: str, header: str) -> list[str]:
    """``study_aux.md`` (table), ``study_aux.json`` and, with matplotlib, ``study_aux.png``."""
    os.makedirs(out_dir, exist_ok=True)
    cols = [("aux", "aux"), ("mean_max_cosine_similarity", "recovery (MMCS)"),
            ("fraction_recovered_0_9", "recovered > 0.9"), ("l0", "L0"), ("fve", "FVE"),
            ("relative_reconstruction_bias", "rel. recon. bias"),
            ("dead_fraction", "dead"), ("mean_relu_pi_gate", "mean relu(pi_gate)"),
            ("mean_f", "mean f")]
    lines = [header, "", "| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[k] if isinstance(r[k], str) else f"{r[k]:.4g}"
                                       for k, _ in cols) + " |")
    paths = _write_results(out_dir, "study_aux", lines, rows)
    plt = pyplot()
    if plt is None:
        return paths
    keys = ["mean_max_cosine_similarity", "fve", "relative_reconstruction_bias",
            "mean_relu_pi_gate"]
    fig, ax = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for a, k in zip(ax, keys):
        a.bar([r["aux"] for r in rows], [r[k] for r in rows], color=["C0", "C1", "C2"])
        a.set_title(k.replace("_", " "))
    fig.suptitle("Gated SAE auxiliary term: frozen (paper) / shared (SAELens) / none")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "study_aux.png"))
    with files.atomic_write(paths[-1]) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------- feature-effect estimators
#
# Issue 10, part (a): which estimator of a Gated SAE feature's indirect effect to trust when
# gates downstream can flip. A tiny random-weight GPT-2 (3 blocks, d_model 64) on random
# tokens, Gated SAEs trained by the trainer on its resid:0 and resid:1 outputs, both spliced;
# the effects of resid:0's features on a logit difference, with resid:1's error node held
# (other_errors="clean"), so that every effect reaches the metric through resid:1's gates. Each
# estimator is compared with exact activation patching, separately for the features whose patch
# flips a resid:1 gate (the effect has a jump in it) and the others.

IG_STEPS = (1, 2, 4, 8, 16, 32, 64)
JUMP_IG_STEPS = (1, 2, 4, 8, 16)
STUDY_LAYERS = ("resid:0", "resid:1")


def study_model(seed: int = 0):
    """The tiny random-weight model of the estimator study (no download)."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=256,
                                  n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def train_layer_sae(model, layer: str, tokens: torch.Tensor, *, steps: int, seed: int = 0,
                    progress: Optional[Callable[[int, int], None]] = None):
    """A Gated SAE trained (the demo's recipe) on ``layer``'s outputs for ``tokens``. The
    activations are scaled to unit variance per dimension for training (the recipe's rates
    assume that scale) and the scale is folded back into the SAE, which then reads the layer's
    raw outputs: ``W_enc * s``, ``W_dec / s``, ``b_dec / s``."""
    from . import activations as A
    x = A.layer_output(model, tokens, layer).reshape(-1, model.config.n_embd).float()
    s = float((x.pow(2).sum(-1).mean() / x.shape[1]).rsqrt())
    pool = x * s
    g = torch.Generator().manual_seed(seed)
    cfg = demo_train_config(steps, warmup_steps=min(20, steps - 1),
                            sparsity_warmup_steps=steps // 10, seed=seed)

    def batches():
        while True:
            yield pool[torch.randint(0, pool.shape[0], (cfg.batch_size,), generator=g)]

    trainer = Trainer(cfg, x.shape[1], batches())
    trainer.train(progress=None if progress is None else (lambda st, tot, r: progress(st, tot)))
    sae = trainer.sae
    with torch.no_grad():
        sae.W_enc.mul_(s)
        sae.W_dec.div_(s)
        sae.b_dec.div_(s)
    return sae


def _compare(est: torch.Tensor, exact: torch.Tensor) -> dict:
    """Pearson correlation and relative error sum|est - exact| / sum|exact|."""
    est, exact = est.double(), exact.double()
    n = int(exact.numel())
    if n < 2:
        return {"n": n, "correlation": float("nan"), "relative_error": float("nan")}
    corr = float(torch.corrcoef(torch.stack([est, exact]))[0, 1])
    rel = float((est - exact).abs().sum() / exact.abs().sum().clamp(min=1e-30))
    return {"n": n, "correlation": corr, "relative_error": rel}


def estimator_study(*, seed: int = 0, train_steps: int = 600, n_pairs: int = 16,
                    ctx: int = 16, patched_positions: int = 3, backend: str = "auto",
                    progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Rows ``{estimator, steps, group, n, correlation, relative_error, ms_per_1000}`` (groups:
    "flip", "no flip", "all") and the setup's description."""
    import time

    from . import interp

    say = progress or (lambda what, i, n: None)
    model = study_model(seed)
    g = torch.Generator().manual_seed(seed)
    train_tokens = torch.randint(0, 256, (512, 32), generator=g)
    saes = {}
    for i, layer in enumerate(STUDY_LAYERS):
        saes[layer] = train_layer_sae(model, layer, train_tokens, steps=train_steps,
                                      seed=seed + i,
                                      progress=lambda s, t, L=layer: say(f"train {L}", s, t))
        saes[layer].backend = backend
    clean = torch.randint(0, 256, (n_pairs, ctx), generator=g)
    patch = clean.clone()
    for r in range(n_pairs):  # a few positions before the last one, resampled
        pos = torch.randperm(ctx - 1, generator=g)[:patched_positions]
        patch[r, pos] = torch.randint(0, 256, (patched_positions,), generator=g)
    with torch.no_grad():
        top = model(input_ids=clean).logits[:, -1].mean(0).topk(2).indices.tolist()
    a_tok, b_tok = top

    def metric(logits):
        return (logits[:, -1, a_tok] - logits[:, -1, b_tok]).sum()

    layer = STUDY_LAYERS[0]
    runs = [("exact", 1), ("atp", 1)] + [("ig", n) for n in IG_STEPS] + \
        [("jump_ig", n) for n in JUMP_IG_STEPS]
    # One pair at a time, per position: a node is (pair, position, feature), the finest unit,
    # so that "its patch flips a downstream gate" separates nodes rather than tagging them all.
    est = {run: [] for run in runs}
    times = {run: 0.0 for run in runs}
    flips, n_nodes, crossings = [], 0, 0
    for r in range(n_pairs):
        say("estimators", r, n_pairs)
        for method, steps in runs:
            t0 = time.perf_counter()
            res = interp.node_effects(model, saes, clean[r:r + 1], patch[r:r + 1], metric,
                                      method=method, steps=steps, per_position=True,
                                      other_errors="clean", batch_size=256)
            times[(method, steps)] += time.perf_counter() - t0
            est[(method, steps)].append(res[layer].features.flatten())
            if method == "exact":
                flips.append(res[layer].flips.flatten())
                n_nodes += sum(int((e.features != 0).sum()) for e in res.values())
            if (method, steps) == ("jump_ig", JUMP_IG_STEPS[-1]):
                crossings += len(res[layer].jumps)
    say("estimators", n_pairs, n_pairs)
    est = {run: torch.cat(v) for run, v in est.items()}
    exact = est[("exact", 1)]
    changed = exact != 0
    flips = torch.cat(flips) & changed
    rows = []
    for (method, steps), values in est.items():
        if method == "exact":
            continue
        for group, mask in (("flip", flips), ("no flip", changed & ~flips), ("all", changed)):
            rows.append(dict(estimator=method, steps=steps, group=group,
                             **_compare(values[mask], exact[mask]),
                             ms_per_1000=1e6 * times[(method, steps)] / n_nodes))
    with interp.splice(model, saes) as sp, torch.no_grad():
        model(input_ids=clean)
        l0 = {k: float(sp[k].acts.l0().float().mean()) for k in STUDY_LAYERS}
    setup = dict(seed=seed, train_steps=train_steps, n_pairs=n_pairs, ctx=ctx,
                 patched_positions=patched_positions, d_sae=saes[layer].d_sae,
                 changed_nodes=int(changed.sum()), flip_nodes=int(flips.sum()),
                 crossings_on_layer_paths=crossings,
                 exact_ms_per_1000=1e6 * times[("exact", 1)] / n_nodes,
                 nodes_estimated=n_nodes, metric_tokens=[a_tok, b_tok], l0=l0)
    return {"rows": rows, "setup": setup}


def write_estimator_study(result: dict, out_dir: str, header: str) -> list[str]:
    """``study_estimators.md`` (table), ``.json`` and, with matplotlib, ``.png``."""
    os.makedirs(out_dir, exist_ok=True)
    rows, setup = result["rows"], result["setup"]
    by = {(r["estimator"], r["steps"], r["group"]): r for r in rows}
    runs = sorted({(r["estimator"], r["steps"]) for r in rows},
                  key=lambda k: (["atp", "ig", "jump_ig"].index(k[0]), k[1]))
    groups = ("flip", "no flip", "all")
    lines = [header, "",
             f"Nodes compared: {setup['changed_nodes']} (pair, position, feature) of resid:0 "
             f"that change between clean and patch, {setup['flip_nodes']} of them flip a "
             f"resid:1 gate when patched alone; {setup['crossings_on_layer_paths']} gate "
             f"crossings on the layers' IG paths; exact patching "
             f"{setup['exact_ms_per_1000']:.0f} ms per 1000 nodes; L0 "
             + ", ".join(f"{k} {v:.1f}" for k, v in setup["l0"].items()) + ".", "",
             "| estimator | N | " + " | ".join(f"corr ({g})" for g in groups) + " | "
             + " | ".join(f"rel. err. ({g})" for g in groups) + " | ms / 1000 nodes |",
             "|" + "---|" * (3 + 2 * len(groups))]
    for est, n in runs:
        rs = [by[(est, n, g)] for g in groups]
        lines.append(f"| {est} | {n if est != 'atp' else '-'} | "
                     + " | ".join(f"{r['correlation']:.3f}" for r in rs) + " | "
                     + " | ".join(f"{r['relative_error']:.3f}" for r in rs)
                     + f" | {rs[0]['ms_per_1000']:.0f} |")
    paths = _write_results(out_dir, "study_estimators", lines, result)
    plt = pyplot()
    if plt is None:
        return paths
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, a, title in (("correlation", ax[0], "correlation with exact patching"),
                          ("relative_error", ax[1], "relative error vs exact patching")):
        for gi, (g, style) in enumerate((("flip", "-"), ("no flip", "--"))):
            for est, color in (("ig", "C0"), ("jump_ig", "C1")):
                ns = [n for e, n in runs if e == est]
                a.plot(ns, [by[(est, n, g)][key] for n in ns], style, color=color, marker="o",
                       label=f"{est} ({g})")
            a.axhline(by[("atp", 1, g)][key], color="C2", linestyle=style,
                      label=f"atp ({g})")
        a.set_xscale("log", base=2)
        a.set_xlabel("steps N")
        a.set_title(title)
    ax[0].legend(fontsize=7)
    for est, color in (("ig", "C0"), ("jump_ig", "C1")):
        ns = [n for e, n in runs if e == est]
        ax[2].plot(ns, [by[(est, n, "all")]["ms_per_1000"] for n in ns], color=color,
                   marker="o", label=est)
    ax[2].axhline(by[("atp", 1, "all")]["ms_per_1000"], color="C2", label="atp")
    ax[2].axhline(setup["exact_ms_per_1000"], color="C3", label="exact")
    ax[2].set_xscale("log", base=2)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("steps N")
    ax[2].set_title("wall time, ms per 1000 nodes")
    ax[2].legend(fontsize=7)
    fig.suptitle("Feature-effect estimators across the Gated SAE's gate (resid:0 -> resid:1 "
                 "gates -> metric)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "study_estimators.png"))
    with files.atomic_write(paths[-1]) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------- the command's bodies


def _say(*args) -> None:
    print(*args, flush=True)  # flushed: the lines interleave with the progress bar on stderr


def _provenance(device) -> str:
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
    return (f"on {device} ({cpu}), commit {commit or 'unknown'}, "
            f"{datetime.date.today().isoformat()}")


def run_aux_study(*, steps: int = 1500, seed: int = 0, device="cpu", backend: str = "auto",
                  out: str = os.path.join("bench", "results"), quiet: bool = False) -> list[dict]:
    """:func:`aux_study`, written to ``out`` (study_aux.md, .json, .png) and summarised on
    stdout; returns its rows. ``quiet``: no progress bar."""
    bar = Progress(3 * steps, "study aux", enabled=not quiet)
    done = {m: 0 for m in AUX_MODES}

    def progress(aux, step, total):
        done[aux] = step
        bar(sum(done.values()), 3 * total, f"aux={aux}")

    rows = aux_study(steps=steps, seed=seed, device=device, backend=backend, progress=progress)
    header = (f"# Gated SAE loss design: the auxiliary term\n\n`gsae-fast study --which aux "
              f"--steps {steps} --seed {seed}` {_provenance(device)}. The demo's "
              f"synthetic data (128 true features in 64 dimensions), SAE (256 features) "
              f"and hyperparameters; metrics on 8 held-out batches; mean relu(pi_gate) and "
              f"mean f over the open gates.")
    paths = write_aux_study(rows, out, header)
    for r in rows:
        _say(f"aux={r['aux']:7s} recovery {r['mean_max_cosine_similarity']:.3f}  L0 "
             f"{r['l0']:.2f}  FVE {r['fve']:.3f}  bias "
             f"{r['relative_reconstruction_bias']:.3f}  relu(pi_gate) "
             f"{r['mean_relu_pi_gate']:.3g} (f {r['mean_f']:.3g})")
    _say("wrote " + ", ".join(paths))
    return rows


def run_estimator_study(*, train_steps: int = 600, pairs: int = 16, seed: int = 0,
                        device="cpu", backend: str = "auto",
                        out: str = os.path.join("bench", "results"), quiet: bool = False) -> dict:
    """:func:`estimator_study` (on the CPU; ``device`` is only recorded in the header),
    written to ``out`` (study_estimators.md, .json, .png) and summarised on stdout; returns
    its result. Needs transformers. ``quiet``: no progress bar."""
    import importlib.util
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("the estimator study runs a random-weight transformers model: "
                         "pip install transformers (or make study)")
    # One pair costs about as much as 300 training steps (2 CPU cores): the bar's units.
    per_pair, ts = 300, train_steps
    bar = Progress(2 * ts + per_pair * pairs, "study estimators", enabled=not quiet)
    first = {"train resid:0": 0, "train resid:1": ts, "estimators": 2 * ts}

    def progress(what, i, n):
        bar(first[what] + (i * per_pair if what == "estimators" else i), info=what)

    result = estimator_study(seed=seed, train_steps=ts, n_pairs=pairs, backend=backend,
                             progress=progress)
    st = result["setup"]
    header = (f"# Feature-effect estimators across the Gated SAE's gate\n\n`gsae-fast "
              f"study --which estimators --train-steps {train_steps} --pairs "
              f"{pairs} --seed {seed}` {_provenance(device)}. A random-weight GPT-2 "
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
    paths = write_estimator_study(result, out, header)
    by = {(r["estimator"], r["steps"], r["group"]): r for r in result["rows"]}
    for g in ("flip", "no flip"):
        _say(f"{g:8s}: correlation with exact: atp {by[('atp', 1, g)]['correlation']:.3f}"
             f", ig N=64 {by[('ig', 64, g)]['correlation']:.3f}, jump_ig N=4 "
             f"{by[('jump_ig', 4, g)]['correlation']:.3f}")
    _say("wrote " + ", ".join(paths))
    return result
