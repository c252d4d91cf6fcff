"""A real TorchServe on free loopback ports, for the end-to-end tests and scripts/stress.py.

`running_server` snapshots the checkpoints, builds the archives with `scripts/archive.py`, starts
TorchServe in its own working directory from a config derived from the repo's `config.properties`
(same security settings), waits until every worker is READY, and always stops that server (and only
that one: its pid file lives under its own TEMP dir). With `via_serve_sh` it is started by a copy of
`scripts/serve.sh`, as `make serve` and the image start it, so `restart_server` goes through serve.sh's
restore of registered versions and defaults.
"""
from __future__ import annotations

import json
import os
import shutil
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


class ServerStartError(RuntimeError):
    """The archives could not be built or TorchServe did not come up; the message holds its logs."""


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
    launcher: subprocess.Popen | None = None  # serve.sh in the foreground, when started through it

    @property
    def key_file(self) -> Path:
        return self.root / "key_file.json"

    def key(self, kind: str) -> str:
        return json.loads(self.key_file.read_text())[kind]["key"]

    def client(self, timeout: float = HTTP_TIMEOUT, keep_alive: bool = False) -> TorchServeClient:
        return TorchServeClient(self.inference_url, self.management_url, self.key_file, timeout, keep_alive)

    def post_raw(self, model: str, data: bytes | str | None, content_type: str | None = "application/json",
                 token: str | None = "inference", path: str | None = None) -> requests.Response:
        """POST an arbitrary body to /predictions/<model> (or `path`); token is a key kind ('inference'),
        a literal 'Bearer ...' value, or None."""
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if token in ("inference", "management", "API"):
            headers["Authorization"] = f"Bearer {self.key(token)}"
        elif token:
            headers["Authorization"] = token
        return requests.post(f"{self.inference_url}{path or f'/predictions/{model}'}", data=data, headers=headers,
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
            raise ServerStartError(f"{CHECKPOINTS / m} has no checkpoint; train it first "
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
        raise ServerStartError("\n\n".join(failures))


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
            raise ServerStartError(f"TorchServe (pid {server.pid}) exited during startup\n--- ts_log.log\n"
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
    raise ServerStartError(f"workers of {sorted(pending)} not READY after {timeout:.0f} s ({last_error})\n"
                           f"--- logs/model_log.log\n{server.log_tail()}\n--- logs/ts_log.log\n"
                           f"{server.log_tail('ts_log.log', 30)}")


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
    launcher, server.launcher = server.launcher, None
    if launcher is not None:
        try:
            launcher.wait(timeout=60)  # serve.sh returns once TorchServe has stopped
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise AssertionError("scripts/serve.sh did not exit after torchserve --stop")
    if server.pid is None:
        return
    procs = [p for p in [_process(server.pid), *children] if p is not None]
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:  # only processes this server started
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


def start_server(server: Server, via_serve_sh: bool, launcher_argv: Sequence[str] | None = None) -> None:
    """Start TorchServe in server.root (config.properties and the archives already there) and wait for READY.

    Directly: `torchserve --start --ncs` with the archives of server.checkpoints. Through serve.sh: the copy
    in server.root/scripts (or `launcher_argv`, e.g. a container's command), in the foreground, which loads the
    three archives or restores the last snapshot. TorchServe's pid file is looked for under server.env's TEMP."""
    pid_file = Path(server.env.get("TEMP", server.root / "temp")) / ".model_server.pid"
    with open(server.root / "torchserve.out", "ab") as out:  # a file, never a pipe: java keeps it open
        if via_serve_sh:
            server.launcher = subprocess.Popen(list(launcher_argv or [str(server.root / "scripts" / "serve.sh")]),
                                               cwd=server.root, env=server.env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while not pid_file.exists() and server.launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            returncode = server.launcher.poll()
        else:
            returncode = subprocess.run(
                [str(VENV_BIN / "torchserve"), "--start", "--ncs", "--ts-config",
                 str(server.root / "config.properties"),
                 "--models", *[f"{m}={m}-{VERSION}.mar" for m in server.checkpoints]],
                cwd=server.root, env=server.env, stdout=out, stderr=subprocess.STDOUT, timeout=60).returncode
    if returncode not in (None, 0) or not pid_file.exists():
        raise ServerStartError(f"TorchServe did not start ({returncode}):\n"
                               f"{(server.root / 'torchserve.out').read_text(errors='replace')[-3000:]}")
    server.pid = int(pid_file.read_text().split()[0])
    wait_ready(server)


def restart_server(server: Server) -> None:
    """Stop the serve.sh-started server and start it again in the same directory (archives, logs kept)."""
    assert server.launcher is not None, "only a server started through serve.sh restores its models"
    stop_server(server)
    server.pid = None
    start_server(server, via_serve_sh=True)


@contextmanager
def running_server(root: Path, models: Sequence[str] = MODELS, settings: dict[str, str] | None = None,
                   via_serve_sh: bool = False) -> Iterator[Server]:
    """TorchServe in `root` serving `models`, with the repo's config.properties plus `settings`; always stopped.

    serve.sh always loads all three models, so `via_serve_sh` needs models=MODELS."""
    if via_serve_sh and tuple(models) != MODELS:
        raise ValueError(f"serve.sh serves {MODELS}, not {tuple(models)}")
    temp = root / "temp"
    temp.mkdir()
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    env = dict(os.environ)
    env.update(
        TEMP=str(temp), TMPDIR=str(temp), TMP=str(temp),  # tempfile.gettempdir() -> our own pid file
        LOG_LOCATION=str(root / "logs"), METRICS_LOCATION=str(root / "logs"),
        OMP_NUM_THREADS="1",  # 2 cores shared with training: one thread per worker
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VENV=str(VENV_BIN.parent),  # for serve.sh
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
    if via_serve_sh:
        (root / "scripts").mkdir()
        shutil.copy2(ROOT / "scripts" / "serve.sh", root / "scripts" / "serve.sh")
    try:  # from here on, always stop what was started
        start_server(server, via_serve_sh)
        yield server
    finally:
        stop_server(server)
