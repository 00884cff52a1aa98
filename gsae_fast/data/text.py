"""Reading documents from local text files (``.txt``: one per non-empty line, ``.jsonl``: one
JSON object per line, the text, or its token ids, in a field)."""
from __future__ import annotations

import codecs
import json
import os
from typing import Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

TEXT_SUFFIXES = (".txt", ".jsonl")
# How much of each file is looked at, when the paths are checked, for a binary file.
_SNIFF_BYTES = 1 << 16


def _check_is_text(path: str) -> None:
    """ValueError naming ``path`` if its first bytes are not UTF-8 text: a NUL byte (a binary
    file, or UTF-16 text) or an invalid UTF-8 sequence. The rest is checked as it is read."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{path}: byte {nul} is NUL: a binary file (or UTF-16 text), not "
                         f"UTF-8 text; leave it out of the data, or convert it to UTF-8")
    try:  # (not final: the sample may end inside a character)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8(path, e.start, head.count(b"\n", 0, e.start) + 1,
                                   e.reason)) from None


def _not_utf8(path: str, offset: int, lineno: int, reason: str) -> str:
    return (f"{path}:{lineno}: not UTF-8 text (byte {offset}: {reason}); a binary file? "
            f"Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of the data")


def _first_bad_utf8(path: str):
    """(byte offset, line number, reason) of the first invalid UTF-8 in ``path``."""
    offset = lineno = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # a newline byte is never inside a character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start, lineno, e.reason
            offset += len(raw)
    return offset, lineno, "unknown"  # pragma: no cover - the decoder found it


def _expand_text_paths(paths) -> list:
    """The text files named by ``paths`` (files, or directories read as their sorted .txt and
    .jsonl files), checked to exist and to begin as UTF-8 text."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = []
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if not name.endswith(TEXT_SUFFIXES):
                    continue
                if not os.path.isfile(full):
                    raise ValueError(f"{full!r} is a folder (or not a regular file), not a "
                                     f"text file: folders inside {path!r} are not read; pass "
                                     f"it as a path of its own, or rename it")
                found.append(full)
            if not found:
                ext = os.path.splitext(path.rstrip(os.sep))[1]
                named = (f"{path!r} is a folder, not a {ext} file, and " if ext in TEXT_SUFFIXES
                         else f"{path!r} ")
                raise FileNotFoundError(f"{named}holds no .txt or .jsonl files: pass the text "
                                        f"files (or a folder of them)")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{path!r}: unknown text format; use .txt (one document per "
                                 f"line) or .jsonl (one JSON object per line)")
            files.append(path)
        else:
            raise FileNotFoundError(f"no such text file or directory: {path!r}")
    for path in files:
        _check_is_text(path)
    if not files:
        raise ValueError("read_texts: no paths given")
    return files


def read_texts(paths: Union[PathLike, Sequence[PathLike]], *, text_field: str = "text"
               ) -> Iterator[Union[str, list]]:
    """Documents from local text files, in order, as an iterator of strings (or token id
    lists).

    ``paths``: one path or a list; a directory stands for its ``.txt`` and ``.jsonl`` files in
    sorted order. ``.txt``: each non-empty line is a document (a file without newlines is one
    document). ``.jsonl``: each non-empty line is a JSON object whose ``text_field`` holds the
    document: a string, or a pre-tokenized document as a list of token ids (e.g.
    ``text_field="input_ids"``), yielded as that list. Empty documents are skipped. Files are
    UTF-8 (a leading byte-order mark is dropped).

    Paths are checked now (FileNotFoundError/ValueError, also for a binary file: a NUL or
    invalid UTF-8 in its first 64 KiB; a folder named like a text file inside a folder); a
    malformed line, invalid UTF-8 further on, or no document in all the files, raises
    ValueError naming the file and line while iterating. The iterator reads once; to read again
    (another pass, resuming :class:`ModelActivations`) pass ``lambda: read_texts(paths)``.
    """
    files = _expand_text_paths(paths)
    return _iter_texts(files, text_field)


def _iter_texts(files: list, text_field: str) -> Iterator[Union[str, list]]:
    n_docs = 0
    for path in files:
        try:
            for text in _read_file(path, text_field):
                n_docs += 1
                yield text
        except UnicodeDecodeError:
            raise ValueError(_not_utf8(path, *_first_bad_utf8(path))) from None
    if n_docs == 0:
        raise ValueError(f"empty dataset: no documents in {files} (blank lines and empty "
                         f"texts are skipped)")


def _read_file(path: str, text_field: str) -> Iterator[Union[str, list]]:
    # utf-8-sig: a byte-order mark (Windows editors) is not part of the first document
    with open(path, encoding="utf-8-sig") as f:
        if path.endswith(".txt"):
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(map(str, record)) if isinstance(record, dict) else "none"
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} in this line "
                                 f"(fields: {fields}); pass text_field= (--text-column) to "
                                 f"read another field")
            text = record[text_field]
            is_ids = isinstance(text, list) and all(isinstance(t, int) for t in text)
            if not isinstance(text, str) and not is_ids:
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is a "
                                 f"{type(text).__name__}, not a string or a list of token "
                                 f"ids")
            if text:
                yield text
