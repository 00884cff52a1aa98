"""Data-parallel and feature-sharded training (gsae_fast.distributed) on the gloo backend with 2
processes, against single-process runs of the same batches in float64: the sharded loss and
every gradient; training runs step for step (losses, parameters, Adam state, dead-feature
counters); checkpoints saved with 2 ranks and loaded with 1, and the reverse; the gathered
SAELens export; the CLI under torchrun.

One spawn of 2 processes does all the distributed work (the workers save what they computed);
the single-process runs and all the comparisons happen in this process."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_params, make_x, rel_err
from gsae_fast import GatedSAE, checkpoints, cli, distributed, reference
from gsae_fast.distributed import FEATURE_DIM, RankShard, feature_range
from gsae_fast.synthetic import SyntheticConfig, SyntheticFeatures
from gsae_fast.train import TrainConfig, Trainer

WORLD = 2
D_IN, D_SAE, BATCH = 16, 37, 64  # 37: the ranks hold 19 and 18 features
SYN = SyntheticConfig(d_in=D_IN, n_features=40, target_l0=4)
# A: the paper's recipe (after the first step the loss takes the dense path: d_sae is small);
# B: SAELens' recipe on the sparse path throughout (the dense switch turned off).
RUNS = {"A": (dict(decoder="unit_norm", aux="frozen"), None),
        "B": (dict(decoder="norm_penalty", aux="shared"), 1.0)}
# The other architectures, data parallel (feature sharding is Gated-only): dead features from
# the first steps on, so that AuxK and the pre-activation loss act.
DATA_RUNS = {"jumprelu": dict(arch="jumprelu", pre_act_loss_coefficient=0.01,
                              dead_after_tokens=64),
             "topk": dict(arch="topk", k=4, dead_after_tokens=64)}
LOSS_CASES = [(sp, aux, dense) for sp in ("unit", "decoder_norm")
              for aux in ("frozen", "shared", "none") for dense in (False, True)]
TOL = 1e-10  # float64 throughout: only summation order differs


class Stream:
    """The synthetic batches (made in fp32 beforehand: the runs set fp64 as the default
    dtype), resumable."""
    BATCHES = [SyntheticFeatures(SYN, batch_size=BATCH).batch(i) for i in range(10)]

    def __init__(self):
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return self.BATCHES[self.position - 1]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def config(**kw):
    base = dict(d_sae=D_SAE, l1_coefficient=0.5, steps=10, batch_size=BATCH, lr=3e-3,
                warmup_steps=2, sparsity_warmup_steps=3, log_every=1, dead_after_tokens=256,
                compute_dtype="float64", checkpoint_every=5)
    base.update(kw)
    return TrainConfig(**base)


@contextlib.contextmanager
def dense_switch(fraction):
    """The CPU's dense switch set to ``fraction`` (None: as it is) for the block."""
    from gsae_fast import dense_switch as ds
    old = ds._dense_switch_override.get("cpu")
    ds.set_dense_switch(old if fraction is None else fraction, "cpu")
    try:
        yield
    finally:
        ds.set_dense_switch(old, "cpu")


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # master weights and Adam in fp64 too
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def snapshot(tr: Trainer) -> dict:
    """Parameters, Adam state and dead-feature counters of a trainer (this rank's part)."""
    out = {"since_fired": tr.since_fired.clone()}
    for name, p in tr.sae.named_parameters():
        out[name] = p.detach().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{k}"] = tr.opt.state[p][k].clone()
    return out


def losses(records):
    return [[r[k] for k in ("loss", "mse", "sparsity", "aux", "l0", "dead_fraction", "tokens")]
            for r in records]


def loss_inputs(case_seed=0):
    p, W_dec = make_params(D_IN, D_SAE, l0_frac=0.2, seed=case_seed)
    p["W_dec"] = W_dec
    return p, make_x((BATCH, D_IN), seed=case_seed + 1)


# ------------------------------------------------------------------------------ the workers


def _sharded_loss_grads(rank):
    out = {}
    start, stop = feature_range(D_SAE, rank, WORLD)
    for case in LOSS_CASES + ["silent"]:
        sp, aux, dense = case if case != "silent" else ("unit", "shared", False)
        p, x = loss_inputs()
        if case == "silent":  # no feature of rank 1 opens: the rank must still take part
            p["b_gate"][feature_range(D_SAE, 1, WORLD)[0]:] = -100.0
        t = {k: (v if k == "b_dec" else v.narrow(FEATURE_DIM[k], start, stop - start))
             .clone().requires_grad_() for k, v in p.items()}
        res, _ = distributed.feature_sharded_loss(
            x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"], t["r_mag"], t["b_mag"], 0.3,
            sparsity=sp, aux=aux, dense=dense, backend="cpu")
        res.loss.backward()
        out[case] = {"values": [float(getattr(res, k)) for k in
                                ("loss", "mse", "sparsity", "aux", "l0")],
                     "grads": {k: v.grad for k, v in t.items()}}
    return out


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    def data():
        return RankShard(Stream(), rank, WORLD)

    def resume(src, dst, mode, **kw):  # a copy of a run folder continued in `mode`
        if rank == 0:
            shutil.copytree(os.path.join(root, src), os.path.join(root, dst))
        dist.barrier()
        tr = Trainer(config(parallel=mode, **kw), D_IN, data(), os.path.join(root, dst),
                     resume=True)
        return losses(tr.train())

    try:
        out = {"loss": _sharded_loss_grads(rank), "runs": {}}
        for name, (kw, fraction) in RUNS.items():
            with dense_switch(fraction):
                for mode in ("feature", "data"):
                    tr = Trainer(config(parallel=mode, **kw), D_IN, data())
                    out["runs"][name, mode] = (losses(tr.train()), snapshot(tr), tr.features)
        for name, kw in DATA_RUNS.items():
            tr = Trainer(config(parallel="data", **kw), D_IN, data())
            out["runs"][name, "data"] = (losses(tr.train()), snapshot(tr), tr.features)
        a = RUNS["A"][0]
        Trainer(config(parallel="feature", **a), D_IN, data(), os.path.join(root, "feat_full")
                ).train()
        for mode in ("feature", "data"):  # killed after step 5 (the checkpoint of step 5)
            Trainer(config(parallel=mode, **a), D_IN, data(), os.path.join(root, f"{mode}_half")
                    ).train(stop_after=5)
        out["resumed"] = {  # (saved by, resumed in): 2 -> 2, DP -> sharded, 1 -> 2
            ("feature", "feature"): resume("feature_half", "ff", "feature", **a),
            ("data", "feature"): resume("data_half", "df", "feature", **a),
            ("single", "feature"): resume("single_half", "sf", "feature", **a),
            ("single", "data"): resume("single_half", "sd", "data", **a)}
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The single-process runs here, then the 2-process runs; everything each computed."""
    root = str(tmp_path_factory.mktemp("dist"))
    single = {}
    with float64():
        for name, (kw, fraction) in RUNS.items():
            with dense_switch(fraction):
                tr = Trainer(config(**kw), D_IN, Stream())
                single[name] = (losses(tr.train()), snapshot(tr))
        for name, kw in DATA_RUNS.items():
            tr = Trainer(config(**kw), D_IN, Stream())
            single[name] = (losses(tr.train()), snapshot(tr))
        Trainer(config(**RUNS["A"][0]), D_IN, Stream(),
                os.path.join(root, "single_half")).train(stop_after=5)
    mp.spawn(_worker, args=(_free_port(), root), nprocs=WORLD)
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False)
             for r in range(WORLD)]
    return dict(root=root, single=single, ranks=ranks)


def assert_close_records(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        for k, a, b in zip(("loss", "mse", "sparsity", "aux", "l0", "dead", "tokens"), g, w):
            assert abs(a - b) <= TOL * max(1.0, abs(b)), (step, k, a, b)


# -------------------------------------------------------------------------------- the tests


def test_feature_range_splits_evenly():
    assert [feature_range(37, r, 2) for r in range(2)] == [(0, 19), (19, 37)]
    assert [feature_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [t.shape[0] for t in torch.arange(10).tensor_split(4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="at least one feature per rank"):
        feature_range(3, 0, 4)


def test_sharded_loss_and_gradients_equal_the_single_process_ones(run):
    """Both sparsity weightings, aux frozen / shared / none, sparse and dense paths, and a rank
    whose features are all closed: the loss and every gradient (b_dec included: decoder bias
    plus the encoder centring summed over ranks) equal the unsharded reference."""
    for case in LOSS_CASES + ["silent"]:
        sp, aux, _ = case if case != "silent" else ("unit", "shared", False)
        p, x = loss_inputs()
        if case == "silent":
            p["b_gate"][feature_range(D_SAE, 1, WORLD)[0]:] = -100.0
        t = {k: v.clone().requires_grad_() for k, v in p.items()}
        ref = reference.gated_sae_loss(x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"],
                                       t["r_mag"], t["b_mag"], 0.3, sparsity=sp, aux=aux)
        ref.loss.backward()
        want = [float(getattr(ref, k).detach()) for k in ("loss", "mse", "sparsity", "aux", "l0")]
        for r in run["ranks"]:
            got = r["loss"][case]["values"]
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), case
        for k, v in t.items():
            parts = [r["loss"][case]["grads"][k] for r in run["ranks"]]
            if k == "b_dec":  # replicated: the whole gradient on every rank
                for g in parts:
                    assert rel_err(g, v.grad) < 1e-12, (case, k)
            else:
                assert rel_err(torch.cat(parts, FEATURE_DIM[k]), v.grad) < 1e-12, (case, k)
    assert run["ranks"][1]["loss"]["silent"]["grads"]["W_enc"].abs().max() == 0


@pytest.mark.parametrize("name", list(RUNS))
def test_feature_sharded_training_matches_one_process(run, name):
    want_records, want = run["single"][name]
    parts = [r["runs"][name, "feature"] for r in run["ranks"]]
    assert [p[2] for p in parts] == [(0, 19), (19, 37)]
    for records, _, _ in parts:
        assert_close_records(records, want_records)
    for key, value in want.items():
        base = key.split(".")[0]
        got = [p[1][key] for p in parts]
        if base == "b_dec":
            assert all(rel_err(g, value) < TOL for g in got), key
        else:
            dim = 0 if base == "since_fired" else FEATURE_DIM[base]
            assert rel_err(torch.cat(got, dim), value) < TOL, key


@pytest.mark.parametrize("name", list(RUNS) + list(DATA_RUNS))
def test_data_parallel_training_matches_one_process(run, name):
    want_records, want = run["single"][name]
    for r in run["ranks"]:
        records, got, _ = r["runs"][name, "data"]
        assert_close_records(records, want_records)
        for key, value in want.items():
            assert rel_err(got[key], value) < TOL, key


def test_resume_on_another_number_of_ranks(run):
    """Checkpoints at step 5 (sharded with 2 ranks, data parallel with 2, one process),
    continued to step 10 with 2 ranks sharded or data parallel: the steps of an unbroken
    single-process run."""
    want = run["single"]["A"][0][5:]
    for r in run["ranks"]:
        for key, records in r["resumed"].items():
            assert [rec[-1] for rec in records] == [w[-1] for w in want], key  # tokens
            assert_close_records(records, want)


def test_sharded_checkpoint_loads_in_one_process(run, tmp_path):
    """2 ranks -> 1: the sharded checkpoint of step 5 resumed by one process continues as the
    unbroken run; the rank files and the commit point are as documented."""
    root = run["root"]
    files = sorted(os.listdir(os.path.join(root, "feature_half")))
    assert files == [".lock", "checkpoint-00000005.rank0-of-2.pt",
                     "checkpoint-00000005.rank1-of-2.pt", "checkpoint.pt", "checkpoint.pt.sha256",
                     "log.jsonl"]
    shutil.copytree(os.path.join(root, "feature_half"), tmp_path / "run")
    with float64():
        tr = Trainer(config(**RUNS["A"][0]), D_IN, Stream(),
                     str(tmp_path / "run"), resume=True)
        assert tr.step == 5 and tr.since_fired.shape == (D_SAE,)
        assert_close_records(losses(tr.train()), run["single"]["A"][0][5:])
        want = run["single"]["A"][1]
        for key, value in snapshot(tr).items():
            assert rel_err(value, want[key]) < TOL, key
    logged = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert logged == list(range(1, 11))
    # a config that differs (other than `parallel`) is refused, as for one file
    with float64(), pytest.raises(ValueError, match="different configuration"):
        Trainer(config(lr=1e-2, **RUNS["A"][0]), D_IN, Stream(),
                os.path.join(root, "feature_half"), resume=True)


def test_gathered_checkpoint_and_export(run, tmp_path):
    """The sharded run's sae/ (SAELens format) and its gathered single-file checkpoint hold
    the single-process run's parameters and Adam state."""
    root = os.path.join(run["root"], "feat_full")
    want = run["single"]["A"][1]
    sae = GatedSAE.load(os.path.join(root, "sae"))
    for name, p in sae.named_parameters():
        assert rel_err(p, want[name]) < TOL, name
    assert distributed.main(["gather", root, "--out", str(tmp_path / "one.pt"), "--sae",
                             str(tmp_path / "sae")]) == 0
    state = torch.load(tmp_path / "one.pt", weights_only=False)
    assert "sharded" not in state and state["step"] == 10
    assert "features" not in state  # a rank file's own range does not leak into the gathered one
    names = list(state["sae"])
    for i, name in enumerate(names):
        assert rel_err(state["sae"][name], want[name]) < TOL, name
        assert rel_err(state["optimizer"]["state"][i]["exp_avg_sq"],
                       want[name + ".exp_avg_sq"]) < TOL, name
    assert torch.equal(state["since_fired"], want["since_fired"])
    assert torch.equal(GatedSAE.load(tmp_path / "sae").W_enc, sae.W_enc)


def test_data_positions_per_rank():
    state = {"data": {"position": 1}, "data_per_rank": [{"position": 1}, {"position": 2}]}
    assert distributed.data_state(state, 1, 2) == {"position": 2}
    with pytest.raises(ValueError, match="resume with 2 ranks"):
        distributed.data_state(state, 0, 3)
    same = {"data": {"p": torch.ones(2)}, "data_per_rank": [{"p": torch.ones(2)}] * 2}
    assert torch.equal(distributed.data_state(same, 0, 1)["p"], torch.ones(2))


def test_parallel_needs_a_process_group(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun"):
        Trainer(config(parallel="data"), D_IN, Stream())
    with pytest.raises(ValueError, match="parallel"):
        config(parallel="model").check()
    assert cli.main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "r"),
                     "--parallel", "feature", "--quiet"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_cli_feature_sharded_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m gsae_fast.cli train --parallel feature` logs the losses
    of the single-process command on the same cache and exports the whole SAE."""
    from gsae_fast.activations import write_cache
    data = SyntheticFeatures(SYN, batch_size=256)
    write_cache((data.batch(i) for i in range(4)), tmp_path / "acts", d_in=D_IN)
    flags = ["--cache", str(tmp_path / "acts"), "--d-sae", str(D_SAE), "--steps", "6",
             "--batch-size", str(BATCH), "--lr", "3e-3", "--warmup-steps", "1",
             "--sparsity-warmup-steps", "2", "--log-every", "1", "--eval-tokens", "256",
             "--compute-dtype", "float64", "--quiet", "--device", "cpu"]
    assert cli.main(["train", "--out", str(tmp_path / "one"), *flags]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "gsae_fast.cli", "train", "--out",
                           str(tmp_path / "two"), "--parallel", "feature", *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def logged(run):
        return [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]

    one, two = logged("one"), logged("two")
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):  # fp32 master weights: a looser bound than the fp64 runs
        for k in ("loss", "mse", "sparsity", "aux", "l0"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    sae_one, sae_two = (GatedSAE.load(tmp_path / r / "sae") for r in ("one", "two"))
    assert sae_two.d_sae == D_SAE
    assert rel_err(sae_two.W_dec, sae_one.W_dec) < 1e-4
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["metrics"]["fve"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["metrics"]["fve"],
        rel=1e-3)


def test_cli_data_parallel_from_a_model(tmp_path, capsys):
    """From a model, each rank runs it over its own documents (every 2nd one) into its half of
    every batch: the log counts the global tokens, the checkpoint keeps both ranks' stream
    positions, and resuming on another number of ranks is refused with the reason."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=D_IN, n_head=2, vocab_size=300,
                                   n_positions=64)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "model")
    words = "the cat sat on a mat while dogs ran far away from home".split()
    g = torch.Generator().manual_seed(1)
    (tmp_path / "texts.txt").write_text("\n".join(
        " ".join(words[i] for i in torch.randint(len(words), (40,), generator=g))
        for _ in range(40)) + "\n")
    flags = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "texts.txt"),
             "--layer", "resid:0", "--context-len", "32", "--d-sae", "32", "--steps", "4",
             "--batch-size", "128", "--buffer-tokens", "512", "--warmup-steps", "1",
             "--sparsity-warmup-steps", "2", "--log-every", "1", "--quiet", "--eval-tokens",
             "256", "--ce-contexts", "4", "--device", "cpu", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "gsae_fast.cli", *flags,
                           "--parallel", "data"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["tokens"] for r in log] == [128, 256, 384, 512]
    assert log[-1]["mse"] < log[0]["mse"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    a, b = state["data_per_rank"]
    assert not distributed._same(a, b)  # two streams
    assert GatedSAE.load(tmp_path / "run" / "sae").d_sae == 32
    assert "ce_loss" in json.loads((tmp_path / "run" / "summary.json").read_text())
    assert cli.main([*flags, "--resume"]) == 2
    assert "resume with 2 ranks" in capsys.readouterr().err


def test_sharded_checkpoint_resliced_for_other_rank_counts(run):
    """2 rank files read for 3 and 4 ranks (ranges that straddle the files' boundary at 19):
    the slices put together are the whole checkpoint, Adam moments and dead counters too; an
    export reads no Adam state."""
    path = os.path.join(run["root"], "feature_half", "checkpoint.pt")
    whole = checkpoints.read_checkpoint(path)
    names = list(whole["sae"])
    for world in (3, 4):
        parts = [checkpoints.read_checkpoint(path, feature_range(D_SAE, r, world))
                 for r in range(world)]
        for i, name in enumerate(names):
            dim = FEATURE_DIM.get(name)
            for get in (lambda st: st["sae"][name],
                        lambda st: st["optimizer"]["state"][i]["exp_avg_sq"]):
                got = ([get(p) for p in parts] if dim is None else
                       [torch.cat([get(p) for p in parts], dim)])
                assert all(torch.equal(g, get(whole)) for g in got), (world, name)
        assert torch.equal(torch.cat([p["since_fired"] for p in parts]), whole["since_fired"])
        assert all(p["step"] == 5 and "features" not in p for p in parts)
    bare = checkpoints.read_checkpoint(path, optimizer=False)
    assert "optimizer" not in bare
    assert all(torch.equal(bare["sae"][k], whole["sae"][k]) for k in names)


def test_init_makes_each_ranks_gpu_current(monkeypatch):
    """NCCL's barrier and object collectives use the current CUDA device: init sets it, also
    for a process group the caller made, and LOCAL_RANK counts modulo the visible GPUs (a
    launcher that gives each process its one GPU)."""
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.init("cuda") == (3, 4, torch.device("cuda", 1))
    assert made == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.init("cuda")[2] == torch.device("cuda", 0)
    assert distributed.init("cuda:0")[2] == torch.device("cuda", 0)
    assert made[1:] == [torch.device("cuda", 0)] * 2
    assert distributed.init("cpu")[2] == torch.device("cpu") and len(made) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # several ranks per node: no fixed index
    with pytest.raises(ValueError, match="without an index"):
        distributed.init("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        distributed.init("cuda")


def test_resume_with_fewer_gpus_than_saved_rng_states(monkeypatch, tmp_path):
    """A checkpoint holds one CUDA RNG state per GPU its process saw (8 on an 8-GPU node);
    resuming where fewer are visible (fewer ranks, CUDA_VISIBLE_DEVICES) sets only those
    (torch.cuda.set_rng_state_all would index past the visible GPUs)."""
    Trainer(config(), D_IN, Stream(), str(tmp_path)).train(stop_after=1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) + i for i in range(8)]
    checkpoints.write_checkpoint(state, str(tmp_path / "checkpoint.pt"))  # with its digest
    got = []

    def set_all(states):  # torch's: set_rng_state(s, i) looks up default_generators[i]
        generators = ("gpu0", "gpu1")  # two visible GPUs
        for i, s in enumerate(states):
            generators[i]  # IndexError past them
            got.append(s)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    tr = Trainer(config(), D_IN, Stream(), str(tmp_path), resume=True)
    assert tr.step == 1 and [int(s[0]) for s in got] == [0, 1]
