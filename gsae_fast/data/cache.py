"""The on-disk activation cache: :func:`write_cache` streams activations to ``.npy`` shards
plus a ``meta.json``; :class:`ActivationCache` reads them memory-mapped in shuffled, resumable
batches."""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Optional

import numpy as np
import torch

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


def _is_cache_file(name: str) -> bool:
    return name in (META_FILE, META_FILE + ".tmp") or (
        name.startswith("shard_") and name.endswith((".npy", ".npy.tmp")))


class _ShardWriter:
    """Writes one shard: header with a row count of 0, rows appended, then the real count, to
    ``shard_NNNNN.npy.tmp`` renamed to ``shard_NNNNN.npy`` when complete."""

    def __init__(self, out_dir: str, index: int, d_in: int, np_dtype):
        self.path = os.path.join(out_dir, _shard_name(index))
        self.d_in, self.np_dtype, self.n_rows = d_in, np_dtype, 0
        self.file = open(self.path + ".tmp", "wb")
        self.file.write(_npy_header(0, d_in, np_dtype))

    def write(self, rows: np.ndarray):
        self.file.write(np.ascontiguousarray(rows).tobytes())
        self.n_rows += rows.shape[0]

    def close(self) -> dict:
        self.file.seek(0)
        self.file.write(_npy_header(self.n_rows, self.d_in, self.np_dtype))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path + ".tmp", self.path)
        return {"file": os.path.basename(self.path), "n_tokens": self.n_rows}


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
    counts, the gsae_fast version, and ``metadata``: model, layer, context_len, dataset files,
    ... as JSON). Shards stream to disk (``.tmp`` then renamed) and meta.json is written last,
    so a crash leaves no meta.json and :class:`ActivationCache` refuses the directory.

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
                    writer = _ShardWriter(out_dir, len(shards), d_in, np_dtype)
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
    except BaseException:
        # Leave the unfinished shard as .tmp (there is no meta.json: not a cache), but close it.
        if writer is not None and not writer.file.closed:
            writer.file.close()
        raise
    if n_done == 0:
        raise ValueError("write_cache: no activations to write (the chunks were empty)")

    meta = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "d_in": d_in,
            "dtype": dtype, "n_tokens": n_done, "shards": shards,
            "gsae_fast_version": __version__, "metadata": metadata}
    tmp = os.path.join(out_dir, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, META_FILE))
    return meta


class ActivationCache:
    """An activation cache written by :func:`write_cache`, memory-mapped.

    Opening checks meta.json and every shard (FileNotFoundError for a missing meta.json or
    shard, ValueError for a corrupt meta.json or a shard of the wrong shape or dtype).
    ``d_in``, ``n_tokens`` (= ``len(cache)``), ``dtype`` (storage), ``metadata`` (what the
    writer recorded). :meth:`batches` yields shuffled batches; the cache keeps its position
    (``epoch``, ``position``) for :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, META_FILE)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"no activation cache directory {self.path!r}")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"no {META_FILE} in {self.path!r}: not an activation cache, or its writing did "
                f"not finish (write_cache writes {META_FILE} last); write it again")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            d_in, dtype, n_tokens = int(meta["d_in"]), meta["dtype"], int(meta["n_tokens"])
            shards = [(str(s["file"]), int(s["n_tokens"])) for s in meta["shards"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); write the "
                             f"cache again") from None
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"{meta_path}: unknown dtype {dtype!r}")
        if sum(n for _, n in shards) != n_tokens or not shards:
            raise ValueError(f"{meta_path}: the shards' token counts do not add up to n_tokens="
                             f"{n_tokens}; write the cache again")
        np_dtype = np.dtype(CACHE_DTYPES[dtype][0])
        self._shards = []
        for name, n in shards:
            shard_path = os.path.join(self.path, os.path.basename(name))
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"cache {self.path!r}: shard {name} is missing")
            try:
                arr = np.load(shard_path, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"cache {self.path!r}: shard {name} is not a valid .npy file "
                                 f"({e})") from None
            if arr.ndim != 2 or arr.shape[1] != d_in:
                raise ValueError(f"cache {self.path!r}: shard {name} has shape {arr.shape}, "
                                 f"expected width d_in={d_in}")
            if arr.shape[0] != n or arr.dtype != np_dtype:
                raise ValueError(f"cache {self.path!r}: shard {name} holds {arr.shape[0]} rows "
                                 f"of {arr.dtype}, meta.json says {n} of {np_dtype}")
            self._shards.append(arr)
        self.meta = meta
        self.metadata = meta.get("metadata", {})
        self.d_in, self.dtype, self.n_tokens = d_in, dtype, n_tokens
        self._offsets = np.cumsum([0] + [n for _, n in shards])   # first row of each shard
        self.epoch, self.position = 0, 0
        self._order_key = None     # (seed, shuffle) of the epoch in progress
        self._order = None         # (key, epoch, token order) cached for the epoch

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
