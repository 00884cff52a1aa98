"""gsae_fast.features: the streaming feature statistics against a dense brute force on small
inputs (top-k with its tie rule, firing counts, histogram, sample), independence of batch
boundaries, resuming and merging, bounded memory, the blocked logit effects, and ``collect`` on a
tiny random GPT-2 (no download)."""
from __future__ import annotations

import io

import pytest
import torch

import gsae_fast
from gsae_fast import activations as A
from gsae_fast.features import FeatureStats, collect, logit_effects, priority
from gsae_fast.types import SparseActs

D_SAE, N, K, DEAD = 24, 300, 5, 7
EDGES = torch.logspace(-2, 1, 7)


def random_acts(n=N, d_sae=D_SAE, seed=0, p=0.3):
    """Padded rows with quantised values (many ties), some active slots with f = 0 (a Gated
    SAE's open gate with a negative magnitude), values under and over the histogram's range,
    and feature DEAD never active. Tokens: (doc, pos) pairs in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, d_sae, generator=g) < p
    active[:, DEAD] = False
    counts = active.sum(1)
    cap = int(counts.max())
    idx = torch.zeros(n, cap, dtype=torch.int32)
    f = torch.zeros(n, cap)
    levels = torch.tensor([0.0, 1e-3, 0.05, 0.5, 0.5, 1.0, 2.0, 50.0])
    for t in range(n):
        feats = active[t].nonzero().flatten()
        idx[t, :len(feats)] = feats.int()
        f[t, :len(feats)] = levels[torch.randint(0, len(levels), (len(feats),), generator=g)]
    acts = SparseActs(idx, f, f.clone(), counts.int(), d_sae)
    token = torch.randperm(n, generator=g)
    return acts, token // 10, token % 10


def rows(acts, a, b):
    return SparseActs(acts.idx[a:b], acts.f[a:b], acts.pi_gate[a:b], acts.counts[a:b],
                      acts.d_sae)


def feed(stats, acts, docs, pos, batch):
    for a in range(0, docs.numel(), batch):
        stats.update(rows(acts, a, a + batch), docs[a:a + batch], pos[a:a + batch])
    return stats


def brute_force(acts, docs, pos, k=K, edges=EDGES, seed=0):
    """The same statistics from the dense [tokens, d_sae] matrix, feature by feature."""
    dense = acts.to_dense()
    d_sae = dense.shape[1]
    out = dict(top_values=torch.full((d_sae, k), -float("inf")),
               top_docs=torch.full((d_sae, k), -1), top_positions=torch.full((d_sae, k), -1),
               sample_values=torch.zeros(d_sae, k), sample_docs=torch.full((d_sae, k), -1),
               sample_positions=torch.full((d_sae, k), -1),
               hist=torch.zeros(d_sae, len(edges) + 1, dtype=torch.long))
    for j in range(d_sae):
        fire = (dense[:, j] > 0).nonzero().flatten().tolist()
        entries = [(dense[t, j].item(), int(docs[t]), int(pos[t])) for t in fire]
        best = sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:k]
        pri = priority(seed, torch.full((len(fire),), j), docs[fire], pos[fire],
                       62 - d_sae.bit_length()).tolist()
        sampled = sorted(zip(pri, entries), key=lambda e: (e[0], e[1][1], e[1][2]))[:k]
        for i, (v, d, p) in enumerate(best):
            out["top_values"][j, i], out["top_docs"][j, i], out["top_positions"][j, i] = v, d, p
        for i, (_, (v, d, p)) in enumerate(sampled):
            out["sample_values"][j, i] = v
            out["sample_docs"][j, i], out["sample_positions"][j, i] = d, p
        for v, _, _ in entries:
            out["hist"][j, sum(v >= e for e in edges.tolist())] += 1
    out["firing"] = (dense > 0).sum(0)
    return out


def assert_equal_stats(a: FeatureStats, b: FeatureStats):
    for name in FeatureStats._TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.tokens == b.tokens


@pytest.fixture(scope="module")
def data():
    acts, docs, pos = random_acts()
    return acts, docs, pos, brute_force(acts, docs, pos)


@pytest.mark.parametrize("batch", [1, 7, 64, N])
def test_matches_dense_brute_force(data, batch):
    acts, docs, pos, want = data
    stats = feed(FeatureStats(D_SAE, K, edges=EDGES), acts, docs, pos, batch)
    for name in ("top_values", "top_docs", "top_positions", "sample_values", "sample_docs",
                 "sample_positions", "hist"):
        assert torch.equal(getattr(stats, name), want[name]), name
    assert torch.equal(stats.firing, want["firing"])
    assert stats.tokens == N
    # the sample is in increasing priority; the top-k in decreasing value
    assert (stats.sample_priority[:, 1:] >= stats.sample_priority[:, :-1]).all()
    assert (stats.top_values[:, 1:] <= stats.top_values[:, :-1]).all()


def test_ties_smaller_document_then_position():
    # one feature, the same activation on every token, fed in a scrambled order
    docs = torch.tensor([5, 2, 2, 9, 0, 2, 5])
    pos = torch.tensor([1, 8, 3, 0, 4, 0, 0])
    n = len(docs)
    acts = SparseActs(torch.full((n, 1), 2, dtype=torch.int32), torch.ones(n, 1),
                      torch.ones(n, 1), torch.ones(n, dtype=torch.int32), 4)
    stats = feed(FeatureStats(4, 4), acts, docs, pos, 3)
    assert stats.top_docs[2].tolist() == [0, 2, 2, 2]
    assert stats.top_positions[2].tolist() == [4, 0, 3, 8]
    assert stats.top_values[2].tolist() == [1.0] * 4


def test_feature_that_never_fires(data):
    acts, docs, pos, _ = data
    stats = feed(FeatureStats(D_SAE, K, edges=EDGES), acts, docs, pos, 50)
    assert stats.firing[DEAD] == 0 and stats.frequency()[DEAD] == 0
    assert (stats.top_docs[DEAD] == -1).all() and (stats.sample_docs[DEAD] == -1).all()
    assert torch.isinf(stats.top_values[DEAD]).all()
    assert (stats.hist[DEAD] == 0).all()


def test_state_dict_round_trip_mid_stream(data):
    acts, docs, pos, _ = data
    one = feed(FeatureStats(D_SAE, K, edges=EDGES), acts, docs, pos, 40)
    first = feed(FeatureStats(D_SAE, K, edges=EDGES), rows(acts, 0, 120), docs[:120],
                 pos[:120], 40)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = FeatureStats(D_SAE, K, edges=EDGES)
    resumed.load_state_dict(torch.load(buf))
    feed(resumed, rows(acts, 120, N), docs[120:], pos[120:], 40)
    assert_equal_stats(resumed, one)
    with pytest.raises(ValueError, match="k="):
        FeatureStats(D_SAE, K + 1, edges=EDGES).load_state_dict(first.state_dict())


def test_merge_equals_one_pass(data):
    acts, docs, pos, _ = data
    one = feed(FeatureStats(D_SAE, K, edges=EDGES), acts, docs, pos, N)
    a = feed(FeatureStats(D_SAE, K, edges=EDGES), rows(acts, 0, 100), docs[:100], pos[:100], 30)
    b = feed(FeatureStats(D_SAE, K, edges=EDGES), rows(acts, 100, N), docs[100:], pos[100:], 30)
    a.merge(b)
    assert_equal_stats(a, one)


def test_memory_bounded_by_features_times_k():
    d_sae, k = 512, 8
    expected = None
    for n in (100, 2000):
        acts, docs, pos = random_acts(n, d_sae, seed=n, p=0.05)
        stats = feed(FeatureStats(d_sae, k, edges=EDGES), acts, docs, pos, 500)
        held = [v for v in vars(stats).values() if isinstance(v, torch.Tensor)]
        assert len(held) == len(FeatureStats._TENSORS)  # no hidden per-token state
        total = sum(t.numel() * t.element_size() for t in held)
        assert total == stats.nbytes()
        # values fp32, docs/positions/priorities int64, histogram int64, edges
        assert total == d_sae * k * (4 + 8 + 8) + d_sae * k * (4 + 8 + 8 + 8) \
            + d_sae * (len(EDGES) + 1) * 8 + len(EDGES) * 4
        expected = expected or total
        assert total == expected  # independent of the number of tokens


@pytest.mark.parametrize("block", [1, 5, 16, 1000])
@pytest.mark.parametrize("with_norm", [False, True])
def test_logit_effects_match_dense(block, with_norm):
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(37, 12, generator=g, dtype=torch.float64)
    W_U = torch.randn(12, 50, generator=g, dtype=torch.float64)
    norm = torch.nn.LayerNorm(12, dtype=torch.float64) if with_norm else None
    if norm is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    eff = logit_effects(W_dec, W_U, top=6, block=block, norm=norm)
    with torch.no_grad():
        dense = (norm(W_dec) if norm else W_dec) @ W_U
    hi, lo = dense.topk(6, dim=1), dense.topk(6, dim=1, largest=False)
    assert torch.equal(eff.promoted_ids, hi.indices)
    assert torch.equal(eff.suppressed_ids, lo.indices)
    torch.testing.assert_close(eff.promoted_values, hi.values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eff.suppressed_values, lo.values, rtol=1e-12, atol=1e-12)
    assert eff.promoted_values.shape == (37, 6)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=300,
                                  n_positions=64)
    return A.load_model(cfg)[0]


@pytest.mark.parametrize("arch", ["gated", "topk"])
def test_collect_on_tiny_gpt2(gpt2, arch):
    torch.manual_seed(1)
    if arch == "gated":
        sae = gsae_fast.GatedSAE(32, 64, backend="reference")
        with torch.no_grad():
            sae.b_mag.fill_(0.01)  # most open gates give f > 0
    else:
        sae = gsae_fast.TopKSAE(32, 64, k=4)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 300, (3, 10), generator=g) for _ in range(3)]
    seen = []
    stats = collect(sae, gpt2, batches, layer="resid:1", k=4, skip_bos=True,
                    progress=lambda n, s: seen.append(n))
    assert seen == [27, 54, 81]
    want = FeatureStats(64, 4)
    for i, tokens in enumerate(batches):
        x = A.layer_output(gpt2, tokens, "resid:1")[:, 1:]
        acts = sae.encode_sparse(x.reshape(-1, 32))
        docs = torch.arange(3 * i, 3 * i + 3).repeat_interleave(9)
        want.update(acts, docs, torch.arange(1, 10).repeat(3))
    assert_equal_stats(stats, want)
    assert stats.firing.sum() > 0 and (stats.top_positions[stats.top_docs >= 0] >= 1).all()
