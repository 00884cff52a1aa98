"""Reading documents from local text files (``.txt``: one per non-empty line, ``.jsonl``: one
JSON object per line, the text in a field)."""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

TEXT_SUFFIXES = (".txt", ".jsonl")


def _expand_text_paths(paths) -> list:
    """The text files named by ``paths`` (files, or directories read as their sorted .txt and
    .jsonl files), checked to exist."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no .txt or .jsonl files in directory {path!r}")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{path!r}: unknown text format; use .txt (one document per "
                                 f"line) or .jsonl (one JSON object per line)")
            files.append(path)
        else:
            raise FileNotFoundError(f"no such text file or directory: {path!r}")
    if not files:
        raise ValueError("read_texts: no paths given")
    return files


def read_texts(paths: Union[PathLike, Sequence[PathLike]], *, text_field: str = "text"
               ) -> Iterator[str]:
    """Documents from local text files, in order, as an iterator of strings.

    ``paths``: one path or a list; a directory stands for its ``.txt`` and ``.jsonl`` files in
    sorted order. ``.txt``: each non-empty line is a document (a file without newlines is one
    document). ``.jsonl``: each non-empty line is a JSON object whose ``text_field`` holds the
    document. Empty documents are skipped.

    Paths are checked now (FileNotFoundError/ValueError); a malformed line, or no document in
    all the files, raises ValueError while iterating. The iterator reads once; to read again
    (another pass, resuming :class:`ModelActivations`) pass ``lambda: read_texts(paths)``.
    """
    files = _expand_text_paths(paths)
    return _iter_texts(files, text_field)


def _iter_texts(files: list, text_field: str) -> Iterator[str]:
    n_docs = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".txt"):
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        n_docs += 1
                        yield line
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r} in this line "
                                     f"(pass text_field= to read another field)")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {text_field!r} is a "
                                     f"{type(text).__name__}, not a string")
                if text:
                    n_docs += 1
                    yield text
    if n_docs == 0:
        raise ValueError(f"empty dataset: no documents in {files} (blank lines and empty "
                         f"texts are skipped)")

