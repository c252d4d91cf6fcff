"""Per-model pipelines: checkpoint -> network on a device -> images from validated parameters.

The handler and the training scripts' sample grids both go through these, so a served
image is produced exactly as the training run previewed it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from generators.checkpoint import load_checkpoint
from generators.ebm import EnergyModel, LangevinConfig, annealed_langevin
from generators.gan import GANConfig, Generator
from generators.guidance import Guidance
from generators.gaussian_diffusion import ScheduleConfig, alphas_cumprod
from generators.params import COMMON_PARAMS, ClassLabelParam, InvalidParameter, Param, PNGImagesParam, describe
from generators.schedulers import SCHEDULERS, make_scheduler
from generators.unet import UNet, UNetConfig


@torch.no_grad()
def sample_diffusion(unet: UNet, alpha_bar: torch.Tensor, sampler: str, steps: int, n: int,
                     labels: torch.Tensor | None, guidance: Guidance,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Reverse diffusion from pure noise; classifier-free guidance when labels are given, at the steps
    where `guidance` is active."""
    device = next(unet.parameters()).device
    c = unet.config
    scheduler = make_scheduler(sampler, alpha_bar)
    scheduler.set_timesteps(steps)
    x = torch.randn((n, c.in_channels, c.image_size, c.image_size), generator=generator).to(device)
    if labels is not None:
        labels = labels.to(device)
    for t in scheduler.timesteps:
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        if labels is not None and guidance.active(t):
            null = torch.full_like(labels, unet.null_class)
            eps_cond, eps_null = unet(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                                      torch.cat([labels, null])).chunk(2)
            eps = guidance.combine(eps_cond, eps_null, x, float(alpha_bar[t]))
        else:
            eps = unet(x, t_batch, labels)
        x = scheduler.step(eps, t, x, generator)
    return x


def class_params(class_names: list[str], default_guidance: float) -> list[Param]:
    """class_label and guidance_scale, for a model trained with label dropout; none for an unconditional one."""
    if not class_names:
        return []
    return [
        ClassLabelParam("class_label", choices=tuple(class_names),
                        help="CIFAR-10 class name or index; absent: unconditional"),
        Param("guidance_scale", float, default_guidance, 0.0, 20.0,
              help="classifier-free guidance with class_label; 1 = plain conditional"),
    ]


def guided(params: dict[str, Any]) -> bool:
    """Whether a request pays for two network evaluations per step (conditional and unconditional)."""
    return "class_label" in params and params.get("guidance_scale", 1.0) != 1.0


def class_labels(params: dict[str, Any]) -> torch.Tensor | None:
    if "class_label" not in params:
        return None
    return torch.full((params["n_images"],), params["class_label"], dtype=torch.long)


class Pipeline:
    """Base: holds the config; subclasses declare parameters, bound the work, and sample."""

    model_type = ""
    max_work = 0  # bound on network evaluations x images per request; config["serving"]["max_work"] overrides
    work_fields = "n_images"  # the parameters that the work bound is about, named in its error

    def __init__(self, config: dict[str, Any], device: torch.device):
        self.config = config
        self.device = device
        self.max_work = int(config.get("serving", {}).get("max_work", self.max_work))

    def _prepare(self, module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        module.load_state_dict(state_dict)
        return module.to(self.device).eval().requires_grad_(False)

    def param_specs(self) -> list[Param]:
        return list(COMMON_PARAMS)

    def work(self, params: dict[str, Any]) -> int:
        return params["n_images"]

    def check_work(self, params: dict[str, Any]) -> None:
        if self.work(params) > self.max_work:
            raise InvalidParameter(self.work_fields, f"asks for {self.work(params)} image-evaluations; at most {self.max_work} "
                                           f"per request (lower n_images or steps)")

    def sample(self, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """(n_images, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    def scoring_specs(self) -> list[Param]:
        """Parameters of a scoring request (a body with "images"); empty for models that cannot score."""
        return []

    def score(self, params: dict[str, Any]) -> torch.Tensor:
        """One figure per posted image."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "device": str(self.device),
            "weights_sha256": self.config.get("weights_sha256"),
            "training": self.config.get("training", {}),
            "max_work_per_request": self.max_work,
            "parameters": describe(self.param_specs()),
            **({"scoring_parameters": describe(self.scoring_specs())} if self.scoring_specs() else {}),
        }


class DiffusionPipeline(Pipeline):
    model_type = "diffusion"
    max_work = 64 * 50 * 2
    work_fields = "n_images, steps"

    def __init__(self, config, state_dict, device):
        super().__init__(config, device)
        self.unet = self._prepare(UNet(UNetConfig.from_dict(config["unet"])), state_dict)
        self.alpha_bar = alphas_cumprod(ScheduleConfig(**config["schedule"]))
        self.defaults = config["sampling"]
        self.class_names = config.get("class_names", []) if self.unet.config.num_classes else []

    def param_specs(self):
        specs = super().param_specs() + [
            Param("steps", int, self.defaults["steps"], 1, len(self.alpha_bar), help="denoising steps"),
            Param("sampler", str, self.defaults["sampler"], choices=tuple(SCHEDULERS),
                  help="ddpm: ancestral (stochastic); ddim: deterministic given the seed; "
                       "dpm++2m: deterministic, second order (DPM-Solver++(2M)), same cost per step as ddim"),
        ]
        if not self.class_names:
            return specs
        last = len(self.alpha_bar) - 1
        return specs + class_params(self.class_names, self.defaults["guidance_scale"]) + [
            Param("guidance_t_min", int, self.defaults.get("guidance_t_min", 0), 0, last,
                  help="guide only at timesteps >= this (0 = down to the end)"),
            Param("guidance_t_max", int, self.defaults.get("guidance_t_max", last), 0, last,
                  help="guide only at timesteps <= this (the first step is at the last timestep)"),
            Param("guidance_rescale", float, self.defaults.get("guidance_rescale", 0.0), 0.0, 1.0,
                  help="pull the guided image's contrast back toward the conditional one (0 = off)"),
        ]

    def guidance(self, params: dict[str, Any]) -> Guidance:
        if "class_label" not in params:
            return Guidance()
        return Guidance(params["guidance_scale"], params["guidance_t_min"], params["guidance_t_max"],
                        params["guidance_rescale"])

    def check_work(self, params):
        if params.get("guidance_t_min", 0) > params.get("guidance_t_max", len(self.alpha_bar)):
            raise InvalidParameter("guidance_t_min, guidance_t_max", "guidance_t_min must not exceed guidance_t_max")
        super().check_work(params)

    def work(self, params):
        scheduler = make_scheduler(params["sampler"], self.alpha_bar)
        scheduler.set_timesteps(params["steps"])
        guidance = self.guidance(params)
        guided_steps = sum(guidance.active(t) for t in scheduler.timesteps) if "class_label" in params else 0
        return params["n_images"] * (params["steps"] + guided_steps)

    def sample(self, params, generator):
        return sample_diffusion(self.unet, self.alpha_bar, params["sampler"], params["steps"], params["n_images"],
                                class_labels(params), self.guidance(params), generator)


class EBMPipeline(Pipeline):
    model_type = "ebm"
    max_work = 64 * 20 * 2 * 2
    work_fields = "n_images, levels, corrector_steps"

    def __init__(self, config, state_dict, device):
        super().__init__(config, device)
        alpha_bar = alphas_cumprod(ScheduleConfig(**config["schedule"]))
        self.energy = self._prepare(EnergyModel(UNetConfig.from_dict(config["unet"]), alpha_bar,
                                                config["sigma_data"]), state_dict)
        self.defaults = LangevinConfig(**config["langevin"])
        self.score_timestep = config["scoring"]["timestep"]
        self.class_names = config.get("class_names", []) if self.energy.unet.config.num_classes else []

    def param_specs(self):
        d = self.defaults
        return super().param_specs() + [
            Param("levels", int, d.levels, 1, len(self.energy.alphas_cumprod),
                  help="noise levels of annealed Langevin, each one reverse step"),
            Param("corrector_steps", int, d.corrector_steps, 0, 10, help="Langevin steps on the energy per level"),
            Param("snr", float, d.snr, 0.0, 1.0, help="Langevin step size as a signal-to-noise ratio"),
        ] + class_params(self.class_names, d.guidance_scale)

    def work(self, params):
        return params["n_images"] * params["levels"] * (1 + params["corrector_steps"]) * (2 if guided(params) else 1)

    def sample(self, params, generator):
        settings = LangevinConfig(levels=params["levels"], corrector_steps=params["corrector_steps"],
                                  snr=params["snr"], guidance_scale=params.get("guidance_scale", 1.0))
        return annealed_langevin(self.energy, params["n_images"], class_labels(params), settings, generator)

    def scoring_specs(self):
        c = self.energy.unet.config
        return [
            PNGImagesParam("images", width=c.image_size, height=c.image_size,
                           help="base64 PNGs to score; the answer is each one's energy (lower: more like the data)"),
            Param("timestep", int, self.score_timestep, 0, len(self.energy.alphas_cumprod) - 1,
                  help="noise level the energy is taken at; the image itself is not noised"),
        ]

    @torch.no_grad()
    def score(self, params):
        x = torch.from_numpy(params["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        t = torch.full((len(x),), params["timestep"], dtype=torch.long, device=self.device)
        return self.energy.energy(x, t)


class GANPipeline(Pipeline):
    model_type = "gan"
    max_work = 64

    def __init__(self, config, state_dict, device):
        super().__init__(config, device)
        self.generator = self._prepare(Generator(GANConfig(**config["gan"])), state_dict)

    def param_specs(self):
        k = self.generator.config.num_classes
        return super().param_specs() + [Param("digit", int, None, 0, k - 1, help="digit to draw; absent: random")]

    @torch.no_grad()
    def sample(self, params, generator):
        n, cfg = params["n_images"], self.generator.config
        z = torch.randn((n, cfg.z_dim), generator=generator)
        if "digit" in params:
            labels = torch.full((n,), params["digit"], dtype=torch.long)
        else:
            labels = torch.randint(0, cfg.num_classes, (n,), generator=generator)
        return self.generator(z.to(self.device), labels.to(self.device))


PIPELINES: dict[str, type[Pipeline]] = {p.model_type: p for p in (DiffusionPipeline, EBMPipeline, GANPipeline)}


def load_pipeline(checkpoint_dir: Path, device: torch.device | str = "cpu") -> Pipeline:
    state_dict, config = load_checkpoint(checkpoint_dir)
    model_type = config.get("model_type")
    if model_type not in PIPELINES:
        raise ValueError(f"{checkpoint_dir}: unknown model_type {model_type!r}")
    return PIPELINES[model_type](config, state_dict, torch.device(device))
