"""The forward (noising) process and the training loss, independent of network and sampler.

Cosine schedule (Nichol & Dhariwal 2021), epsilon prediction, Min-SNR-gamma
loss weighting (Hang et al. 2023), which converges faster on short budgets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    schedule: str = "cosine"  # or "linear"
    min_snr_gamma: float = 5.0

    def to_dict(self) -> dict:
        return asdict(self)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar_t for t = 0..T-1, in float64."""
    T = config.num_train_timesteps
    if config.schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif config.schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}")
    return torch.cumprod(1 - betas, dim=0)


class GaussianDiffusion:
    """q(x_t | x_0) and the denoising loss for a given noise schedule."""

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)

    def _gather(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values.to(t.device)[t].float()[:, None, None, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._gather(self.alphas_cumprod, t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def eps_mse(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Per-example MSE of the predicted noise at given timesteps and noise; with fixed t and noise
        it is a deterministic held-out loss."""
        eps = model(self.q_sample(x0, t, noise), t, labels)
        return F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))

    def training_loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE at uniformly drawn timesteps."""
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        a = self.alphas_cumprod.to(x0.device)[t]
        snr = a / (1 - a)
        weight = (snr.clamp(max=self.config.min_snr_gamma) / snr).float()
        return (weight * self.eps_mse(model, x0, labels, t, torch.randn_like(x0))).mean()
