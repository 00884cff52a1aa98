"""gsae_fast.hooks and gsae_fast.data (imported through their gsae_fast.activations
re-exports): text input, hooks and splicing, the model activation stream, the mixing buffer and
the on-disk cache, with tiny random-weight models (no download)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from gsae_fast import activations as A

transformers = pytest.importorskip("transformers")

DOCS = ["The quick brown fox jumps over the lazy dog.",
        "Sparse autoencoders find features in activations.",
        "héllo wörld ✓",   # multi-byte UTF-8
        "a",
        "Gated SAEs separate detection from magnitude estimation, " * 3]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=300,
                                  n_positions=64)
    model, tok = A.load_model(cfg)
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model, tok = A.load_model(cfg)
    return model


def tokens(batch=2, ctx=12, seed=0):
    return torch.randint(0, 300, (batch, ctx), generator=torch.Generator().manual_seed(seed))


def write_text_files(tmp_path):
    """DOCS split over a .txt (with blank lines) and a .jsonl file."""
    txt = tmp_path / "a.txt"
    txt.write_text(DOCS[0] + "\n\n" + DOCS[1] + "\n   \n" + DOCS[2] + "\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in
                               enumerate(DOCS[3:])) + "\n", encoding="utf-8")
    return [txt, jsonl]


class RowChunks:
    """A resumable source of chunks of distinct rows: row r is filled with the value r."""

    def __init__(self, chunk_sizes, width=3):
        self.chunk_sizes, self.width, self.index = list(chunk_sizes), width, 0

    def __iter__(self):
        while self.index < len(self.chunk_sizes):
            start = sum(self.chunk_sizes[:self.index])
            n = self.chunk_sizes[self.index]
            self.index += 1
            yield torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(
                1, self.width)
        self.index = 0   # the next iteration is a new pass

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def roundtrip(state):
    """A state dict through torch.save / torch.load(weights_only=True), as a checkpoint."""
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def byte_stream_length(docs):
    return sum(len(d.encode("utf-8")) + 1 for d in docs)   # + the separator before each


# ---------------------------------------------------------------------------- text input


def test_read_texts_txt_jsonl_and_directories(tmp_path):
    files = write_text_files(tmp_path)
    assert list(A.read_texts(files)) == DOCS
    assert list(A.read_texts(tmp_path)) == DOCS             # a directory: its sorted files
    one = tmp_path / "one" / "single.txt"
    one.parent.mkdir()
    one.write_text("no newline at all", encoding="utf-8")
    assert list(A.read_texts(one)) == ["no newline at all"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert list(A.read_texts(other, text_field="body")) == ["x y", "z"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(A.read_texts(other))
    with pytest.raises(FileNotFoundError):
        A.read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown text format"):
        A.read_texts(bad)


def test_empty_dataset_is_an_error(tmp_path, gpt2):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="empty dataset"):
        list(A.read_texts(empty))
    with pytest.raises(ValueError, match="empty dataset"):
        list(A.ModelActivations(gpt2, None, [], "resid:0", context_len=8))


# ------------------------------------------------------------------------ models, tokenizers


def test_load_model_from_directory_and_byte_tokenizer(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path / "m")
    model, tok = A.load_model(tmp_path / "m", dtype="float32")
    assert tok is None and not model.training
    x = tokens()
    assert torch.equal(model(x).logits, gpt2(x).logits)
    with pytest.raises(FileNotFoundError, match="local"):
        A.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        A.load_model(tmp_path)
    assert A.ByteTokenizer(300).encode("é") == [0xC3, 0xA9]
    assert A.ByteTokenizer(300).bos_token_id == 256 and A.ByteTokenizer(256).bos_token_id is None
    with pytest.raises(ValueError, match="at least 256"):
        A.ByteTokenizer(100)


def test_load_model_with_tokenizer_files(tmp_path, gpt2):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<eos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("abc the fox dog".split())}}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>",
                                               unk_token="[UNK]")
    gpt2.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, loaded = A.load_model(tmp_path / "m")
    assert loaded is not None
    acts = A.ModelActivations(model, loaded, ["the fox", "the dog abc"], "resid:0",
                              context_len=4, skip_bos=False)
    assert acts.separator == 0
    # <eos> the fox <eos> | the dog abc  -> 7 tokens, contexts of 4 and 3
    assert sum(c.shape[0] for c in acts) == 7


# ------------------------------------------------------------------------------------ hooks


def test_resid_hooks_match_hidden_states_gpt2(gpt2):
    x = tokens()
    with torch.no_grad():
        hidden = gpt2(x, output_hidden_states=True).hidden_states
    n = gpt2.config.n_layer
    for i in range(n):
        out = A.layer_output(gpt2, x, f"transformer.h.{i}")
        assert torch.equal(out, A.layer_output(gpt2, x, f"resid:{i}"))
        assert torch.equal(out, A.layer_output(gpt2, x, f"resid:{i}", stop=False))
        if i < n - 1:
            assert torch.equal(out, hidden[i + 1])
        else:  # GPT-2's last hidden state has ln_f applied; the block's output has not
            with torch.no_grad():
                assert torch.equal(gpt2.transformer.ln_f(out), hidden[n])
            assert not torch.allclose(out, hidden[n])
    # The stopped forwards left nothing behind: a full forward gives the same hidden states.
    with torch.no_grad():
        again = gpt2(x, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(again, hidden))


def test_mlp_and_attn_hooks_match_manual_forward_gpt2(gpt2):
    x = tokens(seed=1)
    with torch.no_grad():
        hidden = gpt2(x, output_hidden_states=True).hidden_states
        block = gpt2.transformer.h[1]
        attn = A.layer_output(gpt2, x, "attn:1")
        assert torch.equal(attn, A.layer_output(gpt2, x, "transformer.h.1.attn"))
        resid_mid = attn + hidden[1]                    # as GPT2Block adds them
        mlp = block.mlp(block.ln_2(resid_mid))
    assert torch.equal(A.layer_output(gpt2, x, "mlp:1"), mlp)
    assert torch.equal(A.layer_output(gpt2, x, "transformer.h.1.mlp"), mlp)
    assert torch.equal(resid_mid + mlp, hidden[2])      # the block's output


def test_aliases_llama(llama):
    assert A.resolve_hook(llama, "resid:1")[0] == "model.layers.1"
    assert A.resolve_hook(llama, "attn:0")[0] == "model.layers.0.self_attn"
    assert A.resolve_hook(llama, "mlp:1")[0] == "model.layers.1.mlp"
    x = tokens()
    with torch.no_grad():
        hidden = llama(x, output_hidden_states=True).hidden_states
    assert torch.equal(A.layer_output(llama, x, "resid:0"), hidden[1])
    assert torch.equal(A.layer_output(llama, x, "model.layers.0"), hidden[1])
    assert A.layer_output(llama, x, "attn:1").shape == (2, 12, 32)
    # The base model (no LM head) has the names without "model."
    assert A.resolve_hook(llama.model, "mlp:0")[0] == "layers.0.mlp"


def test_aliases_gpt2(gpt2):
    assert A.resolve_hook(gpt2, "resid:2")[0] == "transformer.h.2"
    assert A.resolve_hook(gpt2, "attn:0")[0] == "transformer.h.0.attn"
    assert A.resolve_hook(gpt2, "mlp:2")[0] == "transformer.h.2.mlp"


def test_unknown_layers_are_errors(gpt2):
    with pytest.raises(ValueError, match=r"transformer\.h\.0"):   # lists valid names
        A.resolve_hook(gpt2, "transformer.h.9")
    with pytest.raises(ValueError, match="blocks 0..2"):
        A.resolve_hook(gpt2, "resid:3")
    with pytest.raises(ValueError, match="unknown layer alias"):
        A.resolve_hook(gpt2, "embed:0")
    with pytest.raises(ValueError, match="not"):
        A.layer_output(gpt2, tokens(), "transformer.h")   # a ModuleList, never called
    with pytest.raises(ValueError):
        A.resolve_hook(gpt2, "")


def test_splice_identity_zero_and_tuple_outputs(gpt2):
    x = tokens(batch=3, ctx=16, seed=2)
    clean = A.ce_loss(gpt2, x)
    with A.splice(gpt2, "resid:1", lambda a: a):
        assert A.ce_loss(gpt2, x) == clean
    with A.splice(gpt2, "attn:1", lambda a: a):            # the attention returns a tuple
        assert A.ce_loss(gpt2, x) == clean
    with A.splice(gpt2, "resid:1", torch.zeros_like) as name:
        assert name == "transformer.h.1"
        ablated = A.ce_loss(gpt2, x)
    assert ablated != clean
    with A.splice(gpt2, "attn:1", torch.zeros_like):
        assert A.ce_loss(gpt2, x) != clean
    assert A.ce_loss(gpt2, x) == clean                     # the hooks are gone
    # Hooks registered after a splice see its output: a capture of the spliced layer reads 0.
    with A.splice(gpt2, "resid:0", torch.zeros_like):
        assert torch.count_nonzero(A.layer_output(gpt2, x, "resid:0")) == 0
    with A.splice(gpt2, "mlp:0", lambda a: a[:, :-1]), pytest.raises(ValueError, match="shape"):
        A.ce_loss(gpt2, x)


# -------------------------------------------------------------------- ModelActivations


def test_model_activations_counts_and_values(gpt2):
    ctx = 16
    total = byte_stream_length(DOCS)
    n_contexts = -(-total // ctx)
    acts = A.ModelActivations(gpt2, None, DOCS, "resid:1", context_len=ctx, batch_contexts=3)
    chunks = list(acts)
    assert sum(c.shape[0] for c in chunks) == total - n_contexts     # position 0 skipped
    assert all(c.shape[1] == 32 and c.dtype == torch.float32 for c in chunks)
    assert len(chunks) == -(-n_contexts // 3)
    # The first chunk is the first 3 contexts of the byte stream, position 0 dropped.
    stream = []
    for d in DOCS:
        stream += [256] + list(d.encode("utf-8"))
    first = torch.tensor(stream[:3 * ctx]).view(3, ctx)
    expected = A.layer_output(gpt2, first, "transformer.h.1")[:, 1:].reshape(-1, 32)
    assert torch.equal(chunks[0], expected)
    # Without skip_bos every token comes out; a second iteration is a second pass.
    acts = A.ModelActivations(gpt2, None, DOCS, "mlp:0", context_len=ctx, skip_bos=False,
                              dtype=torch.bfloat16)
    assert sum(c.shape[0] for c in acts) == total
    assert sum(c.shape[0] for c in acts) == total
    assert next(iter(acts)).dtype == torch.bfloat16
    assert acts.d_in == 32
    meta = acts.metadata(dataset=["x.txt"])
    assert meta["layer"] == "transformer.h.0.mlp" and meta["context_len"] == ctx
    with pytest.raises(ValueError, match="positions"):
        A.ModelActivations(gpt2, None, DOCS, "resid:0", context_len=65)


def test_model_activations_resume_exact(tmp_path, gpt2):
    files = write_text_files(tmp_path)
    kwargs = dict(context_len=8, batch_contexts=2)
    full = list(A.ModelActivations(gpt2, None, lambda: A.read_texts(files), "resid:2",
                                   **kwargs))
    assert len(full) > 5
    for stop in (1, 3, len(full) - 1):
        acts = A.ModelActivations(gpt2, None, lambda: A.read_texts(files), "resid:2", **kwargs)
        it = iter(acts)
        head = [next(it) for _ in range(stop)]
        state = roundtrip(acts.state_dict())
        # A fresh object, with a one-shot iterator over the same files, resumes exactly.
        resumed = A.ModelActivations(gpt2, None, A.read_texts(files), "resid:2", **kwargs)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for a, b in zip(head + tail, full):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="one-shot"):  # that iterator is used up
            list(resumed)
    with pytest.raises(ValueError, match="context_len"):
        A.ModelActivations(gpt2, None, DOCS, "resid:2", context_len=9).load_state_dict(state)


# ------------------------------------------------------------------------- MixingBuffer


def test_mixing_buffer_every_row_once_per_pass():
    source = RowChunks([5, 17, 1, 40, 3, 30, 8])              # 104 distinct rows
    buf = A.MixingBuffer(source, buffer_tokens=24, batch_size=6, seed=3)
    passes = []
    for _ in range(2):
        batches = list(buf)
        assert all(b.shape == (6, 3) for b in batches[:-1]) and 1 <= batches[-1].shape[0] <= 6
        rows = torch.cat(batches)[:, 0]
        assert torch.equal(rows.sort().values, torch.arange(104.0))   # no loss, no duplicate
        assert not torch.equal(rows, torch.arange(104.0))            # shuffled
        passes.append(rows)
    assert not torch.equal(passes[0], passes[1])                     # each pass reshuffles
    # repeat=True: one endless stream, the passes back to back (as a training loop wants).
    endless = A.MixingBuffer(RowChunks([5, 17, 1, 40, 3, 30, 8]), buffer_tokens=24,
                             batch_size=6, seed=3, repeat=True)
    rows = torch.cat([next(endless) for _ in range(2 * len(batches))])[:, 0]
    assert torch.equal(rows, torch.cat(passes))
    # A plain list works too (resumed by counting chunks).
    chunks = [torch.arange(i * 10, i * 10 + 10.0)[:, None] for i in range(5)]
    rows = torch.cat(list(A.MixingBuffer(chunks, buffer_tokens=8, batch_size=4, seed=0)))
    assert torch.equal(rows[:, 0].sort().values, torch.arange(50.0))
    with pytest.raises(ValueError, match="2 \\* batch_size"):
        A.MixingBuffer(chunks, buffer_tokens=7, batch_size=4, seed=0)


@pytest.mark.parametrize("stateful", [True, False])
def test_mixing_buffer_resume_bitwise(stateful):
    sizes = [7, 13, 2, 25, 9, 11, 4]

    def make():
        source = RowChunks(sizes) if stateful else list(RowChunks(sizes))
        return A.MixingBuffer(source, buffer_tokens=16, batch_size=5, seed=11)

    full = list(make())
    n = len(full)
    for stop in (1, 2, 5, n - 2, n - 1):                   # mid-fill, mid-drain, at the end
        buf = make()
        it = iter(buf)
        head = [next(it) for _ in range(stop)]
        state = roundtrip(buf.state_dict())
        resumed = make()
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert len(head) + len(tail) == n
        for a, b in zip(head + tail, full):
            assert torch.equal(a, b)
    # The second pass after a resume is the second pass of an uninterrupted run too.
    buf = make()
    two_passes = list(buf) + list(buf)
    buf = make()
    it = iter(buf)
    head = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(buf.state_dict())
    for a, b in zip(head + list(resumed) + list(resumed), two_passes):
        assert torch.equal(a, b)


def test_mixing_buffer_over_model_activations_resume(gpt2):
    def make():
        acts = A.ModelActivations(gpt2, None, DOCS, "resid:1", context_len=8, batch_contexts=2)
        return A.MixingBuffer(acts, buffer_tokens=32, batch_size=8, seed=0)

    full = list(make())
    total = byte_stream_length(DOCS)
    assert sum(b.shape[0] for b in full) == total - -(-total // 8)   # 1 per context skipped
    buf = make()
    it = iter(buf)
    head = [next(it) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(roundtrip(buf.state_dict()))
    for a, b in zip(head + list(resumed), full):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- disk cache


def test_cache_round_trip_and_shards(tmp_path):
    x = torch.randn(1000, 24, generator=torch.Generator().manual_seed(0))
    chunks = [x[:300], x[300:301], x[301:]]
    seen = []
    meta = A.write_cache(chunks, tmp_path / "f32", d_in=24, shard_tokens=256,
                         metadata={"model": "m", "layer": "resid:1"},
                         progress=lambda done, total: seen.append((done, total)))
    assert seen == [(300, None), (301, None), (1000, None)]
    assert [s["n_tokens"] for s in meta["shards"]] == [256, 256, 256, 232]
    assert sorted(os.listdir(tmp_path / "f32")) == ["meta.json"] + [f"shard_0000{i}.npy"
                                                                    for i in range(4)]
    cache = A.ActivationCache(tmp_path / "f32")
    assert (len(cache), cache.d_in, cache.n_tokens) == (1000, 24, 1000)
    assert cache.metadata == {"model": "m", "layer": "resid:1"}
    assert cache.meta["gsae_fast_version"]
    assert np.array_equal(np.load(tmp_path / "f32" / "shard_00001.npy"), x[256:512].numpy())
    assert torch.equal(cache.read(np.arange(1000)), x)
    idx = np.array([999, 3, 511, 256, 3, 700])
    assert torch.equal(cache.read(idx), x[idx])
    cache.check_width(24)
    with pytest.raises(ValueError, match="width 24, expected 32"):
        cache.check_width(32)

    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        A.write_cache(iter(chunks), tmp_path / dtype, d_in=24, dtype=dtype, shard_tokens=400)
        cache = A.ActivationCache(tmp_path / dtype)
        assert cache.dtype == dtype
        assert torch.equal(cache.read(np.arange(1000), dtype=torch_dtype), x.to(torch_dtype))
        assert torch.equal(cache.read(np.arange(1000)), x.to(torch_dtype).float())

    A.write_cache(chunks, tmp_path / "cut", d_in=24, max_tokens=500)
    assert torch.equal(A.ActivationCache(tmp_path / "cut").read(np.arange(500)), x[:500])
    with pytest.raises(FileExistsError, match="overwrite"):
        A.write_cache(chunks, tmp_path / "cut", d_in=24)
    A.write_cache(chunks[:1], tmp_path / "cut", d_in=24, overwrite=True)
    assert len(A.ActivationCache(tmp_path / "cut")) == 300
    with pytest.raises(ValueError, match="d_in=32"):
        A.write_cache(chunks, tmp_path / "bad", d_in=32)
    with pytest.raises(ValueError, match="JSON"):
        A.write_cache(chunks, tmp_path / "bad2", d_in=24, metadata={"f": object()})


def test_cache_batches_cover_epochs_and_resume(tmp_path):
    x = torch.arange(203 * 4, dtype=torch.float32).view(203, 4)
    A.write_cache([x], tmp_path, d_in=4, shard_tokens=64)
    cache = A.ActivationCache(tmp_path)
    full = list(cache.batches(16, seed=5, epochs=2))
    assert len(full) == 2 * 13 and full[12].shape == (11, 4)
    for epoch in (full[:13], full[13:]):
        rows = torch.cat(epoch)
        assert torch.equal(rows[rows[:, 0].argsort()], x)     # every token once per epoch
    assert not torch.equal(torch.cat(full[:13]), torch.cat(full[13:]))
    assert cache.state_dict()["epoch"] == 2
    for stop in (1, 12, 13, 20):
        cache = A.ActivationCache(tmp_path)
        it = cache.batches(16, seed=5, epochs=2)
        head = [next(it) for _ in range(stop)]
        state = roundtrip(cache.state_dict())
        resumed = A.ActivationCache(tmp_path)
        resumed.load_state_dict(state)
        tail = list(resumed.batches(16, seed=5, epochs=2))
        assert len(head) + len(tail) == len(full)
        for a, b in zip(head + tail, full):
            assert torch.equal(a, b)
    # The iterator is a resumable stream on its own (what a training loop holds).
    stream = A.ActivationCache(tmp_path).batches(16, seed=5, epochs=None)
    head = [next(stream) for _ in range(30)]
    state = stream.state_dict()
    assert (state["epoch"], state["position"]) == (2, 4 * 16)
    stream = A.ActivationCache(tmp_path).batches(16, seed=5, epochs=None)
    stream.load_state_dict(roundtrip(state))
    perm = torch.randperm(203, generator=torch.Generator().manual_seed(5 + 2))  # epoch 2
    assert torch.equal(next(stream), x[perm[4 * 16:5 * 16]])
    resumed = A.ActivationCache(tmp_path)
    resumed.load_state_dict({"epoch": 0, "position": 16, "seed": 5, "shuffle": True})
    with pytest.raises(ValueError, match="seed"):
        next(resumed.batches(16, seed=6))
    ordered = list(A.ActivationCache(tmp_path).batches(100, shuffle=False, drop_last=True))
    assert torch.equal(torch.cat(ordered), x[:200])


def test_cache_errors(tmp_path):
    x = torch.randn(50, 8)
    A.write_cache([x], tmp_path / "c", d_in=8, shard_tokens=20)
    os.remove(tmp_path / "c" / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        A.ActivationCache(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        A.ActivationCache(tmp_path / "nowhere")

    A.write_cache([x], tmp_path / "c", d_in=8, shard_tokens=20, overwrite=True)
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        A.ActivationCache(tmp_path / "c")

    A.write_cache([x], tmp_path / "c", d_in=8, shard_tokens=20, overwrite=True)
    os.remove(tmp_path / "c" / "shard_00001.npy")
    with pytest.raises(FileNotFoundError, match="shard_00001.npy"):
        A.ActivationCache(tmp_path / "c")

    A.write_cache([x], tmp_path / "c", d_in=8, shard_tokens=20, overwrite=True)
    np.save(tmp_path / "c" / "shard_00002.npy", np.zeros((10, 9), np.float32))
    with pytest.raises(ValueError, match="width d_in=8"):
        A.ActivationCache(tmp_path / "c")

    with pytest.raises(ValueError, match="no activations"):
        A.write_cache([], tmp_path / "empty", d_in=8)
    assert not (tmp_path / "empty" / "meta.json").exists()


def test_cache_crash_leaves_no_meta(tmp_path):
    def chunks():
        yield torch.randn(30, 4)
        raise RuntimeError("the model crashed")

    with pytest.raises(RuntimeError):
        A.write_cache(chunks(), tmp_path, d_in=4, shard_tokens=16)
    assert "meta.json" not in os.listdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        A.ActivationCache(tmp_path)


def test_cache_from_model_activations(tmp_path, gpt2):
    acts = A.ModelActivations(gpt2, None, DOCS, "resid:1", context_len=16, batch_contexts=2)
    meta = A.write_cache(acts, tmp_path, d_in=acts.d_in, dtype="bfloat16", shard_tokens=100,
                         metadata=acts.metadata(dataset=["docs"]))
    expected = torch.cat(list(acts))
    cache = A.ActivationCache(tmp_path)
    assert meta["metadata"]["layer"] == "transformer.h.1"
    assert torch.equal(cache.read(np.arange(len(cache))), expected.bfloat16().float())
