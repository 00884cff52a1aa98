"""The stream of one layer's activations over a text stream (:class:`ModelActivations`),
resumable from its ``state_dict()``."""
from __future__ import annotations

from typing import Optional

import torch

from ..hooks import ByteTokenizer, model_device, resolve_hook, run_to, torch_dtype

_END = object()


def _vocab_size(model) -> Optional[int]:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        size = model.get_input_embeddings().num_embeddings
    return size



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
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = torch_dtype(dtype)
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
        return torch.tensor(contexts, dtype=torch.long, device=model_device(self.model))

    # -- activations

    def _activations(self, contexts: list) -> torch.Tensor:
        device = model_device(self.model)
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
            acts = run_to(self.model, self.module, self.layer, ids)
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
            ids = torch.zeros(1, 2, dtype=torch.long, device=model_device(self.model))
            self._d_in = run_to(self.model, self.module, self.layer, ids).shape[-1]
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


