"""The README's figures are the measured ones: its tables are rendered from the committed JSON files."""
import shutil
import subprocess
import sys
from pathlib import Path

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
