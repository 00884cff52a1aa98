"""Streaming per-feature statistics for a feature dashboard, on sparse activations.

    stats = FeatureStats(d_sae, k=20)
    for acts, docs, positions in stream:            # acts: SparseActs [B, K]
        stats.update(acts, docs, positions)
    values, docs, positions = stats.top()           # [d_sae, k] each
    effects = logit_effects(sae.W_dec, model.lm_head.weight.T, top=10)

or ``collect(sae, model, token_batches, layer="resid:6")`` to run a model and fill one.

:class:`FeatureStats` keeps, per feature, memory ``O(d_sae * (k + bins))`` whatever the number
of tokens (never ``[tokens, d_sae]``):

- the top-``k`` activations with their (document, position). Order: larger activation first,
  then smaller document, then smaller position (so ties are deterministic);
- the firing count (activation ``f > 0``; a Gated SAE's open gate with ``f = 0`` does not count)
  and the number of tokens seen;
- a histogram of the firing activations over fixed log-spaced bin edges, with an underflow
  (``0 < f < edges[0]``) and an overflow (``f >= edges[-1]``) column;
- a uniform sample of ``k`` firing activations without replacement: the ``k`` smallest priorities
  ``hash(seed, feature, doc, pos)`` (ties: smaller document, then position). A priority depends
  on the token only, so the sample (like everything above) does not depend on batch boundaries,
  and runs can be merged.

Every update is torch ops on the active (feature, value, doc, pos) quadruples of the batch and on
the kept rows of the features they touch: ``O(B * L0 + touched * k)``, on any device and for
every SAE architecture and executor (they all return :class:`~gsae_fast.types.SparseActs`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from .hooks import model_device, resolve_hook, run_to
from .types import SparseActs

_EMPTY_PRI = 2 ** 63 - 1  # priority of an empty sample slot: after every real one
_POS_BITS = 24            # (doc, pos) packs into one int64 sort key: pos < 2^24, doc < 2^39


def _signed(c: int) -> int:
    return c - 2 ** 64 if c >= 2 ** 63 else c


_C1, _C2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (multiplications wrap modulo 2^64)."""
    x = x ^ _srl(x, 30)
    x = x * _C1
    x = x ^ _srl(x, 27)
    x = x * _C2
    return x ^ _srl(x, 31)


def priority(seed: int, feature: Tensor, doc: Tensor, pos: Tensor, bits: int = 62) -> Tensor:
    """The sampling priority of (feature, doc, pos): a seeded hash, int64 in ``[0, 2^bits)``."""
    h = _mix(feature.long() ^ _signed(seed & (2 ** 64 - 1)))
    h = _mix(h + doc.long())
    return _mix(h + pos.long()) & ((1 << bits) - 1)


def _lexsort(*keys: Tensor) -> Tensor:
    """The permutation sorting by ``keys`` (first key most significant): stable sorts from the
    least significant key up."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _keep_first(feat: Tensor, k: int, d_sae: int):
    """For entries sorted by feature: their rank within their feature's run, and which of them
    are among the first ``k`` of that run."""
    counts = torch.bincount(feat, minlength=d_sae)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(feat.numel(), device=feat.device) - start[feat]
    return rank, rank < k


class FeatureStats:
    """Streaming per-feature statistics (see the module docstring for what and in which order).

    ``d_sae``: number of features; ``k``: top activations and sample size kept per feature;
    ``edges``: histogram bin edges (increasing, positive), default ``logspace(-4, 4, 33)``
    (32 bins); ``seed``: the sample's hash seed; ``dtype``: of the stored activations (fp32; pass
    fp64 to keep fp64 activations exactly).

    Tensors (``[d_sae, k]`` unless said): ``top_values`` (``-inf`` in empty slots),
    ``top_docs``, ``top_positions`` (-1 in empty slots); ``sample_values``, ``sample_docs``,
    ``sample_positions``, ``sample_priority`` (``2^63 - 1`` in empty slots), in increasing
    priority; ``hist [d_sae, len(edges) + 1]``: column 0 underflow, ``j`` counts
    ``edges[j-1] <= f < edges[j]``, the last one overflow; ``tokens``: tokens seen (int).
    """

    _TENSORS = ("top_values", "top_docs", "top_positions", "sample_values", "sample_docs",
                "sample_positions", "sample_priority", "hist", "edges")

    def __init__(self, d_sae: int, k: int = 20, *, edges: Optional[Tensor] = None, seed: int = 0,
                 device=None, dtype: torch.dtype = torch.float32):
        if d_sae <= 0 or k <= 0:
            raise ValueError(f"d_sae and k must be positive, got {d_sae}, {k}")
        if edges is None:
            edges = torch.logspace(-4, 4, 33, dtype=torch.float64)
        edges = torch.as_tensor(edges).to(device=device, dtype=dtype)
        if edges.dim() != 1 or edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()) \
                or not bool(edges[0] > 0):
            raise ValueError("edges must be a 1-d, strictly increasing tensor of positive values")
        self.d_sae, self.k, self.seed, self.dtype = d_sae, k, int(seed), dtype
        self.edges = edges
        kw = dict(device=edges.device)
        self.top_values = torch.full((d_sae, k), -math.inf, dtype=dtype, **kw)
        self.top_docs = torch.full((d_sae, k), -1, dtype=torch.long, **kw)
        self.top_positions = torch.full((d_sae, k), -1, dtype=torch.long, **kw)
        self.sample_values = torch.zeros((d_sae, k), dtype=dtype, **kw)
        self.sample_docs = torch.full((d_sae, k), -1, dtype=torch.long, **kw)
        self.sample_positions = torch.full((d_sae, k), -1, dtype=torch.long, **kw)
        self.sample_priority = torch.full((d_sae, k), _EMPTY_PRI, dtype=torch.long, **kw)
        self.hist = torch.zeros((d_sae, edges.numel() + 1), dtype=torch.long, **kw)
        self.tokens = 0

    @classmethod
    def like(cls, other: "FeatureStats") -> "FeatureStats":
        return cls(other.d_sae, other.k, edges=other.edges, seed=other.seed,
                   device=other.edges.device, dtype=other.dtype)

    # -- reading

    @property
    def firing(self) -> Tensor:
        """Tokens on which each feature fired (``f > 0``), ``[d_sae]`` int64."""
        return self.hist.sum(1)

    def frequency(self) -> Tensor:
        """Firing frequency per feature (fraction of the tokens seen), ``[d_sae]`` float64."""
        return self.firing.double() / max(self.tokens, 1)

    def top(self):
        """``(values, docs, positions)`` of the top-k, ``[d_sae, k]`` each, best first."""
        return self.top_values, self.top_docs, self.top_positions

    def sample(self):
        """``(values, docs, positions)`` of the sample, ``[d_sae, k]`` each (empty: doc -1)."""
        return self.sample_values, self.sample_docs, self.sample_positions

    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors: ``O(d_sae * (k + bins))``."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in self._TENSORS)

    # -- updating

    def update(self, acts: SparseActs, doc_ids: Tensor, positions: Tensor) -> None:
        """Add a batch of tokens: ``acts`` (rows ``[..., K]``, one per token), and each token's
        document and position (``[...]``, the leading shape of ``acts``)."""
        idx = acts.idx.reshape(-1, acts.capacity)
        n = idx.shape[0]
        if acts.d_sae != self.d_sae:
            raise ValueError(f"acts have d_sae={acts.d_sae}, the stats {self.d_sae}")
        doc_ids, positions = doc_ids.reshape(-1), positions.reshape(-1)
        if doc_ids.numel() != n or positions.numel() != n:
            raise ValueError(f"{n} tokens but {doc_ids.numel()} doc_ids and "
                             f"{positions.numel()} positions")
        if bool((positions < 0).any() | (positions >= 1 << _POS_BITS).any()
                | (doc_ids < 0).any() | (doc_ids >= 1 << (63 - _POS_BITS)).any()):
            raise ValueError(f"need 0 <= positions < 2^{_POS_BITS} and 0 <= doc_ids < "
                             f"2^{63 - _POS_BITS}")
        with torch.no_grad():
            f = acts.f.detach().reshape(n, -1).to(self.dtype)
            live = acts.mask().reshape(n, -1) & (f > 0)
            rows, slots = live.nonzero(as_tuple=True)
            dev = self.edges.device
            feat = idx[rows, slots].long().to(dev)
            val = f[rows, slots].to(dev)
            doc = doc_ids.long().to(dev)[rows.to(dev)]
            pos = positions.long().to(dev)[rows.to(dev)]
            self._add(feat, val, doc, pos, self.priority(feat, doc, pos))
            self.tokens += n

    def priority(self, feature: Tensor, doc: Tensor, pos: Tensor) -> Tensor:
        """The sample's priorities: the hash keeps the bits that (feature, priority) packs into
        one int64 sort key."""
        return priority(self.seed, feature, doc, pos, 62 - self.d_sae.bit_length())

    def _add(self, feat, val, doc, pos, pri) -> None:
        cols = self.hist.shape[1]
        bins = torch.bucketize(val, self.edges, right=True)
        self.hist.view(-1).index_add_(0, feat * cols + bins, torch.ones_like(feat))
        # Only entries that can still enter a feature's table are merged: at least its k-th
        # kept value (ties are settled by the sort), at most its k-th kept priority.
        t = val >= self.top_values[feat, -1]
        self._merge_rows("top", feat[t], -val[t], doc[t], pos[t], val[t])
        s = pri <= self.sample_priority[feat, -1]
        self._merge_rows("sample", feat[s], pri[s], doc[s], pos[s], val[s])

    def _table(self, kind: str):
        """(values, docs, positions, sort key) of the top-k or the sample, ``[d_sae, k]``."""
        if kind == "top":
            return self.top_values, self.top_docs, self.top_positions, -self.top_values
        return self.sample_values, self.sample_docs, self.sample_positions, self.sample_priority

    def _merge_rows(self, kind, feat, key, doc, pos, val) -> None:
        """Merge candidates into the kept rows of the features they touch: sort the union by
        (feature, key, doc, pos), keep the first k of each feature."""
        if feat.numel() == 0:
            return
        k = self.k
        touched = (torch.bincount(feat, minlength=self.d_sae) > 0).nonzero().flatten()
        old = [t[touched].reshape(-1) for t in self._table(kind)]
        filled = old[1] >= 0  # doc -1 marks an empty slot
        feat = torch.cat([touched.repeat_interleave(k)[filled], feat])
        val, doc, pos, key = (torch.cat([o[filled], t]) for o, t in
                              zip(old, (val, doc, pos, key)))
        # Packed int64 keys: 2 sorts instead of 4 (a sort is most of the cost of an update).
        tok = (doc << _POS_BITS) | pos
        if kind == "sample":
            order = _lexsort((feat << (62 - self.d_sae.bit_length())) | key, tok)
        elif val.dtype == torch.float32:  # positive floats order as their bit patterns
            order = _lexsort((feat << 31) | (2 ** 31 - 1 - val.view(torch.int32).long()), tok)
        else:
            order = _lexsort(feat, key, tok)
        feat, key, doc, pos, val = (t[order] for t in (feat, key, doc, pos, val))
        rank, keep = _keep_first(feat, k, self.d_sae)
        at = (feat[keep], rank[keep])
        values, docs, positions, _ = self._table(kind)
        tables = [(values, val, -math.inf if kind == "top" else 0), (docs, doc, -1),
                  (positions, pos, -1)]
        if kind == "sample":
            tables.append((self.sample_priority, key, _EMPTY_PRI))
        for table, new, empty in tables:
            table[touched] = empty
            table[at] = new[keep]

    def merge(self, other: "FeatureStats") -> None:
        """Add another FeatureStats' tokens (same d_sae, k, edges, seed; disjoint tokens): the
        result equals one pass over both streams."""
        self._check_compatible(other.state_dict())
        with torch.no_grad():
            for kind in ("top", "sample"):
                values, docs, positions, key = other._table(kind)
                feat, slot = (docs >= 0).nonzero(as_tuple=True)
                self._merge_rows(kind, feat, key[feat, slot], docs[feat, slot],
                                 positions[feat, slot], values[feat, slot])
            self.hist += other.hist
            self.tokens += other.tokens

    # -- checkpoints

    def state_dict(self) -> dict:
        state = {n: getattr(self, n).clone() for n in self._TENSORS}
        state.update(d_sae=self.d_sae, k=self.k, seed=self.seed, tokens=self.tokens)
        return state

    def _check_compatible(self, state: dict) -> None:
        for key in ("d_sae", "k", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the state has {key}={state[key]!r}, these stats "
                                 f"{getattr(self, key)!r}")
        edges = state["edges"]
        if edges.shape != self.edges.shape or not torch.equal(edges.to(self.edges), self.edges):
            raise ValueError("the state has other histogram edges")

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (same d_sae, k, seed and edges, checked)."""
        self._check_compatible(state)
        for n in self._TENSORS:
            getattr(self, n).copy_(state[n])
        self.tokens = int(state["tokens"])


# ---------------------------------------------------------------------------- logit effects


class LogitEffects(NamedTuple):
    """Per feature the ``top`` most promoted and most suppressed tokens: ``[d_sae, top]`` each;
    ``promoted_values`` decreasing, ``suppressed_values`` increasing (most negative first)."""
    promoted_ids: Tensor
    promoted_values: Tensor
    suppressed_ids: Tensor
    suppressed_values: Tensor


def logit_effects(W_dec: Tensor, W_U: Tensor, *, top: int = 10, block: int = 1024,
                  norm: Optional[Callable[[Tensor], Tensor]] = None) -> LogitEffects:
    """The direct logit effects ``W_dec @ W_U`` of every feature, reduced to its ``top`` largest
    and smallest entries, ``block`` features at a time (never a ``[d_sae, vocab]`` matrix).

    ``W_dec [d_sae, d_model]``; ``W_U [d_model, vocab]`` (a transformers model:
    ``model.lm_head.weight.T``); ``norm``: applied to each block of decoder rows first (e.g. the
    model's final norm). Computed in ``W_U``'s dtype, under no_grad.
    """
    if W_dec.dim() != 2 or W_U.dim() != 2 or W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(f"W_dec [d_sae, d_model] and W_U [d_model, vocab] expected, got "
                         f"{list(W_dec.shape)} and {list(W_U.shape)}")
    if not 0 < top <= W_U.shape[1] or block <= 0:
        raise ValueError(f"need 0 < top <= vocab and block > 0, got top={top}, block={block}")
    parts = []
    with torch.no_grad():
        for s in range(0, W_dec.shape[0], block):
            rows = W_dec[s:s + block].to(device=W_U.device, dtype=W_U.dtype)
            if norm is not None:
                rows = norm(rows)
            eff = rows @ W_U
            hi = eff.topk(top, dim=1)
            lo = eff.topk(top, dim=1, largest=False)
            parts.append((hi.indices, hi.values, lo.indices, lo.values))
    return LogitEffects(*(torch.cat(p) for p in zip(*parts)))


# ---------------------------------------------------------------------------------- collect


def collect(sae, model, batches: Iterable, *, layer: str, stats: Optional[FeatureStats] = None,
            k: int = 20, first_doc: int = 0, skip_bos: bool = False, stop: bool = True,
            progress: Optional[Callable[[int, FeatureStats], None]] = None,
            **stats_options) -> FeatureStats:
    """Run ``model`` on token batches, encode ``layer``'s output with ``sae`` and add it to
    ``stats`` (a new ``FeatureStats(sae.d_sae, k, **stats_options)`` if None); returns it.

    ``batches``: token ids ``[b, ctx]``, or ``(tokens, doc_ids [b])`` pairs (ids >= 0). Without
    doc ids every context is its own document, numbered in order from ``first_doc`` (a resumed
    run passes the number of contexts already seen). Positions are
    indices within the context; with ``skip_bos`` position 0 is left out. ``stop``: end each
    forward after the hooked layer. ``progress(tokens_seen, stats)`` after each batch.
    """
    name, module = resolve_hook(model, layer)
    device = model_device(model)
    sae_param = next(sae.parameters())
    next_doc = first_doc
    for batch in batches:
        tokens, docs = batch if isinstance(batch, (tuple, list)) else (batch, None)
        tokens = tokens.to(device)
        b, ctx = tokens.shape
        if stats is None:
            stats = FeatureStats(sae.d_sae, k, device=sae_param.device, **stats_options)
        if docs is None:
            docs = torch.arange(next_doc, next_doc + b)
            next_doc += b
        x = run_to(model, module, name, tokens, stop)
        pos = torch.arange(ctx).expand(b, ctx)
        docs = docs.reshape(b, 1).expand(b, ctx)
        if skip_bos:
            x, pos, docs = x[:, 1:], pos[:, 1:], docs[:, 1:]
        with torch.no_grad():
            acts = sae.encode_sparse(x.reshape(-1, x.shape[-1]).to(sae_param))
        stats.update(acts, docs.reshape(-1), pos.reshape(-1))
        if progress is not None:
            progress(stats.tokens, stats)
    if stats is None:
        stats = FeatureStats(sae.d_sae, k, device=sae_param.device, **stats_options)
    return stats
