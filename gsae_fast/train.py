"""Training a Gated SAE on the fast ops: the recipe of the paper and of dictionary_learning's
``GatedSAETrainer``.

- Adam (``betas=(0.0, 0.999)`` as dictionary_learning), the learning rate and sparsity
  schedules of dictionary_learning's ``get_lr_schedule`` / ``get_sparsity_warmup_fn``: lr scale
  ``step / warmup_steps`` during the warm-up, then 1, then (with ``decay_start``) linear decay
  ``(steps - step) / (steps - decay_start)``; sparsity scale ``min(step / sparsity_warmup_steps,
  1)``.
- ``decoder="unit_norm"`` (the paper, dictionary_learning's ``ConstrainedAdam``): the gradient's
  component along each decoder row is removed before the step and the rows are renormalised
  after it, with the unit sparsity weights; ``decoder="norm_penalty"`` (SAELens): free rows and
  the ``|W_dec[i]|``-weighted sparsity penalty.
- Mixed precision: ``compute_dtype="bfloat16"`` (the default on CUDA) runs the kernels in bf16
  on bf16 copies of the fp32 master parameters (the casts are differentiable, so the gradients
  and Adam stay fp32); autocast would not reach the custom ops.
- Dead features: tokens since each feature last fired; dead after ``dead_after_tokens``.
- Logs one JSON line per ``log_every`` steps (``log.jsonl``; with bf16 compute the logged
  losses are the bf16 ones); checkpoints (``checkpoint.pt``:
  parameters, Adam state, step, dead-feature counters, RNG states and the data stream's
  position) every ``checkpoint_every`` steps and at the end; ``resume=True`` continues from one
  exactly (the same loss curve as an uninterrupted run).
- ``parallel="data"`` / ``"feature"``: data-parallel or feature-sharded training on
  ``torch.distributed`` (gsae_fast.distributed; run under ``torchrun``): each rank's ``data``
  yields its share of every step's tokens, and the run equals a single-process one on the
  concatenated batches.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import backends, distributed, ops, reference
from .saes import GatedSAE

DECODER_MODES = ("unit_norm", "norm_penalty")
AUX_MODES = reference.AUX_CHOICES
# The executors a run may name (the emulated CUDA one is for tests of the kernels, not training).
BACKENDS = ("auto",) + tuple(b for b in backends.BACKENDS if b != "cuda_emulated")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


@dataclass
class TrainConfig:
    """A training run's settings. Every field but ``extra`` is a ``gsae-fast train`` flag
    (``d_sae`` -> ``--d-sae``): its ``metadata`` holds the flag's ``help`` and, where the values
    are a fixed set, ``choices`` (``type`` where the default, None, does not tell it)."""

    d_sae: int = field(default=4096, metadata={"help": "dictionary size (features)"})
    l1_coefficient: float = field(default=1.0, metadata={"help": "sparsity coefficient lambda"})
    steps: int = field(default=1000, metadata={"help": "optimisation steps"})
    batch_size: int = field(default=4096, metadata={"help": "tokens per step"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate (peak)"})
    betas: tuple = field(default=(0.0, 0.999),
                         metadata={"help": "Adam betas (dictionary_learning: 0 0.999)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear lr warm-up from 0"})
    # None: no decay (dictionary_learning's default)
    decay_start: Optional[int] = field(default=None, metadata={
        "help": "step where the linear lr decay to 0 starts (default: no decay)", "type": int})
    sparsity_warmup_steps: int = field(default=200, metadata={
        "help": "linear warm-up of the sparsity coefficient from 0"})
    decoder: str = field(default="unit_norm", metadata={
        "help": "unit_norm: unit decoder rows, unit sparsity weights (paper); norm_penalty: "
                "|W_dec|-weighted sparsity (SAELens)", "choices": DECODER_MODES})
    aux: str = field(default="frozen", metadata={
        "help": "auxiliary reconstruction through a frozen decoder (paper), the live one "
                "(SAELens), or none", "choices": AUX_MODES})
    backend: str = field(default="auto", metadata={
        "help": "executor: auto, reference, cpu, triton, cuda", "choices": BACKENDS})
    compute_dtype: str = field(default="auto", metadata={  # "auto": bfloat16 on CUDA
        "help": "dtype of the kernels (fp32 master weights): auto = bfloat16 on CUDA",
        "choices": COMPUTE_DTYPES})
    dead_after_tokens: int = field(default=10_000_000, metadata={
        "help": "a feature that has not fired for this many tokens counts as dead"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the data order"})
    log_every: int = field(default=10, metadata={"help": "steps between log.jsonl lines"})
    checkpoint_every: int = field(default=1000, metadata={
        "help": "steps between checkpoints (0: at the end only)"})
    # "data" | "feature": torch.distributed (gsae_fast.distributed)
    parallel: str = field(default="none", metadata={
        "help": "under torchrun: data (each rank a share of every batch, gradients "
                "all-reduced) or feature (each rank a slice of the dictionary); none: one "
                "process", "choices": distributed.PARALLEL_MODES})
    # free-form (data description, for the record); not a flag
    extra: dict = field(default_factory=dict, metadata={"flag": False})

    def check(self) -> None:
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.parallel not in distributed.PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {distributed.PARALLEL_MODES}, got "
                             f"{self.parallel!r}")
        for name in ("d_sae", "steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # dictionary_learning's checks (trainers/trainer.py)
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got "
                             f"{self.warmup_steps}")
        if not 0 <= self.sparsity_warmup_steps < self.steps:
            raise ValueError(f"sparsity_warmup_steps must be in [0, steps={self.steps}), got "
                             f"{self.sparsity_warmup_steps}")
        if self.decay_start is not None and not (
                max(self.warmup_steps, self.sparsity_warmup_steps) < self.decay_start < self.steps):
            raise ValueError(f"decay_start must be after warmup_steps and sparsity_warmup_steps "
                             f"and before steps={self.steps}, got {self.decay_start}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if self.lr <= 0 or self.l1_coefficient < 0:
            raise ValueError("lr must be > 0 and l1_coefficient >= 0")

    def lr_scale(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.decay_start is not None and step >= self.decay_start:
            return (self.steps - step) / (self.steps - self.decay_start)
        return 1.0

    def sparsity_scale(self, step: int) -> float:
        return min(1.0, step / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return dtype


def _logged_step(line: str) -> float:
    """The step of a log line; a line torn by a kill mid-write counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


class Trainer:
    """Trains a :class:`GatedSAE` on ``data`` (an iterator of ``[tokens, d_in]`` batches; with
    ``state_dict`` / ``load_state_dict`` for exact resumption).

    ``out_dir`` receives ``log.jsonl``, ``checkpoint.pt`` and, at the end, ``sae/`` (SAELens
    format, :meth:`GatedSAE.load`). A directory that already holds a run is continued with
    ``resume=True``, replaced with ``overwrite=True``, and otherwise refused (never mixed).

    With ``cfg.parallel`` "data" or "feature" every rank builds a Trainer (joining the
    torchrun process group if none exists) with ``data`` yielding that rank's share of each
    step (:class:`gsae_fast.distributed.RankShard` of a global stream); ``out_dir`` must be one
    folder all ranks see. In "feature" mode ``sae`` holds this rank's features
    ``features = (start, stop)``; the records (losses, L0, dead fraction) are global.
    """

    RUN_FILES = ("checkpoint.pt", "log.jsonl", "sae", "summary.json")

    def __init__(self, cfg: TrainConfig, d_in: int, data, out_dir: Optional[str] = None, *,
                 device="cpu", resume: bool = False, overwrite: bool = False):
        cfg.check()
        self.cfg, self.data, self.out_dir = cfg, data, out_dir
        self.rank, self.world = 0, 1
        if cfg.parallel != "none":
            self.rank, self.world, device = distributed.init(device)
            if cfg.batch_size < self.world:
                raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {self.world} "
                                 "ranks: every rank needs tokens")
        self.device = torch.device(device)
        self.compute_dtype = _compute_dtype(cfg.compute_dtype, self.device)
        torch.manual_seed(cfg.seed)
        init_norm = 1.0 if cfg.decoder == "unit_norm" else 0.1
        self.features = (0, cfg.d_sae)
        if cfg.parallel == "feature":
            self.features = distributed.feature_range(cfg.d_sae, self.rank, self.world)
            self.sae = distributed.init_shard(d_in, cfg.d_sae, self.features, device=self.device,
                                              backend=cfg.backend, decoder_init_norm=init_norm)
        else:
            self.sae = GatedSAE(d_in, cfg.d_sae, device=self.device, backend=cfg.backend,
                                decoder_init_norm=init_norm)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.step = 0
        self.tokens = 0
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=self.device)
        self.capacity: Optional[int] = None  # from the global largest row: picks dense/sparse
        self.local_capacity: Optional[int] = None  # "feature": this rank's encode
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
        if resume:
            if out_dir is None or not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"resume=True but there is no checkpoint at "
                                        f"{self.checkpoint_path if out_dir else '(no out_dir)'}")
            self.load_checkpoint(self.checkpoint_path)
        elif out_dir is not None:
            found = [n for n in self.RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
            found += [n for n in os.listdir(out_dir) if distributed.SHARD_FILE.match(n)]
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

    def _in_compute_dtype(self, *tensors: torch.Tensor) -> list:
        """The kernels' inputs: differentiable casts of the fp32 masters (no copy when equal)."""
        cd = self.compute_dtype
        return [t if t.dtype == cd else t.to(cd) for t in tensors]

    def _loss(self, x: torch.Tensor):
        cfg, sae = self.cfg, self.sae
        params = self._in_compute_dtype(sae.W_enc, sae.W_dec, sae.b_dec, sae.b_gate, sae.r_mag,
                                        sae.b_mag)
        coef = cfg.l1_coefficient * cfg.sparsity_scale(self.step)
        sparsity = "unit" if cfg.decoder == "unit_norm" else "decoder_norm"
        if cfg.parallel == "feature":
            # The dense/sparse choice as a single process makes it (global capacity, d_sae):
            # the dead-feature counts below depend on it.
            out, local_max = distributed.feature_sharded_loss(
                *self._in_compute_dtype(x), *params, coef, sparsity=sparsity, aux=cfg.aux,
                backend=sae._backend_for(x), capacity=self.local_capacity,
                dense=ops.dense_is_faster(self.capacity, cfg.d_sae, x.device, params[0].dtype))
            self.local_capacity = ops.next_capacity(local_max, sae.d_sae)
            return out
        return ops.gated_sae_loss(*self._in_compute_dtype(x), *params, coef, sparsity=sparsity,
                                  aux=cfg.aux, backend=sae._backend_for(x),
                                  capacity=self.capacity)

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimisation step on the batch ``x``; returns its log record."""
        cfg, sae = self.cfg, self.sae
        t0 = time.perf_counter()
        lr = cfg.lr * cfg.lr_scale(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = x.to(self.device).reshape(-1, sae.d_in)
        if cfg.parallel == "feature":  # every rank encodes the whole batch
            x = distributed.gather_rows(x)
        out = self._loss(x)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        stats = [out.loss.item(), out.mse.item(), out.sparsity.item(), out.aux.item(),
                 out.l0.item()]
        n = x.shape[0]
        if cfg.parallel == "data":  # gradients and logged values over all ranks' tokens
            stats, n = distributed.average_gradients(sae.parameters(), stats, n)
        if cfg.decoder == "unit_norm":  # keep the step on the sphere of unit rows
            with torch.no_grad():
                W, g = sae.W_dec, sae.W_dec.grad
                g -= (g * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True)
        self.opt.step()
        if cfg.decoder == "unit_norm":
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        fired, max_count = self._fired(x, out), out.max_count
        if cfg.parallel == "data":
            fired, max_count = distributed.any_fired(fired, max_count)
        self.capacity = ops.next_capacity(max_count, cfg.d_sae)
        self.since_fired += n
        self.since_fired[fired] = 0
        self.step += 1
        self.tokens += n
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dead = (self.since_fired >= cfg.dead_after_tokens).sum()
        if cfg.parallel == "feature":
            torch.distributed.all_reduce(dead)
        loss, mse, sparsity, aux, l0 = stats
        return {"step": self.step, "tokens": self.tokens, "loss": loss, "mse": mse,
                "sparsity": sparsity, "aux": aux, "l0": l0, "lr": lr,
                "sparsity_scale": cfg.sparsity_scale(self.step - 1),
                "dead_fraction": float(dead) / cfg.d_sae,
                "step_ms": 1e3 * (time.perf_counter() - t0)}

    @torch.no_grad()
    def _fired(self, x, out) -> torch.Tensor:
        """Which of this rank's features fired on ``x`` (bool ``[sae.d_sae]``)."""
        acts = out.acts
        if acts is None:  # the dense path ran (L0 near d_sae): find the firing features
            s = self.sae
            acts = ops.gated_encode(*self._in_compute_dtype(x, s.W_enc, s.b_dec, s.b_gate,
                                                            s.r_mag, s.b_mag),
                                    backend=s._backend_for(x))
        return torch.bincount(acts.idx[acts.mask()].long(), minlength=self.sae.d_sae) > 0

    # -- the loop ----------------------------------------------------------------------------

    def train(self, progress: Optional[Callable[[int, int, dict], None]] = None,
              stop_after: Optional[int] = None) -> list[dict]:
        """Run to ``cfg.steps`` (or ``stop_after`` more steps); returns the log records.
        ``progress(step, steps, record)`` is called after every step."""
        cfg = self.cfg
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
                if rec["loss"] != rec["loss"]:  # NaN: stop and say so, rather than train on
                    raise FloatingPointError(f"the loss is NaN at step {self.step}")
                records.append(rec)
                if log_f is not None and (self.step % cfg.log_every == 0 or self.step == end):
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                if progress is not None:
                    progress(self.step, cfg.steps, rec)
                if self.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path)
        finally:
            if log_f is not None:
                log_f.close()
        if self.out_dir:
            self.save_checkpoint(self.checkpoint_path)
            if self.step >= cfg.steps and self.rank == 0:
                sae = (distributed.gathered_sae(self.checkpoint_path, cfg.backend)
                       if cfg.parallel == "feature" else self.sae)
                sae.save_pretrained(os.path.join(self.out_dir, "sae"))
            self._barrier()
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
                "data": data, "d_in": self.sae.d_in}

    def save_checkpoint(self, path: str) -> None:
        """One file (rank 0 in "data" mode), or one per rank and ``path`` last ("feature":
        gsae_fast.distributed.save_sharded); every rank calls it."""
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
            return
        if self.rank == 0:
            tmp = path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact
        self._barrier()

    def _check_config(self, state: dict, path: str) -> None:
        mine = asdict(self.cfg)
        theirs = dict(state["config"])
        theirs["betas"] = tuple(theirs["betas"])
        mine["betas"] = tuple(mine["betas"])
        for c in (mine, theirs):  # how the run is spread is not part of what it computes
            c.pop("parallel", None)
        if theirs != mine or state["d_in"] != self.sae.d_in:
            diff = {k: (theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine)
                    if theirs.get(k) != mine.get(k)}
            raise ValueError(f"{path} was made with a different configuration: {diff}")

    def load_checkpoint(self, path: str) -> None:
        """A checkpoint of any parallel mode and number of ranks (resharded as needed)."""
        # On the CPU: the RNG states must stay CPU byte tensors (load_state_dict moves the rest).
        features = self.features if self.cfg.parallel == "feature" else None
        state = distributed.read_checkpoint(path, features,
                                            check=lambda s: self._check_config(s, path))
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
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
        if self.out_dir and self.rank == 0:  # drop log lines written after the checkpoint
            log = os.path.join(self.out_dir, "log.jsonl")
            if os.path.exists(log):
                with open(log) as f:
                    keep = [line for line in f if _logged_step(line) <= self.step]
                with open(log, "w") as f:
                    f.writelines(keep)
