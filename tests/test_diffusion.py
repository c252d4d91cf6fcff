"""The diffusion maths, checked against an exactly known denoiser (no training needed)."""
import pytest
import torch

from generators.gaussian_diffusion import GaussianDiffusion, ScheduleConfig, alphas_cumprod
from generators.guidance import Guidance
from generators.pipelines import sample_diffusion
from generators.schedulers import SCHEDULERS, make_scheduler
from generators.unet import UNet, UNetConfig

ALPHA_BAR = alphas_cumprod(ScheduleConfig())


class OracleDenoiser(torch.nn.Module):
    """The exact epsilon-predictor when all data is one image `target`: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = torch.nn.Parameter(target, requires_grad=False)
        self.config = UNetConfig(image_size=target.shape[-1], in_channels=target.shape[0], num_classes=0)
        self.null_class = 0

    def forward(self, x, t, labels=None):
        a = ALPHA_BAR.to(x.device)[t].float()[:, None, None, None]
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [2, 10, 100])
def test_samplers_recover_the_data_point(sampler, steps):
    target = torch.rand(3, 8, 8) * 1.6 - 0.8
    out = sample_diffusion(OracleDenoiser(target), ALPHA_BAR, sampler, steps, 4, None, Guidance(),
                           torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)


def test_trailing_timesteps_start_at_the_last_training_step():
    scheduler = make_scheduler("ddim", ALPHA_BAR)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999 and scheduler.timesteps == sorted(scheduler.timesteps, reverse=True)
    assert len(set(scheduler.timesteps)) == 10 and scheduler.timesteps[-1] >= 0
    with pytest.raises(ValueError):
        scheduler.set_timesteps(1001)


def test_cosine_schedule_runs_from_signal_to_noise():
    assert ALPHA_BAR[0] > 0.999 and ALPHA_BAR[-1] < 1e-4
    assert torch.all(ALPHA_BAR[1:] < ALPHA_BAR[:-1])


def test_training_loss_falls_on_a_tiny_problem():
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), attention_resolutions=(),
                            num_classes=2, dropout=0.0))
    diffusion = GaussianDiffusion(ScheduleConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x0 = torch.zeros(16, 3, 8, 8).uniform_(-0.5, 0.5)
    labels = torch.arange(16) % 2

    def mean_loss():
        torch.manual_seed(1)
        with torch.no_grad():
            return sum(diffusion.training_loss(model, x0, labels).item() for _ in range(10)) / 10

    before = mean_loss()
    for _ in range(60):
        loss = diffusion.training_loss(model, x0, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mean_loss() < 0.7 * before
