"""Shuffled batches from a stream of activation chunks (:class:`MixingBuffer`), resumable
bitwise exactly."""
from __future__ import annotations

from typing import Iterable

import torch

_END = object()


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

