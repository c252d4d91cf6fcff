"""Smoke tests of the training scripts on synthetic data: they train, export a servable checkpoint, and resume."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generators.checkpoint import load_checkpoint
from generators.params import validate
from generators.pipelines import load_pipeline
from tests.synthetic import CIFAR_CLASSES, write_npz

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "diffusion": (["--base-channels", "16", "--channel-mults", "1", "2", "--attention-resolutions",
                   "--serve-steps", "2", "--batch-size", "4"], (32, 32, 3)),
    "ebm": (["--base-channels", "16", "--channel-mults", "1", "2", "--attention-resolutions", "16",
             "--serve-levels", "2", "--batch-size", "4"], (32, 32, 3)),
    "gan": (["--z-dim", "8", "--g-channels", "16", "--d-channels", "16", "--batch-size", "4"], (28, 28)),
}


def train(model: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    flags, shape = SCRIPTS[model]
    data = tmp_path / "data.npz"
    if not data.exists():
        write_npz(data, shape, classes=CIFAR_CLASSES if len(shape) == 3 else None)
    cmd = [sys.executable, "-m", f"training.train_{model}", "--data", str(data), "--out", str(tmp_path / "ckpt"),
           "--state-dir", str(tmp_path / "state"), "--threads", "1", "--log-every", "1", "--sample-every", "2",
           "--save-every", "2", *flags, *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("model", sorted(SCRIPTS))
def test_trains_exports_and_resumes(model, tmp_path):
    train(model, tmp_path, "--max-steps", "2")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == model and config["training"]["steps"] == 2
    assert len(config["training"]["data_sha256"]) == 64
    assert list((tmp_path / "state" / "samples").glob("*.png"))

    pipeline = load_pipeline(tmp_path / "ckpt")
    images = pipeline.sample(validate({"n_images": 2}, pipeline.param_specs()), torch.Generator().manual_seed(0))
    assert images.shape[0] == 2 and torch.isfinite(images).all()

    train(model, tmp_path, "--max-steps", "3", "--resume")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["training"]["steps"] == 3
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3]


def test_resume_without_state_warm_starts_from_served_weights(tmp_path):
    train("gan", tmp_path, "--max-steps", "2")
    (tmp_path / "state" / "state.pt").unlink()
    result = train("gan", tmp_path, "--max-steps", "3", "--resume", "--d-warmup-steps", "2")
    assert "warm start" in result.stdout
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["training"]["steps"] == 3


def test_gan_warm_start_trains_the_fresh_discriminator_alone_first(tmp_path):
    train("gan", tmp_path, "--max-steps", "2")
    served, _ = load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "state" / "state.pt").unlink()
    train("gan", tmp_path, "--max-steps", "2", "--resume", "--d-warmup-steps", "3")  # warm-up only, no joint step
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=True)
    assert all(entry["step"] == 3 for entry in state["opt_d"]["state"].values())
    assert not state["opt_g"]["state"]
    assert all(torch.equal(state["generator"][name], served[name]) for name, _ in state["generator"].items()
               if "weight" in name or "bias" in name)


def test_diffusion_logs_a_held_out_loss_that_is_the_same_for_the_same_weights(tmp_path):
    train("diffusion", tmp_path, "--max-steps", "2", "--val-every", "1", "--val-images", "8", "--lr", "0")
    records = [json.loads(line) for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2]
    assert all(r["val_loss"] > 0 and r["val_loss_unconditional"] > 0 for r in val)
    # lr 0 leaves the weights (and so the EMA) unchanged: the fixed batch gives the same loss
    assert val[0]["val_loss"] == val[1]["val_loss"]


@pytest.mark.parametrize("model", ["diffusion", "gan"])
def test_lr_cools_down_linearly_before_max_steps(model, tmp_path):
    train(model, tmp_path, "--max-steps", "4", "--cooldown-steps", "4", "--warmup-steps", "1", "--lr", "0.1")
    records = [json.loads(line) for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in records if "lr" in r] == [(1, 0.1), (2, 0.075), (3, 0.05), (4, 0.025)]


def test_a_warm_start_warms_the_fresh_optimizer_up_again(tmp_path):
    """Without training state, --resume starts from the served weights with a new optimizer: its first updates
    get the warm-up, not the full lr at once; a later full resume keeps counting from the warm start."""
    train("diffusion", tmp_path, "--max-steps", "2", "--warmup-steps", "1", "--lr", "0.1")
    shutil.rmtree(tmp_path / "state")
    train("diffusion", tmp_path, "--resume", "--max-steps", "4", "--warmup-steps", "4", "--lr", "0.1")
    train("diffusion", tmp_path, "--resume", "--max-steps", "6", "--warmup-steps", "4", "--lr", "0.1")
    records = [json.loads(line) for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in records if "lr" in r] == [
        (3, 0.025), (4, 0.05), (5, 0.075), (6, 0.1)]


@pytest.mark.parametrize("model", sorted(SCRIPTS))
def test_cooldown_without_max_steps_is_refused(model, tmp_path):
    flags, _ = SCRIPTS[model]
    result = subprocess.run([sys.executable, "-m", f"training.train_{model}", "--cooldown-steps", "10", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--cooldown-steps needs --max-steps" in result.stderr


def test_held_out_loss_of_a_checkpoint_is_the_one_training_logged(tmp_path):
    train("diffusion", tmp_path, "--max-steps", "2", "--val-every", "2", "--val-images", "8")
    logged = next(json.loads(line) for line in (tmp_path / "state" / "log.jsonl").read_text().splitlines()
                  if "val_loss" in line)
    result = subprocess.run([sys.executable, "-m", "training.diffusion_val_loss", str(tmp_path / "ckpt"), "--data",
                             str(tmp_path / "data.npz"), "--val-images", "8", "--threads", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["steps"] == 2
    assert measured["val_loss"] == logged["val_loss"]
    assert measured["val_loss_unconditional"] == logged["val_loss_unconditional"]


def test_gan_export_re_estimates_batchnorm_statistics_on_the_generators_own_outputs():
    from generators.gan import GANConfig, Generator
    from training.train_gan import standing_statistics

    torch.manual_seed(0)
    generator = Generator(GANConfig(z_dim=8, g_channels=16)).eval()
    first_norm = generator.fc[1]
    first_norm.running_mean.fill_(5.0)  # what an EMA copy holds: statistics of other weights
    calibrated = standing_statistics(generator, batches=3, batch_size=32, seed=1)

    rng = torch.Generator().manual_seed(1)  # the same codes and digits, drawn the same way
    pre_norm = []
    for _ in range(3):
        z = torch.randn(32, 8, generator=rng)
        labels = torch.randint(0, 10, (32,), generator=rng)
        with torch.no_grad():
            pre_norm.append(generator.fc[0](torch.cat([z, generator.label_emb(labels)], dim=1)))
    expected_mean = torch.cat(pre_norm).mean(0)
    assert torch.allclose(calibrated.fc[1].running_mean, expected_mean, atol=1e-5)
    assert not calibrated.training and calibrated.fc[1].momentum == first_norm.momentum
    assert torch.all(first_norm.running_mean == 5.0)  # the EMA itself is left as it was
    assert all(torch.equal(a, b) for a, b in zip(calibrated.parameters(), generator.parameters()))


def test_mode_seeking_penalty_is_large_when_the_generator_ignores_its_code():
    from training.train_gan import mode_seeking_penalty

    z = torch.randn(8, 4)
    one_image_per_digit = torch.ones(4, 1, 28, 28).repeat(2, 1, 1, 1)
    varied = torch.rand(8, 1, 28, 28) * 2 - 1
    assert mode_seeking_penalty(one_image_per_digit, z) > 1e4
    assert mode_seeking_penalty(varied, z) < 10
    assert mode_seeking_penalty(varied, z) > mode_seeking_penalty(varied * 2, z)  # further apart, smaller
