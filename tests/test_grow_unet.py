"""Widening a UNet checkpoint keeps what it computes, and training goes on from the widened weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generators.checkpoint import load_checkpoint, save_checkpoint
from generators.params import validate
from generators.pipelines import load_pipeline
from generators.unet import UNet, UNetConfig
from tests.synthetic import CIFAR_CLASSES, tiny_checkpoint, write_npz
from training.grow_unet import largest_difference, widen_unet

ROOT = Path(__file__).resolve().parent.parent


def randomized(config: UNetConfig) -> UNet:
    """A UNet with every parameter random: the zero-initialised output layers would hide any mismatch."""
    torch.manual_seed(0)
    unet = UNet(config)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0.0, 0.2)
    return unet.eval()


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_unet_computes_the_same_function(factor):
    old = randomized(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(16,)))
    new = widen_unet(old, factor).eval()
    assert new.config.base_channels == 16 * factor
    assert sum(p.numel() for p in new.parameters()) > (factor**2 - 1) * sum(p.numel() for p in old.parameters())
    x, t, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        expected, got = old(x, t, y), new(x, t, y)
    assert expected.abs().mean() > 0.1
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max())


def test_a_widening_that_regroups_the_norms_is_caught():
    # 24 channels form GroupNorm groups of 3 (gcd(16, 24) = 8 groups); at 48 there are 16 groups of 3 again, which
    # now mix copies of different old channels: the check that guards the CLI must see the difference
    old = randomized(UNetConfig(base_channels=24, channel_mults=(1, 2), attention_resolutions=()))
    assert largest_difference(old, widen_unet(old, 2)) > 1e-3
    good = randomized(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(16,)))
    assert largest_difference(good, widen_unet(good, 2)) < 1e-4


def test_grown_checkpoint_samples_like_the_original_and_trains_on(tmp_path):
    source = tiny_checkpoint(tmp_path / "narrow", "diffusion")
    weights, config = load_checkpoint(source)
    unet = randomized(UNetConfig.from_dict(config["unet"]))
    with torch.no_grad():  # keep the images in range: a random network's raw noise estimates are large
        unet.head[-1].weight.mul_(0.05)
    save_checkpoint(source, unet.state_dict(), config)
    grown = tmp_path / "wide"
    run = [sys.executable, "-m", "training.grow_unet", str(source), "--out", str(grown), "--noise", "0"]
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    grown_config = json.loads((grown / "config.json").read_text())
    assert grown_config["unet"]["base_channels"] == 32 and grown_config["grown_from"]["factor"] == 2

    images = []
    for directory in (source, grown):
        pipeline = load_pipeline(directory)
        params = validate({"n_images": 2, "class_label": "cat", "seed": 1}, pipeline.param_specs())
        images.append(pipeline.sample(params, torch.Generator().manual_seed(1)))
    assert images[0].std() > 0.05
    assert torch.allclose(images[0], images[1], atol=1e-3)

    data = write_npz(tmp_path / "data.npz", (32, 32, 3), classes=CIFAR_CLASSES)
    train = [sys.executable, "-m", "training.train_diffusion", "--data", str(data), "--out", str(grown),
             "--state-dir", str(tmp_path / "state"), "--threads", "1", "--base-channels", "32",
             "--channel-mults", "1", "2", "--attention-resolutions", "--serve-steps", "2", "--batch-size", "4",
             "--resume", "--max-steps", "1"]
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm start" in result.stdout
    assert json.loads((grown / "config.json").read_text())["training"]["steps"] == 1
