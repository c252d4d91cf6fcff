"""Energy-based model: a conv net E(x) (low energy = realistic image) and Langevin dynamics on it.

Sampling is short-run Langevin from uniform noise (Nijkamp et al. 2019): training and
serving run the very same chain, whose settings are stored in the checkpoint's config,
so what a user gets is what the model was trained to produce.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class EnergyNetConfig:
    image_size: int = 32
    channels: int = 3
    n_f: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LangevinConfig:
    steps: int = 40
    step_size: float = 1.0
    noise_scale: float = 0.01
    grad_clip: float = 0.03  # per-pixel bound on step_size * gradient; keeps early chains from saturating

    def to_dict(self) -> dict:
        return asdict(self)


class EnergyNet(nn.Module):
    """Four strided convolutions down to a scalar energy per image."""

    def __init__(self, config: EnergyNetConfig):
        super().__init__()
        if config.image_size != 32:
            raise ValueError("EnergyNet is laid out for 32x32 images")
        f = config.n_f
        act = nn.LeakyReLU(0.2)
        self.config = config
        self.net = nn.Sequential(
            nn.Conv2d(config.channels, f, 3, 1, 1), act,
            nn.Conv2d(f, 2 * f, 4, 2, 1), act,
            nn.Conv2d(2 * f, 4 * f, 4, 2, 1), act,
            nn.Conv2d(4 * f, 8 * f, 4, 2, 1), act,
            nn.Conv2d(8 * f, 1, 4, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def initial_noise(n: int, config: EnergyNetConfig, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand((n, config.channels, config.image_size, config.image_size), generator=generator) * 2 - 1


def langevin(energy: nn.Module, x: torch.Tensor, settings: LangevinConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Run `settings.steps` of x <- clip(x - step_size * dE/dx) + noise_scale * N(0, 1), kept in [-1, 1]."""
    x = x.detach()
    with torch.enable_grad():
        for _ in range(settings.steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
            move = (settings.step_size * grad).clamp(-settings.grad_clip, settings.grad_clip)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = (x.detach() - move + settings.noise_scale * noise).clamp(-1, 1)
    return x.detach()
