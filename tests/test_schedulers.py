"""DPM-Solver++(2M) checked step by step against diffusers' DPMSolverMultistepScheduler (pinned in
requirements-dev.txt), and served through the diffusion pipeline like the other samplers."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from generators.gaussian_diffusion import ScheduleConfig, alphas_cumprod
from generators.params import InvalidParameter, validate
from generators.pipelines import load_pipeline
from generators.schedulers import SPACINGS, make_scheduler
from tests.synthetic import tiny_checkpoint

# diffusers 0.42.1 calls np.array on a torch tensor in set_timesteps, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ALPHA_BAR = alphas_cumprod(ScheduleConfig())
SHAPE = (4, 3, 8, 8)


def reference_scheduler() -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++(2M) on our cosine schedule. Its dynamic thresholding with sample_max_value=1 is
    plain clipping of the x_0 prediction to [-1, 1], which ours does at every step."""
    betas = 1 - ALPHA_BAR / torch.cat([torch.ones(1, dtype=ALPHA_BAR.dtype), ALPHA_BAR[:-1]])
    return DPMSolverMultistepScheduler(
        num_train_timesteps=len(ALPHA_BAR), trained_betas=betas.numpy(), algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", prediction_type="epsilon", timestep_spacing="trailing",
        lower_order_final=True, final_sigmas_type="zero", thresholding=True, sample_max_value=1.0)


def largest_step_difference(sampler: str, steps: int, timestep_spacing: str = "trailing") -> float:
    """Runs our `sampler` and diffusers' solver side by side, each on its own samples, feeding both the same
    fixed random network output at each step; returns the largest difference of any step's sample.

    The output does not depend on x, so x_0 predictions are mostly clipped at high noise and mostly not at low
    noise. diffusers is given our timesteps: its "trailing" spacing is ours, but it builds it with np.arange,
    whose rounding breaks some ties the other way (48 steps: 936 for our 937) and adds a t=-1 for a few counts
    (61 steps). It is also given the exact noise levels of those timesteps: it rounds its own to float32, where
    1 - alpha_bar at t = 0 (4e-5) keeps about three digits, which moves the step to t = 0 by up to 2e-4."""
    ours, reference = make_scheduler(sampler, ALPHA_BAR, timestep_spacing), reference_scheduler()
    ours.zero_signal_alpha_bar = 0.0  # diffusers clips x_0 at every level; ours takes the data mean at no signal
    ours.set_timesteps(steps)
    reference.set_timesteps(timesteps=ours.timesteps)
    alpha_bar = ALPHA_BAR.double()[ours.timesteps]
    reference.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    outputs = torch.randn(steps, *SHAPE, generator=torch.Generator().manual_seed(1))
    x_ours = x_reference = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    largest = 0.0
    for eps, t in zip(outputs, ours.timesteps):
        x_ours = ours.step(eps, t, x_ours)
        x_reference = reference.step(eps, t, x_reference).prev_sample
        largest = max(largest, (x_ours - x_reference).abs().max().item())
    return largest


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m"])
def test_no_signal_step_ignores_the_amplified_x0(sampler):
    """From t = 999 (alpha_bar 2.4e-9) x_0 is the data mean, so the first step does not depend on what the
    network says there; with the clipped estimate, a 1e-3 change of the network's output moves it."""
    def first_step(eps_seed: int, rule_on: bool) -> torch.Tensor:
        scheduler = make_scheduler(sampler, ALPHA_BAR)
        scheduler.set_timesteps(20)
        if not rule_on:
            scheduler.zero_signal_alpha_bar = 0.0
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        eps = x + 1e-3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(eps_seed))  # a nearly right net
        return scheduler.step(eps, scheduler.timesteps[0], x, torch.Generator().manual_seed(3))

    with_rule = [first_step(seed, rule_on=True) for seed in (1, 2)]
    without_rule = [first_step(seed, rule_on=False) for seed in (1, 2)]
    torch.testing.assert_close(with_rule[0], with_rule[1])
    assert (without_rule[0] - without_rule[1]).abs().max() > 0.05


@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20, 50])
def test_dpm_solver_matches_diffusers_step_by_step(steps, timestep_spacing):
    assert largest_step_difference("dpm++2m", steps, timestep_spacing) < 1e-5


def test_first_order_steps_do_not_pass_for_second_order():
    """DDIM is DPM-Solver++'s first-order update: the comparison above must tell the orders apart."""
    assert largest_step_difference("ddim", 2) < 1e-5  # both steps are first order in DPM-Solver++(2M) too
    assert largest_step_difference("ddim", 10) > 1e-2


@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("steps", [2, 4, 5, 10, 20, 25, 50, 100, 250, 999, 1000])
def test_timesteps_are_diffusers_timesteps(steps, timestep_spacing):
    """diffusers' DDIMScheduler spaces "trailing" as we do, and its "linspace" is ours (its DPM-Solver's
    "linspace" is another rule, which stops short of t = 0)."""
    ours = make_scheduler("dpm++2m", ALPHA_BAR, timestep_spacing)
    reference = DDIMScheduler(num_train_timesteps=len(ALPHA_BAR), timestep_spacing=timestep_spacing)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert ours.timesteps == reference.timesteps.tolist()


def test_one_step_starts_from_noise_whatever_the_spacing():
    """diffusers' one linspace step is at t = 0, which would denoise pure noise as if it were nearly clean."""
    for timestep_spacing in SPACINGS:
        scheduler = make_scheduler("dpm++2m", ALPHA_BAR, timestep_spacing)
        scheduler.set_timesteps(1)
        assert scheduler.timesteps == [len(ALPHA_BAR) - 1]


def test_linspace_ends_at_the_lowest_noise_level():
    trailing, linspace = (make_scheduler("dpm++2m", ALPHA_BAR, spacing) for spacing in ("trailing", "linspace"))
    trailing.set_timesteps(20)
    linspace.set_timesteps(20)
    assert trailing.timesteps[0] == linspace.timesteps[0] == 999
    assert (trailing.timesteps[-1], linspace.timesteps[-1]) == (49, 0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_scheduler("ddim", ALPHA_BAR, "karras")


def test_pipeline_samples_deterministically_and_costs_what_ddim_costs(tmp_path):
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "d", "diffusion"))
    params = validate({"n_images": 2, "steps": 3, "sampler": "dpm++2m", "class_label": "cat", "guidance_scale": 3.0},
                      pipeline.param_specs())
    images = pipeline.sample(params, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1
    assert torch.equal(images, pipeline.sample(params, torch.Generator().manual_seed(0)))
    assert not torch.equal(images, pipeline.sample(params, torch.Generator().manual_seed(1)))
    assert pipeline.work(params) == pipeline.work(dict(params, sampler="ddim")) == 2 * (3 + 3)


def test_work_cap_refuses_too_many_steps(tmp_path):
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "d", "diffusion"))
    body = {"n_images": 64, "steps": 50, "sampler": "dpm++2m", "class_label": "cat", "guidance_scale": 3.0}
    pipeline.check_work(validate(body, pipeline.param_specs()))
    with pytest.raises(InvalidParameter) as refused:
        pipeline.check_work(validate(dict(body, steps=51), pipeline.param_specs()))
    assert refused.value.field == "n_images, steps"
