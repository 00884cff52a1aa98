"""The configuration of a training run (:class:`TrainConfig`): every field with its help text,
its choices and its checks beside it (``gsae-fast train`` derives its flags from them), and the
learning-rate and sparsity schedules the fields define. gsae_fast.train runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import backends, distributed, reference

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
    steps: int = field(default=1000, metadata={
        "help": "optimisation steps; with --resume it may change (e.g. to extend a finished "
                "run) unless the lr decay had begun before the checkpoint"})
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
    skip_nonfinite: int = field(default=0, metadata={
        "help": "batches whose loss or gradients are not finite to skip (no update, logged "
                "as skipped) before the run stops; 0: stop at the first. A parameter that is "
                "not finite after an update always stops the run"})
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
        if self.checkpoint_every < 0 or self.skip_nonfinite < 0:
            raise ValueError("checkpoint_every and skip_nonfinite must be >= 0")
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


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return dtype
