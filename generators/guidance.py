"""Classifier-free guidance for noise predictors: the scale, the noise levels it acts on, and a colour-saving rescale.

- scale w: eps = eps_null + w (eps_y - eps_null) (Ho & Salimans 2021);
- interval: guide only at training timesteps t_min <= t <= t_max, and use the conditional prediction
  elsewhere (Kynkaanniemi et al. 2024: guidance at high noise collapses variety, at low noise it
  only sharpens and saturates);
- rescale phi: move the guided x0 prediction's per-image std back toward the conditional one's
  (Lin et al. 2024), the cause of the over-saturated colours large scales give;
- parallel eta: weight of the part of the guided x0 update that lies along the conditional x0 prediction
  itself (Sadat et al. 2024, "APG"): that part mostly scales the image's contrast up, the orthogonal rest
  carries the class features; eta = 1 is plain guidance, eta = 0 keeps only the orthogonal part.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0
    t_min: int = 0
    t_max: int = 999
    rescale: float = 0.0
    parallel: float = 1.0

    def active(self, t: int) -> bool:
        """Whether step t pays for the unconditional evaluation."""
        return self.scale != 1.0 and self.t_min <= t <= self.t_max

    def combine(self, eps_cond: torch.Tensor, eps_null: torch.Tensor, x: torch.Tensor,
                alpha_bar: float) -> torch.Tensor:
        eps = eps_null + self.scale * (eps_cond - eps_null)
        if self.rescale == 0.0 and self.parallel == 1.0:
            return eps
        signal, noise = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        x0_cond, x0_guided = (x - noise * eps_cond) / signal, (x - noise * eps) / signal
        if self.parallel != 1.0:
            update = x0_guided - x0_cond
            direction = x0_cond / x0_cond.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None, None]
            along = (update * direction).flatten(1).sum(dim=1)[:, None, None, None] * direction
            x0_guided = x0_cond + update - (1 - self.parallel) * along
        if self.rescale == 0.0:
            return (x - signal * x0_guided) / noise
        ratio = x0_cond.flatten(1).std(dim=1) / x0_guided.flatten(1).std(dim=1).clamp_min(1e-8)
        x0 = torch.lerp(x0_guided, x0_guided * ratio[:, None, None, None], self.rescale)
        return (x - signal * x0) / noise

    def to_dict(self) -> dict:
        return asdict(self)
