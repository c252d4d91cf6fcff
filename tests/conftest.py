"""Fixtures for the end-to-end tests: a real TorchServe with the three generator archives.

The `server` fixture (session scope) is `scripts.local_server.running_server`: it snapshots the
checkpoints, builds the archives with `scripts/archive.py`, starts TorchServe through a copy of
`scripts/serve.sh` on free ports, from a config derived from the repo's `config.properties` (same
security settings), waits until every worker is READY, and always stops that server (and only that
one). Tests that kill workers, swap versions or restart it leave it as they found it. Tests call
`running_server` themselves for other models or settings (e.g. a short token expiry). The names below
are re-exported for the tests.
"""
from __future__ import annotations

import signal
from typing import Iterator

import pytest

from scripts.local_server import (  # noqa: F401
    CHECKPOINTS, HTTP_TIMEOUT, MODELS, ROOT, STARTUP_TIMEOUT, VENV_BIN, VERSION, Server, build_archives,
    free_ports, run_archive, running_server, snapshot_and_build_archives, stop_server, wait_ready, write_config,
)


def stop_like_ctrl_c(signum: int, frame) -> None:
    """A SIGTERM (a CI time limit, a `kill`) unwinds the run like Ctrl-C, through every `finally` and fixture
    teardown, so no TorchServe the tests started outlives them; by default it would end pytest on the spot."""
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("torchserve"), via_serve_sh=True) as started:
        yield started
