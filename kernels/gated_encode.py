"""Fused gated encode: one GEMM whose epilogue computes the gate and the magnitude path and
writes only the active features.

Per output tile ``z[BM, BN]`` (fp32/fp64 accumulator, registers):

- centring folded in as a bias of the GEMM: ``z = x @ W_enc - c`` with ``c = b_dec @ W_enc``
  (one GEMV per call), so x is read once, as is, and bf16/fp16 products stay exact;
- ``pi_gate = z + b_gate``, ``gate = pi_gate > 0``, ``f = relu(exp(r_mag) * z + b_mag)``;
- compaction: count the actives of each row of the tile, reserve that many slots of the row
  with one ``atomic_add`` on the row's counter (it returns the first free slot), and place them
  with an in-tile prefix sum. Slots past the capacity are not written; the counter still counts
  them, so the host sees the true count and re-runs with room (no feature is dropped);
- a NaN/Inf in z sets a status flag.

Tiles of one row finish in any order, so the host sorts each row's slots by feature afterwards
and zeroes the padding slots: the output does not depend on scheduling, nor on what earlier runs
(the autotuner's benchmark runs) left in the buffers. The atomics are relaxed (no memory fence):
no program reads another's counter or flag before the kernel ends.

The autotuner keeps only the tiles whose compiled kernel fits the device's shared memory (the
compiler's own size, not an estimate); a 64x64 tile fits every sm_80+ GPU in every dtype.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_tl, dot_precision, on_device, slot_mask, vec_mat

# The smallest opt-in shared memory per block among the supported GPUs (sm_80 and later): 99 KB
# on sm_86 / sm_89 (A100: 163 KB, H100/H200: 227 KB).
MIN_SHARED_OPTIN = 101_376
# (BM, BN, BK, num_warps, num_stages) of a tile that fits MIN_SHARED_OPTIN in every dtype, fp64
# included (tests/test_triton.py checks the compiled size for sm_80 and sm_90): whatever the
# device and dtype, the prune below keeps at least this one.
PORTABLE_SHAPE = (64, 64, 32, 4, 2)


def epilogue_width(BM: int, BN: int, num_warps: int) -> int:
    """Columns per epilogue subtile: 1024 / (accumulators per thread), at least 8: 8 columns where a
    thread holds 128 accumulators, 16 where it holds 64, 32 where it holds 32. Measured on the
    compiled sm_90 code (bench/gpu_static.py): 16 columns spill in the 128-accumulator tiles,
    the whole tile (the former epilogue) spills in all of them."""
    per_thread = BM * BN // (32 * num_warps)
    return max(8, min(BN, 16 * 64 // per_thread))


def _gpu_configs():
    # Hopper (H100/H200) and Ampere (A100): 128-row tiles, 64-256 features, K steps of 32-64;
    # the portable tile last.
    shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 32, 8, 3),
              (64, 256, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
              PORTABLE_SHAPE]
    return [triton.Config(dict(BM=m, BN=n, BK=k, GROUP_M=8, EPI_N=epilogue_width(m, n, w)),
                          num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def fits_registers(config, dtype: torch.dtype) -> bool:
    """Whether the tile's accumulators leave room for the GEMM's operands in 255 registers. With
    fp32 (and fp64) inputs the A and B fragments take twice the registers of bf16 / fp16 ones:
    compiled for sm_90, every tile with 128 accumulators per thread spills in fp32, and none
    with 64 (bench/results/gpu_static.md), so 4- and 8-byte inputs keep the tiles with at most
    64 accumulators per thread (the 16-bit ones keep all: none spills)."""
    if dtype.itemsize <= 2:
        return True
    kw = config.kwargs
    return kw["BM"] * kw["BN"] // (32 * config.num_warps) <= 64


def _configs():
    if INTERPRET:  # one config: the interpreter cannot benchmark, and small tiles test the tails
        # (and the epilogue's subtile split, two levels deep)
        return [triton.Config(dict(BM=32, BN=32, BK=32, GROUP_M=2, EPI_N=8), num_warps=4)]
    return _gpu_configs()


def _shared_memory_limit(device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _compiled_shared(config, args, kwargs):
    """Shared memory (bytes) of the kernel compiled for ``config`` with the call's arguments, for
    the current device: through the JIT's warmup, so the compiled kernel lands in the JIT's cache
    and the autotuner's benchmark and the launch reuse it. None if a Triton cache hook took the
    compilation over; inf if the compiler rejects the configuration for lack of resources."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError
    try:
        kernel = _gated_encode_kernel.fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
    except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
        return float("inf")
    if kernel is None:
        return None
    if hasattr(kernel, "result"):  # a future, under triton's async compile mode
        kernel = kernel.result()
    return kernel.metadata.shared


def _keep_fitting(configs, sizes, limit):
    """The configs whose size fits ``limit`` (an unknown size, None, counts as fitting); the
    smallest one if none fits (its launch then reports the failure)."""
    fits = [c for c, s in zip(configs, sizes) if s is None or s <= limit]
    return fits or [min(zip(configs, sizes), key=lambda cs: cs[1])[0]]


_prune_cache: dict = {}


def _fits_in_shared_memory(configs, named_args, **kwargs):
    """Drop the tiles whose compiled kernel needs more shared memory than the device grants a
    block (they would only fail at launch). The size is the compiler's own (``metadata.shared``:
    the pipelined K slices plus the epilogue's layout conversions), for the device's target and
    the call's argument types; the result is cached per device, dtypes, alignment and constexprs.
    CPU tensors (the interpreter) keep every config."""
    x = named_args["x_ptr"]
    if not x.is_cuda:
        return configs
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    args = list(named_args.values())
    # what Triton specialises on: dtypes, 16-byte alignment, ints that are 1, 16k or past int32
    spec = tuple((str(a.dtype), a.data_ptr() % 16 == 0) if hasattr(a, "data_ptr") else
                 (a % 16 == 0, a == 1, -2 ** 31 <= a < 2 ** 31) if isinstance(a, int) else a
                 for a in args)
    key = (str(x.device), spec, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
           tuple(map(str, configs)))
    kept = _prune_cache.get(key)
    if kept is None:
        try:
            sizes = [_compiled_shared(c, args, kwargs) for c in configs]
        except Exception as e:  # noqa: BLE001 - a Triton API this code does not know
            # Never block the encode on the prune itself: keep every tile (the autotuner scores
            # a tile that fails for lack of resources as infinitely slow) and say why.
            warnings.warn(f"gsae_fast: the encode's shared-memory prune could not compile the "
                          f"configurations ({type(e).__name__}: {e}); autotuning all of them",
                          RuntimeWarning, stacklevel=2)
            sizes = [None] * len(configs)
        kept = _prune_cache[key] = _keep_fitting(configs, sizes, _shared_memory_limit(x.device))
    return kept


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: the tiles that fit the registers for the call's dtype
    (:func:`fits_registers`), then the shared memory (:func:`_fits_in_shared_memory`)."""
    x = named_args["x_ptr"]
    if x.is_cuda:
        configs = [c for c in configs if fits_registers(c, x.dtype)] or configs
    return _fits_in_shared_memory(configs, named_args, **kwargs)


@triton.jit
def _epilogue(z, rm, n0, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
              counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr, BM: tl.constexpr,
              W: tl.constexpr):
    """The epilogue of one subtile: the accumulator's columns ``n0 .. n0 + W``."""
    rn = n0 + tl.arange(0, W)
    m_ok = rm < B
    n_ok = rn < d_sae
    c = tl.load(c_ptr + rn, mask=n_ok, other=0.0)
    b_gate = tl.load(b_gate_ptr + rn, mask=n_ok, other=0.0).to(ACC)
    z = z - c[None, :]
    valid = m_ok[:, None] & n_ok[None, :]

    bad = valid & ((z != z) | (tl.abs(z) == float("inf")))
    if tl.max(bad.to(tl.int32)) > 0:
        tl.atomic_max(status_ptr + 1, 1, sem="relaxed")

    pi_gate = z + b_gate[None, :]
    active = (valid & (pi_gate > 0)).to(tl.int32)
    n_row = tl.sum(active, axis=1)
    base = tl.atomic_add(counts_ptr + rm, n_row, mask=m_ok & (n_row > 0), sem="relaxed")
    slot = base[:, None] + tl.cumsum(active, axis=1) - active
    keep = (active > 0) & (slot < K)
    # one 64-bit base per row, the slot added per element (no 64-bit offset tensor); f computed
    # after the compaction: fewer live registers
    row = rm.to(tl.int64) * K
    tl.store((idx_ptr + row)[:, None] + slot, rn[None, :] + tl.zeros((BM, W), tl.int32),
             mask=keep)
    scale = tl.exp(tl.load(r_mag_ptr + rn, mask=n_ok, other=0.0).to(ACC))
    b_mag = tl.load(b_mag_ptr + rn, mask=n_ok, other=0.0).to(ACC)
    f = tl.maximum(scale[None, :] * z + b_mag[None, :], 0.0)
    tl.store((f_ptr + row)[:, None] + slot, f, mask=keep)
    tl.store((pi_ptr + row)[:, None] + slot, pi_gate, mask=keep)


@triton.jit
def _halves(t, BM: tl.constexpr, W: tl.constexpr):
    """Columns ``[0, W/2)`` and ``[W/2, W)`` of ``t[BM, W]`` (in the accumulator's layout each
    thread holds both halves: no data moves)."""
    return tl.split(tl.permute(tl.reshape(t, (BM, 2, W // 2)), (0, 2, 1)))


# The epilogue over 2**j subtiles of width W / 2**j, one after the other (each subtile's
# temporaries die before the next one starts). One function per depth: Triton has no recursion.
@triton.jit
def _epilogue2(t, n0, W: tl.constexpr, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr,
               pi_ptr, idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr,
               BM: tl.constexpr):
    a0, a1 = _halves(t, BM, W)
    _epilogue(a0, rm, n0, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
              counts_ptr, status_ptr, B, d_sae, K, ACC, BM, W // 2)
    _epilogue(a1, rm, n0 + W // 2, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
              idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM, W // 2)


@triton.jit
def _epilogue4(t, n0, W: tl.constexpr, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr,
               pi_ptr, idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr,
               BM: tl.constexpr):
    a0, a1 = _halves(t, BM, W)
    _epilogue2(a0, n0, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
               counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    _epilogue2(a1, n0 + W // 2, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
               idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)


@triton.jit
def _epilogue8(t, n0, W: tl.constexpr, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr,
               pi_ptr, idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr,
               BM: tl.constexpr):
    a0, a1 = _halves(t, BM, W)
    _epilogue4(a0, n0, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
               counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    _epilogue4(a1, n0 + W // 2, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
               idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)


@triton.jit
def _epilogue16(t, n0, W: tl.constexpr, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr,
                pi_ptr, idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr,
                BM: tl.constexpr):
    a0, a1 = _halves(t, BM, W)
    _epilogue8(a0, n0, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
               counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    _epilogue8(a1, n0 + W // 2, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
               idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)


@triton.jit
def _epilogue32(t, n0, W: tl.constexpr, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr,
                pi_ptr, idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC: tl.constexpr,
                BM: tl.constexpr):
    a0, a1 = _halves(t, BM, W)
    _epilogue16(a0, n0, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
                counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    _epilogue16(a1, n0 + W // 2, W // 2, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)


# The counters are restored after each autotuning run, so the tuned launch counts from zero.
@triton.autotune(configs=_configs(), key=["d_in", "d_sae"],
                 prune_configs_by={"early_config_prune": _prune},
                 restore_value=["counts_ptr", "status_ptr"])
@triton.jit
def _gated_encode_kernel(x_ptr, w_ptr, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr,
                         f_ptr, pi_ptr, idx_ptr, counts_ptr, status_ptr,
                         B, d_in, d_sae, K,
                         ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr, EPI_N: tl.constexpr):
    # Grouped tile order (GROUP_M row tiles share the W_enc columns they read, in L2).
    pid = tl.program_id(0)
    n_m = tl.cdiv(B, BM)
    n_n = tl.cdiv(d_sae, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # Out-of-range rows/columns read a valid row/column (wrapped) and are masked at the end.
    x_ptrs = x_ptr + (rm % B)[:, None].to(tl.int64) * d_in + rk[None, :]
    w_ptrs = w_ptr + rk[:, None].to(tl.int64) * d_sae + (rn % d_sae)[None, :]
    acc = tl.zeros((BM, BN), ACC)
    for k0 in range(0, d_in, BK):
        k_ok = rk < d_in - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BK
        w_ptrs += BK * d_sae

    # Epilogue, all in registers, in subtiles of EPI_N columns (see epilogue_width).
    n0 = pid_n * BN
    NS: tl.constexpr = BN // EPI_N
    tl.static_assert(NS * EPI_N == BN and NS <= 32 and (NS & (NS - 1)) == 0)
    if NS == 1:
        _epilogue(acc, rm, n0, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr, idx_ptr,
                  counts_ptr, status_ptr, B, d_sae, K, ACC, BM, BN)
    elif NS == 2:
        _epilogue2(acc, n0, BN, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                    idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    elif NS == 4:
        _epilogue4(acc, n0, BN, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                    idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    elif NS == 8:
        _epilogue8(acc, n0, BN, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                    idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    elif NS == 16:
        _epilogue16(acc, n0, BN, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                     idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)
    else:
        _epilogue32(acc, n0, BN, rm, c_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, pi_ptr,
                    idx_ptr, counts_ptr, status_ptr, B, d_sae, K, ACC, BM)


def gated_encode(x, W_enc, b_dec, b_gate, r_mag, b_mag, capacity: int):
    """The ``gated_encode`` kernel contract (see gsae_fast.torch_executor)."""
    B, d_in = x.shape
    d_sae = W_enc.shape[1]
    K = capacity
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = torch.zeros(B, K, dtype=acc, device=x.device)
    pi_gate = torch.zeros_like(f)
    idx = torch.zeros(B, K, dtype=torch.int32, device=x.device)
    counts = torch.zeros(B, dtype=torch.int32, device=x.device)
    status = torch.zeros(2, dtype=torch.int32, device=x.device)
    if B == 0 or d_sae == 0:
        return f, pi_gate, idx, counts, status
    c = vec_mat(b_dec, W_enc)
    # With capacity 0 nothing is written, but the kernel still counts: give it 1-slot outputs.
    outs = (f, pi_gate, idx) if K else (f.new_zeros(B, 1), f.new_zeros(B, 1), idx.new_zeros(B, 1))
    grid = lambda meta: (triton.cdiv(B, meta["BM"]) * triton.cdiv(d_sae, meta["BN"]),)  # noqa: E731
    with on_device(x):
        _gated_encode_kernel[grid](
            x, W_enc, c, b_gate, r_mag, b_mag, *outs, counts, status,
            B, d_in, d_sae, K, ACC=acc_tl(x.dtype), PRECISION=dot_precision(x.dtype),
            UPCAST=INTERPRET and x.dtype in (torch.bfloat16, torch.float16))
    status[0] = counts.max()
    idx, f, pi_gate = _sort_rows(idx, f, pi_gate, counts, d_sae)
    return f, pi_gate, idx, counts, status


def _sort_rows(idx, f, pi_gate, counts, d_sae: int):
    """Each row's active slots sorted by feature (tiles land in any order), and every padding
    slot (``slot >= counts[b]``) set to exactly 0 in ``idx``, ``f`` and ``pi_gate``, whatever the
    buffers held there (the autotuner's benchmark runs write the same buffers)."""
    if idx.shape[1] == 0:
        return idx, f, pi_gate
    valid = slot_mask(idx, counts)  # after the sort too: padding keys (d_sae) sort last
    if idx.shape[1] > 1:
        idx, perm = torch.where(valid, idx, torch.full_like(idx, d_sae)).sort(dim=1)
        f, pi_gate = f.gather(1, perm), pi_gate.gather(1, perm)
    return (torch.where(valid, idx, 0), torch.where(valid, f, 0.0),
            torch.where(valid, pi_gate, 0.0))
