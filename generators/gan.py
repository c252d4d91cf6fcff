"""Class-conditional DCGAN for 28x28 digits: generator, and a projection discriminator with spectral norm."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


@dataclass
class GANConfig:
    z_dim: int = 64
    num_classes: int = 10
    g_channels: int = 64
    d_channels: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class Generator(nn.Module):
    """(z, digit) -> 1x28x28 image in [-1, 1]."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        c = config.g_channels
        self.label_emb = nn.Embedding(config.num_classes, config.z_dim)
        self.fc = nn.Sequential(nn.Linear(2 * config.z_dim, 2 * c * 7 * 7), nn.BatchNorm1d(2 * c * 7 * 7), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),  # 14x14
            nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),  # 28x28
            nn.Conv2d(c // 2, 1, 3, 1, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.label_emb(labels)], dim=1))
        return self.net(h.view(len(z), 2 * self.config.g_channels, 7, 7))


class Discriminator(nn.Module):
    """Hinge-loss critic: a linear score plus a class projection (Miyato & Koyama 2018)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        c = config.d_channels
        act = nn.LeakyReLU(0.2)
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, c, 4, 2, 1)), act,  # 14x14
            spectral_norm(nn.Conv2d(c, 2 * c, 4, 2, 1)), act,  # 7x7
            spectral_norm(nn.Conv2d(2 * c, 2 * c, 3, 1, 1)), act,
            nn.Flatten(),
        )
        dim = 2 * c * 7 * 7
        self.score = spectral_norm(nn.Linear(dim, 1))
        self.projection = spectral_norm(nn.Embedding(config.num_classes, dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.score(h).flatten() + (self.projection(labels) * h).sum(dim=1)
