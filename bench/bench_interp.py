"""Feature attribution (gsae_fast.interp.node_effects) beside a plain dense PyTorch
implementation of the same estimators, in one run.

Setup: a random-weight GPT-2 (4 blocks, d_model 256, 8 heads), Gated SAEs with d_sae features
spliced at resid:1 and resid:2 (random weights, b_gate set so that L0 ~ 64 per token),
clean / patch batches of B sequences of `pos` tokens, a logit-difference metric, SFC's live error
nodes (other_errors="live").

  dense   SFC's formulation: every layer's dense activations [B, pos, d_sae] and error node as
          autograd leaves, dense encode (gsae_fast.reference) and decode (a @ W_dec); IG
          interpolates the dense leaves, the steps batched as copies of the batch exactly as
          gsae_fast batches them.
  sparse  gsae_fast.interp.node_effects on the C++ kernels ("cpu" backend): sparse activations,
          the gradient taken at the layer output, W_dec rows gathered for the changed features
          only.
  floor   the model's own forward on the same batched copies and its backward from the metric
          to the layer output (no SAE): the work IG with N steps cannot avoid (N forward and
          backward passes of the model downstream of the layer).
Time: median wall time of whole calls; memory: peak resident memory added by one call, in a
fresh process per row. The two implementations' effects are compared (max abs difference
relative to the largest effect).

    python bench/bench_interp.py                 # writes bench/results/interp_cpu.{md,json}
    python bench/bench_interp.py --quick         # smaller, prints only (tests use it)
"""
from __future__ import annotations

import argparse
import json
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
from gsae_fast import activations as A  # noqa: E402
from gsae_fast import interp, reference  # noqa: E402

LAYERS = ("resid:1", "resid:2")
FULL = dict(d_model=256, d_sae=16384, B=4, pos=64, l0=64, steps=16, batch_size=64)
QUICK = dict(d_model=64, d_sae=1024, B=2, pos=16, l0=16, steps=4, batch_size=8)


def setup(cfg, seed=0):
    import transformers
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=cfg["d_model"], n_head=8 if cfg["d_model"] % 8 == 0 else 2,
        vocab_size=512, n_positions=128)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 512, (cfg["B"], cfg["pos"]), generator=g)
    patch = clean.clone()
    patch[:, cfg["pos"] // 2] = torch.randint(0, 512, (cfg["B"],), generator=g)
    saes = {}
    for i, L in enumerate(LAYERS):
        x = A.layer_output(model, torch.cat([clean, patch]), L).reshape(-1, cfg["d_model"])
        sae = gsae_fast.GatedSAE(cfg["d_model"], cfg["d_sae"], backend="cpu")
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(cfg["d_model"], cfg["d_sae"], generator=g)
                            / (x.std() * cfg["d_model"] ** 0.5))
            sae.b_dec.copy_(x.mean(0))
            z = (x - sae.b_dec) @ sae.W_enc
            # one threshold per feature giving L0 ~ l0 per token, halfway between two
            # pre-activations (at one, that gate would flip on the rounding of each executor)
            zs = z.sort(0).values
            k = int(zs.shape[0] * (1 - cfg["l0"] / cfg["d_sae"]))
            q = (zs[k - 1] + zs[k]) / 2
            sae.b_gate.copy_(-q)
            sae.b_mag.copy_(-q + 0.1)
            sae.W_dec.copy_(torch.randn(cfg["d_sae"], cfg["d_model"], generator=g)
                            * x.std() / cfg["l0"] ** 0.5)
        saes[L] = sae.requires_grad_(False)

    def metric(logits):
        return (logits[:, -1, 1] - logits[:, -1, 2]).sum()
    return model, saes, clean, patch, metric


# ------------------------------------------------------------------- the dense implementation

def _dense_nodes(model, saes, tokens):
    """Dense activations and error nodes of every spliced layer (the live splice)."""
    nodes = {}

    def record(L):
        def fn(x):
            s = saes[L]
            a = reference.encode(x, s.W_enc, s.b_dec, s.b_gate, s.r_mag, s.b_mag)
            nodes[L] = (a, x - (a @ s.W_dec + s.b_dec))
            return x
        return fn
    with torch.no_grad(), A.splice(model, LAYERS[0], record(LAYERS[0])), \
            A.splice(model, LAYERS[1], record(LAYERS[1])):
        model(input_ids=tokens)
    return nodes


def dense_node_effects(model, saes, clean, patch, metric, method, steps, batch_size):
    """SFC's estimator with dense leaves: per layer, effects [d_sae] and the error's."""
    nc, np_ = _dense_nodes(model, saes, clean), _dense_nodes(model, saes, patch)
    B = clean.shape[0]
    alphas = [0.0] if method == "atp" else [(k + 0.5) / steps for k in range(steps)]
    per = max(1, batch_size // B)
    out = {}
    for L in LAYERS:
        s = saes[L]
        (ac, ec), (ap, ep) = nc[L], np_[L]
        ga, ge = torch.zeros_like(ac), torch.zeros_like(ec)
        for i in range(0, len(alphas), per):
            al = torch.tensor(alphas[i:i + per]).view(-1, 1, 1, 1)
            c = al.shape[0]
            a = (ac + al * (ap - ac)).reshape(c * B, *ac.shape[1:]).requires_grad_()
            e = (ec + al * (ep - ec)).reshape(c * B, *ec.shape[1:]).requires_grad_()
            with A.splice(model, L, lambda x: a @ s.W_dec + s.b_dec + e):
                logits = model(input_ids=clean.repeat(c, 1)).logits
            m = sum(metric(logits[j * B:(j + 1) * B]) for j in range(c))
            da, de = torch.autograd.grad(m, [a, e])
            ga += da.view(c, *ac.shape).sum(0)
            ge += de.view(c, *ec.shape).sum(0)
        n = len(alphas)
        out[L] = (((ap - ac) * ga / n).sum((0, 1)), ((ep - ec) * ge / n).sum())
    return out


def sparse_node_effects(model, saes, clean, patch, metric, method, steps, batch_size):
    r = interp.node_effects(model, saes, clean, patch, metric, method=method, steps=steps,
                            batch_size=batch_size)
    return {L: (r[L].features, r[L].error) for L in LAYERS}


def floor(model, saes, clean, patch, metric, method, steps, batch_size):
    """The model's forward on the batched copies IG runs, and its backward from the metric to
    the layer's output (per layer; AtP: one forward, one backward to the first layer), no SAE."""
    B = clean.shape[0]
    n = 1 if method == "atp" else steps
    per = max(1, batch_size // B)
    leaf = {}

    def as_leaf(x):
        leaf["x"] = x.detach().requires_grad_()
        return leaf["x"]
    if method == "atp":  # AtP also runs the patch tokens once (no gradient)
        with torch.no_grad():
            model(input_ids=patch)
    for L in (LAYERS[:1] if method == "atp" else LAYERS):
        for i in range(0, n, per):
            c = min(per, n - i)
            with A.splice(model, L, as_leaf):
                logits = model(input_ids=clean.repeat(c, 1)).logits
            m = sum(metric(logits[j * B:(j + 1) * B]) for j in range(c))
            torch.autograd.grad(m, leaf["x"])
    return None


IMPLS = {"dense": dense_node_effects, "sparse": sparse_node_effects, "floor": floor}


def probe(impl, method, cfg, repeats, save):
    """Run in a fresh process: median time (ms), peak RSS added (MB); effects saved."""
    model, saes, clean, patch, metric = setup(cfg)
    fn = IMPLS[impl]
    args = (model, saes, clean, patch, metric, method, cfg["steps"], cfg["batch_size"])
    base = rss_kb("VmRSS:")
    reset_peak()
    res = fn(*args)
    peak = (rss_kb("VmHWM:") - base) / 1024
    ms = timeit(lambda: fn(*args), repeats, warmup=0)  # the call above was the warm-up
    if res is not None:
        torch.save(res, save)
    return {"ms": ms, "peak_mb": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--probe", nargs=3, metavar=("IMPL", "METHOD", "SAVE"))
    args = p.parse_args()
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(os.cpu_count() or 1)
    if args.probe:
        impl, method, save = args.probe
        print(json.dumps(probe(impl, method, cfg, args.repeats, save)))
        return
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("atp", "ig"):
            got = {}
            for impl in ("dense", "sparse", "floor"):
                save = os.path.join(tmp, f"{impl}_{method}.pt")
                cmd = [sys.executable, __file__, "--probe", impl, method, save,
                       "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(dict(method=method, impl=impl, **r))
                if impl != "floor":
                    got[impl] = torch.load(save)
            diff = max(float((got["dense"][L][0].double() - got["sparse"][L][0].double())
                             .abs().max() / got["dense"][L][0].abs().max()) for L in LAYERS)
            for r in rows:
                if r["method"] == method:
                    r["max_rel_diff_dense_vs_sparse"] = diff
    by = {(r["method"], r["impl"]): r for r in rows}
    cells = []
    for method in ("atp", "ig"):
        d, s, f = (by[(method, i)] for i in ("dense", "sparse", "floor"))
        cells.append([method, 1 if method == "atp" else cfg["steps"], f"{d['ms']:.0f}",
                      f"{s['ms']:.0f}", f"{f['ms']:.0f}", f"{d['ms'] / s['ms']:.2f}",
                      f"{s['ms'] / f['ms']:.2f}", f"{d['peak_mb']:.0f}", f"{s['peak_mb']:.0f}",
                      f"{d['max_rel_diff_dense_vs_sparse']:.1e}"])
    lines = md_table(["method", "steps", "dense ms", "sparse ms", "floor ms", "dense / sparse",
                      "sparse / floor", "dense peak MB", "sparse peak MB", "max rel. diff"],
                     cells)
    print("\n".join(lines))
    if args.quick:
        return
    commit = git_commit()
    meta = dict(commit=commit, date=stamp(minutes=False),
                cpu=cpu_name(), threads=os.cpu_count(),
                torch=torch.__version__, **cfg, layers=list(LAYERS))
    head = (f"# Feature attribution: gsae_fast.interp vs a dense PyTorch implementation\n\n"
            f"`python bench/bench_interp.py`, commit {commit}, {meta['date']}, CPU "
            f"({meta['cpu']}, {meta['threads']} threads), torch {torch.__version__}. Random "
            f"GPT-2 (4 blocks, d_model {cfg['d_model']}), Gated SAEs with {cfg['d_sae']} "
            f"features (L0 ~{cfg['l0']}) at {', '.join(LAYERS)}, B={cfg['B']} x pos="
            f"{cfg['pos']} tokens, IG steps {cfg['steps']} batched {cfg['batch_size']} "
            f"sequences per forward, live error nodes. Median of {args.repeats} calls; peak "
            f"memory added by one call (fresh process).\n\n")
    write_pair(os.path.join(args.out, "interp_cpu"), head + "\n".join(lines) + "\n",
               {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
