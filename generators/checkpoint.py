"""Served checkpoints: `model.safetensors` + `config.json` in one directory.

Weights are never unpickled. Both files are written to temporary names and
renamed into place, so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(directory: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Save served weights and their config; the config records the weights' sha256."""
    directory = Path(directory)
    weights = save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})
    atomic_write_bytes(directory / WEIGHTS_NAME, weights)
    config = dict(config, weights_sha256=hashlib.sha256(weights).hexdigest())
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, config) from a checkpoint directory, checking the weights' hash."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    weights = directory / WEIGHTS_NAME
    expected = config.get("weights_sha256")
    if expected is not None and file_sha256(weights) != expected:
        raise ValueError(f"{weights} does not match the sha256 recorded in {CONFIG_NAME}")
    return load_file(str(weights)), config


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
