"""A feature dashboard: a static site of every feature of an SAE, opened from disk (no server,
no network), and pages of features ranked by an effect that link into it.

    gsae-fast features SAE_DIR --model M --data texts.txt --layer resid:6 --out dash/
    xdg-open dash/index.html

    summary = build_dashboard(sae, model, tokenizer, ["texts.txt"], "resid:6", "dash/")
    write_effects_page(node_effects_result, "dash/", "dash/effects.html")

How it is made (:func:`build_dashboard`):

1. the texts are cut into contexts as the other commands cut them
   (:func:`gsae_fast.data.sources.text_activations`), the contexts' token ids appended to
   ``OUT/contexts.i32`` (int32, ``context_len`` per context), and the layer's activations encoded
   and reduced by :class:`gsae_fast.features.FeatureStats` (per feature: top-k, a uniform sample
   of firing tokens, a histogram; position 0 of every context left out, as in training). The
   reduction's state is saved to ``OUT/features_state.pt`` every minute and at the end, so a
   killed run continues with ``resume=True`` (``--resume``), and a finished one takes more tokens;
2. the contexts the top-k and the sample point into are run again, once each, to read each
   feature's activation on the tokens around the activating one (``WINDOW``);
3. each feature's direct logit effects (:func:`gsae_fast.features.logit_effects`, through the
   unembedding, optionally through the model's final norm);
4. the site is written (:func:`write_site`).

The site: ``index.html`` with ``dashboard.js`` and ``dashboard.css`` (copied from
``gsae_fast/dashboard_assets``), and its data in ``data/``: ``index.js`` (one row per feature:
density, firing count, max activation, the tokens it fires on most), ``vocab.js`` (the strings
of the token ids used) and ``shard_NNNNN.js`` (``SHARD_SIZE`` features each: contexts, sample,
histogram, logit tables; a context's activations in thousandths of the feature's max, integers
being the shortest JSON), loaded when a feature of that shard is viewed. Browsers refuse
``fetch()`` of ``file://`` URLs, so every data file is a script calling a global function
(``gsaeDash.index({...})``, ``gsaeDash.shard(n, [...])``) with the JSON as its argument.

The Neuronpedia export (``OUT/neuronpedia/batch-N.json``, ``SHARD_SIZE`` features each) has the
layout SAEDashboard's Neuronpedia runner writes: ``{"model_id", "layer", "sae_set", "features":
[...]}``, each feature with ``feature_index``, ``pos_str`` / ``pos_values`` and ``neg_str`` /
``neg_values`` (the logit tables), ``frac_nonzero`` (the density), ``freq_hist_data_bar_values``
/ ``freq_hist_data_bar_heights`` (here: the lower edge of each histogram bin, 0 for the
underflow bin, and its count), ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset``, and
``activations``: ``{"bin_min", "bin_max", "bin_contains", "tokens", "values"}``, the top
activations as SAEDashboard marks them (``bin_min = -1``, ``bin_max`` = the max activation,
``bin_contains = -1``), then the uniform sample as one interval over all firing activations
(``bin_min = 0``, ``bin_max`` = the max, ``bin_contains = 1``). Differences: ``tokens`` /
``values`` are the window around the activating token, not the whole context (position 0 has
value 0: it is not encoded); the fields this package does not compute (neuron alignment,
correlations, the logit histogram, decoder weight distribution) are empty lists.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
import time
from collections import Counter
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import files
from .features import FeatureStats, LogitEffects, collect, logit_effects
from .hooks import model_device, resolve_hook, run_to
from .progress import Progress

WINDOW = (12, 4)     # tokens shown before and after the activating one
SHARD_SIZE = 128     # features per data shard (and per Neuronpedia batch file)
LOGIT_ROWS = 10      # rows of each logit table
SAVE_SECONDS = 60.0  # how often the reduction's state is saved
STATE_FILE = "features_state.pt"
CONTEXTS_FILE = "contexts.i32"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_assets")
ASSET_FILES = ("index.html", "dashboard.js", "dashboard.css")
# The settings a resumed run must share with the saved state.
RESUME_KEYS = ("sae", "model", "data", "layer", "context_len", "d_sae", "k")


# ------------------------------------------------------------------------------ model helpers

# Where each model family keeps its final norm (the module before the unembedding).
FINAL_NORMS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm")


def final_norm(model):
    """The model's final norm module (GPT-2, Llama, NeoX layouts), or None."""
    modules = dict(model.named_modules())
    return next((modules[n] for n in FINAL_NORMS if n in modules), None)


def unembedding(model) -> Optional[Tensor]:
    """The unembedding ``W_U [d_model, vocab]`` (the LM head's weight, transposed), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is None else head.weight.detach().T


def decoder_directions(sae) -> Tensor:
    """What ``decode`` adds per unit of each feature, ``[d_sae, d_in]``."""
    from .interp.splice import decoder_rows
    with torch.no_grad():
        return decoder_rows(sae, torch.arange(sae.d_sae, device=sae.W_dec.device))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


# ---------------------------------------------------------------------------- the reduction

def _next_contexts(source, n: int, first: bool, vocab_size: Optional[int]):
    """The next ``n`` (or fewer) full contexts of ``source``, or None at the end of the texts."""
    try:
        tokens = source.token_contexts(n)
    except ValueError:
        if first:  # no full context at all: the message says so
            raise
        return None  # token_contexts raises once the texts hold no further full context
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= the model's vocabulary size "
                         f"{vocab_size}: the tokenizer does not match the model")
    return tokens


def _settings(sae, names: Mapping, data, layer, context_len, k) -> dict:
    return dict(sae=names.get("sae"), model=names.get("model"),
                data=[os.path.abspath(p) for p in data], layer=layer, context_len=context_len,
                d_sae=sae.d_sae, k=k)


def _resume_state(path: str, settings: dict, device):
    state = torch.load(path, map_location=device, weights_only=False)
    for key in RESUME_KEYS:
        if state["settings"].get(key) != settings[key]:
            raise ValueError(f"{path} was made with {key}={state['settings'].get(key)!r}, this "
                             f"run has {settings[key]!r}: use another --out, or the same "
                             f"settings to continue")
    return state


def reduce_contexts(sae, model, source, out: str, *, tokens: int, k: int, settings: dict,
                    resume: bool = False, quiet: bool = False) -> tuple:
    """Run step 1 of :func:`build_dashboard`: ``(stats, contexts read, texts ended)``."""
    state_path = os.path.join(out, STATE_FILE)
    contexts_path = os.path.join(out, CONTEXTS_FILE)
    device = next(sae.parameters()).device
    stats = FeatureStats(sae.d_sae, k, device=device)
    n_ctx, ended = 0, False
    if os.path.exists(state_path):
        if not resume:
            raise ValueError(f"{out} already holds a dashboard's reduction ({STATE_FILE}): pass "
                             f"--resume to continue it (or to add --tokens), or use another "
                             f"--out")
        state = _resume_state(state_path, settings, device)
        stats.load_state_dict(state["stats"])
        source.load_state_dict(state["stream"])
        n_ctx, ended = state["contexts"], state["ended"]
    ctx = source.context_len
    if os.path.exists(contexts_path) and os.path.getsize(contexts_path) < n_ctx * ctx * 4:
        raise ValueError(f"{contexts_path} holds fewer contexts than {STATE_FILE} counts: the "
                         f"folder was changed; start again in a new --out")

    def save():
        f.flush()
        os.fsync(f.fileno())
        files.save_torch(dict(stats=stats.state_dict(), stream=source.state_dict(),
                              contexts=n_ctx, ended=ended, settings=settings), state_path)

    want = max(1, -(-tokens // ctx))
    bar = Progress(want * ctx, "features", enabled=not quiet, unit="tokens")
    vocab = source.vocab_size
    with open(contexts_path, "ab") as f:
        f.truncate(n_ctx * ctx * 4)  # the contexts written after the last saved state go
        last_save = time.monotonic()
        first = n_ctx == 0
        while n_ctx < want and not ended:
            batch = _next_contexts(source, min(source.batch_contexts, want - n_ctx), first, vocab)
            first = False
            if batch is None:
                ended = True
                break
            f.write(batch.to(torch.int32).cpu().numpy().tobytes())
            collect(sae, model, [batch], layer=settings["layer"], stats=stats, first_doc=n_ctx,
                    skip_bos=True)
            n_ctx += batch.shape[0]
            bar(n_ctx * ctx)
            if time.monotonic() - last_save > SAVE_SECONDS:
                save()
                last_save = time.monotonic()
        save()
    bar.finish(n_ctx * ctx)
    return stats, n_ctx, ended


def activation_windows(sae, model, layer: str, contexts, feats: Tensor, docs: Tensor,
                       positions: Tensor, *, window: tuple = WINDOW, batch_contexts: int = 8,
                       progress: Optional[Callable[[int, int], None]] = None):
    """Feature ``feats[i]``'s activations on the tokens around position ``positions[i]`` of
    context ``docs[i]`` (``window = (before, after)`` tokens), one forward per context needed.

    ``contexts``: token ids ``[n_contexts, ctx]`` (an array or a memmap). Returns ``(ids,
    values)``, ``[R, before + after + 1]`` each: token ids (-1 outside the context) and
    activations (0 where the feature is off; NaN outside the context and at position 0, which is
    not encoded, as in training)."""
    before, after = window
    ctx = contexts.shape[1]
    p = positions[:, None] + torch.arange(-before, after + 1)
    inside = (p >= 0) & (p < ctx)
    ids = torch.from_numpy(np.asarray(contexts[docs.numpy()[:, None], p.clamp(0, ctx - 1)
                                               .numpy()]).astype(np.int64))
    ids[~inside] = -1
    values = torch.full(p.shape, math.nan)
    name, module = resolve_hook(model, layer)
    device, param = model_device(model), next(sae.parameters())
    order = torch.argsort(docs, stable=True)
    sorted_docs = docs[order]
    needed = torch.unique(docs)
    measured = inside & (p >= 1)
    for s in range(0, needed.numel(), batch_contexts):
        chunk = needed[s:s + batch_contexts]
        tokens = torch.from_numpy(np.asarray(contexts[chunk.numpy()]).astype(np.int64))
        x = run_to(model, module, name, tokens.to(device))[:, 1:]
        with torch.no_grad():
            acts = sae.encode_sparse(x.reshape(-1, x.shape[-1]).to(param))
        idx = acts.idx.reshape(-1, acts.capacity).long().cpu()
        f = acts.f.detach().reshape(idx.shape[0], -1).float().cpu()
        rows, slots = (acts.mask().reshape(idx.shape[0], -1).cpu() & (f > 0)).nonzero(
            as_tuple=True)
        # every live (token, feature) of the chunk as one sorted int64 key
        keys, perm = (rows * sae.d_sae + idx[rows, slots]).sort()
        vals = f[rows, slots][perm]
        lo = int(torch.searchsorted(sorted_docs, chunk[0]))
        hi = int(torch.searchsorted(sorted_docs, chunk[-1], right=True))
        r = order[lo:hi]
        local = torch.searchsorted(chunk, docs[r])
        q = (local[:, None] * (ctx - 1) + (p[r] - 1).clamp(min=0)) * sae.d_sae + feats[r, None]
        got = torch.zeros(q.shape)
        if keys.numel():
            j = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
            got = torch.where(keys[j] == q, vals[j], got)
        values[r] = torch.where(measured[r], got, math.nan)
        if progress is not None:
            progress(min(s + batch_contexts, needed.numel()), needed.numel())
    return ids, values


def build_dashboard(sae, model, tokenizer, data: Sequence, layer: str, out: str, *,
                    tokens: int = 2 ** 20, k: int = 20, context_len: int = 128,
                    batch_contexts: int = 8, resume: bool = False, through_norm: bool = False,
                    neuronpedia: bool = True, quiet: bool = False,
                    names: Optional[Mapping] = None) -> dict:
    """The dashboard of ``sae`` (any gsae_fast SAE) on ``layer`` of ``model`` over the texts of
    ``data``, written to ``out`` (see the module docstring). ``tokens``: how many to read (fewer
    if the texts end first); ``k``: top activations and sample size per feature;
    ``through_norm``: the logit tables through the model's final norm; ``names``: ``{"sae",
    "model"}`` as the user named them (the page shows them; a resumed run checks them).
    Returns a summary (tokens, contexts, features, dead, the index page's path)."""
    from .data import sources

    if tokens <= 0 or k <= 0:
        raise ValueError(f"--tokens and --top-k must be positive, got {tokens} and {k}")
    names = dict(names or {})
    os.makedirs(out, exist_ok=True)
    source = sources.text_activations(model, tokenizer, data, layer, context_len=context_len,
                                      batch_contexts=batch_contexts)
    if source.d_in != sae.d_in:
        raise ValueError(f"layer {layer} has width {source.d_in} but the SAE has d_in="
                         f"{sae.d_in}: pick the layer the SAE was trained on")
    norm = final_norm(model) if through_norm else None
    if through_norm and norm is None:
        raise ValueError(f"no final norm found in {type(model).__name__} (looked for "
                         f"{', '.join(FINAL_NORMS)}): leave out --final-norm")
    settings = _settings(sae, names, data, layer, context_len, k)
    stats, n_ctx, _ = reduce_contexts(sae, model, source, out, tokens=tokens, k=k,
                                      settings=settings, resume=resume, quiet=quiet)
    stats_cpu = FeatureStats.like(stats)
    stats_cpu.load_state_dict({n: (v.cpu() if isinstance(v, Tensor) else v)
                               for n, v in stats.state_dict().items()})
    stats = stats_cpu
    contexts = np.memmap(os.path.join(out, CONTEXTS_FILE), dtype=np.int32, mode="r",
                         shape=(n_ctx, context_len))
    # step 2: the windows of every kept (feature, context, position), top-k and sample at once
    docs = torch.cat([stats.top_docs, stats.sample_docs], 1)
    kept = docs >= 0
    feat = torch.arange(sae.d_sae)[:, None].expand_as(docs)[kept]
    pos = torch.cat([stats.top_positions, stats.sample_positions], 1)[kept]
    bar = Progress(None, "contexts", enabled=not quiet)  # the total is known inside
    w_ids, w_vals = activation_windows(sae, model, layer, contexts, feat, docs[kept], pos,
                                       batch_contexts=batch_contexts,
                                       progress=lambda n, total: bar(n, total))
    width = w_ids.shape[1]
    ids = torch.full(docs.shape + (width,), -1, dtype=torch.long)
    vals = torch.full(docs.shape + (width,), math.nan)
    ids[kept], vals[kept] = w_ids, w_vals
    # step 3: logit tables
    W_U = unembedding(model)
    effects = None
    if W_U is not None:
        effects = logit_effects(decoder_directions(sae), W_U, norm=norm,
                                top=min(LOGIT_ROWS, W_U.shape[1]))
        effects = LogitEffects(*(t.cpu() for t in effects))
    meta = dict(sae=names.get("sae") or type(sae).__name__, model=names.get("model") or
                type(model).__name__, layer=layer, architecture=type(sae).__name__,
                tokens=stats.tokens, contexts=n_ctx, context_len=context_len, d_sae=sae.d_sae,
                k=k, data=[str(p) for p in data], through_norm=bool(through_norm),
                date=time.strftime("%Y-%m-%d %H:%M"))
    write_site(out, stats, ids, vals, effects, source.tokenizer, meta,
               neuronpedia=neuronpedia, quiet=quiet)
    return dict(out=out, index=os.path.join(out, "index.html"), tokens=stats.tokens,
                contexts=n_ctx, features=sae.d_sae, dead=int((stats.firing == 0).sum()))


# -------------------------------------------------------------------------------- the site

def _rounder(scale: Tensor, digits: int = 4):
    """Per-row rounding to ``digits`` significant digits of the row's ``scale``: the JSON then
    holds short decimals (``n / 10^d`` in float64 prints as the decimal)."""
    d = (digits - 1 - torch.floor(torch.log10(scale.double().clamp(min=1e-30)))).clamp(-30, 30)
    p = torch.pow(10.0, d)

    def rnd(x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.round(x.double() * p.view(shape)) / p.view(shape)
    return rnd


def _windows(ids: Tensor, acts: Tensor, values: Tensor, docs: Tensor, pos: Tensor) -> list:
    """Per feature, its contexts as ``[value, context, position, first position, token ids,
    activations]`` lists, the window cut to the context (``ids`` -1 outside it)."""
    before = WINDOW[0]
    out = []
    for f_ids, f_acts, f_v, f_docs, f_pos in zip(ids.tolist(), acts.tolist(), values.tolist(),
                                                 docs.tolist(), pos.tolist()):
        rows = []
        for w_ids, w_acts, value, doc, p in zip(f_ids, f_acts, f_v, f_docs, f_pos):
            if doc < 0:
                break  # empty slots are last
            a = next(i for i, t in enumerate(w_ids) if t >= 0)
            b = len(w_ids) - next(i for i, t in enumerate(reversed(w_ids)) if t >= 0)
            rows.append([value, doc, p, p - before + a, w_ids[a:b], w_acts[a:b]])
        out.append(rows)
    return out


def _top_tokens(ids: Tensor, firing: Tensor, strings: dict, n: int = 3) -> list:
    """Per feature, the strings of the tokens its top activations are on, most frequent first."""
    at = ids[:, :, WINDOW[0]].tolist()
    return [[strings[t] for t, _ in Counter(i for i in row if i >= 0).most_common(n)]
            if fired else [] for row, fired in zip(at, firing.tolist())]


def _write_js(path: str, call: str, *args) -> None:
    text = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in args)
    files.write_text(f"{call}({text});\n", path)


def write_site(out: str, stats: FeatureStats, ids: Tensor, vals: Tensor,
               effects: Optional[LogitEffects], tokenizer, meta: dict, *,
               neuronpedia: bool = True, quiet: bool = True) -> None:
    """Write the page (assets and ``data/``) and, with ``neuronpedia``, the Neuronpedia export.

    ``ids`` / ``vals``: ``[d_sae, 2k, window]`` token ids and activations of the top-k contexts
    then the sample's (:func:`activation_windows`); ``effects``: the logit tables (None: no
    tables); ``tokenizer``: its ``decode([id])`` gives each token's string."""
    d_sae = stats.d_sae
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for name in ASSET_FILES:
        shutil.copyfile(os.path.join(ASSETS, name), os.path.join(out, name))
    used = set(ids[ids >= 0].unique().tolist())
    if effects is not None:
        used |= set(effects.promoted_ids.unique().tolist())
        used |= set(effects.suppressed_ids.unique().tolist())
    strings = {i: token_text(tokenizer, i) for i in sorted(used)}
    _write_js(os.path.join(out, "data", "vocab.js"), "gsaeDash.vocab", strings)

    firing = stats.firing
    max_act = torch.where(firing > 0, stats.top_values[:, 0], torch.zeros(()))
    n_shards = -(-d_sae // SHARD_SIZE)
    index = dict(meta, shard_size=SHARD_SIZE, shards=n_shards, window=list(WINDOW),
                 edges=[float(f"{e:.4g}") for e in stats.edges.tolist()],
                 density=[float(f"{d:.4g}") for d in stats.frequency().tolist()],
                 firing=firing.tolist(), max=_rounder(max_act)(max_act).tolist(),
                 top_tokens=_top_tokens(ids[:, :stats.k], firing, strings))
    _write_js(os.path.join(out, "data", "index.js"), "gsaeDash.index", index)

    if neuronpedia:
        os.makedirs(os.path.join(out, "neuronpedia"), exist_ok=True)
    bar = Progress(n_shards, "pages", enabled=not quiet)
    for s in range(n_shards):
        a, b = s * SHARD_SIZE, min(d_sae, (s + 1) * SHARD_SIZE)
        rows = _shard_rows(stats, ids, vals, effects, a, b, max_act[a:b])
        _write_js(os.path.join(out, "data", f"shard_{s:05d}.js"), "gsaeDash.shard", s, rows)
        if neuronpedia:
            rows = _shard_rows(stats, ids, vals, effects, a, b, None)
            files.write_json(_neuronpedia_batch(rows, index, strings),
                             os.path.join(out, "neuronpedia", f"batch-{s}.json"), indent=None)
        bar(s + 1)


def _shard_rows(stats, ids, vals, effects, a: int, b: int, permille_of) -> list:
    """Features ``a`` to ``b`` as dicts: ``id``, ``hist``, ``top`` and ``sample`` contexts,
    ``pos`` / ``neg`` logit tables (``[token id, value]`` rows). The contexts' activations are
    integers, thousandths of ``permille_of`` (the features' max activations: compact JSON for
    the page), or with ``permille_of=None`` floats of 4 significant digits (the export).
    Position 0's activation (not encoded) is 0."""
    k, sl = stats.k, slice(a, b)
    fired = stats.firing[sl] > 0
    rnd = _rounder(torch.where(fired, stats.top_values[sl, 0], torch.ones(())))
    acts = torch.nan_to_num(vals[sl], nan=0.0)
    if permille_of is None:
        acts = rnd(acts)
    else:
        scale = torch.where(fired, permille_of, torch.ones(()))
        acts = torch.round(1000 * acts / scale[:, None, None]).long()
    top = _windows(ids[sl, :k], acts[:, :k], rnd(stats.top_values[sl]), stats.top_docs[sl],
                   stats.top_positions[sl])
    sample = _windows(ids[sl, k:], acts[:, k:], rnd(stats.sample_values[sl]),
                      stats.sample_docs[sl], stats.sample_positions[sl])
    rows = []
    for i, f in enumerate(range(a, b)):
        row = dict(id=f, hist=stats.hist[f].tolist(), top=top[i], sample=sample[i])
        if effects is not None:
            for key, tid, tv in (("pos", effects.promoted_ids, effects.promoted_values),
                                 ("neg", effects.suppressed_ids, effects.suppressed_values)):
                row[key] = [[t, float(f"{v:.4g}")] for t, v in zip(tid[f].tolist(),
                                                                    tv[f].tolist())]
        rows.append(row)
    return rows


def _neuronpedia_batch(rows: list, index: dict, strings: dict) -> dict:
    """One ``batch-N.json`` of the Neuronpedia export (see the module docstring)."""
    layer = index["layer"]
    kind, colon, number = layer.partition(":")
    edges = [0.0] + index["edges"]
    features = []
    for row in rows:
        f = row["id"]
        max_act = index["max"][f]

        def acts(contexts, bin_min, bin_contains):
            return [dict(bin_min=bin_min, bin_max=max_act, bin_contains=bin_contains,
                         tokens=[strings[t] for t in c[4]], values=c[5]) for c in contexts]
        empty = []
        features.append(dict(
            feature_index=f, neuron_alignment_indices=empty, neuron_alignment_values=empty,
            neuron_alignment_l1=empty, correlated_neurons_indices=empty,
            correlated_neurons_l1=empty, correlated_neurons_pearson=empty,
            correlated_features_indices=empty, correlated_features_l1=empty,
            correlated_features_pearson=empty,
            neg_str=[strings[t] for t, _ in row.get("neg", [])],
            neg_values=[v for _, v in row.get("neg", [])],
            pos_str=[strings[t] for t, _ in row.get("pos", [])],
            pos_values=[v for _, v in row.get("pos", [])],
            frac_nonzero=index["density"][f], freq_hist_data_bar_values=edges,
            freq_hist_data_bar_heights=row["hist"], logits_hist_data_bar_heights=empty,
            logits_hist_data_bar_values=empty, n_prompts_total=index["contexts"],
            n_tokens_in_prompt=index["context_len"], dataset=", ".join(index["data"]),
            decoder_weights_dist=empty,
            activations=acts(row["top"], -1, -1) + acts(row["sample"], 0, 1)))
    return dict(model_id=os.path.basename(os.path.normpath(index["model"])),
                layer=int(number) if colon and number.isdigit() else layer,
                sae_set=os.path.basename(os.path.normpath(index["sae"])), features=features)


# ------------------------------------------------------------------- pages of feature effects

def read_index(dash_dir: str) -> Optional[dict]:
    """The index data of the dashboard in ``dash_dir`` (``data/index.js``), or None."""
    path = os.path.join(dash_dir, "data", "index.js")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    head = "gsaeDash.index("
    if not (text.startswith(head) and text.endswith(");")):
        raise ValueError(f"{path} is not a dashboard index (made by gsae-fast features)")
    return json.loads(text[len(head):-2])


def _effect_vector(effects) -> tuple:
    """``(features [d_sae] float64, error or None)`` of a NodeEffects or a tensor; per-position
    effects are summed over positions, unmeasured (NaN) ones count as 0."""
    error = None
    if hasattr(effects, "features"):
        error = float(torch.as_tensor(effects.error).double().sum())
        effects = effects.features
    v = torch.as_tensor(effects).detach().double().cpu()
    if v.dim() == 2:
        v = v.sum(0)
    if v.dim() != 1:
        raise ValueError(f"effects must be [d_sae] or [pos, d_sae], got {tuple(v.shape)}")
    return torch.nan_to_num(v, nan=0.0), error


_PAGE_CSS = ("body{font:14px system-ui,sans-serif;margin:24px;color:#222}"
             "table{border-collapse:collapse}td,th{padding:3px 10px;text-align:right}"
             "th{border-bottom:1px solid #999}td.t{text-align:left;font-family:monospace}"
             "tr:nth-child(even){background:#f4f4f4}.pos{color:#1a6e1a}.neg{color:#a11}")


def write_effects_page(effects, dash_dir, out: str, *, top: int = 50,
                       title: str = "Features by effect", note: str = "") -> str:
    """An HTML page listing the ``top`` features with the largest effect (in absolute value),
    each linked to its view in the dashboard, written to ``out``; returns ``out``.

    ``effects``: a :class:`gsae_fast.interp.NodeEffects`, a ``[d_sae]`` (or ``[pos, d_sae]``)
    tensor, or a mapping ``{layer: one of those}`` (one table per layer, e.g. the result of
    :func:`gsae_fast.interp.node_effects`). ``dash_dir``: the dashboard folder (or ``{layer:
    folder}``; None: no links); the page shows each feature's density and top tokens when the
    dashboard is built. ``note``: a line under the title (what the effect is)."""
    layers = effects if isinstance(effects, Mapping) else {"": effects}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    here = os.path.dirname(os.path.abspath(out))
    for layer, eff in layers.items():
        v, error = _effect_vector(eff)
        folder = dash_dir.get(layer) if isinstance(dash_dir, Mapping) else dash_dir
        index = read_index(folder) if folder else None
        link = None
        if folder:
            link = os.path.relpath(os.path.join(os.path.abspath(folder), "index.html"), here)
        if layer:
            parts.append(f"<h2>{html.escape(str(layer))}</h2>")
        if error is not None:
            parts.append(f"<p>Error node: {error:.4g}</p>")
        order = torch.argsort(v.abs(), descending=True, stable=True)[:top].tolist()
        head = "<tr><th>rank</th><th>feature</th><th>effect</th>"
        head += "<th>density</th><th>max act.</th><th>top tokens</th>" if index else ""
        rows = [head + "</tr>"]
        for rank, f in enumerate(order, 1):
            name = f"{f}" if link is None else \
                f'<a href="{html.escape(link)}#f={f}">{f}</a>'
            cls = "pos" if v[f] >= 0 else "neg"
            cells = f"<td>{rank}</td><td>{name}</td><td class={cls}>{float(v[f]):.4g}</td>"
            if index:
                toks = " · ".join(repr(t)[1:-1] for t in index["top_tokens"][f])
                cells += (f"<td>{100 * index['density'][f]:.3g}%</td><td>{index['max'][f]:.4g}"
                          f"</td><td class=t>{html.escape(toks)}</td>")
            rows.append(f"<tr>{cells}</tr>")
        parts.append("<table>" + "\n".join(rows) + "</table>")
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>"
            f"{html.escape(title)}</title><style>{_PAGE_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    os.makedirs(here, exist_ok=True)
    files.write_text(page, out)
    return out


def loss_effects(sae, model, layer: str, tokens: Tensor) -> Tensor:
    """Each feature's effect on the model's mean next-token loss when it is zero-ablated at every
    position but 0, by attribution patching (first order): ``[d_sae]`` float64, positive where
    the feature lowers the loss. One forward and backward with the SAE spliced into ``layer``
    (:func:`gsae_fast.interp.splice`)."""
    from .interp.splice import decoder_rows, model_logits, splice

    tokens = tokens.to(model_device(model))
    with splice(model, {layer: sae}, retain_grad=True) as sp, torch.enable_grad():
        logits = model_logits(model, tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               tokens[:, 1:].reshape(-1))
        rec = sp[layer]
        (grad,) = torch.autograd.grad(loss, rec.out)
    acts = rec.acts
    with torch.no_grad():
        n = grad.shape[0] * grad.shape[1]
        idx = acts.idx.reshape(n, -1)
        f = acts.f.detach().reshape(n, -1)
        live = acts.mask().reshape(n, -1) & (f != 0)
        live = live & (torch.arange(n, device=live.device) % grad.shape[1] != 0)[:, None]
        rows, slots = live.nonzero(as_tuple=True)
        feats = idx[rows, slots].long()
        g = grad.reshape(n, -1)[rows].double()
        dots = (decoder_rows(sae, feats).double() * g).sum(1)
        # ablating the feature moves the layer output by -f * its decoder row
        per = -f[rows, slots].double() * dots
        return torch.zeros(sae.d_sae, dtype=torch.float64, device=per.device).index_add_(
            0, feats, per).cpu()
