"""training/pack_data.py: an archive packed into parts and unpacked again holds the same arrays, and a missing or
altered part is named, never silently written."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import CIFAR_CLASSES, write_npz
from training.data import ImageDataset
from training.pack_data import check_tile, pack, unpack

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28)])
def test_round_trip_in_parts_gives_the_same_arrays(tmp_path, shape):
    source = write_npz(tmp_path / "data.npz", shape, n=50, classes=CIFAR_CLASSES)
    manifest = pack(source, tmp_path / "pack", part_mib=0.05, tile=7)  # 8 mosaics for 50 images, several parts
    assert len({f["part"] for e in manifest["arrays"].values() for f in e["files"]}) > 1
    assert (tmp_path / "pack" / "part-000" / "x_train-000000.webp").exists()
    unpack(tmp_path / "pack", tmp_path / "out.npz")
    with np.load(source) as original, np.load(tmp_path / "out.npz", allow_pickle=False) as rebuilt:
        assert sorted(original.files) == sorted(rebuilt.files)
        for key in original.files:
            assert original[key].dtype == rebuilt[key].dtype and np.array_equal(original[key], rebuilt[key]), key
    assert ImageDataset(tmp_path / "out.npz").class_names == CIFAR_CLASSES


def test_a_missing_or_altered_file_is_named_and_nothing_is_written(tmp_path):
    source = write_npz(tmp_path / "data.npz", (32, 32, 3), n=20)
    pack(source, tmp_path / "pack", part_mib=1, tile=10)
    mosaic = tmp_path / "pack" / "part-000" / "x_train-000010.webp"
    content = mosaic.read_bytes()
    mosaic.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    (tmp_path / "pack" / "part-000" / "y_test.npy").unlink()
    with pytest.raises(SystemExit) as error:
        unpack(tmp_path / "pack", tmp_path / "out.npz")
    assert "x_train-000010.webp altered" in str(error.value) and "y_test.npy missing" in str(error.value)
    assert not (tmp_path / "out.npz").exists()


def test_a_mosaic_over_the_part_size_is_refused(tmp_path):
    source = write_npz(tmp_path / "data.npz", (32, 32, 3), n=64)
    with pytest.raises(SystemExit, match="lower --tile"):
        pack(source, tmp_path / "pack", part_mib=0.01, tile=64)


def test_a_mosaic_wider_than_webp_allows_is_refused():
    check_tile(10000, (50000, 32, 32, 3), "x_train")  # 100 x 32 = 3200 pixels a side
    with pytest.raises(SystemExit, match="17536 pixels wide, over WebP's 16383"):
        check_tile(300000, (300000, 32, 32, 3), "x_train")  # 548 x 32 pixels a side


def test_command_line(tmp_path):
    source = write_npz(tmp_path / "data.npz", (32, 32, 3), n=12)
    run = [sys.executable, "-m", "training.pack_data"]
    subprocess.run([*run, "pack", "--data", str(source), "--out", str(tmp_path / "pack")], check=True, timeout=120, cwd=ROOT)
    result = subprocess.run([*run, "unpack", str(tmp_path / "pack"), "--out", str(tmp_path / "out.npz")],
                            check=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "every array's sha256 equals the original's" in result.stdout
