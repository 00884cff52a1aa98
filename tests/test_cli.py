"""The gsae-fast command end to end on a tiny random-weight transformers model (nothing
downloaded): cache -> train -> eval with the CE loss recovered; training from the model
directly; resume; bad input gets a clear error."""
import json

import pytest
import torch

from gsae_fast import cli

transformers = pytest.importorskip("transformers")


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
    return root


def run(*argv):
    assert cli.main([str(a) for a in argv]) == 0


def test_cache_train_eval(tiny, tmp_path, capsys):
    model, texts = tiny / "model", tiny / "texts.txt"
    run("cache", "--model", model, "--data", texts, "--layer", "resid:0", "--context-len", 32,
        "--out", tmp_path / "acts", "--quiet")
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["d_in"] == 32 and meta["n_tokens"] > 2000
    run("train", "--cache", tmp_path / "acts", "--out", tmp_path / "run", "--d-sae", 128,
        "--steps", 60, "--batch-size", 256, "--lr", 3e-3, "--warmup-steps", 5,
        "--sparsity-warmup-steps", 10, "--l1-coefficient", 0.05, "--quiet",
        "--eval-tokens", 1024)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["fve"] > 0.3
    run("eval", tmp_path / "run" / "sae", "--model", model, "--data", texts, "--layer",
        "resid:0", "--context-len", 32, "--eval-tokens", 1024, "--ce-contexts", 8, "--json",
        tmp_path / "eval.json")
    ev = json.loads((tmp_path / "eval.json").read_text())
    ce = ev["ce_loss"]
    assert ce["zero_ablated"] != ce["clean"]
    assert ce["recovered"] == pytest.approx((ce["zero_ablated"] - ce["with_sae"]) /
                                            (ce["zero_ablated"] - ce["clean"]))
    assert "recovered" in capsys.readouterr().out


def test_train_from_the_model_and_resume(tiny, tmp_path, monkeypatch):
    """Training from the model through the mixing buffer; a run killed after step 4 (its last
    checkpoint at step 3) and restarted with --resume logs the same losses as an unbroken run."""
    def args(out, *extra):
        return ["train", "--model", tiny / "model", "--data", tiny / "texts.txt", "--layer",
                "mlp:1", "--context-len", 32, "--out", out, "--d-sae", 64, "--steps", 6,
                "--batch-size", 128, "--buffer-tokens", 512, "--warmup-steps", 1,
                "--sparsity-warmup-steps", 2, "--checkpoint-every", 3, "--log-every", 1,
                "--quiet", "--eval-tokens", 256, "--ce-contexts", 4, *extra]

    run(*args(tmp_path / "full"))
    full = [json.loads(line)["loss"] for line in open(tmp_path / "full" / "log.jsonl")]
    assert len(full) == 6

    from gsae_fast.train import Trainer
    step = Trainer.train_step

    def dies_after_4(self, x):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self, x)

    monkeypatch.setattr(Trainer, "train_step", dies_after_4)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in args(tmp_path / "killed")])
    monkeypatch.setattr(Trainer, "train_step", step)
    run(*args(tmp_path / "killed", "--resume"))
    resumed = [json.loads(line)["loss"] for line in open(tmp_path / "killed" / "log.jsonl")]
    assert resumed == full


def test_bad_input_gets_a_clear_error(tiny, tmp_path, capsys):
    assert cli.main(["cache", "--model", str(tiny / "model"), "--data",
                     str(tiny / "texts.txt"), "--layer", "transformer.h.7", "--out",
                     str(tmp_path / "x"), "--quiet"]) == 2
    assert "transformer.h.7" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert cli.main(["cache", "--model", str(tiny / "model"), "--data",
                     str(tmp_path / "empty.txt"), "--layer", "resid:0", "--context-len", "32",
                     "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert cli.main(["cache", "--model", str(tiny / "model"), "--data",
                     str(tiny / "texts.txt"), "--out", str(tmp_path / "z"), "--quiet"]) == 2
    assert "--layer" in capsys.readouterr().err
    run("cache", "--model", tiny / "model", "--data", tiny / "texts.txt", "--layer", "resid:0",
        "--context-len", 32, "--max-tokens", 500, "--out", tmp_path / "acts", "--quiet")
    train = ["train", "--cache", str(tmp_path / "acts"), "--d-sae", "16", "--steps", "3",
             "--warmup-steps", "1", "--sparsity-warmup-steps", "1", "--quiet"]
    assert cli.main(train + ["--out", str(tmp_path / "r"), "--batch-size", "1024"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    run(*train, "--out", tmp_path / "r", "--batch-size", 100, "--eval-tokens", 100)
    assert cli.main(train + ["--out", str(tmp_path / "r"), "--batch-size", "100"]) == 2
    assert "--resume" in capsys.readouterr().err  # a second run into the same folder
    run(*train, "--out", tmp_path / "r", "--batch-size", 100, "--eval-tokens", 100,
        "--overwrite")
    from gsae_fast import GatedSAE
    GatedSAE(16, 32).save_pretrained(tmp_path / "narrow")
    assert cli.main(["eval", str(tmp_path / "narrow"), "--cache", str(tmp_path / "acts")]) == 2
    err = capsys.readouterr().err
    assert "width" in err or "d_in" in err, err


def test_train_config_file_and_flags_over_it(tiny, tmp_path, capsys):
    """--config FILE gives the train options by name (TrainConfig fields and the command's
    other options, --out among them); a flag on the command line wins over the file."""
    run("cache", "--model", tiny / "model", "--data", tiny / "texts.txt", "--layer", "resid:0",
        "--context-len", 32, "--max-tokens", 500, "--out", tmp_path / "acts", "--quiet")
    cfg = {"cache": str(tmp_path / "acts"), "out": str(tmp_path / "run"), "d_sae": 24,
           "steps": 2, "batch_size": 100, "lr": 1e-3, "betas": [0.5, 0.99], "warmup_steps": 1,
           "sparsity_warmup_steps": 1, "log_every": 1, "eval_tokens": 100, "quiet": True}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    args = cli.parse_args(["train", "--config", str(tmp_path / "run.json"), "--steps", "4"])
    assert (args.d_sae, args.steps, args.lr, args.quiet) == (24, 4, 1e-3, True)
    assert args.out == str(tmp_path / "run") and args.betas == [0.5, 0.99]
    args = cli.parse_args(["train", "--config", str(tmp_path / "run.json"), "--no-quiet",
                           "--out", "elsewhere"])
    assert args.out == "elsewhere" and args.quiet is False
    run("train", "--config", tmp_path / "run.json", "--steps", 4)
    assert len(open(tmp_path / "run" / "log.jsonl").readlines()) == 4  # the flag's 4, not 2
    sae_cfg = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert sae_cfg["d_sae"] == 24  # the file's
    pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text("d_sae: 40\nlr: 1e-4\ndata: a.txt\nout: r\n")
    args = cli.parse_args(["train", "--config", str(tmp_path / "run.yaml")])
    assert (args.d_sae, args.lr, args.data, args.out) == (40, 1e-4, ["a.txt"], "r")


@pytest.mark.parametrize("content, message", [
    ({"d_sea": 4096}, "run.json: unknown key 'd_sea' (did you mean 'd_sae'?)"),
    ({"steps": "many"}, "run.json: 'steps' must be an int, got \"many\""),
    ({"lr": True}, "run.json: 'lr' must be a number, got true"),
    ({"betas": [0.9]}, "run.json: 'betas' must be a list of 2 values, each a number, got [0.9]"),
    ({"decoder": "unit"}, "run.json: 'decoder' must be one of unit_norm, norm_penalty, free, "
                          "got \"unit\""),
    ({"arch": "sparse"}, "run.json: 'arch' must be one of gated, jumprelu, topk, batchtopk, "
                         "got \"sparse\""),
    ({"quiet": "yes"}, "run.json: 'quiet' must be true or false, got \"yes\""),
    ([1, 2], "run.json: expected a mapping of option names to values, got list"),
])
def test_train_config_file_refused(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps(content))
    assert cli.main(["train", "--config", "run.json", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err == f"gsae-fast train: error: {message}\n"
    assert not (tmp_path / "r").exists()


def test_train_config_yaml_without_pyyaml(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # import yaml fails
    (tmp_path / "run.yml").write_text("d_sae: 8\n")
    assert cli.main(["train", "--config", str(tmp_path / "run.yml"), "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.yml" in err and "PyYAML" in err and "JSON" in err


def test_cache_progress_without_max_tokens(tiny, tmp_path, capsys):
    """Without --max-tokens (no total to draw a bar against) cache shows a running count of
    the tokens and their rate, ending with the count written."""
    run("cache", "--model", tiny / "model", "--data", tiny / "texts.txt", "--layer", "resid:0",
        "--context-len", 32, "--out", tmp_path / "acts")
    n = json.loads((tmp_path / "acts" / "meta.json").read_text())["n_tokens"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cache ")]
    assert lines and all(" tokens/s" in line for line in lines)
    assert lines[-1].startswith(f"cache {n} tokens ")


def test_progress_count_without_a_total():
    import io

    from gsae_fast.progress import Progress
    out = io.StringIO()
    bar = Progress(None, "cache", stream=out, unit="tokens", every=3600)
    bar(100)
    bar(200)  # within `every` seconds of the last line: not written
    bar.finish(300)
    lines = out.getvalue().splitlines()
    assert [line.split()[:3] for line in lines] == [["cache", "100", "tokens"],
                                                    ["cache", "300", "tokens"]]
    assert all(line.split()[-1] == "tokens/s" for line in lines)
