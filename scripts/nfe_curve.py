#!/usr/bin/env python3
"""Quality against cost for the diffusion model's samplers: KID and FID at 5-100 steps, with and without guidance,
beside ancestral DDPM at 1000 steps, on the same seeds. It chooses nothing itself; the served default is picked from
its table (README, "Sampler quality against cost") and set with scripts/set_defaults.py.

    python scripts/nfe_curve.py                         # the full grid -> docs/quality/nfe_curve.json and .png
    python scripts/nfe_curve.py --n-samples 20 --steps 2 --samplers ddim --guidance 3 --reference-steps 3 \\
        --out /tmp/nfe.json --plot /tmp/nfe.png         # a check in a minute

Options (defaults in brackets):
  --samplers S ...        few-step samplers to sweep [ddim dpm++2m]
  --steps N ...           steps per image; a guided step costs two network evaluations [5 10 20 50 100]
  --guidance G ...        guidance scales; 1 = plain conditional, one evaluation per step [3 1]
  --reference-steps N     ancestral DDPM steps of the reference; 0 to skip [1000]
  --n-samples N           images per setting, N/10 per class [300]
  --reference-size N      training images the FID and KID compare with (cached features) [10000]
  --batch-size N          images per sampling call [64]
  --seed S                the same for every setting, so every setting starts from the same noise [0]
  --threads N             torch threads [all cores]
  --out PATH, --plot PATH [docs/quality/nfe_curve.json, docs/quality/nfe_curve.png]
  --redraw                only redraw the plot and print the table from --out

Settings run in this order: the sampler grid for each guidance scale (the served default's first), then the
DDPM references, the costliest. Each finished setting is written to --out at once, and a rerun with the same --out skips the
settings already there (same checkpoint, N and seed), so an interrupted sweep continues where it stopped.
KID is unbiased at any N; FID at N = 300 carries a large small-sample bias, so compare FIDs only within this file.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from generators.pipelines import load_pipeline  # noqa: E402
from scripts.archive import handler_settings  # noqa: E402
from scripts.charts import axes, dashed  # noqa: E402
from training.classifiers import classify, load_classifier  # noqa: E402
from training.data import DEFAULT_PATHS, ImageDataset  # noqa: E402
from training.evaluate import class_accuracy, machine, markdown_table, per_class_accuracy, sample  # noqa: E402
from training.fid import (frechet_distance, inception_features, kernel_inception_distance, load_inception,  # noqa: E402
                          pixel_statistics, real_subsets, reference_features)

CHECKPOINT = ROOT / "checkpoints" / "diffusion"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpm++2m"])
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50, 100])
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0, 1.0])
    p.add_argument("--reference-steps", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=300)
    p.add_argument("--reference-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality" / "nfe_curve.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "quality" / "nfe_curve.png")
    p.add_argument("--redraw", action="store_true")
    return p


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The request bodies to measure, in run order."""
    bodies = [{"sampler": s, "steps": n, "guidance_scale": g} for g in args.guidance for s in args.samplers
              for n in args.steps]
    if args.reference_steps:
        bodies += [{"sampler": "ddpm", "steps": args.reference_steps, "guidance_scale": g} for g in args.guidance]
    return bodies


def evaluations(body: dict[str, Any]) -> int:
    """Network evaluations per image: one per step, two where classifier-free guidance is on."""
    return body["steps"] * (1 if body["guidance_scale"] == 1 else 2)


def measure(pipeline, body: dict[str, Any], args, inception, real_features, classifier) -> dict[str, Any]:
    started = time.monotonic()
    images, labels = sample(pipeline, body, "class_label", len(pipeline.class_names), args.n_samples,
                            args.batch_size, args.seed)
    sampling_s = time.monotonic() - started
    features = inception_features(inception, images, args.batch_size)
    kid, kid_std = kernel_inception_distance(real_features, features)
    _, logits = classify(classifier, images, args.batch_size, torch.device("cpu"))
    return {**body, "evaluations_per_image": evaluations(body), "n_samples": len(images),
            "fid": frechet_distance(real_features, features), "kid": kid, "kid_std": kid_std,
            **pixel_statistics(images), "class_accuracy": class_accuracy(logits, labels),
            "worst_class_accuracy": min(per_class_accuracy(logits, labels, len(pipeline.class_names))),
            "sampling_seconds": round(sampling_s, 1),
            "images_per_s": round(len(images) / sampling_s, 3)}


def same_body(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("sampler", "steps", "guidance_scale"))


# ---- presentation (scripts/readme_tables.py renders the table into the README)

CELLS = {  # what a table cell shows, per figure
    "kid": lambda r: f"{r['kid']:.4f} ({r['fid']:.1f})",
    "colour": lambda r: f"{r['clipped_fraction']:.4f} ({r['pixel_std']:.3f})",
}


def curve_table(result: dict[str, Any], figure: str = "kid") -> str:
    """One row per guidance scale and sampler, one column per step count (the reference in one cell):
    KID (FID), or with figure="colour" the clipped fraction (pixel std)."""
    cell = CELLS[figure]
    rows = []
    steps = sorted({r["steps"] for r in result["results"] if r["sampler"] != "ddpm"})
    for scale in sorted({r["guidance_scale"] for r in result["results"]}, reverse=True):
        for sampler in dict.fromkeys(r["sampler"] for r in result["results"]):
            found = {r["steps"]: r for r in result["results"] if r["sampler"] == sampler and r["guidance_scale"] == scale}
            if not found:
                continue
            label = f"guidance {scale:g}" if scale != 1 else "no guidance (conditional)"
            if sampler == "ddpm":
                cells = [f"{cell(r)} at {n} steps" for n, r in found.items()]
                rows.append([label, "DDPM (reference)", "; ".join(cells)] + [""] * (len(steps) - 1))
            else:
                rows.append([label, sampler.upper()] + [cell(found[n]) if n in found else "—" for n in steps])
    return markdown_table(["guidance", "sampler"] + [f"{n} steps" for n in steps], rows)


COLOURS = {"ddim": (31, 119, 180), "dpm++2m": (214, 39, 40), "ddpm": (90, 90, 90)}
WIDTH, HEIGHT, LINE_H = 560, 420, 14


def plot(result: dict[str, Any]) -> bytes:
    """KID against steps (log scale), one panel per guidance scale; the DDPM reference as a dashed line."""
    scales = sorted({r["guidance_scale"] for r in result["results"]}, reverse=True)
    image = Image.new("RGB", (WIDTH * len(scales), HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    grid = [r for r in result["results"] if r["sampler"] != "ddpm"]
    steps = sorted({r["steps"] for r in grid}) or [1]
    top = max([r["kid"] for r in result["results"]] + [1e-6]) * 1.1
    for index, scale in enumerate(scales):
        left = index * WIDTH
        x0, x1, y0, y1 = left + 60, left + WIDTH - 20, HEIGHT - 40, 30 + LINE_H * 3 + 10
        span = math.log(steps[-1] / steps[0]) or 1.0

        def x_of(n: int) -> float:
            return x0 + (x1 - x0) * (0.05 + 0.9 * math.log(n / steps[0]) / span)

        def y_of(value: float) -> float:
            return y0 - (y0 - y1) * max(value, 0.0) / top

        title = f"guidance {scale:g}" if scale != 1 else "no guidance (conditional)"
        draw.text((x0, 8), f"diffusion KID against steps, {title}, N = {result['n_samples']}", fill="black", font=font)
        legend_y = 28
        for sampler in dict.fromkeys(r["sampler"] for r in result["results"]):
            rows = sorted((r for r in result["results"] if r["sampler"] == sampler and r["guidance_scale"] == scale),
                          key=lambda r: r["steps"])
            if not rows:
                continue
            colour = COLOURS.get(sampler, (0, 0, 0))
            if sampler == "ddpm":
                for r in rows:
                    dashed(draw, x0, x1, y_of(r["kid"]), colour)
                label = "; ".join(f"DDPM {r['steps']} steps: {r['kid']:.4f}" for r in rows)
                dashed(draw, x0, x0 + 20, legend_y + 7, colour)
            else:
                points = [(x_of(r["steps"]), y_of(r["kid"])) for r in rows]
                if len(points) > 1:
                    draw.line(points, fill=colour, width=2)
                for x, y in points:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                draw.line([(x0, legend_y + 7), (x0 + 20, legend_y + 7)], fill=colour, width=2)
                label = sampler.upper()
            draw.text((x0 + 26, legend_y), label, fill=colour, font=font)
            legend_y += LINE_H
        axes(draw, font, left, (x0, y1, x1, y0), top, y_of, [(x_of(n), str(n)) for n in steps],
             "steps per image (log scale)", ".3f")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.redraw:
        result = json.loads(args.out.read_text())
        atomic_write_bytes(args.plot, plot(result))
        print(curve_table(result))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.checkpoint, **handler_settings("diffusion"))  # as served
    if pipeline.model_type != "diffusion" or not pipeline.class_names:
        raise SystemExit(f"{args.checkpoint} is not a class-conditional diffusion checkpoint")
    train = ImageDataset(DEFAULT_PATHS["cifar10"])
    inception = load_inception()
    real_features = reference_features(inception, train, args.reference_size)
    classifier, _ = load_classifier(ROOT / "checkpoints" / "classifiers" / "cifar10", torch.device("cpu"))
    header = {"checkpoint": str(args.checkpoint), "weights_sha256": pipeline.config.get("weights_sha256"),
              "training_steps": pipeline.config.get("training", {}).get("steps"), "n_samples": args.n_samples,
              "seed": args.seed, "reference": {"split": "train", "n": args.reference_size},
              "real_pixels": pixel_statistics(train.images[real_subsets(len(train), args.reference_size)[0]])}
    result = {**header, "results": []}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if all(previous.get(k) == v for k, v in header.items() if k != "real_pixels"):
            result["results"] = previous["results"]
    for body in settings(args):
        if any(same_body(body, r) for r in result["results"]):
            continue
        print(f"measuring {body}", flush=True)
        result["results"].append(measure(pipeline, body, args, inception, real_features, classifier))
        result["machine"] = machine(torch.device("cpu"))
        atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
        atomic_write_bytes(args.plot, plot(result))
    print(curve_table(result))


if __name__ == "__main__":
    main()
