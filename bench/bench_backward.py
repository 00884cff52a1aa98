"""The encoder's backward on the CPU executor, alone: ops.gated_encode_backward (the per-slot
prologue and per-feature epilogue in torch) against its one kernel, encode_grad_scatter.

    python bench/bench_backward.py [--l0 64 2048] [--repeats 5]

Prints, per mean L0, the median milliseconds of the whole backward and of the kernel (B=1024,
d_in=512, d_sae=16384, fp32: the base shape of bench_step.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _harness import timeit  # noqa: E402

from conftest import make_params, make_x  # noqa: E402
from gsae_fast import ops  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--l0", type=float, nargs="+", default=[64, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    B, d_in, d_sae = 1024, 512, 16384
    for l0 in args.l0:
        p, _ = make_params(d_in, d_sae, torch.float32, l0_frac=l0 / d_sae)
        x = make_x((B, d_in), torch.float32)
        f, pi, idx, counts, _ = torch.ops.gsae_fast.gated_encode(x, *p.values(), d_sae, "cpu")
        K = int(counts.max())
        f, pi, idx = (t[:, :K].contiguous() for t in (f, pi, idx))
        g = torch.randn_like(f)
        args_bwd = (x, *p.values(), idx, f, pi, counts, g, g, False, "cpu")
        per_slot = torch.randn(4, *f.shape) * ops.slot_mask(idx, counts)
        whole = timeit(lambda: ops.gated_encode_backward(*args_bwd), args.repeats)
        kernel = timeit(lambda: torch.ops.gsae_fast.encode_grad_scatter(
            x, p["b_dec"], idx, counts, per_slot, d_sae, "cpu"), args.repeats)
        print(f"L0 {counts.float().mean():.0f} (K {K}): backward {whole:.1f} ms, "
              f"of which the kernel {kernel:.1f} ms")


if __name__ == "__main__":
    main()
