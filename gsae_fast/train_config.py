"""The configuration of a training run (:class:`TrainConfig`): every field with its help text,
its choices and its checks beside it (``gsae-fast train`` derives its flags from them), and the
learning-rate and sparsity schedules the fields define. gsae_fast.train runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from . import backends, distributed, reference

ARCHS = ("gated", "jumprelu", "topk", "batchtopk")
# unit_norm: unit decoder rows (the gradient's radial part removed, rows renormalised after
# each step); norm_penalty (Gated): free rows, |W_dec|-weighted sparsity; free (the others):
# free rows (SAELens)
DECODER_MODES = ("unit_norm", "norm_penalty", "free")
# Each architecture's published recipe: the values a field left at None takes. Gated: the
# paper / dictionary_learning's GatedSAETrainer; JumpReLU, TopK, BatchTopK: SAELens' training
# defaults (Adam 0.9/0.999 at 3e-4, decoder rows free from norm 0.1, gradient norm clipped at 1).
RECIPES = {
    "gated": dict(lr=5e-5, betas=(0.0, 0.999), decoder="unit_norm", sparsity_warmup_steps=200,
                  max_grad_norm=0.0),
    "jumprelu": dict(lr=3e-4, betas=(0.9, 0.999), decoder="free", sparsity_warmup_steps=0,
                     max_grad_norm=1.0),
    "topk": dict(lr=3e-4, betas=(0.9, 0.999), decoder="free", sparsity_warmup_steps=0,
                 max_grad_norm=1.0),
}
RECIPES["batchtopk"] = RECIPES["topk"]
JUMPRELU_SPARSITY = reference.JUMPRELU_SPARSITY_MODES
NORMALIZATIONS = ("none", "expected_average_only_in")
AUX_MODES = reference.AUX_CHOICES
# The executors a run may name (the emulated CUDA one is for tests of the kernels, not training).
BACKENDS = ("auto",) + tuple(b for b in backends.BACKENDS if b != "cuda_emulated")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


@dataclass
class TrainConfig:
    """A training run's settings. Every field but ``extra`` is a ``gsae-fast train`` flag
    (``d_sae`` -> ``--d-sae``): its ``metadata`` holds the flag's ``help`` and, where the values
    are a fixed set, ``choices`` (``type`` where the default, None, does not tell it)."""

    arch: str = field(default="gated", metadata={
        "help": "architecture, each with its published recipe for the options left unset: "
                "gated (the paper / dictionary_learning), jumprelu, topk, batchtopk (SAELens)",
        "choices": ARCHS})
    d_sae: int = field(default=4096, metadata={"help": "dictionary size (features)"})
    l1_coefficient: float = field(default=1.0, metadata={
        "help": "sparsity coefficient: Gated's L1 lambda, JumpReLU's L0 coefficient (unused by "
                "TopK / BatchTopK)"})
    steps: int = field(default=1000, metadata={
        "help": "optimisation steps; with --resume it may change (e.g. to extend a finished "
                "run) unless the lr decay had begun before the checkpoint"})
    batch_size: int = field(default=4096, metadata={"help": "tokens per step"})
    lr: Optional[float] = field(default=None, metadata={
        "help": "Adam learning rate (peak); default: the recipe's (gated 5e-5, others 3e-4)",
        "type": float})
    betas: Optional[tuple] = field(default=None, metadata={
        "help": "Adam betas; default: the recipe's (gated 0 0.999, others 0.9 0.999)",
        "type": float, "nargs": 2})
    warmup_steps: int = field(default=100, metadata={"help": "linear lr warm-up from 0"})
    # None: no decay (dictionary_learning's default)
    decay_start: Optional[int] = field(default=None, metadata={
        "help": "step where the linear lr decay to 0 starts (default: no decay)", "type": int})
    sparsity_warmup_steps: Optional[int] = field(default=None, metadata={
        "help": "linear warm-up of the sparsity coefficient from 0; default: the recipe's "
                "(gated 200, others 0)", "type": int})
    decoder: Optional[str] = field(default=None, metadata={
        "help": "unit_norm: unit decoder rows, unit sparsity weights (paper, dictionary_learning;"
                " the gated default); norm_penalty (gated): |W_dec|-weighted sparsity (SAELens); "
                "free (the others' default): free rows (SAELens)", "choices": DECODER_MODES})
    max_grad_norm: Optional[float] = field(default=None, metadata={
        "help": "clip the gradient's norm to this (0: no clipping); default: the recipe's "
                "(gated 0, others 1 as SAELens)", "type": float})
    aux: str = field(default="frozen", metadata={
        "help": "gated: auxiliary reconstruction through a frozen decoder (paper), the live one "
                "(SAELens), or none", "choices": AUX_MODES})
    # JumpReLU (SAELens' JumpReLUTrainingSAEConfig names and defaults)
    jumprelu_init_threshold: float = field(default=0.01, metadata={
        "help": "jumprelu: initial threshold"})
    jumprelu_bandwidth: float = field(default=0.05, metadata={
        "help": "jumprelu: width of the straight-through estimators' rectangle kernel"})
    jumprelu_sparsity_loss_mode: str = field(default="step", metadata={
        "help": "jumprelu: step (DeepMind's L0), tanh (Anthropic's) or quadratic (needs "
                "--target-l0)", "choices": JUMPRELU_SPARSITY})
    jumprelu_tanh_scale: float = field(default=4.0, metadata={
        "help": "jumprelu: scale of the tanh sparsity"})
    jumprelu_ste_to_input: bool = field(default=False, metadata={
        "help": "jumprelu: the estimators' gradient reaches the encoder too (Anthropic)"})
    pre_act_loss_coefficient: Optional[float] = field(default=None, metadata={
        "help": "jumprelu: Anthropic's pre-activation loss on dead features (3e-6 in their "
                "setup); default: off", "type": float})
    target_l0: Optional[float] = field(default=None, metadata={
        "help": "jumprelu: the L0 the quadratic sparsity loss aims at", "type": float})
    # TopK / BatchTopK (SAELens' TopKTrainingSAEConfig / BatchTopKTrainingSAEConfig)
    k: float = field(default=100.0, metadata={
        "help": "topk: active features per token (an integer); batchtopk: their mean over "
                "the batch"})
    aux_loss_coefficient: float = field(default=1.0, metadata={
        "help": "topk / batchtopk: coefficient of AuxK (dead features reconstruct the residual)"})
    aux_k: Optional[int] = field(default=None, metadata={
        "help": "topk / batchtopk: dead features AuxK keeps per token (default d_in / 2)",
        "type": int})
    rescale_acts_by_decoder_norm: bool = field(default=True, metadata={
        "help": "topk / batchtopk: select and scale by |W_dec| rows (SAELens' training "
                "default)"})
    topk_threshold_lr: float = field(default=0.01, metadata={
        "help": "batchtopk: rate of the inference threshold's moving average"})
    backend: str = field(default="auto", metadata={
        "help": "executor: auto, reference, cpu, triton, cuda", "choices": BACKENDS})
    compute_dtype: str = field(default="auto", metadata={  # "auto": bfloat16 on CUDA
        "help": "dtype of the kernels (fp32 master weights): auto = bfloat16 on CUDA",
        "choices": COMPUTE_DTYPES})
    normalize_activations: str = field(default="none", metadata={
        "help": "expected_average_only_in: scale the activations by sqrt(d_in) / their mean "
                "norm, estimated before the first step and folded into the saved SAE (SAELens);"
                " none: as they come", "choices": NORMALIZATIONS})
    norm_estimate_batches: int = field(default=100, metadata={
        "help": "batches read to estimate the scale of expected_average_only_in (not trained "
                "on; SAELens reads 1000)"})
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

    def __post_init__(self) -> None:
        # The recipe's values for the fields left unset (asdict, and so the checkpoints, hold
        # the resolved values: a resume compares what actually ran).
        for name, value in RECIPES.get(self.arch, RECIPES["gated"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.betas is not None:
            self.betas = tuple(self.betas)

    def _check_types(self) -> None:
        """Each field holds a value of its type (an int where a float is expected is fine)."""
        for f in fields(self):
            value = getattr(self, f.name)
            want = f.metadata.get("type") or (str if f.default is None else type(f.default))
            if f.name == "extra" or value is None:
                continue
            if f.metadata.get("nargs") or isinstance(f.default, tuple):
                ok = isinstance(value, tuple) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            elif want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif want is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, want)
            if not ok:
                what = ("a tuple of numbers" if f.metadata.get("nargs") or
                        isinstance(f.default, tuple) else getattr(want, "__name__", want))
                raise ValueError(f"{f.name} must be {what}, got {value!r} "
                                 f"({type(value).__name__})")

    def check(self) -> None:
        self._check_types()
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        allowed = ("unit_norm", "norm_penalty") if self.arch == "gated" else ("unit_norm", "free")
        if self.decoder not in allowed:
            raise ValueError(f"decoder {self.decoder!r} is not one of {self.arch}'s: {allowed}")
        if self.arch == "topk" and self.k != int(self.k):
            raise ValueError(f"k must be an integer for topk, got {self.k} (batchtopk takes a "
                             f"mean such as {self.k})")
        if self.arch in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k}")
        if self.arch == "jumprelu":
            reference.check_jumprelu_options(self.jumprelu_sparsity_loss_mode, self.target_l0,
                                             self.jumprelu_bandwidth)
        elif self.target_l0 is not None:
            raise ValueError(f"target_l0 is a jumprelu option (the quadratic sparsity loss); "
                             f"{self.arch} " + ("sets its L0 with k" if self.arch != "gated"
                                                else "reaches an L0 through l1_coefficient"))
        if self.parallel == "feature" and self.arch != "gated":
            raise ValueError(f"parallel='feature' trains Gated SAEs only; train {self.arch} "
                             f"with parallel='data'")
        if self.parallel == "feature" and self.max_grad_norm:
            raise ValueError("parallel='feature' does not clip gradients: give "
                             "max_grad_norm 0")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got "
                             f"{self.normalize_activations!r}")
        if self.norm_estimate_batches <= 0:
            raise ValueError(f"norm_estimate_batches must be positive, got "
                             f"{self.norm_estimate_batches}")
        if self.max_grad_norm < 0 or (self.aux_k is not None and self.aux_k <= 0):
            raise ValueError("max_grad_norm must be >= 0 and aux_k positive")
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
