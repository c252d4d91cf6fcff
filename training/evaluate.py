"""Measure a generator's samples in the feature space of a classifier trained on the same data.

    python -m training.evaluate --model gan
    python -m training.evaluate --model diffusion --n-samples 5000 --params '{"steps": 20}'
    python -m training.evaluate --model ebm --checkpoint runs/ebm-baseline --out ebm-baseline.json

Needs the classifier from training/train_classifier.py (cifar10 for diffusion and ebm, mnist for
gan). FID is taken against N *training* images, because the generators learn the training split and
a classifier trained on it puts real training images far from the test set. Read it against
references computed in the same space with the same N:
- test vs train: unseen real images, so what a perfect generator of new images would score;
- train vs train: other training images, what copying the training set would score;
- blurred vs train: the other training images, 4x down- and up-sampled: right content, lost detail;
- noise vs train: uniform noise, where "nothing learned" lies.
Class-conditional models are sampled N/10 per class with their default settings; the classifier's
agreement with the asked class is `class_accuracy`.

Writes a JSON (default: quality.json in the checkpoint directory) and prints its row of the README's
table (scripts/readme_tables.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from generators.checkpoint import atomic_write_bytes
from generators.imaging import to_uint8
from generators.params import validate
from generators.pipelines import Pipeline, load_pipeline
from training.classifiers import classify, load_classifier
from training.common import ROOT, pick_device
from training.data import DEFAULT_PATHS, ImageDataset

# model -> (data set its classifier and reference images come from, parameter that picks a class)
MODELS = {"diffusion": ("cifar10", "class_label"), "ebm": ("cifar10", None), "gan": ("mnist", "digit")}
FID_NAMES = {"cifar10": "fid_c", "mnist": "fid_m"}
# set by the evaluation itself, so not accepted in --params
RESERVED = {"n_images", "seed", "format", "class_label", "digit"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=sorted(MODELS), required=True)
parser.add_argument("--checkpoint", type=Path, default=None, help="generator directory (default: checkpoints/<model>)")
parser.add_argument("--classifier", type=Path, default=None, help="default: checkpoints/classifiers/<dataset>")
parser.add_argument("--data", type=Path, default=None, help="Keras-layout .npz (default: the shared copy)")
parser.add_argument("--n-samples", type=int, default=5000)
parser.add_argument("--params", default="{}", help="JSON of sampling parameters, as a request would give them")
parser.add_argument("--batch-size", type=int, default=250, help="images per sampling and feature batch")
parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the choice of real images")
parser.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/quality.json")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


# ---- the measures, on features and logits

class Precomputed(nn.Module):
    """Identity 'feature extractor': each image set goes through the classifier once, and its
    features then serve FID, the Inception-like score and diversity alike."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, d) feature sets."""
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def inception_like(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): 1 when every image gets the same prediction, up to the number of
    classes when each is classified confidently and the classes are used evenly."""
    log_p = logits.double().log_softmax(dim=1)
    log_marginal = log_p.logsumexp(dim=0) - torch.log(torch.tensor(float(len(logits)), dtype=torch.float64))
    return float((log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean().exp())


def mean_pairwise_distance(features: torch.Tensor, chunk: int = 1024) -> float:
    """Mean L2 distance over all pairs of distinct rows, in chunks to bound memory."""
    f = features.double()
    total = sum(float(torch.cdist(f[i:i + chunk], f).sum()) for i in range(0, len(f), chunk))
    return total / (len(f) * (len(f) - 1))


def diversity(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Spread of the samples' features relative to real images': 1 = as diverse, near 0 = mode collapse."""
    return mean_pairwise_distance(features) / mean_pairwise_distance(reference)


def pixel_std(images: torch.Tensor) -> float:
    """Mean over uint8 images of their pixel std on the [-1, 1] scale; flat-colour images give ~0."""
    return float((images.flatten(1).float() / 127.5).std(dim=1).mean())


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


# ---- images

def sample(pipeline: Pipeline, body: dict[str, Any], class_param: str | None, num_classes: int, n: int,
           batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples as uint8 NCHW (as they would be served), n/num_classes per class when the model takes
    one; returns them with the asked classes (None for unconditional sampling).

    Each request is validated like a served one; only the batch size is set afterwards, as the
    serving bounds on images per request are about latency, not about what a model may produce.
    """
    specs = pipeline.param_specs()
    conditional = class_param is not None and class_param in {p.name for p in specs}
    classes = list(range(num_classes)) if conditional else [None]
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    with tqdm(total=n, desc="sampling", dynamic_ncols=True, mininterval=5) as bar:
        for i, k in enumerate(classes):
            count = n // len(classes) + (i < n % len(classes))
            params = validate(body if k is None else {**body, class_param: k}, specs)
            for start in range(0, count, batch_size):
                params["n_images"] = min(batch_size, count - start)
                x = to_uint8(pipeline.sample(params, generator))
                images.append(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
                if k is not None:
                    labels.append(torch.full((len(x),), k))
                bar.update(len(x))
    return torch.cat(images), (torch.cat(labels) if labels else None)


def blur(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """uint8 NCHW images averaged down by `factor` and bilinearly up again."""
    small = F.avg_pool2d(images.float(), factor, ceil_mode=True)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False).round().to(torch.uint8)


def real_sets(train: ImageDataset, test: ImageDataset, n: int, seed: int) -> dict[str, torch.Tensor]:
    """uint8 image sets of size n (test: at most its size): the training reference, other training
    images disjoint from it, those blurred, test images, and uniform noise."""
    if 2 * n > len(train):
        raise SystemExit(f"--n-samples {n}: needs 2N <= {len(train)} training images for the references")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    other_train = train.images[order[n:2 * n]]
    return {
        "train": train.images[order[:n]],
        "other_train": other_train,
        "blurred": blur(other_train),
        "test": test.images[torch.randperm(len(test), generator=generator)[:n]],
        "noise": torch.randint(0, 256, (n, *train.image_shape), generator=generator, dtype=torch.uint8),
    }


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# ---- the README's table (scripts/readme_tables.py renders all rows; main() prints its own)

QUALITY_HEADER = ["model", "training steps", "sampling", "N", "FID", "floor (test vs train)", "blurred real",
                  "uniform noise", "class accuracy", "IS-like", "diversity", "pixel std"]


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def describe_sampling(params: dict[str, Any], conditional: bool) -> str:
    """Validated sampling parameters in words: 'DDIM 20 steps, guidance 2', '30 Langevin steps, step size 10'."""
    if "sampler" in params:
        words = f"{params['sampler'].upper()} {params['steps']} steps"
        return words + (f", guidance {params['guidance_scale']:g}" if conditional else ", unconditional")
    if "step_size" in params:
        return f"{params['steps']} Langevin steps, step size {params['step_size']:g}"
    return "one forward pass"


def quality_row(result: dict[str, Any], label: str) -> list[Any]:
    refs = result["fid_references"]
    accuracy = result["class_accuracy"]
    return [label, result["generator"]["steps"], describe_sampling(result["sampling_params"], accuracy is not None),
            result["n_samples"], f"{result[result['fid_name']]:.2f}", f"{refs['test_vs_train']:.2f}",
            f"{refs['blurred_vs_train']:.2f}", f"{refs['noise_vs_train']:.1f}",
            "—" if accuracy is None else f"{accuracy:.3f}", f"{result['inception_like']:.2f}",
            f"{result['diversity']:.3f}", f"{result['pixel_std']:.3f}"]


def main() -> None:
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dataset, class_param = MODELS[args.model]
    checkpoint = args.checkpoint or ROOT / "checkpoints" / args.model
    body = json.loads(args.params)
    if not isinstance(body, dict) or RESERVED & set(body):
        raise SystemExit(f"--params must be a JSON object without {sorted(RESERVED)}")

    pipeline = load_pipeline(checkpoint, device)
    if pipeline.model_type != args.model:
        raise SystemExit(f"{checkpoint} holds a {pipeline.model_type} model, not {args.model}")
    classifier, classifier_config = load_classifier(args.classifier or ROOT / "checkpoints" / "classifiers" / dataset,
                                                    device)
    if classifier_config["dataset"] != dataset:
        raise SystemExit(f"{args.model} is measured with a {dataset} classifier, not {classifier_config['dataset']}")
    data = args.data or DEFAULT_PATHS[dataset]
    train, test = ImageDataset(data), ImageDataset(data, split="test")
    generator_training = pipeline.config.get("training", {})
    if generator_training.get("data_sha256") not in (None, train.sha256):
        print(f"warning: {checkpoint} was trained on other data than {data}")

    images, labels = sample(pipeline, body, class_param, classifier.config.num_classes, args.n_samples,
                            args.batch_size, args.seed)
    features, logits = classify(classifier, images, args.batch_size, device)
    references = real_sets(train, test, args.n_samples, args.seed)
    real = {name: classify(classifier, x, args.batch_size, device) for name, x in references.items()}
    train_features, train_logits = real["train"]

    fid_name = FID_NAMES[dataset]
    result = {
        "model": args.model,
        "fid_name": fid_name,
        fid_name: fid(train_features, features),
        "fid_references": {"test_vs_train": fid(train_features, real["test"][0]),
                           "train_vs_train": fid(train_features, real["other_train"][0]),
                           "blurred_vs_train": fid(train_features, real["blurred"][0]),
                           "noise_vs_train": fid(train_features, real["noise"][0])},
        "class_accuracy": None if labels is None else class_accuracy(logits, labels),
        "inception_like": inception_like(logits),
        "inception_like_real": inception_like(train_logits),
        "diversity": diversity(features, train_features),
        "pixel_std": pixel_std(images),
        "pixel_std_real": pixel_std(references["train"]),
        "n_samples": len(images),
        "n_test": len(real["test"][0]),
        "seed": args.seed,
        "sampling_params": {k: v for k, v in validate(body, pipeline.param_specs()).items()
                            if k not in RESERVED},
        "generator": {"checkpoint": str(checkpoint), "steps": generator_training.get("steps"),
                      "weights_sha256": pipeline.config.get("weights_sha256")},
        "classifier": {"dataset": dataset, "test_accuracy": classifier_config.get("test_accuracy"),
                       "weights_sha256": classifier_config.get("weights_sha256")},
        "data_sha256": train.sha256,
        "machine": machine(device),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out = args.out or checkpoint / "quality.json"
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {out}")
    print(markdown_table(QUALITY_HEADER, [quality_row(result, args.model)]))


if __name__ == "__main__":
    main()
