#!/usr/bin/env python3
"""Serving benchmark: the sampler in-process, the same sampler through TorchServe, and the seed's way, in one run.

    python scripts/benchmark.py                  # every cell at full size -> docs/benchmark.json, docs/benchmark.png
    python scripts/benchmark.py --tiny --out /tmp/benchmark.json --plot /tmp/benchmark.png   # a check in seconds

Options (defaults in brackets):
  --models M ...            models to measure [diffusion ebm gan]
  --concurrencies C ...     client threads, each sending its next request when the last is answered [1 4 8 16]
  --workers W ...           TorchServe workers per model; each gets cores // W torch threads (at least 1) [1 2]
  --batching off|on ...     off: batchSize 1; on: the batchSize of handlers/model-config/<model>.yaml [off on]
  --cpu-launcher off|on ... on: a second TorchServe with cpu_launcher_enable=true, which starts each worker through
                            torch.backends.xeon.run_cpu pinned to cores // W cores of its own [off]
  --requests N              measured requests per cell [64]
  --max-seconds S           per cell, no new request after S seconds (0: none) [120]
  --n-images N              images per request [1]
  --request MODEL=JSON      more request parameters for a model, e.g. diffusion='{"steps": 2}' [served defaults]
  --raw-batches B ...       batch sizes of the in-process measurement [1 2 4 8 16]
  --raw-seconds S           least timed seconds per raw batch [3]
  --trials T ...            lean-path settings tried in-process at raw's best batch against the served ones:
                            channels_last (the other memory format), torch_compile [channels_last torch_compile]
  --baseline-steps N ...    DDPM steps of the seed's way for diffusion; none to skip [1000 200]
  --baseline-requests N     requests per baseline step count [3]
  --request-timeout S       client timeout per request [1300]
  --out PATH                the JSON [docs/benchmark.json]
  --plot PATH               the PNG [docs/benchmark.png]
  --work-dir DIR            keep the server's directory (archives, logs) there instead of a deleted temp dir
  --tiny                    preset for the test: gan and diffusion (2 steps), concurrency 1 and 2, 1 worker,
                            4 requests per cell, raw batches 1 and 2, a 3-step baseline; explicit options win

What is measured, in this order, on snapshots of checkpoints/<model> (the same weights throughout):
  raw       pipeline.sample in this process with as many torch threads as cores and the handler settings of
            handlers/model-config/<model>.yaml (channels_last, torch_compile), at each raw batch (images per
            call): images/s; the best batch is the physical limit the served figures are compared with.
            Each --trials entry flips one of those settings at the best batch: its images/s, its ratio to the
            served setting, and the seconds of its first call (torch_compile compiles then).
  served    TorchServe on free loopback ports (scripts/local_server.py's running_server). For each model and worker
            count the checkpoint is archived with its yaml plus `handler: {torch_threads: cores // workers}`,
            so workers x threads never exceeds the cores. For each batching mode that archive is registered
            over the management API with initial_workers=0 and batch_size (1, or the yaml's batchSize) and the
            yaml's max_batch_delay, then scaled up one worker at a time. Cold start is the time from each
            scale-up call until GET /models lists the new worker as READY (process start, imports, model load).
            After a warm-up of 2 requests per worker, each concurrency is one cell: images/s over the cell's
            wall time, latency p50/p95 of the answered requests, and each worker's peak RSS (psutil, sampled
            every 0.1 s). The archive is unregistered before the next.
  baseline  the seed's way: one diffusion request at a time, 1-image ancestral DDPM at --baseline-steps, on the
            1-worker, batching-off registration.
  launcher  with --cpu-launcher ... on, every served cell again on a TorchServe whose workers the CPU launcher pins
            (rank r of W on cores r*cores/W ..): TorchServe then restarts all of a model's workers on each scale call
            to re-pin them, so the n-th worker's cold start includes restarting the others.
Ratios are stored beside the absolute figures: each cell against raw at the same batch (the images one worker
samples per call: n_images x min(batch size, concurrency / workers)) and at the best batch, batching on against
off, and the served default against the baseline; `targets` checks the performance issue's goals on this run.
The 1-minute load average is recorded before and after; above 0.5 the script warns that other work is running
and its figures are not the machine's; it warns too when OMP_WAIT_POLICY=PASSIVE is set (threads that sleep between
operations: half the 2-thread images/s here). It prints the figures as a markdown table at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import requests
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from generators.params import InvalidParameter, validate  # noqa: E402
from generators.pipelines import LEAN_SETTINGS, MAX_IMAGES, load_pipeline  # noqa: E402
from scripts.archive import build_archive, handler_settings, snapshot_checkpoint  # noqa: E402
from scripts.charts import axes, dashed  # noqa: E402
from scripts.load import ClosedLoop  # noqa: E402
from scripts.serving_api import ServerError, ServingFailure, reports_failures  # noqa: E402
from scripts.local_server import (  # noqa: E402
    CHECKPOINTS, HTTP_TIMEOUT, MODELS, STARTUP_TIMEOUT, VERSION, Server, running_server,
)
from training.evaluate import describe_sampling, machine, markdown_table  # noqa: E402

QUIET_LOAD = 0.5  # a 1-minute load average above this means other work shares the cores
THREADING_ENV = ("OMP_", "MKL_", "KMP_")  # variables that change how torch threads wait and spin; the servers inherit them
RSS_INTERVAL_S = 0.1
TINY = {"models": ["gan", "diffusion"], "concurrencies": [1, 2], "workers": [1], "requests": 4, "max_seconds": 0,
        "raw_batches": [1, 2], "raw_seconds": 0.2, "baseline_steps": [3], "baseline_requests": 1,
        "trials": ["channels_last"]}
TINY_BODIES = {"diffusion": {"steps": 2}}  # --tiny's request parameters, under any --request
# The goals, checked on each run's own figures.
MIN_SERVED_TO_RAW = 0.9
MIN_BATCHING_GAIN, BATCHING_CONCURRENCY = 3.0, 8
MAX_P95_S = 1.0
MAX_COLD_START_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--concurrencies", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batching", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--cpu-launcher", nargs="+", choices=("off", "on"), default=["off"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--n-images", type=int, default=1)
    p.add_argument("--request", action="append", default=[], metavar="MODEL=JSON")
    p.add_argument("--raw-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--raw-seconds", type=float, default=3)
    p.add_argument("--trials", nargs="*", choices=LEAN_SETTINGS, default=list(LEAN_SETTINGS))
    p.add_argument("--baseline-steps", nargs="*", type=int, default=[1000, 200])
    p.add_argument("--baseline-requests", type=int, default=3)
    p.add_argument("--request-timeout", type=float, default=1300)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmark.png")
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--tiny", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset, _ = parser.parse_known_args(argv)
    if preset.tiny:
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    positive = {"--concurrencies": args.concurrencies, "--workers": args.workers, "--requests": [args.requests],
                "--n-images": [args.n_images], "--raw-batches": args.raw_batches,
                "--baseline-requests": [args.baseline_requests]}
    for option, values in positive.items():
        if min(values) < 1:
            parser.error(f"{option}: must be at least 1, got {min(values)}")
    if max(args.raw_batches) > MAX_IMAGES:
        parser.error(f"--raw-batches: at most {MAX_IMAGES} images per call, got {max(args.raw_batches)}")
    args.bodies = {m: dict(TINY_BODIES.get(m, {})) if args.tiny else {} for m in args.models}
    for item in args.request:
        model, _, text = item.partition("=")
        if model not in args.bodies:
            parser.error(f"--request {item!r}: MODEL must be one of --models {args.models}")
        try:
            extra = json.loads(text)
        except ValueError as error:
            parser.error(f"--request {item!r}: not JSON ({error})")
        if not isinstance(extra, dict):
            parser.error(f"--request {item!r}: must be a JSON object")
        args.bodies[model].update(extra)
    return args


# ---------------------------------------------------------------- raw: the sampler in this process


def time_sampling(pipeline, params: dict[str, Any], min_seconds: float) -> tuple[int, float, float]:
    """(calls, seconds, first call's seconds) of pipeline.sample: one untimed call, then repeated until
    min_seconds have passed."""
    start = time.perf_counter()
    pipeline.sample(params, torch.Generator().manual_seed(0))
    first = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        calls += 1
        pipeline.sample(params, torch.Generator().manual_seed(calls))
    return calls, time.perf_counter() - start, first


def raw_rows(pipeline, body: dict[str, Any], batches: list[int], min_seconds: float) -> list[dict[str, Any]]:
    """Images/s of the sampler at each batch, with the request's parameters validated as the handler does."""
    rows = []
    for batch in batches:
        params = validate(dict(body, n_images=batch, seed=0), pipeline.param_specs())
        pipeline.check_work(params)
        calls, seconds, first = time_sampling(pipeline, params, min_seconds)
        rows.append({"batch": batch, "calls": calls, "images": calls * batch, "seconds": round(seconds, 6),
                     "images_per_s": round(calls * batch / seconds, 3), "first_call_s": round(first, 3)})
    return rows


def measure_raw(checkpoint: Path, model: str, body: dict[str, Any], batches: list[int], min_seconds: float,
                threads: int, trials: list[str]) -> dict[str, Any]:
    """Raw images/s at each batch with the served settings, then each trial (one setting flipped) at the best."""
    torch.set_num_threads(threads)
    settings = handler_settings(model)
    pipeline = load_pipeline(checkpoint, "cpu", **settings)
    rows = raw_rows(pipeline, body, batches, min_seconds)
    best = max(rows, key=lambda row: row["images_per_s"])
    result = {"threads": threads, "weights_sha256": pipeline.config.get("weights_sha256"), "settings": settings,
              "sampling": sampling_of(validate(dict(body), pipeline.param_specs())), "batches": rows,
              "best_batch": best["batch"], "best_images_per_s": best["images_per_s"], "trials": []}
    for name in trials:
        flipped = dict(settings, **{name: not settings[name]})
        trial = {"settings": flipped, "batch": best["batch"]}
        try:
            row = raw_rows(load_pipeline(checkpoint, "cpu", **flipped), body, [best["batch"]], min_seconds)[0]
        except Exception as error:  # a setting this model cannot run with is a finding, not a failed benchmark
            trial["error"] = f"{type(error).__name__}: {error}"[:500]
        else:
            trial.update(images_per_s=row["images_per_s"], first_call_s=row["first_call_s"],
                         ratio_to_served_setting=ratio(row["images_per_s"], best["images_per_s"]))
        result["trials"].append(trial)
    return result


def sampling_of(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("n_images", "seed", "format")}


# ---------------------------------------------------------------- served: TorchServe's management side


def archive_with_threads(server: Server, checkpoint: Path, model: str, threads: int, configs: Path) -> tuple[str, str]:
    """(archive file, model name) of the checkpoint with its yaml plus handler.torch_threads, in the model store.
    Without minWorkers, so that registering with initial_workers=0 starts no worker and scale_up times every
    worker's start (TorchServe 0.12 starts a yaml's minWorkers, which it raises to at least 1)."""
    config = yaml.safe_load((ROOT / "handlers" / "model-config" / f"{model}.yaml").read_text())
    config.setdefault("handler", {})["torch_threads"] = threads
    config.pop("minWorkers", None)
    path = configs / f"{model}-t{threads}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    archive, name = build_archive(checkpoint, VERSION, server.model_store, f"{model}_t{threads}", path)
    return archive.name, name


@contextmanager
def registered(server: Server, archive: str, name: str, batch_size: int, max_batch_delay: int) -> Iterator[dict]:
    """The archive registered with no worker and these batch settings; yields its description; always removed."""
    response = requests.post(f"{server.management_url}/models", timeout=HTTP_TIMEOUT,
                             headers={"Authorization": f"Bearer {server.key('management')}"},
                             params={"url": archive, "initial_workers": 0, "batch_size": batch_size,
                                     "max_batch_delay": max_batch_delay, "synchronous": "true"})
    if not response.ok:
        raise ServerError(response)
    client = server.client()
    try:
        described = client.describe(name, VERSION)[0]
        if described["workers"]:
            raise ServingFailure(f"{name}: registered with {len(described['workers'])} worker(s), expected none")
        yield described
    finally:
        client.scale(name, 0, VERSION)
        client.unregister(name, VERSION)


def scale_up(server: Server, name: str, workers: int) -> list[float]:
    """Scale from 0 to `workers` one worker at a time: seconds from each scale call until the new worker is READY."""
    client = server.client()
    seconds = []
    for count in range(1, workers + 1):
        start = time.perf_counter()
        client.scale(name, count, VERSION)
        while not ready(server, name, count):
            if time.perf_counter() - start > STARTUP_TIMEOUT:
                raise ServingFailure(f"{name}: worker {count} not READY after {STARTUP_TIMEOUT} s; see "
                                     f"{server.root / 'logs' / 'model_log.log'} (--work-dir keeps it)")
            time.sleep(0.05)
        seconds.append(round(time.perf_counter() - start, 3))
    return seconds


def ready(server: Server, name: str, count: int) -> bool:
    workers = server.workers(name, VERSION)
    return len(workers) == count and all(w["status"] == "READY" for w in workers)


def worker_pids(server: Server, name: str) -> list[int]:
    return [int(w["pid"]) for w in sorted(server.workers(name, VERSION), key=lambda w: w["id"])]


# ---------------------------------------------------------------- served: load and its measurements


class PeakRss:
    """Each process's peak resident memory while the `with` block runs, sampled every RSS_INTERVAL_S."""

    def __init__(self, pids: list[int]):
        self.peaks = {pid: 0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        processes = [psutil.Process(pid) for pid in self.peaks]
        while True:
            for process in processes:
                try:
                    self.peaks[process.pid] = max(self.peaks[process.pid], process.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def megabytes(self) -> list[float]:
        return [round(rss / 2**20, 1) for rss in self.peaks.values()]


def measure_load(server: Server, name: str, body: dict[str, Any], concurrency: int, total: int, max_seconds: float,
                 timeout: float) -> dict[str, Any]:
    """One cell: images/s, latency percentiles and each worker's peak RSS under a closed loop of requests."""
    pids = worker_pids(server, name)
    cpus = [sorted(psutil.Process(pid).cpu_affinity()) for pid in pids]  # set at worker start
    with PeakRss(pids) as rss:
        answers = ClosedLoop(lambda: server.client(timeout, keep_alive=True), [(name, body)], concurrency, total,
                             max_seconds, VERSION).wait()
    answered = [a for a in answers if a.status == 200]
    latencies = [a.ended - a.started for a in answered]
    seconds = max(a.ended for a in answers) - min(a.started for a in answers)
    images = len(answered) * body["n_images"]
    return {"concurrency": concurrency, "requests": len(answers), "failures": len(answers) - len(answered),
            "images": images, "seconds": round(seconds, 6), "images_per_s": round(images / seconds, 3),
            **{f"latency_{name}_s": round(float(np.percentile(latencies, q)), 4) if latencies else None
               for name, q in (("p50", 50), ("p95", 95), ("max", 100))},
            "peak_rss_mb": rss.megabytes(), "workers_replaced": worker_pids(server, name) != pids, "worker_cpus": cpus}


def measure_served(server: Server, checkpoints: dict[str, Path], args: argparse.Namespace, cores: int,
                   launcher: str) -> tuple[list[dict], list[dict]]:
    """(cells, baseline rows): every model x workers x batching registration, each at every concurrency; the
    baseline only without the CPU launcher."""
    cells: list[dict] = []
    baseline: list[dict] = []
    archives: dict[tuple[str, int], tuple[str, str]] = {}
    for model in args.models:
        settings = yaml.safe_load((ROOT / "handlers" / "model-config" / f"{model}.yaml").read_text())
        body = dict(args.bodies[model], n_images=args.n_images)
        for workers in args.workers:
            threads = max(1, cores // workers)
            if (model, threads) not in archives:
                archives[model, threads] = archive_with_threads(server, checkpoints[model], model, threads,
                                                                server.root / "bench-configs")
            archive, name = archives[model, threads]
            for batching in args.batching:
                batch_size = settings["batchSize"] if batching == "on" else 1
                with registered(server, archive, name, batch_size, settings["maxBatchDelay"]) as described:
                    cold_start = scale_up(server, name, workers)
                    ClosedLoop(lambda: server.client(args.request_timeout, keep_alive=True), [(name, body)],
                               workers, 2 * workers, version=VERSION).wait()  # warm-up
                    group = {"model": model, "workers": workers, "threads_per_worker": threads,
                             "cpu_launcher": launcher, "batching": batching, "batch_size": described["batchSize"],
                             "max_batch_delay_ms": described["maxBatchDelay"], "n_images": args.n_images,
                             "cold_start_s": cold_start}
                    for concurrency in args.concurrencies:
                        cell = dict(group, **measure_load(server, name, body, concurrency, args.requests,
                                                          args.max_seconds, args.request_timeout))
                        cells.append(cell)
                        print(f"served {cell_label(cell)}: {cell['images_per_s']} images/s, p50 "
                              f"{cell['latency_p50_s']} s, p95 {cell['latency_p95_s']} s, "
                              f"{cell['failures']} failed", flush=True)
                    if model == "diffusion" and workers == 1 and batching == "off" and launcher == "off":
                        baseline = measure_baseline(server, name, body, threads, args)
    return cells, baseline


def measure_baseline(server: Server, name: str, body: dict[str, Any], threads: int,
                     args: argparse.Namespace) -> list[dict]:
    """The seed's way: one 1-image ancestral DDPM request at a time, at each of --baseline-steps."""
    rows = []
    for steps in args.baseline_steps:
        ddpm = dict(body, n_images=1, sampler="ddpm", steps=steps)
        row = {"model": "diffusion", "sampler": "ddpm", "steps": steps, "workers": 1, "threads_per_worker": threads,
               **measure_load(server, name, ddpm, 1, args.baseline_requests, 0, args.request_timeout)}
        rows.append(row)
        print(f"baseline DDPM {steps} steps: {row['images_per_s']} images/s, p50 {row['latency_p50_s']} s",
              flush=True)
    return rows


# ---------------------------------------------------------------- ratios and goals


def raw_at(raw: dict[str, Any], batch: int) -> dict[str, Any]:
    """The raw row at the largest measured batch not above `batch` (the smallest measured one if all are)."""
    rows = sorted(raw["batches"], key=lambda row: row["batch"])
    below = [row for row in rows if row["batch"] <= batch]
    return below[-1] if below else rows[0]


def ratio(a: float, b: float) -> float | None:
    """a / b, or None where nothing was answered (b is 0)."""
    return round(a / b, 3) if b else None


def add_ratios(result: dict[str, Any]) -> None:
    """Ratios beside the absolute figures: each cell against raw and batching off; the baseline against served."""
    cells = result["served"]
    by_key = {(c["model"], c["workers"], launcher_of(c), c["batching"], c["concurrency"]): c for c in cells}
    for cell in cells:
        raw = result["raw"][cell["model"]]
        per_worker = math.ceil(cell["concurrency"] / cell["workers"])
        same = raw_at(raw, cell["n_images"] * min(cell["batch_size"], per_worker))
        cell["raw_batch"] = same["batch"]
        cell["ratio_to_raw_same_batch"] = ratio(cell["images_per_s"], same["images_per_s"])
        cell["ratio_to_raw_best"] = ratio(cell["images_per_s"], raw["best_images_per_s"])
        off = by_key.get((cell["model"], cell["workers"], launcher_of(cell), "off", cell["concurrency"]))
        cell["ratio_to_batching_off"] = ratio(cell["images_per_s"], off["images_per_s"]) if off else None
    # the baseline ran on the 1-worker, batching-off registration: compared with its concurrency-1 cell
    served_default = by_key.get(("diffusion", 1, "off", "off", 1))
    best = max((c for c in cells if c["model"] == "diffusion"), key=lambda c: c["images_per_s"], default=None)
    for row in result["baseline"]:
        row["served_default_speedup"] = ratio(served_default["images_per_s"], row["images_per_s"]) \
            if served_default else None
        row["served_best_speedup"] = ratio(best["images_per_s"], row["images_per_s"])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals on this run's figures (for the request parameters this run used)."""
    cells = result["served"]
    rows = []
    for model in result["raw"]:
        cell = max((c for c in cells if c["model"] == model), key=lambda c: c["images_per_s"], default=None)
        if cell:
            rows.append(goal(f"{model}: best served images/s over raw at the same batch ({cell_label(cell)})",
                             cell["ratio_to_raw_same_batch"], ">=", MIN_SERVED_TO_RAW))
        colds = [s for c in cells if c["model"] == model for s in c["cold_start_s"]]
        if colds:
            rows.append(goal(f"{model}: slowest worker cold start (s)", max(colds), "<=", MAX_COLD_START_S))
    for cell in cells:
        if cell["model"] != "diffusion":
            continue
        if cell["concurrency"] == BATCHING_CONCURRENCY and cell["batching"] == "on" and cell["ratio_to_batching_off"]:
            rows.append(goal(f"diffusion: batching on over off ({cell_label(cell)})", cell["ratio_to_batching_off"],
                             ">=", MIN_BATCHING_GAIN))
        if cell["concurrency"] == 1 and cell["workers"] == 1:
            rows.append(goal(f"diffusion: p95 latency in s ({cell_label(cell)})", cell["latency_p95_s"], "<",
                             MAX_P95_S))
    return rows


def goal(what: str, value: float | None, relation: str, limit: float) -> dict[str, Any]:
    """None (nothing answered) misses every goal."""
    met = value is not None and {">=": value >= limit, "<=": value <= limit, "<": value < limit}[relation]
    return {"target": what, "value": value, "relation": relation, "limit": limit, "met": met}


def launcher_of(cell: dict[str, Any]) -> str:
    """Cells of runs made before --cpu-launcher existed ran without it."""
    return cell.get("cpu_launcher", "off")


PINNED = {"off": "", "on": ", pinned"}  # by --cpu-launcher


def workers_label(cell: dict[str, Any]) -> str:
    return f"{cell['workers']} x {cell['threads_per_worker']}{PINNED[launcher_of(cell)]}"


def cell_label(cell: dict[str, Any]) -> str:
    return (f"{cell['model']}, {cell['workers']} worker(s) x {cell['threads_per_worker']} thread(s)"
            f"{PINNED[launcher_of(cell)]}, batching {cell['batching']}, concurrency {cell['concurrency']}")


# ---------------------------------------------------------------- the table and the plot

TABLE_HEADER = ["model", "workers x threads", "batch size", "concurrency", "requests", "images/s",
                "vs raw same batch", "vs batching off", "p50 s", "p95 s", "peak RSS MB per worker",
                "cold start s per worker"]


def table(result: dict[str, Any]) -> str:
    rows = [[c["model"], workers_label(c), c["batch_size"], c["concurrency"],
             c["requests"], c["images_per_s"], f"{c['ratio_to_raw_same_batch']} (batch {c['raw_batch']})",
             c["ratio_to_batching_off"] or "", c["latency_p50_s"], c["latency_p95_s"],
             " / ".join(map(str, c["peak_rss_mb"])), " / ".join(map(str, c["cold_start_s"]))]
            for c in result["served"]]
    rows += [[model, f"raw, {raw['threads']} threads, {trial_label(raw.get('settings', {}))}", batch["batch"], "", batch["calls"], batch["images_per_s"],
              "", "", "", "", "", ""] for model, raw in result["raw"].items() for batch in raw["batches"]]
    rows += [[model, f"raw trial: {trial_label(trial['settings'])}", trial["batch"], "", "",
              trial.get("images_per_s", trial.get("error", "")), f"{trial.get('ratio_to_served_setting')} (served settings)",
              "", f"first call {trial['first_call_s']}" if "first_call_s" in trial else "", "", "", ""]
             for model, raw in result["raw"].items() for trial in raw.get("trials", [])]
    rows += [[f"diffusion, DDPM {b['steps']} steps (the seed's way)", f"1 x {b['threads_per_worker']}", 1, 1,
              b["requests"], b["images_per_s"], "", f"served default {b['served_default_speedup']}x faster",
              b["latency_p50_s"], b["latency_p95_s"], " / ".join(map(str, b["peak_rss_mb"])), ""]
             for b in result["baseline"]]
    return markdown_table(TABLE_HEADER, rows)


def trial_label(settings: dict[str, bool]) -> str:
    return ", ".join(f"{name} {'on' if on else 'off'}" for name, on in settings.items()) or "default settings"


# (workers, batching, cpu launcher) -> line colour; other series take OTHER_COLOURS in turn
COLOURS = {(1, "off", "off"): (31, 119, 180), (1, "on", "off"): (255, 127, 14), (2, "off", "off"): (44, 160, 44),
           (2, "on", "off"): (214, 39, 40)}
OTHER_COLOURS = [(188, 189, 34), (23, 190, 207), (127, 127, 127), (0, 0, 0)]
RAW_COLOUR, BASELINE_COLOURS = (90, 90, 90), [(148, 103, 189), (140, 86, 75), (227, 119, 194)]
PANEL_W, PANEL_H, LINE_H = 520, 400, 14


def plot(result: dict[str, Any]) -> bytes:
    """One panel per model: served images/s against concurrency per workers x batching, raw's best batch and the
    baseline as dashed lines. PNG bytes, drawn with PIL (no plotting library in the environment)."""
    models = list(result["raw"])
    image = Image.new("RGB", (PANEL_W * len(models), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for index, model in enumerate(models):
        draw_panel(draw, font, index * PANEL_W, model, result)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_panel(draw: ImageDraw.ImageDraw, font, left: int, model: str, result: dict[str, Any]) -> None:
    """Title and legend on top, then the axes: concurrency evenly spaced, images/s from 0."""
    cells = [c for c in result["served"] if c["model"] == model]
    concurrencies = sorted({c["concurrency"] for c in cells})
    series = sorted({(c["workers"], c["batching"], launcher_of(c)) for c in cells})
    references = [(f"raw in-process, batch {result['raw'][model]['best_batch']}",
                   result["raw"][model]["best_images_per_s"], RAW_COLOUR)]
    references += [(f"DDPM {b['steps']} steps, one request at a time", b["images_per_s"],
                    BASELINE_COLOURS[number % len(BASELINE_COLOURS)])
                   for number, b in enumerate(result["baseline"]) if model == "diffusion"]
    top = max([c["images_per_s"] for c in cells] + [value for _, value, _ in references] + [1e-9]) * 1.1
    x0, x1 = left + 60, left + PANEL_W - 20
    y1 = 30 + LINE_H * (len(series) + len(references)) + 10
    y0 = PANEL_H - 40

    def x_of(concurrency: int) -> float:
        return x0 + (x1 - x0) * (concurrencies.index(concurrency) + 0.5) / len(concurrencies)

    def y_of(value: float) -> float:
        return y0 - (y0 - y1) * value / top

    draw.text((x0, 8), f"{model}: images/s against concurrency", fill="black", font=font)
    legend_y = 28
    for number, key in enumerate(series):
        colour = COLOURS.get(key, OTHER_COLOURS[number % len(OTHER_COLOURS)])
        points = sorted((x_of(c["concurrency"]), y_of(c["images_per_s"])) for c in cells
                        if (c["workers"], c["batching"], launcher_of(c)) == key)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(x0, legend_y + 7), (x0 + 20, legend_y + 7)], fill=colour, width=2)
        draw.text((x0 + 26, legend_y), f"{key[0]} worker(s){PINNED[key[2]]}, batching {key[1]}", fill=colour,
                  font=font)
        legend_y += LINE_H
    for label, value, colour in references:
        dashed(draw, x0, x1, y_of(value), colour)
        dashed(draw, x0, x0 + 20, legend_y + 7, colour)
        draw.text((x0 + 26, legend_y), f"{label}: {value:.3g}/s", fill=colour, font=font)
        legend_y += LINE_H
    axes(draw, font, left, (x0, y1, x1, y0), top, y_of, [(x_of(c), str(c)) for c in concurrencies], "concurrency")


# ---------------------------------------------------------------- the run


@contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise ServingFailure(f"--work-dir {keep} is not empty")
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="benchmark-") as temp:
        yield Path(temp)


@reports_failures
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    if load_before > QUIET_LOAD:
        print(f"warning: the 1-minute load average is {load_before:.2f} (over {QUIET_LOAD}): other work shares the "
              f"{cores} cores, so these figures are not the machine's; stop it and run again", file=sys.stderr)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        print("warning: OMP_WAIT_POLICY=PASSIVE (inherited by the workers) halved the 2-thread figures on the "
              "measured machine; unset it for the machine's figures", file=sys.stderr)
    if any(workers > cores for workers in args.workers):
        print(f"warning: more workers than the {cores} cores: each gets 1 thread and they oversubscribe the cores",
              file=sys.stderr)
    with work_dir(args.work_dir) as root:
        checkpoints = {m: root / "snapshots" / m for m in args.models}
        raw = {}
        for model, snapshot in checkpoints.items():
            snapshot_checkpoint(CHECKPOINTS / model, snapshot)
            try:
                raw[model] = measure_raw(snapshot, model, dict(args.bodies[model]), args.raw_batches,
                                         args.raw_seconds, cores, args.trials)
            except InvalidParameter as error:
                raise ServingFailure(f"{model}: {error} (from --request, --raw-batches or --n-images)") from None
            print(f"raw {model}: {raw[model]['best_images_per_s']} images/s at batch {raw[model]['best_batch']}",
                  flush=True)
        served, baseline = [], []
        for launcher in args.cpu_launcher:
            # running_server needs a model to start with; the first is unregistered before anything is measured.
            (root / f"server-launcher-{launcher}").mkdir()
            settings = {"token_expiration_min": "10080", "cpu_launcher_enable": str(launcher == "on").lower()}
            with running_server(root / f"server-launcher-{launcher}", models=args.models[:1],
                                settings=settings) as server:
                server.client().unregister(args.models[0], VERSION)
                cells, rows = measure_served(server, checkpoints, args, cores, launcher)
            served += cells
            baseline += rows
    result = {
        "machine": dict(machine(torch.device("cpu")), torch_threads=cores, cores=cores,
                        load_average_1min_before=round(load_before, 2),
                        load_average_1min_after=round(os.getloadavg()[0], 2), quiet=load_before <= QUIET_LOAD,
                        threading_env={k: v for k, v in os.environ.items() if k.startswith(THREADING_ENV)}),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "work_dir", "request")},
        "sampling": {m: describe_sampling(raw[m]["sampling"], "class_label" in raw[m]["sampling"]) for m in raw},
        "cold_start": "seconds from a scale-up call (PUT /models/<name>?min_worker=n&synchronous=true) until "
                      "GET /models/<name> lists the n-th worker as READY, one new worker at a time",
        "raw": raw, "served": served, "baseline": baseline,
    }
    add_ratios(result)
    result["targets"] = targets(result)
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.plot, plot(result))
    print(table(result))
    for row in result["targets"]:
        print(f"{'met' if row['met'] else 'MISSED'}: {row['target']} = {row['value']} ({row['relation']} {row['limit']})")
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
