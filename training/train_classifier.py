"""Train the CIFAR-10 or MNIST classifier whose features training/evaluate.py measures samples in.

    python -m training.train_classifier --dataset mnist
    python -m training.train_classifier --dataset cifar10 --max-minutes 50 --resume

SGD with Nesterov momentum on a one-cycle schedule, label smoothing, random crops (plus flips for
CIFAR-10). Step-based like the generator scripts: --resume continues from --state-dir with the
same --epochs (the schedule is laid out over them). At the end, or at --max-minutes, it measures
test accuracy and writes the classifier to --out (safetensors + config.json).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from generators.checkpoint import save_checkpoint
from training.classifiers import PRESETS, Classifier, ClassifierConfig, classify
from training.common import ROOT, TrainingRun, setup, stamp
from training.data import DEFAULT_PATHS, ImageDataset

# per data set: default epochs, and the augmentation (digits must not be mirrored)
DATASETS = {
    "cifar10": dict(epochs=8, hflip=True, crop_pad=4),
    "mnist": dict(epochs=2, hflip=False, crop_pad=2),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
parser.add_argument("--data", type=Path, default=None, help="Keras-layout .npz (default: the shared copy)")
parser.add_argument("--out", type=Path, default=None, help="default: checkpoints/classifiers/<dataset>")
parser.add_argument("--state-dir", type=Path, default=None, help="default: runs/classifiers/<dataset>")
parser.add_argument("--resume", action="store_true", help="continue from --state-dir (same --epochs)")
parser.add_argument("--epochs", type=int, default=None, help="default: 8 for cifar10, 2 for mnist")
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--lr", type=float, default=0.2, help="peak of the one-cycle schedule")
parser.add_argument("--weight-decay", type=float, default=5e-4)
parser.add_argument("--label-smoothing", type=float, default=0.1)
parser.add_argument("--max-minutes", type=float, default=None, help="stop early, measure and save")
parser.add_argument("--stem", type=int, default=None, help="architecture; default: the data set's preset")
parser.add_argument("--widths", type=int, nargs="+", default=None)
parser.add_argument("--residual", type=int, nargs="+", default=None, help="1/0 per stage: residual block or not")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument("--save-every", type=int, default=200, help="steps between saves of the training state")


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `pad` pixels, filling the border by reflection."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def architecture(args: argparse.Namespace, data: ImageDataset) -> ClassifierConfig:
    preset = PRESETS[args.dataset]
    return ClassifierConfig(
        in_channels=data.image_shape[0], num_classes=len(data.class_names),
        stem=args.stem or preset.stem,
        widths=tuple(args.widths or preset.widths),
        residual=tuple(bool(r) for r in args.residual) if args.residual else preset.residual,
    )


def main() -> None:
    args = parser.parse_args()
    settings = DATASETS[args.dataset]
    args.data = args.data or DEFAULT_PATHS[args.dataset]
    args.out = args.out or ROOT / "checkpoints" / "classifiers" / args.dataset
    args.state_dir = args.state_dir or ROOT / "runs" / "classifiers" / args.dataset
    args.epochs = args.epochs or settings["epochs"]
    device = setup(args)
    train, test = ImageDataset(args.data), ImageDataset(args.data, split="test")
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    args.max_steps = args.epochs * steps_per_epoch  # TrainingRun stops here

    config = architecture(args, train)
    model = Classifier(config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.max_steps,
                                                   pct_start=0.25)
    run = TrainingRun(args, {"model": model, "optimizer": optimizer, "schedule": schedule})
    if args.resume and not run.try_resume():
        print(f"no training state in {args.state_dir}; starting fresh")
    print(f"classifier {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {device}, "
          f"{args.epochs} epochs of {steps_per_epoch} steps, step {run.step}")

    model.train()
    while not run.done():
        x, y = train.batch(args.batch_size, run.generator, hflip=settings["hflip"])
        x = random_crop(x, settings["crop_pad"], run.generator)
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        run.progress(loss=loss.detach(), lr=schedule.get_last_lr()[0])
        if run.due(args.save_every):
            run.save_state()
    run.save_state()
    run.close()

    model.eval()
    _, logits = classify(model, test.images, 500, device)
    accuracy = (logits.argmax(1) == test.labels).float().mean().item()
    epochs = round(run.step / steps_per_epoch, 2)
    served = {"model_type": "classifier", "dataset": args.dataset, "classifier": config.to_dict(),
              "class_names": train.class_names, "test_accuracy": round(accuracy, 4), "epochs": epochs}
    save_checkpoint(args.out, model.state_dict(),
                    stamp(served, run, train.sha256, weight_decay=args.weight_decay,
                          label_smoothing=args.label_smoothing, planned_epochs=args.epochs))
    print(f"test accuracy {accuracy:.4f} after {epochs} epochs; saved {args.out}")


if __name__ == "__main__":
    main()
