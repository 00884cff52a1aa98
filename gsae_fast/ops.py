"""Functional Gated SAE ops: fused gated encode to the sparse format, sparse decode, and the
training loss, with autograd, on any executor (see gsae_fast.backends).

Three layers, each in one place:

1. torch custom ops ``gsae_fast::gated_encode``, ``gsae_fast::encode_grad_scatter``,
   ``gsae_fast::sparse_decode``, ``gsae_fast::sparse_decode_backward``,
   ``gsae_fast::sparse_decode_pair``, ``gsae_fast::sparse_decode_pair_backward``: fixed-shape,
   functional, with fake kernels (torch.compile, opcheck) and autograd; a ``backend`` argument
   names the executor that runs them. The backward math is written here, once (the encoder's
   per-slot and per-feature steps, the bias gradients); executors run only the reductions that
   need a kernel (the grouped or atomic scatters, the gathers and the sparse products), and
   which scatter the decoder gradient takes is one setting (backends.set_scatter).
2. Python wrappers (:func:`gated_encode`, :func:`sparse_decode`): input checks, leading batch
   dims, and the capacity protocol: the encode op reports the true per-row counts, and an
   overflow is re-run with the exact capacity, so no active feature is ever dropped.
3. :func:`gated_sae_loss`: the whole Gated SAE loss on the sparse path (one dense GEMM, all else
   proportional to B * L0 * d_in), switching to the dense math when L0 is too high for the
   sparse path to win.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from .types import GatedLoss, SparseActs, acc_dtype, slot_mask

# Capacity (slots per row) tried when the caller has no better guess.
DEFAULT_CAPACITY = 256

# The dense switch (which capacity sends the loss to the dense math, per device): its own
# module; these names stay importable from here.
from .dense_switch import (  # noqa: E402,F401
    DENSE_SWITCH_FRACTION,
    dense_is_faster,
    dense_switch_fraction,
    set_dense_switch,
)


def next_capacity(max_count: int, d_sae: int) -> int:
    """Capacity to try for the next batch after one whose largest row had ``max_count`` actives:
    25% headroom plus a few slots, a multiple of 16, at most d_sae."""
    return min(d_sae, (int(max_count * 1.25) + 8 + 15) // 16 * 16)


# --------------------------------------------------------------------------------------------
# Layer 1: the custom ops.
# --------------------------------------------------------------------------------------------

def _optional_kernel(ex, name: str):
    """An executor's kernel that not every executor has (None where it has not)."""
    return getattr(ex, name, None)

@torch.library.custom_op("gsae_fast::gated_encode", mutates_args=())
def _encode_op(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_gate: Tensor, r_mag: Tensor,
               b_mag: Tensor, capacity: int, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (f, pi_gate, idx, counts, status); status = [max true count, any NaN/Inf].
    (Float outputs first: torch.library.opcheck sums the outputs in order.)"""
    return tuple(backends.executor(backend).gated_encode(x, W_enc, b_dec, b_gate, r_mag, b_mag,
                                                         capacity))


@_encode_op.register_fake
def _(x, W_enc, b_dec, b_gate, r_mag, b_mag, capacity, backend):
    B, acc = x.shape[0], acc_dtype(x.dtype)
    return (x.new_empty((B, capacity), dtype=acc), x.new_empty((B, capacity), dtype=acc),
            x.new_empty((B, capacity), dtype=torch.int32), x.new_empty((B,), dtype=torch.int32),
            x.new_empty((2,), dtype=torch.int32))


# The encoder's backward. The math per active slot (the prologue) and per feature (the
# epilogue) lives here once, in torch ops on [B, K] / [d_sae] tensors; the executors only run
# the one reduction that needs a kernel, gsae_fast::encode_grad_scatter (grad W_enc and the
# per-feature sums), and x's gradient is a sparse decode through W_enc^T.

@torch.library.custom_op("gsae_fast::encode_grad_scatter", mutates_args=())
def _encode_scatter_op(x: Tensor, b_dec: Tensor, idx: Tensor, counts: Tensor, per_slot: Tensor,
                       d_sae: int, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (grad_W_enc [d_in, d_sae] in x's dtype, sums [C, d_sae] in per_slot's dtype):
    ``grad_W_enc[:, i] = sum over the active slots (b, k) with idx[b, k] = i of
    per_slot[0, b, k] * (x[b] - b_dec)`` and ``sums[c, i]`` = the same sums of ``per_slot[c]``
    (``per_slot [C, B, K]``, zero on padding slots)."""
    return tuple(backends.executor(backend).encode_grad_scatter(x, b_dec, idx, counts, per_slot,
                                                                d_sae))


@_encode_scatter_op.register_fake
def _(x, b_dec, idx, counts, per_slot, d_sae, backend):
    return (x.new_empty((x.shape[1], d_sae)),
            per_slot.new_empty((per_slot.shape[0], d_sae)))


def _mv_acc(A: Tensor, v: Tensor, backend: str) -> Tensor:
    """``A @ v`` in v's (accumulation) dtype without an upcast copy of the whole of A: the
    executor's mixed-precision GEMV where it has one (Triton's reads bf16 / fp16 A as it is),
    else bf16 / fp16 A converted a block of columns at a time (at most 16 MiB of fp32 at once)."""
    if A.dtype == v.dtype:
        return A @ v
    vec_mat = _optional_kernel(backends.executor(backend), "vec_mat")
    if vec_mat is not None:  # v @ A^T
        return vec_mat(v.contiguous(), A.t())
    cols = max(1, (1 << 22) // max(1, A.shape[0]))
    out = torch.zeros(A.shape[0], dtype=v.dtype, device=v.device)
    for c in range(0, A.shape[1], cols):
        out += A[:, c:c + cols].to(v.dtype) @ v[c:c + cols]
    return out


def gated_encode_backward(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_gate: Tensor, r_mag: Tensor,
                          b_mag: Tensor, idx: Tensor, f: Tensor, pi_gate: Tensor, counts: Tensor,
                          grad_f: Tensor, grad_pi_gate: Tensor, need_x: bool, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of the gated encode from those of its outputs ``f`` and ``pi_gate`` at the
    active slots; returns (grad_x or an empty tensor, grad_W_enc, grad_b_dec, grad_b_gate,
    grad_r_mag, grad_b_mag) in x's dtype. Per active slot (b, k), feature i = idx[b, k]:

        grad_mag = grad_f * [f > 0]      dz = grad_pi_gate + exp(r_mag_i) * grad_mag
        z = pi_gate - b_gate_i

    then grad W_enc[:, i] = sum dz (x_b - b_dec), grad b_gate_i = sum grad_pi_gate,
    grad b_mag_i = sum grad_mag, grad r_mag_i = exp(r_mag_i) sum grad_mag * z,
    grad b_dec = -W_enc @ (sum dz per feature), grad x_b = sum_k dz W_enc[:, i]."""
    acc = f.dtype
    zero = torch.zeros((), dtype=acc, device=x.device)
    valid = slot_mask(idx, counts)
    # padding never indexes (it may hold anything)
    i = torch.where(valid, idx, 0).reshape(-1).long()
    exp_r = torch.exp(r_mag.to(acc))
    # The four per-slot rows written in place into the one [4, B, K] tensor the kernel takes
    # (no stack copy: at L0 ~ 2k these passes cost as much as the kernel).
    per_slot = torch.empty((4,) + tuple(idx.shape), dtype=acc, device=x.device)
    dz, grad_gate, grad_mag, mag_z = per_slot.unbind(0)
    torch.where(valid, grad_pi_gate, zero, out=grad_gate)
    torch.where(valid & (f > 0), grad_f, zero, out=grad_mag)
    torch.mul(exp_r.index_select(0, i).view_as(f), grad_mag, out=dz)
    dz.add_(grad_gate)
    torch.sub(pi_gate, b_gate.to(acc).index_select(0, i).view_as(f), out=mag_z)  # z
    mag_z.mul_(grad_mag)
    grad_W, sums = _encode_scatter_op(x, b_dec, idx, counts, per_slot, W_enc.shape[1], backend)
    dt = x.dtype
    grad_x = x.new_empty((0,))
    if need_x:  # a sparse decode of dz through W_enc^T (a transposed copy, in x's dtype)
        grad_x = _decode_op(idx, dz, counts, W_enc.t().contiguous(), None, backend)
    return (grad_x, grad_W, (-_mv_acc(W_enc, sums[0], backend)).to(dt), sums[1].to(dt),
            (exp_r * sums[3]).to(dt), sums[2].to(dt))


def _encode_setup(ctx, inputs, output):
    x, W_enc, b_dec, b_gate, r_mag, b_mag, _, backend = inputs
    f, pi_gate, idx, counts, _ = output
    ctx.save_for_backward(x, W_enc, b_dec, b_gate, r_mag, b_mag, idx, f, pi_gate, counts)
    ctx.backend = backend


def _encode_backward(ctx, grad_f, grad_pi, _g_idx, _g_counts, _g_status):
    x, W_enc, b_dec, b_gate, r_mag, b_mag, idx, f, pi_gate, counts = ctx.saved_tensors
    grad_f = torch.zeros_like(f) if grad_f is None else grad_f.contiguous()
    grad_pi = torch.zeros_like(pi_gate) if grad_pi is None else grad_pi.contiguous()
    need_x = ctx.needs_input_grad[0]
    dx, dW, db_dec, db_gate, dr_mag, db_mag = gated_encode_backward(
        x, W_enc, b_dec, b_gate, r_mag, b_mag, idx, f, pi_gate, counts, grad_f, grad_pi, need_x,
        ctx.backend)
    return dx if need_x else None, dW, db_dec, db_gate, dr_mag, db_mag, None, None


_encode_op.register_autograd(_encode_backward, setup_context=_encode_setup)


@torch.library.custom_op("gsae_fast::sparse_decode", mutates_args=())
def _decode_op(idx: Tensor, val: Tensor, counts: Tensor, W_dec: Tensor, bias: Optional[Tensor],
               backend: str) -> Tensor:
    return backends.executor(backend).sparse_decode(idx, val, counts, W_dec, bias)


@_decode_op.register_fake
def _(idx, val, counts, W_dec, bias, backend):
    return W_dec.new_empty((idx.shape[0], W_dec.shape[1]))


@torch.library.custom_op("gsae_fast::sparse_decode_backward", mutates_args=())
def _decode_backward_op(grad_out: Tensor, idx: Tensor, val: Tensor, counts: Tensor,
                        W_dec: Tensor, need_val: bool, need_W_dec: bool, deterministic: bool,
                        backend: str) -> tuple[Tensor, Tensor]:
    """Returns (grad_val or empty, grad_W_dec or empty); ``deterministic``: grad_W_dec scattered
    in a fixed order (backends.deterministic_scatter, asked by the caller)."""
    return tuple(backends.executor(backend).sparse_decode_backward(
        grad_out, idx, val, counts, W_dec, need_val, need_W_dec, deterministic))


@_decode_backward_op.register_fake
def _(grad_out, idx, val, counts, W_dec, need_val, need_W_dec, deterministic, backend):
    return (torch.empty_like(val) if need_val else val.new_empty((0,)),
            torch.empty_like(W_dec) if need_W_dec else W_dec.new_empty((0,)))


def _decode_setup(ctx, inputs, output):
    idx, val, counts, W_dec, bias, backend = inputs
    ctx.save_for_backward(idx, val, counts, W_dec)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _decode_backward(ctx, grad_out):
    idx, val, counts, W_dec = ctx.saved_tensors
    need_val, need_W = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_out = grad_out.contiguous()
    grad_val = grad_W = None
    if need_val or need_W:
        grad_val, grad_W = _decode_backward_op(grad_out, idx, val, counts, W_dec, need_val,
                                               need_W, backends.deterministic_scatter(),
                                               ctx.backend)
    grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return (None, grad_val if need_val else None, None, grad_W if need_W else None, grad_bias,
            None)


_decode_op.register_autograd(_decode_backward, setup_context=_decode_setup)


# The pair decode: out_a = val_a @ W + bias and out_b = val_b @ W + bias over the same slots
# (the Gated SAE loss's x_hat and auxiliary reconstruction), from one gather of each used row of
# W, forward (two accumulators) and backward (two dot products per gathered row). ``grad_W_b``:
# whether out_b's gradient reaches W and bias (aux="shared"), or only val_b (aux="frozen").
# An executor without the pair kernels runs two single decodes (same contract).

@torch.library.custom_op("gsae_fast::sparse_decode_pair", mutates_args=())
def _decode_pair_op(idx: Tensor, val_a: Tensor, val_b: Tensor, counts: Tensor, W_dec: Tensor,
                    bias: Optional[Tensor], grad_W_b: bool, backend: str
                    ) -> tuple[Tensor, Tensor]:
    ex = backends.executor(backend)
    fn = _optional_kernel(ex, "sparse_decode_pair")
    if fn is None:
        return (ex.sparse_decode(idx, val_a, counts, W_dec, bias),
                ex.sparse_decode(idx, val_b, counts, W_dec, bias))
    return tuple(fn(idx, val_a, val_b, counts, W_dec, bias))


@_decode_pair_op.register_fake
def _(idx, val_a, val_b, counts, W_dec, bias, grad_W_b, backend):
    shape = (idx.shape[0], W_dec.shape[1])
    return W_dec.new_empty(shape), W_dec.new_empty(shape)


@torch.library.custom_op("gsae_fast::sparse_decode_pair_backward", mutates_args=())
def _decode_pair_backward_op(grad_a: Tensor, grad_b: Tensor, idx: Tensor, val_a: Tensor,
                             val_b: Tensor, counts: Tensor, W_dec: Tensor, need_val_a: bool,
                             need_val_b: bool, need_W_dec: bool, W_from_b: bool,
                             deterministic: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_val_a or empty, grad_val_b or empty, grad_W_dec or empty); grad_W_dec sums
    the out_a path and, when ``W_from_b``, the out_b path."""
    ex = backends.executor(backend)
    fn = _optional_kernel(ex, "sparse_decode_pair_backward")
    if fn is not None:
        return tuple(fn(grad_a, grad_b, idx, val_a, val_b, counts, W_dec, need_val_a, need_val_b,
                        need_W_dec, W_from_b, deterministic))
    gva, gWa = ex.sparse_decode_backward(grad_a, idx, val_a, counts, W_dec, need_val_a,
                                         need_W_dec, deterministic)
    gvb, gWb = ex.sparse_decode_backward(grad_b, idx, val_b, counts, W_dec, need_val_b,
                                         need_W_dec and W_from_b, deterministic)
    gW = gWa + gWb if need_W_dec and W_from_b else gWa
    return gva, gvb, gW


@_decode_pair_backward_op.register_fake
def _(grad_a, grad_b, idx, val_a, val_b, counts, W_dec, need_val_a, need_val_b, need_W_dec,
      W_from_b, deterministic, backend):
    return (torch.empty_like(val_a) if need_val_a else val_a.new_empty((0,)),
            torch.empty_like(val_b) if need_val_b else val_b.new_empty((0,)),
            torch.empty_like(W_dec) if need_W_dec else W_dec.new_empty((0,)))


def _decode_pair_setup(ctx, inputs, output):
    idx, val_a, val_b, counts, W_dec, bias, grad_W_b, backend = inputs
    ctx.save_for_backward(idx, val_a, val_b, counts, W_dec)
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.grad_W_b = grad_W_b


def _decode_pair_backward(ctx, grad_a, grad_b):
    idx, val_a, val_b, counts, W_dec = ctx.saved_tensors
    shape = (idx.shape[0], W_dec.shape[1])
    grad_a = W_dec.new_zeros(shape) if grad_a is None else grad_a.contiguous()
    grad_b = W_dec.new_zeros(shape) if grad_b is None else grad_b.contiguous()
    need_a, need_b, need_W = (ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                              ctx.needs_input_grad[4])
    grad_val_a = grad_val_b = grad_W = None
    if need_a or need_b or need_W:
        grad_val_a, grad_val_b, grad_W = _decode_pair_backward_op(
            grad_a, grad_b, idx, val_a, val_b, counts, W_dec, need_a, need_b, need_W,
            ctx.grad_W_b, backends.deterministic_scatter(), ctx.backend)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad_a.sum(0) + grad_b.sum(0) if ctx.grad_W_b else grad_a.sum(0)
    return (None, grad_val_a if need_a else None, grad_val_b if need_b else None, None,
            grad_W if need_W else None, grad_bias, None, None)


_decode_pair_op.register_autograd(_decode_pair_backward, setup_context=_decode_pair_setup)


# --------------------------------------------------------------------------------------------
# Layer 2: checked wrappers with the capacity protocol.
# --------------------------------------------------------------------------------------------

def check_same(tensors: dict[str, Tensor], op: str) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(tensors.items()))
    if not first.is_floating_point():
        raise TypeError(f"{op}: {first_name} must be floating point, got {first.dtype}")
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has "
                            f"{first.dtype}; all inputs must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; all inputs must be on one device")


def check_shape(t: Tensor, shape: tuple, name: str, op: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def check_encoder(op: str, x: Tensor, W_enc: Tensor, b_dec: Tensor, **vectors: Tensor) -> None:
    """Dtypes, devices and shapes of an encoder call: ``x [..., d_in]``, ``W_enc [d_in, d_sae]``,
    ``b_dec [d_in]`` and the per-feature ``vectors`` (each ``[d_sae]``)."""
    check_same(dict(x=x, W_enc=W_enc, b_dec=b_dec, **vectors), op)
    if W_enc.dim() != 2:
        raise ValueError(f"{op}: W_enc must be [d_in, d_sae], got {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"{op}: x must be [..., d_in={d_in}], got {list(x.shape)}")
    check_shape(b_dec, (d_in,), "b_dec", op)
    for name, t in vectors.items():
        check_shape(t, (d_sae,), name, op)


def gated_encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_gate: Tensor, r_mag: Tensor,
                 b_mag: Tensor, *, capacity: Optional[int] = None,
                 backend: str = "auto") -> SparseActs:
    """Fused gated encode of ``x [..., d_in]`` to :class:`SparseActs` (exact for any L0).

    ``capacity`` is a guess of the largest number of active features in a row; a row with more
    makes the encode run again with the exact number (so a good guess saves a GEMM, a bad one
    costs one, and none loses data). Raises ValueError if the pre-activations are NaN or Inf,
    or if a per-feature parameter is (or ``exp(r_mag)`` overflows): the magnitude path's relu
    and the gate's comparison would otherwise hide them.
    """
    op = "gsae_fast.gated_encode"
    check_encoder(op, x, W_enc, b_dec, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
    d_in, d_sae = W_enc.shape
    if capacity is not None and capacity < 0:
        raise ValueError(f"{op}: capacity must be >= 0, got {capacity}")
    be = backends.resolve(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).contiguous()
    params = [p.contiguous() for p in (W_enc, b_dec, b_gate, r_mag, b_mag)]
    K = min(d_sae, DEFAULT_CAPACITY if capacity is None else capacity)
    f, pi, idx, counts, status = _encode_op(x2, *params, K, be)
    # The per-feature vectors' check rides on the status read (one host synchronisation).
    acc = acc_dtype(x.dtype)
    vectors = dict(b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
    finite = [torch.isfinite(v.to(acc).exp() if name == "r_mag" else v).all()
              for name, v in vectors.items()]
    max_count, nonfinite, *vectors_ok = torch.cat(
        [status, torch.stack(finite).to(status.dtype)]).tolist()
    if nonfinite:
        raise ValueError(f"{op}: the pre-activations contain NaN or Inf: x or the encoder "
                         "parameters (W_enc, b_dec) hold NaN/Inf values")
    for (name, v), ok in zip(vectors.items(), vectors_ok):
        if not ok:
            bad = ~torch.isfinite(v.to(acc).exp() if name == "r_mag" else v)
            what = ("exp(r_mag) overflows or r_mag is NaN" if name == "r_mag"
                    else f"{name} holds NaN/Inf")
            raise ValueError(f"{op}: {what} at feature(s) {bad.nonzero().flatten()[:8].tolist()}"
                             f" ({int(bad.sum())} in all)")
    if max_count > K:  # a row overflowed: run again with room for every active feature
        K = max_count
        f, pi, idx, counts, status = _encode_op(x2, *params, K, be)
    return SparseActs(idx=idx.view(*lead, K), f=f.view(*lead, K), pi_gate=pi.view(*lead, K),
                      counts=counts.view(lead), d_sae=d_sae, max_count=max_count, checked=True)


def check_acts(op: str, acts: SparseActs) -> None:
    """Validate sparse activations built outside the package's encoders (once: it then marks
    them checked): types, shapes, ``counts`` within ``[0, K]`` and the active slots' feature
    indices within ``[0, d_sae)``, with one error text whatever the executor. A few reductions
    over ``[..., K]`` (one host synchronisation); the encoders' own outputs skip it."""
    if not isinstance(acts, SparseActs):
        raise TypeError(f"{op}: acts must be SparseActs, got {type(acts).__name__}")
    if acts.checked:
        return
    idx, counts = acts.idx, acts.counts
    if not isinstance(idx, Tensor) or idx.dtype != torch.int32 or idx.dim() < 1:
        raise TypeError(f"{op}: acts.idx must be an int32 tensor [..., K], got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} "
                        f"{list(getattr(idx, 'shape', []))}")
    if not isinstance(counts, Tensor) or counts.dtype != torch.int32 or \
            counts.shape != idx.shape[:-1]:
        raise ValueError(f"{op}: acts.counts must be int32 of shape {list(idx.shape[:-1])} (one "
                         f"count per row of acts.idx {list(idx.shape)}), got "
                         f"{getattr(counts, 'dtype', type(counts).__name__)} "
                         f"{list(getattr(counts, 'shape', []))}")
    for name in ("f", "pi_gate"):
        v = getattr(acts, name)
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != idx.shape:
            raise ValueError(f"{op}: acts.{name} must be a floating-point tensor of acts.idx's "
                             f"shape {list(idx.shape)}, got {getattr(v, 'dtype', type(v))} "
                             f"{list(getattr(v, 'shape', []))}")
        if v.device != idx.device:
            raise ValueError(f"{op}: acts.{name} is on {v.device} but acts.idx on {idx.device}")
    if counts.device != idx.device:
        raise ValueError(f"{op}: acts.counts is on {counts.device} but acts.idx on {idx.device}")
    if not isinstance(acts.d_sae, int) or acts.d_sae < 1:
        raise ValueError(f"{op}: acts.d_sae must be a positive int, got {acts.d_sae!r}")
    K = idx.shape[-1]
    if counts.numel() and idx.numel():
        active = slot_mask(idx, counts.clamp(0, K))
        lo, hi = idx.new_full((), acts.d_sae), idx.new_full((), -1)  # fills for padding
        stats = torch.stack([counts.min(), counts.max(), torch.where(active, idx, lo).min(),
                             torch.where(active, idx, hi).max()]).tolist()
    else:
        stats = [int(counts.min()) if counts.numel() else 0,
                 int(counts.max()) if counts.numel() else 0, 0, -1]
    c_min, c_max, i_min, i_max = stats
    if c_min < 0 or c_max > K:
        raise ValueError(f"{op}: acts.counts must be within [0, K={K}] (the slots per row), got "
                         f"values from {c_min} to {c_max}")
    if i_max >= 0 and (i_min < 0 or i_max >= acts.d_sae):
        raise ValueError(f"{op}: acts.idx holds feature indices from {i_min} to {i_max} on "
                         f"active slots; they must be within [0, d_sae={acts.d_sae})")
    acts.checked = True


def _check_decoder(op: str, acts: SparseActs, W_dec: Tensor, bias: Optional[Tensor],
                   backend: str):
    """Types, shapes and devices of a decode of ``acts`` through ``W_dec [d_sae, d_in]`` (+ bias);
    returns (the concrete backend, the leading dims, the capacity K, the number of rows)."""
    check_acts(op, acts)
    tensors = dict(W_dec=W_dec) if bias is None else dict(W_dec=W_dec, bias=bias)
    check_same(tensors, op)
    if W_dec.dim() != 2 or W_dec.shape[0] != acts.d_sae:
        raise ValueError(f"{op}: W_dec must be [d_sae={acts.d_sae}, d_in], got "
                         f"{list(W_dec.shape)}")
    if bias is not None:
        check_shape(bias, (W_dec.shape[1],), "bias", op)
    if acts.idx.device != W_dec.device:
        raise ValueError(f"{op}: acts are on {acts.idx.device} but W_dec is on {W_dec.device}")
    # rows explicit: reshape(-1, 0) of an empty batch is ambiguous
    return (backends.resolve(backend, W_dec.device), acts.counts.shape, acts.capacity,
            acts.counts.numel())


def sparse_decode(acts: SparseActs, W_dec: Tensor, bias: Optional[Tensor] = None, *,
                  values: str = "f", backend: str = "auto") -> Tensor:
    """``acts @ W_dec + bias`` from sparse activations: ``[..., d_in]`` in W_dec's dtype.

    ``values`` picks the activations to decode: ``"f"`` (the SAE output) or ``"pi_gate"``
    (``relu(pi_gate)``, the auxiliary reconstruction of the Gated SAE loss).
    """
    op = "gsae_fast.sparse_decode"
    if values not in ("f", "pi_gate"):
        raise ValueError(f"{op}: values must be 'f' or 'pi_gate', got {values!r}")
    be, lead, K, rows = _check_decoder(op, acts, W_dec, bias, backend)
    val = getattr(acts, values).to(acc_dtype(W_dec.dtype)).reshape(rows, K).contiguous()
    out = _decode_op(acts.idx.reshape(rows, K).contiguous(), val,
                     acts.counts.reshape(rows).contiguous(), W_dec.contiguous(),
                     None if bias is None else bias.contiguous(), be)
    return out.view(*lead, W_dec.shape[1])


def sparse_decode_pair(acts: SparseActs, W_dec: Tensor, bias: Optional[Tensor] = None, *,
                       grad_b: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(sparse_decode(acts, W_dec, bias), sparse_decode(acts, W_dec, bias, values="pi_gate"))``
    from one gather of each used W_dec row (forward and backward): the x_hat and the auxiliary
    reconstruction of the Gated SAE loss. ``grad_b=False`` stops the second output's gradient
    into W_dec and bias (aux="frozen"); it still reaches pi_gate.
    """
    be, lead, K, rows = _check_decoder("gsae_fast.sparse_decode_pair", acts, W_dec, bias, backend)
    acc = acc_dtype(W_dec.dtype)
    val_a = acts.f.to(acc).reshape(rows, K).contiguous()
    val_b = acts.pi_gate.to(acc).reshape(rows, K).contiguous()
    out_a, out_b = _decode_pair_op(acts.idx.reshape(rows, K).contiguous(), val_a, val_b,
                                   acts.counts.reshape(rows).contiguous(), W_dec.contiguous(),
                                   None if bias is None else bias.contiguous(), grad_b, be)
    return out_a.view(*lead, W_dec.shape[1]), out_b.view(*lead, W_dec.shape[1])


# --------------------------------------------------------------------------------------------
# Layer 3: the loss.
# --------------------------------------------------------------------------------------------

# The loss decodes x_hat and the aux reconstruction with one sparse_decode_pair (False: two
# sparse_decode calls, as before it existed; kept for tests and comparisons).
_DECODE_PAIR = True


def gated_sae_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_gate: Tensor,
                   r_mag: Tensor, b_mag: Tensor, l1_coefficient: float, *,
                   sparsity: str = "unit", aux: str = "frozen", backend: str = "auto",
                   capacity: Optional[int] = None) -> GatedLoss:
    """The Gated SAE training loss (see gsae_fast.reference for the math and the options).

    On the sparse path nothing of size ``[tokens, d_sae]`` is built, forward or backward. When
    ``capacity`` (the expected largest row count, e.g. ``next_capacity`` of the previous batch)
    exceeds ``dense_switch_fraction(x.device, x.dtype) * d_sae`` (see :func:`set_dense_switch`),
    the dense math runs instead, as it is then faster.
    ``GatedLoss.max_count`` tells the caller the largest row count of this batch either way.
    """
    reference.check_loss_options(sparsity, aux)
    op = "gsae_fast.gated_sae_loss"
    # Every input checked here, whichever path runs: the same refusals on every backend.
    check_encoder(op, x, W_enc, b_dec, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
    d_in, d_sae = W_enc.shape[0], W_enc.shape[1]
    check_same(dict(x=x, W_dec=W_dec), op)
    check_shape(W_dec, (d_sae, d_in), "W_dec", op)
    if x.shape[:-1].numel() == 0:
        raise ValueError(f"{op}: x has no tokens (the loss is a mean over tokens)")
    if backends.resolve(backend, x.device) == "reference" or \
            dense_is_faster(capacity, d_sae, x.device, x.dtype):
        return reference.gated_sae_loss(x, W_enc, W_dec, b_dec, b_gate, r_mag, b_mag,
                                        l1_coefficient, sparsity=sparsity, aux=aux)
    acts = gated_encode(x, W_enc, b_dec, b_gate, r_mag, b_mag, capacity=capacity, backend=backend)
    if aux == "none" or not _DECODE_PAIR:
        x_hat = sparse_decode(acts, W_dec, b_dec, backend=backend)
    else:  # x_hat and the aux reconstruction from one gather of each used W_dec row
        x_hat, x_aux = sparse_decode_pair(acts, W_dec, b_dec, grad_b=aux == "shared",
                                          backend=backend)
    mse = reference.squared_error(x_hat, x)
    # relu(pi_gate) on the active slots. Padding is masked here, not trusted to be zero: the loss
    # never reads what an executor left in a padding slot.
    active = acts.mask()
    zero = torch.zeros((), dtype=acts.pi_gate.dtype, device=acts.pi_gate.device)
    g = torch.where(active, acts.pi_gate, zero)
    idx = torch.where(active, acts.idx, torch.zeros_like(acts.idx))
    sparsity_term = (l1_coefficient * reference.sparsity_sum(g, W_dec, sparsity, idx)
                     / acts.counts.numel())
    if aux == "none":
        aux_term = reference.zero_term(mse)
    else:
        if not _DECODE_PAIR:  # two decodes (the frozen aux decodes with stop-gradient copies)
            W, b = reference.aux_decoder(W_dec, b_dec, aux)
            x_aux = sparse_decode(acts, W, b, values="pi_gate", backend=backend)
        aux_term = reference.squared_error(x_aux, x)
    return GatedLoss(loss=mse + sparsity_term + aux_term, mse=mse, sparsity=sparsity_term,
                     aux=aux_term, l0=acts.l0(), x_hat=x_hat, acts=acts,
                     max_count=acts.max_count)
