"""Training an SAE on the fast ops: Gated (``arch="gated"``, the default: the recipe of the
paper and of dictionary_learning's ``GatedSAETrainer``), JumpReLU, TopK and BatchTopK (SAELens'
training recipes); what differs between them is gsae_fast.recipes', the rest is shared:

- Adam (Gated: ``betas=(0.0, 0.999)`` as dictionary_learning), the learning rate and sparsity
  schedules of dictionary_learning's ``get_lr_schedule`` / ``get_sparsity_warmup_fn``: lr scale
  ``step / warmup_steps`` during the warm-up, then 1, then (with ``decay_start``) linear decay
  ``(steps - step) / (steps - decay_start)``; sparsity scale ``min(step / sparsity_warmup_steps,
  1)``.
- ``decoder="unit_norm"`` (the paper, dictionary_learning's ``ConstrainedAdam``): the gradient's
  component along each decoder row is removed before the step and the rows are renormalised
  after it, with the unit sparsity weights; ``decoder="norm_penalty"`` (SAELens' Gated): free
  rows and the ``|W_dec[i]|``-weighted sparsity penalty; ``decoder="free"`` (the others):
  free rows. ``max_grad_norm``: the gradient clipped to that norm (SAELens clips at 1).
- Mixed precision: ``compute_dtype="bfloat16"`` (the default on CUDA) runs the kernels in bf16
  on bf16 copies of the fp32 master parameters (the casts are differentiable, so the gradients
  and Adam stay fp32); autocast would not reach the custom ops.
- Dead features: tokens since each feature last fired; dead after ``dead_after_tokens`` (the
  mask JumpReLU's pre-activation loss and TopK's AuxK act on).
- Logs one JSON line per ``log_every`` steps (``log.jsonl``; with bf16 compute the logged
  losses are the bf16 ones); checkpoints (``checkpoint.pt``:
  parameters, Adam state, step, dead-feature counters, RNG states and the data stream's
  position) every ``checkpoint_every`` steps and at the end; ``resume=True`` continues from one
  exactly (the same loss curve as an uninterrupted run). ``steps`` (and ``decay_start``) may
  change on resume while the lr schedule of the steps already taken stays the same (no decay
  begun before the checkpoint under either setting): the run then equals an uninterrupted one
  with the new setting.
- Nothing lost: every file is written atomically (gsae_fast.files; a full disk raises ENOSPC
  naming the file and leaves the previous version), a checkpoint carries its sha256
  (``checkpoint.pt.sha256``, checked on resume), and the run folder is locked
  (gsae_fast.files.FolderLock) from the Trainer's creation until :meth:`Trainer.close`, the
  end of a ``with`` block, the Trainer's collection or a failed ``train``: a second run into
  it is refused.
- A non-finite loss or gradient stops the run before its update is applied (nothing
  non-finite is ever saved: the last checkpoint stays resumable), naming the step and the
  tensors; ``skip_nonfinite`` such batches are skipped first (no update; the step and its
  tokens count; the log line says ``"skipped"``). A parameter that is not finite (in the
  compute dtype; ``exp(r_mag)`` included) after an update always stops the run.
- ``normalize_activations="expected_average_only_in"`` (SAELens): before the first step,
  ``norm_estimate_batches`` batches (not trained on) give the scale ``sqrt(d_in) / mean |x|``
  that every batch is multiplied by; it is kept in the checkpoints and folded into the saved
  ``sae/`` (gsae_fast.interop.fold_input_scale), which then takes raw activations.
- The saved ``sae/`` carries SAELens' metadata of the data (gsae_fast.interop.training_metadata
  of ``cfg.extra``: model, hook name, context size, ...). ``sinks``: objects with ``log(record)``
  and ``close()`` that receive each logged record too (gsae_fast.sinks: TensorBoard, W&B).
- ``parallel="data"`` / ``"feature"``: data-parallel or feature-sharded training on
  ``torch.distributed`` (gsae_fast.distributed; run under ``torchrun``): each rank's ``data``
  yields its share of every step's tokens, and the run equals a single-process one on the
  concatenated batches.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

from . import checkpoints, distributed, files, interop, ops
from .data.normalize import estimate_norm_scale
from .recipes import recipe

# The run's configuration (its own module; these names stay importable from here).
from .train_config import (  # noqa: E402,F401
    AUX_MODES,
    BACKENDS,
    COMPUTE_DTYPES,
    DECODER_MODES,
    TrainConfig,
    compute_dtype,
)

# May differ on resume: how the run is spread, and how many bad batches it may skip.
RESUME_FREE = ("parallel", "skip_nonfinite")


def _entries(k: int) -> str:
    return f"{k} non-finite entr{'y' if k == 1 else 'ies'}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _logged_step(line: str) -> float:
    """The step of a log line; a line torn by a kill mid-write counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


class Trainer(files.HoldsFolder):
    """Trains the SAE of ``cfg.arch`` (:class:`~gsae_fast.GatedSAE`, ``JumpReLUSAE``, ``TopKSAE``,
    ``BatchTopKSAE``) on ``data`` (an iterator of ``[tokens, d_in]`` batches; with
    ``state_dict`` / ``load_state_dict`` for exact resumption).

    ``out_dir`` receives ``log.jsonl``, ``checkpoint.pt`` (and its ``.sha256``) and, at the
    end, ``sae/`` (SAELens format, :meth:`GatedSAE.load`). A directory that already holds a run
    is continued with ``resume=True``, replaced with ``overwrite=True``, and otherwise refused
    (never mixed). The Trainer holds the folder's lock (a second Trainer on it, in any process,
    gets FolderInUseError) until :meth:`close` (or the ``with`` block's end, or its collection),
    or until ``train`` fails.

    With ``cfg.parallel`` "data" or "feature" every rank builds a Trainer (joining the
    torchrun process group if none exists) with ``data`` yielding that rank's share of each
    step (:class:`gsae_fast.distributed.RankShard` of a global stream); ``out_dir`` must be one
    folder all ranks see (rank 0 holds its lock). In "feature" mode ``sae`` holds this rank's
    features ``features = (start, stop)``; the records (losses, L0, dead fraction) are global.
    """

    RUN_FILES = ("checkpoint.pt", "checkpoint.pt" + checkpoints.CHECKSUM, "log.jsonl", "sae",
                 "summary.json")

    def __init__(self, cfg: TrainConfig, d_in: int, data, out_dir: Optional[str] = None, *,
                 device="cpu", resume: bool = False, overwrite: bool = False, sinks=()):
        cfg.check()
        self.cfg, self.data, self.out_dir = cfg, data, out_dir
        self.sinks = list(sinks)
        # normalize_activations: the inputs' scale (estimated before the first step)
        self.norm_scale: Optional[float] = None
        self.rank, self.world = 0, 1
        if cfg.parallel != "none":
            self.rank, self.world, device = distributed.init(device)
            if cfg.batch_size < self.world:
                raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {self.world} "
                                 "ranks: every rank needs tokens")
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype(cfg.compute_dtype, self.device)
        torch.manual_seed(cfg.seed)
        self.recipe = recipe(cfg)
        self.features = (0, cfg.d_sae)
        if cfg.parallel == "feature":
            self.features = distributed.feature_range(cfg.d_sae, self.rank, self.world)
            self.sae = self.recipe.build(d_in, self.device, self.features)
        else:
            self.sae = self.recipe.build(d_in, self.device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.step = 0
        self.tokens = 0
        self.skipped = 0  # batches skipped for a non-finite loss or gradient (skip_nonfinite)
        self.saved_step: Optional[int] = None  # the step of the last checkpoint written or read
        self.notes: list[str] = []  # what a resume changed, for the caller to show
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=self.device)
        self.capacity: Optional[int] = None  # from the global largest row: picks dense/sparse
        self.local_capacity: Optional[int] = None  # "feature": this rank's encode
        if out_dir is None:
            if resume:
                raise FileNotFoundError("resume=True needs the run's out_dir")
            return
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise NotADirectoryError(f"{out_dir} is a file: the run's output must be a folder")
        if resume and not os.path.exists(self.checkpoint_path):  # (checked again when locked)
            raise FileNotFoundError(f"resume=True but there is no checkpoint at "
                                    f"{self.checkpoint_path}")
        os.makedirs(out_dir, exist_ok=True)
        if self.rank == 0:
            self._hold(out_dir)
        self._acquire()
        try:
            self._open_run(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        """Take the folder's lock (rank 0; every rank learns whether it got it)."""
        refused = None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except files.FolderInUseError as e:
                refused = str(e)
        if self.cfg.parallel != "none":
            box = [refused]
            torch.distributed.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused:
            raise files.FolderInUseError(refused)

    def _open_run(self, resume: bool, overwrite: bool) -> None:
        out_dir = self.out_dir
        if self.rank == 0:  # temporaries of writers killed mid-write (the lock says none runs)
            for name in os.listdir(out_dir):
                if name.endswith(files.TMP_SUFFIX) and name.startswith((".", "checkpoint")):
                    os.remove(os.path.join(out_dir, name))
        self._barrier()
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"resume=True but there is no checkpoint at "
                                        f"{self.checkpoint_path}")
            self.load_checkpoint(self.checkpoint_path)
            return
        found = [n for n in self.RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
        found += [n for n in os.listdir(out_dir) if checkpoints.SHARD_FILE.match(n)]
        if found and not overwrite:
            raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}): "
                                  "resume it (--resume) or start over (--overwrite)")
        self._barrier()  # every rank has looked before rank 0 removes
        for name in found if self.rank == 0 else ():
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self._barrier()

    def _barrier(self) -> None:
        if self.cfg.parallel != "none":
            torch.distributed.barrier()

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint.pt")

    # -- one step ----------------------------------------------------------------------------

    def in_compute_dtype(self, *tensors: torch.Tensor) -> list:
        """The kernels' inputs: differentiable casts of the fp32 masters (no copy when equal)."""
        cd = self.compute_dtype
        return [t if t.dtype == cd else t.to(cd) for t in tensors]

    def _loss(self, x: torch.Tensor):
        cfg = self.cfg
        coef = cfg.l1_coefficient * cfg.sparsity_scale(self.step)
        return self.recipe.loss(self, x, coef, self.since_fired >= cfg.dead_after_tokens)

    def _forward_backward(self, x: torch.Tensor):
        """(the loss with its gradients, None), or (None, what is not finite) when the encoder
        refuses the batch for NaN/Inf pre-activations (a bad batch, or an overflow in the
        compute dtype); another ValueError is raised as it is."""
        try:
            out = self._loss(x)
        except ValueError:
            problem = self._batch_problem(x)
            if problem is None:
                raise
            return None, problem
        out.loss.backward()
        return out, None

    @torch.no_grad()
    def _batch_problem(self, x: torch.Tensor) -> Optional[str]:
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            return f"the batch has {_entries(bad)}"
        s = self.sae
        xc, W, b = self.in_compute_dtype(x, s.W_enc, s.b_dec)
        bad = int((~torch.isfinite((xc - b) @ W)).sum())
        if bad:
            return (f"the pre-activations (x - b_dec) @ W_enc have {_entries(bad)} in "
                    f"{_name(xc.dtype)}")
        return None

    @torch.no_grad()
    def _nonfinite(self, named: list, dtype: Optional[torch.dtype] = None) -> list:
        """``"NAME has K non-finite entries"`` for each (name, tensor) with entries that are
        NaN, Inf or (``dtype``) beyond its range, over all ranks in "feature" mode (every rank
        gets the same answer); one host synchronisation when all are fine."""
        big = torch.finfo(dtype or torch.float64).max
        named = [(n, t.detach()) for n, t in named if t is not None]
        if not named:  # no gradients: the forward refused the batch (said by the caller)
            return []
        peaks = torch.stack([torch.maximum(t.amax(), -t.amin()).to(torch.float64)
                             for _, t in named])  # NaN propagates
        feature = self.cfg.parallel == "feature"
        if feature:
            torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        bad = [i for i, peak in enumerate(peaks.tolist()) if not peak <= big]
        if not bad:
            return []
        # (the limit in the tensor's own dtype: fp64's max would round to inf in fp32)
        counts = torch.stack([(~(t.abs() <= min(big, torch.finfo(t.dtype).max))).sum()
                              for t in (named[i][1] for i in bad)])
        if feature:  # b_dec (and its gradient) is the same on every rank: counted once
            if self.rank:
                counts *= torch.tensor([not named[i][0].startswith("b_dec") for i in bad],
                                       device=counts.device)
            torch.distributed.all_reduce(counts)
        where = "" if big >= torch.finfo(torch.float32).max else f" in {_name(dtype)}"
        return [f"{named[i][0]} has {_entries(int(k))}{where}"
                for i, k in zip(bad, counts.tolist())]

    def _parameter_problems(self) -> list:
        """Parameters that are not finite in the compute dtype (the kernels' inputs), and
        what the recipe derives from them there (Gated: ``exp(r_mag)``)."""
        cd = self.compute_dtype
        named = list(self.sae.named_parameters())
        named += self.recipe.extra_parameters(self.sae, cd)
        return self._nonfinite(named, cd)

    def _stop(self, step: int, problems: list, skippable: bool) -> FloatingPointError:
        if self.out_dir is None:
            kept = "nothing was saved"
        elif self.saved_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = (f"the last checkpoint, {self.checkpoint_path} at step {self.saved_step}, "
                    f"is intact")
        how = "start over (--overwrite) with a lower --lr or another --compute-dtype"
        if skippable and self.cfg.skip_nonfinite:
            how = (f"{self.skipped} batches skipped already, as many as --skip-nonfinite allows:"
                   f" resume with a larger one, or {how}")
        elif skippable:
            how = f"resume with --skip-nonfinite N to skip up to N such batches, or {how}"
        return FloatingPointError(f"step {step}: {'; '.join(problems)}; stopped before saving "
                                  f"anything ({kept}): {how}")

    def _dead_fraction(self) -> float:
        dead = (self.since_fired >= self.cfg.dead_after_tokens).sum()
        if self.cfg.parallel == "feature":
            torch.distributed.all_reduce(dead)
        return float(dead) / self.cfg.d_sae

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimisation step on the batch ``x``; returns its log record. A non-finite loss
        or gradient skips the update (``"skipped"`` in the record) while ``skip_nonfinite``
        allows, else raises FloatingPointError; so does a non-finite parameter after it."""
        cfg, sae = self.cfg, self.sae
        t0 = time.perf_counter()
        lr = cfg.lr * cfg.lr_scale(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = x.to(self.device).reshape(-1, sae.d_in)
        if self.norm_scale is not None:
            x = x * self.norm_scale
        if cfg.parallel == "feature":  # every rank encodes the whole batch
            x = distributed.gather_rows(x)
        self.opt.zero_grad(set_to_none=True)
        out, problem = self._forward_backward(x)
        stats = [float("nan")] * 5 if out is None else [
            float(v) for v in torch.stack([p.detach().to(torch.float64)
                                           for p in [out.loss] + out.parts]).tolist()]
        n = x.shape[0]
        if cfg.parallel == "data":  # gradients and logged values over all ranks' tokens
            stats, n = distributed.average_gradients(sae.parameters(), stats, n)
        # Checked before the update, so that a bad batch changes nothing.
        problems = [problem] if problem else []
        if not math.isfinite(stats[0]):
            problems.append(f"the loss is {stats[0]}")
        problems += self._nonfinite([(name + ".grad", p.grad)
                                     for name, p in sae.named_parameters()])
        if problems:
            self.opt.zero_grad(set_to_none=True)
            if self.skipped >= cfg.skip_nonfinite:
                raise self._stop(self.step + 1, problems, skippable=True)
            self.skipped += 1
            self.step += 1
            self.tokens += n
            return dict(self._record(stats, lr, t0), skipped="; ".join(problems))
        if cfg.decoder == "unit_norm":  # keep the step on the sphere of unit rows
            with torch.no_grad():
                W, g = sae.W_dec, sae.W_dec.grad
                g -= (g * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True)
        if cfg.max_grad_norm:  # (SAELens: after the backward, before the step)
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
        self.opt.step()
        if cfg.decoder == "unit_norm":
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        self.recipe.after_update(self, out)
        problems = self._parameter_problems()
        if problems:  # the update cannot be taken back: stop before anything is saved
            raise self._stop(self.step + 1, [f"after the update, {problems[0]}"] + problems[1:],
                             skippable=False)
        fired, max_count = self.recipe.fired(self, x, out), out.max_count
        if cfg.parallel == "data":  # (-1: no count, the dense reference ran)
            fired, max_count = distributed.any_fired(fired, -1 if max_count is None else max_count)
            max_count = None if max_count < 0 else max_count
        if max_count is not None:  # (else the hint stays)
            self.capacity = ops.next_capacity(max_count, cfg.d_sae)
        self.since_fired += n
        self.since_fired[fired] = 0
        self.step += 1
        self.tokens += n
        return self._record(stats, lr, t0)

    def _record(self, stats: list, lr: float, t0: float) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        loss, mse, sparsity, aux, l0 = stats
        return {"step": self.step, "tokens": self.tokens, "loss": loss, "mse": mse,
                "sparsity": sparsity, "aux": aux, "l0": l0, "lr": lr,
                "sparsity_scale": self.cfg.sparsity_scale(self.step - 1),
                "dead_fraction": self._dead_fraction(),
                "step_ms": 1e3 * (time.perf_counter() - t0)}

    # -- the loop ----------------------------------------------------------------------------

    def train(self, progress: Optional[Callable[[int, int, dict], None]] = None,
              stop_after: Optional[int] = None) -> list[dict]:
        """Run to ``cfg.steps`` (or ``stop_after`` more steps); returns the log records.
        ``progress(step, steps, record)`` is called after every step. On an error the run
        folder is released (the last checkpoint is what a resume continues from)."""
        cfg = self.cfg
        if self.out_dir is not None:
            self._acquire()  # again, if a failed train() released it
        try:
            records = self._train(progress, stop_after)
            if self.out_dir:
                self.save_checkpoint(self.checkpoint_path)
                if self.step >= cfg.steps and self.rank == 0:
                    self.export_sae().save_pretrained(os.path.join(self.out_dir, "sae"))
                self._barrier()
        except BaseException:
            self.close()
            raise
        return records

    def export_sae(self):
        """The trained SAE as ``sae/`` holds it (rank 0; "feature": the whole dictionary from
        the checkpoint just written): the input scale folded in, SAELens' metadata set. A copy:
        the trainer's own SAE is left as it trains."""
        if self.cfg.parallel == "feature":
            sae = checkpoints.gathered_sae(self.checkpoint_path, self.cfg.backend)
        else:
            sae = copy.deepcopy(self.sae)
        sae.sae_lens_metadata = dict(sae.sae_lens_metadata or {},
                                     **interop.training_metadata(self.cfg.extra))
        if self.norm_scale is not None:
            interop.fold_input_scale(sae, self.norm_scale)
        return sae

    def log(self, rec: dict, log_f, end: int) -> None:
        """Write ``rec`` to the log file ``log_f`` (None: none) and the sinks when it is a step
        to log: every ``log_every``, the last (``end``) and a skipped one. Whole lines appended
        and flushed: a kill tears at most the last one, which a resume drops (truncate_log)."""
        if self.step % self.cfg.log_every == 0 or self.step == end or "skipped" in rec:
            if log_f is not None:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
            for sink in self.sinks:
                sink.log(rec)

    def _train(self, progress, stop_after) -> list[dict]:
        cfg = self.cfg
        if cfg.normalize_activations != "none" and self.norm_scale is None:
            self.norm_scale = estimate_norm_scale(self.data, cfg.norm_estimate_batches,
                                                  self.sae.d_in, self.device,
                                                  distributed=cfg.parallel != "none")
        problems = self._parameter_problems()
        if problems:
            raise FloatingPointError(f"before step {self.step + 1}: {'; '.join(problems)}: "
                                     f"the parameters must be finite to train")
        log_f = (open(os.path.join(self.out_dir, "log.jsonl"), "a")
                 if self.out_dir and self.rank == 0 else None)
        records = []
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        try:
            while self.step < end:
                try:
                    x = next(self.data)
                except StopIteration:
                    raise RuntimeError(f"the data ran out after {self.tokens} tokens, at step "
                                       f"{self.step} of {cfg.steps}") from None
                rec = self.train_step(x)
                records.append(rec)
                if log_f is not None:
                    self.log(rec, log_f, end)
                if progress is not None:
                    progress(self.step, cfg.steps, rec)
                if self.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path)
        finally:
            if log_f is not None:
                log_f.close()
        return records

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        data = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        return {"config": asdict(self.cfg), "step": self.step, "tokens": self.tokens,
                "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "since_fired": self.since_fired, "capacity": self.capacity, "rng": rng,
                "data": data, "d_in": self.sae.d_in, "skipped": self.skipped,
                "norm_scale": self.norm_scale}

    def save_checkpoint(self, path: str) -> None:
        """One file (rank 0 in "data" mode), or one per rank and ``path`` last ("feature":
        gsae_fast.distributed.save_sharded); every rank calls it. Atomic, with its sha256
        (gsae_fast.checkpoints.write_checkpoint): a kill or a full disk leaves the previous
        checkpoint whole."""
        state = self.state_dict()
        if self.cfg.parallel != "none":  # every rank's data position (each reads its stream)
            # to rank 0 only, which writes them: a mixing buffer's position holds its buffer
            # (buffer_tokens x d_in), and under NCCL an object collective stages every rank's
            # pickle on the receiving GPU
            per_rank = [None] * self.world if self.rank == 0 else None
            torch.distributed.gather_object(state["data"], per_rank, dst=0)
            state["data_per_rank"] = per_rank
        if self.cfg.parallel == "feature":
            distributed.save_sharded(state, path, self.features, self.cfg.d_sae)
        else:
            if self.rank == 0:
                checkpoints.write_checkpoint(state, path)
            self._barrier()
        self.saved_step = self.step

    def _check_config(self, state: dict, path: str) -> None:
        """The checkpoint's configuration must be this one, but for RESUME_FREE fields and
        ``steps`` / ``decay_start`` where the lr of the steps already taken stays the same."""
        mine = asdict(self.cfg)
        # fields added since the checkpoint was written take their defaults
        theirs = dict(asdict(TrainConfig()), **state["config"])
        for c in (mine, theirs):
            c["betas"] = tuple(c["betas"])
            for k in RESUME_FREE:
                c.pop(k)
        old, new = ((c.pop("steps"), c.pop("decay_start")) for c in (theirs, mine))
        if theirs != mine or state["d_in"] != self.sae.d_in:
            diff = {k: (theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine)
                    if theirs.get(k) != mine.get(k)}
            if state["d_in"] != self.sae.d_in:
                diff["d_in"] = (state["d_in"], self.sae.d_in)
            raise ValueError(f"{path} was made with a different configuration: {diff}")
        if old != new:
            self._check_schedule(path, state["step"], old, new)

    def _check_schedule(self, path: str, step: int, old: tuple, new: tuple) -> None:
        """A new ``steps`` / ``decay_start`` on resume: allowed when the lr of the steps already
        taken (0 .. step-1) is the same under both (the decay, which depends on them, had not
        lowered it), so that the run equals an uninterrupted one with the new setting."""
        (old_steps, old_decay), (new_steps, new_decay) = old, new
        if step > new_steps:
            raise ValueError(f"{path} is at step {step}, past steps={new_steps}: give "
                             f"--steps {step} or more")
        if old_decay is not None and old_decay + 1 < step:
            raise ValueError(
                f"{path} is at step {step} and its lr has decayed since step {old_decay} toward "
                f"step {old_steps}: another --steps or --decay-start would change the steps "
                f"already taken; resume with --steps {old_steps} --decay-start {old_decay}, or "
                f"start a new run (--overwrite) with a later --decay-start")
        if new_decay is not None and new_decay + 1 < step:
            raise ValueError(f"--decay-start {new_decay} is before {path}'s step {step}, which "
                             f"ran without the decay: give --decay-start {step} or later")
        self.notes.append(f"resumed at step {step} with steps={new_steps}, decay_start="
                          f"{new_decay} (the checkpoint had {old_steps}, {old_decay}); the lr "
                          f"of the steps already taken is the same under both")

    def load_checkpoint(self, path: str) -> None:
        """A checkpoint of any parallel mode and number of ranks (resharded as needed)."""
        # On the CPU: the RNG states must stay CPU byte tensors (load_state_dict moves the rest).
        features = self.features if self.cfg.parallel == "feature" else None
        state = checkpoints.read_checkpoint(path, features,
                                            check=lambda s: self._check_config(s, path))
        self.load_state(state)

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict`, its configuration already checked)."""
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.skipped = state.get("skipped", 0)
        self.norm_scale = state.get("norm_scale")
        self.saved_step = self.step
        self.since_fired = state["since_fired"].to(self.device)
        self.capacity = state["capacity"]
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            # one state per GPU the saving process saw: no more than this one sees (a run
            # resumed on fewer GPUs; set_rng_state_all would index past them)
            torch.cuda.set_rng_state_all(state["rng"]["cuda"][:torch.cuda.device_count()])
        data = distributed.data_state(state, self.rank, self.world)
        if data is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise ValueError("the checkpoint has a data position but this data stream "
                                 "cannot resume (no load_state_dict)")
            self.data.load_state_dict(data)
        if self.out_dir and self.rank == 0:
            truncate_log(os.path.join(self.out_dir, "log.jsonl"), self.step)


def truncate_log(log: str, step: int) -> None:
    """Drop the lines of the log ``log`` written after ``step`` (by a run killed after its last
    checkpoint), atomically: a kill now must not lose the kept lines."""
    if os.path.exists(log):
        with open(log) as f:
            lines = f.readlines()
        keep = [line for line in lines if _logged_step(line) <= step]
        if keep != lines:
            files.write_text("".join(keep), log)
