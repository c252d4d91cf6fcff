"""Every script answers --help with its options."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "scripts/archive.py": "--register",
    "scripts/benchmark.py": "--trials",
    "scripts/nfe_curve.py": "--reference",
    "scripts/client.py": "generate",
    "scripts/openapi.py": "--check",
    "scripts/readme_tables.py": "--check",
    "scripts/sample_report.py": "--threads",
    "scripts/set_defaults.py": "NAME=VALUE",
    "scripts/gpu_stretch.py": "collect",
    "-m training.train_diffusion": "--resume",
    "-m training.train_ebm": "--init-from",
    "-m training.train_gan": "--max-minutes",
    "-m training.train_classifier": "--dataset",
    "-m training.evaluate": "--n-samples",
    "-m training.diffusion_val_loss": "--val-images",
    "-m training.fid_references": "--reference-size",
    "-m training.ebm_ood": "--set-default",
    "-m training.pack_data": "unpack",
    "-m training.grow_unet": "--factor",
    "-m training.sampling_levers": "--autoguide-with",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command):
    result = subprocess.run([sys.executable, *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert COMMANDS[command] in result.stdout
