"""The levers measured beside the served sampling settings (training/sampling_levers.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generators.checkpoint import load_checkpoint, save_checkpoint
from generators.params import validate
from generators.pipelines import load_pipeline
from tests.synthetic import tiny_checkpoint
from training.sampling_levers import autoguidance, eps_scaling, weight_average


def perturbed_checkpoint(directory: Path, seed: int) -> Path:
    """A tiny diffusion checkpoint whose every weight is random, so that class and noise level change the output
    (an untrained UNet's residual branches start at zero)."""
    state, config = load_checkpoint(tiny_checkpoint(directory, "diffusion"))
    generator = torch.Generator().manual_seed(seed)
    state = {name: value + 0.1 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
             for name, value in state.items()}
    config.pop("weights_sha256")
    save_checkpoint(directory, state, config)
    return directory


def draw(pipeline, **body) -> torch.Tensor:
    params = validate({"n_images": 3, "class_label": "cat", **body}, pipeline.param_specs())
    return pipeline.sample(params, torch.Generator().manual_seed(7))


def test_autoguidance_by_the_same_network_is_the_plain_conditional_step(tmp_path):
    served = perturbed_checkpoint(tmp_path / "served", seed=1)
    pipeline = load_pipeline(served)
    conditional, guided = draw(pipeline, guidance_scale=1), draw(pipeline, guidance_scale=3)
    assert not torch.allclose(conditional, guided)
    autoguidance(served).apply(pipeline)
    assert torch.equal(draw(pipeline, guidance_scale=3), conditional)


def test_autoguidance_by_a_weaker_network_differs_from_both_kinds_of_guidance(tmp_path):
    served, weak = perturbed_checkpoint(tmp_path / "served", seed=1), perturbed_checkpoint(tmp_path / "weak", seed=2)
    pipeline = load_pipeline(served)
    conditional, guided = draw(pipeline, guidance_scale=1), draw(pipeline, guidance_scale=3)
    lever = autoguidance(weak)
    assert "autoguidance by the step-0 weights" == lever.description
    lever.apply(pipeline)
    autoguided = draw(pipeline, guidance_scale=3)
    assert not torch.allclose(autoguided, conditional) and not torch.allclose(autoguided, guided)
    assert torch.equal(draw(pipeline, guidance_scale=1), conditional)  # unguided steps never see the weak network


def test_eps_scaling_divides_the_prediction(tmp_path):
    pipeline = load_pipeline(perturbed_checkpoint(tmp_path / "served", seed=1))
    x, t, labels = torch.randn(2, 3, 32, 32), torch.tensor([500, 20]), torch.tensor([3, 10])
    before, plain = pipeline.unet(x, t, labels), draw(pipeline)
    eps_scaling(2.0).apply(pipeline)
    assert torch.allclose(pipeline.unet(x, t, labels), before / 2)
    assert not torch.allclose(draw(pipeline), plain)
    unchanged = load_pipeline(perturbed_checkpoint(tmp_path / "again", seed=1))
    eps_scaling(1.0).apply(unchanged)
    assert torch.equal(draw(unchanged), plain)


def test_weight_average_is_the_weighted_mean_of_the_two_checkpoints(tmp_path):
    served, other = perturbed_checkpoint(tmp_path / "served", seed=1), perturbed_checkpoint(tmp_path / "other", seed=2)
    (a, _), (b, _) = load_checkpoint(served), load_checkpoint(other)
    for weight in (0.0, 0.25, 1.0):
        pipeline = load_pipeline(served)
        weight_average(other, weight).apply(pipeline)
        for name, value in pipeline.unet.state_dict().items():
            assert torch.allclose(value, weight * a[name] + (1 - weight) * b[name], atol=1e-6), (weight, name)


@pytest.mark.parametrize("arguments", [["--eps-scale", "1.01", "--average-weight", "0.5"],
                                       ["--average-with", "somewhere", "--average-weight", "1.5"]])
def test_an_average_weight_needs_its_lever_and_a_share(arguments):
    result = subprocess.run([sys.executable, "-m", "training.sampling_levers", *arguments, "--model", "diffusion"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--average-weight goes with --average-with and lies in 0..1" in result.stderr
