"""Synthetic activations with known ground-truth features: the demo's embedded dataset.

``x = sum_i a_i d_i + noise`` with ``n_features`` unit directions ``d_i`` in ``d_in`` dimensions
(``n_features > d_in``: superposition), and sparse coefficients ``a_i``:

- **varied frequency**: feature ``i`` fires with a base probability log-uniform in
  ``[min_freq, max_freq]``;
- **correlated**: features come in groups of ``group_size``; each token picks active groups
  (probability ``group_rate``), which multiplies the firing probability of its members by
  ``group_boost`` (so members co-occur); the base probabilities are rescaled so that the mean
  number of active features stays ``~ target_l0``;
- **varied magnitude**: an active feature's coefficient is ``scale_i * (0.5 + Exp(1))`` with
  ``scale_i`` log-uniform in ``[0.5, 2]``.

Batches are a pure function of ``(seed, batch index)``, so a stream resumes exactly from its
position (``state_dict``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    d_in: int = 64
    n_features: int = 128
    target_l0: float = 8.0
    min_freq: float = 1.0
    max_freq: float = 30.0  # relative: the frequencies spread over a factor max/min = 30
    group_size: int = 4
    group_rate: float = 0.02
    group_boost: float = 8.0
    noise: float = 0.01
    seed: int = 0


class SyntheticFeatures:
    """The ground truth (``directions [n_features, d_in]``, per-feature probabilities and
    scales) and a deterministic, resumable stream of batches ``[batch_size, d_in]``."""

    def __init__(self, cfg: SyntheticConfig = SyntheticConfig(), *, batch_size: int = 4096,
                 device="cpu"):
        if cfg.n_features <= 0 or cfg.d_in <= 0 or batch_size <= 0:
            raise ValueError("d_in, n_features and batch_size must be positive")
        if not 0 < cfg.target_l0 < cfg.n_features:
            raise ValueError(f"target_l0 must be in (0, n_features={cfg.n_features})")
        self.cfg, self.batch_size, self.device = cfg, batch_size, torch.device(device)
        g = torch.Generator().manual_seed(cfg.seed)
        d = torch.randn(cfg.n_features, cfg.d_in, generator=g, dtype=torch.float64)
        self.directions = (d / d.norm(dim=1, keepdim=True)).float()
        log_f = torch.empty(cfg.n_features, dtype=torch.float64).uniform_(
            math.log(cfg.min_freq), math.log(cfg.max_freq), generator=g)
        base = log_f.exp()
        self.scales = torch.empty(cfg.n_features, dtype=torch.float64).uniform_(
            math.log(0.5), math.log(2.0), generator=g).exp().float()
        self.n_groups = math.ceil(cfg.n_features / cfg.group_size)
        self.group_of = torch.arange(cfg.n_features) // cfg.group_size
        # Expected count: sum_i p_i (1 + group_rate (boost - 1)); solve for the overall scale.
        boost_mean = 1 + cfg.group_rate * (cfg.group_boost - 1)
        self.probs = (base * cfg.target_l0 / (base.sum() * boost_mean)).clamp(
            max=1.0 / cfg.group_boost)
        self.probs = self.probs.float()
        self.position = 0  # index of the next batch
        self.directions, self.scales, self.probs = (t.to(self.device) for t in
                                                    (self.directions, self.scales, self.probs))
        self.group_of = self.group_of.to(self.device)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    def coefficients(self, index: int, batch_size: Optional[int] = None) -> Tensor:
        """The true sparse coefficients ``[batch, n_features]`` of batch ``index``."""
        cfg, B = self.cfg, batch_size or self.batch_size
        g = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + 7919 * index + 1)
        groups = torch.rand(B, self.n_groups, generator=g, device=self.device) < cfg.group_rate
        boost = 1 + (cfg.group_boost - 1) * groups[:, self.group_of].float()
        fire = torch.rand(B, cfg.n_features, generator=g, device=self.device) < self.probs * boost
        mag = 0.5 - torch.log1p(-torch.rand(B, cfg.n_features, generator=g, device=self.device))
        return fire * mag * self.scales

    def batch(self, index: int, batch_size: Optional[int] = None) -> Tensor:
        """Batch ``index`` of the stream: ``a @ directions + noise``."""
        a = self.coefficients(index, batch_size)
        seed = self.cfg.seed * 1_000_003 + 7919 * index + 2
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = self.cfg.noise * torch.randn(a.shape[0], self.cfg.d_in, generator=g,
                                             device=self.device)
        return a @ self.directions + noise

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        x = self.batch(self.position)
        self.position += 1
        return x

    def state_dict(self) -> dict:
        return {"position": self.position, "config": asdict(self.cfg),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") not in (None, asdict(self.cfg)):
            raise ValueError("this checkpoint was made on a different synthetic dataset: "
                             f"{state['config']} != {asdict(self.cfg)}")
        self.position = int(state["position"])


def feature_recovery(W_dec: Tensor, directions: Tensor) -> Tensor:
    """Per true feature, the largest cosine similarity with a decoder row (mean it for the mean
    max cosine similarity, MMCS)."""
    a = directions.float() / directions.float().norm(dim=1, keepdim=True)
    b = W_dec.detach().float().to(a.device)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.full((a.shape[0],), -1.0, device=a.device)
    for s in range(0, b.shape[0], 8192):  # chunks: a [n_features, d_sae] matrix can be large
        best = torch.maximum(best, (a @ b[s:s + 8192].T).max(dim=1).values)
    return best
