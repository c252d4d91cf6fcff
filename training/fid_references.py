"""Real-data references for the standard FID, to read every generator figure against.

    python -m training.fid_references                 # -> docs/quality/fid_references.json
    python -m training.fid_references --data ../shared/data/mnist.npz --reference-size 1000 --n 1000 \
        --test-sizes 1000 --out docs/quality/fid_references_mnist.json   # MNIST, against the GAN's reference

Against the fixed training reference of training/evaluate.py (10k images by default):
- test images at 2.5k, 5k and 10k per side (both sides subsampled), showing how FID shrinks with N, and
  the fit FID = a + c (1/n_test + 1/n_train) through them, extrapolated to the published 50k-vs-10k set-up;
- at each --n (images per set): other training images, and those with contrast x1.4, blurred 2x and 4x
  (resized down and up again as PIL's bilinear resize does), with Gaussian noise of std 25/255, and uniform
  noise. The sets at a smaller N are the first images of the largest set, so Inception runs once per set.
Every entry gives FID, KID, precision and recall (against as many reference images as the set holds), pixel std
and clipped fraction, so a generator's figures at the same N can be placed on this ladder.
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
                          pixel_statistics, precision_recall, real_subsets, reference_features)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", type=Path, default=DEFAULT_PATHS["cifar10"], help="Keras-layout .npz archive")
parser.add_argument("--reference-size", type=int, default=10000)
parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000], help="images per degraded set, one ladder each")
parser.add_argument("--test-sizes", type=int, nargs="*", default=[2500, 5000, 10000])
parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality" / "fid_references.json")
parser.add_argument("--only", nargs="+", metavar="SET", default=None,
                    help="measure only these degraded sets again (e.g. 'blurred 2x'), keeping the others from --out")
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


def extrapolate(by_size: dict[str, dict], target: tuple[int, int] = (50000, 10000), min_size: int = 2500) -> dict:
    """Least-squares fit of FID = a + c (1/n_generated + 1/n_real), FID's small-sample bias, through the
    test-vs-train entries of at least `min_size` per side, evaluated at `target` (n_generated, n_real): the
    published set-up is 50k vs 10k."""
    sizes = [int(n) for n in by_size if int(n) >= min_size]
    if len(sizes) < 2:
        return {}
    x = torch.tensor([2 / n for n in sizes], dtype=torch.float64)
    y = torch.tensor([by_size[str(n)]["fid"] for n in sizes], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    a, c = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    return {"a": a, "c": c, "fitted_sizes": sizes, "target": list(target),
            "fid": a + c * (1 / target[0] + 1 / target[1])}


def entry(real: torch.Tensor, features: torch.Tensor, images: torch.Tensor | None = None) -> dict:
    kid, kid_std = kernel_inception_distance(real, features)
    precision, recall = precision_recall(real, features)  # the set against as many reference images
    out = {"n": len(features), "fid": frechet_distance(real, features), "kid": kid, "kid_std": kid_std,
           "precision": precision, "recall": recall}
    return out | (pixel_statistics(images) if images is not None else {})


def main() -> None:
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    inception = load_inception()
    train, test = ImageDataset(args.data), ImageDataset(args.data, split="test")
    reference_idx, other_idx = real_subsets(len(train), args.reference_size, max(args.n))
    real = reference_features(inception, train, args.reference_size)
    test_features = reference_features(inception, test, min(max(args.test_sizes, default=0), len(test)))

    by_size = {}
    for n in args.test_sizes:
        subset = torch.randperm(len(real), generator=torch.Generator().manual_seed(n))[:n]
        by_size[str(n)] = entry(real[subset], test_features[:n])
    generator = torch.Generator().manual_seed(0)
    sets = degraded_sets(train.images[other_idx], generator)  # every set is drawn, so each keeps its own noise
    ladders: dict[str, dict] = {str(n): {} for n in sorted(args.n)}
    previous = json.loads(args.out.read_text()) if args.only else {}
    unknown = set(args.only or []) - set(sets)
    if unknown:
        raise SystemExit(f"unknown sets {sorted(unknown)}; the sets are {list(sets)}")
    if args.only and set(previous["ladder_by_size"]) != set(ladders):
        raise SystemExit(f"--only keeps the other sets from {args.out}, which holds N = "
                         f"{list(previous['ladder_by_size'])}: pass the same --n")
    for name, images in sets.items():
        if args.only and name not in args.only:
            for n in ladders:
                ladders[n][name] = previous["ladder_by_size"][n][name]
            continue
        features = inception_features(inception, images, args.batch_size, desc=name)
        for n in ladders:
            ladders[n][name] = entry(real, features[:int(n)], images[:int(n)])
    run = {"machine": machine(torch.device("cpu")), "wall_seconds": round(time.monotonic() - started, 1)}
    if args.only:  # the kept rungs' run stays the file's; this one is recorded beside it
        run = {key: previous[key] for key in run} | {"remeasured": {"sets": args.only, **run}}
    result = {
        "reference": {"split": "train", "n": args.reference_size, **pixel_statistics(train.images[reference_idx])},
        "test_vs_train_by_size": by_size,
        "test_vs_train_extrapolated": extrapolate(by_size),
        "ladder_by_size": ladders,
        "data_sha256": train.sha256,
        **run,
    }
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({f"{name} at {n}": round(e["fid"], 2) for n, ladder in ladders.items() for name, e in ladder.items()}
                     | {f"test at {n}": round(e["fid"], 2) for n, e in by_size.items()}, indent=1))


if __name__ == "__main__":
    main()
