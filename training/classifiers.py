"""Small CIFAR-10 / MNIST classifiers, used only as feature extractors for measuring sample quality.

Inception weights cannot be downloaded here, so FID and friends are computed in the penultimate
features of a classifier trained on the same data. The net is a slimmed ResNet-9: a stem conv,
then stages of conv -> BN -> ReLU -> 2x2 max-pool, some followed by a residual block, then global
average pooling (the features) and a linear head. Inputs are NCHW images in [-1, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from generators.checkpoint import load_checkpoint


@dataclass
class ClassifierConfig:
    in_channels: int = 3
    num_classes: int = 10
    stem: int = 24  # channels of the first conv, at full resolution
    widths: tuple[int, ...] = (48, 96, 192)  # one stage each, halving the resolution
    residual: tuple[bool, ...] = (True, False, True)  # a residual block after that stage's pool

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["residual"] = tuple(bool(r) for r in d["residual"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# CIFAR-10: ~0.93M params, ~54M multiply-adds per image. MNIST: ~0.17M params, ~15M multiply-adds.
PRESETS = {
    "cifar10": ClassifierConfig(in_channels=3, stem=24, widths=(48, 96, 192), residual=(True, False, True)),
    "mnist": ClassifierConfig(in_channels=1, stem=16, widths=(32, 64, 128), residual=(False, True, False)),
}


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if len(config.widths) != len(config.residual):
            raise ValueError("widths and residual need one entry per stage")
        self.config = config
        layers: list[nn.Module] = [conv_bn(config.in_channels, config.stem)]
        c = config.stem
        for width, residual in zip(config.widths, config.residual):
            # ceil_mode keeps the border row and column of odd sizes (MNIST's 7x7)
            layers += [conv_bn(c, width), nn.MaxPool2d(2, ceil_mode=True)]
            if residual:
                layers.append(Residual(width))
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, config.num_classes)
        self.num_features = c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, num_features): globally average-pooled penultimate activations."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def classify(model: Classifier, images: torch.Tensor, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images -> (features, logits) on the CPU; one pass gives both, batch by batch."""
    features, logits = [], []
    for batch in images.split(batch_size):
        f = model.features(batch.to(device).float() / 127.5 - 1)
        features.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(features), torch.cat(logits)


def load_classifier(directory: Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """A trained classifier in eval mode, and its config.json."""
    state_dict, config = load_checkpoint(directory)
    if config.get("model_type") != "classifier":
        raise ValueError(f"{directory} holds a {config.get('model_type')!r}, not a classifier")
    model = Classifier(ClassifierConfig.from_dict(config["classifier"]))
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False), config
