#!/usr/bin/env python3
"""Turn a checkpoint directory into a versioned TorchServe archive, optionally registering it live.

    python scripts/archive.py checkpoints/diffusion --version 1.1
    python scripts/archive.py checkpoints/diffusion --version 1.1 --register --set-default

The checkpoint is loaded and asked for one image first; one that fails is refused. The archive
is written under a temporary name in the model store and renamed into place, so a running
server never sees a half-written file. With --register the new version is added to a running
server through the management API (no restart), and --set-default routes traffic to it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint  # noqa: E402
from generators.params import validate  # noqa: E402
from generators.pipelines import lean_settings, load_pipeline  # noqa: E402
from scripts.serving_api import TorchServeClient, reports_failures  # noqa: E402

HANDLER = ROOT / "handlers" / "generator_handler.py"


def handler_settings(model_type: str) -> dict[str, bool]:
    """The lean-path settings handlers/model-config/<model_type>.yaml gives its handler (absent: off), so that
    in-process measurements sample as the served workers do."""
    config = yaml.safe_load((ROOT / "handlers" / "model-config" / f"{model_type}.yaml").read_text())
    return lean_settings(config.get("handler") or {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="directory with model.safetensors and config.json")
    p.add_argument("--version", required=True, help="model version, e.g. 1.0")
    p.add_argument("--model-name", help="default: the checkpoint's model_type (diffusion, ebm or gan)")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--model-config", type=Path, help="model-config.yaml (default: handlers/model-config/<type>.yaml)")
    p.add_argument("--register", action="store_true", help="register the archive on a running server")
    p.add_argument("--set-default", action="store_true", help="with --register: make this version the default")
    p.add_argument("--workers", type=int, default=1, help="with --register: initial workers")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key_file.json (in the server's working directory)")
    return p.parse_args(argv)


def archive_name(model_name: str, version: str) -> str:
    return f"{model_name}-{version}.mar"


def snapshot_checkpoint(source: Path, target: Path, attempts: int = 10) -> None:
    """Copy a checkpoint that a training run may be rewriting, retrying until weights and config agree.

    A save replaces the weights and then the config, so a reader can catch one without the other;
    load_checkpoint's sha256 check tells, and the copy is simply taken again.
    """
    for _ in range(attempts):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (source / name).exists():
                raise SystemExit(f"refusing {source}: no {name}")
            shutil.copy2(source / name, target / name)
        try:
            load_checkpoint(target)
            return
        except ValueError:
            time.sleep(1)
    raise SystemExit(f"refusing {source}: weights do not match the sha256 in its {CONFIG_NAME}")


def check_checkpoint(checkpoint: Path) -> str:
    """Load the checkpoint and sample one image with its defaults; returns its model_type."""
    try:
        pipeline = load_pipeline(checkpoint, "cpu")
        params = validate({"n_images": 1, "seed": 0}, pipeline.param_specs())
        image = pipeline.sample(params, torch.Generator().manual_seed(0))
    except Exception as error:
        raise SystemExit(f"refusing {checkpoint}: it does not load or sample ({type(error).__name__}: {error})")
    if image.ndim != 4 or image.shape[0] != 1 or not torch.isfinite(image).all():
        raise SystemExit(f"refusing {checkpoint}: sampling gave {tuple(image.shape)} with non-finite values")
    return pipeline.model_type


def build_archive(checkpoint: Path, version: str, model_store: Path, model_name: str | None = None,
                  model_config: Path | None = None) -> tuple[Path, str]:
    """Snapshot and check the checkpoint, then write <model_store>/<name>-<version>.mar atomically.

    Returns the archive's path and the model name it registers under.
    """
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_store, prefix=".building-") as tmp:
        stage = Path(tmp) / "stage"
        snapshot_checkpoint(checkpoint, stage / "checkpoint")
        model_type = check_checkpoint(stage / "checkpoint")
        model_name = model_name or model_type
        model_config = model_config or ROOT / "handlers" / "model-config" / f"{model_type}.yaml"
        target = model_store / archive_name(model_name, version)
        shutil.copytree(ROOT / "generators", stage / "generators", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([
            "torch-model-archiver", "--model-name", model_name, "--version", version, "--handler", str(HANDLER),
            "--extra-files", str(stage), "--config-file", str(model_config), "--export-path", tmp, "--force",
        ], check=True, env=_tool_env())
        (Path(tmp) / f"{model_name}.mar").replace(target)
    return target, model_name


def _tool_env() -> dict:
    """Find torch-model-archiver beside this interpreter even when the venv is not activated."""
    import os

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@reports_failures
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    target, model_name = build_archive(args.checkpoint, args.version, args.model_store, args.model_name, args.model_config)
    print(f"wrote {target}")
    if args.register:
        client = TorchServeClient(management_url=args.management_url, key_file=args.key_file)
        print(client.register(target.name, workers=args.workers)["status"])
        if args.set_default:
            print(client.set_default(model_name, args.version)["status"])


if __name__ == "__main__":
    sys.exit(main())
