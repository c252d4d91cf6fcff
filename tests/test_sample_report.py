"""scripts/sample_report.py keeps other models' timings only beside timings of the same machine."""
import json
import subprocess
import sys
from pathlib import Path

from tests.synthetic import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def report(checkpoints: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/sample_report.py", "--checkpoints", str(checkpoints),
                           "--out", str(out), "--threads", "1", "--only", "gan", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_only_refuses_to_mix_machines_and_grids_only_leaves_the_timings(tmp_path):
    tiny_checkpoint(tmp_path / "checkpoints" / "gan", "gan")
    out = tmp_path / "docs"
    first = report(tmp_path / "checkpoints", out)
    assert first.returncode == 0, first.stderr
    speed = out / "sampling_speed.json"
    timed = json.loads(speed.read_text())
    assert [case["model"] for case in timed["cases"]] == ["gan"] and (out / "samples" / "gan-random-digits.png").exists()

    again = report(tmp_path / "checkpoints", out)  # same machine: the rows are redone
    assert again.returncode == 0, again.stderr

    timed["machine"]["cpu"] = "another CPU"
    timed["cases"].append(dict(timed["cases"][0], model="diffusion", case="classes"))
    speed.write_text(json.dumps(timed))
    refused = report(tmp_path / "checkpoints", out)
    assert refused.returncode != 0 and "another machine (another CPU)" in refused.stderr
    (out / "samples" / "gan-random-digits.png").unlink()
    grids = report(tmp_path / "checkpoints", out, "--grids-only")
    assert grids.returncode == 0, grids.stderr
    assert json.loads(speed.read_text()) == timed and (out / "samples" / "gan-random-digits.png").exists()
