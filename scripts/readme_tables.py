#!/usr/bin/env python3
"""Write the README's quality and speed tables from the measured JSON files, so no figure is typed by hand.

    python scripts/readme_tables.py           # rewrite the tables in README.md
    python scripts/readme_tables.py --check   # exit 1 if README.md differs from the JSON files

Quality rows come from checkpoints/<model>/quality.json (training/evaluate.py on the served
weights), then docs/quality/<model>-*.json (baselines and other settings of the same script).
The real-data reference ladders come from docs/quality/fid_references.json and fid_references_mnist.json
(training/fid_references.py), the EBM's out-of-distribution table from docs/quality/ebm_ood.json
(training/ebm_ood.py).
Speed rows come from docs/sampling_speed.json (scripts/sample_report.py), the serving benchmark's from
docs/benchmark.json (scripts/benchmark.py), the samplers' quality against cost from docs/quality/nfe_curve.json,
ebm_nfe_curve.json and ebm_snr_guidance.json (scripts/nfe_curve.py). Each table sits between
`<!-- name -->` and `<!-- /name -->` markers in the README.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.evaluate import (QUALITY_HEADER, describe_sampling, markdown_table, precision_recall_cell,  # noqa: E402
                               quality_row)
from scripts.benchmark import table as benchmark_cells  # noqa: E402
from scripts.nfe_curve import curve_table  # noqa: E402

MODELS = ("gan", "diffusion", "ebm")

SPEED_HEADER = ["model", "request", "training steps", "images", "seconds", "ms per image"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the README is stale")
    return p.parse_args()


def quality_table(checkpoints: Path, docs: Path) -> str:
    rows = []
    for model in MODELS:
        served = checkpoints / model / "quality.json"
        if served.exists():
            rows.append(quality_row(json.loads(served.read_text()), f"{model} (served default)"))
        for path in sorted((docs / "quality").glob(f"{model}-*.json"), key=natural_order):
            label = path.stem.replace("-", " ").replace(" 100 steps", "")
            rows.append(quality_row(json.loads(path.read_text()), label))
    return markdown_table(QUALITY_HEADER, rows)


def references_table(path: Path, data: str) -> str:
    """One data set's references (a fid_references.py JSON): test images against the training reference by N
    (and the fit's 50k-vs-10k figure, where there is one), then the ladder of degraded sets with FID, KID and
    precision / recall at each N and the pixel statistics of its largest set."""
    refs = json.loads(path.read_text())
    title = f"real {data} images vs {refs['reference']['n'] / 1000:g}k training images"
    # + 0.0 turns a KID that rounds to -0.0 into 0.0000; a KID below -0.00005 keeps its sign
    rows = [[f"test images, both sides {n}", f"{r['fid']:.2f}", f"{round(r['kid'], 4) + 0.0:.4f}",
             precision_recall_cell(r)] for n, r in refs["test_vs_train_by_size"].items()]
    fit = refs.get("test_vs_train_extrapolated")
    if fit:
        sizes = "/".join(f"{n / 1000:g}k" for n in fit["fitted_sizes"])
        rows.append([f"test images, {fit['target'][0]} vs {fit['target'][1]}: fit FID = a + c (1/n_1 + 1/n_2) "
                     f"through {sizes}, a = {fit['a']:.2f}", f"{fit['fid']:.2f}", "", ""])
    by_size = refs["ladder_by_size"]
    sizes, largest = list(by_size), by_size[max(by_size, key=int)]
    ladder_rows = [[name, *(cell for n in sizes for cell in (f"{by_size[n][name]['fid']:.1f}",
                                                               f"{by_size[n][name]['kid']:.4f}",
                                                               precision_recall_cell(by_size[n][name]))),
                    f"{entry['pixel_std']:.3f}", f"{entry['clipped_fraction']:.4f}"] for name, entry in largest.items()]
    reference = refs["reference"]
    ladder_rows.append([f"(the {reference['n']} training images of the reference)", *([""] * 3 * len(sizes)),
                        f"{reference['pixel_std']:.3f}", f"{reference['clipped_fraction']:.4f}"])
    ladder_header = [title,
                     *(h for n in sizes for h in (f"FID, N = {n}", f"KID, N = {n}", f"precision / recall, N = {n}")),
                     "pixel std", "clipped"]
    return (markdown_table([title, "FID", "KID", "precision / recall"], rows) + "\n\n"
            + markdown_table(ladder_header, ladder_rows))


def ood_table(docs: Path) -> str:
    ood = json.loads((docs / "quality" / "ebm_ood.json").read_text())
    timesteps = list(ood["test_auroc_by_timestep"])
    header = ["CIFAR-10 test images against", *(f"t = {t}" + (" (served)" if int(t) == ood["chosen_timestep"] else "")
                                              for t in timesteps)]
    names = list(ood["test_auroc"])
    rows = [[f"{name} (N = {ood['n_per_set']})", *(f"{ood['test_auroc_by_timestep'][t][name]:.3f}" for t in timesteps)]
            for name in names]
    return markdown_table(header, rows)


def natural_order(path: Path) -> list:
    """Sort key that puts 'guidance-2' before 'guidance-10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.stem)]


def speed_table(docs: Path) -> str:
    cases = json.loads((docs / "sampling_speed.json").read_text())["cases"]
    rows = []
    for case in cases:
        per_class = case["images_per_class_request"]
        request = describe_sampling(case["sampling"], conditional=bool(per_class))
        if per_class:
            guided = " (2 evaluations per guided step)" if case["sampling"]["guidance_scale"] != 1 else ""
            request += f"{guided}, {per_class} images per request, one request per class"
        rows.append([case["model"], request, case["training_steps"], case["n_images"], f"{case['seconds']:.2f}",
                     f"{case['ms_per_image']:g}"])
    return markdown_table(SPEED_HEADER, rows)


def benchmark_table(docs: Path) -> str:
    """The serving benchmark's settings, its table and the goals it checked, as scripts/benchmark.py wrote them."""
    result = json.loads((docs / "benchmark.json").read_text())
    m, settings = result["machine"], result["settings"]
    load = (f"1-minute load average {m['load_average_1min_before']} before, {m['load_average_1min_after']} after"
            + ("" if m["quiet"] else ": not a quiet machine"))
    requests = "; ".join(f"{model}: {sampling}" for model, sampling in result["sampling"].items())
    header = (f"Run: {requests}, {settings['n_images']} image(s) per request, {settings['requests']} requests per "
              f"cell (at most {settings['max_seconds']:g} s), concurrency {settings['concurrencies']}, workers "
              f"{settings['workers']}, batching {settings['batching']}; {load}.\n\n")
    goals = "\n".join(f"- {'met' if g['met'] else '**missed**'}: {g['target']} = {g['value']} "
                      f"({g['relation']} {g['limit']})" for g in result["targets"])
    return header + benchmark_cells(result) + "\n\n" + goals


def nfe_table(path: Path) -> str:
    """A sampling-cost sweep (scripts/nfe_curve.py): KID (FID) per setting, then its colours, with N and reference."""
    result = json.loads(path.read_text())
    header = (f"KID (FID in brackets), {result['n_samples']} samples per setting ({result['n_samples'] // 10} per "
              f"class; one seed for every setting, so deterministic samplers start each image from the same noise) "
              f"against {result['reference']['n']} training images; {result['model']} weights of training step "
              f"{result['training_steps']}, {result['timestep_spacing']} timestep spacing. FID at "
              f"this N carries a large small-sample bias: compare it only within "
              f"this table. — = not measured.\n\n")
    real = result["real_pixels"]
    colour = (f"\n\nThe same settings' colours: clipped fraction (pixel std); the real reference images: "
              f"{real['clipped_fraction']:.4f} ({real['pixel_std']:.3f}).\n\n")
    return header + curve_table(result) + colour + curve_table(result, "colour")


def machine_name(m: dict) -> str:
    return f"{m['cpu_count']}-core {m['cpu']}" + (f", {m['gpu']}" if m.get("gpu") else "") + f", torch {m['torch']}"


def machines_line(checkpoints: Path, docs: Path) -> str:
    """The machines the tables' JSON files say they were measured on, and those that drew samples measured
    elsewhere (evaluate.py and nfe_curve.py --sample-only), so the README never names one by hand."""
    files = [*sorted(checkpoints.glob("*/quality.json")), *sorted((docs / "quality").glob("*.json")),
             docs / "sampling_speed.json", docs / "benchmark.json"]
    measured: dict[str, list[str]] = {}
    drawn: dict[str, list[str]] = {}
    for path in files:
        result = json.loads(path.read_text())
        label = f"{path.parent.name}/{path.name}"
        measured_on = machine_name(result["machine"]) if result.get("machine") else None
        if measured_on:
            measured.setdefault(measured_on, []).append(label)
        samplers = [result.get("sampling_machine")] + [r.get("sampling_machine") for r in result.get("results", [])]
        for name in dict.fromkeys(machine_name(m) for m in samplers if m):
            if name != measured_on:
                drawn.setdefault(name, []).append(label)
    line = "Measured on: " + "; ".join(f"{name} ({', '.join(names)})" for name, names in measured.items()) + "."
    if drawn:
        line += " Samples drawn on: " + "; ".join(f"{name} ({', '.join(names)})" for name, names in drawn.items()) + "."
    return line


def replace_between_markers(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- {name} --> ... <!-- /{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def main() -> None:
    args = parse_args()
    text = args.readme.read_text()
    updated = replace_between_markers(text, "quality-table", quality_table(args.checkpoints, args.docs))
    updated = replace_between_markers(updated, "reference-table",
                                      references_table(args.docs / "quality" / "fid_references.json", "CIFAR-10"))
    updated = replace_between_markers(updated, "mnist-reference-table",
                                      references_table(args.docs / "quality" / "fid_references_mnist.json", "MNIST"))
    updated = replace_between_markers(updated, "ood-table", ood_table(args.docs))
    updated = replace_between_markers(updated, "speed-table", speed_table(args.docs))
    updated = replace_between_markers(updated, "benchmark-table", benchmark_table(args.docs))
    updated = replace_between_markers(updated, "nfe-table", nfe_table(args.docs / "quality" / "nfe_curve.json"))
    updated = replace_between_markers(updated, "ebm-nfe-table", nfe_table(args.docs / "quality" / "ebm_nfe_curve.json"))
    updated = replace_between_markers(updated, "ebm-snr-table", nfe_table(args.docs / "quality" / "ebm_snr_guidance.json"))
    updated = replace_between_markers(updated, "machines", machines_line(args.checkpoints, args.docs))
    if args.check:
        if updated != text:
            sys.exit(f"{args.readme} is stale: run scripts/readme_tables.py")
        print(f"{args.readme} matches the measured figures")
    elif updated != text:
        args.readme.write_text(updated)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
