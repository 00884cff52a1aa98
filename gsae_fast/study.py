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
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from . import metrics
from .synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from .train import Trainer

AUX_MODES = ("frozen", "shared", "none")


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
    from .cli import DEMO, demo_train_config
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
    paths = [os.path.join(out_dir, "study_aux.md"), os.path.join(out_dir, "study_aux.json")]
    with open(paths[0], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths[1], "w") as f:
        json.dump(rows, f, indent=1)
    from .cli import pyplot
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
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
