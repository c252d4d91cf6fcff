"""scripts/benchmark.py: its --tiny run against a real TorchServe writes a JSON whose cells are all there and whose
figures are positive and agree with each other, a plot, and a table; bad options fail before any server starts."""
import json
import math
import os
import subprocess
import sys
from itertools import product

import pytest
import yaml
from PIL import Image

from scripts.benchmark import parse_args
from scripts.local_server import ROOT

SCRIPT = [sys.executable, str(ROOT / "scripts" / "benchmark.py")]
TINY_MODELS, TINY_CONCURRENCIES, TINY_REQUESTS, TINY_BASELINE_STEPS = ("gan", "diffusion"), (1, 2), 4, 3


def run(*options: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *options], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    result = run("--tiny", "--out", str(out / "benchmark.json"), "--plot", str(out / "benchmark.png"), timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads((out / "benchmark.json").read_text()), out / "benchmark.png", result.stdout


def model_config(model: str) -> dict:
    return yaml.safe_load((ROOT / "handlers" / "model-config" / f"{model}.yaml").read_text())


def close(a: float, b: float, rel: float = 0.01) -> bool:
    """Equal up to the JSON's rounding (3 decimals for rates and ratios, 6 for seconds, so that a 40 ms cell's
    images/s can be recomputed from them) and one rounding more in a ratio."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=2e-3)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--models", "--concurrencies", "--workers", "--batching", "--requests", "--max-seconds",
                   "--baseline-steps", "--out", "--plot", "--tiny"):
        assert option in text


@pytest.mark.parametrize("options, words", [
    (["--request", 'diffusion={"steps": 2'], "not JSON"),
    (["--request", 'ebm={"levels": 2}'], "MODEL must be one of"),
    (["--request", 'gan=[1]'], "must be a JSON object"),
    (["--concurrencies", "0"], "--concurrencies: must be at least 1"),
    (["--raw-batches", "65"], "--raw-batches: at most 64"),
])
def test_bad_options_are_refused_by_the_parser(capsys, options, words):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--tiny", *options])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_tiny_is_a_preset_that_explicit_options_override():
    args = parse_args(["--tiny", "--requests", "7", "--request", 'diffusion={"sampler": "ddpm"}'])
    assert args.models == ["gan", "diffusion"] and args.requests == 7
    assert args.bodies == {"gan": {}, "diffusion": {"steps": 2, "sampler": "ddpm"}}


def test_request_parameters_are_checked_by_the_handlers_rules_before_a_server_starts(tmp_path):
    result = run("--tiny", "--models", "gan", "--request", 'gan={"digit": 12}', "--out", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png"), timeout=120)
    assert result.returncode == 1
    assert "gan: digit: must be in [0, 9], got 12" in result.stderr, result.stderr
    assert not (tmp_path / "b.json").exists()


def test_every_cell_of_the_tiny_run_is_measured(tiny):
    result, _, _ = tiny
    cells = {(c["model"], c["workers"], c["batching"], c["concurrency"]) for c in result["served"]}
    assert cells == set(product(TINY_MODELS, (1,), ("off", "on"), TINY_CONCURRENCIES))
    assert len(result["served"]) == len(cells)
    assert set(result["raw"]) == set(TINY_MODELS)
    assert [b["steps"] for b in result["baseline"]] == [TINY_BASELINE_STEPS]


def test_machine_and_load_are_recorded(tiny):
    machine = tiny[0]["machine"]
    cores = len(os.sched_getaffinity(0))
    assert machine["cores"] == cores and machine["cpu"] and machine["torch"]
    assert machine["load_average_1min_before"] >= 0 and machine["load_average_1min_after"] >= 0
    assert machine["quiet"] == (machine["load_average_1min_before"] <= 0.5)


def test_served_cells_are_positive_and_consistent(tiny):
    result, _, _ = tiny
    cores = result["machine"]["cores"]
    for cell in result["served"]:
        label = f"{cell['model']} {cell['batching']} c{cell['concurrency']}"
        config = model_config(cell["model"])
        assert cell["requests"] == TINY_REQUESTS and cell["failures"] == 0, label
        assert cell["images"] == cell["requests"] * cell["n_images"], label
        assert cell["seconds"] > 0 and close(cell["images_per_s"], cell["images"] / cell["seconds"]), label
        assert 0 < cell["latency_p50_s"] <= cell["latency_p95_s"] <= cell["latency_max_s"], label
        # a closed loop: no request can take longer than the whole cell
        assert cell["latency_max_s"] <= cell["seconds"] + 1e-3, label
        assert cell["threads_per_worker"] * cell["workers"] <= cores, label
        assert cell["batch_size"] == (config["batchSize"] if cell["batching"] == "on" else 1), label
        assert cell["max_batch_delay_ms"] == config["maxBatchDelay"], label
        assert len(cell["peak_rss_mb"]) == cell["workers"] and min(cell["peak_rss_mb"]) > 50, label
        assert len(cell["cold_start_s"]) == cell["workers"] and min(cell["cold_start_s"]) > 0, label
        assert cell["workers_replaced"] is False, label
        assert cell["cpu_launcher"] == "off" and len(cell["worker_cpus"]) == cell["workers"], label


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning two workers needs two cores")
def test_the_cpu_launcher_pins_each_worker_to_cores_of_its_own(tmp_path):
    """Two GAN workers on a server without and one with cpu_launcher_enable: TorchServe's launcher gives each worker
    a disjoint share of the cores, where without it both may run anywhere."""
    result = run("--tiny", "--models", "gan", "--workers", "2", "--batching", "on", "--concurrencies", "2",
                 "--cpu-launcher", "off", "on", "--out", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
                 timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    cells = {c["cpu_launcher"]: c for c in json.loads((tmp_path / "b.json").read_text())["served"]}
    cores = sorted(os.sched_getaffinity(0))
    assert cells["off"]["worker_cpus"] == [cores, cores]
    first, second = cells["on"]["worker_cpus"]
    assert first and second and not set(first) & set(second) and set(first) | set(second) <= set(cores)
    assert cells["on"]["failures"] == 0 and cells["on"]["images_per_s"] > 0
    assert "| gan | 2 x 1, pinned |" in result.stdout


def test_ratios_agree_with_the_absolute_figures(tiny):
    result, _, _ = tiny
    by_key = {(c["model"], c["batching"], c["concurrency"]): c for c in result["served"]}
    for (model, batching, concurrency), cell in by_key.items():
        raw = result["raw"][model]
        same = next(row for row in raw["batches"] if row["batch"] == cell["raw_batch"])
        # one worker: the batch one call samples is the concurrency, bounded by the batch size
        assert cell["raw_batch"] == min(cell["batch_size"], concurrency) * cell["n_images"]
        assert close(cell["ratio_to_raw_same_batch"], cell["images_per_s"] / same["images_per_s"])
        assert close(cell["ratio_to_raw_best"], cell["images_per_s"] / raw["best_images_per_s"])
        off = by_key[model, "off", concurrency]
        assert close(cell["ratio_to_batching_off"], cell["images_per_s"] / off["images_per_s"])
    served_default = by_key["diffusion", "off", 1]
    for row in result["baseline"]:
        assert row["sampler"] == "ddpm" and row["requests"] == 1 and row["failures"] == 0
        assert row["images"] == 1 and 0 < row["latency_p50_s"] <= row["latency_p95_s"]
        assert close(row["served_default_speedup"], served_default["images_per_s"] / row["images_per_s"])


def test_raw_rows_are_consistent(tiny):
    result, _, _ = tiny
    for model, raw in result["raw"].items():
        assert [row["batch"] for row in raw["batches"]] == [1, 2], model
        assert raw["threads"] == result["machine"]["cores"]
        for row in raw["batches"]:
            assert row["calls"] >= 1 and row["images"] == row["calls"] * row["batch"], model
            assert row["seconds"] > 0 and close(row["images_per_s"], row["images"] / row["seconds"]), model
        best = max(raw["batches"], key=lambda row: row["images_per_s"])
        assert (raw["best_batch"], raw["best_images_per_s"]) == (best["batch"], best["images_per_s"])
    assert result["raw"]["diffusion"]["sampling"]["steps"] == 2  # the --tiny request, as validated


def test_raw_trials_flip_one_served_setting(tiny):
    result, _, stdout = tiny
    for model, raw in result["raw"].items():
        handler = model_config(model).get("handler", {})
        assert raw["settings"]["channels_last"] == bool(handler.get("channels_last", False)), model
        (trial,) = raw["trials"]  # --tiny tries channels_last only
        assert trial["settings"] == dict(raw["settings"], channels_last=not raw["settings"]["channels_last"])
        assert trial["batch"] == raw["best_batch"] and trial["images_per_s"] > 0 and trial["first_call_s"] > 0
        assert close(trial["ratio_to_served_setting"], trial["images_per_s"] / raw["best_images_per_s"])
    assert "raw trial: channels_last" in stdout


def test_targets_follow_from_the_figures(tiny):
    result, _, _ = tiny
    assert result["targets"]
    for row in result["targets"]:
        met = {">=": row["value"] >= row["limit"], "<=": row["value"] <= row["limit"],
               "<": row["value"] < row["limit"]}[row["relation"]]
        assert row["met"] == met, row
    cold = max(s for c in result["served"] if c["model"] == "gan" for s in c["cold_start_s"])
    assert any(row["value"] == cold and "gan" in row["target"] for row in result["targets"])


def test_plot_and_table(tiny):
    result, plot, stdout = tiny
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > image.height > 100
        # something was drawn beyond the white background in every model's panel
        panel = image.width // len(result["raw"])
        for index in range(len(result["raw"])):
            colours = image.crop((index * panel, 0, (index + 1) * panel, image.height)).getcolors(maxcolors=10000)
            assert colours is None or len(colours) > 5
    assert "| model | workers x threads |" in stdout
    assert stdout.count("\n| gan | 1 x ") == 2 * len(TINY_CONCURRENCIES)
