"""scripts/archive.py builds a complete archive and refuses checkpoints that cannot serve."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from generators.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from tests.synthetic import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def archive(checkpoint: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "archive.py"), str(checkpoint), "--version", "3.1",
                           "--model-store", str(store), *extra], capture_output=True, text=True, timeout=300)


def test_builds_a_versioned_archive_with_package_and_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "gan")
    result = archive(ckpt, tmp_path / "store")
    assert result.returncode == 0, result.stderr
    mar = tmp_path / "store" / "gan-3.1.mar"
    names = zipfile.ZipFile(mar).namelist()
    assert {"generators/pipelines.py", "checkpoint/model.safetensors", "checkpoint/config.json",
            "generator_handler.py", "gan.yaml"} <= set(names)
    manifest = json.loads(zipfile.ZipFile(mar).read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelName"] == "gan" and manifest["model"]["modelVersion"] == "3.1"
    assert not [p for p in (tmp_path / "store").iterdir() if p.name != "gan-3.1.mar"]  # no temp leftovers


@pytest.mark.parametrize("damage", ["corrupt weights", "missing config", "unknown type", "wrong shapes"])
def test_refuses_a_checkpoint_that_does_not_load(tmp_path, damage):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "gan")
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    if damage == "corrupt weights":
        data = bytearray((ckpt / WEIGHTS_NAME).read_bytes())
        data[-10:] = b"\x00" * 10
        (ckpt / WEIGHTS_NAME).write_bytes(bytes(data))
    elif damage == "missing config":
        (ckpt / CONFIG_NAME).unlink()
    elif damage == "unknown type":
        (ckpt / CONFIG_NAME).write_text(json.dumps(dict(config, model_type="vae")))
    else:
        (ckpt / CONFIG_NAME).write_text(json.dumps(dict(config, gan=dict(config["gan"], g_channels=32))))
    result = archive(ckpt, tmp_path / "store")
    assert result.returncode != 0 and "refusing" in result.stderr
    assert not (tmp_path / "store" / "gan-3.1.mar").exists()


def test_checkpoint_hash_is_checked(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "ebm")
    load_checkpoint(ckpt)
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    (ckpt / CONFIG_NAME).write_text(json.dumps(dict(config, weights_sha256="0" * 64)))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(ckpt)
