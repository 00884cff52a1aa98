"""Every CUDA kernel of an executor once, at small odd sizes, through the public ops, against
backend="reference": the program compute-sanitizer wraps.

Each case runs gated_encode (the epilogue kernel), sparse_decode of f and of pi_gate (decode),
and their backward through autograd (slot dot, the grouped scatter of grad W_dec and grad W_enc,
the decode through W_enc^T for grad x), with the atomic grad W_dec scatter too
(GSAE_FAST_SCATTER=atomic, read at every call) and once under
torch.use_deterministic_algorithms (which must take the grouped scatter). One case spans two
feature blocks of the encode. Prints each case's largest relative error and exits 1 on a mismatch.

    compute-sanitizer --tool memcheck --kernel-name kns=gsae_fast python bench/gpu_sanitize.py
    python bench/gpu_sanitize.py --device cpu --backend cuda_emulated --quick
        # no GPU: the same kernels in the CPU emulator (--backend cpu where it is not built);
        # --quick leaves out the two-block case
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsae_fast import ops  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ENCODER = ("W_enc", "b_dec", "b_gate", "r_mag", "b_mag")
# B, d_in, d_sae, capacity, fraction of open gates
ODD = (37, 19, 53, 8, 0.2)  # capacity 8 < the count of some rows: the encode runs again
ONE_ROW = (1, 33, 7, 7, 0.2)
# ENCODE_BLOCK_ELEMS = 2^23 (csrc/cuda/ops_cuda.cpp): 2051 rows give blocks of 3968 features
TWO_BLOCKS = (2051, 24, 4500, None, 0.005)


def make(shape, dtype, device, seed=0):
    """Random encoder and decoder parameters (about l0_frac of the gates open) and an input."""
    B, d_in, d_sae, _, l0_frac = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return scale * torch.randn(*size, generator=g, dtype=torch.float64)

    shift = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0_frac)).item()
    p = dict(W_enc=randn(d_in, d_sae, scale=d_in ** -0.5), b_dec=randn(d_in, scale=0.1),
             b_gate=randn(d_sae, scale=0.1) - shift, r_mag=randn(d_sae, scale=0.3),
             b_mag=randn(d_sae, scale=0.2), W_dec=randn(d_sae, d_in, scale=d_sae ** -0.5),
             x=randn(B, d_in), g_out=randn(B, d_in), g_aux=randn(B, d_in))
    return {k: v.to(dtype=dtype, device=device) for k, v in p.items()}


def run(backend, data, capacity):
    """Forward and backward of encode -> decode(f) + decode(pi_gate): outputs and gradients."""
    t = {k: data[k].clone().requires_grad_() for k in ENCODER + ("W_dec", "x")}
    acts = ops.gated_encode(t["x"], *(t[k] for k in ENCODER), capacity=capacity, backend=backend)
    x_hat = ops.sparse_decode(acts, t["W_dec"], t["b_dec"], backend=backend)
    aux = ops.sparse_decode(acts, t["W_dec"], t["b_dec"], values="pi_gate", backend=backend)
    ((x_hat * data["g_out"]).sum() + (aux * data["g_aux"]).sum()).backward()
    out = {"f": acts.to_dense(), "pi_gate": acts.to_dense(values="pi_gate"), "x_hat": x_hat,
           "aux": aux}
    out.update({f"grad_{k}": v.grad for k, v in t.items()})
    return out, acts.counts


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, backend, device, shape, dtype, scatter, deterministic=False):
    """One case: the largest relative error over every output and gradient, and whether it is
    within 10x the dtype's tolerance (gates within rounding of zero may flip: counted)."""
    data = make(shape, dtype, device)
    ref, ref_counts = run("reference", data, shape[3])
    before = os.environ.get("GSAE_FAST_SCATTER")
    os.environ["GSAE_FAST_SCATTER"] = scatter
    torch.use_deterministic_algorithms(deterministic)
    try:
        ours, counts = run(backend, data, shape[3])
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(False)
        if before is None:
            os.environ.pop("GSAE_FAST_SCATTER")
        else:
            os.environ["GSAE_FAST_SCATTER"] = before
    errs = {k: rel_err(ours[k], ref[k]) for k in ref}
    worst = max(errs, key=errs.get)
    flips = (counts.long() - ref_counts.long()).abs().sum().item()
    ok = errs[worst] < 10 * TOL[dtype]
    mode = scatter + (" +deterministic" if deterministic else "")
    print(f"{name:<10} {str(dtype).split('.')[1]:<9} {'x'.join(map(str, shape[:3])):<13} "
          f"{mode:<23} max rel error {errs[worst]:.2e} ({worst}), flips {flips}: "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    return ok, errs[worst]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="leave out the two-block case (2^23 "
                    "pre-activations: ~40 s in the CPU emulator)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cases = [("odd", ODD, dt, mode) for dt in TOL for mode in ("grouped", "atomic")]
    cases.append(("one-row", ONE_ROW, torch.float32, "grouped"))
    if not args.quick:
        cases.append(("2-blocks", TWO_BLOCKS, torch.float32, "grouped"))
    results = [check(n, args.backend, args.device, s, dt, m) for n, s, dt, m in cases]
    # deterministic mode with GSAE_FAST_SCATTER=atomic: must still take the grouped scatter
    results.append(check("odd", args.backend, args.device, ODD, torch.float32, "atomic",
                         deterministic=True))
    bad = sum(not ok for ok, _ in results)
    print(f"gpu_sanitize: backend {args.backend} on {args.device}: {len(results)} cases, "
          f"{bad} mismatches, worst max rel error {max(e for _, e in results):.2e} "
          f"({time.perf_counter() - t0:.1f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
