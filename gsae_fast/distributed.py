"""Training beyond one device on ``torch.distributed``: data parallel and a feature-sharded
dictionary (``TrainConfig(parallel="data" | "feature")``, ``gsae-fast train --parallel ...``
under ``torchrun``).

**Data parallel**: every rank holds the whole SAE and its Adam state and trains on its share of
each step's tokens. After the backward, one all-reduce of ``[tokens, token-weighted losses]``
and one per parameter gradient (weighted by the rank's token count, so the result is the
gradient of the mean over all ranks' tokens even for unequal shares); after the step one MAX
all-reduce of the fired-feature mask and the largest row count (dead-feature counters and the
capacity guess stay identical on every rank).

**Feature sharding**: rank r holds the features ``feature_range(d_sae, r, world)`` (contiguous,
as even as possible): ``W_enc[:, s]``, ``W_dec[s]``, ``b_gate[s]``, ``r_mag[s]``, ``b_mag[s]``,
their Adam state and dead-feature counters; ``b_dec`` is replicated. Each rank's share of the
batch is all-gathered into the whole batch ``x``; every rank encodes ``x`` with its features
(sparse, local indices) and decodes its partial ``f @ W_dec[s]`` (and ``relu(pi_gate) @
W_dec[s]`` for the auxiliary term); one sum all-reduce of ``[partial x_hat, partial x_aux, the
partial sparsity sum, per-token counts]`` gives every rank the same global loss
(:func:`feature_sharded_loss`). Backward: the all-reduce passes the gradient through unchanged
(each rank's partial gets ``dL/dx_hat`` once), and the encoder's centring ``x - b_dec`` sums its
per-rank partial ``b_dec`` gradients with one ``[d_in]`` all-reduce, so every gradient equals
the single-process one.

**Checkpoints** (``OUT/checkpoint.pt`` is always the commit point): data parallel writes the
ordinary single-file checkpoint (rank 0). Feature sharding writes one file per rank,
``checkpoint-<step>.rank<r>-of-<n>.pt`` (that rank's slice of every per-feature tensor and of its
Adam state, in the ordinary checkpoint's layout), then rank 0 writes ``checkpoint.pt`` with the
replicated state (step, RNG, data positions, capacity) and the list of rank files.
:func:`read_checkpoint` reads either kind for any feature range, so a run resumes on any number
of ranks; :func:`gather_checkpoint` (``python -m gsae_fast.distributed gather OUT``) writes the
ordinary single file. The rank files must be visible to every rank (one node, or a shared file
system).

Every checkpoint file is written atomically (gsae_fast.files) and carries a sha256: beside a
``checkpoint.pt``, ``checkpoint.pt.sha256`` (``sha256sum -c`` format, written after it); the rank
files' digests are inside the ``checkpoint.pt`` that commits them. :func:`read_checkpoint`
checks them and names the file and what is wrong with it (empty, truncated, damaged, not a
training checkpoint) rather than failing deep inside ``torch.load``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import backends, files, ops, reference

# The checkpoint files (gsae_fast.checkpoints); these names stay importable from here.
from .checkpoints import (  # noqa: F401
    CHECKSUM,
    FEATURE_DIM,
    SHARD_FILE,
    SHARD_KEYS,
    STATE_KEYS,
    CheckpointError,
    gather_checkpoint,
    gathered_sae,
    is_sharded,
    load_file,
    read_checkpoint,
    save_file,
    verify_file,
    write_checkpoint,
)
from .types import GatedLoss, acc_dtype

PARALLEL_MODES = ("none", "data", "feature")


# ------------------------------------------------------------------------- process group


def init(device=None, backend: Optional[str] = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    returns (rank, world size, this rank's device). Backend: NCCL for CUDA, gloo for CPU. An
    already initialised group (e.g. made by the caller) is used as it is."""
    device = torch.device(device if device is not None else "cpu")
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise RuntimeError("parallel training needs a torch.distributed process group: run "
                           "under torchrun (torchrun --nproc-per-node N -m gsae_fast.cli "
                           "train ...), or call torch.distributed.init_process_group first")
    if device.type == "cuda":
        if not torch.cuda.device_count():
            raise RuntimeError(f"device {device}: this process sees no CUDA GPU")
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device {device}: with several ranks per node give the device "
                             f"without an index ('cuda'): each rank takes the GPU of its "
                             f"LOCAL_RANK (an index would put every rank on one GPU)")
        if device.index is None:  # each rank on its own GPU
            local = os.environ.get("LOCAL_RANK")
            # modulo the visible GPUs: a launcher that gives each process one GPU
            # (CUDA_VISIBLE_DEVICES) still sets LOCAL_RANK to the process's place on the node
            device = torch.device("cuda", int(local) % torch.cuda.device_count()
                                  if local is not None else torch.cuda.current_device())
        # Also for a group the caller made: NCCL's barrier and object collectives
        # (all_gather_object, gather_object) run on the *current* device, which would
        # otherwise be GPU 0 on every rank (a hang, or "duplicate GPU").
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return dist.get_rank(), dist.get_world_size(), device


def feature_range(d_sae: int, rank: int, world: int) -> tuple[int, int]:
    """The features [start, stop) of ``rank``: contiguous, the first ``d_sae % world`` ranks one
    more (torch.tensor_split's split)."""
    if d_sae < world:
        raise ValueError(f"feature sharding needs at least one feature per rank: d_sae={d_sae} "
                         f"< {world} ranks")
    q, r = divmod(d_sae, world)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


# ------------------------------------------------------------------------------ the data


class RankShard:
    """Rank ``rank``'s contiguous share (``tensor_split``) of each batch of a global stream:
    the ranks together see exactly the batches a single process would. The position is the
    global stream's, so a checkpoint resumes on any number of ranks. (Every rank reads, or for a
    model computes, the whole batch and keeps its share.)"""

    def __init__(self, data, rank: int, world: int, device=None):
        self.data, self.rank, self.world, self.device = data, rank, world, device

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        x = next(self.data)
        x = x.reshape(-1, x.shape[-1]).tensor_split(self.world)[self.rank]
        return x if self.device is None else x.to(self.device)

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def gather_rows(x: Tensor, group=None) -> Tensor:
    """The rows of every rank's ``x [n_r, d]`` concatenated in rank order (shares may differ
    in size: they are padded to the largest for the all-gather)."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    if x.shape[0] < max(sizes):
        x = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def data_state(state: dict, rank: int, world: int):
    """This rank's data position from a checkpoint: its own when the world size is the same,
    else the common one (a global stream: every rank at the same place)."""
    per = state.get("data_per_rank")
    if per is None:
        return state["data"]
    if len(per) == world:
        return per[rank]
    if all(_same(s, per[0]) for s in per):
        return per[0]
    raise ValueError(f"the checkpoint's data positions differ between its {len(per)} ranks "
                     f"(each read its own stream): resume with {len(per)} ranks")


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(u, v) for u, v in zip(a, b)))
    return a == b


# ---------------------------------------------------------------------- data parallel


def average_gradients(params: Iterable[nn.Parameter], stats: list, n: int,
                      group=None) -> tuple[list, int]:
    """Make every rank's gradients those of the mean loss over all ranks' tokens
    (``sum_r n_r grad_r / sum_r n_r``); ``stats`` (per-token means on this rank's ``n``
    tokens) come back as the means over all tokens, with the total token count."""
    params = list(params)
    device = params[0].device
    head = torch.tensor([n] + [n * s for s in stats], dtype=torch.float64, device=device)
    dist.all_reduce(head, group=group)
    total = head[0].item()
    for p in params:
        if p.grad is None:  # every rank must join every all-reduce
            p.grad = torch.zeros_like(p)
        p.grad.mul_(n / total)
        dist.all_reduce(p.grad, group=group)
    return [v / total for v in head[1:].tolist()], int(total)


def any_fired(fired: Tensor, max_count: int, group=None) -> tuple[Tensor, int]:
    """The features that fired on any rank and the largest row count over all ranks."""
    buf = torch.cat([fired.long(), fired.new_tensor([max_count], dtype=torch.long)])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    return buf[:-1].bool(), int(buf[-1])


# ----------------------------------------------------------------- feature-sharded loss


class _SumForward(torch.autograd.Function):
    """Sum over ranks; the backward is the identity: every rank computes the same loss from
    the sum, so each rank's partial receives the loss gradient once (an all-reduce here would
    count it world-size times)."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """The identity, whose backward sums over ranks: a replicated tensor (b_dec) entering a
    per-rank partial computation (the encoder's centring) gets the sum of the partials."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        # Summed in fp32 at least: bf16 partials summed in bf16 would round at every hop.
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32)).contiguous().clone()
        dist.all_reduce(wide, group=ctx.group)
        return wide.to(grad.dtype), None


def feature_sharded_loss(x: Tensor, W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, b_gate: Tensor,
                         r_mag: Tensor, b_mag: Tensor, l1_coefficient: float, *,
                         sparsity: str = "unit", aux: str = "frozen", backend: str = "auto",
                         capacity: Optional[int] = None, dense: bool = False,
                         group=None) -> tuple[GatedLoss, int]:
    """The Gated SAE loss of the whole batch ``x [B, d_in]`` (the same on every rank) with this
    rank's features (``W_enc [d_in, s]``, ``W_dec [s, d_in]``, per-feature vectors ``[s]``;
    ``b_dec`` replicated). Every rank returns the global loss; the gradients of the local
    parameters and of ``b_dec`` equal those of :func:`gsae_fast.ops.gated_sae_loss` on the
    whole dictionary. ``dense``: the dense math (decided by the caller on the global capacity,
    as the single-process loss does); ``capacity``: the guess for this rank's sparse encode.

    Returns (loss with ``l0`` and ``max_count`` over all features and ``acts`` this rank's
    SparseActs (None on the dense path), this rank's largest row count).
    """
    reference.check_loss_options(sparsity, aux)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"feature_sharded_loss: x must be [tokens > 0, d_in], got "
                         f"{list(x.shape)}")
    n, d_in = x.shape
    b_enc = _SumBackward.apply(b_dec, group)
    W_aux = None if aux == "none" else reference.aux_decoder(W_dec, b_dec, aux)[0]
    acts = None
    if dense or backends.resolve(backend, x.device) == "reference":
        pi_gate, pi_mag = reference.pre_activations(x, W_enc, b_enc, b_gate, r_mag, b_mag)
        active = pi_gate > 0
        g = torch.relu(pi_gate)
        part = (active.to(pi_mag.dtype) * torch.relu(pi_mag)) @ W_dec
        part_aux = None if W_aux is None else g @ W_aux
        counts = active.sum(-1)
    else:
        acts = ops.gated_encode(x, W_enc, b_enc, b_gate, r_mag, b_mag, capacity=capacity,
                                backend=backend)
        if W_aux is None:
            part, part_aux = ops.sparse_decode(acts, W_dec, backend=backend), None
        else:  # both partial decodes from one gather of each used row, as ops.gated_sae_loss
            part, part_aux = ops.sparse_decode_pair(acts, W_dec, grad_b=aux == "shared",
                                                    backend=backend)
        g = acts.pi_gate  # relu(pi_gate) on the active slots, 0 on padding
        counts = acts.counts
    sp = reference.sparsity_sum(g, W_dec, sparsity, None if acts is None else acts.idx)
    acc = acc_dtype(W_dec.dtype)
    pieces = [part, part_aux] if part_aux is not None else [part]
    packed = torch.cat([p.reshape(-1).to(acc) for p in pieces]
                       + [(l1_coefficient * sp / n).reshape(1).to(acc), counts.to(acc)])
    total = _SumForward.apply(packed, group)  # the one forward all-reduce
    x_hat = total[:n * d_in].view(n, d_in).to(W_dec.dtype) + b_dec
    mse = reference.squared_error(x_hat, x)
    if part_aux is None:
        aux_term = reference.zero_term(mse)
    else:
        b_aux = reference.aux_decoder(W_dec, b_dec, aux)[1]
        x_aux = total[n * d_in:2 * n * d_in].view(n, d_in).to(W_dec.dtype) + b_aux
        aux_term = reference.squared_error(x_aux, x)
    sparsity_term = total[-n - 1]
    all_counts = total[-n:].detach()
    local_max = acts.max_count if acts is not None else int(counts.max())
    out = GatedLoss(loss=mse + sparsity_term + aux_term, mse=mse, sparsity=sparsity_term,
                    aux=aux_term, l0=all_counts.float().mean(), x_hat=x_hat, acts=acts,
                    max_count=int(all_counts.max()))
    return out, local_max


def init_shard(d_in: int, d_sae: int, features: tuple[int, int], *, device, backend: str,
               decoder_init_norm: Optional[float]):
    """A GatedSAE holding features [start, stop) of the one ``GatedSAE(d_in, d_sae, ...)``
    would initialise now (the same RNG draws: a sharded run starts where a single-process one
    does). The full ``W_dec`` exists for a moment on ``device``."""
    from .saes import GatedSAE, init_decoder
    start, stop = features
    W = init_decoder(d_in, d_sae, decoder_init_norm, rows=features, device=device)
    if backend not in ("auto", "reference"):
        backends.resolve(backend, W.device)  # fail now, with the reason
    sae = GatedSAE(d_in, stop - start, device="meta", decoder_init_norm=None)
    sae.backend = backend
    sae.W_dec = nn.Parameter(W)
    sae.W_enc = nn.Parameter(W.T.clone().contiguous())
    sae.b_dec = nn.Parameter(torch.zeros(d_in, dtype=W.dtype, device=W.device))
    for name in ("b_gate", "r_mag", "b_mag"):
        setattr(sae, name, nn.Parameter(torch.zeros(stop - start, dtype=W.dtype,
                                                    device=W.device)))
    return sae


# -------------------------------------------------------------------------- checkpoints


def save_sharded(state: dict, path: str, features: tuple[int, int], d_sae: int,
                 group=None) -> None:
    """Every rank writes its file (``state``: this rank's ordinary-format state); then rank 0
    commits ``path`` (replicated state + the file list and their digests) and removes rank
    files of older checkpoints. A kill at any point leaves the previous checkpoint whole."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    folder = os.path.dirname(path) or "."
    names = [f"checkpoint-{state['step']:08d}.rank{r}-of-{world}.pt" for r in range(world)]
    shard = {k: state[k] for k in SHARD_KEYS}
    shard["features"] = list(features)
    digest = save_file(shard, os.path.join(folder, names[rank]))
    # every rank's digest to rank 0 (which also means every rank file is written)
    digests = [None] * world if rank == 0 else None
    dist.gather_object(digest, digests, dst=0, group=group)
    if rank == 0:
        meta = {k: v for k, v in state.items() if k not in shard}
        meta["sharded"] = {"world_size": world, "d_sae": d_sae, "files": names,
                           "ranges": [list(feature_range(d_sae, r, world))
                                      for r in range(world)], "sha256": digests}
        write_checkpoint(meta, path)
        for f in os.listdir(folder):
            if SHARD_FILE.match(f) and f not in names:
                os.remove(os.path.join(folder, f))
    dist.barrier(group=group)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gsae_fast.distributed")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gather", help="a sharded run's checkpoint as one file (and its SAE in "
                                      "SAELens format)")
    g.add_argument("run", help="the run folder (holding checkpoint.pt and its rank files)")
    g.add_argument("--out", help="the single-file checkpoint to write (default: "
                                 "RUN/checkpoint.pt, replaced)")
    g.add_argument("--sae", help="also write the SAE here (SAELens format)")
    args = p.parse_args(argv)
    path = os.path.join(args.run, "checkpoint.pt")
    try:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing")
        with files.FolderLock(args.run):  # not while a run writes there
            print("wrote", gather_checkpoint(path, args.out))
            if args.sae:
                gathered_sae(args.out or path).save_pretrained(args.sae)
                print("wrote", args.sae)
    except (ValueError, FileNotFoundError, files.FolderInUseError) as e:
        print(f"gather: error: {e}", file=sys.stderr)  # one line: what and where
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
