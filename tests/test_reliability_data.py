"""Nothing lost, nothing silently wrong in the data and interop layers: every file they write
goes through gsae_fast.files (a full disk is named, the previous file survives), cache shards
carry checksums that are checked on load, and damaged or mistaken inputs raise one-line errors
that name the file."""
import errno
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch

from gsae_fast import GatedSAE, interop
from gsae_fast.data import ActivationCache, read_texts, write_cache
from gsae_fast.interop import UnsupportedSAEError

D_IN, D_SAE = 8, 16


def _enospc(monkeypatch, after: int = 0):
    """os.fsync succeeds ``after`` times, then fails as on a full disk."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cache(path, n=50, shard_tokens=20, **kw):
    x = torch.randn(n, D_IN)
    write_cache([x], path, d_in=D_IN, shard_tokens=shard_tokens, **kw)
    return x


def _sae(seed=0):
    torch.manual_seed(seed)
    return GatedSAE(D_IN, D_SAE)


# ------------------------------------------------------------------------- atomic writes


def test_a_full_disk_while_writing_a_shard_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    _enospc(monkeypatch)
    with pytest.raises(OSError, match=re.escape(
            f"no space left on device writing {tmp_path / 'shard_00000.npy'}")) as e:
        _cache(tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []  # no temporary file, no meta.json: not a cache


def test_a_full_disk_while_writing_meta_json_names_it(tmp_path, monkeypatch):
    # 40 rows in shards of 20: both shards close inside the loop (fsync of each file and of
    # the folder: 4 calls), then meta.json's fsync fails.
    _enospc(monkeypatch, after=4)
    with pytest.raises(OSError, match=re.escape(
            f"no space left on device writing {tmp_path / 'meta.json'}")):
        _cache(tmp_path, n=40)
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.npy", "shard_00001.npy"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ActivationCache(tmp_path)


def test_leftovers_of_a_killed_write_count_as_cache_files(tmp_path):
    (tmp_path / ".shard_00003.npy.4242.0badcafe.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _cache(tmp_path)
    _cache(tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "notes.txt", "shard_00000.npy",
                                            "shard_00001.npy", "shard_00002.npy"]


def test_save_pretrained_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = _sae(0)
    old.save_pretrained(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    new = _sae(1)
    with monkeypatch.context() as m:
        _enospc(m)  # the weights
        with pytest.raises(OSError, match=re.escape(
                f"no space left on device writing {tmp_path / 'sae_weights.safetensors'}")):
            new.save_pretrained(tmp_path)
    with monkeypatch.context() as m:
        _enospc(m, after=1)  # the weights are written, cfg.json is not: neither replaces
        with pytest.raises(OSError, match=re.escape(
                f"no space left on device writing {tmp_path / 'cfg.json'}")):
            new.save_pretrained(tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert torch.equal(GatedSAE.load(tmp_path).W_enc, old.W_enc)
    new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
    assert torch.equal(GatedSAE.load(tmp_path).W_enc, new.W_enc)


# ------------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_checksums_are_the_files_sha256(tmp_path, dtype):
    _cache(tmp_path, dtype=dtype)  # shards of 20, 20 and a shorter last one of 10
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [s["n_tokens"] for s in meta["shards"]] == [20, 20, 10]
    for s in meta["shards"]:
        assert s["sha256"] == _sha256(tmp_path / s["file"])
    ActivationCache(tmp_path).verify()


def test_a_flipped_byte_or_swapped_shard_is_named(tmp_path):
    x = _cache(tmp_path)
    shard = tmp_path / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = ActivationCache(tmp_path)  # checked when the shard is first read
    assert torch.equal(cache.read(np.arange(20)), x[:20])  # shard 0 is intact
    with pytest.raises(ValueError, match=r"shard shard_00001\.npy does not match its checksum "
                                         r"in meta\.json .*write the cache again"):
        cache.read([25])
    with pytest.raises(ValueError, match="shard_00001.npy does not match"):
        ActivationCache(tmp_path).verify()
    with pytest.raises(ValueError, match="shard_00001.npy does not match"):
        next(ActivationCache(tmp_path).batches(8))
    ActivationCache(tmp_path, verify=False).read([25])  # asked not to check

    _cache(tmp_path, overwrite=True)
    a, b = tmp_path / "shard_00000.npy", tmp_path / "shard_00001.npy"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(ValueError, match="shard shard_00000.npy does not match its checksum"):
        ActivationCache(tmp_path).verify()


def test_a_cache_without_checksums_still_loads(tmp_path):
    x = _cache(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    for s in meta["shards"]:
        del s["sha256"]  # as written before the checksums
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cache = ActivationCache(tmp_path)
    cache.verify()
    assert torch.equal(cache.read(np.arange(50)), x)


# ------------------------------------------------------------------- errors that name the file


def test_an_empty_or_truncated_shard_is_named(tmp_path):
    _cache(tmp_path)
    shard = tmp_path / "shard_00001.npy"
    whole = shard.read_bytes()
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard shard_00001\.npy is empty \(0 bytes\): its "
                                         r"writing was cut short .*write the cache again"):
        ActivationCache(tmp_path)
    for cut in (60, 200):  # inside the header, inside the rows
        shard.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=rf"shard shard_00001\.npy is truncated or not a "
                                             rf"\.npy file \({cut} bytes; its 20 rows of 8 "
                                             rf"float32 need 640 bytes"):
            ActivationCache(tmp_path)


def test_a_corrupt_meta_json_or_a_file_for_the_cache_is_named(tmp_path):
    _cache(tmp_path)
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"meta\.json is corrupt \(TypeError: a JSON list, not "
                                         r"an object\)"):
        ActivationCache(tmp_path)
    (tmp_path / "meta.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"meta\.json is corrupt \(UnicodeDecodeError"):
        ActivationCache(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file, not an activation cache: pass "
                                                 "the directory"):
        ActivationCache(tmp_path / "meta.json")


def test_a_corrupt_safetensors_file_is_named(tmp_path):
    _sae().save_pretrained(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    whole = weights.read_bytes()
    for damaged in (b"", b"garbage", whole[:len(whole) // 2]):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a valid "
                                             rf"safetensors file \(.*\): it is damaged"):
            interop.load(tmp_path)


def test_a_cfg_json_that_is_not_a_json_object_is_named(tmp_path):
    _sae().save_pretrained(tmp_path)
    cfg = tmp_path / "cfg.json"
    good = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(cfg))} is not valid JSON"):
        interop.load(tmp_path)
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(cfg))} holds a JSON list, expected "
                                         rf"an object"):
        interop.load(tmp_path)
    cfg.write_text(json.dumps(dict(good, architecture=["gated"])))
    with pytest.raises(ValueError, match="field 'architecture' is"):
        interop.load(tmp_path)
    cfg.write_text(json.dumps(dict(good, dtype="float99")))
    with pytest.raises(ValueError, match=r"cfg\.json: field 'dtype': unknown dtype 'float99'"):
        interop.load(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file: pass the checkpoint folder"):
        interop.load(cfg)


def _dl_state(dtype=torch.float32) -> dict:
    g = _sae()
    return {"encoder.weight": g.W_enc.detach().T.contiguous().to(dtype),
            "decoder.weight": g.W_dec.detach().T.contiguous().to(dtype),
            "decoder_bias": g.b_dec.detach().to(dtype), "gate_bias": g.b_gate.detach().to(dtype),
            "r_mag": g.r_mag.detach().to(dtype), "mag_bias": g.b_mag.detach().to(dtype)}


def test_integer_tensors_are_refused_not_cast(tmp_path):
    torch.save(_dl_state(torch.int64), tmp_path / "ae.pt")
    with pytest.raises(UnsupportedSAEError, match=rf"{re.escape(str(tmp_path / 'ae.pt'))}: "
                                                  rf"encoder\.weight has dtype int64; SAE "
                                                  rf"weights are floating point"):
        interop.load(tmp_path)
    with pytest.raises(UnsupportedSAEError, match="encoder.weight has dtype int32"):
        GatedSAE.from_dictionary_learning(_dl_state(torch.int32))
    torch.save(_dl_state(), tmp_path / "ae.pt")
    assert torch.equal(interop.load(tmp_path).W_enc, _sae().W_enc)

    # the same in a SAELens checkpoint, whose cfg.json dtype would have cast it silently
    from safetensors.torch import load_file, save_file
    _sae().save_pretrained(tmp_path / "lens")
    weights = tmp_path / "lens" / "sae_weights.safetensors"
    state = load_file(weights)
    save_file(dict(state, W_enc=state["W_enc"].to(torch.int32)), weights)
    with pytest.raises(UnsupportedSAEError, match="W_enc has dtype int32"):
        interop.load(tmp_path / "lens")


def test_a_damaged_ae_pt_or_its_config_is_named(tmp_path):
    ae = tmp_path / "ae.pt"
    ae.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{re.escape(str(ae))} is damaged or cut short "
                                         rf"\(the file is empty\)"):
        interop.load(tmp_path)
    torch.save(_dl_state(), ae)
    ae.write_bytes(ae.read_bytes()[:200])
    with pytest.raises(ValueError, match="is damaged or cut short"):
        interop.load(tmp_path)
    ae.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a state dict of tensors"):
        interop.load(tmp_path)
    torch.save([1, 2], ae)
    with pytest.raises(ValueError, match="holds a list, expected a state dict"):
        interop.load(tmp_path)
    torch.save(_dl_state(), ae)
    config = tmp_path / "config.json"
    for text, message in (("{oops", "is not valid JSON"), ('"x"', "holds a JSON str"),
                          ('{"trainer": 3}', "field 'trainer' is a int, expected an object")):
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            interop.load(tmp_path)


def test_a_binary_or_non_utf8_text_file_is_named(tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ValueError, match=rf"{re.escape(str(binary))}: byte 4 is NUL: a binary "
                                         rf"file"):
        read_texts(binary)  # when the paths are checked, before any reading
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(latin1))}:2: not UTF-8 text \(byte "
                                         rf"28: invalid continuation byte\).*iconv"):
        read_texts(latin1)
    late = tmp_path / "late.txt"  # past what is checked up front: named when read
    late.write_bytes(b"a document\n" * 10000 + b"caf\xe9\n")
    docs = read_texts(late)
    with pytest.raises(ValueError, match=rf"{re.escape(str(late))}:10001: not UTF-8 text "
                                         rf"\(byte 110003: invalid continuation byte\)"):
        list(docs)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert list(read_texts(bom)) == ["first", "second"]  # the byte-order mark is not text


def test_a_folder_named_like_a_text_file_is_named(tmp_path):
    folder = tmp_path / "texts.txt"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(repr(str(folder)))} is a folder, "
                                                rf"not a \.txt file, and holds no \.txt or "
                                                rf"\.jsonl files"):
        read_texts(folder)
    (folder / "a.txt").write_text("one\n")
    assert list(read_texts(folder)) == ["one"]  # a folder stands for its text files
    (folder / "inner.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"inner\.jsonl' is a folder \(or not a regular file\), "
                                         r"not a text file"):
        read_texts(folder)
