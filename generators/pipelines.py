"""Per-model pipelines: checkpoint -> network on a device -> images from validated parameters.

The handler and the training scripts' sample grids both go through these, so a served
image is produced exactly as the training run previewed it. Requests whose sampling agrees
in everything but seeds, sizes and class labels (`Pipeline.group_key`) are sampled as one
group, concatenated along the batch dimension, with one network forward per step for all of
them; each request still draws its noise from its own generator, so its images are those it
gets when sampled alone (up to the rounding of batched kernels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import torch
from torch import nn

from generators.checkpoint import load_checkpoint
from generators.ebm import EnergyModel, LangevinConfig, annealed_langevin
from generators.gan import GANConfig, Generator
from generators.guidance import Guidance
from generators.gaussian_diffusion import ScheduleConfig, alphas_cumprod
from generators.params import (COMMON_PARAMS, NO_CLASS, RANDOM_CLASS, ClassLabelParam, InvalidParameter, Param,
                               PNGImagesParam, describe)
from generators.schedulers import SCHEDULERS, SPACINGS, Noise, make_scheduler
from generators.unet import UNet, UNetConfig

Progress = Callable[[int, int], None]  # (steps done, total steps), called after every sampling step

MAX_IMAGES = int(next(p.high for p in COMMON_PARAMS if p.name == "n_images"))  # the most one request may ask for
LABEL_STREAM = 0x9E3779B9  # xor-ed into a request's seed to draw its random classes apart from its noise


@torch.no_grad()
def sample_diffusion(unet: UNet, alpha_bar: torch.Tensor, sampler: str, steps: int, n: int,
                     labels: torch.Tensor | None, guidance: Guidance,
                     noise: Noise | torch.Generator | None, progress: Progress | None = None,
                     timestep_spacing: str = "trailing") -> torch.Tensor:
    """Reverse diffusion from pure noise; classifier-free guidance when labels are given, at the steps
    where `guidance` is active. Every random draw comes from `noise` (one generator, or one per request);
    `progress` hears of each finished step, so a long request can report how far it is."""
    device = next(unet.parameters()).device
    c = unet.config
    noise = Noise.of(noise, n)
    scheduler = make_scheduler(sampler, alpha_bar, timestep_spacing)
    scheduler.set_timesteps(steps)
    x = noise.randn((c.in_channels, c.image_size, c.image_size), device)
    if labels is not None:
        labels = labels.to(device)
    for step, t in enumerate(scheduler.timesteps, start=1):
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        if labels is not None and guidance.active(t):
            null = torch.full_like(labels, unet.null_class)
            eps_cond, eps_null = unet(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                                      torch.cat([labels, null])).chunk(2)
            eps = guidance.combine(eps_cond, eps_null, x, float(alpha_bar[t]))
        else:
            eps = unet(x, t_batch, labels)
        x = scheduler.step(eps, t, x, noise)
        if progress:
            progress(step, len(scheduler.timesteps))
    return x


def class_params(class_names: list[str], default_guidance: float) -> list[Param]:
    """class_label and guidance_scale, for a model trained with label dropout; none for an unconditional one."""
    if not class_names:
        return []
    return [
        ClassLabelParam("class_label", default=RANDOM_CLASS, choices=tuple(class_names),
                        help=f"CIFAR-10 class name or index; {RANDOM_CLASS!r}: a class per image drawn from "
                             f"the seed; {NO_CLASS!r}: unconditional"),
        Param("guidance_scale", float, default_guidance, 0.0, 20.0,
              help="classifier-free guidance with class_label; 1 = plain conditional"),
    ]


def spacing_param(default: str) -> Param:
    """timestep_spacing, for both models that walk down the diffusion schedule's noise levels."""
    return Param("timestep_spacing", str, default, choices=SPACINGS,
                 help="which noise levels the steps visit, from the highest: linspace evenly down to the "
                      "lowest (finer detail), trailing 1000/steps apart, stopping 1000/steps above it")


def guided(params: dict[str, Any]) -> bool:
    """Whether a request pays for two network evaluations per step (conditional and unconditional)."""
    return "class_label" in params and params.get("guidance_scale", 1.0) != 1.0


def request_classes(label: int | str, n_images: int, seed: int, num_classes: int) -> torch.Tensor:
    """A request's labels: its class `label` for every image, or for RANDOM_CLASS one per image drawn from a
    stream of its own seeded by `seed`, so its noise is the same as with those classes asked by name."""
    if label == RANDOM_CLASS:
        stream = torch.Generator().manual_seed(seed ^ LABEL_STREAM)
        return torch.randint(0, num_classes, (n_images,), generator=stream)
    return torch.full((n_images,), label, dtype=torch.long)


def class_labels(requests: list[dict[str, Any]], generators: list[torch.Generator], num_classes: int,
                 null_class: int) -> torch.Tensor | None:
    """A group's labels, request after request (random classes from each request's generator's seed): None
    when no request asks for a class, else the null class for the rows of those that do not (the networks
    read a missing label as exactly that)."""
    if not any("class_label" in params for params in requests):
        return None
    return torch.cat([request_classes(params["class_label"], params["n_images"], generator.initial_seed(), num_classes)
                      if "class_label" in params
                      else torch.full((params["n_images"],), null_class, dtype=torch.long)
                      for params, generator in zip(requests, generators)])


def request_noise(requests: list[dict[str, Any]], generators: list[torch.Generator]) -> Noise:
    return Noise([(generator, params["n_images"]) for params, generator in zip(requests, generators)])


class Pipeline:
    """Base: holds the config; subclasses declare parameters, bound the work, and sample."""

    model_type = ""
    class_names: list[str] = []  # the classes a request may ask for; empty for a model without classes
    max_work = 0  # bound on network evaluations x images per request; config["serving"]["max_work"] overrides
    work_fields = "n_images"  # the parameters that the work bound is about, named in its error

    def __init__(self, config: dict[str, Any], device: torch.device):
        self.config = config
        self.device = device
        self.max_work = int(config.get("serving", {}).get("max_work", self.max_work))

    def _prepare(self, module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        module.load_state_dict(state_dict)
        return module.to(self.device).eval().requires_grad_(False)

    def networks(self) -> dict[str, nn.Module]:
        return {name: module for name, module in vars(self).items() if isinstance(module, nn.Module)}

    def use_channels_last(self) -> None:
        """Keep the networks' weights in NHWC order, which the measured CPU's convolutions run faster
        (docs/benchmark.json, raw trials); the images are the same up to float rounding."""
        for module in self.networks().values():
            module.to(memory_format=torch.channels_last)

    def compile_networks(self) -> None:
        """torch.compile every network (compiled on first use, again for each new batch shape)."""
        for name, module in self.networks().items():
            setattr(self, name, torch.compile(module))

    def param_specs(self) -> list[Param]:
        return list(COMMON_PARAMS)

    def work(self, params: dict[str, Any]) -> int:
        return params["n_images"]

    def check_work(self, params: dict[str, Any]) -> None:
        if self.work(params) > self.max_work:
            guidance = (f'; a guided step costs two evaluations: guidance_scale 1 or class_label "{NO_CLASS}" costs one'
                        if guided(params) else "")
            raise InvalidParameter(self.work_fields, f"asks for {self.work(params)} image-evaluations; at most {self.max_work} "
                                           f"per request (lower n_images or steps{guidance})")

    def sample(self, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """(n_images, C, H, W) in [-1, 1]."""
        return self.sample_group([params], [generator])

    def sample_group(self, requests: list[dict[str, Any]], generators: list[torch.Generator],
                     progress: Progress | None = None) -> torch.Tensor:
        """Requests of one group_key, sampled together: their images concatenated in order, each request's
        drawn from its own generator; `progress` is called after each sampling step."""
        raise NotImplementedError

    def group_key(self, params: dict[str, Any]) -> Hashable:
        """What requests must share to be sampled together; equal keys give each image the same computation
        as sampling its request alone."""
        return ()

    def groups(self, requests: list[dict[str, Any]]) -> list[list[int]]:
        """Indices of `requests` (validated, within the work cap) to sample together, first fit in arrival
        order. A group holds one group_key and stays within one request's limits (max_work, and the most
        images one request may ask for), so it needs no more time or memory than one maximal request."""
        groups: list[tuple[Hashable, list[int]]] = []
        for i, params in enumerate(requests):
            key = self.group_key(params)
            for group_key, members in groups:
                if group_key == key and self._fits(requests, members + [i]):
                    members.append(i)
                    break
            else:
                groups.append((key, [i]))
        return [members for _, members in groups]

    def _fits(self, requests: list[dict[str, Any]], members: list[int]) -> bool:
        return (sum(self.work(requests[i]) for i in members) <= self.max_work
                and sum(requests[i]["n_images"] for i in members) <= MAX_IMAGES)

    def image_classes(self, params: dict[str, Any]) -> list[str] | None:
        """The class names a request's images were sampled with (its seed decides random ones); None without."""
        if "class_label" not in params:
            return None
        labels = request_classes(params["class_label"], params["n_images"], params["seed"], len(self.class_names))
        return [self.class_names[int(k)] for k in labels]

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
            spacing_param(self.defaults.get("timestep_spacing", "trailing")),
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
            Param("guidance_parallel", float, self.defaults.get("guidance_parallel", 1.0), 0.0, 1.0,
                  help="weight of the guidance update along the conditional image itself (1 = plain guidance, "
                       "0 = only the part orthogonal to it, which leaves its contrast alone)"),
        ]

    def guidance(self, params: dict[str, Any]) -> Guidance:
        if "class_label" not in params:
            return Guidance()
        return Guidance(params["guidance_scale"], params["guidance_t_min"], params["guidance_t_max"],
                        params["guidance_rescale"], params["guidance_parallel"])

    def check_work(self, params):
        if params.get("guidance_t_min", 0) > params.get("guidance_t_max", len(self.alpha_bar)):
            raise InvalidParameter("guidance_t_min, guidance_t_max", "guidance_t_min must not exceed guidance_t_max")
        super().check_work(params)

    def guided_steps(self, params: dict[str, Any]) -> int:
        """Steps that pay for the unconditional evaluation as well."""
        if "class_label" not in params:
            return 0
        scheduler = make_scheduler(params["sampler"], self.alpha_bar, params["timestep_spacing"])
        scheduler.set_timesteps(params["steps"])
        guidance = self.guidance(params)
        return sum(guidance.active(t) for t in scheduler.timesteps)

    def work(self, params):
        return params["n_images"] * (params["steps"] + self.guided_steps(params))

    def group_key(self, params):
        # Guidance that acts at no step leaves the plain conditional (or, without a label, unconditional) step.
        return (params["sampler"], params["steps"], params["timestep_spacing"],
                self.guidance(params) if self.guided_steps(params) else None)

    def sample_group(self, requests, generators, progress=None):
        first = requests[0]
        return sample_diffusion(self.unet, self.alpha_bar, first["sampler"], first["steps"],
                                sum(params["n_images"] for params in requests),
                                class_labels(requests, generators, len(self.class_names), self.unet.null_class),
                                self.guidance(first),
                                request_noise(requests, generators), progress, first["timestep_spacing"])


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
            spacing_param(d.timestep_spacing),
        ] + class_params(self.class_names, d.guidance_scale)

    def work(self, params):
        return params["n_images"] * params["levels"] * (1 + params["corrector_steps"]) * (2 if guided(params) else 1)

    def settings(self, params: dict[str, Any]) -> LangevinConfig:
        """The request's Langevin settings; an unguided request's scale is 1 (its guidance_scale is then unused)."""
        return LangevinConfig(levels=params["levels"], corrector_steps=params["corrector_steps"], snr=params["snr"],
                              guidance_scale=params["guidance_scale"] if guided(params) else 1.0,
                              timestep_spacing=params["timestep_spacing"])

    def group_key(self, params):
        return tuple(self.settings(params).to_dict().values())

    def sample_group(self, requests, generators, progress=None):
        return annealed_langevin(self.energy, sum(params["n_images"] for params in requests),
                                 class_labels(requests, generators, len(self.class_names), self.energy.null_class),
                                 self.settings(requests[0]),
                                 request_noise(requests, generators), progress)

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
        return super().param_specs() + [Param("digit", int, None, 0, k - 1,
                                              help="digit to draw; absent: a digit per image drawn from the seed")]

    def digits(self, params: dict[str, Any], seed: int) -> torch.Tensor:
        """A request's digits: the one asked, or a random one per image drawn as the diffusion and EBM models draw
        random classes (apart from the noise, so an image equals the one asked with its digit)."""
        return request_classes(params.get("digit", RANDOM_CLASS), params["n_images"], seed,
                               self.generator.config.num_classes)

    def image_classes(self, params):
        return [str(int(k)) for k in self.digits(params, params["seed"])]

    @torch.no_grad()
    def sample_group(self, requests, generators, progress=None):
        cfg = self.generator.config
        z = request_noise(requests, generators).randn((cfg.z_dim,))
        labels = torch.cat([self.digits(params, generator.initial_seed())
                            for params, generator in zip(requests, generators)])
        images = self.generator(z.to(self.device), labels.to(self.device))
        if progress:
            progress(1, 1)  # a single forward pass
        return images


PIPELINES: dict[str, type[Pipeline]] = {p.model_type: p for p in (DiffusionPipeline, EBMPipeline, GANPipeline)}


LEAN_SETTINGS = ("channels_last", "torch_compile")  # handler settings (model-config yaml) that load_pipeline takes


def lean_settings(handler_settings: Mapping[str, Any]) -> dict[str, bool]:
    """load_pipeline's keyword arguments from a model-config yaml's `handler:` section (absent: off), so the
    handler and in-process measurements read those settings the same way."""
    return {name: bool(handler_settings.get(name, False)) for name in LEAN_SETTINGS}


def load_pipeline(checkpoint_dir: Path, device: torch.device | str = "cpu", channels_last: bool = False,
                  torch_compile: bool = False) -> Pipeline:
    """The checkpoint's pipeline; channels_last and torch_compile are the handler settings of those names."""
    state_dict, config = load_checkpoint(checkpoint_dir)
    model_type = config.get("model_type")
    if model_type not in PIPELINES:
        raise ValueError(f"{checkpoint_dir}: unknown model_type {model_type!r}")
    pipeline = PIPELINES[model_type](config, state_dict, torch.device(device))
    if channels_last:
        pipeline.use_channels_last()
    if torch_compile:
        pipeline.compile_networks()
    return pipeline
