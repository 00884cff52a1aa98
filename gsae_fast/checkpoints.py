"""Training checkpoints on disk: the ordinary single file and the sharded layout (one file per
rank, committed by a ``checkpoint.pt`` that lists them), written atomically (gsae_fast.files)
with their sha256 digests, and read back checked, naming the file and what is wrong with it
(empty, truncated, damaged, changed, not a training checkpoint) rather than failing deep inside
``torch.load``. gsae_fast.distributed writes the sharded ones (save_sharded) and hosts the
``gather`` command; gsae_fast.train writes and reads the rest through here.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import zipfile
from typing import Optional

import torch
from torch import nn

from . import files

SHARD_FILE = re.compile(r"^checkpoint-\d+\.rank\d+-of-\d+\.pt$")
CHECKSUM = ".sha256"  # checkpoint.pt's digest: checkpoint.pt.sha256
# What a training checkpoint holds (a sharded one: its rank files hold SHARD_KEYS).
STATE_KEYS = ("config", "step", "tokens", "capacity", "rng", "d_in")
SHARD_KEYS = ("sae", "optimizer", "since_fired")
# The dimension along features of each per-feature parameter (absent: replicated, b_dec).
FEATURE_DIM = {"W_enc": 1, "W_dec": 0, "b_gate": 0, "r_mag": 0, "b_mag": 0}


def _restrict(parts: list, a: int, b: int, optimizer: bool = True) -> dict:
    """The ordinary-format state of features [a, b) from ``parts`` = [(state, start, stop)]
    (ordinary-format states of consecutive feature ranges, in order); without the Adam state
    when ``optimizer`` is false."""
    use = [(st, max(a, s) - s, min(b, e) - s) for st, s, e in parts if s < b and e > a]
    if not use or a < parts[0][1] or b > parts[-1][2]:
        raise ValueError(f"features [{a}, {b}) are not in the checkpoint's "
                         f"[{parts[0][1]}, {parts[-1][2]})")
    first = use[0][0]

    def cat(get, dim):  # torch.cat copies (out of the memory-mapped files), even one part
        return torch.cat([get(st).narrow(dim, lo, hi - lo) for st, lo, hi in use], dim)

    names = list(first["sae"])  # the parameters' order: the optimizer's indices
    out = {k: v for k, v in first.items() if k != "features"}  # a rank file's own range
    out["sae"] = {k: (v.clone() if FEATURE_DIM.get(k) is None else
                      cat(lambda st: st["sae"][k], FEATURE_DIM[k]))
                  for k, v in first["sae"].items()}
    out["since_fired"] = cat(lambda st: st["since_fired"], 0)
    if not optimizer:
        out.pop("optimizer", None)
        return out
    opt = first["optimizer"]
    out["optimizer"] = {"param_groups": copy.deepcopy(opt["param_groups"]), "state": {}}
    for i, per_param in opt["state"].items():
        dim = FEATURE_DIM.get(names[i])
        out["optimizer"]["state"][i] = {
            k: (v.clone() if dim is None or v.dim() == 0 else
                cat(lambda st: st["optimizer"]["state"][i][k], dim))
            for k, v in per_param.items()}
    return out


def is_sharded(state: dict) -> bool:
    return "sharded" in state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class _Hashing:
    """A write-only file that hashes what goes through it. torch.save writes its zip archive
    front to back (no seek: there is none here), so the digest is that of the file's bytes,
    computed without reading the file back."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save_file(obj, path: str) -> str:
    """``torch.save(obj, path)`` atomically (gsae_fast.files); returns the sha256 of the bytes
    (a rank file's, kept in the checkpoint.pt that lists it)."""
    with files.atomic_write(path) as f:
        out = _Hashing(f)
        torch.save(obj, out)
    return out.sha.hexdigest()


def write_checkpoint(state: dict, path: str) -> None:
    """``state`` at ``path`` (atomically) with its sha256 in ``path.sha256`` (``sha256sum -c``
    format). While the file is replaced the digest file lists the old digest and the new one,
    so that a kill or a full disk on either side of the rename leaves a checkpoint that
    matches (then only the new)."""
    sidecar = path + CHECKSUM
    old = _recorded(sidecar)  # (more than one if an earlier save failed midway)
    name = os.path.basename(path)
    with files.atomic_write(path) as f:
        out = _Hashing(f)
        torch.save(state, out)
        new = out.sha.hexdigest()
        f.flush()  # the checkpoint's bytes on disk (a full disk names it) before its digest
        os.fsync(f.fileno())
        files.write_text("".join(f"{d}  {name}\n" for d in [new] + old), sidecar)
    files.write_text(f"{new}  {name}\n", sidecar)


def _recorded(sidecar: str) -> list:
    """The digests in a ``.sha256`` file (none if it is missing)."""
    if not os.path.exists(sidecar):
        return []
    with open(sidecar) as f:
        return [line.split()[0] for line in f if line.strip()]


def _damage(path: str) -> Optional[str]:
    """What is wrong with a checkpoint file, as far as its container tells (torch's files are
    zip archives: a truncated one has no central directory, a changed byte fails its CRC);
    None when the archive is whole."""
    if os.path.getsize(path) == 0:
        return "is empty (a save that never finished?)"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "is truncated or damaged (not a whole archive)"
    return None if bad is None else f"is damaged (its part {bad} fails its CRC)"


def verify_file(path: str, want: Optional[str] = None) -> None:
    """Check ``path`` against its digest: ``want`` (a rank file's, from the checkpoint that
    lists it), else the one in ``path.sha256`` (a file without one, e.g. from an older
    version, is not checked)."""
    sidecar = path + CHECKSUM
    wanted = [want] if want is not None else _recorded(sidecar)
    if want is None and not os.path.exists(sidecar):
        return
    if not wanted or any(len(d) != 64 for d in wanted):
        raise CheckpointError(f"{sidecar} does not hold sha256 digests: delete it to resume "
                              f"from {path} unchecked")
    if files.file_sha256(path) in wanted:
        return
    fix = "restore it from a copy or start over (--overwrite)"
    damage = _damage(path)
    if damage is not None:
        raise CheckpointError(f"{path} {damage}: {fix}")
    where = sidecar if os.path.exists(sidecar) else "the checkpoint that lists it"
    raise CheckpointError(f"{path} has changed since it was saved (its sha256 is not the one in "
                          f"{where}): {fix}")


def load_file(path: str, keys=(), mmap: bool = False):
    """``torch.load`` of a checkpoint file (on the CPU) that fails with one line naming the
    file and what is wrong: missing, empty, unreadable, or without the entries ``keys``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing")
    fix = "restore it from a copy or start over (--overwrite)"
    if os.path.getsize(path) == 0:  # (mmap fails on it with a bare EINVAL)
        raise CheckpointError(f"{path} {_damage(path)}: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # whatever a damaged file makes the unpickler raise
        damage = _damage(path)
        if damage is None:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            damage = f"cannot be read ({why})"
        raise CheckpointError(f"{path} {damage}: {fix}") from None
    _require(state, path, keys)
    return state


def _require(state, path: str, keys) -> None:
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete gsae_fast training checkpoint (it has "
                              f"no {', '.join(map(repr, missing))}): restore it from a copy or "
                              f"start over (--overwrite)")


def read_checkpoint(path: str, features: Optional[tuple[int, int]] = None,
                    check=None, optimizer: bool = True, verify: bool = True) -> dict:
    """A checkpoint (single file or sharded) in the ordinary single-file layout, holding
    features [start, stop) (``None``: all of them). Rank files are memory-mapped and only
    those overlapping the range are read. ``check(state)`` sees the top-level state first (a
    config check: its error beats a complaint about the feature range). ``optimizer=False``:
    without the Adam state (a third of the size: what an export needs). ``verify``: check the
    files' sha256 digests first (CheckpointError naming the file and the fault)."""
    if verify:
        verify_file(path)
    state = load_file(path, STATE_KEYS, mmap=features is not None or not optimizer)
    needs = SHARD_KEYS if optimizer else ("sae", "since_fired")
    if not is_sharded(state):
        _require(state, path, needs)
    if check is not None:
        check(state)
    if features is None and not is_sharded(state):
        return state if optimizer else {k: v for k, v in state.items() if k != "optimizer"}
    if not is_sharded(state):
        d_sae = state["sae"]["b_gate"].shape[0]
        return _restrict([(state, 0, d_sae)], *(features or (0, d_sae)), optimizer)
    info = state["sharded"]
    a, b = features if features is not None else (0, info["d_sae"])
    folder = os.path.dirname(path)
    digests = info.get("sha256") or [None] * len(info["files"])  # none before they existed
    parts = []
    for name, (s, e), digest in zip(info["files"], info["ranges"], digests):
        if s < b and e > a:
            f = os.path.join(folder, name)
            if not os.path.exists(f):
                raise FileNotFoundError(f"{path} needs its rank file {f}, which is missing")
            if verify and digest is not None:
                verify_file(f, digest)
            parts.append((load_file(f, needs + ("features",), mmap=True), s, e))
    out = _restrict(parts, a, b, optimizer)
    for k, v in state.items():
        if k != "sharded":
            out[k] = v
    return out


def gathered_sae(path: str, backend: str = "auto"):
    """The whole GatedSAE (on the CPU) of a checkpoint, sharded or not (its parameters only
    are read: at the end of a run rank 0 does this while the other ranks wait in a barrier
    under the process group's timeout)."""
    from .saes import GatedSAE
    # just written by this run: not hashed again
    params = read_checkpoint(path, optimizer=False, verify=False)["sae"]
    d_sae, d_in = params["W_dec"].shape
    sae = GatedSAE(d_in, d_sae, device="meta", decoder_init_norm=None)
    sae.backend = backend
    for k, v in params.items():
        setattr(sae, k, nn.Parameter(v.clone()))
    return sae


def gather_checkpoint(path: str, out: Optional[str] = None) -> str:
    """Write the ordinary single-file checkpoint of a sharded one (``out``, default: replace
    ``path``, leaving the rank files unused); returns the path written."""
    state = read_checkpoint(path)
    out = out or path
    write_checkpoint(state, out)
    return out
