"""Real-data references for the standard FID, to read every generator figure against.

    python -m training.fid_references                 # -> docs/quality/fid_references.json

Against the fixed 10k-image training reference of training/evaluate.py:
- test images at 2.5k, 5k and 10k per side (both sides subsampled), showing how FID shrinks with N;
- at --n images each: other training images, and those with contrast x1.4, blurred 2x and 4x
  (averaged down and bilinearly up), with Gaussian noise of std 25/255, and uniform noise.
Every entry gives FID, KID, pixel std and clipped fraction, so a generator's figures at the same
N can be placed on this ladder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from generators.checkpoint import atomic_write_bytes
from training.common import ROOT
from training.data import DEFAULT_PATHS, ImageDataset
from training.evaluate import blur, machine
from training.fid import (frechet_distance, inception_features, kernel_inception_distance, load_inception,
                          pixel_statistics, real_subsets, reference_features)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", type=Path, default=DEFAULT_PATHS["cifar10"], help="Keras-layout .npz archive")
parser.add_argument("--reference-size", type=int, default=10000)
parser.add_argument("--n", type=int, default=2000, help="images per degraded set")
parser.add_argument("--test-sizes", type=int, nargs="*", default=[2500, 5000, 10000])
parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality" / "fid_references.json")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--batch-size", type=int, default=100)


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean grey level, clipped to uint8."""
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor * (x - mean)).round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def degraded_sets(other: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "other training images": other,
        "contrast x1.4": contrast(other, 1.4),
        "blurred 2x": blur(other, 2),
        "Gaussian noise std 25/255": gaussian_noise(other, 25.0, generator),
        "blurred 4x": blur(other, 4),
        "uniform noise": torch.randint(0, 256, other.shape, generator=generator, dtype=torch.uint8),
    }


def entry(real: torch.Tensor, features: torch.Tensor, images: torch.Tensor | None = None) -> dict:
    kid, kid_std = kernel_inception_distance(real, features)
    out = {"n": len(features), "fid": frechet_distance(real, features), "kid": kid, "kid_std": kid_std}
    return out | (pixel_statistics(images) if images is not None else {})


def main() -> None:
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    inception = load_inception()
    train, test = ImageDataset(args.data), ImageDataset(args.data, split="test")
    reference_idx, other_idx = real_subsets(len(train), args.reference_size, args.n)
    real = reference_features(inception, train, args.reference_size)
    test_features = reference_features(inception, test, min(max(args.test_sizes, default=0), len(test)))

    by_size = {}
    for n in args.test_sizes:
        subset = torch.randperm(len(real), generator=torch.Generator().manual_seed(n))[:n]
        by_size[str(n)] = entry(real[subset], test_features[:n])
    generator = torch.Generator().manual_seed(0)
    ladder = {name: entry(real, inception_features(inception, images, args.batch_size, desc=name), images)
              for name, images in degraded_sets(train.images[other_idx], generator).items()}
    result = {
        "reference": {"split": "train", "n": args.reference_size, **pixel_statistics(train.images[reference_idx])},
        "test_vs_train_by_size": by_size,
        "ladder": ladder,
        "data_sha256": train.sha256,
        "machine": machine(torch.device("cpu")),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: round(v["fid"], 2) for k, v in (by_size | ladder).items()}, indent=1))


if __name__ == "__main__":
    main()
