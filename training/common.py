"""What the three training scripts share: options, resumable state, EMA, progress and logs."""
from __future__ import annotations

import argparse
import copy
import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from generators.checkpoint import atomic_write_bytes, load_checkpoint
from generators.imaging import save_grid

ROOT = Path(__file__).resolve().parent.parent


class TrainingParser(argparse.ArgumentParser):
    """Refuses option combinations that cannot work, before any data is loaded."""

    def parse_args(self, *args: Any, **kwargs: Any) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(*args, **kwargs)
        if parsed.cooldown_steps and parsed.max_steps is None:
            self.error("--cooldown-steps needs --max-steps (the step the lr reaches 0 at)")
        return parsed


def base_parser(description: str, model: str, dataset: str, **defaults: Any) -> argparse.ArgumentParser:
    """Options every training script takes; `defaults` overrides per-script values."""
    from training.data import DEFAULT_PATHS

    p = TrainingParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_PATHS[dataset], help="Keras-layout .npz archive")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints" / model, help="served checkpoint directory")
    p.add_argument("--state-dir", type=Path, default=ROOT / "runs" / model,
                   help="full training state, samples and log (git-ignored)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --state-dir, or warm-start from --out's weights if no state is there")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly and save after this long")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this total step count")
    p.add_argument("--batch-size", type=int, default=defaults.pop("batch_size", 64))
    p.add_argument("--lr", type=float, default=defaults.pop("lr", 2e-4))
    p.add_argument("--warmup-steps", type=int, default=defaults.pop("warmup_steps", 0),
                   help="linear lr warm-up from where the optimizer started (also after a warm start); 0: none")
    p.add_argument("--cooldown-steps", type=int, default=0,
                   help="with --max-steps: decay the lr linearly to 0 over this many last steps (a run resumed "
                        "later with a higher --max-steps goes back to the full lr)")
    p.add_argument("--ema-decay", type=float, default=defaults.pop("ema_decay", 0.999))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=defaults.pop("sample_every", 1000))
    p.add_argument("--save-every", type=int, default=defaults.pop("save_every", 500))
    if defaults:
        raise TypeError(f"unknown defaults {sorted(defaults)}")
    return p


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    The decay warms up as min(decay, (1 + step) / (10 + step)), so early in a short run the
    average is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # one multi-tensor kernel per list: on a GPU, a loop of per-tensor ops costs a launch per tensor
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class TrainingRun:
    """Step counting, deadline, progress bar, JSONL log and atomic save/resume of full training state.

    `objects` maps names to things with state_dict/load_state_dict (models, optimizers, EMA).
    """

    STATE_NAME = "state.pt"

    def __init__(self, args: argparse.Namespace, objects: dict[str, Any]):
        self.args = args
        self.objects = objects
        self.state_dir: Path = args.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.optimizer_start = 0  # the step this run's optimizer state began at (a warm start's step)
        self.started = time.monotonic()
        self.generator = torch.Generator().manual_seed(args.seed)
        self._bar: tqdm | None = None
        self._last_time = time.monotonic()
        self._last_step = 0
        self._stop_requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        """Ctrl-C or kill: finish the current step, then save as at --max-minutes."""
        self._stop_requested = True

    # ---- state
    def save_state(self) -> None:
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state.update(step=self.step, optimizer_start=self.optimizer_start, torch_rng=torch.get_rng_state(),
                     data_rng=self.generator.get_state())
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.state_dir / self.STATE_NAME, buffer.getvalue())

    def try_resume(self) -> bool:
        """Load full training state if present; returns False when there is none."""
        path = self.state_dir / self.STATE_NAME
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        self.step = int(state["step"])
        self.optimizer_start = int(state.get("optimizer_start", 0))
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["data_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._last_step = self.step
        return True

    def resume(self, served_dir: Path, served_modules: list[Any]) -> bool:
        """--resume: the full state from --state-dir; failing that, warm-start `served_modules` from the
        served weights in `served_dir` (what survives when the git-ignored state is lost).
        Returns True for a warm start, whose other modules (optimizers, a GAN's discriminator) start fresh."""
        if self.try_resume() or not checkpoint_exists(served_dir):
            return False
        weights, config = load_checkpoint(served_dir)
        for module in served_modules:
            module.load_state_dict(weights)
        self.step = self.optimizer_start = int(config["training"]["steps"])
        self._last_step = self.step
        print(f"no training state in {self.state_dir}: warm start from {served_dir} at step {self.step}")
        return True

    # ---- loop control
    def done(self) -> bool:
        if self._stop_requested:
            return True
        if self.args.max_steps is not None and self.step >= self.args.max_steps:
            return True
        if self.args.max_minutes is not None and time.monotonic() - self.started > 60 * self.args.max_minutes:
            return True
        return False

    def progress(self, **metrics: float | torch.Tensor) -> None:
        """Advance one step; update the bar, and every log_every steps append a log line. Metrics may be
        tensors on the training device: they are read (a device sync) only at those log steps."""
        if self._bar is None:
            self._bar = tqdm(initial=self.step, total=self.args.max_steps, dynamic_ncols=True, mininterval=5)
        self.step += 1
        self._bar.update(1)
        if self.step % self.args.log_every == 0:
            now = time.monotonic()
            rate = (self.step - self._last_step) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_step = now, self.step
            values = {k: float(v) for k, v in metrics.items()}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            self.log(steps_per_hour=round(3600 * rate), **values)

    def log(self, **metrics: float) -> None:
        """Append one JSON line, stamped with the current step, to log.jsonl."""
        record = {"step": self.step, **{k: round(float(v), 5) for k, v in metrics.items()}}
        with open(self.state_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def due(self, every: int) -> bool:
        return self.step % every == 0

    def save_samples(self, images: torch.Tensor, columns: int | None = None) -> Path:
        path = self.state_dir / "samples" / f"step_{self.step:07d}.png"
        save_grid(images, path, columns)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_eval_device(requested: str | None) -> torch.device:
    """pick_device for measurements: on a GPU, convolutions and matmuls stay in full fp32 (PyTorch lets cuDNN use
    TF32 by default), so sampled images and Inception features match the CPU's up to float rounding."""
    device = pick_device(requested)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest kernels; TF32 matmuls as for convs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                  max_norm: float | None) -> torch.Tensor:
    """Backward, clip, step; returns the gradient norm before clipping as a tensor, so that a GPU run is not
    made to wait for it at every step (TrainingRun.progress reads it only when it logs)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm else float("inf"))
    optimizer.step()
    return norm.detach()


def learning_rate(args: argparse.Namespace, step: int, optimizer_start: int = 0) -> float:
    """The lr of update `step` (0-based): linear warm-up from `optimizer_start` (where a fresh optimizer began,
    also after a warm start from served weights), constant, then an optional linear cooldown before
    --max-steps. Decaying only at the end lets a run be extended session by session and still end annealed."""
    factor = min(1.0, (step + 1 - optimizer_start) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.cooldown_steps:
        factor = min(factor, (args.max_steps - step) / args.cooldown_steps)
    return args.lr * factor


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def stamp(config: dict, run: TrainingRun, data_sha256: str, **extra: Any) -> dict:
    """Add the training provenance every served config carries."""
    return dict(config, training=dict(steps=run.step, data_sha256=data_sha256, batch_size=run.args.batch_size,
                                      lr=run.args.lr, seed=run.args.seed, **extra))


def checkpoint_exists(path: Path) -> bool:
    return (Path(path) / "model.safetensors").exists() and (Path(path) / "config.json").exists()


