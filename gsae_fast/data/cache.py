"""The on-disk activation cache: :func:`write_cache` streams activations to ``.npy`` shards
plus a ``meta.json``; :class:`ActivationCache` reads them memory-mapped in shuffled, resumable
batches."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..files import TMP_SUFFIX, atomic_write, file_sha256, write_json
from ..hooks import torch_dtype
from .text import PathLike

ProgressFn = Optional[Callable[[int, Optional[int]], None]]

META_FILE = "meta.json"
CACHE_FORMAT = "gsae_fast.activation_cache"
CACHE_FORMAT_VERSION = 1
# Storage dtype name -> (numpy dtype on disk, torch dtype). bfloat16 has no numpy dtype: its
# bits are stored as uint16.
CACHE_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
                "bfloat16": (np.uint16, torch.bfloat16)}
# .npy header written with a fixed length (a multiple of 64, as numpy aligns it), so that the
# row count can be filled in place when a shard closes: shards stream to disk, no shard has to
# fit in memory.
_NPY_HEADER_BYTES = 128


def _npy_header(n_rows: int, d_in: int, np_dtype) -> bytes:
    header = "{'descr': %r, 'fortran_order': False, 'shape': (%d, %d), }" % (
        np.lib.format.dtype_to_descr(np.dtype(np_dtype)), n_rows, d_in)
    body = header.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"   # 10: magic, version, length
    if len(body) != _NPY_HEADER_BYTES - 10:
        raise ValueError(f"shard shape ({n_rows}, {d_in}) too large for the .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


# What write_cache writes, or leaves behind when killed mid-write: files.atomic_write's
# temporary files (".shard_00001.npy.<pid>.<id>.tmp"), or older versions' ("shard_00001.npy.tmp").
_CACHE_FILE = re.compile(r"(meta\.json|shard_\d+\.npy)(\.tmp)?"
                         r"|\.(meta\.json|shard_\d+\.npy)\.\d+\.[0-9a-f]+" + re.escape(TMP_SUFFIX))


def _is_cache_file(name: str) -> bool:
    return _CACHE_FILE.fullmatch(name) is not None


class _ShardWriter:
    """Writes one shard through files.atomic_write (a temporary file renamed to
    ``shard_NNNNN.npy`` when complete): the header, the rows appended, and the header again
    if the row count is not ``full_rows``. The SHA-256 of the file is computed as it streams
    (the header says ``full_rows`` from the start; only a shorter last shard is read back)."""

    def __init__(self, out_dir: str, index: int, d_in: int, np_dtype, full_rows: int):
        self.path = os.path.join(out_dir, _shard_name(index))
        self.d_in, self.np_dtype, self.n_rows, self.full_rows = d_in, np_dtype, 0, full_rows
        header = _npy_header(full_rows, d_in, np_dtype)
        self._stack = contextlib.ExitStack()
        self.file = self._stack.enter_context(atomic_write(self.path))
        self.file.write(header)
        self._hash = hashlib.sha256(header)

    def write(self, rows: np.ndarray):
        rows = np.ascontiguousarray(rows)
        self.file.write(rows.data)
        self._hash.update(rows.data)
        self.n_rows += rows.shape[0]

    def close(self) -> dict:
        if self.n_rows != self.full_rows:
            self.file.seek(0)
            self.file.write(_npy_header(self.n_rows, self.d_in, self.np_dtype))
        self._stack.close()  # flush, fsync, rename, fsync the folder
        digest = (self._hash.hexdigest() if self.n_rows == self.full_rows
                  else file_sha256(self.path))
        return {"file": os.path.basename(self.path), "n_tokens": self.n_rows, "sha256": digest}

    def abort(self, exc: BaseException):
        """Drop the unfinished shard (atomic_write removes its temporary file; on a full disk
        it raises ENOSPC naming the shard instead of ``exc``)."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


def _to_storage(chunk, d_in: int, dtype_name: str) -> np.ndarray:
    """A chunk as a numpy [n, d_in] array of the storage dtype."""
    if isinstance(chunk, np.ndarray):
        chunk = torch.from_numpy(chunk)
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2 or chunk.shape[1] != d_in:
        shape = tuple(chunk.shape) if hasattr(chunk, "shape") else type(chunk).__name__
        raise ValueError(f"write_cache: chunks must be [n, d_in={d_in}] tensors, got {shape}")
    t = chunk.detach().to(device="cpu", dtype=CACHE_DTYPES[dtype_name][1]).contiguous()
    if dtype_name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def write_cache(chunks: Iterable, out_dir: PathLike, *, d_in: int, dtype: str = "float32",
                shard_tokens: int = 2 ** 20, metadata: Optional[dict] = None,
                progress: ProgressFn = None, max_tokens: Optional[int] = None,
                overwrite: bool = False) -> dict:
    """Write activation chunks ([n, d_in] tensors or arrays, e.g. a :class:`ModelActivations`)
    to ``out_dir`` as an activation cache; returns its meta.

    Files: ``shard_00000.npy``, ... (numpy ``.npy`` arrays [n, d_in] of ``shard_tokens`` rows,
    the last one shorter) in ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``, stored
    as its uint16 bits), and ``meta.json`` (d_in, dtype, n_tokens, the shards and their token
    counts and SHA-256 checksums, the gsae_fast version, and ``metadata``: model, layer,
    context_len, dataset files, ... as JSON). Shards stream to disk (a temporary file, renamed
    when complete) and meta.json is written last, so a crash leaves no meta.json and
    :class:`ActivationCache` refuses the directory. A full disk raises OSError(ENOSPC) naming
    the file.

    ``max_tokens`` stops after that many rows (the last chunk is cut); ``progress(n_done,
    max_tokens)`` is called after each chunk. An existing cache in ``out_dir`` is replaced only
    with ``overwrite=True``, else FileExistsError.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; use one of {list(CACHE_DTYPES)}")
    if not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in must be a positive int, got {d_in!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens!r}")
    from .. import __version__
    metadata = dict(metadata or {})
    try:  # now, not after hours of writing
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ValueError(f"write_cache: metadata must be JSON-serialisable ({e})") from None

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    old = sorted(f for f in os.listdir(out_dir) if _is_cache_file(f))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir!r} already holds cache files ({old[0]}, ...): pass "
                              f"overwrite=True to replace them, or choose another directory")
    for name in sorted(old, key=lambda f: not f.startswith("meta")):  # meta.json first
        os.remove(os.path.join(out_dir, name))

    np_dtype = CACHE_DTYPES[dtype][0]
    shards, writer, n_done = [], None, 0
    try:
        for chunk in chunks:
            rows = _to_storage(chunk, d_in, dtype)
            if max_tokens is not None:
                rows = rows[:max_tokens - n_done]
            while rows.shape[0]:
                if writer is None:
                    writer = _ShardWriter(out_dir, len(shards), d_in, np_dtype, shard_tokens)
                n = min(shard_tokens - writer.n_rows, rows.shape[0])
                writer.write(rows[:n])
                rows, n_done = rows[n:], n_done + n
                if writer.n_rows == shard_tokens:
                    shards.append(writer.close())
                    writer = None
            if progress is not None:
                progress(n_done, max_tokens)
            if max_tokens is not None and n_done >= max_tokens:
                break
        if writer is not None:
            shards.append(writer.close())
    except BaseException as e:
        # No meta.json: not a cache. The unfinished shard goes (named, on a full disk).
        if writer is not None:
            writer.abort(e)
        raise
    if n_done == 0:
        raise ValueError("write_cache: no activations to write (the chunks were empty)")

    meta = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "d_in": d_in,
            "dtype": dtype, "n_tokens": n_done, "shards": shards,
            "gsae_fast_version": __version__, "metadata": metadata}
    write_json(meta, os.path.join(out_dir, META_FILE))
    return meta


class ActivationCache:
    """An activation cache written by :func:`write_cache`, memory-mapped.

    Opening checks meta.json and every shard (FileNotFoundError for a missing meta.json or
    shard, ValueError for a corrupt meta.json, an empty or truncated shard, or one of the wrong
    shape or dtype). With ``verify`` (the default), each shard's SHA-256 is checked against
    meta.json when the shard is first read (ValueError naming it: a damaged or swapped
    file); :meth:`verify` checks them all now. Caches written before the checksums load
    without this check.
    ``d_in``, ``n_tokens`` (= ``len(cache)``), ``dtype`` (storage), ``metadata`` (what the
    writer recorded). :meth:`batches` yields shuffled batches; the cache keeps its position
    (``epoch``, ``position``) for :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, path: PathLike, *, verify: bool = True):
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, META_FILE)
        if os.path.isfile(self.path):
            raise NotADirectoryError(
                f"{self.path!r} is a file, not an activation cache: pass the directory that "
                f"holds {META_FILE} and the shards ({os.path.dirname(self.path) or '.'!r}?)")
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"no activation cache directory {self.path!r}")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"no {META_FILE} in {self.path!r}: not an activation cache, or its writing did "
                f"not finish (write_cache writes {META_FILE} last); write it again")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise TypeError(f"a JSON {type(meta).__name__}, not an object")
            d_in, dtype, n_tokens = int(meta["d_in"]), str(meta["dtype"]), int(meta["n_tokens"])
            shards = [(str(s["file"]), int(s["n_tokens"]),
                       None if s.get("sha256") is None else str(s["sha256"]))
                      for s in meta["shards"]]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); write the "
                             f"cache again") from None
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"{meta_path}: unknown dtype {dtype!r}")
        if sum(n for _, n, _ in shards) != n_tokens or not shards:
            raise ValueError(f"{meta_path}: the shards' token counts do not add up to n_tokens="
                             f"{n_tokens}; write the cache again")
        np_dtype = np.dtype(CACHE_DTYPES[dtype][0])
        self._shards, self._paths, self._unverified = [], [], {}
        for i, (name, n, sha256) in enumerate(shards):
            shard_path = os.path.join(self.path, os.path.basename(name))
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"cache {self.path!r}: shard {name} is missing")
            self._shards.append(self._open_shard(shard_path, name, n, d_in, np_dtype))
            self._paths.append(shard_path)
            if verify and sha256 is not None:
                self._unverified[i] = sha256
        self.meta = meta
        self.metadata = meta.get("metadata", {})
        self.d_in, self.dtype, self.n_tokens = d_in, dtype, n_tokens
        self._offsets = np.cumsum([0] + [n for _, n, _ in shards])   # first row of each shard
        self.epoch, self.position = 0, 0
        self._order_key = None     # (seed, shuffle) of the epoch in progress
        self._order = None         # (key, epoch, token order) cached for the epoch

    def _open_shard(self, shard_path: str, name: str, n: int, d_in: int, np_dtype):
        """The shard memory-mapped, checked against meta.json's shape and dtype."""
        try:
            arr = np.load(shard_path, mmap_mode="r")
        except (ValueError, EOFError) as e:
            size = os.path.getsize(shard_path)
            data = n * d_in * np_dtype.itemsize
            what = ("is empty (0 bytes)" if size == 0 else
                    f"is truncated or not a .npy file ({size} bytes; its {n} rows of {d_in} "
                    f"{np_dtype.name} need {data} bytes + a header; {e})")
            raise ValueError(f"cache {self.path!r}: shard {name} {what}: its writing was cut "
                             f"short or the file was damaged; write the cache again") from None
        if arr.ndim != 2 or arr.shape[1] != d_in:
            raise ValueError(f"cache {self.path!r}: shard {name} has shape {arr.shape}, "
                             f"expected width d_in={d_in}")
        if arr.shape[0] != n or arr.dtype != np_dtype:
            raise ValueError(f"cache {self.path!r}: shard {name} holds {arr.shape[0]} rows "
                             f"of {arr.dtype}, meta.json says {n} of {np_dtype}")
        return arr

    def _verify_shard(self, s: int):
        expected = self._unverified.get(s)
        if expected is None:
            return
        got = file_sha256(self._paths[s])
        if got != expected:
            raise ValueError(
                f"cache {self.path!r}: shard {os.path.basename(self._paths[s])} does not match "
                f"its checksum in {META_FILE} (sha256 {got[:16]}..., expected {expected[:16]}"
                f"...): the file was damaged or replaced; write the cache again")
        del self._unverified[s]

    def verify(self) -> None:
        """Check every shard not yet checked against its SHA-256 in meta.json now (ValueError
        naming the first that differs); reads the whole cache."""
        for s in sorted(self._unverified):
            self._verify_shard(s)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self):
        return (f"ActivationCache({self.path!r}, n_tokens={self.n_tokens}, d_in={self.d_in}, "
                f"dtype={self.dtype})")

    def check_width(self, d_in: int):
        """ValueError unless the cache holds activations of width ``d_in``."""
        if d_in != self.d_in:
            raise ValueError(f"cache {self.path!r} holds activations of width {self.d_in}, "
                             f"expected {d_in} (another model or layer?)")

    def _to_torch(self, rows: np.ndarray, dtype) -> torch.Tensor:
        if self.dtype == "bfloat16":  # uint16 bits -> bfloat16, through int16 (same bits)
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).to(dtype)
        return torch.from_numpy(rows).to(dtype)

    def read(self, indices, *, dtype=torch.float32) -> torch.Tensor:
        """Rows ``indices`` (any order, repeats allowed) as a [len(indices), d_in] tensor.
        Read shard by shard at sorted indices (sequential disk access), then put in order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"row indices must be in [0, {self.n_tokens})")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        rows = np.empty((idx.size, self.d_in), dtype=self._shards[0].dtype)
        bounds = np.searchsorted(sorted_idx, self._offsets)
        for s, shard in enumerate(self._shards):
            lo, hi = bounds[s], bounds[s + 1]
            if lo < hi:
                self._verify_shard(s)  # once, before any of its rows are used
                rows[lo:hi] = shard[sorted_idx[lo:hi] - self._offsets[s]]
        out = np.empty_like(rows)
        out[order] = rows
        return self._to_torch(out, torch_dtype(dtype))

    def _epoch_order(self, seed: int, shuffle: bool) -> np.ndarray:
        """The token order of the current epoch: a permutation from seed + epoch."""
        key = (seed, shuffle, self.epoch)
        if self._order is None or self._order[0] != key:
            if shuffle:
                g = torch.Generator().manual_seed(seed + self.epoch)
                order = torch.randperm(self.n_tokens, generator=g).numpy()
            else:
                order = np.arange(self.n_tokens)
            self._order = (key, order)
        return self._order[1]

    def batches(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                epochs: Optional[int] = 1, drop_last: bool = False, dtype=torch.float32,
                device=None) -> "CacheBatches":
        """An iterator of batches [batch_size, d_in] from the current (epoch, position) until
        ``epochs`` epochs in all have been served (None: forever).

        Each epoch visits every token once, in the order of a random permutation drawn from
        ``seed + epoch`` (``shuffle=False``: in order); its last batch is smaller unless
        ``drop_last``. After ``load_state_dict`` the same call continues exactly; resuming
        mid-epoch with another seed or shuffle raises ValueError. The iterator's
        ``state_dict`` / ``load_state_dict`` are the cache's, so it can be handed to a
        training loop as a resumable data stream.
        """
        return CacheBatches(self, batch_size, seed=seed, shuffle=shuffle, epochs=epochs,
                            drop_last=drop_last, dtype=dtype, device=device)

    def state_dict(self) -> dict:
        """Where :meth:`batches` is: the next batch starts at ``position`` of epoch ``epoch``."""
        seed, shuffle = self._order_key if self._order_key is not None else (None, None)
        return {"epoch": self.epoch, "position": self.position, "seed": seed,
                "shuffle": shuffle, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict):
        if state.get("n_tokens", self.n_tokens) != self.n_tokens:
            raise ValueError(f"the state is for a cache of {state['n_tokens']} tokens, this one "
                             f"has {self.n_tokens}: another cache")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position <= self.n_tokens or self.epoch < 0:
            raise ValueError(f"invalid cache position: epoch {self.epoch}, {self.position}")
        seed = state.get("seed")
        self._order_key = None if seed is None else (seed, state.get("shuffle", True))


class CacheBatches:
    """The iterator of :meth:`ActivationCache.batches`; its position is the cache's."""

    def __init__(self, cache: ActivationCache, batch_size: int, *, seed: int, shuffle: bool,
                 epochs: Optional[int], drop_last: bool, dtype, device):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        key = (seed, shuffle)
        if cache.position and cache._order_key is not None and cache._order_key != key:
            raise ValueError(f"resuming mid-epoch with (seed, shuffle) = {key}, the epoch began "
                             f"with {cache._order_key}: the batches would not be the same")
        cache._order_key = key
        self.cache, self.batch_size, self.seed, self.shuffle = cache, batch_size, seed, shuffle
        self.epochs, self.drop_last, self.dtype, self.device = epochs, drop_last, dtype, device

    def __iter__(self) -> "CacheBatches":
        return self

    def __next__(self) -> torch.Tensor:
        cache, n = self.cache, self.cache.n_tokens
        while self.epochs is None or cache.epoch < self.epochs:
            start = cache.position
            end = min(start + self.batch_size, n)
            if start < n and not (self.drop_last and end - start < self.batch_size):
                order = cache._epoch_order(self.seed, self.shuffle)
                batch = cache.read(order[start:end], dtype=self.dtype)
                cache.position = end
                return batch if self.device is None else batch.to(self.device)
            cache.epoch, cache.position = cache.epoch + 1, 0
        raise StopIteration

    def state_dict(self) -> dict:
        return self.cache.state_dict()

    def load_state_dict(self, state: dict):
        self.cache.load_state_dict(state)
        key = (self.seed, self.shuffle)
        if self.cache.position and self.cache._order_key not in (None, key):
            raise ValueError(f"the state is mid-epoch with (seed, shuffle) = "
                             f"{self.cache._order_key}, this iterator has {key}: the batches "
                             f"would not be the same")
        self.cache._order_key = key
