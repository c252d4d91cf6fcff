"""What the diffusion and energy trainers share: both learn to predict the noise in x_t.

The diffusion UNet predicts it directly; the energy model predicts it as sigma_t * dE/dx. Either
is a module `model(x_t, t, labels) -> eps`, so the loss, the held-out loss, the lr schedule and the
training loop are one piece of code.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from generators.gaussian_diffusion import GaussianDiffusion
from generators.schedulers import SPACINGS
from training.common import EMA, TrainingRun, clip_and_step, learning_rate, set_learning_rate
from training.data import ImageDataset


def add_denoising_options(parser: argparse.ArgumentParser, serve_spacing: str) -> None:
    """Network, schedule and validation options; `serve_spacing` is the model's served timestep spacing."""
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[8])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by 'no class'")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--val-every", type=int, default=1000,
                        help="log the EMA model's noise-prediction MSE on fixed held-out test images this often")
    parser.add_argument("--val-images", type=int, default=512)
    parser.add_argument("--serve-spacing", default=serve_spacing, choices=SPACINGS,
                        help="timestep spacing of the served sampler (generators/schedulers.py)")


@torch.no_grad()
def validation_losses(model: nn.Module, diffusion: GaussianDiffusion,
                      batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Unweighted noise-prediction MSE of an eval-mode model on a fixed held-out batch (fixed t and noise, so
    comparable across steps), with the true labels and with the 'no class' label: their gap shows how much the
    class is used."""
    def mse(labels: torch.Tensor) -> float:
        chunks = zip(*(v.split(256) for v in (batch["x0"], labels, batch["t"], batch["noise"])))
        return torch.cat([diffusion.eps_mse(model, *chunk) for chunk in chunks]).mean().item()

    return {"val_loss": mse(batch["labels"]),
            "val_loss_unconditional": mse(torch.full_like(batch["labels"], model.null_class))}


def held_out_batch(data: Path, n_images: int, diffusion: GaussianDiffusion,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """n_images test images with their labels, timesteps and noise, the same for every call."""
    generator = torch.Generator().manual_seed(0)
    x0, labels = ImageDataset(data, split="test").batch(n_images, generator)
    t = torch.randint(0, diffusion.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return {"x0": x0.to(device), "labels": labels.to(device), "t": t.to(device), "noise": noise.to(device)}


def train_denoiser(args: argparse.Namespace, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                   run: TrainingRun, diffusion: GaussianDiffusion, data: ImageDataset, device: torch.device,
                   export: Callable[[], None], sample: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                   forward: nn.Module | None = None) -> None:
    """The loop: label dropout, Min-SNR noise-prediction loss, clipping, EMA, held-out loss, saves and grids.

    `sample(ema_model, labels)` draws the preview grid; `forward` (default `model`) may be a compiled view."""
    validation = held_out_batch(args.data, args.val_images, diffusion, device)
    forward = forward or model
    model.train()
    while not run.done():
        x, labels = data.batch(args.batch_size, run.generator, hflip=True)  # on the data's device
        drop = torch.rand(len(labels), generator=run.generator).to(device) < args.label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
        lr = learning_rate(args, run.step, run.optimizer_start)
        set_learning_rate([optimizer], lr)
        loss = diffusion.training_loss(forward, x, labels)
        grad_norm = clip_and_step(model, optimizer, loss, args.grad_clip)
        ema.update(model, run.step)
        run.progress(loss=loss.detach(), grad_norm=grad_norm, lr=lr)
        if run.due(args.val_every):
            run.log(**validation_losses(ema.model, diffusion, validation))
        if run.due(args.save_every):
            export()
        if run.due(args.sample_every):
            labels = torch.arange(len(data.class_names)).repeat(4)  # one class per column
            images = sample(ema.model, labels)
            print(f"samples: {run.save_samples(images, columns=len(data.class_names))}")
    export()
    run.close()
    print(f"saved {args.out} at step {run.step}")
