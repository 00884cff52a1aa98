"""Datasets as training data (gsae_fast.data.hf_datasets, sources.documents): a save_to_disk
folder, parquet and arrow files give the activations of the same texts as a .txt file, read
offline and without writing into the dataset; pre-tokenized input_ids; batched tokenization;
the context options (prepend_bos, exclude_special_tokens); rank sharding and exact resume; the
gsae-fast flags; clear errors. A tiny random-weight model and a tokenizer trained here (nothing
downloaded)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys

import pytest
import torch

from gsae_fast import cli
from gsae_fast.data import ModelActivations, sources
from gsae_fast.data.hf_datasets import DatasetDocuments, dataset_documents, is_dataset_path

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

WORDS = "the cat sat on a mat while dogs ran far away from home héllo wörld ✓".split()


def make_docs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(k),), generator=g))
            for k in torch.randint(1, 30, (n,), generator=g)]
    docs[5] = "a special <|endoftext|> token inside a document"
    return docs


DOCS = make_docs()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GPT-2 of random weights with a byte-level BPE tokenizer trained on DOCS, saved."""
    root = tmp_path_factory.mktemp("model")
    inner = tokenizers.Tokenizer(tokenizers.models.BPE())
    inner.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(DOCS, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300,
                                  n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def loaded(model_dir):
    from gsae_fast.hooks import load_model
    return load_model(model_dir)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Parquet and arrow files are converted into the datasets cache: a temporary one here."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def fingerprint(folder) -> dict:
    """Every file under ``folder`` with its content's hash."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def token_stream(tok) -> list:
    """DOCS' tokens, one document at a time, each after the separator (BOS)."""
    stream = []
    for d in DOCS:
        stream += [tok.bos_token_id] + tok.encode(d, add_special_tokens=False)
    return stream


def chunks(model, tok, data, **kwargs):
    kwargs.setdefault("context_len", 16)
    return list(sources.text_activations(model, tok, data, "resid:1", **kwargs))


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def roundtrip(state):
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


# ----------------------------------------------------------------------------------- sources


def test_saved_dataset_parquet_arrow_equal_txt(tmp_path, loaded, monkeypatch):
    """A dataset saved with save_to_disk (and the same rows as parquet, arrow, a DatasetDict)
    gives the activations of the same texts as a .txt file; an empty row adds nothing, as a
    blank line; loading makes no network connection and writes nothing into the folder."""
    model, tok = loaded
    (tmp_path / "docs.txt").write_text("\n".join(DOCS[:20] + [""] + DOCS[20:]) + "\n",
                                       encoding="utf-8")
    rows = datasets.Dataset.from_dict({"text": DOCS[:20] + [""] + DOCS[20:],
                                       "id": list(range(len(DOCS) + 1))})
    rows.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": rows.select(range(3)), "test": rows}).save_to_disk(
        tmp_path / "splits")
    (tmp_path / "pq").mkdir()
    rows.select(range(20)).to_parquet(tmp_path / "pq" / "a.parquet")
    rows.select(range(20, len(rows))).to_parquet(tmp_path / "pq" / "b.parquet")
    arrow = next(p for p in os.listdir(tmp_path / "saved") if p.endswith(".arrow"))
    before = fingerprint(tmp_path / "saved")

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection while reading local data")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    expected = chunks(model, tok, [tmp_path / "docs.txt"])
    assert sum(c.shape[0] for c in expected) > 300
    assert_same(chunks(model, tok, [tmp_path / "saved"]), expected)
    assert_same(chunks(model, tok, [tmp_path / "pq"]), expected)
    assert_same(chunks(model, tok, [tmp_path / "saved" / arrow]), expected)
    assert_same(chunks(model, tok, [tmp_path / "splits"], split="test"), expected)
    assert len(dataset_documents(tmp_path / "splits")) == 3   # the train split by default
    chunks(model, tok, [tmp_path / "saved"], world=2, rank=1)   # (sharded: no indices file)
    assert fingerprint(tmp_path / "saved") == before
    assert is_dataset_path(tmp_path / "saved") and is_dataset_path(tmp_path / "pq")
    assert not is_dataset_path(tmp_path / "docs.txt")


def test_pretokenized_input_ids(tmp_path, loaded):
    """An input_ids column (a dataset, or a .jsonl field) is used as it is: the token stream
    is the rows concatenated, no separator, no tokenizer call."""
    model, tok = loaded
    ids = [tok.encode(d, add_special_tokens=False) for d in DOCS]
    ids = [[tok.bos_token_id] + row for row in ids]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(tmp_path / "tokens")
    with open(tmp_path / "tokens.jsonl", "w") as f:
        f.writelines(json.dumps({"input_ids": row}) + "\n" for row in ids)

    class NoTokenizer:
        bos_token_id = eos_token_id = tok.bos_token_id

        def __call__(self, *args, **kwargs):
            raise AssertionError("pre-tokenized documents went through the tokenizer")
        encode = __call__

    for data in (tmp_path / "tokens", tmp_path / "tokens.jsonl"):
        docs = sources.documents([data], text_column="input_ids")
        acts = ModelActivations(model, NoTokenizer(), docs, "resid:0", context_len=16)
        flat = acts.token_contexts(10 ** 6).flatten().tolist()
        stream = [t for row in ids for t in row]
        assert flat == stream[:len(flat)] and len(stream) - len(flat) < 16
    # the same documents as text, each after its separator, give the same activations
    assert_same(chunks(model, tok, [tmp_path / "tokens"], text_column="input_ids"),
                list(ModelActivations(model, tok, DOCS, "resid:1", context_len=16)))


def test_batched_tokenization_equals_one_at_a_time(loaded):
    """A batch of documents per tokenizer call gives exactly the tokens of encoding each
    document alone (the tokenizer's encode), each after the separator."""
    model, tok = loaded

    class EncodeOnly:   # the one-document-at-a-time path
        bos_token_id = eos_token_id = tok.bos_token_id

        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=add_special_tokens)

    stream = token_stream(tok)
    n = len(stream) // 16
    expected = torch.tensor(stream[:n * 16]).view(n, 16)
    for tokenizer, batch in ((tok, 64), (tok, 7), (EncodeOnly(), 64)):
        acts = ModelActivations(model, tokenizer, DOCS, "resid:0", context_len=16,
                                tokenize_batch=batch)
        assert torch.equal(acts.token_contexts(n + 5), expected)


def test_prepend_bos_and_exclude_special_tokens(loaded):
    model, tok = loaded
    bos = tok.bos_token_id
    stream = token_stream(tok)
    # prepend_bos: every context starts with BOS; taking it away where the stream had none
    # there gives the stream back (a document's own separator is not doubled)
    acts = ModelActivations(model, tok, DOCS, "resid:0", context_len=16, prepend_bos=True)
    contexts = acts.token_contexts(10 ** 6).tolist()
    assert all(c[0] == bos for c in contexts)
    rebuilt, own_bos = [], 0
    for c in contexts:
        here = c if stream[len(rebuilt)] == bos else c[1:]
        own_bos += here is c
        rebuilt += here
    assert rebuilt == stream[:len(rebuilt)] and own_bos > 0
    # exclude_special_tokens: the positions holding <|endoftext|> or <pad> are left out
    special = torch.tensor([bos, tok.pad_token_id])
    for prepend in (False, True):
        kwargs = dict(context_len=16, batch_contexts=4, skip_bos=False, prepend_bos=prepend)
        every = torch.cat(list(ModelActivations(model, tok, DOCS, "resid:1", **kwargs)))
        kept = torch.cat(list(ModelActivations(model, tok, DOCS, "resid:1",
                                               exclude_special_tokens=True, **kwargs)))
        tokens = ModelActivations(model, tok, DOCS, "resid:1", **kwargs).token_contexts(
            10 ** 6).flatten()   # the full contexts: all rows but the last context's
        keep = ~torch.isin(tokens, special)
        assert (tokens == bos).sum() > len(DOCS)   # the separators, and one inside a document
        assert torch.equal(kept[:int(keep.sum())], every[:len(tokens)][keep])
        assert every.shape[0] - kept.shape[0] >= int((~keep).sum())


# ------------------------------------------------------------------- ranks and resume


@pytest.mark.parametrize("source", ["saved", "txt"])
def test_rank_sharding_and_exact_resume(tmp_path, loaded, source):
    """Rank r of w reads documents r, r + w, ...; a stream stopped after any chunk and resumed
    from its state_dict (a fresh object) gives exactly the rest, also across tokenizer
    batches and with prepend_bos."""
    model, tok = loaded
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "saved")
    data = [tmp_path / ("docs.txt" if source == "txt" else "saved")]
    kwargs = dict(context_len=8, batch_contexts=5, prepend_bos=True, tokenize_batch=3)

    def stream(rank=0, world=1):
        docs = sources.documents(data, rank=rank, world=world)
        return ModelActivations(model, tok, docs, "resid:1", **kwargs)

    for rank in range(3):
        shard = ModelActivations(model, tok, DOCS[rank::3], "resid:1", **kwargs)
        assert_same(list(stream(rank, 3)), list(shard))
    full = list(stream(1, 2))
    assert len(full) > 8
    for stop in (1, 4, len(full) - 1):
        acts = stream(1, 2)
        head = [next(acts) for _ in range(stop)]
        resumed = stream(1, 2)
        resumed.load_state_dict(roundtrip(acts.state_dict()))
        assert_same(head + list(resumed), full)
    with pytest.raises(ValueError, match="prepend_bos"):
        ModelActivations(model, tok, DOCS, "resid:1", context_len=8).load_state_dict(
            acts.state_dict())


def test_dataset_documents_sequence(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", None, "c", "d", "e"]}).save_to_disk(tmp_path / "d")
    docs = dataset_documents(tmp_path / "d", rank=1, world=2)
    assert isinstance(docs, DatasetDocuments) and len(docs) == 2
    assert docs[:] == ["", "d"] and docs[1] == "d" and docs[5:] == []
    assert dataset_documents(tmp_path / "d")[2:4] == ["c", "d"]


# -------------------------------------------------------------------------- gsae-fast


def test_cli_cache_and_train_from_a_dataset(tmp_path, model_dir):
    datasets.Dataset.from_dict({"body": DOCS * 3}).save_to_disk(tmp_path / "saved")
    (tmp_path / "docs.txt").write_text("\n".join(DOCS * 3) + "\n", encoding="utf-8")
    common = ["--model", model_dir, "--layer", "resid:0", "--context-size", 32, "--quiet"]
    for data, extra in (("saved", ["--text-column", "body"]), ("docs.txt", [])):
        args = ["cache", "--data", tmp_path / data, *common, "--out", tmp_path / f"{data}.acts",
                "--prepend-bos", "--exclude-special-tokens", *extra]
        assert cli.main([str(a) for a in args]) == 0
    metas = [json.loads((tmp_path / f"{d}.acts" / "meta.json").read_text())
             for d in ("saved", "docs.txt")]
    assert metas[0]["n_tokens"] == metas[1]["n_tokens"] > 1000
    meta = metas[0]["metadata"]
    assert meta["prepend_bos"] and meta["exclude_special_tokens"] and meta["context_len"] == 32
    assert meta["text_column"] == "body"
    args = ["train", "--data", tmp_path / "saved", "--text-column", "body", *common,
            "--context-len", 16, "--out", tmp_path / "run", "--d-sae", 64, "--steps", 3,
            "--batch-size", 64, "--buffer-tokens", 256, "--warmup-steps", 1,
            "--sparsity-warmup-steps", 1, "--eval-tokens", 128, "--ce-contexts", 2]
    assert cli.main([str(a) for a in args]) == 0
    assert (tmp_path / "run" / "summary.json").exists()


def test_bad_dataset_input_gets_a_clear_error(tmp_path, model_dir, capsys, monkeypatch):
    datasets.Dataset.from_dict({"body": ["x y"], "n": [1]}).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        tmp_path / "splits")
    (tmp_path / "a.txt").write_text("x y\n")

    def error(data, *extra):
        args = ["cache", "--model", model_dir, "--layer", "resid:0", "--out",
                tmp_path / "out", "--quiet", "--data", *data, *extra]
        capsys.readouterr()
        assert cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err   # (after the progress bars of loading the model)
        line = err.splitlines()[-1]
        assert line.startswith("gsae-fast cache: error: ") and err.endswith(line + "\n"), err
        return line

    err = error([tmp_path / "saved"])
    assert "no column 'text'" in err and "columns: body, n" in err and "--text-column" in err
    assert "neither text" in error([tmp_path / "saved"], "--text-column", "n")
    err = error([tmp_path / "splits"])
    assert "no split 'train'" in err and "splits: test" in err and "--data-split" in err
    assert "mixes text files and datasets" in error([tmp_path / "saved", tmp_path / "a.txt"])
    monkeypatch.setitem(sys.modules, "datasets", None)   # the extra not installed
    assert "pip install gsae_fast[datasets]" in error([tmp_path / "saved"])
