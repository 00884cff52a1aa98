"""Sweeps: many SAEs trained on one pass over the data equal separate runs step for step
(float64), resume exactly after a kill, refuse a resume with other members and settings that
cannot vary; ``gsae-fast train --sweep`` end to end, and its bad input."""
import json

import pytest
import torch

from gsae_fast import cli
from gsae_fast.sweep import SweepTrainer, grid, members
from gsae_fast.synthetic import SyntheticConfig, SyntheticFeatures
from gsae_fast.train import TrainConfig, Trainer

SMALL = SyntheticConfig(d_in=16, n_features=40, target_l0=4)
BASE = dict(d_sae=48, steps=10, batch_size=64, warmup_steps=2, sparsity_warmup_steps=3,
            log_every=1, dead_after_tokens=256, checkpoint_every=4, k=4, l1_coefficient=0.5)
MEMBERS = [dict(l1_coefficient=0.2), dict(arch="jumprelu", d_sae=40),
           dict(arch="batchtopk", lr=1e-3), dict(name="tk", arch="topk")]


def data(dtype=torch.float32):
    stream = SyntheticFeatures(SMALL, batch_size=64)
    if dtype == torch.float32:
        return stream

    class Cast:  # the same batches in float64, resumable
        def __next__(self):
            old = torch.get_default_dtype()  # (the stream draws in float32)
            torch.set_default_dtype(torch.float32)
            try:
                return next(stream).to(dtype)
            finally:
                torch.set_default_dtype(old)

        def state_dict(self):
            return stream.state_dict()

        def load_state_dict(self, s):
            stream.load_state_dict(s)
    return Cast()


def test_a_sweep_equals_separate_runs_step_for_step(tmp_path):
    torch.set_default_dtype(torch.float64)  # float64 masters: equality is exact
    try:
        base = dict(BASE, compute_dtype="float64")
        cfgs, names = members(base, MEMBERS)
        assert names == ["l1_coefficient=0.2", "arch=jumprelu_d_sae=40", "arch=batchtopk_lr=0.001",
                         "tk"]
        assert [c.lr for c in cfgs] == [5e-5, 3e-4, 1e-3, 3e-4]  # each recipe's, or the value
        sweep = SweepTrainer(cfgs, 16, data(torch.float64), str(tmp_path / "sweep"), names=names)
        together = sweep.train()
        sweep.close()
        for cfg, name, member in zip(cfgs, names, sweep.members):
            alone = Trainer(cfg, 16, data(torch.float64))
            records = alone.train()
            assert [r["loss"] for r in records] == [r["loss"] for r in together[name]], name
            for key, t in alone.sae.state_dict().items():
                assert torch.equal(t, member.sae.state_dict()[key]), (name, key)
            logged = [json.loads(line) for line in open(tmp_path / "sweep" / name / "log.jsonl")]
            assert [r["loss"] for r in logged] == [r["loss"] for r in records]
            assert (tmp_path / "sweep" / name / "sae" / "cfg.json").exists()
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_killed_sweep_resumes_exactly(tmp_path):
    cfgs, names = members(BASE, MEMBERS[:3])
    straight = SweepTrainer(cfgs, 16, data(), str(tmp_path / "a"), names=names)
    full = straight.train()
    straight.close()
    first = SweepTrainer(cfgs, 16, data(), str(tmp_path / "b"), names=names)

    def kill(step, total, records):
        if step == 6:  # the checkpoint of step 4, then 2 steps lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.train(progress=kill)
    # the lock was released by the failed train: the resume may take the folder
    second = SweepTrainer(cfgs, 16, data(), str(tmp_path / "b"), names=names, resume=True)
    assert second.step == 4
    second.train()
    second.close()
    for name, a, b in zip(names, straight.members, second.members):
        logged = [json.loads(line) for line in open(tmp_path / "b" / name / "log.jsonl")]
        assert [r["step"] for r in logged] == list(range(1, 11))
        assert [r["loss"] for r in logged] == [r["loss"] for r in full[name]], name
        for key, t in a.sae.state_dict().items():
            assert torch.equal(t, b.sae.state_dict()[key]), (name, key)
    # a resume with other members is refused, naming both
    other_cfgs, other_names = members(BASE, [MEMBERS[0], MEMBERS[3]])
    with pytest.raises(ValueError, match="a sweep of other members .* than this one"):
        SweepTrainer(other_cfgs, 16, data(), str(tmp_path / "b"), names=other_names,
                     resume=True)
    changed = [TrainConfig(**dict(BASE, l1_coefficient=0.3))] + cfgs[1:]
    with pytest.raises(ValueError, match=f"member {names[0]}: .* different configuration"):
        SweepTrainer(changed, 16, data(), str(tmp_path / "b"), names=names, resume=True)
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        SweepTrainer(cfgs, 16, data(), str(tmp_path / "b"), names=names)


def test_sweep_settings_that_cannot_vary_are_refused():
    with pytest.raises(ValueError, match="batch_size differs between the sweep's members"):
        SweepTrainer(members(BASE, [{}, dict(batch_size=32)])[0], 16, data(), None)
    with pytest.raises(ValueError, match="unknown setting 'l1'"):
        members(BASE, [dict(l1=0.5)])
    with pytest.raises(ValueError, match="l1_coefficient must be float, got 'high'"):
        SweepTrainer(members(BASE, [dict(l1_coefficient="high")])[0], 16, data(), None)
    with pytest.raises(ValueError, match="one distinct name per member"):
        SweepTrainer(members(BASE, [{}, {}])[0], 16, data(), None)
    cfgs, names = grid(BASE, {"l1_coefficient": [0.1, 0.2], "arch": ["gated", "jumprelu"]})
    assert names == ["l1_coefficient=0.1_arch=gated", "l1_coefficient=0.1_arch=jumprelu",
                     "l1_coefficient=0.2_arch=gated", "l1_coefficient=0.2_arch=jumprelu"]


# ------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An activation cache of synthetic features (the CLI reads it as it reads a model's)."""
    from gsae_fast.data.cache import write_cache
    root = tmp_path_factory.mktemp("acts")
    stream = SyntheticFeatures(SMALL, batch_size=512)
    write_cache(iter([next(stream) for _ in range(8)]), root / "acts", d_in=16,
                metadata=dict(model="synthetic", layer="resid:0", context_len=64))
    return root / "acts"


def test_cli_sweep_trains_each_member_in_its_folder(cache, tmp_path, capsys):
    members_file = tmp_path / "members.json"
    members_file.write_text(json.dumps([{"name": "g"}, {"arch": "topk", "k": 4}]))
    argv = ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--d-sae", "32",
            "--steps", "6", "--batch-size", "128", "--warmup-steps", "1",
            "--sparsity-warmup-steps", "2", "--quiet", "--eval-tokens", "512",
            "--sweep", str(members_file), "--sweep", "lr=0.001,0.003"]
    assert cli.main(argv) == 0
    names = ["g_lr=0.001", "g_lr=0.003", "arch=topk_k=4_lr=0.001", "arch=topk_k=4_lr=0.003"]
    sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert [m["name"] for m in sweep["members"]] == names
    for name in names:
        summary = json.loads((tmp_path / "run" / name / "summary.json").read_text())
        assert summary["metrics"]["tokens"] > 0
        cfg = json.loads((tmp_path / "run" / name / "sae" / "cfg.json").read_text())
        assert cfg["architecture"] == ("topk" if "topk" in name else "gated")
    assert "trained 4 SAEs for 6 steps on one pass" in capsys.readouterr().out


@pytest.mark.parametrize("sweep, message", [
    ("l1_coefficient=0.5,high", "--sweep l1_coefficient=0.5,high: 'high' is not a number"),
    ("arch=gated,sparse", "--sweep arch=gated,sparse: 'sparse' is not one of gated, jumprelu"),
    ("l1_coeficient=1,2", "'l1_coeficient' is not a train option an SAE can vary (did you "
                          "mean 'l1_coefficient'?)"),
    ("batch_size=64,128", "batch_size differs between the sweep's members"),
])
def test_cli_sweep_bad_values(cache, tmp_path, capsys, sweep, message):
    argv = ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", "4",
            "--batch-size", "64", "--warmup-steps", "1", "--sparsity-warmup-steps", "1",
            "--quiet", "--sweep", sweep]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_logs_to_tensorboard_for_a_run_and_each_sweep_member(cache, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install "
                                              "gsae_fast[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ["--cache", str(cache), "--d-sae", "32", "--steps", "4", "--batch-size", "128",
              "--warmup-steps", "1", "--sparsity-warmup-steps", "1", "--log-every", "2",
              "--quiet", "--eval-tokens", "256"]
    assert cli.main(["train", "--out", str(tmp_path / "one"), "--tensorboard",
                     str(tmp_path / "tb1"), *common]) == 0
    assert cli.main(["train", "--out", str(tmp_path / "sw"), "--tensorboard",
                     str(tmp_path / "tb2"), "--sweep", "k=2,3", "--arch", "topk", *common]) == 0
    for folder, run in [(tmp_path / "tb1", tmp_path / "one"),
                        (tmp_path / "tb2" / "k=2", tmp_path / "sw" / "k=2"),
                        (tmp_path / "tb2" / "k=3", tmp_path / "sw" / "k=3")]:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        logged = [json.loads(line) for line in open(run / "log.jsonl")]
        events = acc.Scalars("mse")
        assert [e.step for e in events] == [r["step"] for r in logged] == [2, 4]
        assert [e.value for e in events] == pytest.approx([r["mse"] for r in logged])


def test_sae_lens_metadata_of_a_run_from_a_cache(cache, tmp_path):
    """sae/ carries what the cache records of its origin, as SAELens reads it back."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed")
    assert cli.main(["train", "--cache", str(cache), "--out", str(tmp_path / "run"),
                     "--d-sae", "32", "--steps", "2", "--batch-size", "128", "--warmup-steps",
                     "1", "--sparsity-warmup-steps", "1", "--quiet", "--eval-tokens",
                     "256"]) == 0
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "run" / "sae"))
    meta = loaded.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.context_size) == \
        ("synthetic", "blocks.0.hook_resid_post", 64)
