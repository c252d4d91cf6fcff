"""Energy-based model: a scalar energy E(x, t, y) whose gradient is the score, and Langevin dynamics on it.

The energy follows Salimans & Ho (2021), "Should EBMs model the energy or the score?":

    E(x, t, y) = ||x - f(x, t, y)||^2 / (2 sigma_t^2),     f = c_skip x + sqrt(abar_t) c_out F(x, t, y)

with F the shared UNet and the EDM preconditioning (Karras et al. 2022) for c_skip and c_out in
the variance-exploding coordinates x / sqrt(abar_t). The explicit x-term matters: a GroupNorm
UNet is nearly invariant to the scale of its input, so an energy made of its output alone
(0.5 ||F||^2) has almost no gradient along x, where most of the score lies at high noise.

Noise levels are the diffusion schedule's (VP: x_t = sqrt(abar) x_0 + sigma_t eps), so
sigma_t * dE/dx predicts eps and training is denoising score matching on that prediction.
Sampling is annealed Langevin down the levels as a predictor-corrector (Song et al. 2021):
a deterministic reverse step, then Langevin corrector steps on the energy at the new level,
ending with a denoising step to t = 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from generators.schedulers import DDIMScheduler, Noise
from generators.unet import UNet, UNetConfig


@dataclass
class LangevinConfig:
    """Annealed Langevin settings. The served defaults are the checkpoint's (config.json, written from train_ebm's
    --serve-* options); these field defaults only fill what an older config lacks."""

    levels: int = 20  # noise levels visited, each a reverse (predictor) step
    corrector_steps: int = 1  # Langevin steps on the energy at each level
    snr: float = 0.16  # corrector step size as a signal-to-noise ratio (Song et al. 2021)
    guidance_scale: float = 1.0  # E_null + w (E_y - E_null) when a class is asked
    timestep_spacing: str = "trailing"  # which levels: see generators/schedulers.py

    def to_dict(self) -> dict:
        return asdict(self)


class EnergyModel(nn.Module):
    """E(x, t, y) from a UNet; `forward` returns sigma_t * dE/dx, the predicted noise."""

    def __init__(self, unet_config: UNetConfig, alphas_cumprod: torch.Tensor, sigma_data: float = 0.5):
        super().__init__()
        self.unet = UNet(unet_config)
        self.sigma_data = sigma_data
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @property
    def null_class(self) -> int:
        return self.unet.null_class

    def energy(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) energies of images x at noise levels t; lower means more like the data."""
        abar = self.alphas_cumprod[t][:, None, None, None]
        sigma2 = 1 - abar
        ve_sigma2 = sigma2 / abar  # noise variance of x / sqrt(abar)
        c_skip = self.sigma_data**2 / (ve_sigma2 + self.sigma_data**2)
        c_out = (ve_sigma2.sqrt() * self.sigma_data) / (ve_sigma2 + self.sigma_data**2).sqrt()
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no double backward
            residual = (1 - c_skip) * x - abar.sqrt() * c_out * self.unet(x, t, labels)
        return 0.5 * residual.pow(2).flatten(1).sum(1) / sigma2.flatten()

    def energy_grad(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                    create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, dE/dx); with create_graph the gradient can itself be differentiated (training)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            energy = self.energy(x, t, labels)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        return energy, grad

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _, grad = self.energy_grad(x, t, labels, create_graph=self.training)
        sigma = (1 - self.alphas_cumprod[t]).sqrt()[:, None, None, None]
        return sigma * grad


def guided_noise(model: EnergyModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                 guidance_scale: float) -> torch.Tensor:
    """sigma_t * grad of the guided energy E_null + w (E_y - E_null): one batched pass for both terms."""
    if labels is None or guidance_scale == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.null_class)
    eps_y, eps_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    return eps_null + guidance_scale * (eps_y - eps_null)


def annealed_langevin(model: EnergyModel, n: int, labels: torch.Tensor | None, settings: LangevinConfig,
                      noise: Noise | torch.Generator | None = None,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Predictor-corrector sampling from N(0, I): (n, C, H, W) in [-1, 1]. Every random draw comes from
    `noise`, so requests batched together each get their own generator's numbers. `progress` hears of each
    finished level (levels done, levels), so a long request can report how far it is."""
    device = model.alphas_cumprod.device
    c = model.unet.config
    noise = Noise.of(noise, n)
    predictor = DDIMScheduler(model.alphas_cumprod.double().cpu(), settings.timestep_spacing)
    predictor.set_timesteps(settings.levels)
    x = noise.randn((c.in_channels, c.image_size, c.image_size), device)
    if labels is not None:
        labels = labels.to(device)
    timesteps = predictor.timesteps
    for i, t in enumerate(timesteps):
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        x = predictor.step(guided_noise(model, x, t_batch, labels, settings.guidance_scale), t, x).detach()
        if i + 1 < len(timesteps):
            x = langevin_corrector(model, x, timesteps[i + 1], labels, settings, noise)
        if progress:
            progress(i + 1, len(timesteps))
    return x.clamp(-1, 1)


def langevin_corrector(model: EnergyModel, x: torch.Tensor, t: int, labels: torch.Tensor | None,
                       settings: LangevinConfig, noise: Noise) -> torch.Tensor:
    """x <- x - delta dE/dx + sqrt(2 delta) z, with delta per image set by the signal-to-noise ratio."""
    n = x.shape[0]
    t_batch = torch.full((n,), t, device=x.device, dtype=torch.long)
    abar = float(model.alphas_cumprod[t])
    sigma = (1 - abar) ** 0.5
    for _ in range(settings.corrector_steps):
        grad = guided_noise(model, x, t_batch, labels, settings.guidance_scale) / sigma
        z = noise.randn_like(x)
        ratio = z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = (2 * abar * (settings.snr * ratio) ** 2)[:, None, None, None]
        x = (x - delta * grad + (2 * delta).sqrt() * z).detach()
    return x
