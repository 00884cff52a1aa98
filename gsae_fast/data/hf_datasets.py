"""Documents from Hugging Face ``datasets`` sources, read locally (nothing is fetched): a folder
written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of splits), ``.parquet`` and
``.arrow`` files, or a folder of them. Needs the optional extra: ``pip install
gsae_fast[datasets]`` (the ``datasets`` package).

    docs = dataset_documents(["data/pile-10k"], text_column="text", rank=0, world=1)
    acts = ModelActivations(model, tok, docs, "resid:6", context_len=128)

A column holds the text (strings, tokenized by :class:`ModelActivations`) or pre-tokenized
documents (lists of token ids, e.g. ``input_ids``, used as they are).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Optional

from .text import PathLike

DATA_SUFFIXES = (".parquet", ".arrow")
# Files that save_to_disk writes into its folder (a DatasetDict: dataset_dict.json).
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


def is_dataset_path(path: PathLike) -> bool:
    """Whether ``path`` is read through ``datasets``: a ``save_to_disk`` folder, a
    ``.parquet`` / ``.arrow`` file, or a folder holding such files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = os.listdir(path)
        return (any(m in names for m in SAVED_MARKERS)
                or any(n.endswith(DATA_SUFFIXES) for n in names))
    return path.endswith(DATA_SUFFIXES)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        # (a RuntimeError: gsae-fast reports it in one line)
        raise RuntimeError("reading a dataset (a save_to_disk folder, .parquet or .arrow files) "
                           "needs the datasets package: pip install gsae_fast[datasets] (or "
                           "pip install datasets)") from None
    return datasets


@contextlib.contextmanager
def _offline(datasets):
    """``datasets`` and the Hub client in offline mode while the data loads: every source is a
    local path, and nothing may be fetched even if a loader would try."""
    from huggingface_hub import constants as hub
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         hub.HF_HUB_OFFLINE) = saved


def _load(datasets, path: str, split: Optional[str]):
    """The ``datasets.Dataset`` of one path. A save_to_disk folder is memory-mapped where it is
    (nothing is written into it); parquet and arrow files are converted once into the
    ``datasets`` cache (HF_DATASETS_CACHE), as ``load_dataset`` does."""
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            name = split or "train"
            if name not in loaded:
                raise ValueError(f"{path}: no split {name!r} (splits: {', '.join(loaded)}); "
                                 f"pass split= (--data-split) naming one")
            loaded = loaded[name]
        return loaded
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))
                 if n.endswith(DATA_SUFFIXES)]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no such dataset file or directory: {path!r}")
    suffixes = {os.path.splitext(f)[1] for f in files}
    if len(suffixes) > 1:
        raise ValueError(f"{path!r} holds both .parquet and .arrow files: pass them as "
                         f"separate paths")
    return datasets.load_dataset(_BUILDERS[suffixes.pop()], data_files=files, split="train")


def _is_text(arrow_type) -> bool:
    import pyarrow as pa
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_token_ids(arrow_type) -> bool:
    import pyarrow as pa
    return ((pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type))
            and pa.types.is_integer(arrow_type.value_type))


def _column(dataset, path: str, column: str):
    """``dataset`` reduced to ``column``, checked to hold text or token ids."""
    if column not in dataset.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: "
                         f"{', '.join(dataset.column_names)}); pass text_column= "
                         f"(--text-column) naming the text column, or input_ids for token ids")
    arrow_type = dataset.data.schema.field(column).type
    if not (_is_text(arrow_type) or _is_token_ids(arrow_type)):
        raise ValueError(f"{path}: column {column!r} holds {arrow_type}, neither text (strings) "
                         f"nor token ids (lists of ints); pass text_column= (--text-column) "
                         f"naming another")
    return dataset.select_columns([column])


class DatasetDocuments(Sequence):
    """The documents of one column of a ``datasets.Dataset`` as a sequence: strings for a text
    column (a null is an empty document), lists of token ids for a pre-tokenized one; with
    ``world`` > 1, rows ``rank``, ``rank + world``, ... (each rank its own documents, as for
    text files). A slice is read in one go, so :class:`ModelActivations` reads a batch of
    documents at a time and resumes at any document without reading those before it."""

    def __init__(self, dataset, column: str, *, rank: int = 0, world: int = 1):
        self.dataset = dataset.with_format(None)  # python lists, whatever format it was saved in
        self.column = column
        self.rows = range(rank, len(dataset), world)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            rows = self.rows[index]
            if not rows:
                return []
            values = self.dataset[rows][self.column]
            return ["" if v is None else v for v in values]
        value = self.dataset[self.rows[index]][self.column]
        return "" if value is None else value

    def __repr__(self):
        return (f"DatasetDocuments({len(self)} documents, column {self.column!r}, rows "
                f"{self.rows.start}::{self.rows.step})")


def dataset_documents(paths, *, text_column: str = "text", split: Optional[str] = None,
                      rank: int = 0, world: int = 1) -> DatasetDocuments:
    """The documents of ``paths`` (see :func:`is_dataset_path`; several are concatenated in
    order) in the column ``text_column``; ``split``: the split of a ``DatasetDict`` folder
    (default ``train``); with ``world`` ranks, rank ``rank``'s every ``world``-th document.
    Loaded now (a missing column, split or file is an error here), offline."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    datasets = _import_datasets()
    with _offline(datasets):
        parts = [_column(_load(datasets, p, split), p, text_column) for p in paths]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return DatasetDocuments(dataset, text_column, rank=rank, world=world)
