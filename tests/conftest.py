"""Fixtures for the end-to-end tests: a real TorchServe with the three generator archives.

The `server` fixture (session scope) snapshots the checkpoints, builds the archives with
`scripts/archive.py`, starts TorchServe on free ports from a config derived from the repo's
`config.properties` (same security settings), waits until every worker is READY, and always
stops that server (and only that one: its pid file lives under a per-session TEMP dir).
`running_server` does the same for other models or settings (e.g. a short token expiry).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import psutil
import pytest
import requests

from scripts.archive import snapshot_checkpoint
from scripts.serving_api import TorchServeClient

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("diffusion", "ebm", "gan")
VERSION = "1.0"
# Where the served checkpoints are read from; only for local debugging, the suite is meant to
# run on the repo's checkpoints/<model>.
CHECKPOINTS = Path(os.environ.get("SERVING_TEST_CHECKPOINTS", ROOT / "checkpoints"))
HTTP_TIMEOUT = 120  # seconds, for every HTTP call the tests make
STARTUP_TIMEOUT = 180
VENV_BIN = Path(sys.executable).parent


@dataclass
class Server:
    root: Path  # TorchServe's working directory: key_file.json, logs/, model store
    model_store: Path
    inference_url: str
    management_url: str
    metrics_url: str
    env: dict[str, str]
    checkpoints: dict[str, Path]  # consistent snapshots of checkpoints/<model>, one per served model
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # their config.json
    pid: int | None = None
    token_auth: bool = True  # TorchServe writes key_file.json only with token authorization on

    @property
    def key_file(self) -> Path:
        return self.root / "key_file.json"

    def key(self, kind: str) -> str:
        return json.loads(self.key_file.read_text())[kind]["key"]

    def client(self) -> TorchServeClient:
        return TorchServeClient(self.inference_url, self.management_url, self.key_file, timeout=HTTP_TIMEOUT)

    def post_raw(self, model: str, data: bytes | str | None, content_type: str | None = "application/json",
                 token: str | None = "inference") -> requests.Response:
        """POST an arbitrary body; token is a key kind ('inference'), a literal 'Bearer ...' value, or None."""
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if token in ("inference", "management", "API"):
            headers["Authorization"] = f"Bearer {self.key(token)}"
        elif token:
            headers["Authorization"] = token
        return requests.post(f"{self.inference_url}/predictions/{model}", data=data, headers=headers,
                             timeout=HTTP_TIMEOUT)

    def log_tail(self, name: str = "model_log.log", lines: int = 80) -> str:
        path = self.root / "logs" / name
        if not path.exists():
            return f"({path} does not exist)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def workers(self, model: str, version: str | None = None) -> list[dict]:
        return self.client().describe(model, version)[0]["workers"]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_config(path: Path, overrides: dict[str, str]) -> None:
    """The repo's config.properties with `overrides` applied; every other line (security settings) kept."""
    lines, seen = [], set()
    for line in (ROOT / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in overrides:
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    path.write_text("\n".join(lines) + "\n")


def run_archive(checkpoint: Path, version: str, model_store: Path, *extra: str,
                timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "archive.py"), str(checkpoint), "--version", version,
         "--model-store", str(model_store), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def snapshot_and_build_archives(server: Server) -> None:
    """Snapshots of checkpoints/<model> at server.checkpoints, and their archives in server.model_store."""
    server.model_store.mkdir()
    for m, snapshot in server.checkpoints.items():
        if not (CHECKPOINTS / m / "config.json").exists():
            pytest.fail(f"{CHECKPOINTS / m} has no checkpoint; train it first "
                        f"(or set SERVING_TEST_CHECKPOINTS for a local debug run)")
        # A frozen copy: the archives and the metadata checks must see the same weights, even while
        # a training run keeps saving into checkpoints/.
        snapshot_checkpoint(CHECKPOINTS / m, snapshot)
        server.configs[m] = json.loads((snapshot / "config.json").read_text())
    build_archives(server)


def build_archives(server: Server) -> None:
    """archive.py for the served checkpoints, concurrently (each mostly waits on imports)."""
    procs = {
        m: subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "archive.py"), str(checkpoint), "--version", VERSION,
             "--model-store", str(server.model_store)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for m, checkpoint in server.checkpoints.items()
    }
    failures = []
    for m, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or not (server.model_store / f"{m}-{VERSION}.mar").exists():
            failures.append(f"archive.py {m} -> {proc.returncode}:\n{out[-3000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_ready(server: Server, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    pending: set[str] = set(server.checkpoints)
    last_error = ""
    while time.monotonic() < deadline:
        if server.pid is not None and not _alive(server.pid):
            pytest.fail(f"TorchServe (pid {server.pid}) exited during startup\n--- ts_log.log\n"
                        f"{server.log_tail('ts_log.log')}\n--- torchserve.out\n"
                        f"{(server.root / 'torchserve.out').read_text(errors='replace')[-3000:]}")
        if server.key_file.exists() or not server.token_auth:
            for m in sorted(pending):
                try:
                    workers = server.workers(m)
                except Exception as error:  # not up yet, or the model is not registered yet
                    last_error = f"{m}: {error}"
                    continue
                if workers and all(w["status"] == "READY" for w in workers):
                    pending.discard(m)
            if not pending:
                return
        time.sleep(1)
    pytest.fail(f"workers of {sorted(pending)} not READY after {timeout:.0f} s ({last_error})\n"
                f"--- logs/model_log.log\n{server.log_tail()}\n--- logs/ts_log.log\n{server.log_tail('ts_log.log', 30)}")


def stop_server(server: Server) -> None:
    """`torchserve --stop` with the start's cwd and env (its TEMP holds our pid file), then make sure."""
    children = []
    if server.pid is not None:
        try:
            children = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    subprocess.run([str(VENV_BIN / "torchserve"), "--stop"], cwd=server.root, env=server.env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if server.pid is None:
        return
    procs = [p for p in [_process(server.pid), *children] if p is not None]
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:  # only processes this fixture started
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    assert not _alive(server.pid), f"TorchServe java process {server.pid} survived torchserve --stop"
    assert not alive, f"processes survived torchserve --stop and had to be killed: {[p.pid for p in alive]}"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@contextmanager
def running_server(root: Path, models: Sequence[str] = MODELS, settings: dict[str, str] | None = None
                   ) -> Iterator[Server]:
    """TorchServe in `root` serving `models`, with the repo's config.properties plus `settings`; always stopped."""
    temp = root / "temp"
    temp.mkdir()
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    env = dict(os.environ)
    env.update(
        TEMP=str(temp), TMPDIR=str(temp), TMP=str(temp),  # tempfile.gettempdir() -> our own pid file
        LOG_LOCATION=str(root / "logs"), METRICS_LOCATION=str(root / "logs"),
        OMP_NUM_THREADS="1",  # 2 cores shared with training: one thread per worker
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    server = Server(
        root=root, model_store=root / "model_store",
        inference_url=f"http://127.0.0.1:{inference}", management_url=f"http://127.0.0.1:{management}",
        metrics_url=f"http://127.0.0.1:{metrics}", env=env,
        checkpoints={m: root / "checkpoints" / m for m in models},
    )
    snapshot_and_build_archives(server)
    write_config(root / "config.properties", {
        "inference_address": server.inference_url,
        "management_address": server.management_url,
        "metrics_address": server.metrics_url,
        "grpc_inference_port": str(grpc_inference),
        "grpc_management_port": str(grpc_management),
        "model_store": str(server.model_store),
        **(settings or {}),
    })

    started = False
    try:
        started = True  # from here on, always run torchserve --stop
        with open(root / "torchserve.out", "wb") as out:  # a file, never a pipe: java keeps it open
            start = subprocess.run(
                [str(VENV_BIN / "torchserve"), "--start", "--ncs", "--ts-config", str(root / "config.properties"),
                 "--models", *[f"{m}={m}-{VERSION}.mar" for m in models]],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        pid_file = temp / ".model_server.pid"
        if start.returncode != 0 or not pid_file.exists():
            pytest.fail(f"torchserve --start -> {start.returncode}:\n{(root / 'torchserve.out').read_text()}")
        server.pid = int(pid_file.read_text().split()[0])
        wait_ready(server)
        yield server
    finally:
        if started:
            stop_server(server)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("torchserve")) as started:
        yield started
