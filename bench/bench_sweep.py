"""What a sweep saves: N SAEs trained on one pass over a model's activations
(gsae_fast.sweep.SweepTrainer) against N separate runs on the same data, decomposed into the
model's forward (producing the batches) and the SAE steps.

    python bench/bench_sweep.py [--n 4 8] [--steps 20] [--out bench/results]

A random-weight GPT-2 built from a config (no download; ``--layers``, ``--width``), synthetic
text, the activations of ``resid:L`` through the trainer's mixing buffer, Gated SAEs of
``--d-sae`` features differing in their sparsity coefficient. Measured, each once, wall clock:

- ``forward``: producing ``--steps`` batches (the model's forward and the mixing buffer);
- ``step``: ``--steps`` steps of one SAE on batches already produced;
- ``sweep N``: the whole sweep of N members (data produced once);
- ``separate N``: N separate runs, each producing its own batches.

No files are written (no checkpoints, no ``sae/``): they cost a sweep what they cost its members
run separately.

The target (issue 20): sweep N <= forward + N x step, within 10%. Writes
``bench/results/sweep.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _harness as H  # noqa: E402

from gsae_fast.data import sources  # noqa: E402
from gsae_fast.hooks import load_model  # noqa: E402
from gsae_fast.sweep import SweepTrainer, members  # noqa: E402
from gsae_fast.train import Trainer  # noqa: E402


def build_model(root: str, layers: int, width: int, seed: int = 0) -> str:
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                                  vocab_size=2048, n_positions=256)
    path = os.path.join(root, "model")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def write_texts(root: str, docs: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(500)]
    lines = [" ".join(words[j] for j in torch.randint(len(words), (60,), generator=g).tolist())
             for _ in range(docs)]
    path = os.path.join(root, "texts.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layer", default="resid:3")
    ap.add_argument("--out", default=H.RESULTS)
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="gsae_sweep_bench_")
    model_dir, texts = build_model(root, args.layers, args.width), write_texts(root)
    model, tokenizer = load_model(model_dir)

    def stream():
        data, d_in, _ = sources.model_training_batches(
            model, tokenizer, [texts], args.layer, args.batch_size,
            buffer_tokens=4 * args.batch_size, context_len=128, batch_contexts=8)
        return data, d_in

    def configs(n):
        base = dict(d_sae=args.d_sae, steps=args.steps, batch_size=args.batch_size,
                    warmup_steps=1, sparsity_warmup_steps=1, checkpoint_every=0,
                    log_every=args.steps)
        return members(base, [dict(l1_coefficient=0.1 * (i + 1)) for i in range(n)])

    def seconds(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # the model's forward: producing the batches alone, as a run does (the first batch fills
    # the mixing buffer: a run pays that too)
    data, d_in = stream()
    next(data)  # (warm-up of the model's code paths, on a stream then dropped)
    data, d_in = stream()
    batches = []
    forward = seconds(lambda: batches.extend(next(data) for _ in range(args.steps)))
    # one SAE's steps on batches already produced
    (cfg,), _ = configs(1)
    trainer = Trainer(cfg, d_in, iter(batches))
    trainer.train_step(batches[0])  # (warm-up)
    trainer = Trainer(cfg, d_in, iter(batches))
    step = seconds(lambda: trainer.train())
    rows, out = [], {"forward_s": forward, "step_s": step, "runs": []}
    for n in args.n:
        cfgs, names = configs(n)
        data, _ = stream()
        # no files, as the separate runs here (checkpoints cost the same in both)
        t_sweep = seconds(SweepTrainer(cfgs, d_in, data, None, names=names).train)

        def separate():
            for c in cfgs:
                d, _ = stream()
                Trainer(c, d_in, d).train()
        t_separate = seconds(separate)
        bound = forward + n * step
        rows.append((n, f"{t_sweep:.1f}", f"{t_separate:.1f}", f"{bound:.1f}",
                     f"{t_sweep / bound:.2f}", f"{t_separate / t_sweep:.2f}x"))
        out["runs"].append(dict(n=n, sweep_s=t_sweep, separate_s=t_separate, bound_s=bound))
    md = [f"# A sweep of N SAEs against N separate runs ({H.stamp()}, commit {H.git_commit()})",
          "",
          f"`python bench/bench_sweep.py {' '.join(argv or sys.argv[1:])}` on {H.cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}. A random GPT-2 "
          f"({args.layers} layers, width {args.width}), {args.layer}, Gated SAEs of {args.d_sae} "
          f"features, {args.steps} steps of {args.batch_size} tokens; each figure one run, "
          f"seconds.",
          "",
          f"- forward (producing the {args.steps} batches once): {forward:.1f} s",
          f"- step (one SAE's {args.steps} steps on batches already produced): {step:.1f} s",
          ""]
    md += H.md_table(["N", "sweep", "N separate runs", "forward + N x step",
                      "sweep / (forward + N x step)", "speed-up"], rows)
    md += ["", "Target: sweep / (forward + N x step) <= 1.10."]
    text = "\n".join(md) + "\n"
    print(text)
    H.write_pair(os.path.join(args.out, "sweep"), text, out)


if __name__ == "__main__":
    main()
