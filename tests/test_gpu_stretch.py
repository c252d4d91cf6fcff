"""scripts/gpu_stretch.py on the CPU, in miniature: grow, probe, a timed annealed run, samples, parts, and back."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scripts.gpu_stretch import pack

from tests.synthetic import CIFAR_CLASSES, tiny_checkpoint, write_npz

ROOT = Path(__file__).resolve().parent.parent


def stretch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/gpu_stretch.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_a_timed_stretch_comes_back_as_parts_and_unpacks(tmp_path):
    start = tiny_checkpoint(tmp_path / "start", "diffusion")
    data = write_npz(tmp_path / "data.npz", (32, 32, 3), classes=CIFAR_CLASSES)
    common = ["run", "--data", str(data), "--start", str(start), "--grow", "2", "--work", str(tmp_path / "work"),
              "--batch-size", "4", "--probe-steps", "3", "--warmup-steps", "1", "--samples", "20",
              "--sample-batch-size", "10", "--device", "cpu", "--minutes", "0.7", "--sample-minutes", "0.3"]
    result = stretch(*common, "--out", str(tmp_path / "back"), "--part-mib", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted((tmp_path / "back").iterdir())
    assert 1 < len(parts) <= 8 and all(p.stat().st_size <= 0.5 * 2**20 for p in parts)

    collected = subprocess.run([sys.executable, "scripts/gpu_stretch.py", "collect", str(tmp_path / "back"),
                                "--into", str(tmp_path / "here")], cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
    assert collected.returncode == 0, collected.stderr
    config = json.loads((tmp_path / "here" / "out" / "config.json").read_text())
    assert config["unet"]["base_channels"] == 32  # the tiny checkpoint's 16, grown twice
    log = [json.loads(line) for line in (tmp_path / "here" / "state" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == config["training"]["steps"] >= 3
    if config["training"]["steps"] > 3 + 10:  # the timed second run fitted: it ends cooled down (lr 4e-4 / K)
        assert log[-1]["lr"] < 4e-4 / 4
    (progress,) = (tmp_path / "here" / "eval_progress").iterdir()
    batches = [load_file(p)["images"] for p in sorted(progress.glob("batch-*.safetensors"))]
    assert sum(len(b) for b in batches) == 20


def test_more_parts_than_the_machine_hands_back_are_refused_before_writing(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "blob").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with pytest.raises(SystemExit, match="does not fit 8 parts"):
        pack(tmp_path / "work", ["blob"], tmp_path / "out", part_mib=0.1, max_parts=8)
    assert not (tmp_path / "out").exists()
    pack(tmp_path / "work", ["blob"], tmp_path / "out", part_mib=0.2, max_parts=8)
    assert len(list((tmp_path / "out").iterdir())) == 6
