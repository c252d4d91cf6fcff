#!/usr/bin/env python3
"""Quality against cost of a sampling schedule: KID and FID over a grid of settings, with and without guidance,
beside a long reference schedule, on the same seeds. It chooses nothing itself; served defaults are picked from its
table (README, "Sampler quality against cost") and set with scripts/set_defaults.py.

    python scripts/nfe_curve.py                  # diffusion: DDIM and DPM++2M at 5-100 steps vs DDPM 1000
    python scripts/nfe_curve.py --model ebm      # EBM: 0-2 corrector steps at 5-40 levels vs 100 levels x 2
    python scripts/nfe_curve.py --n-samples 20 --x steps=2,3 --guidance 3 --reference '{"sampler": "ddpm", "steps": 3}' \\
        --out /tmp/nfe.json --plot /tmp/nfe.png  # a check in a minute

Options (defaults in brackets; [d] diffusion, [e] EBM):
  --model M               diffusion or ebm [diffusion]
  --series NAME=V,V,...   one line per value [d: sampler=ddim,dpm++2m; e: corrector_steps=0,1,2]
  --x NAME=V,V,...        the cost axis [d: steps=5,10,20,50,100; e: levels=5,10,20,40]
  --guidance G ...        guidance scales; 1 = plain conditional, one evaluation per step [the checkpoint's, 1]
  --params JSON           request parameters every setting shares, e.g. '{"timestep_spacing": "trailing"}'
                          [none: the checkpoint's defaults]
  --reference JSON        the long schedule everything is judged against; '' to skip
                          [d: {"sampler": "ddpm", "steps": 1000}; e: {"levels": 100, "corrector_steps": 2}]
  --n-samples N           images per setting, N/10 per class [300]
  --reference-size N      training images the FID and KID compare with (cached features) [10000]
  --batch-size N          images per sampling call [64]
  --seed S                the same for every setting, so every setting starts from the same noise [0]
  --threads N             torch threads [all cores]
  --device D              cuda or cpu [cuda when available; on a GPU in full fp32, no TF32]
  --data PATH             Keras-layout CIFAR-10 .npz whose training images hold the reference [the shared copy]
  --progress-dir DIR      each setting's samples are kept here until measured [runs/eval_progress]
  --sample-only           draw every setting's samples into --progress-dir and stop; the same command without it
                          measures them (to sample on a machine that lacks the FID network or the data)
  --out PATH, --plot PATH [docs/quality/nfe_curve.json and .png; ebm: ebm_nfe_curve.json and .png]
  --redraw                only redraw the plot and print the table from --out

Settings run in this order: the grid for each guidance scale (the served default's first), then the references,
the costliest. Each finished setting is written to --out at once with its network evaluations per image (as
the server counts them for its work bound), and a rerun with the same --out skips the settings already there
(same model, checkpoint, data, N and seed), so an interrupted sweep continues where it stopped.
KID is unbiased at any N; FID at N = 300 carries a large small-sample bias, so compare FIDs only within one file.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from generators.params import validate  # noqa: E402
from generators.pipelines import load_pipeline  # noqa: E402
from scripts.archive import handler_settings  # noqa: E402
from scripts.charts import axes, dashed  # noqa: E402
from training.classifiers import classify, load_classifier  # noqa: E402
from training.data import DEFAULT_PATHS, ImageDataset  # noqa: E402
from training.common import pick_eval_device  # noqa: E402
from training.evaluate import (PROGRESS_STATE, class_accuracy, machine, markdown_table,  # noqa: E402
                               per_class_accuracy, progress_path, resolved_params, sample, sampling_machine)
from training.fid import (frechet_distance, inception_features, kernel_inception_distance, load_inception,  # noqa: E402
                          pixel_statistics, real_subsets, reference_features)

DEFAULTS = {  # per model: series, cost axis, reference schedule, output name
    "diffusion": {"series": "sampler=ddim,dpm++2m", "x": "steps=5,10,20,50,100",
                  "reference": '{"sampler": "ddpm", "steps": 1000}', "out": "nfe_curve"},
    "ebm": {"series": "corrector_steps=0,1,2", "x": "levels=5,10,20,40",
            "reference": '{"levels": 100, "corrector_steps": 2}', "out": "ebm_nfe_curve"},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DEFAULTS), default="diffusion")
    p.add_argument("--series")
    p.add_argument("--x")
    p.add_argument("--guidance", nargs="+", type=float)
    p.add_argument("--params", default="{}")
    p.add_argument("--reference")
    p.add_argument("--n-samples", type=int, default=300)
    p.add_argument("--reference-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--data", type=Path, default=DEFAULT_PATHS["cifar10"])
    p.add_argument("--progress-dir", type=Path, default=ROOT / "runs" / "eval_progress")
    p.add_argument("--sample-only", action="store_true")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--redraw", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.model]
    for name in ("series", "x", "reference"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.checkpoint = args.checkpoint or ROOT / "checkpoints" / args.model
    args.out = args.out or ROOT / "docs" / "quality" / f"{defaults['out']}.json"
    args.plot = args.plot or args.out.with_suffix(".png")
    try:
        args.series_name, args.series_values = axis(args.series)
        args.x_name, args.x_values = axis(args.x)
        args.reference_body = json.loads(args.reference) if args.reference else None
        args.shared = json.loads(args.params)
        if not isinstance(args.shared, dict):
            raise ValueError("--params must be a JSON object")
    except ValueError as error:
        parser.error(str(error))
    return args


def axis(text: str) -> tuple[str, list[Any]]:
    """'steps=5,10' -> ('steps', [5, 10]); each value read as JSON where it is JSON, else kept as a string."""
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise ValueError(f"{text!r}: expected NAME=V,V,...")

    def value(item: str) -> Any:
        try:
            return json.loads(item)
        except ValueError:
            return item
    return name, [value(item) for item in values.split(",")]


def settings(args: argparse.Namespace, default_guidance: float) -> list[dict[str, Any]]:
    """The request bodies to measure, in run order; references are marked."""
    scales = args.guidance or list(dict.fromkeys([default_guidance, 1.0]))
    bodies = [{**args.shared, args.series_name: s, args.x_name: x, "guidance_scale": g}
              for g in scales for s in args.series_values for x in args.x_values]
    if args.reference_body:
        bodies += [{**args.shared, **args.reference_body, "guidance_scale": g, "reference": True} for g in scales]
    return bodies


def request_of(body: dict[str, Any]) -> dict[str, Any]:
    """A setting's request parameters (without its reference mark)."""
    return {k: v for k, v in body.items() if k != "reference"}


def evaluations(pipeline, body: dict[str, Any]) -> int:
    """Network evaluations per image, as the server counts them for its per-request work bound."""
    return pipeline.work(validate(request_of(body) | {"class_label": 0, "n_images": 1}, pipeline.param_specs()))


def setting_dir(pipeline, body: dict[str, Any], args) -> Path:
    """Where a setting's samples are kept until it is measured (named as evaluate.py names its runs)."""
    return progress_path(args, pipeline.config.get("weights_sha256"), resolved_params(pipeline, request_of(body)))


def draw(pipeline, body: dict[str, Any], args) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """A setting's samples, drawn into (or resumed from) its progress directory."""
    progress_dir = setting_dir(pipeline, body, args)
    images, labels = sample(pipeline, request_of(body), "class_label", len(pipeline.class_names), args.n_samples,
                            args.batch_size, args.seed, progress_dir)
    return images, labels, progress_dir


def measure(pipeline, body: dict[str, Any], args, inception, real_features, classifier,
            device: torch.device) -> dict[str, Any]:
    drawn_before = (setting_dir(pipeline, body, args) / PROGRESS_STATE).exists()
    started = time.monotonic()
    images, labels, progress_dir = draw(pipeline, body, args)
    sampling_s = None if drawn_before else time.monotonic() - started  # a speed only for samples drawn here
    features = inception_features(inception, images, args.batch_size)
    kid, kid_std = kernel_inception_distance(real_features, features)
    _, logits = classify(classifier, images, args.batch_size, device)
    return {**body, "evaluations_per_image": evaluations(pipeline, body), "n_samples": len(images),
            "fid": frechet_distance(real_features, features), "kid": kid, "kid_std": kid_std,
            **pixel_statistics(images), "class_accuracy": class_accuracy(logits, labels),
            "worst_class_accuracy": min(per_class_accuracy(logits, labels, len(pipeline.class_names))),
            "sampling_machine": sampling_machine(progress_dir),
            "sampling_seconds": None if sampling_s is None else round(sampling_s, 1),
            "images_per_s": None if sampling_s is None else round(len(images) / sampling_s, 3)}


def done(body: dict[str, Any], results: list[dict[str, Any]]) -> bool:
    return any(all(r.get(k) == v for k, v in body.items()) for r in results)


# ---- presentation (scripts/readme_tables.py renders the tables into the README)

CELLS = {  # what a table cell shows, per figure
    "kid": lambda r: f"{r['kid']:.4f} ({r['fid']:.1f})",
    "colour": lambda r: f"{r['clipped_fraction']:.4f} ({r['pixel_std']:.3f})",
}


def scale_label(scale: float) -> str:
    return f"guidance {scale:g}" if scale != 1 else "no guidance (conditional)"


def series_label(name: str, value: Any) -> str:
    return value.upper() if isinstance(value, str) else f"{name} {value}"


def describe_reference(row: dict[str, Any], result: dict[str, Any]) -> str:
    """The reference's request in words: its parameters other than guidance."""
    keys = result["reference_keys"]
    return ", ".join(f"{k} {row[k]}" for k in keys if k != "guidance_scale")


def grid_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["results"] if not r.get("reference")]


def curve_table(result: dict[str, Any], figure: str = "kid") -> str:
    """One row per guidance scale and series value, one column per cost-axis value (the reference in one cell):
    KID (FID), or with figure="colour" the clipped fraction (pixel std)."""
    cell, series, x, grid = CELLS[figure], result["series"], result["x"], grid_rows(result)
    xs = sorted({r[x] for r in grid})
    rows = []
    for scale in sorted({r["guidance_scale"] for r in result["results"]}, reverse=True):
        for value in dict.fromkeys(r[series] for r in grid):
            found = {r[x]: r for r in grid if r[series] == value and r["guidance_scale"] == scale}
            if found:
                rows.append([scale_label(scale), series_label(series, value)]
                            + [cell(found[n]) if n in found else "—" for n in xs])
        for r in result["results"]:
            if r.get("reference") and r["guidance_scale"] == scale:
                rows.append([scale_label(scale), "reference: " + describe_reference(r, result), cell(r)]
                            + [""] * (len(xs) - 1))
    return markdown_table(["guidance", series] + [f"{n} {x}" for n in xs], rows)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]
REFERENCE_COLOUR = (90, 90, 90)
WIDTH, HEIGHT, LINE_H = 560, 420, 14


def plot(result: dict[str, Any]) -> bytes:
    """KID against the cost axis (log scale), one panel per guidance scale; the reference as a dashed line."""
    series, x = result["series"], result["x"]
    scales = sorted({r["guidance_scale"] for r in result["results"]}, reverse=True)
    image = Image.new("RGB", (WIDTH * len(scales), HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    grid = grid_rows(result)
    xs = sorted({r[x] for r in grid}) or [1]
    values = list(dict.fromkeys(r[series] for r in grid))
    top = max([r["kid"] for r in result["results"]] + [1e-6]) * 1.1
    for index, scale in enumerate(scales):
        left = index * WIDTH
        x0, x1, y0, y1 = left + 60, left + WIDTH - 20, HEIGHT - 40, 30 + LINE_H * (len(values) + 1) + 10
        span = math.log(xs[-1] / xs[0]) or 1.0

        def x_of(n: float) -> float:
            return x0 + (x1 - x0) * (0.05 + 0.9 * math.log(n / xs[0]) / span)

        def y_of(value: float) -> float:
            return y0 - (y0 - y1) * max(value, 0.0) / top

        draw.text((x0, 8), f"{result['model']} KID against {x}, {scale_label(scale)}, N = {result['n_samples']}",
                  fill="black", font=font)
        legend_y = 28
        for number, value in enumerate(values):
            rows = sorted((r for r in grid if r[series] == value and r["guidance_scale"] == scale),
                          key=lambda r: r[x])
            if not rows:
                continue
            colour = PALETTE[number % len(PALETTE)]
            points = [(x_of(r[x]), y_of(r["kid"])) for r in rows]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            draw.line([(x0, legend_y + 7), (x0 + 20, legend_y + 7)], fill=colour, width=2)
            draw.text((x0 + 26, legend_y), series_label(series, value), fill=colour, font=font)
            legend_y += LINE_H
        for r in result["results"]:
            if r.get("reference") and r["guidance_scale"] == scale:
                dashed(draw, x0, x1, y_of(r["kid"]), REFERENCE_COLOUR)
                dashed(draw, x0, x0 + 20, legend_y + 7, REFERENCE_COLOUR)
                draw.text((x0 + 26, legend_y), f"{describe_reference(r, result)}: {r['kid']:.4f}",
                          fill=REFERENCE_COLOUR, font=font)
                legend_y += LINE_H
        axes(draw, font, left, (x0, y1, x1, y0), top, y_of, [(x_of(n), str(n)) for n in xs],
             f"{x} (log scale)", ".3f")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.redraw:
        result = json.loads(args.out.read_text())
        atomic_write_bytes(args.plot, plot(result))
        print(curve_table(result))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_eval_device(args.device)
    pipeline = load_pipeline(args.checkpoint, device, **handler_settings(args.model))  # as served
    if pipeline.model_type != args.model or not pipeline.class_names:
        raise SystemExit(f"{args.checkpoint} is not a class-conditional {args.model} checkpoint")
    defaults = {spec.name: spec.default for spec in pipeline.param_specs()}
    default_guidance = defaults["guidance_scale"]
    args.shared = {"timestep_spacing": defaults["timestep_spacing"], **args.shared}  # every row names its levels
    if args.sample_only:
        for body in settings(args, default_guidance):
            print(f"sampling {body}", flush=True)
            draw(pipeline, body, args)
        print(f"samples in {args.progress_dir}; run again without --sample-only to measure them")
        return
    train = ImageDataset(args.data)
    inception = load_inception(device)
    real_features = reference_features(inception, train, args.reference_size)
    classifier, _ = load_classifier(ROOT / "checkpoints" / "classifiers" / "cifar10", device)
    identity = {"model": args.model, "weights_sha256": pipeline.config.get("weights_sha256"),  # not the path
                "training_steps": pipeline.config.get("training", {}).get("steps"), "n_samples": args.n_samples,
                "timestep_spacing": args.shared["timestep_spacing"],
                "seed": args.seed, "reference": {"split": "train", "n": args.reference_size},
                "data_sha256": train.sha256}
    result = {**identity, "checkpoint": str(args.checkpoint), "series": args.series_name, "x": args.x_name,
              "reference_keys": sorted(args.reference_body or {}),
              "real_pixels": pixel_statistics(train.images[real_subsets(len(train), args.reference_size)[0]]),
              "results": []}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if all(previous.get(k) == v for k, v in identity.items()):
            result["results"] = previous["results"]
    for body in settings(args, default_guidance):
        if done(body, result["results"]):
            continue
        print(f"measuring {body}", flush=True)
        result["results"].append(measure(pipeline, body, args, inception, real_features, classifier, device))
        shutil.rmtree(setting_dir(pipeline, body, args), ignore_errors=True)
        result["machine"] = machine(device)
        atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
        atomic_write_bytes(args.plot, plot(result))
    print(curve_table(result))


if __name__ == "__main__":
    main()
