"""The streaming feature statistics (gsae_fast.features.FeatureStats: top-k with (doc, pos),
firing counts, log-spaced histogram, seeded sample) over N tokens of synthetic sparse activations,
against a dense PyTorch implementation of the same reduction (dense [batch, d_sae] activations,
torch.topk per feature merged across batches, histogram by bucketize on the dense matrix, the
sample by the same hash priorities on the dense matrix). Time and peak resident memory, each
(method, L0) in a fresh process so that the peak is its own; prints a markdown table.

    python bench/bench_features.py --tokens 1000000      # writes bench/results/features_cpu.md
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (  # noqa: E402
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


def batches(tokens, batch, d_sae, l0, seed=0):
    """Synthetic SparseActs: l0 distinct features per token (one per stride of d_sae / l0, so
    rows are strictly increasing), log-normal values; docs of 128 positions."""
    import torch

    from gsae_fast.types import SparseActs
    g = torch.Generator().manual_seed(seed)
    stride = d_sae // l0
    for start in range(0, tokens, batch):
        b = min(batch, tokens - start)
        idx = (torch.arange(l0) * stride + torch.randint(0, stride, (b, l0), generator=g))
        f = torch.exp(torch.randn(b, l0, generator=g))
        t = torch.arange(start, start + b)
        yield (SparseActs(idx.int(), f, f, torch.full((b,), l0, dtype=torch.int32), d_sae),
               t // 128, t % 128)


class DenseStats:
    """The same reduction on dense [batch, d_sae] activations."""

    def __init__(self, d_sae, k, edges, seed=0):
        import torch
        self.k, self.edges, self.seed = k, edges, seed
        self.top_v = torch.full((k, d_sae), -math.inf)
        self.top_t = torch.full((k, d_sae), -1, dtype=torch.long)  # token = doc * 128 + pos
        self.smp_p = torch.full((k, d_sae), 2 ** 63 - 1, dtype=torch.long)
        self.smp_t = torch.full((k, d_sae), -1, dtype=torch.long)
        self.hist = torch.zeros(d_sae, len(edges) + 2, dtype=torch.long)
        self.tokens = 0

    def update(self, acts, docs, pos):
        import torch

        from gsae_fast.features import priority
        dense = acts.to_dense()
        b, d_sae = dense.shape
        token = (docs * 128 + pos).unsqueeze(1).expand(b, d_sae)
        fire = dense > 0
        v = torch.cat([self.top_v, torch.where(fire, dense, -math.inf)])
        top = v.topk(self.k, dim=0)
        self.top_v = top.values
        self.top_t = torch.cat([self.top_t, token]).gather(0, top.indices)
        feats = torch.arange(d_sae).expand(b, d_sae)
        # the priorities FeatureStats draws (its hash keeps the bits a packed sort key leaves)
        pri = priority(self.seed, feats, docs.unsqueeze(1), pos.unsqueeze(1),
                       62 - d_sae.bit_length())
        pri = torch.where(fire, pri, 2 ** 63 - 1)
        smp = torch.cat([self.smp_p, pri]).topk(self.k, dim=0, largest=False)
        self.smp_p = smp.values
        self.smp_t = torch.cat([self.smp_t, token]).gather(0, smp.indices)
        # non-firing entries go to the last, discarded column
        bins = torch.where(fire, torch.bucketize(dense, self.edges, right=True),
                           len(self.edges) + 1)
        self.hist += torch.bincount((bins + feats * self.hist.shape[1]).flatten(),
                                    minlength=self.hist.numel()).view_as(self.hist)
        self.tokens += b


def one(method, tokens, batch, d_sae, l0, k):
    import torch

    from gsae_fast.features import FeatureStats
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    edges = torch.logspace(-4, 4, 33)
    data = list(batches(min(tokens, batch), batch, d_sae, l0))  # warm up on one batch
    stats = None

    def run(stream):
        nonlocal stats
        stats = (FeatureStats(d_sae, k, edges=edges) if method == "sparse"
                 else DenseStats(d_sae, k, edges))
        gen = 0.0
        t0 = time.perf_counter()
        for acts, docs, pos in stream:
            t1 = time.perf_counter()
            stats.update(acts, docs, pos)
            gen -= time.perf_counter() - t1
        return time.perf_counter() - t0 + gen  # seconds spent generating the input

    run(iter(data))
    base = rss_kb("VmRSS:")
    reset_peak()
    gen = []
    ms = timeit(lambda: gen.append(run(batches(tokens, batch, d_sae, l0))), 1, warmup=0)
    peak = rss_kb("VmHWM:") - base
    update_s = (ms / 1e3) - gen[0]
    check = (float(stats.top_values[:, 0].sum()) if method == "sparse"
             else float(stats.top_v[0].sum()))
    return dict(method=method, l0=l0, update_s=update_s, gen_s=gen[0], peak_mb=peak / 1024,
                check=check, firing=int(stats.hist[:, :len(edges) + 1].sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--l0", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--out", default=RESULTS, help="where features_cpu.md/.json go ('' for "
                    "none)")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # "method,l0": the child process
    a = ap.parse_args()
    if a.only:
        method, l0 = a.only.split(",")
        print(json.dumps(one(method, a.tokens, a.batch, a.d_sae, int(l0), a.k)))
        return
    results = []
    for l0 in a.l0:
        for method in ("sparse", "dense"):
            cmd = [sys.executable, __file__, "--only", f"{method},{l0}", "--tokens",
                   str(a.tokens), "--batch", str(a.batch), "--d-sae", str(a.d_sae),
                   "--k", str(a.k)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {method} L0={l0}: {results[-1]['update_s']:.2f} s", file=sys.stderr)
    rows = []
    for r in results:
        dense = next(d for d in results if d["method"] == "dense" and d["l0"] == r["l0"])
        assert abs(r["check"] - dense["check"]) <= 1e-3 * abs(dense["check"]), (r, dense)
        assert r["firing"] == dense["firing"]
        rows.append([r["method"], r["l0"], f"{r['update_s']:.2f}",
                     f"{a.tokens / r['update_s']:.0f}", f"{r['peak_mb']:.0f}",
                     f"{dense['update_s'] / r['update_s']:.1f}x"])
    threads = os.environ.get("BENCH_THREADS", "2")
    head = (f"FeatureStats vs dense: {a.tokens} tokens, batch {a.batch}, d_sae {a.d_sae}, "
            f"k {a.k}, 32 histogram bins, CPU threads {threads}")
    table = "\n".join(md_table(["method", "L0", "time (s)", "tokens/s", "peak RSS (MB)",
                                "speed-up vs dense", "memory vs dense"],
                               [r + [f"{d['peak_mb'] / max(s['peak_mb'], 1e-9):.1f}x"]
                                for r, s, d in _pairs(rows, results)],
                               ["---", "---:", "---:", "---:", "---:", "---:", "---:"]))
    print(head + "\n\n" + table)
    if not a.out:
        return
    import torch
    meta = dict(command=" ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
                date=stamp(), commit=git_commit(), cpu=cpu_name(), cores=os.cpu_count(),
                threads=int(threads), torch=torch.__version__, tokens=a.tokens, batch=a.batch,
                d_sae=a.d_sae, k=a.k)
    md = (f"# Feature statistics: FeatureStats (sparse) vs a dense PyTorch reduction\n\n"
          f"`{meta['command']}`, {meta['date']}, commit {meta['commit']}, CPU {meta['cpu']} "
          f"({meta['cores']} cores, {threads} threads), torch {meta['torch']}. {head}. "
          f"Synthetic sparse activations (the model's forward is the same for both and left "
          f"out); each (method, L0) in a fresh process, one run; time excludes generating the "
          f"input; peak RSS added by the run.\n\n{table}\n")
    write_pair(os.path.join(a.out, "features_cpu"), md, {"meta": meta, "results": results})


def _pairs(rows, results):
    """Each table row with its sparse and dense results (same L0)."""
    for row, r in zip(rows, results):
        dense = next(d for d in results if d["method"] == "dense" and d["l0"] == r["l0"])
        yield row, r, dense


if __name__ == "__main__":
    main()
