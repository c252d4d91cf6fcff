"""How well the EBM's energy tells CIFAR-10 photos from other images: AUROC per kind of outsider.

    python -m training.ebm_ood                      # -> docs/quality/ebm_ood.json
    python -m training.ebm_ood --set-default        # also store the chosen noise level as the served default

The energy is taken at one of several noise levels (the image itself is not noised). The level is
chosen on training images (CIFAR-10 train against MNIST train, blurred and noise images made from
training images), then AUROC is reported on held-out test images: CIFAR-10 test against MNIST test
digits (padded to 32x32, grey repeated to RGB), blurred CIFAR-10 test images (2x and 4x) and uniform
noise. AUROC is the chance that an outsider gets a higher energy than a CIFAR-10 image: 0.5 is
guessing, 1.0 a perfect separation.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generators.checkpoint import CONFIG_NAME, atomic_write_bytes
from generators.pipelines import EBMPipeline, load_pipeline
from training.common import ROOT
from training.data import DEFAULT_PATHS, ImageDataset
from training.evaluate import blur, machine

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "ebm")
parser.add_argument("--cifar", type=Path, default=DEFAULT_PATHS["cifar10"])
parser.add_argument("--mnist", type=Path, default=DEFAULT_PATHS["mnist"])
parser.add_argument("--n", type=int, default=1000, help="images per set")
parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 5, 10, 20, 50, 100, 200])
parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality" / "ebm_ood.json")
parser.add_argument("--set-default", action="store_true", help="write the chosen timestep into the checkpoint")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)


def digits_as_cifar(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) digits -> (N, 3, 32, 32): a 2-pixel black border, grey repeated to RGB."""
    return F.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def outsiders(cifar: torch.Tensor, digits: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"MNIST digits": digits_as_cifar(digits), "CIFAR-10 blurred 2x": blur(cifar, 2),
            "CIFAR-10 blurred 4x": blur(cifar, 4),
            "uniform noise": torch.randint(0, 256, cifar.shape, generator=generator, dtype=torch.uint8)}


@torch.no_grad()
def energies(pipeline: EBMPipeline, images: torch.Tensor, timestep: int, batch_size: int = 250) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div(127.5).sub(1).to(pipeline.device)
        t = torch.full((len(x),), timestep, dtype=torch.long, device=pipeline.device)
        out.append(pipeline.energy.energy(x, t).cpu())
    return torch.cat(out)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outsider's energy > an insider's), ties counting half: the Mann-Whitney form of the ROC area."""
    diff = outside.double()[:, None] - inside.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def aurocs(pipeline: EBMPipeline, cifar: torch.Tensor, others: dict[str, torch.Tensor], timestep: int) -> dict:
    inside = energies(pipeline, cifar, timestep)
    return {name: auroc(inside, energies(pipeline, images, timestep)) for name, images in others.items()}


def subset(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=generator)[:n]]


def main() -> None:
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.checkpoint)
    if not isinstance(pipeline, EBMPipeline):
        raise SystemExit(f"{args.checkpoint} is not an EBM checkpoint")
    generator = torch.Generator().manual_seed(args.seed)
    splits = {}
    for split in ("train", "test"):
        cifar = subset(ImageDataset(args.cifar, split=split).images, args.n, generator)
        digits = subset(ImageDataset(args.mnist, split=split).images, args.n, generator)
        splits[split] = (cifar, outsiders(cifar, digits, generator))

    selection = {t: aurocs(pipeline, *splits["train"], t) for t in args.timesteps}
    chosen = max(selection, key=lambda t: sum(selection[t].values()))
    test = {t: aurocs(pipeline, *splits["test"], t) for t in args.timesteps}
    result = {
        "chosen_timestep": chosen,
        "test_auroc": test[chosen],
        "test_auroc_by_timestep": {str(t): v for t, v in test.items()},
        "selection_auroc_by_timestep": {str(t): v for t, v in selection.items()},
        "n_per_set": args.n,
        "generator": {"steps": pipeline.config["training"]["steps"],
                      "weights_sha256": pipeline.config["weights_sha256"]},
        "machine": machine(pipeline.device),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({"chosen_timestep": chosen, "test_auroc": test[chosen]}, indent=1))
    if args.set_default:
        config = dict(pipeline.config, scoring={"timestep": chosen})
        atomic_write_bytes(args.checkpoint / CONFIG_NAME,
                           (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        print(f"{args.checkpoint / CONFIG_NAME}: scoring timestep {chosen}")


if __name__ == "__main__":
    main()
