"""The feature dashboard (gsae_fast/dashboard.py, ``gsae-fast features``) end to end on a tiny
random-weight GPT-2 (nothing downloaded): the site's data against the streaming statistics,
resuming, the Neuronpedia export, pages of features by effect (from interp's node effects and
from ``gsae-fast eval --dashboard``), and the page itself in a headless browser from file://."""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

import gsae_fast
from gsae_fast import cli, dashboard
from gsae_fast.interp import NodeEffects

transformers = pytest.importorskip("transformers")

D_SAE, CTX, TOKENS = 64, 32, 3000
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    words = "the cat sat on a mat while dogs ran far away from home".split()
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (40,), generator=g))
             for _ in range(60)]
    (root / "texts.txt").write_text("\n".join(lines) + "\n")
    gsae_fast.TopKSAE(32, D_SAE, k=4).save_pretrained(root / "topk")
    gated = gsae_fast.GatedSAE(32, D_SAE)
    with torch.no_grad():
        gated.b_mag.fill_(0.01)  # most open gates give f > 0
    gated.save_pretrained(root / "gated")
    return root


def features(tiny, sae, out, *extra):
    argv = ["features", tiny / sae, "--model", tiny / "model", "--data", tiny / "texts.txt",
            "--layer", "resid:0", "--context-len", CTX, "--out", out, "--quiet", *extra]
    return cli.main([str(a) for a in argv])


def shards(out):
    rows = []
    for name in sorted(os.listdir(out / "data")):
        if name.startswith("shard_"):
            text = (out / "data" / name).read_text()
            rows += json.loads(text[text.index(",") + 1:-3])  # gsaeDash.shard(s,[...]);
    return rows


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "dash"
    assert features(tiny, "topk", out, "--tokens", TOKENS) == 0
    return out


def test_site_holds_the_statistics(site):
    index = dashboard.read_index(str(site))
    rows = shards(site)
    state = torch.load(site / dashboard.STATE_FILE, weights_only=False)
    stats = gsae_fast.features.FeatureStats(D_SAE, 20)
    stats.load_state_dict(state["stats"])
    assert index["d_sae"] == D_SAE and len(rows) == D_SAE and index["tokens"] == stats.tokens
    # every context read is one row of the contexts file (position 0 is not counted)
    assert state["contexts"] * CTX * 4 == os.path.getsize(site / dashboard.CONTEXTS_FILE)
    assert stats.tokens == state["contexts"] * (CTX - 1)
    assert index["firing"] == stats.firing.tolist()
    fired = stats.firing > 0
    assert fired.sum() > D_SAE // 2
    for f, row in enumerate(rows):
        assert row["id"] == f and row["hist"] == stats.hist[f].tolist()
        assert [c[1:3] for c in row["top"]] == [[d, p] for d, p in zip(
            stats.top_docs[f].tolist(), stats.top_positions[f].tolist()) if d >= 0]
        assert len(row["sample"]) == int((stats.sample_docs[f] >= 0).sum())
        assert len(row["pos"]) == len(row["neg"]) == 10
        for c in row["top"] + row["sample"]:
            value, _, pos, first, ids, acts = c
            assert len(ids) == len(acts) and first <= pos < first + len(ids)
            assert first == max(0, pos - dashboard.WINDOW[0]) and max(acts) <= 1001
            # the window's run again: the activating token's activation is the one recorded
            # (in thousandths of the feature's max)
            assert acts[pos - first] == pytest.approx(1000 * value / index["max"][f], abs=2)
        if fired[f]:
            assert row["top"][0][0] == pytest.approx(index["max"][f], rel=1e-3)
    vocab = (site / "data" / "vocab.js").read_text()
    assert vocab.startswith("gsaeDash.vocab({")


def test_logit_tables_through_the_unembedding(tiny, site):
    model, _ = gsae_fast.hooks.load_model(str(tiny / "model"))
    sae = gsae_fast.interop.load(str(tiny / "topk"))
    eff = gsae_fast.features.logit_effects(sae.W_dec.detach(), model.lm_head.weight.detach().T)
    row = shards(site)[3]
    assert [t for t, _ in row["pos"]] == eff.promoted_ids[3].tolist()
    assert [v for _, v in row["pos"]] == pytest.approx(eff.promoted_values[3].tolist(),
                                                       rel=1e-3)


def test_neuronpedia_export(site):
    batch = json.loads((site / "neuronpedia" / "batch-0.json").read_text())
    assert batch["layer"] == 0 and batch["sae_set"] == "topk" and batch["model_id"] == "model"
    assert [f["feature_index"] for f in batch["features"]] == list(range(D_SAE))
    f = batch["features"][1]
    for key in ("pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
                "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "n_prompts_total",
                "n_tokens_in_prompt", "dataset", "activations"):
        assert key in f, key
    assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"])
    top = [a for a in f["activations"] if a["bin_min"] == -1]
    assert top and top[0]["bin_max"] == max(max(a["values"]) for a in top)
    assert all(len(a["tokens"]) == len(a["values"]) for a in f["activations"])


def test_resume_equals_one_run(tiny, tmp_path, capsys):
    assert features(tiny, "gated", tmp_path / "one", "--tokens", 2000) == 0
    assert features(tiny, "gated", tmp_path / "two", "--tokens", 700) == 0
    assert features(tiny, "gated", tmp_path / "two", "--tokens", 2000) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert features(tiny, "gated", tmp_path / "two", "--tokens", 2000, "--top-k", 5,
                    "--resume") == 2
    assert "k=20" in capsys.readouterr().err
    assert features(tiny, "gated", tmp_path / "two", "--tokens", 2000, "--resume") == 0
    for name in ("data/index.js", "data/shard_00000.js", dashboard.CONTEXTS_FILE):
        one, two = (tmp_path / d / name for d in ("one", "two"))
        if name.endswith(".js"):  # the date differs
            one, two = (re.sub(r'"date":"[^"]*"', "", p.read_text()) for p in (one, two))
            assert one == two, name
        else:
            assert one.read_bytes() == two.read_bytes()


def test_effects_page_links_into_the_dashboard(site, tmp_path):
    v = torch.zeros(D_SAE)
    v[[7, 3, 12]] = torch.tensor([0.5, -2.0, 1.0])
    v[20] = float("nan")  # not measured
    effects = {"resid:0": NodeEffects(v, torch.tensor(0.25), 1.0, 2.0, "atp")}
    out = tmp_path / "pages" / "effects.html"
    dashboard.write_effects_page(effects, {"resid:0": str(site)}, str(out), top=3)
    page = out.read_text()
    link = os.path.relpath(site / "index.html", out.parent)
    assert re.findall(r'href="([^"]+)#f=(\d+)"', page) == [(link, "3"), (link, "12"),
                                                          (link, "7")]
    assert "Error node: 0.25" in page and "resid:0" in page
    index = dashboard.read_index(str(site))
    assert f"{100 * index['density'][3]:.3g}%" in page


def test_eval_writes_effects_on_the_loss(tiny, site, tmp_path):
    argv = ["eval", tiny / "topk", "--model", tiny / "model", "--data", tiny / "texts.txt",
            "--layer", "resid:0", "--context-len", CTX, "--eval-tokens", 300, "--ce-contexts", 4,
            "--dashboard", site, "--json", tmp_path / "eval.json"]
    assert cli.main([str(a) for a in argv]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    page = (site / "eval_effects.html").read_text()
    ranked = [int(f) for f in re.findall(r'href="index.html#f=(\d+)"', page)]
    assert ranked[:10] == [f for f, _ in ev["feature_effects"]["top"]]
    assert len(ranked) == 50
    # the first-order effects of zero-ablating every feature at once sum to the first-order
    # effect of replacing the SAE's feature part of the layer output by 0
    model, _ = gsae_fast.hooks.load_model(str(tiny / "model"))
    sae = gsae_fast.interop.load(str(tiny / "topk"))
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    eff = dashboard.loss_effects(sae, model, "resid:0", tokens)
    with gsae_fast.interp.splice(model, {"resid:0": sae}, retain_grad=True) as sp:
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        rec = sp["resid:0"]
        part = (rec.x_hat - sae.b_dec).detach()[:, 1:]
        want = -(part * rec.out.grad[:, 1:]).sum()
    assert float(eff.sum()) == pytest.approx(float(want), rel=1e-4, abs=1e-9)


# --------------------------------------------------------------------------- in a browser

def browser():
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def render(url, tmp_path, *extra):
    """The DOM of ``url`` after its scripts ran, and the browser's console lines."""
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
           "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           *extra, url]
    res = subprocess.run(cmd + ["--dump-dom"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    return res.stdout, console


@pytest.mark.skipif(browser() is None, reason="no headless browser found (chromium, "
                    "google-chrome): apt-get install chromium to run the page's test")
def test_page_in_a_browser(site, tmp_path):
    url = (site / "index.html").as_uri()
    dom, console = render(url, tmp_path)
    assert console == []
    assert re.search(r'<div id="errors" hidden="">\s*</div>', dom)
    rows = re.findall(r'<tr data-feature="(\d+)">', dom)
    assert sorted(map(int, rows)) == list(range(D_SAE))  # the index lists every feature
    assert f"{D_SAE} of {D_SAE} features" in dom

    feature = shards(site)[5]
    dom, console = render(url + "#f=5", tmp_path)
    assert console == [] and re.search(r'<div id="errors" hidden="">\s*</div>', dom)
    assert '<div id="feature" data-feature="5">' in dom
    top = dom[dom.index('<div id="top">'):dom.index('<div id="sample">')]
    assert len(re.findall(r'class="ctx"', top)) == len(feature["top"]) > 0
    assert len(re.findall(r'class="t hit"', top)) == len(feature["top"])
    bins = [j for j, c in enumerate(feature["hist"]) if c]
    assert len(re.findall(r'<rect[^>]*class="bin"', dom)) == bins[-1] - bins[0] + 1
    assert dom.count('class="v pos"') == dom.count('class="v neg"') == 10

    # search by feature id, and by token
    dom, _ = render(url + "#q=12", tmp_path)
    assert re.findall(r'<tr data-feature="(\d+)">', dom) == ["12"]
    tops = dashboard.read_index(str(site))["top_tokens"]

    def having(q):
        return [f for f, toks in enumerate(tops) if any(q in t.lower() for t in toks)]
    token = min((t.strip().lower() for toks in tops for t in toks if t.strip()),
                key=lambda q: len(having(q)))
    dom, _ = render(url + "#q=" + token, tmp_path)
    found = sorted(int(f) for f in re.findall(r'<tr data-feature="(\d+)">', dom))
    assert found == having(token) and 0 < len(found) < D_SAE
