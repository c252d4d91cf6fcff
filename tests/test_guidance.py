"""Classifier-free guidance options, and changing a checkpoint's served defaults."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from generators.guidance import Guidance
from generators.params import validate
from generators.pipelines import load_pipeline
from tests.synthetic import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_plain_guidance_extrapolates_from_the_unconditional_prediction():
    cond, null, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(Guidance(scale=3.0).combine(cond, null, x, 0.5), null + 3 * (cond - null))


def test_full_rescale_gives_the_guided_x0_the_conditional_std():
    torch.manual_seed(0)
    cond, null, x, a = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), 0.3
    eps = Guidance(scale=5.0, rescale=1.0).combine(cond, null, x, a)
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    x0_cond = (x - (1 - a) ** 0.5 * cond) / a**0.5
    assert torch.allclose(x0.flatten(1).std(1), x0_cond.flatten(1).std(1), rtol=1e-4)


def test_parallel_weight_removes_the_update_along_the_conditional_x0():
    torch.manual_seed(1)
    cond, null, x, a = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), 0.3
    to_x0 = lambda eps: (x - (1 - a) ** 0.5 * eps) / a**0.5
    plain = Guidance(scale=5.0).combine(cond, null, x, a)
    assert torch.allclose(Guidance(scale=5.0, parallel=1.0).combine(cond, null, x, a), plain)
    x0_cond = to_x0(cond)
    update = to_x0(Guidance(scale=5.0, parallel=0.0).combine(cond, null, x, a)) - x0_cond
    assert torch.allclose((update * x0_cond).flatten(1).sum(1), torch.zeros(2), atol=1e-3)
    plain_update = to_x0(plain) - x0_cond
    assert (update.flatten(1).norm(dim=1) < plain_update.flatten(1).norm(dim=1)).all()


def test_interval_limits_the_guided_steps_and_their_cost(tmp_path):
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "d", "diffusion"))
    body = {"n_images": 2, "steps": 10, "class_label": "cat", "guidance_scale": 3.0}
    full = validate(body, pipeline.param_specs())
    interval = validate(dict(body, guidance_t_min=300, guidance_t_max=700), pipeline.param_specs())
    assert pipeline.work(full) == 2 * 20
    assert pipeline.work(interval) == 2 * (10 + 4)  # trailing timesteps 699, 599, 499, 399 lie in [300, 700]
    assert not Guidance(3.0, 300, 700).active(999) and Guidance(3.0, 300, 700).active(300)
    images = pipeline.sample(interval, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32)


def test_set_defaults_validates_and_rewrites_only_the_sampling_section(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "d", "diffusion")
    before = json.loads((checkpoint / "config.json").read_text())
    run = [sys.executable, "scripts/set_defaults.py", str(checkpoint)]
    ok = subprocess.run(run + ["guidance_scale=1.5", "guidance_rescale=0.7"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    after = json.loads((checkpoint / "config.json").read_text())
    assert after["sampling"] == dict(before["sampling"], guidance_scale=1.5, guidance_rescale=0.7)
    assert {k: v for k, v in after.items() if k != "sampling"} == {k: v for k, v in before.items() if k != "sampling"}
    assert load_pipeline(checkpoint).param_specs()  # still loads: weights and hash untouched
    bad = subprocess.run(run + ["guidance_scale=99"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "guidance_scale" in bad.stderr
