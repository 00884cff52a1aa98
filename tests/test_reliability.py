"""Nothing lost: a run that fails, is killed or runs out of disk leaves what it had saved whole,
readable and resumable, and says what went wrong in one line."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from gsae_fast import checkpoints, cli, distributed, files
from gsae_fast.activations import write_cache
from gsae_fast.data.sources import cache_training_batches
from gsae_fast.synthetic import SyntheticConfig, SyntheticFeatures
from gsae_fast.train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- training ----------------------------------------------------------------------------------

SMALL = SyntheticConfig(d_in=16, n_features=40, target_l0=4)


def config(**kw):
    base = dict(d_sae=48, l1_coefficient=0.5, steps=8, batch_size=64, lr=3e-3, warmup_steps=2,
                sparsity_warmup_steps=3, log_every=1, checkpoint_every=1, dead_after_tokens=256,
                compute_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


class Batches:
    """The synthetic batches with some made bad (``bad``: step -> function of the batch);
    resumable."""

    def __init__(self, bad=None):
        self.data, self.bad, self.position = SyntheticFeatures(SMALL, batch_size=64), bad or {}, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        x = self.data.batch(self.position - 1)
        return self.bad.get(self.position, lambda t: t)(x)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def with_nan(x):
    x = x.clone()
    x[3, 5] = float("nan")
    return x


def saved(run) -> dict:
    return torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)


def all_finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state["sae"].values()) and all(
        torch.isfinite(v).all() for s in state["optimizer"]["state"].values()
        for v in s.values())


def logged_steps(run) -> list:
    return [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    """A tiny activation cache (2048 tokens of width 16)."""
    path = tmp_path_factory.mktemp("acts") / "acts"
    data = SyntheticFeatures(SMALL, batch_size=256)
    write_cache((data.batch(i) for i in range(8)), path, d_in=16)
    return str(path)


def train_flags(acts, out, *extra):
    return ["train", "--cache", acts, "--out", str(out), "--d-sae", "32", "--batch-size", "128",
            "--warmup-steps", "1", "--sparsity-warmup-steps", "2", "--quiet", "--eval-tokens",
            "256", "--compute-dtype", "float32", "--device", "cpu", *map(str, extra)]


# 1. divergence


def test_an_overflowing_loss_stops_the_run_before_anything_is_saved(tmp_path):
    """A batch whose loss overflows fp32 (step 5): the run stops naming the step, the loss and
    the gradients; the checkpoint of step 4 is the last, finite and resumable; no sae/."""
    run = str(tmp_path / "run")
    tr = Trainer(config(), 16, Batches({5: lambda x: x * 1e30}), run)
    with pytest.raises(FloatingPointError, match=r"^step 5: the loss is inf; W_dec\.grad has \d+ "
                                                 r"non-finite entr.*checkpoint\.pt at step 4, is "
                                                 r"intact.*--skip-nonfinite"):
        tr.train()
    state = saved(run)
    assert state["step"] == 4 and all_finite(state)
    assert logged_steps(run) == [1, 2, 3, 4] and not os.path.exists(os.path.join(run, "sae"))
    again = Trainer(config(), 16, Batches(), run, resume=True)
    assert again.step == 4


def test_an_exp_overflow_of_r_mag_is_named_and_nothing_is_written(tmp_path):
    """fp32 through the Python API: r_mag = 89 overflows exp. Nothing is trained or written
    from it; a parameter that turns non-finite in an update stops the run too (no skipping)."""
    run = str(tmp_path / "run")
    tr = Trainer(config(), 16, Batches(), run)
    with torch.no_grad():
        tr.sae.r_mag[7] = 89.0
    with pytest.raises(FloatingPointError, match=r"before step 1: exp\(r_mag\) has 1 non-finite "
                                                 r"entry"):
        tr.train()
    assert sorted(os.listdir(run)) == [".lock"]
    tr = Trainer(config(skip_nonfinite=5), 16, Batches(), run, overwrite=True)
    tr.train(stop_after=2)
    step = tr.opt.step

    def breaks(*a, **k):
        out = step(*a, **k)
        with torch.no_grad():
            tr.sae.b_gate[0] = float("inf")
        return out

    tr.opt.step = breaks
    with pytest.raises(FloatingPointError, match=r"^step 3: after the update, b_gate has 1 "
                                                 r"non-finite entry.*step 2, is intact"):
        tr.train()
    assert saved(run)["step"] == 2 and all_finite(saved(run))


def test_skip_nonfinite_skips_bad_batches_then_stops(tmp_path):
    """--skip-nonfinite 1: the NaN batch of step 3 is skipped (no update, counted, logged
    even off the log_every grid), the one of step 6 stops the run; resumed with 2, it ends."""
    run = str(tmp_path / "run")
    bad = {3: with_nan, 6: with_nan}
    tr = Trainer(config(skip_nonfinite=1, log_every=100), 16, Batches(bad), run)
    before = {}

    def snapshot(step, total, rec):
        before[step] = [p.detach().clone() for p in tr.sae.parameters()]

    # (the batch is refused by the sparse encoder, or makes a NaN loss on the dense path)
    with pytest.raises(FloatingPointError, match=r"^step 6: .*non-finite.*1 batches skipped "
                                                 r"already"):
        tr.train(progress=snapshot)
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3]))  # step 3: no update
    assert not all(torch.equal(a, b) for a, b in zip(before[3], before[4]))
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["step"] for r in log] == [3] and "non-finite" in log[0]["skipped"]
    assert log[0]["tokens"] == 3 * 64
    state = saved(run)
    assert state["step"] == 5 and state["skipped"] == 1 and all_finite(state)
    tr = Trainer(config(skip_nonfinite=2, log_every=100), 16, Batches(bad), run, resume=True)
    records = tr.train()
    assert [r["step"] for r in records] == [6, 7, 8] and "skipped" in records[0]
    assert tr.skipped == 2 and os.path.exists(os.path.join(run, "sae", "cfg.json"))


def test_cli_fp16_divergence_keeps_the_last_good_checkpoint(acts, tmp_path, capsys):
    """The reported run (lr 1 in fp16, a checkpoint every step): one line naming the step and
    what is not finite, exit code 2, every saved checkpoint finite, and --resume gets back to
    the last one (and stops at the same step, the same way)."""
    run = tmp_path / "dv"
    flags = ["train", "--cache", acts, "--out", str(run), "--d-sae", "64", "--steps", "40",
             "--batch-size", "128", "--lr", "1", "--warmup-steps", "2",
             "--sparsity-warmup-steps", "4", "--l1-coefficient", "0.05", "--log-every", "1",
             "--checkpoint-every", "1", "--compute-dtype", "float16", "--quiet", "--device",
             "cpu"]
    assert cli.main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert "non-finite" in err or "the loss is" in err
    state = saved(run)
    assert state["step"] == step - 1 and all_finite(state)
    assert logged_steps(run) == list(range(1, step))
    assert cli.main(flags + ["--resume"]) == 2
    assert f"error: step {step}: " in capsys.readouterr().err


# 2. the run folder's lock


def test_a_trainer_holds_its_folder_until_it_is_done(tmp_path):
    run = str(tmp_path / "run")
    first = Trainer(config(), 16, Batches(), run)
    with pytest.raises(files.FolderInUseError, match=f"process {os.getpid()}"):
        Trainer(config(), 16, Batches(), run, overwrite=True)
    first.train(stop_after=2)  # kept after a train() that returns (its caller may write more)
    with pytest.raises(files.FolderInUseError):
        Trainer(config(), 16, Batches(), run, resume=True)
    first.close()
    with Trainer(config(), 16, Batches(), run, resume=True) as second:
        assert second.step == 2
        with pytest.raises(files.FolderInUseError):
            Trainer(config(), 16, Batches(), run, resume=True)
    bad = Trainer(config(), 16, Batches({4: with_nan}), run, resume=True)
    with pytest.raises(FloatingPointError):
        bad.train()  # a failed train() releases it
    Trainer(config(), 16, Batches(), run, resume=True).close()
    with pytest.raises(FileExistsError):  # a refused start releases it
        Trainer(config(), 16, Batches(), run)
    Trainer(config(), 16, Batches(), run, resume=True).close()


def test_a_second_process_is_refused_and_a_killed_one_frees_the_folder(acts, tmp_path, capsys):
    """`gsae-fast train` running in another process: a second one into its folder (with
    --overwrite or --resume) is refused naming its pid; once it is SIGKILLed the folder is
    free and its last checkpoint resumes."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gsae_fast.cli",
                             *train_flags(acts, run, "--steps", 1000000, "--checkpoint-every", 1)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not os.path.exists(run / "checkpoint.pt.sha256"):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.2)
        for how in ("--overwrite", "--resume"):
            assert cli.main(train_flags(acts, run, "--steps", 1000000, how)) == 2
            err = capsys.readouterr().err
            assert f"in use by another run (process {proc.pid})" in err, err
            assert len(err.strip().splitlines()) == 1
        assert (run / "checkpoint.pt").exists() and (run / "log.jsonl").exists()  # untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with files.FolderLock(run):
        pass
    data, d_in, _ = cache_training_batches(acts, 128)
    with Trainer(TrainConfig(**saved(run)["config"]), d_in, data, str(run), resume=True) as tr:
        assert tr.step >= 1 and not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_gather_waits_for_no_run(tmp_path, capsys):
    """`python -m gsae_fast.distributed gather RUN` rewrites RUN/checkpoint.pt: not while a
    run holds the folder; it writes the checkpoint with its digest."""
    run = str(tmp_path / "run")
    with Trainer(config(), 16, Batches(), run) as tr:
        tr.train(stop_after=2)
        assert distributed.main(["gather", run]) == 2
        assert "in use by another run" in capsys.readouterr().err
    assert distributed.main(["gather", run]) == 0
    checkpoints.verify_file(os.path.join(run, "checkpoint.pt"))
    assert distributed.main(["gather", str(tmp_path / "none")]) == 2
    assert "checkpoint.pt is missing" in capsys.readouterr().err


# 3. the log rewrite on resume


def test_the_log_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    """Killed after step 7 (checkpoint at 5): the resume drops the log lines of steps 6-7. A
    kill in the middle of that rewrite leaves the old log whole (and no temporary)."""
    run = str(tmp_path / "run")

    def killed_at_7(step, total, rec):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config(checkpoint_every=5), 16, Batches(), run).train(progress=killed_at_7)
    log = os.path.join(run, "log.jsonl")
    old = open(log).read()
    assert logged_steps(run) == list(range(1, 8))
    real_fsync = os.fsync

    def killed(fd):  # the new log is written to its temporary: die before it replaces the old
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(checkpoint_every=5), 16, Batches(), run, resume=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert open(log).read() == old
    assert not [n for n in os.listdir(run) if n.endswith(files.TMP_SUFFIX)]
    tr = Trainer(config(checkpoint_every=5), 16, Batches(), run, resume=True)
    assert tr.step == 5 and logged_steps(run) == [1, 2, 3, 4, 5]
    assert open(log).read() == "".join(old.splitlines(keepends=True)[:5])


# 4. every file through gsae_fast.files; a full disk


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path,
                                                                             monkeypatch):
    run = str(tmp_path / "run")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_fills_after_4(step, total, rec):
        if step == 4:
            monkeypatch.setattr(os, "fsync", full)

    tr = Trainer(config(checkpoint_every=2), 16, Batches(), run)
    path = os.path.join(run, "checkpoint.pt")
    with pytest.raises(OSError, match=f"no space left on device writing {path}") as e:
        tr.train(progress=disk_fills_after_4)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not [n for n in os.listdir(run) if n.endswith(files.TMP_SUFFIX)]
    checkpoints.verify_file(path)  # the step-2 checkpoint matches its digest
    assert Trainer(config(checkpoint_every=2), 16, Batches(), run, resume=True).step == 2


def test_cli_full_disk_is_one_line(acts, tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert cli.main(train_flags(acts, tmp_path / "run", "--steps", 3)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gsae-fast train: error: [Errno 28] no space left on device writing "
                   f"{tmp_path / 'run' / 'checkpoint.pt'} (the previous version, if any, is "
                   f"intact; free space and retry)")


TMPFS_SCRIPT = """
import json, os, sys
from gsae_fast import checkpoints, cli
flags, run = json.loads(sys.argv[1]), sys.argv[2]
code = cli.main(flags)
print(json.dumps({"code": code, "step": checkpoints.read_checkpoint(
    os.path.join(run, "checkpoint.pt"))["step"], "files": sorted(os.listdir(run))}))
"""


def test_a_real_full_disk(acts, tmp_path):
    """A tmpfs (in a private mount namespace) with room for one checkpoint and not for the
    next beside it: the run stops with the one line naming the file; the first checkpoint
    stays whole."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare command: cannot mount a small file system here")
    probe = tmp_path / "probe"
    assert cli.main(train_flags(acts, probe, "--steps", 3, "--d-sae", 1024)) == 0
    size = os.path.getsize(probe / "checkpoint.pt")
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    flags = train_flags(acts, run, "--steps", 3, "--checkpoint-every", 1, "--d-sae", 1024)
    kb = (3 * size // 2) // 1024
    shell = (f"mount -t tmpfs -o size={kb}k tmpfs {disk} || exit 77; "
             f"exec {sys.executable} -c '{TMPFS_SCRIPT}' '{json.dumps(flags)}' {run}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode == 77 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 2 and out["step"] == 1
    assert f"no space left on device writing {run / 'checkpoint.pt'}" in proc.stderr
    assert not [n for n in out["files"] if n.endswith(files.TMP_SUFFIX)]


# 5. checkpoint integrity; a changed --steps


def damage(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "bit-flipped":
        data = bytearray(data)
        data[len(data) // 3] ^= 0x10
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how,says", [
    ("truncated", "is truncated or damaged"), ("empty", "is empty"),
    ("bit-flipped", "damaged|has changed"), ("key-less", "has no 'optimizer'")])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, capsys, acts, how, says):
    run = tmp_path / "run"
    assert cli.main(train_flags(acts, run, "--steps", 3)) == 0
    path = str(run / "checkpoint.pt")
    if how == "key-less":  # a readable file whose digest matches, without the Adam state
        state = saved(run)
        del state["optimizer"]
        checkpoints.write_checkpoint(state, path)
    else:
        damage(path, how)
    assert cli.main(train_flags(acts, run, "--steps", 3, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gsae-fast train: error: {path} ") and re.search(says, err), err
    assert len(err.splitlines()) == 1
    if how in ("truncated", "empty"):  # without the digest (an older checkpoint): still named
        os.remove(path + checkpoints.CHECKSUM)
        with pytest.raises(checkpoints.CheckpointError, match=f"^{re.escape(path)} {says}"):
            Trainer(config(), 16, Batches(), str(run), resume=True)


def test_a_damaged_rank_file_is_named(tmp_path):
    """A feature-sharded checkpoint (one rank here): each rank file's digest is in the
    checkpoint.pt that lists it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        Trainer(config(parallel="feature"), 16, Batches(), str(tmp_path / "run")).train(
            stop_after=2)
    finally:
        dist.destroy_process_group()
    rank_file = tmp_path / "run" / "checkpoint-00000002.rank0-of-1.pt"
    state = checkpoints.read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["step"] == 2
    damage(rank_file, "bit-flipped")
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"^{re.escape(str(rank_file))} (is .*damaged|has changed)"):
        Trainer(config(), 16, Batches(), str(tmp_path / "run"), resume=True)


def test_a_finished_run_can_be_extended_while_its_lr_schedule_allows(tmp_path):
    """Without a decay begun, --steps may grow (or shrink to no less than the checkpoint's
    step) on resume: the run equals an uninterrupted one of the new length. Once the decay has
    lowered the lr, another --steps or --decay-start is refused, saying what to give."""
    straight = Trainer(config(steps=12), 16, Batches(), str(tmp_path / "a")).train()
    run = str(tmp_path / "b")
    Trainer(config(steps=8), 16, Batches(), run).train()
    with Trainer(config(steps=12), 16, Batches(), run, resume=True) as tr:
        assert tr.notes and "steps=12" in tr.notes[0]
        assert [r["loss"] for r in tr.train()] == [r["loss"] for r in straight[8:]]
    assert logged_steps(run) == list(range(1, 13))
    with pytest.raises(ValueError, match="at step 12, past steps=10: give --steps 12 or more"):
        Trainer(config(steps=10), 16, Batches(), run, resume=True)
    with pytest.raises(ValueError, match="give --decay-start 12 or later"):
        Trainer(config(steps=20, decay_start=9), 16, Batches(), run, resume=True)
    Trainer(config(steps=20, decay_start=14), 16, Batches(), run, resume=True).train()
    with pytest.raises(ValueError, match=r"decayed since step 14 toward step 20.*resume with "
                                         r"--steps 20 --decay-start 14"):
        Trainer(config(steps=30, decay_start=14), 16, Batches(), run, resume=True)
    with pytest.raises(ValueError, match="different configuration.*'lr'"):
        Trainer(config(steps=20, decay_start=14, lr=1e-2), 16, Batches(), run, resume=True)


def test_a_checkpoint_from_before_skip_nonfinite_resumes(tmp_path):
    run = str(tmp_path / "run")
    Trainer(config(), 16, Batches(), run).train(stop_after=3)
    state = saved(run)
    del state["config"]["skip_nonfinite"], state["skipped"]
    torch.save(state, os.path.join(run, "checkpoint.pt"))  # an older version's: no digest
    os.remove(os.path.join(run, "checkpoint.pt" + checkpoints.CHECKSUM))
    tr = Trainer(config(skip_nonfinite=3), 16, Batches(), run, resume=True)
    assert tr.step == 3 and tr.skipped == 0


# 6. the command's errors


def test_cli_user_errors_are_one_line_and_bugs_keep_their_traceback(acts, tmp_path, capsys,
                                                                    monkeypatch):
    (tmp_path / "file").write_text("")
    for argv, says in [
            (train_flags(acts, tmp_path / "file", "--steps", 3), "is a file"),
            (train_flags(acts, tmp_path / "none", "--steps", 3, "--resume"), "no checkpoint"),
            (train_flags(acts, tmp_path / "x", "--steps", 3, "--skip-nonfinite", -1),
             "skip_nonfinite")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "none").exists()

    def bug(self, x):
        raise TypeError("a bug")

    monkeypatch.setattr(Trainer, "train_step", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(train_flags(acts, tmp_path / "y", "--steps", 3))
    Trainer(config(), 16, Batches(), str(tmp_path / "y"), overwrite=True).close()  # released
