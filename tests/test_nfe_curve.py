"""scripts/nfe_curve.py: what it measures, in which order, and how it shows it (the sweep itself takes hours)."""
import io

from PIL import Image

from scripts.nfe_curve import build_parser, curve_table, evaluations, plot, settings


def row(sampler, steps, scale, kid):
    return {"sampler": sampler, "steps": steps, "guidance_scale": scale, "kid": kid, "fid": kid * 5000,
            "clipped_fraction": kid / 2, "pixel_std": 0.2}


def test_grid_first_then_the_costly_references():
    args = build_parser().parse_args(["--samplers", "ddim", "dpm++2m", "--steps", "5", "10", "--guidance", "3", "1",
                                      "--reference-steps", "1000"])
    bodies = settings(args)
    assert len(bodies) == 2 * 2 * 2 + 2
    assert bodies[0] == {"sampler": "ddim", "steps": 5, "guidance_scale": 3.0}
    assert [b["sampler"] for b in bodies[-2:]] == ["ddpm", "ddpm"] and bodies[-1]["steps"] == 1000
    assert settings(build_parser().parse_args(["--reference-steps", "0"]))[-1]["sampler"] != "ddpm"


def test_guided_steps_cost_two_evaluations():
    assert evaluations({"steps": 20, "guidance_scale": 3.0}) == 40
    assert evaluations({"steps": 20, "guidance_scale": 1.0}) == 20


def test_table_and_plot_show_every_measured_setting():
    result = {"n_samples": 300, "results": [row("ddim", 5, 3.0, 0.03), row("ddim", 20, 3.0, 0.01),
                                            row("dpm++2m", 5, 3.0, 0.02), row("ddpm", 1000, 3.0, 0.009),
                                            row("ddim", 5, 1.0, 0.05)]}
    table = curve_table(result)
    assert "| guidance 3 | DDIM | 0.0300 (150.0) | 0.0100 (50.0) |" in table
    assert "| guidance 3 | DPM++2M | 0.0200 (100.0) | — |" in table
    assert "0.0090 (45.0) at 1000 steps" in table
    assert "| no guidance (conditional) | DDIM | 0.0500 (250.0) | — |" in table
    assert "| guidance 3 | DDIM | 0.0150 (0.200) | 0.0050 (0.200) |" in curve_table(result, "colour")
    image = Image.open(io.BytesIO(plot(result)))
    assert image.size[0] == 2 * image.size[1] * 560 // 420  # one panel per guidance scale
