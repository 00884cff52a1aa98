"""What the activation cache's checksums cost: write a cache of ``--gib`` GiB (float32,
d_in 1024, 4 shards per GiB) to a temporary folder, then time opening it, verifying every shard,
and the first shuffled batch (which reads every shard, so it pays each shard's check once).

    python bench/bench_cache.py [--gib 1] [--dir /tmp]

One run of each, wall clock (the files are in the page cache: the checksum's cost, not the
disk's). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gsae_fast.data.cache import ActivationCache, write_cache  # noqa: E402


def seconds(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where the temporary cache goes")
    args = ap.parse_args(argv)
    d_in, chunk = 1024, 65536
    n = int(args.gib * 2 ** 30 / (4 * d_in))
    shard = max(chunk, n // 4)
    g = torch.Generator().manual_seed(0)
    block = torch.randn(chunk, d_in, generator=g)  # one random block, written again and again
    out = tempfile.mkdtemp(prefix="gsae_cache_bench_", dir=args.dir)
    try:
        chunks = (block[: min(chunk, n - s)] for s in range(0, n, chunk))
        rows = [("write_cache", seconds(lambda: write_cache(
            chunks, os.path.join(out, "c"), d_in=d_in, shard_tokens=shard))[0])]
        t, cache = seconds(lambda: ActivationCache(os.path.join(out, "c")))
        rows.append(("open (checks nothing yet)", t))
        rows.append(("verify() (every shard)", seconds(cache.verify)[0]))
        fresh = ActivationCache(os.path.join(out, "c"))
        rows.append(("first shuffled batch of 4096, checks on", seconds(
            lambda: next(iter(fresh.batches(4096, seed=0))))[0]))
        unchecked = ActivationCache(os.path.join(out, "c"), verify=False)
        rows.append(("first shuffled batch of 4096, verify=False", seconds(
            lambda: next(iter(unchecked.batches(4096, seed=0))))[0]))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    gib = n * d_in * 4 / 2 ** 30
    print(f"| {gib:.2f} GiB cache, float32, d_in {d_in}, {-(-n // shard)} shards | seconds |")
    print("|---|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
