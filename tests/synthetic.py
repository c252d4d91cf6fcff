"""Small synthetic data and untrained checkpoints, so tests never need ../shared/data or trained weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from generators.checkpoint import save_checkpoint
from generators.ebm import EnergyModel, LangevinConfig
from generators.gan import GANConfig, Generator
from generators.gaussian_diffusion import ScheduleConfig, alphas_cumprod
from generators.unet import UNet, UNetConfig

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_npz(path: Path, shape: tuple[int, ...], n: int = 64, classes: list[str] | None = None) -> Path:
    """A Keras-layout archive of random uint8 images with labels 0..9."""
    rng = np.random.default_rng(0)
    names = classes or [str(i) for i in range(10)]
    np.savez(path, x_train=rng.integers(0, 256, (n, *shape), dtype=np.uint8), y_train=np.arange(n) % 10,
             x_test=rng.integers(0, 256, (16, *shape), dtype=np.uint8), y_test=np.arange(16) % 10,
             class_names=np.array(names))
    return path


def tiny_checkpoint(directory: Path, model_type: str) -> Path:
    """An untrained, small checkpoint of `model_type` in the served format."""
    torch.manual_seed(0)
    training = {"steps": 0, "data_sha256": "synthetic"}
    unet = UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(), num_classes=10)
    if model_type == "diffusion":
        config = {"model_type": "diffusion", "unet": unet.to_dict(), "schedule": ScheduleConfig().to_dict(),
                  "sampling": {"sampler": "ddim", "steps": 4, "guidance_scale": 2.0}, "class_names": CIFAR_CLASSES}
        weights = UNet(unet).state_dict()
    elif model_type == "ebm":
        config = {"model_type": "ebm", "unet": unet.to_dict(), "schedule": ScheduleConfig().to_dict(),
                  "sigma_data": 0.5, "langevin": LangevinConfig(levels=3, guidance_scale=2.0).to_dict(),
                  "scoring": {"timestep": 20}, "class_names": CIFAR_CLASSES}
        weights = EnergyModel(unet, alphas_cumprod(ScheduleConfig())).state_dict()
    elif model_type == "gan":
        gan = GANConfig(z_dim=8, g_channels=16, d_channels=16)
        config = {"model_type": "gan", "gan": gan.to_dict()}
        weights = Generator(gan).eval().state_dict()
    else:
        raise ValueError(model_type)
    save_checkpoint(directory, weights, dict(config, training=training))
    return directory
