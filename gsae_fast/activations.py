"""Activations from real models, to train SAEs on: text in, shuffled activation batches out.

    texts = lambda: read_texts(["data/train.jsonl"])            # a fresh iterator per pass
    model, tok = load_model("models/gpt2", device="cuda")        # local directory, no download
    acts = ModelActivations(model, tok, texts, "resid:6", context_len=128)
    for batch in MixingBuffer(acts, buffer_tokens=2**19, batch_size=4096, seed=0):
        ...                                                       # [4096, d_model] float32

    write_cache(acts, "cache/gpt2-resid6", d_in=acts.d_in, dtype="bfloat16",
                metadata=acts.metadata(dataset=["data/train.jsonl"]))
    cache = ActivationCache("cache/gpt2-resid6"); cache.check_width(768)
    for batch in cache.batches(4096, seed=0, epochs=2): ...

Pieces:

- :func:`read_texts`: documents from local ``.txt`` (one per non-empty line) and ``.jsonl``
  (one JSON object per line, text in a field) files.
- :func:`load_model`: a causal LM from a local directory, a config (random weights) or an
  already-built model; :class:`ByteTokenizer` stands in when there is no tokenizer.
- :func:`resolve_hook`, :func:`layer_output`, :func:`splice`, :func:`ce_loss`: a layer named as
  in ``model.named_modules()`` or by an alias (``resid:N``, ``mlp:N``, ``attn:N``), its output,
  replacing its output (an SAE reconstruction, zero ablation) and the LM loss.
- :class:`ModelActivations`: the stream of one layer's activations over the texts,
  resumable from ``state_dict()``.
- :class:`MixingBuffer`: shuffled batches from a stream, resumable bitwise exactly.
- :func:`write_cache` / :class:`ActivationCache`: activations on disk as ``.npy`` shards,
  read memory-mapped in shuffled, resumable batches.

transformers is imported only by the functions that need it.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Optional[Callable[[int, Optional[int]], None]]

TEXT_SUFFIXES = (".txt", ".jsonl")

# ----------------------------------------------------------------------------------- text input


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


# ------------------------------------------------------------------------ models and tokenizers


class ByteTokenizer:
    """Stand-in tokenizer for models without one (random-weight models, tests, no download):
    a text's token ids are its UTF-8 bytes (0..255). Id 256 separates documents when the
    vocabulary has room for it (``vocab_size > 256``), else documents are not separated."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"ByteTokenizer needs a vocabulary of at least 256 ids (one per "
                             f"byte); the model has {vocab_size}: pass its real tokenizer")
        self.vocab_size = vocab_size
        self.bos_token_id = self.eos_token_id = 256 if vocab_size > 256 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# Any of these in a model directory means it has a tokenizer to load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")


def _torch_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name such as 'bfloat16'")


def load_model(model, *, device=None, dtype=None):
    """A causal LM in eval mode, and its tokenizer (or None): ``(model, tokenizer)``.

    ``model`` is one of:

    - a local model directory (``save_pretrained`` layout): loaded with
      ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` (nothing is
      downloaded), plus ``AutoTokenizer`` when the directory has tokenizer files;
    - a ``transformers.PretrainedConfig``: a model with random weights (``from_config``;
      seed with ``torch.manual_seed`` first for reproducible weights); tokenizer None;
    - an already-built model (``PreTrainedModel`` or any ``nn.Module``): used as is
      (switched to eval mode in place); tokenizer None.

    ``device``: where to put the model; None leaves a given model where it is and puts a
    loaded or new one on the CPU. ``dtype``: a torch dtype or its name; None keeps the weights'.
    Without a tokenizer, :class:`ModelActivations` uses :class:`ByteTokenizer`.
    """
    import transformers

    dtype = _torch_dtype(dtype)
    tokenizer = None
    new = True
    if isinstance(model, transformers.PretrainedConfig):
        model = transformers.AutoModelForCausalLM.from_config(model)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"no model directory {path!r}: load_model reads local directories only (no "
                f"downloads); save one with model.save_pretrained(path), or pass a config")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json: not a transformers model "
                                    f"directory (save one with model.save_pretrained(path))")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, **kwargs)
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    elif isinstance(model, torch.nn.Module):
        new = False
    else:
        raise TypeError(f"load_model: expected a model directory, a PretrainedConfig or a "
                        f"model, got {type(model).__name__}")
    if device is None and new:
        device = "cpu"
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _vocab_size(model) -> Optional[int]:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        size = model.get_input_embeddings().num_embeddings
    return size


# ------------------------------------------------------------------------------------- hooking

# Where each model family keeps its blocks (a ModuleList), and what it calls the attention and
# the MLP inside a block: the aliases resid:N, attn:N, mlp:N are read off this table.
BLOCK_LAYOUTS = (
    ("transformer.h", "attn", "mlp"),         # GPT-2, GPT-J, GPT-Neo
    ("model.layers", "self_attn", "mlp"),     # Llama, Mistral, Qwen, Gemma
    ("gpt_neox.layers", "attention", "mlp"),  # Pythia, GPT-NeoX
)
ALIASES = ("resid", "attn", "mlp")


def _find_blocks(modules: dict):
    """(prefix, attention name, MLP name, number of blocks) of the model's block list, or None.
    A base model without the LM head (GPT2Model) has the same names without the first part."""
    for prefix, attn, mlp in BLOCK_LAYOUTS:
        for candidate in (prefix, prefix.split(".", 1)[1]):
            blocks = modules.get(candidate)
            if isinstance(blocks, torch.nn.ModuleList):
                return candidate, attn, mlp, len(blocks)
    return None


def _valid_names_hint(modules: dict) -> str:
    found = _find_blocks(modules)
    if found is not None:
        prefix, attn, mlp, n = found
        names = [f"{prefix}.0", f"{prefix}.0.{attn}", f"{prefix}.0.{mlp}", f"{prefix}.{n - 1}"]
        names += [f"resid:0..{n - 1}", f"attn:0..{n - 1}", f"mlp:0..{n - 1}"]
    else:
        names = [name for name in modules if name][:10]
    return ", ".join(names)


def resolve_hook(model: torch.nn.Module, layer: str):
    """The module that ``layer`` names in ``model``: ``(name, module)``.

    ``layer`` is a name from ``model.named_modules()`` (GPT-2: ``"transformer.h.1"`` = the
    residual stream after block 1, ``"transformer.h.1.mlp"``, ``"transformer.h.1.attn"``;
    Llama: ``"model.layers.0"``, ``"model.layers.0.mlp"``, ...), or an alias ``resid:N``
    (block N's output), ``attn:N`` or ``mlp:N`` (its attention or MLP output, before they are
    added to the residual stream) for the layouts of ``BLOCK_LAYOUTS``. Unknown names raise
    ValueError listing valid ones.
    """
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty module name or alias, got {layer!r}")
    modules = dict(model.named_modules())
    name = layer
    kind, colon, index = layer.partition(":")
    if colon:
        if kind not in ALIASES:
            raise ValueError(f"unknown layer alias {layer!r}: use resid:N, attn:N or mlp:N, or "
                             f"a module name such as {_valid_names_hint(modules)}")
        found = _find_blocks(modules)
        if found is None:
            raise ValueError(f"layer aliases know GPT-2 style (transformer.h) and Llama style "
                             f"(model.layers) models, not {type(model).__name__}: name the "
                             f"module instead, e.g. {_valid_names_hint(modules)}")
        prefix, attn, mlp, n_blocks = found
        try:
            block = int(index)
        except ValueError:
            raise ValueError(f"layer alias {layer!r}: N must be a block number") from None
        if not 0 <= block < n_blocks:
            raise ValueError(f"layer alias {layer!r}: the model has blocks 0..{n_blocks - 1}")
        name = f"{prefix}.{block}" + {"resid": "", "attn": f".{attn}", "mlp": f".{mlp}"}[kind]
    if name not in modules or not name:
        raise ValueError(f"no module {name!r} in {type(model).__name__}; valid names include "
                         f"{_valid_names_hint(modules)} (see model.named_modules())")
    return name, modules[name]


def _first(output):
    """The activation in a module's output: the output, or its first element if a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _forward_kwargs(model) -> dict:
    # No KV cache: each context is run once, a cache would only cost memory.
    return {"use_cache": False} if hasattr(model, "config") else {}


class _StopForward(BaseException):
    """Raised by the capture hook to end the forward once the hooked layer has run. A
    BaseException, so that no ``except Exception`` in model code can swallow it."""


def _run_to(model, module, name: str, tokens: torch.Tensor, stop: bool = True) -> torch.Tensor:
    """``module``'s output [batch, ctx, d] for ``tokens``, under no_grad; with ``stop`` the
    forward ends right after it (the layers above and the LM head never run)."""
    captured = []

    def hook(mod, args, output):
        captured.append(_first(output))
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=tokens, **_forward_kwargs(model))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {name!r} did not run in the model's forward (a container "
                         f"such as a ModuleList?): hook a block, its attention or its MLP")
    out = captured[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != tokens.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"layer {name!r} outputs {shape}, not [batch, ctx, d] activations for "
                         f"tokens {tuple(tokens.shape)}: hook a block, its attention or its MLP")
    return out


def layer_output(model, tokens: torch.Tensor, layer: str, *, stop: bool = True) -> torch.Tensor:
    """The output of ``layer`` (a name or alias, see :func:`resolve_hook`) for ``tokens``
    [batch, ctx]: a [batch, ctx, d] tensor (a tuple output's first element), computed under
    no_grad. With ``stop`` (default) the forward stops after that layer."""
    name, module = resolve_hook(model, layer)
    return _run_to(model, module, name, tokens.to(_model_device(model)), stop)


@contextmanager
def splice(model, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the ``with`` block, ``layer``'s output is replaced by ``fn(output)``.

    A tuple output keeps its structure (only its first element is replaced). ``fn`` must
    return the shape it is given; its result is cast to the output's dtype (an fp32 SAE spliced
    into a bf16 model). Examples: ``splice(model, "resid:3", lambda x: sae(x))`` (reconstruction),
    ``splice(model, "mlp:3", torch.zeros_like)`` (zero ablation). Yields the module's name.
    """
    name, module = resolve_hook(model, layer)

    def hook(mod, args, output):
        act = _first(output)
        new = fn(act)
        if not isinstance(new, torch.Tensor) or new.shape != act.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"splice({name!r}): fn returned {got}, expected a tensor of "
                             f"shape {tuple(act.shape)}")
        new = new.to(act.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield name
    finally:
        handle.remove()


def ce_loss(model, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens`` [batch, ctx], computed
    under no_grad in fp32. Combine with :func:`splice` for the loss with a layer replaced."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"ce_loss needs tokens of shape [batch, ctx >= 2], got "
                         f"{tuple(tokens.shape)}")
    tokens = tokens.to(_model_device(model))
    with torch.no_grad():
        logits = model(input_ids=tokens, **_forward_kwargs(model)).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1)).item()


# --------------------------------------------------------------------- activations from a model

_END = object()


class ModelActivations:
    """One layer's activations over a text stream, in chunks of [tokens, d_model].

    Documents are tokenised (no special tokens), each preceded by a separator id (the
    tokenizer's BOS, else its EOS; none if it has neither), concatenated, and cut into contexts
    of ``context_len`` tokens (the last one may be shorter: no token is dropped).
    ``batch_contexts`` contexts at a time run through the model under no_grad, the forward
    stopping after the hooked layer; each chunk is their activations flattened, with position 0
    of every context left out when ``skip_bos`` (its activations are outliers).

    ``model``: a causal LM (see :func:`load_model`); ``tokenizer``: its tokenizer, None for
    :class:`ByteTokenizer`; ``texts``: a list of documents, a function returning a fresh
    iterator of them (``lambda: read_texts(paths)``), or a one-shot iterator (then only one
    pass, and resuming only into a fresh object); ``layer``: see :func:`resolve_hook`;
    ``device``: where the chunks go (default: the model's device); ``dtype``: their dtype.

    It is its own iterator: iterating continues from the current position to the end of the
    texts; the position then goes back to the start, so the next iteration is a new pass.
    ``state_dict()`` is the position (document index, token offset) after the last chunk
    returned; a new object over the same texts, after ``load_state_dict``, returns exactly the
    chunks that would have come.
    """

    def __init__(self, model, tokenizer, texts, layer: str, *, context_len: int = 128,
                 batch_contexts: int = 8, device=None, dtype=torch.float32,
                 skip_bos: bool = True):
        self.model = model
        vocab_size = _vocab_size(model)
        if tokenizer is None:
            if vocab_size is None:
                raise ValueError("no tokenizer given and the model has no config.vocab_size "
                                 "for the byte-level fallback: pass a tokenizer")
            tokenizer = ByteTokenizer(vocab_size)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.layer, self.module = resolve_hook(model, layer)
        max_positions = next((getattr(model.config, k) for k in
                              ("n_positions", "max_position_embeddings")
                              if hasattr(getattr(model, "config", None), k)), None)
        if not isinstance(context_len, int) or context_len < (2 if skip_bos else 1):
            raise ValueError(f"context_len must be an int >= {2 if skip_bos else 1} (with "
                             f"skip_bos={skip_bos}), got {context_len!r}")
        if max_positions is not None and context_len > max_positions:
            raise ValueError(f"context_len={context_len} exceeds the model's "
                             f"{max_positions} positions")
        if not isinstance(batch_contexts, int) or batch_contexts < 1:
            raise ValueError(f"batch_contexts must be a positive int, got {batch_contexts!r}")
        self.context_len = context_len
        self.batch_contexts = batch_contexts
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.dtype = _torch_dtype(dtype)
        self.skip_bos = skip_bos
        bos = getattr(tokenizer, "bos_token_id", None)
        self.separator = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
        self._texts = texts
        self._one_shot_opened = False
        self._d_in = None
        self._seek(0, 0)

    # -- position in the text stream

    def _seek(self, doc_index: int, token_offset: int):
        """Next token = token ``token_offset`` of document ``doc_index`` (counting its
        separator); the texts are reopened lazily."""
        self._doc_index, self._offset = doc_index, token_offset
        self._doc_tokens = None     # the tokens of document _doc_index, once read
        self._docs = None           # iterator over the documents
        self._docs_read = 0         # documents taken from _docs

    def _open_texts(self):
        if callable(self._texts):
            return iter(self._texts())
        docs = iter(self._texts)
        if docs is self._texts:     # a one-shot iterator: it can be started only once
            if self._one_shot_opened:
                raise ValueError("texts is a one-shot iterator that was already read; to read "
                                 "the texts again (a new pass, or a resume) pass a list of "
                                 "documents or a function returning a fresh iterator, e.g. "
                                 "lambda: read_texts(paths)")
            self._one_shot_opened = True
        return docs

    def _next_document(self):
        """Document ``_doc_index`` as a string, or None at the end of the texts."""
        if self._docs is None:
            self._docs = self._open_texts()
            self._docs_read = 0
        while self._docs_read < self._doc_index:  # skip what a saved run had already read
            if next(self._docs, _END) is _END:
                raise ValueError(f"the saved position is document {self._doc_index} but the "
                                 f"texts have only {self._docs_read} documents: not the texts "
                                 f"the state was saved with")
            self._docs_read += 1
        doc = next(self._docs, _END)
        if doc is _END:
            return None
        self._docs_read += 1
        if not isinstance(doc, str):
            raise TypeError(f"document {self._doc_index} is a {type(doc).__name__}, not a str")
        return doc

    def _take(self, n: int) -> list:
        """The next ``n`` tokens of the stream (fewer only at its end)."""
        out = []
        while len(out) < n:
            if self._doc_tokens is None:
                doc = self._next_document()
                if doc is None:
                    break
                tokens = [] if self.separator is None else [self.separator]
                tokens += list(self.tokenizer.encode(doc, add_special_tokens=False))
                if self._offset >= len(tokens):
                    raise ValueError(f"the saved position (document {self._doc_index}, token "
                                     f"{self._offset}) is past the end of that document "
                                     f"({len(tokens)} tokens): the texts or the tokenizer "
                                     f"changed since the state was saved")
                self._doc_tokens = tokens
            piece = self._doc_tokens[self._offset:self._offset + n - len(out)]
            out.extend(piece)
            self._offset += len(piece)
            if self._offset == len(self._doc_tokens):
                self._doc_index, self._offset, self._doc_tokens = self._doc_index + 1, 0, None
        return out

    def token_contexts(self, n: int) -> torch.Tensor:
        """The next ``n`` full contexts of the stream as token ids ``[<= n, context_len]``
        (fewer at its end), e.g. to measure the model's loss with an SAE spliced in."""
        contexts = []
        while len(contexts) < n:
            tokens = self._take(self.context_len)
            if len(tokens) < self.context_len:
                break
            contexts.append(tokens)
        if not contexts:
            raise ValueError(f"the texts hold no full context of {self.context_len} tokens")
        return torch.tensor(contexts, dtype=torch.long, device=_model_device(self.model))

    # -- activations

    def _activations(self, contexts: list) -> torch.Tensor:
        device = _model_device(self.model)
        parts = []
        # All contexts are full but maybe the last: at most two forwards, in stream order.
        for group in ([c for c in contexts if len(c) == self.context_len],
                      [c for c in contexts if len(c) < self.context_len]):
            if not group:
                continue
            ids = torch.tensor(group, dtype=torch.long, device=device)
            if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
                raise ValueError(f"token id {int(ids.max())} >= the model's vocabulary size "
                                 f"{self.vocab_size}: the tokenizer does not match the model")
            acts = _run_to(self.model, self.module, self.layer, ids)
            if self.skip_bos:
                acts = acts[:, 1:]
            parts.append(acts.reshape(-1, acts.shape[-1]))
        chunk = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._d_in = chunk.shape[1]
        return chunk.to(device=self.device, dtype=self.dtype).contiguous()

    def __iter__(self) -> "ModelActivations":
        return self

    def __next__(self) -> torch.Tensor:
        # An iterator over its own state (no generator frame): state_dict() is always the
        # position after the last chunk returned, and load_state_dict() moves it.
        contexts = []
        while len(contexts) < self.batch_contexts:
            tokens = self._take(self.context_len)
            if tokens:
                contexts.append(tokens)
            if len(tokens) < self.context_len:  # the end of the texts
                break
        # A 1-token last context has no activations once position 0 is skipped.
        if self.skip_bos:
            contexts = [c for c in contexts if len(c) > 1]
        if not contexts:
            if self._doc_index == 0 and self._offset == 0:
                raise ValueError("empty dataset: the texts hold no documents")
            self._seek(0, 0)  # the next iteration is a new pass
            raise StopIteration
        return self._activations(contexts)

    @property
    def d_in(self) -> int:
        """The width of the activations (runs the model on two tokens the first time)."""
        if self._d_in is None:
            ids = torch.zeros(1, 2, dtype=torch.long, device=_model_device(self.model))
            self._d_in = _run_to(self.model, self.module, self.layer, ids).shape[-1]
        return self._d_in

    def metadata(self, **extra) -> dict:
        """A description for :func:`write_cache`'s ``metadata`` (model, layer, context length,
        ...), plus ``extra`` (e.g. ``dataset=[paths]``)."""
        config = getattr(self.model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(self.model).__name__
        return dict(model=name, model_class=type(self.model).__name__, layer=self.layer,
                    context_len=self.context_len, skip_bos=self.skip_bos,
                    tokenizer=getattr(self.tokenizer, "name_or_path", None)
                    or type(self.tokenizer).__name__, separator=self.separator, **extra)

    def state_dict(self) -> dict:
        """The position in the text stream: the next token is token ``token_offset`` of
        document ``doc_index`` (counting its separator)."""
        return {"doc_index": self._doc_index, "token_offset": self._offset,
                "context_len": self.context_len, "layer": self.layer,
                "skip_bos": self.skip_bos}

    def load_state_dict(self, state: dict):
        """Continue from a :meth:`state_dict` (taken with the same texts, context_len, layer
        and skip_bos, which are checked)."""
        for key in ("context_len", "layer", "skip_bos"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the state was saved with {key}={state[key]!r}, this stream "
                                 f"has {key}={getattr(self, key)!r}: resuming would not be exact")
        doc_index, offset = int(state["doc_index"]), int(state["token_offset"])
        if doc_index < 0 or offset < 0:
            raise ValueError(f"invalid position {doc_index}, {offset}")
        self._seek(doc_index, offset)

    def rewind(self):
        """Back to the start of the texts."""
        self._seek(0, 0)


# ------------------------------------------------------------------------------ mixing buffer


class MixingBuffer:
    """Shuffled batches of ``batch_size`` rows from a stream of [n, d] chunks.

    The buffer holds ``buffer_tokens`` rows: filled from ``source``, shuffled, served from
    until half empty, then refilled (the old half mixes with the new rows) and shuffled again;
    at the end of the source it drains, the last batch maybe smaller. Every row of the source
    comes out exactly once per pass. The shuffles come from the buffer's own
    ``torch.Generator`` seeded with ``seed``.

    The buffer is its own iterator (``next(buffer)`` works): iterating continues from the
    current state; after a pass ends (StopIteration) the next iteration is a new pass over
    ``iter(source)``, or with ``repeat=True`` passes follow one another without a stop (an
    endless stream for a training loop; the source must be re-iterable). ``state_dict()``
    holds the buffer contents, the generator state and the source's position (its
    ``state_dict()``, or for a source without one, such as a list, the number of chunks read),
    so that after ``load_state_dict`` the batches are bitwise those of an uninterrupted run.
    """

    def __init__(self, source: Iterable[torch.Tensor], *, buffer_tokens: int, batch_size: int,
                 seed: int = 0, repeat: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(buffer_tokens, int) or buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens must be at least 2 * batch_size = {2 * batch_size} "
                             f"(it is refilled when half empty), got {buffer_tokens!r}")
        self.source = source
        self.buffer_tokens = buffer_tokens
        self.batch_size = batch_size
        self.repeat = repeat
        self.generator = torch.Generator().manual_seed(seed)
        self._stateful = hasattr(source, "state_dict") and hasattr(source, "load_state_dict")
        self._buffer = None         # [buffer_tokens, d], allocated from the first chunk
        self._reset_pass()

    def _reset_pass(self):
        self._fill = 0              # rows of _buffer in use
        self._pending = None        # what did not fit of the last chunk read
        self._source_done = False
        self._chunks_read = 0       # this pass
        self._source_iter = None
        self._rows_served = 0       # this pass

    def _next_chunk(self):
        if self._source_iter is None:
            self._source_iter = iter(self.source)
            if not self._stateful:  # skip what a saved run had already read
                for i in range(self._chunks_read):
                    if next(self._source_iter, _END) is _END:
                        raise ValueError(f"the saved state had read {self._chunks_read} chunks "
                                         f"but the source has only {i}")
        chunk = next(self._source_iter, _END)
        if chunk is _END:
            return None
        self._chunks_read += 1
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2:
            got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"MixingBuffer: the source must yield [n, d] tensors, got {got}")
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_tokens, chunk.shape[1], dtype=chunk.dtype,
                                       device=chunk.device)
        elif chunk.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"MixingBuffer: a chunk of width {chunk.shape[1]} after chunks of "
                             f"width {self._buffer.shape[1]}")
        return chunk

    def _refill(self):
        while self._fill < self.buffer_tokens:
            if self._pending is None:
                chunk = self._next_chunk()
                if chunk is None:
                    self._source_done = True
                    break
                self._pending = chunk
            n = min(self.buffer_tokens - self._fill, self._pending.shape[0])
            self._buffer[self._fill:self._fill + n] = self._pending[:n]
            self._fill += n
            self._pending = self._pending[n:] if n < self._pending.shape[0] else None
        if self._fill:
            perm = torch.randperm(self._fill, generator=self.generator)
            self._buffer[:self._fill] = self._buffer[:self._fill][perm.to(self._buffer.device)]

    def __iter__(self) -> "MixingBuffer":
        return self

    def __next__(self) -> torch.Tensor:
        while True:
            if not self._source_done and self._fill <= self.buffer_tokens // 2:
                self._refill()
                continue
            if self._fill:
                break
            if self._rows_served == 0:
                raise ValueError("MixingBuffer: the source yielded no activations (a one-shot "
                                 "iterator can be read only once)")
            self._reset_pass()
            if not self.repeat:
                raise StopIteration
        n = min(self.batch_size, self._fill)
        # A copy: the buffer rows are overwritten by the next refill.
        batch = self._buffer[self._fill - n:self._fill].clone()
        self._fill -= n
        self._rows_served += n
        return batch

    def state_dict(self) -> dict:
        """Everything needed to continue bitwise exactly (tensors copied to the CPU)."""
        buf = self._buffer
        return {
            "buffer_tokens": self.buffer_tokens, "batch_size": self.batch_size,
            "buffer": None if buf is None else buf[:self._fill].detach().to("cpu", copy=True),
            "width": None if buf is None else buf.shape[1],
            "dtype": None if buf is None else str(buf.dtype).replace("torch.", ""),
            "device": None if buf is None else str(buf.device),
            "fill": self._fill,
            "pending": None if self._pending is None else
            self._pending.detach().to("cpu", copy=True),
            "generator": self.generator.get_state(),
            "source_done": self._source_done, "chunks_read": self._chunks_read,
            "rows_served": self._rows_served,
            "source": self.source.state_dict() if self._stateful else None,
        }

    def load_state_dict(self, state: dict):
        """Continue from a :meth:`state_dict` (same buffer_tokens and batch_size, checked)."""
        for key in ("buffer_tokens", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the state was saved with {key}={state[key]}, this buffer has "
                                 f"{getattr(self, key)}: resuming would not be exact")
        self._reset_pass()
        if state["buffer"] is None:
            self._buffer = None
        else:
            self._buffer = torch.empty(self.buffer_tokens, state["width"],
                                       dtype=getattr(torch, state["dtype"]),
                                       device=state["device"])
            self._fill = state["fill"]
            self._buffer[:self._fill] = state["buffer"]
        if state["pending"] is not None:
            self._pending = state["pending"].to(self._buffer.device)
        self.generator.set_state(state["generator"])
        self._source_done = state["source_done"]
        self._chunks_read = state["chunks_read"]
        self._rows_served = state["rows_served"]
        if self._stateful:
            self.source.load_state_dict(state["source"])


# ----------------------------------------------------------------------------------- disk cache

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
    from . import __version__
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
        return self._to_torch(out, _torch_dtype(dtype))

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
