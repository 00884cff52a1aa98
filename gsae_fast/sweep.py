"""Many SAEs from one pass over the activations: :class:`SweepTrainer`.

A sweep trains several configurations (other sparsity coefficients, k, widths, learning rates,
architectures, ...) on the same batches: every batch is read (or produced by the model) once and
fed to each member in turn. Each member keeps its own SAE, optimiser, schedules, dead-feature
counts and log, and gets its own folder ``OUT/NAME/`` (``log.jsonl``, ``sae/``, the CLI's
``summary.json``), exactly what a separate run would write; member ``i`` equals a separate
:class:`~gsae_fast.train.Trainer` run of its configuration on the same data, step for step.

What the members share, and so must agree on: the batches (``batch_size``, the data's ``seed``),
the length of the run and its rhythm (``steps``, ``checkpoint_every``, ``log_every``), the
activations' scaling (``normalize_activations``, ``norm_estimate_batches``: estimated once) and
``parallel`` (a sweep runs in one process).

The checkpoint is one file, ``OUT/sweep_checkpoint.pt`` (every member's state and the data's
position, written atomically with its sha256): a kill at any moment leaves the members at one
common step, and ``resume=True`` continues all of them exactly. A resume with other members
(names or configurations) is refused.

    sweep = SweepTrainer([TrainConfig(l1_coefficient=c) for c in (0.5, 1, 2)], d_in, batches,
                         "runs/l1/", names=["l1=0.5", "l1=1", "l1=2"])
    sweep.train()
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
from dataclasses import asdict, fields
from typing import Callable, Optional, Sequence

import torch

from . import checkpoints, files
from .data.normalize import estimate_norm_scale
from .train import TrainConfig, Trainer, truncate_log

# The fields every member must share (see the module's docstring).
SHARED = ("batch_size", "steps", "checkpoint_every", "log_every", "seed",
          "normalize_activations", "norm_estimate_batches", "parallel")
CHECKPOINT = "sweep_checkpoint.pt"


def member_name(overrides: dict) -> str:
    """A folder name from a member's settings: ``l1_coefficient=0.5_k=32``."""
    name = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)


def grid(base: dict, values: dict) -> tuple[list, list]:
    """(configurations, names) of every combination of ``values`` (field -> list of values)
    over ``base`` (TrainConfig fields as given: one left out, or None, takes the default of
    each member's architecture): ``grid({"d_sae": 4096}, {"l1_coefficient": [0.5, 1],
    "arch": ["gated", "jumprelu"]})``."""
    keys = list(values)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(values[k] for k in keys))]
    return members(base, combos)


def members(base: dict, overrides: Sequence[dict]) -> tuple[list, list]:
    """(configurations, names): ``base`` (as for :func:`grid`) with each mapping of
    ``overrides`` applied (a ``"name"`` key names the member; otherwise its settings do)."""
    known = {f.name for f in fields(TrainConfig)}
    cfgs, names = [], []
    for i, o in enumerate(overrides):
        if not isinstance(o, dict):
            raise ValueError(f"sweep member {i}: expected a mapping of settings, got "
                             f"{type(o).__name__}")
        o = dict(o)
        name = str(o.pop("name", "")) or member_name(o)
        bad = sorted(set(o) - known)
        if bad:
            raise ValueError(f"sweep member {i} ({name}): unknown setting {bad[0]!r}")
        cfgs.append(TrainConfig(**dict(base, **o)))
        names.append(name)
    return cfgs, names


class SweepTrainer(files.HoldsFolder):
    """Trains every configuration of ``cfgs`` on the batches of ``data`` (see the module's
    docstring); ``out_dir`` receives ``NAME/`` per member (``names``: default from the
    settings that differ) and the sweep's checkpoint. Holds the folder's lock (as a Trainer
    does) until :meth:`close` or the end of a ``with`` block. ``sinks``: per member name, the
    logging sinks of its records."""

    def __init__(self, cfgs: Sequence[TrainConfig], d_in: int, data, out_dir: Optional[str], *,
                 names: Optional[Sequence[str]] = None, device="cpu", resume: bool = False,
                 overwrite: bool = False, sinks: Optional[dict] = None):
        if not cfgs:
            raise ValueError("a sweep needs at least one configuration")
        cfgs = list(cfgs)
        for cfg in cfgs:
            cfg.check()
        names = list(names) if names is not None else default_names(cfgs)
        if len(names) != len(cfgs) or len(set(names)) != len(names):
            raise ValueError(f"a sweep needs one distinct name per member, got {names}")
        for key in SHARED:
            seen = {repr(getattr(c, key)) for c in cfgs}
            if len(seen) > 1:
                raise ValueError(f"{key} differs between the sweep's members ({', '.join(seen)}):"
                                 f" they read the same batches in one pass, so it cannot vary")
        if cfgs[0].parallel != "none":
            raise ValueError("a sweep runs in one process: parallel must be none")
        self.cfgs, self.names, self.data, self.out_dir = cfgs, names, data, out_dir
        self.device = torch.device(device)
        self.members = [Trainer(cfg, d_in, None, device=device) for cfg in cfgs]
        for m, name in zip(self.members, names):
            m.sinks = list((sinks or {}).get(name, ()))
        self.step = 0
        self.notes: list[str] = []
        if out_dir is None:
            if resume:
                raise FileNotFoundError("resume=True needs the sweep's out_dir")
            return
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise NotADirectoryError(f"{out_dir} is a file: the sweep's output must be a folder")
        os.makedirs(out_dir, exist_ok=True)
        self._hold(out_dir).acquire()
        try:
            self._open(resume, overwrite)
        except BaseException:
            self.close()
            raise

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    def folder(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _open(self, resume: bool, overwrite: bool) -> None:
        for name in os.listdir(self.out_dir):  # temporaries of writers killed mid-write
            if name.endswith(files.TMP_SUFFIX) and name.startswith((".", "sweep_checkpoint")):
                os.remove(os.path.join(self.out_dir, name))
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"resume=True but there is no sweep checkpoint at "
                                        f"{self.checkpoint_path}")
            self._load()
            return
        ours = [CHECKPOINT, CHECKPOINT + checkpoints.CHECKSUM, "sweep.json"] + self.names
        found = [n for n in ours if os.path.exists(os.path.join(self.out_dir, n))]
        if found and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds a sweep ({', '.join(found)}): "
                                  "resume it (--resume) or start over (--overwrite)")
        for name in found:
            path = os.path.join(self.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for name in self.names:
            os.makedirs(self.folder(name))
        files.write_json({"members": [dict(name=n, config=asdict(c))
                                      for n, c in zip(self.names, self.cfgs)]},
                         os.path.join(self.out_dir, "sweep.json"))

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        data = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        return {"step": self.step, "names": self.names, "data": data,
                "members": [m.state_dict() for m in self.members]}

    def save_checkpoint(self) -> None:
        checkpoints.write_checkpoint(self.state_dict(), self.checkpoint_path)

    def _load(self) -> None:
        path = self.checkpoint_path
        checkpoints.verify_file(path)  # (its sha256)
        state = checkpoints.load_file(path, ("step", "names", "members", "data"))
        if state["names"] != self.names:
            raise ValueError(f"{path} is a sweep of other members ({', '.join(state['names'])}) "
                             f"than this one ({', '.join(self.names)}): resume it with the same "
                             f"members, or start over (--overwrite)")
        for m, name, s in zip(self.members, self.names, state["members"]):
            try:
                m._check_config(s, path)
            except ValueError as e:
                raise ValueError(f"member {name}: {e}") from None
            m.load_state(s)
            truncate_log(os.path.join(self.folder(name), "log.jsonl"), s["step"])
            self.notes += [f"{name}: {note}" for note in m.notes]
        self.step = state["step"]
        if state["data"] is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise ValueError("the checkpoint has a data position but this data stream "
                                 "cannot resume (no load_state_dict)")
            self.data.load_state_dict(state["data"])

    # -- the loop ----------------------------------------------------------------------------

    def train(self, progress: Optional[Callable[[int, int, dict], None]] = None,
              stop_after: Optional[int] = None) -> dict:
        """Run every member to ``steps`` (or ``stop_after`` more steps); returns each member's
        records by name. ``progress(step, steps, records)`` after every step (records: name ->
        that step's record)."""
        try:
            return self._train(progress, stop_after)
        except BaseException:
            self.close()
            raise

    def _train(self, progress, stop_after) -> dict:
        cfg = self.cfgs[0]
        if cfg.normalize_activations != "none" and self.members[0].norm_scale is None:
            scale = estimate_norm_scale(self.data, cfg.norm_estimate_batches,
                                        self.members[0].sae.d_in, self.device)
            for m in self.members:
                m.norm_scale = scale
        logs = {}
        if self.out_dir:
            logs = {n: open(os.path.join(self.folder(n), "log.jsonl"), "a") for n in self.names}
        records = {n: [] for n in self.names}
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        try:
            while self.step < end:
                try:
                    x = next(self.data)
                except StopIteration:
                    raise RuntimeError(f"the data ran out at step {self.step} of {cfg.steps}"
                                       ) from None
                now = {}
                for m, name in zip(self.members, self.names):
                    rec = m.train_step(x)
                    now[name] = rec
                    records[name].append(rec)
                    m.log(rec, logs.get(name), end)
                self.step += 1
                if progress is not None:
                    progress(self.step, cfg.steps, now)
                if self.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            for f in logs.values():
                f.close()
        if self.out_dir:
            self.save_checkpoint()
            if self.step >= cfg.steps:
                for m, name in zip(self.members, self.names):
                    m.export_sae().save_pretrained(os.path.join(self.folder(name), "sae"))
        return records


def default_names(cfgs: Sequence[TrainConfig]) -> list:
    """Each member named by the settings in which the members differ."""
    dicts = [asdict(c) for c in cfgs]
    varying = [k for k in dicts[0] if k != "extra" and len({repr(d[k]) for d in dicts}) > 1]
    return [member_name({k: d[k] for k in varying}) for d in dicts]
