"""Training and evaluation data assembled from a model and texts or from an activation cache:
what ``gsae-fast cache``, ``train`` and ``eval`` read, as functions of plain arguments.

    model, tok = load_model("models/gpt2")                                  # gsae_fast.hooks
    write_model_cache(model, tok, ["texts.txt"], "resid:6", "acts/", model_name="models/gpt2")
    batches, d_in, described = cache_training_batches("acts/", 4096, seed=0)
    batches, d_in, described = model_training_batches(model, tok, ["texts.txt"], "resid:6", 4096)

Each training stream is endless and resumable (``state_dict`` / ``load_state_dict``), as
:class:`gsae_fast.train.Trainer` needs; with ``world`` ranks it yields rank ``rank``'s share
of every step's tokens. ``described`` is the data's record for ``TrainConfig.extra``.

The data is text files (``.txt``, ``.jsonl``: :func:`read_texts`) or datasets (a
``save_to_disk`` folder, ``.parquet`` / ``.arrow`` files: :mod:`gsae_fast.data.hf_datasets`,
with the ``datasets`` extra). The options of :func:`text_activations` (``text_column``,
``split``, ``prepend_bos``, ``exclude_special_tokens``) are also keyword arguments of
:func:`write_model_cache` and :func:`model_training_batches`.
"""
from __future__ import annotations

import itertools
import os
from typing import Optional, Sequence

import torch

from .cache import ActivationCache, ProgressFn, write_cache
from .hf_datasets import dataset_documents, is_dataset_path
from .mixing import MixingBuffer
from .stream import ModelActivations
from .text import PathLike, read_texts


class FullBatches:
    """The batches of a stream that are full (a mixing buffer ends each pass with a short one,
    which would count as a whole step); resumable as the stream is."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        return self

    def __next__(self):
        # Bounded: a stream whose every batch is short would otherwise spin forever.
        for _ in range(1000):
            x = next(self.data)
            if x.shape[0] == self.batch_size:
                return x
        raise ValueError(f"the data yields no full batch of {self.batch_size}: lower "
                         "the batch size or raise buffer_tokens (--batch-size, --buffer-tokens)")

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def documents(data: Sequence[PathLike], *, text_column: str = "text",
              split: Optional[str] = None, rank: int = 0, world: int = 1):
    """The documents of ``data`` as :class:`ModelActivations` reads them, re-readable pass
    after pass: text files or directories of them (:func:`read_texts`, ``text_column`` the
    field of a ``.jsonl`` line), or datasets (:func:`dataset_documents`, ``split`` the split
    of a ``DatasetDict`` folder); with ``world`` > 1 every ``world``-th document from the
    ``rank``-th. Checked now (present, readable, the column there), so that a bad path fails
    here rather than mid-run."""
    paths = [os.fspath(p) for p in data]
    from_datasets = [is_dataset_path(p) for p in paths]
    if all(from_datasets):
        return dataset_documents(paths, text_column=text_column, split=split, rank=rank,
                                 world=world)
    if any(from_datasets):
        raise ValueError(f"the data mixes text files and datasets ({paths}): pass one kind "
                         f"(e.g. save the texts as a dataset too)")
    read_texts(paths, text_field=text_column)
    if world == 1:
        def texts():
            return read_texts(paths, text_field=text_column)
    else:
        def texts():
            return itertools.islice(read_texts(paths, text_field=text_column), rank, None,
                                    world)
    return texts


def text_activations(model, tokenizer, data: Sequence[PathLike], layer: str, *,
                     context_len: int = 128, batch_contexts: int = 8, dtype=torch.float32,
                     rank: int = 0, world: int = 1, text_column: str = "text",
                     split: Optional[str] = None, prepend_bos: bool = False,
                     exclude_special_tokens: bool = False) -> ModelActivations:
    """``layer``'s activations of ``model`` over the :func:`documents` of ``data`` (text
    files, or datasets, in the column ``text_column``), re-readable pass after pass; with
    ``world`` > 1 over every ``world``-th document from the ``rank``-th (each rank its own
    stream). ``prepend_bos``, ``exclude_special_tokens``: see :class:`ModelActivations`."""
    texts = documents(data, text_column=text_column, split=split, rank=rank, world=world)
    return ModelActivations(model, tokenizer, texts, layer, context_len=context_len,
                            batch_contexts=batch_contexts, dtype=dtype,
                            prepend_bos=prepend_bos,
                            exclude_special_tokens=exclude_special_tokens)


def write_model_cache(model, tokenizer, data: Sequence[PathLike], layer: str,
                      out: PathLike, *, model_name: Optional[str] = None,
                      context_len: int = 128, batch_contexts: int = 8, dtype: str = "float32",
                      shard_tokens: int = 2 ** 20, max_tokens: Optional[int] = None,
                      overwrite: bool = False, progress: ProgressFn = None,
                      **options) -> dict:
    """Run ``model`` over the texts of ``data`` and write ``layer``'s activations to ``out``
    as an activation cache (:func:`write_cache`, stored in ``dtype``); returns its meta. The
    cache's metadata records ``model_name`` (e.g. the model's directory), the layer's module
    name, ``context_len``, the data paths and ``options`` (:func:`text_activations`'s)."""
    source = text_activations(model, tokenizer, data, layer, context_len=context_len,
                              batch_contexts=batch_contexts, **options)
    meta = dict(model=str(model_name), layer=source.layer, context_len=context_len,
                data=[str(p) for p in data], **options)
    return write_cache(source, out, d_in=source.d_in, dtype=dtype, shard_tokens=shard_tokens,
                       metadata=meta, max_tokens=max_tokens, overwrite=overwrite,
                       progress=progress)


def cache_training_batches(cache: PathLike, batch_size: int, *, seed: int = 0, device=None,
                           rank: int = 0, world: int = 1):
    """``(batches, d_in, described)``: endless shuffled batches of ``batch_size`` activations
    of the cache in ``cache`` (with ``world`` ranks, rank ``rank``'s slice of each), its
    width, and ``{"cache": path, "n_tokens": n}`` with the origin the cache records (model,
    layer, context_len, data, ...)."""
    c = ActivationCache(cache)
    if c.n_tokens < batch_size:
        raise ValueError(f"the cache holds {c.n_tokens} activations, fewer than one batch "
                         f"of {batch_size} (--batch-size)")
    data = c.batches(batch_size, seed=seed, epochs=None, drop_last=True, device=device)
    # what the cache says of its origin (model, layer, context, data): SAELens' metadata of
    # the SAE trained on it (gsae_fast.interop.training_metadata)
    origin = {k: c.metadata[k] for k in ("model", "layer", "context_len", "data", "prepend_bos",
                                         "exclude_special_tokens") if k in c.metadata}
    described = {"cache": os.path.abspath(cache), "n_tokens": c.n_tokens, **origin}
    if world == 1:
        return data, c.d_in, described
    from ..distributed import RankShard
    # Every rank reads the global batch and keeps its slice: the position is global, so
    # the run resumes on any number of ranks and equals a one-process run.
    return RankShard(data, rank, world), c.d_in, described


def model_training_batches(model, tokenizer, data: Sequence[PathLike], layer: str,
                           batch_size: int, *, seed: int = 0, buffer_tokens: int = 2 ** 16,
                           context_len: int = 128, batch_contexts: int = 8,
                           model_name: Optional[str] = None, rank: int = 0, world: int = 1,
                           **options):
    """``(batches, d_in, described)``: endless full batches of ``layer``'s activations over
    the texts of ``data`` through a mixing buffer of ``buffer_tokens`` (seeded ``seed + rank``),
    the layer's width, and ``{"model", "layer", "data", "context_len", **options}`` (absolute
    paths; ``model_name`` is the model's directory, as given; ``options``: those of
    :func:`text_activations`). With ``world`` ranks, each runs the model over its own
    documents (every ``world``-th) into ``batch_size / world`` rows of every step."""
    source = text_activations(model, tokenizer, data, layer, context_len=context_len,
                              batch_contexts=batch_contexts, **options)
    d_in = source.d_in
    if world > 1:  # each rank runs the model over every world-th document, its own stream
        if batch_size % world:
            raise ValueError(f"the batch size {batch_size} (--batch-size) must be a multiple "
                             f"of the {world} ranks when training from a model")
        source = text_activations(model, tokenizer, data, layer, context_len=context_len,
                                  batch_contexts=batch_contexts, rank=rank, world=world,
                                  **options)
    batch = batch_size // world
    stream = MixingBuffer(source, buffer_tokens=buffer_tokens, batch_size=batch,
                          seed=seed + rank, repeat=True)
    described = {"model": None if model_name is None else os.path.abspath(model_name),
                 "layer": layer, "data": [os.path.abspath(p) for p in data],
                 "context_len": context_len, **options}
    return FullBatches(stream, batch), d_in, described


def cache_eval_batches(cache: PathLike, d_in: int, *, seed: int = 0, device=None,
                       batch_size: int = 4096):
    """One pass over the cache in ``cache`` in batches for evaluation, checked to be ``d_in``
    wide; shuffled with ``seed + 1``, another order than a training run's with ``seed``."""
    c = ActivationCache(cache)
    c.check_width(d_in)
    return c.batches(batch_size, seed=seed + 1, epochs=1, device=device)
