"""Widen a trained UNet checkpoint k times without changing what it computes (Net2WiderNet, Chen et al. 2016).

    python -m training.grow_unet checkpoints/diffusion --out runs/diffusion-wide/out --factor 2
    python -m training.train_diffusion --out runs/diffusion-wide/out --state-dir runs/diffusion-wide/state \
        --base-channels 64 --resume ...

The served diffusion model stopped improving with more training at its size (README, section 4), so the
next step is more channels. Training a wider network from scratch throws away the ~50k steps the narrow one
took; growing it keeps them: every channel of every layer becomes k copies, a layer that reads the copies
divides its weights by k, so the widened network starts with the same outputs (up to float rounding) and
training then uses the new width. Why each piece still agrees:
- GroupNorm keeps its 16 groups, and copy r of channel i sits at k*i + r, so each new group holds exactly
  the copies of one old group's channels: same mean and variance;
- the sinusoidal timestep embedding has base_channels frequencies; the old ones are every k-th of the new
  ones, so the first layer reads those and gives the others zero weight;
- attention's head width grows k times, so its dot products would grow k times against a sqrt(k) larger
  softmax scale: the query weights are divided by sqrt(k);
- image channels in and out (the stem's input, the head's output) and class indices stay as they are.
Copies start equal; `--noise` adds a little noise to the copied weights so training can tell them apart
(dropout also does). Before that, both networks run on random inputs and nothing is written unless their
outputs agree to float rounding (a width whose GroupNorm groups would mix copies of different channels, such
as 24 -> 48, does not).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import nn

from generators.checkpoint import load_checkpoint, save_checkpoint
from generators.unet import SelfAttention, UNet, UNetConfig

UNET_PREFIX = {"diffusion": "", "ebm": "unet."}  # where each model type keeps its UNet's weights

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", type=Path, help="a diffusion or ebm checkpoint directory")
parser.add_argument("--out", type=Path, required=True, help="where the widened checkpoint goes")
parser.add_argument("--factor", type=int, default=2, help="channel multiplier k")
parser.add_argument("--noise", type=float, default=1e-3,
                    help="std of the noise added to the copies' weights, relative to each tensor's std; 0 = exact")
parser.add_argument("--seed", type=int, default=0)


def _copies(t: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Each index i along `dim` becomes k adjacent indices k*i .. k*i + k - 1."""
    return t.repeat_interleave(k, dim=dim)


def _widen(old: torch.Tensor, new_shape: torch.Size, k: int, reads_channels: bool) -> torch.Tensor:
    """Copy every dimension that grew k times; where the tensor reads channels (a weight's dim 1), split."""
    out = old
    for dim, (before, after) in enumerate(zip(old.shape, new_shape)):
        if after == before:
            continue
        if after != k * before:
            raise ValueError(f"dimension {dim} goes {before} -> {after}, not x{k}")
        out = _copies(out, dim, k)
        if dim == 1 and reads_channels:
            out = out / k
    return out


def widen_unet(old: UNet, k: int) -> UNet:
    """A UNet with k times the channels whose forward pass equals `old`'s (in eval mode)."""
    config = dataclasses.replace(old.config, base_channels=old.config.base_channels * k)
    new = UNet(config)
    old_modules = dict(old.named_modules())
    with torch.no_grad():
        for name, module in new.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                source = old_modules[name]
                module.weight.copy_(_widen(source.weight, module.weight.shape, k, reads_channels=True))
                module.bias.copy_(_widen(source.bias, module.bias.shape, k, reads_channels=False))
            elif isinstance(module, (nn.GroupNorm, nn.Embedding)):
                source = old_modules[name]
                for param, old_param in zip(module.parameters(), source.parameters()):
                    param.copy_(_widen(old_param, param.shape, k, reads_channels=False))
        _match_timestep_frequencies(new.time_mlp[0], old.time_mlp[0], old.config.base_channels // 2, k)
        for module in new.modules():
            if isinstance(module, SelfAttention):
                channels = module.out.weight.shape[0]
                module.qkv.weight[:channels] /= k**0.5
                module.qkv.bias[:channels] /= k**0.5
    return new


def _match_timestep_frequencies(layer: nn.Linear, old_layer: nn.Linear, half: int, k: int) -> None:
    """The first time-MLP layer reads [cos, sin] of `half` frequencies, now k*half; old frequency i is new k*i."""
    weight = torch.zeros_like(layer.weight)
    old_weight = _copies(old_layer.weight, 0, k)  # its outputs are copied like any channel
    for part in range(2):  # cos, then sin
        weight[:, part * k * half + torch.arange(half) * k] = old_weight[:, part * half:(part + 1) * half]
    layer.weight.copy_(weight)


def largest_difference(old: UNet, new: UNet, images: int = 8, seed: int = 0) -> float:
    """Largest output difference on random noisy images, relative to the outputs' largest value: near float
    rounding when the widening kept the function (it would not for a GroupNorm whose groups change)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, old.config.in_channels, old.config.image_size, old.config.image_size, generator=generator)
    t = torch.randint(0, 1000, (images,), generator=generator)
    labels = torch.randint(0, old.config.num_classes + 1, (images,), generator=generator) if old.config.num_classes else None
    with torch.no_grad():
        expected, got = old.eval()(x, t, labels), new.eval()(x, t, labels)
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def add_noise(model: nn.Module, relative_std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and param.std() > 0:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * relative_std)


def main() -> None:
    args = parser.parse_args()
    weights, config = load_checkpoint(args.checkpoint)
    prefix = UNET_PREFIX.get(config["model_type"])
    if prefix is None:
        raise SystemExit(f"{args.checkpoint}: a {config['model_type']} checkpoint has no UNet to widen")
    old = UNet(UNetConfig.from_dict(config["unet"]))
    old.load_state_dict({name.removeprefix(prefix): value for name, value in weights.items()})
    new = widen_unet(old, args.factor)
    difference = largest_difference(old, new)
    if difference > 1e-4:
        raise SystemExit(f"the widened network's outputs differ by {difference:.1e} of their size: not written")
    if args.noise:
        add_noise(new, args.noise, torch.Generator().manual_seed(args.seed))
    grown = dict(config, unet=new.config.to_dict(),
                 grown_from={"weights_sha256": config.get("weights_sha256"), "factor": args.factor,
                             "noise": args.noise, "base_channels": old.config.base_channels})
    save_checkpoint(args.out, {prefix + name: value for name, value in new.state_dict().items()}, grown)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"{args.checkpoint}: {count(old):.2f}M parameters -> {args.out}: {count(new):.2f}M; outputs before "
          f"--noise differ by at most {difference:.1e} of their largest value on 8 random inputs")


if __name__ == "__main__":
    main()
