#!/usr/bin/env python3
"""Render the README's sample grids and time sampling, straight from the committed checkpoints.

    python scripts/sample_report.py            # writes docs/samples/*.png and docs/sampling_speed.json

Uses the same pipelines the handler serves with, on the CPU, with a fixed seed. Timings are wall
clock for one request of `n_images`, after one warm-up request, with the torch thread count given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from generators.imaging import save_grid  # noqa: E402
from generators.params import validate  # noqa: E402
from generators.pipelines import load_pipeline  # noqa: E402
from scripts.archive import handler_settings  # noqa: E402
from training.evaluate import machine  # noqa: E402

# (model, label, request parameters, images per class): the grids and timings the README shows. With images per
# class, the case is one request per class (guidance from the checkpoint unless given), one class per grid column.
CASES = [
    ("diffusion", "classes", {}, 4),
    ("diffusion", "unconditional", {"n_images": 64, "class_label": "none"}, 0),
    ("ebm", "classes", {}, 4),
    ("ebm", "unconditional", {"n_images": 64, "class_label": "none"}, 0),
    ("gan", "random-digits", {"n_images": 64}, 0),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="models to redo (default: all; other rows are kept, "
                                                           "which needs the machine that timed them)")
    p.add_argument("--grids-only", action="store_true",
                   help="redraw the grids and leave docs/sampling_speed.json as it is (on another machine than the "
                        "one that timed it)")
    return p.parse_args()


def sample_case(pipeline, params: dict, seed: int, per_class: int) -> tuple[torch.Tensor, float]:
    """Returns (images, seconds); with per_class, images are ordered row by row with one class per column."""
    start = time.perf_counter()
    if per_class:
        by_class = [pipeline.sample(validate(dict(params, n_images=per_class, class_label=c, seed=seed),
                                             pipeline.param_specs()), torch.Generator().manual_seed(seed + c))
                    for c in range(len(pipeline.class_names))]
        images = torch.stack(by_class, dim=1).flatten(0, 1)
    else:
        images = pipeline.sample(validate(dict(params, seed=seed), pipeline.param_specs()),
                                 torch.Generator().manual_seed(seed))
    return images, time.perf_counter() - start


def same_machine(description: dict) -> dict:
    """What makes timings comparable: the machine description without its kernel build."""
    return {k: v for k, v in description.items() if k != "platform"}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    speed_file = args.out / "sampling_speed.json"
    results = {"machine": machine(torch.device("cpu")), "cases": []}
    if args.only is not None and speed_file.exists() and not args.grids_only:
        timed = json.loads(speed_file.read_text())
        if same_machine(timed["machine"]) != same_machine(results["machine"]):
            raise SystemExit(f"{speed_file} was timed on another machine ({timed['machine']['cpu']}): redo every "
                             "model, or pass --grids-only")
        results["cases"] = [case for case in timed["cases"] if case["model"] not in args.only]
    for model, label, params, per_class in CASES:
        if args.only is not None and model not in args.only:
            continue
        pipeline = load_pipeline(args.checkpoints / model, "cpu", **handler_settings(model))  # as served
        sample_case(pipeline, dict(params, n_images=1), args.seed, 0)  # warm-up
        images, seconds = sample_case(pipeline, params, args.seed, per_class)
        path = args.out / "samples" / f"{model}-{label}.png"
        save_grid(images, path, columns=len(pipeline.class_names) if per_class else None)
        n = len(images)
        sampling = {k: v for k, v in validate(dict(params), pipeline.param_specs()).items()
                    if k not in ("n_images", "seed", "format")}
        results["cases"].append({"model": model, "case": label, "parameters": params, "sampling": sampling,
                                 "images_per_class_request": per_class, "n_images": n,
                                 "seconds": round(seconds, 3), "ms_per_image": round(1000 * seconds / n, 1),
                                 "training_steps": pipeline.config["training"]["steps"],
                                 "grid": str(path.relative_to(args.out.parent))})
        print(f"{model:9s} {label:26s} {n:3d} images {seconds:7.2f} s  {1000 * seconds / n:8.1f} ms/image  -> {path}")
    order = {(m, label): i for i, (m, label, _, _) in enumerate(CASES)}
    results["cases"].sort(key=lambda case: order.get((case["model"], case["case"]), len(order)))
    if not args.grids_only:
        atomic_write_bytes(speed_file, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
