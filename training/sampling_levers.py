"""Measure training-free levers on a diffusion checkpoint that no request parameter offers, with evaluate.py.

    python -m training.sampling_levers --autoguide-with DIR --model diffusion --n-samples 500 \
        --params '{"guidance_scale": 2, "guidance_t_max": 999}' --out docs/quality/NAME.json
    python -m training.sampling_levers --eps-scale 1.005 --model diffusion --n-samples 500 --out ...
    python -m training.sampling_levers --average-with DIR --average-weight 0.5 --model diffusion ...

- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a guided step's
  second evaluation comes from a weaker network given the same class, not from the unconditional one:
  eps = eps_weak + w (eps - eps_weak), w = guidance_scale. Here the weaker network is an earlier checkpoint of the
  same one (DIR);
- epsilon scaling (Ning et al. 2024, "Elucidating the exposure bias in diffusion models"): every predicted noise is
  divided by a factor, against the gap between the noise levels the network was trained on and those it meets
  while sampling;
- weight averaging: the served weights moved toward another checkpoint of the same network (DIR), the weight being
  the served one's share.

They are measured here rather than served because none beat the served default (README, section 5). Options other
than the lever's are evaluate.py's (python -m training.evaluate --help); the lever is named in the result and in the
key of its unfinished samples.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from generators.pipelines import DiffusionPipeline, Pipeline, load_pipeline
from generators.unet import UNet
from training import evaluate
from training.evaluate import Lever

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
lever_choice = parser.add_mutually_exclusive_group(required=True)
lever_choice.add_argument("--autoguide-with", type=Path, help="checkpoint of the weaker guiding network")
lever_choice.add_argument("--eps-scale", type=float, help="divide every predicted noise by this")
lever_choice.add_argument("--average-with", type=Path, help="checkpoint to average the served weights with")
parser.add_argument("--average-weight", type=float, default=None,
                    help="the served weights' share in the average, 0..1 (default 0.5)")


class AutoGuided(nn.Module):
    """The served network, except that sample_diffusion's guided call (a batch [x, x] with labels [y, null]) gets
    the weak network, given y as well, for its second half."""

    def __init__(self, unet: UNet, weak: UNet):
        super().__init__()
        self.unet, self.weak = unet, weak
        self.config, self.null_class = unet.config, unet.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        half = len(x) // 2
        if (labels is None or len(x) % 2 or (labels[:half] == self.null_class).any()
                or not (labels[half:] == self.null_class).all()):
            return self.unet(x, t, labels)
        return torch.cat([self.unet(x[:half], t[:half], labels[:half]), self.weak(x[half:], t[half:], labels[:half])])


class EpsScaled(nn.Module):
    """The served network with its predicted noise divided by `factor`."""

    def __init__(self, unet: UNet, factor: float):
        super().__init__()
        self.unet, self.factor = unet, factor
        self.config, self.null_class = unet.config, unet.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, t, labels) / self.factor


def steps_of(pipeline: Pipeline) -> str:
    return f"step-{pipeline.config.get('training', {}).get('steps')}"


def diffusion(pipeline: Pipeline) -> DiffusionPipeline:
    if not isinstance(pipeline, DiffusionPipeline):
        raise SystemExit(f"the levers act on a diffusion checkpoint, not a {pipeline.model_type} one")
    return pipeline


def autoguidance(weak_dir: Path) -> Lever:
    weak = load_pipeline(weak_dir)

    def apply(pipeline: Pipeline) -> None:
        served = diffusion(pipeline)
        served.unet = AutoGuided(served.unet, diffusion(weak).unet.to(served.device))

    return Lever(f"autoguidance by the {steps_of(weak)} weights", apply)


def eps_scaling(factor: float) -> Lever:
    def apply(pipeline: Pipeline) -> None:
        diffusion(pipeline).unet = EpsScaled(diffusion(pipeline).unet, factor)

    return Lever(f"predicted noise / {factor:g}", apply)


def weight_average(other_dir: Path, weight: float) -> Lever:
    other = load_pipeline(other_dir)

    def apply(pipeline: Pipeline) -> None:
        unet, other_state = diffusion(pipeline).unet, diffusion(other).unet.state_dict()
        unet.load_state_dict({name: torch.lerp(other_state[name].to(value), value, weight)
                              if value.is_floating_point() else value for name, value in unet.state_dict().items()})

    return Lever(f"weights {weight:g} x served + {1 - weight:g} x {steps_of(other)}", apply)


def main() -> None:
    args, rest = parser.parse_known_args()
    if args.average_weight is not None and (args.average_with is None or not 0.0 <= args.average_weight <= 1.0):
        parser.error("--average-weight goes with --average-with and lies in 0..1")
    if args.autoguide_with:
        lever = autoguidance(args.autoguide_with)
    elif args.eps_scale is not None:
        lever = eps_scaling(args.eps_scale)
    else:
        lever = weight_average(args.average_with, 0.5 if args.average_weight is None else args.average_weight)
    evaluate.main(rest, lever)


if __name__ == "__main__":
    main()
