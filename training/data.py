"""Loading CIFAR-10 / MNIST from the Keras-layout `.npz` archives in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from generators.checkpoint import file_sha256

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_PATHS = {"cifar10": DATA_DIR / "cifar10.npz", "mnist": DATA_DIR / "mnist.npz"}


class ImageDataset:
    """The training split held in memory as uint8 NCHW, with random batches as float in [-1, 1]."""

    def __init__(self, path: Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} not found; pass --data with a Keras-layout .npz")
        with np.load(self.path) as archive:
            images = archive[f"x_{split}"]
            self.labels = torch.from_numpy(archive[f"y_{split}"].astype(np.int64).reshape(-1))
            self.class_names = [str(c) for c in archive["class_names"]] if "class_names" in archive else [
                str(i) for i in range(int(self.labels.max()) + 1)]
        if images.ndim == 3:
            images = images[..., None]
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.sha256 = file_sha256(self.path)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device) -> "ImageDataset":
        """Keep the images on `device` (a GPU holds all of CIFAR-10 in 150 MB), so batches are cut there."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def batch(self, batch_size: int, generator: torch.Generator, hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images as float in [-1, 1] and their labels, on the images' device; the draws come from the CPU
        `generator`, so a run picks the same batches on any device."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator).to(self.images.device)
        x = self.images[idx].float() / 127.5 - 1
        if hflip:
            flip = (torch.rand(batch_size, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]
