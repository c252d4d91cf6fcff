"""Held-out loss of served diffusion checkpoints: the `val_loss` that train_diffusion logs, for any checkpoint.

    python -m training.diffusion_val_loss checkpoints/diffusion runs/baselines/diffusion

Noise-prediction MSE on --val-images fixed test images with fixed timesteps and noise (the same batch
train_diffusion uses), with the true labels and with the 'no class' label. Lower is better; figures are
comparable across checkpoints and sessions at the same --val-images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig
from generators.pipelines import load_pipeline
from training.data import DEFAULT_PATHS
from training.denoising import held_out_batch, validation_losses

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoints", type=Path, nargs="+", help="served diffusion checkpoint directories")
parser.add_argument("--data", type=Path, default=DEFAULT_PATHS["cifar10"], help="Keras-layout .npz archive")
parser.add_argument("--val-images", type=int, default=512)
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def main() -> None:
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for checkpoint in args.checkpoints:
        pipeline = load_pipeline(checkpoint, "cpu")
        if pipeline.model_type != "diffusion":
            raise SystemExit(f"{checkpoint} holds a {pipeline.model_type} model, not diffusion")
        diffusion = GaussianDiffusion(ScheduleConfig(**pipeline.config["schedule"]))
        batch = held_out_batch(args.data, args.val_images, diffusion, torch.device("cpu"))
        losses = validation_losses(pipeline.unet, diffusion, batch)
        print(json.dumps({"checkpoint": str(checkpoint), "steps": pipeline.config["training"]["steps"],
                          **{k: round(v, 5) for k, v in losses.items()}}))


if __name__ == "__main__":
    main()
