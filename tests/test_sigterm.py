"""A SIGTERM to a test run tears its fixtures down (tests/conftest.py), as a started TorchServe needs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HELD_OPEN = '''
import time
from pathlib import Path
import pytest

@pytest.fixture
def resource(tmp_path_factory):
    marks = Path({marks!r})
    (marks / "started").touch()
    try:
        yield
    finally:
        (marks / "stopped").touch()

def test_waits(resource):
    time.sleep(60)
'''


def test_sigterm_runs_the_teardown_of_a_running_test(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "test_held_open.py").write_text(HELD_OPEN.format(marks=str(marks)))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                            str(tmp_path / "test_held_open.py")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / "started").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read() if run.stdout else ""
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=30)
    finally:
        run.kill()
    assert (marks / "stopped").exists(), output
    assert "KeyboardInterrupt" in output
