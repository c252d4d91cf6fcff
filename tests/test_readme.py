"""The README's figures are the measured ones: its tables are rendered from the committed JSON files."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.readme_tables import machines_line

ROOT = Path(__file__).resolve().parent.parent


def check(readme: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/readme_tables.py", "--check", "--readme", str(readme)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_readme_tables_match_the_measurements():
    result = check(ROOT / "README.md")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_hand_edited_figure_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    text = readme.read_text()
    assert "| gan (served default) | " in text
    readme.write_text(text.replace("| gan (served default) | ", "| gan (served default) | 1", 1))  # steps x10+
    result = check(readme)
    assert result.returncode == 1 and "stale" in result.stderr


def test_machines_line_names_where_samples_measured_elsewhere_were_drawn(tmp_path):
    cpu = {"cpu_count": 2, "cpu": "Xeon", "gpu": None, "torch": "2"}
    gpu = {"cpu_count": 16, "cpu": "EPYC", "gpu": "H100", "torch": "2"}
    (tmp_path / "docs" / "quality").mkdir(parents=True)
    (tmp_path / "docs" / "quality" / "here.json").write_text(json.dumps({"machine": cpu, "sampling_machine": cpu}))
    (tmp_path / "docs" / "quality" / "there.json").write_text(json.dumps({"machine": cpu, "sampling_machine": gpu}))
    (tmp_path / "docs" / "quality" / "sweep.json").write_text(
        json.dumps({"machine": cpu, "results": [{"sampling_machine": gpu}, {"sampling_machine": None}]}))
    for name in ("sampling_speed.json", "benchmark.json"):
        (tmp_path / "docs" / name).write_text("{}")
    line = machines_line(tmp_path / "checkpoints", tmp_path / "docs")
    assert line == ("Measured on: 2-core Xeon, torch 2 (quality/here.json, quality/sweep.json, quality/there.json). "
                    "Samples drawn on: 16-core EPYC, H100, torch 2 (quality/sweep.json, quality/there.json).")
