"""Measure a generator's samples with the standard FID and KID, colour figures and the asked-class accuracy.

    python -m training.evaluate --model diffusion --n-samples 10000          # the served default
    python -m training.evaluate --model diffusion --n-samples 2000 --params '{"guidance_scale": 2}' \
        --out docs/quality/diffusion-guidance-2.json
    python -m training.evaluate --model ebm --n-samples 2000

FID and KID are taken in the standard Inception-v3 features (training/fid.py) against a fixed set
of --reference-size training images (10k by default; cached), or with --reference-split test against test images,
which the generator never saw. FID is biased upwards at small N:
compare FIDs only at equal N (training/fid_references.py gives real-data references per N); KID
is unbiased. Precision and recall (training/fid.py) split what FID mixes: how many samples look like real
images, and how much of the real images' variety is drawn; they take N samples against the first N reference
images. Colour figures the FID hardly sees: the mean per-image pixel std and the fraction
of clipped pixels (a channel at 0 or 255), beside the same for the real reference images.
Class-conditional models are sampled N/10 per class with their defaults (or unconditionally, with
--params '{"class_label": "none"}'); our own classifier
(training/train_classifier.py) gives the agreement with the asked class, overall and per class; the
within-class spread (mean distance between two samples of one class) shows a generator that ignores its noise;
and, for MNIST, the Frechet distance in its features (FID-M), a figure the GAN targets.

Writes a JSON (default: quality.json in the checkpoint directory) and prints its row of the README's
table (scripts/readme_tables.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch.nn import functional as F
from tqdm import tqdm

from generators.checkpoint import atomic_write_bytes
from generators.gaussian_diffusion import ScheduleConfig
from generators.imaging import to_uint8
from generators.params import NO_CLASS, RANDOM_CLASS, validate
from generators.pipelines import Pipeline, load_pipeline
from training.classifiers import classify, load_classifier
from training.common import ROOT, pick_eval_device
from training.data import DEFAULT_PATHS, ImageDataset
from training.fid import (CACHE_DIR, PR_NEIGHBOURS, frechet_distance, inception_features, kernel_inception_distance,
                          load_inception, pixel_statistics, precision_recall, reference_features, real_subsets,
                          within_class_spread)

# model -> (data set its classifier and reference images come from, parameter that picks a class)
MODELS = {"diffusion": ("cifar10", "class_label"), "ebm": ("cifar10", "class_label"), "gan": ("mnist", "digit")}
# set by the evaluation itself, so not accepted in --params, except class_label "none" (UNCONDITIONAL)
RESERVED = {"n_images", "seed", "format", "class_label", "digit"}
UNCONDITIONAL = {"class_label": NO_CLASS}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=sorted(MODELS), required=True)
parser.add_argument("--checkpoint", type=Path, default=None, help="generator directory (default: checkpoints/<model>)")
parser.add_argument("--classifier", type=Path, default=None, help="default: checkpoints/classifiers/<dataset>")
parser.add_argument("--data", type=Path, default=None, help="Keras-layout .npz (default: the shared copy)")
parser.add_argument("--n-samples", type=int, default=2000)
parser.add_argument("--reference-size", type=int, default=10000, help="real images the FID and KID compare with")
parser.add_argument("--reference-split", choices=("train", "test"), default="train",
                    help="which split those come from: test images were never trained on, so a generator that "
                         "copied its training images would score worse against them than against training images")
parser.add_argument("--fid-cache", type=Path, default=CACHE_DIR, help="where real-image Inception features are kept")
parser.add_argument("--params", default="{}", help="JSON of sampling parameters, as a request would give them")
parser.add_argument("--batch-size", type=int, default=50,
                    help="images per sampling and feature batch (on a 2-core CPU, larger batches sample slower per image)")
parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the choice of real images")
parser.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/quality.json")
parser.add_argument("--progress-dir", type=Path, default=ROOT / "runs" / "eval_progress",
                    help="unfinished runs' batches (git-ignored): run the same command again to resume")
parser.add_argument("--sample-only", action="store_true",
                    help="draw the samples into --progress-dir and stop; the same command without it measures them "
                         "(to sample on a machine that lacks the FID network or the data)")
parser.add_argument("--no-fid", action="store_true",
                    help="skip the Inception network: class accuracy, colour figures and spread only, with FID and KID "
                         "left empty (a cheap check at large N, where Inception would take most of the time)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


@dataclass(frozen=True)
class Lever:
    """A change to the loaded pipeline that no request parameter makes (training/sampling_levers.py); `description`
    names it in the result, its README row and its samples' progress key."""
    description: str
    apply: Callable[[Pipeline], None]


# ---- the measures

def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    return [class_accuracy(logits[labels == k], labels[labels == k]) for k in range(num_classes)]


# ---- images

PROGRESS_STATE = "state.safetensors"  # in a progress directory: batches done and the random state after them


def sample(pipeline: Pipeline, body: dict[str, Any], class_param: str | None, num_classes: int, n: int,
           batch_size: int, seed: int, progress_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples as uint8 NCHW (as they would be served), n/num_classes per class when the model takes
    one; returns them with the asked classes (None for unconditional sampling).

    Each request is validated like a served one; only the batch size is set afterwards, as the
    serving bounds on images per request are about latency, not about what a model may produce.
    With `progress_dir`, each batch is saved there as it is drawn, with the random state after it and the
    machine that drew it, and a run that finds them goes on from there: an interrupted 10k-sample run resumes and
    draws the same images.
    """
    specs = pipeline.param_specs()
    conditional = class_param in {p.name for p in specs} and body.get(class_param) != NO_CLASS
    classes = list(range(num_classes)) if conditional else [None]
    counts = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    batches = [(k, min(batch_size, count - start)) for k, count in zip(classes, counts)
               for start in range(0, count, batch_size)]
    generator = torch.Generator().manual_seed(seed)
    drawn_on = {"machine": json.dumps(machine(pipeline.device))}  # saved with the state, read once here
    saved: list[dict[str, torch.Tensor]] = []
    if progress_dir is not None and (progress_dir / PROGRESS_STATE).exists():
        state = load_file(progress_dir / PROGRESS_STATE)
        saved = [load_file(progress_dir / f"batch-{i:05d}.safetensors") for i in range(int(state["batches_done"]))]
        generator.set_state(state["rng_state"])
    with tqdm(total=n, initial=sum(len(b["images"]) for b in saved), desc="sampling", dynamic_ncols=True,
              mininterval=5) as bar:
        for index in range(len(saved), len(batches)):
            k, size = batches[index]
            params = validate(body if k is None else {**body, class_param: k}, specs)
            params["n_images"] = size
            x = torch.from_numpy(to_uint8(pipeline.sample(params, generator))).permute(0, 3, 1, 2).contiguous()
            saved.append({"images": x} if k is None else {"images": x, "labels": torch.full((size,), k)})
            if progress_dir is not None:
                atomic_write_bytes(progress_dir / f"batch-{index:05d}.safetensors", save(saved[-1]))
                state = {"batches_done": torch.tensor(index + 1), "rng_state": generator.get_state()}
                atomic_write_bytes(progress_dir / PROGRESS_STATE, save(state, metadata=drawn_on))
            bar.update(size)
    images = torch.cat([b["images"] for b in saved])
    return images, (torch.cat([b["labels"] for b in saved]) if conditional else None)


def sampling_machine(progress_dir: Path) -> dict[str, Any] | None:
    """The machine that drew a progress directory's last batch (None when nothing was saved there)."""
    if not (progress_dir / PROGRESS_STATE).exists():
        return None
    with safe_open(progress_dir / PROGRESS_STATE, "pt") as state:
        return json.loads((state.metadata() or {}).get("machine", "null"))


def resolved_params(pipeline: Pipeline, body: dict[str, Any]) -> dict[str, Any]:
    """A request body with the checkpoint's defaults filled in, without what the evaluation sets itself
    (class_label "none" is kept: it says the samples are unconditional)."""
    resolved = {k: v for k, v in validate(body, pipeline.param_specs()).items() if k not in RESERVED}
    return dict(resolved, **UNCONDITIONAL) if body.get("class_label") == NO_CLASS else resolved


def progress_path(args: argparse.Namespace, weights_sha256: str | None, params: dict[str, Any],
                  lever: Lever | None = None) -> Path:
    """Where sample() keeps an unfinished run's batches: named by everything that decides them (`params` with the
    checkpoint's defaults filled in, so a changed default starts afresh)."""
    settings = {"model": args.model, "weights": weights_sha256, "params": params, "n": args.n_samples,
                "batch_size": args.batch_size, "seed": args.seed}
    if lever is not None:
        settings["lever"] = lever.description
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return args.progress_dir / f"{args.model}-{key}"


def blur(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """uint8 NCHW images resized down by `factor` and up again, both bilinear as PIL's `resize` does it (shrinking
    with its antialiased filter, which spans 2 x factor pixels): the common 'blurred 2x / 4x' of FID references."""
    height, width = images.shape[-2:]
    small = F.interpolate(images.float(), size=(height // factor, width // factor), mode="bilinear",
                          antialias=True, align_corners=False).round().clamp(0, 255)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).round().clamp(0, 255).to(
        torch.uint8)


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

QUALITY_HEADER = ["model", "training steps", "sampling", "N vs real images (training unless marked)", "FID", "KID",
                  f"precision / recall (k = {PR_NEIGHBOURS}, N vs N)", "class accuracy (worst class)", "pixel std (real)",
                  "clipped (real)", "within-class spread (real)", "FID-M"]


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def describe_sampling(params: dict[str, Any], conditional: bool) -> str:
    """Validated sampling parameters in words: 'DDIM 20 linspace steps, guidance 2 at t 167-882, rescale 0.7',
    'Langevin 20 trailing levels, 1 corrector step, snr 0.16, random class per image, guidance 4' (results measured before there was a
    choice of spacing have none in their parameters: they were trailing)."""
    if "sampler" not in params and "levels" not in params:
        return "one forward pass"
    random = "random class per image, " if params.get("class_label") == RANDOM_CLASS else ""
    guidance = f", {random}guidance {params['guidance_scale']:g}" if conditional else ", unconditional"
    last = ScheduleConfig().num_train_timesteps - 1  # the served schedule's: guidance_t_max's default
    t_min, t_max = params.get("guidance_t_min", 0), params.get("guidance_t_max", last)
    if conditional and (t_min > 0 or t_max < last):
        guidance += f" at t {t_min}-{t_max}"
    if conditional and params.get("guidance_rescale"):
        guidance += f", rescale {params['guidance_rescale']:g}"
    if conditional and params.get("guidance_parallel", 1.0) != 1.0:
        guidance += f", parallel {params['guidance_parallel']:g}"
    spacing = params.get("timestep_spacing", "trailing")
    if "sampler" in params:
        return f"{params['sampler'].upper()} {params['steps']} {spacing} steps" + guidance
    corrector = f"{params['corrector_steps']} corrector step{'s' if params['corrector_steps'] != 1 else ''}"
    return f"Langevin {params['levels']} {spacing} levels, {corrector}, snr {params['snr']:g}" + guidance


def precision_recall_cell(result: dict[str, Any]) -> str:
    """'precision / recall' of a result or reference entry; — where they were not measured."""
    return "—" if result.get("precision") is None else f"{result['precision']:.3f} / {result['recall']:.3f}"


def quality_row(result: dict[str, Any], label: str) -> list[Any]:
    accuracy = result["class_accuracy"]
    real = result["real_pixels"]
    sampling = describe_sampling(result["sampling_params"], accuracy is not None)
    if result.get("lever"):
        sampling += f"; {result['lever']}"
    return [label, result["generator"]["steps"], sampling,
            f"{result['n_samples']} vs {result['reference']['n']}"
            + (" test" if result["reference"].get("split") == "test" else ""),
            "—" if result["fid"] is None else f"{result['fid']:.1f}", "—" if result["kid"] is None else f"{result['kid']:.4f}",
            precision_recall_cell(result),
            "—" if accuracy is None else f"{accuracy:.3f} ({min(result['per_class_accuracy']):.3f})",
            f"{result['pixel_std']:.3f} ({real['pixel_std']:.3f})",
            f"{result['clipped_fraction']:.4f} ({real['clipped_fraction']:.4f})",
            "—" if result.get("within_class_spread") is None else
            f"{result['within_class_spread']:.3f} ({result['real_within_class_spread']:.3f})",
            "—" if result.get("fid_m") is None else f"{result['fid_m']:.2f}"]


def main(argv: list[str] | None = None, lever: Lever | None = None) -> None:
    """Measure with the command line `argv` (default: sys.argv), the pipeline changed by `lever` when given."""
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_eval_device(args.device)
    dataset, class_param = MODELS[args.model]
    checkpoint = args.checkpoint or ROOT / "checkpoints" / args.model
    body = json.loads(args.params)
    if not isinstance(body, dict) or RESERVED & set(body) - set(UNCONDITIONAL):
        raise SystemExit(f"--params must be a JSON object without {sorted(RESERVED)}")
    if body.get("class_label", NO_CLASS) != NO_CLASS:
        raise SystemExit(f"--params: class_label may only be {NO_CLASS!r} (unconditional); "
                         "otherwise the evaluation asks for every class itself")

    pipeline = load_pipeline(checkpoint, device)
    if pipeline.model_type != args.model:
        raise SystemExit(f"{checkpoint} holds a {pipeline.model_type} model, not {args.model}")
    if lever is not None:
        lever.apply(pipeline)
    classifier, classifier_config = load_classifier(args.classifier or ROOT / "checkpoints" / "classifiers" / dataset,
                                                    device)
    if classifier_config["dataset"] != dataset:
        raise SystemExit(f"{args.model} is measured with a {dataset} classifier, not {classifier_config['dataset']}")
    sampling_params = resolved_params(pipeline, body)
    progress_dir = progress_path(args, pipeline.config.get("weights_sha256"), sampling_params, lever)
    images, labels = sample(pipeline, body, class_param, classifier.config.num_classes, args.n_samples,
                            args.batch_size, args.seed, progress_dir)
    if args.sample_only:
        print(f"samples in {progress_dir}; run again without --sample-only to measure them")
        return
    real = ImageDataset(args.data or DEFAULT_PATHS[dataset], split=args.reference_split)
    generator_training = pipeline.config.get("training", {})
    if generator_training.get("data_sha256") not in (None, real.sha256):
        print(f"warning: {checkpoint} was trained on other data than {real.path}")
    fid = kid = kid_std = precision = recall = None
    if not args.no_fid:
        inception = load_inception(device)
        features = inception_features(inception, images, args.batch_size)
        real_features = reference_features(inception, real, args.reference_size, cache_dir=args.fid_cache)
        fid = frechet_distance(real_features, features)
        kid, kid_std = kernel_inception_distance(real_features, features)
        precision, recall = precision_recall(real_features, features)  # the first N reference images
    classifier_features, logits = classify(classifier, images, args.batch_size, device)
    reference_idx, _ = real_subsets(len(real), args.reference_size)
    fid_m = None
    if dataset == "mnist":
        real_classifier_features, _ = classify(classifier, real.images[reference_idx], args.batch_size, device)
        fid_m = frechet_distance(real_classifier_features, classifier_features)

    result = {
        "model": args.model,
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "precision_recall": None if precision is None else {"n": min(len(images), args.reference_size),
                                                            "k": PR_NEIGHBOURS},
        "n_samples": len(images),
        "reference": {"split": args.reference_split, "n": args.reference_size, "features": "Inception-v3 pool3 (TF 2015-12-05)"},
        **pixel_statistics(images),
        "real_pixels": pixel_statistics(real.images[reference_idx]),
        "class_accuracy": None if labels is None else class_accuracy(logits, labels),
        "per_class_accuracy": None if labels is None else per_class_accuracy(logits, labels,
                                                                             classifier.config.num_classes),
        "fid_m": fid_m,
        "within_class_spread": None if labels is None else within_class_spread(images, labels),
        "real_within_class_spread": within_class_spread(real.images[reference_idx], real.labels[reference_idx]),
        "seed": args.seed,
        "sampling_params": sampling_params,
        "lever": None if lever is None else lever.description,
        "generator": {"checkpoint": str(checkpoint), "steps": generator_training.get("steps"),
                      "weights_sha256": pipeline.config.get("weights_sha256")},
        "classifier": {"dataset": dataset, "test_accuracy": classifier_config.get("test_accuracy"),
                       "weights_sha256": classifier_config.get("weights_sha256")},
        "data_sha256": real.sha256,
        "machine": machine(device),
        "sampling_machine": sampling_machine(progress_dir),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out = args.out or checkpoint / "quality.json"
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    shutil.rmtree(progress_dir, ignore_errors=True)
    print(f"wrote {out}")
    print(markdown_table(QUALITY_HEADER, [quality_row(result, args.model)]))


if __name__ == "__main__":
    main()
