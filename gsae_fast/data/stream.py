"""The stream of one layer's activations over a text stream (:class:`ModelActivations`),
resumable from its ``state_dict()``."""
from __future__ import annotations

import collections.abc
import itertools
from typing import Optional

import torch

from ..hooks import ByteTokenizer, model_device, resolve_hook, run_to, torch_dtype


def _vocab_size(model) -> Optional[int]:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        size = model.get_input_embeddings().num_embeddings
    return size


def _special_ids(tokenizer) -> list:
    """The ids of the tokenizer's special tokens: its BOS, EOS and PAD, and for a transformers
    tokenizer all its special tokens (as SAELens' ``exclude_special_tokens=True``)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.add(getattr(tokenizer, name))
    return sorted(ids)


def _token_ids(doc, index: int) -> list:
    """A pre-tokenized document (a list, tuple, 1-D array or tensor of ints) as a list."""
    ids = doc.tolist() if hasattr(doc, "tolist") else doc
    if isinstance(ids, (list, tuple)) and all(isinstance(t, int) for t in ids):
        return list(ids)
    raise TypeError(f"document {index} is a {type(doc).__name__}, not a str or a sequence of "
                    f"token ids (ints)")


class ModelActivations:
    """One layer's activations over a text stream, in chunks of [tokens, d_model].

    Documents are tokenised (no special tokens; ``tokenize_batch`` documents per tokenizer
    call), each preceded by a separator id (the tokenizer's BOS, else its EOS; none if it has
    neither), concatenated, and cut into contexts of ``context_len`` tokens (the last one may
    be shorter: no token is dropped). A pre-tokenized document (a sequence of token ids) is
    used as it is, without a separator: its ids should hold the BOS/EOS they need. A document
    without tokens adds nothing. With ``prepend_bos`` every context starts with BOS (the
    separator id) followed by ``context_len - 1`` tokens of the stream, unless the stream's
    next token already is BOS, as SAELens' ``prepend_bos``.

    ``batch_contexts`` contexts at a time run through the model under no_grad, the forward
    stopping after the hooked layer; each chunk is their activations flattened, with position 0
    of every context left out when ``skip_bos`` (its activations are outliers), and the
    positions holding a special token (see :func:`_special_ids`) when
    ``exclude_special_tokens``.

    ``model``: a causal LM (see :func:`load_model`); ``tokenizer``: its tokenizer, None for
    :class:`ByteTokenizer`; ``texts``: the documents (strings, or token id sequences), as a
    sequence (a list, or :class:`gsae_fast.data.hf_datasets.DatasetDocuments`: read a slice at
    a time, and a resume starts at its document without reading those before), a function
    returning a fresh iterator of them (``lambda: read_texts(paths)``), or a one-shot iterator
    (then only one pass, and resuming only into a fresh object); ``layer``: see
    :func:`resolve_hook`; ``device``: where the chunks go (default: the model's device);
    ``dtype``: their dtype.

    It is its own iterator: iterating continues from the current position to the end of the
    texts; the position then goes back to the start, so the next iteration is a new pass.
    ``state_dict()`` is the position (document index, token offset) after the last chunk
    returned; a new object over the same texts, after ``load_state_dict``, returns exactly the
    chunks that would have come.
    """

    def __init__(self, model, tokenizer, texts, layer: str, *, context_len: int = 128,
                 batch_contexts: int = 8, device=None, dtype=torch.float32,
                 skip_bos: bool = True, prepend_bos: bool = False,
                 exclude_special_tokens: bool = False, tokenize_batch: int = 64):
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
        shortest = 2 if skip_bos or prepend_bos else 1
        if not isinstance(context_len, int) or context_len < shortest:
            raise ValueError(f"context_len must be an int >= {shortest} (with skip_bos="
                             f"{skip_bos}, prepend_bos={prepend_bos}), got {context_len!r}")
        if max_positions is not None and context_len > max_positions:
            raise ValueError(f"context_len={context_len} exceeds the model's "
                             f"{max_positions} positions")
        if not isinstance(batch_contexts, int) or batch_contexts < 1:
            raise ValueError(f"batch_contexts must be a positive int, got {batch_contexts!r}")
        if not isinstance(tokenize_batch, int) or tokenize_batch < 1:
            raise ValueError(f"tokenize_batch must be a positive int, got {tokenize_batch!r}")
        self.context_len = context_len
        self.batch_contexts = batch_contexts
        self.tokenize_batch = tokenize_batch
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = torch_dtype(dtype)
        self.skip_bos = skip_bos
        bos = getattr(tokenizer, "bos_token_id", None)
        self.separator = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
        if prepend_bos and self.separator is None:
            raise ValueError("prepend_bos: the tokenizer has no BOS (nor EOS) token to start "
                             "the contexts with; leave prepend_bos off (--no-prepend-bos)")
        self.prepend_bos = prepend_bos
        self.exclude_special_tokens = exclude_special_tokens
        self._excluded = (torch.tensor(_special_ids(tokenizer), dtype=torch.long)
                          if exclude_special_tokens else None)
        self._texts = texts
        self._one_shot_opened = False
        self._d_in = None
        self._seek(0, 0)

    # -- position in the text stream

    def _seek(self, doc_index: int, token_offset: int):
        """Next token = token ``token_offset`` of document ``doc_index`` (counting its
        separator); the texts are reopened lazily."""
        self._doc_index, self._offset = doc_index, token_offset
        self._queue = collections.deque()  # the tokens of documents _doc_index, _doc_index+1...
        self._batches = None               # the documents after those, tokenize_batch at a time

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

    def _document_batches(self, start: int):
        """Lists of up to ``tokenize_batch`` documents, from document ``start`` on."""
        n = self.tokenize_batch
        if isinstance(self._texts, collections.abc.Sequence):
            if start > len(self._texts):
                raise self._past_the_end(start, len(self._texts))
            for i in range(start, len(self._texts), n):
                yield list(self._texts[i:i + n])
            return
        docs = self._open_texts()
        skipped = sum(1 for _ in itertools.islice(docs, start))  # what a saved run had read
        if skipped < start:
            raise self._past_the_end(start, skipped)
        while True:
            batch = list(itertools.islice(docs, n))
            if not batch:
                return
            yield batch

    @staticmethod
    def _past_the_end(doc_index: int, n_docs: int) -> ValueError:
        return ValueError(f"the saved position is document {doc_index} but the texts have only "
                          f"{n_docs} documents: not the texts the state was saved with")

    def _tokenize(self, docs: list, first: int) -> list:
        """The token lists of ``docs`` (documents ``first``, ``first + 1``, ...): the strings
        encoded in one tokenizer call, each after the separator; token ids as they are."""
        texts = [d for d in docs if isinstance(d, str)]
        if not texts:
            encoded = []
        elif callable(self.tokenizer):  # transformers: a fast tokenizer encodes a batch in parallel
            encoded = self.tokenizer(texts, add_special_tokens=False,
                                     return_attention_mask=False)["input_ids"]
        else:
            encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        encoded = iter(encoded)
        out = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                out.append(_token_ids(doc, first + i))
                continue
            tokens = list(next(encoded))
            if tokens and self.separator is not None:
                tokens.insert(0, self.separator)
            out.append(tokens)
        return out

    def _current_tokens(self):
        """The tokens of document ``_doc_index`` (those without tokens are passed), or None at
        the end of the texts."""
        while True:
            if not self._queue:
                if self._batches is None:
                    self._batches = self._document_batches(self._doc_index)
                docs = next(self._batches, None)
                if docs is None:
                    return None
                self._queue.extend(self._tokenize(docs, self._doc_index))
            tokens = self._queue[0]
            if self._offset and self._offset >= len(tokens):
                raise ValueError(f"the saved position (document {self._doc_index}, token "
                                 f"{self._offset}) is past the end of that document "
                                 f"({len(tokens)} tokens): the texts or the tokenizer "
                                 f"changed since the state was saved")
            if tokens:
                return tokens
            self._next_document()

    def _next_document(self):
        self._queue.popleft()
        self._doc_index, self._offset = self._doc_index + 1, 0

    def _take(self, n: int) -> list:
        """The next ``n`` tokens of the stream (fewer only at its end)."""
        out = []
        while len(out) < n:
            tokens = self._current_tokens()
            if tokens is None:
                break
            piece = tokens[self._offset:self._offset + n - len(out)]
            out.extend(piece)
            self._offset += len(piece)
            if self._offset == len(tokens):
                self._next_document()
        return out

    def _next_context(self) -> list:
        """The next context's tokens: ``context_len`` (fewer at the end of the stream, none
        after it), the first BOS when ``prepend_bos``."""
        if self.prepend_bos:
            tokens = self._current_tokens()
            if tokens is not None and tokens[self._offset] != self.separator:
                return [self.separator] + self._take(self.context_len - 1)
        return self._take(self.context_len)

    def token_contexts(self, n: int) -> torch.Tensor:
        """The next ``n`` full contexts of the stream as token ids ``[<= n, context_len]``
        (fewer at its end), e.g. to measure the model's loss with an SAE spliced in."""
        contexts = []
        while len(contexts) < n:
            tokens = self._next_context()
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
            if int(ids.min()) < 0:
                raise ValueError(f"token id {int(ids.min())} < 0 in the texts: pre-tokenized "
                                 f"documents must hold token ids only (no padding labels)")
            acts = run_to(self.model, self.module, self.layer, ids)
            if self.skip_bos:
                acts, ids = acts[:, 1:], ids[:, 1:]
            acts = acts.reshape(-1, acts.shape[-1])
            if self._excluded is not None:
                acts = acts[~torch.isin(ids.reshape(-1), self._excluded.to(device))]
            parts.append(acts)
        chunk = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._d_in = chunk.shape[1]
        return chunk.to(device=self.device, dtype=self.dtype).contiguous()

    def __iter__(self) -> "ModelActivations":
        return self

    def __next__(self) -> torch.Tensor:
        # An iterator over its own state (no generator frame): state_dict() is always the
        # position after the last chunk returned, and load_state_dict() moves it.
        while True:  # until a chunk with rows (all of a chunk's tokens may be excluded)
            at_start = self._doc_index == 0 and self._offset == 0
            contexts = []
            while len(contexts) < self.batch_contexts:
                tokens = self._next_context()
                if tokens:
                    contexts.append(tokens)
                if len(tokens) < self.context_len:  # the end of the texts
                    break
            # A 1-token last context has no activations once position 0 is skipped.
            if self.skip_bos:
                contexts = [c for c in contexts if len(c) > 1]
            if not contexts:
                if at_start:
                    raise ValueError("empty dataset: the texts hold no documents (with tokens)")
                self._seek(0, 0)  # the next iteration is a new pass
                raise StopIteration
            chunk = self._activations(contexts)
            if chunk.shape[0]:
                return chunk

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
                    prepend_bos=self.prepend_bos,
                    exclude_special_tokens=self.exclude_special_tokens,
                    tokenizer=getattr(self.tokenizer, "name_or_path", None)
                    or type(self.tokenizer).__name__, separator=self.separator, **extra)

    def state_dict(self) -> dict:
        """The position in the text stream: the next token is token ``token_offset`` of
        document ``doc_index`` (counting its separator)."""
        return {"doc_index": self._doc_index, "token_offset": self._offset,
                "context_len": self.context_len, "layer": self.layer,
                "skip_bos": self.skip_bos, "prepend_bos": self.prepend_bos,
                "exclude_special_tokens": self.exclude_special_tokens}

    def load_state_dict(self, state: dict):
        """Continue from a :meth:`state_dict` (taken with the same texts and options: its
        context_len, layer, skip_bos, prepend_bos and exclude_special_tokens are checked)."""
        for key in ("context_len", "layer", "skip_bos", "prepend_bos", "exclude_special_tokens"):
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


