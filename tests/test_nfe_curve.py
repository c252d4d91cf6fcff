"""scripts/nfe_curve.py: what it measures, in which order, and how it shows it (a sweep itself takes hours)."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scripts.nfe_curve import curve_table, evaluations, parse_args, plot, settings
from generators.pipelines import load_pipeline
from tests.synthetic import CIFAR_CLASSES, tiny_checkpoint, write_npz

ROOT = Path(__file__).resolve().parent.parent


def row(sampler, steps, scale, kid, reference=False):
    r = {"sampler": sampler, "steps": steps, "guidance_scale": scale, "kid": kid, "fid": kid * 5000,
         "clipped_fraction": kid / 2, "pixel_std": 0.2}
    return r | {"reference": True} if reference else r


def test_grid_first_then_the_costly_references():
    args = parse_args(["--series", "sampler=ddim,dpm++2m", "--x", "steps=5,10", "--guidance", "3", "1"])
    bodies = settings(args, default_guidance=3.0)
    assert len(bodies) == 2 * 2 * 2 + 2
    assert bodies[0] == {"sampler": "ddim", "steps": 5, "guidance_scale": 3.0}
    assert bodies[-1] == {"sampler": "ddpm", "steps": 1000, "guidance_scale": 1.0, "reference": True}
    assert not any(b.get("reference") for b in settings(parse_args(["--reference", ""]), 3.0))


def test_ebm_defaults_sweep_its_langevin_schedule():
    args = parse_args(["--model", "ebm"])
    bodies = settings(args, default_guidance=2.0)
    assert bodies[0] == {"corrector_steps": 0, "levels": 5, "guidance_scale": 2.0}
    assert {b["guidance_scale"] for b in bodies} == {2.0, 1.0}
    assert args.out.name == "ebm_nfe_curve.json" and args.plot.name == "ebm_nfe_curve.png"


@pytest.mark.parametrize("option", [["--x", "steps"], ["--series", "=1,2"], ["--reference", "{not json"]])
def test_bad_axes_are_refused(option):
    with pytest.raises(SystemExit):
        parse_args(option)


@pytest.mark.parametrize("model, body, cost", [
    ("diffusion", {"sampler": "ddim", "steps": 20, "guidance_scale": 3.0}, 40),
    ("diffusion", {"sampler": "ddim", "steps": 20, "guidance_scale": 1.0}, 20),
    ("ebm", {"levels": 10, "corrector_steps": 1, "guidance_scale": 2.0, "reference": True}, 40),
])
def test_evaluations_are_the_servers_work_count(tmp_path, model, body, cost):
    tiny_checkpoint(tmp_path, model)
    assert evaluations(load_pipeline(tmp_path), body) == cost


def test_table_and_plot_show_every_measured_setting():
    result = {"model": "diffusion", "n_samples": 300, "series": "sampler", "x": "steps",
              "reference_keys": ["sampler", "steps"],
              "results": [row("ddim", 5, 3.0, 0.03), row("ddim", 20, 3.0, 0.01), row("dpm++2m", 5, 3.0, 0.02),
                          row("ddpm", 1000, 3.0, 0.009, reference=True), row("ddim", 5, 1.0, 0.05)]}
    table = curve_table(result)
    assert "| guidance 3 | DDIM | 0.0300 (150.0) | 0.0100 (50.0) |" in table
    assert "| guidance 3 | DPM++2M | 0.0200 (100.0) | — |" in table
    assert "| guidance 3 | reference: sampler ddpm, steps 1000 | 0.0090 (45.0) |  |" in table
    assert "| no guidance (conditional) | DDIM | 0.0500 (250.0) | — |" in table
    assert "| guidance 3 | DDIM | 0.0150 (0.200) | 0.0050 (0.200) |" in curve_table(result, "colour")
    image = Image.open(io.BytesIO(plot(result)))
    assert image.size[0] == 2 * image.size[1] * 560 // 420  # one panel per guidance scale


def test_a_sweep_sampled_elsewhere_measures_as_one_sampled_here(tmp_path):
    """--sample-only draws every setting without data or FID network; measuring those samples later gives the
    figures of a sweep that drew them itself, without a sampling speed (it was not timed here)."""
    tiny_checkpoint(tmp_path / "ebm", "ebm")
    data = write_npz(tmp_path / "data.npz", (32, 32, 3), classes=CIFAR_CLASSES)
    common = [sys.executable, str(ROOT / "scripts" / "nfe_curve.py"), "--model", "ebm", "--checkpoint",
              str(tmp_path / "ebm"), "--n-samples", "20", "--batch-size", "10", "--reference-size", "16",
              "--x", "levels=2", "--series", "corrector_steps=0", "--guidance", "2", "--reference", "", "--threads", "1"]

    def sweep(*extra: str, command: list[str] = common) -> str:
        result = subprocess.run(command + list(extra), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    sweep("--sample-only", "--data", str(tmp_path / "absent.npz"), "--progress-dir", str(tmp_path / "elsewhere"),
          "--out", str(tmp_path / "never.json"))
    assert not (tmp_path / "never.json").exists()
    sweep("--data", str(data), "--progress-dir", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "later.json"))
    sweep("--data", str(data), "--progress-dir", str(tmp_path / "here"), "--out", str(tmp_path / "direct.json"))
    (later,), (direct,) = (json.loads((tmp_path / name).read_text())["results"] for name in ("later.json", "direct.json"))
    assert later["kid"] == direct["kid"] and later["fid"] == direct["fid"]
    assert later["images_per_s"] is None and direct["images_per_s"] > 0
    # the same weights at another path (a fresh clone, or older weights taken from git) keep the measured rows
    shutil.copytree(tmp_path / "ebm", tmp_path / "moved")
    moved = [str(tmp_path / "moved") if part == str(tmp_path / "ebm") else part for part in common]
    output = sweep("--data", str(data), "--progress-dir", str(tmp_path / "here"), "--out", str(tmp_path / "direct.json"),
                   command=moved)
    assert "measuring" not in output
    assert json.loads((tmp_path / "direct.json").read_text())["results"] == [direct]
