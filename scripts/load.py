"""Closed-loop load on a running TorchServe: the benchmark's measured cells and the stress test's traffic.

Each of `concurrency` clients sends its next request as soon as its last is answered, cycling through a mix of
(model, body) requests, until `total` are sent, `max_seconds` have passed, or stop() is called. Each client keeps
its HTTP connection open and renews an expired key like any TorchServeClient.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from scripts.serving_api import ServingFailure, TorchServeClient


@dataclass
class Outcome:
    model: str
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no answer (connection error or timeout)
    detail: str = ""  # the start of the error body or failure


class ClosedLoop:
    """Starts at creation; wait() or stop() returns every request's Outcome. `new_client` makes each
    client thread's own TorchServeClient (made with keep_alive, to keep its connection open)."""

    def __init__(self, new_client: Callable[[], TorchServeClient], mix: list[tuple[str, dict[str, Any]]],
                 concurrency: int, total: int | None = None, max_seconds: float = 0.0, version: str | None = None):
        self.mix, self.version = mix, version
        self.total = math.inf if total is None else total
        self.deadline = time.monotonic() + max_seconds if max_seconds else math.inf
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = [self._pool.submit(self._client, new_client) for _ in range(concurrency)]

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.total or time.monotonic() >= self.deadline:
                return None
            self._sent += 1
            return self._sent - 1

    def _client(self, new_client: Callable[[], TorchServeClient]) -> None:
        client = new_client()
        try:
            while (index := self._take()) is not None:
                model, body = self.mix[index % len(self.mix)]
                started = time.monotonic()
                try:
                    response = client.generate(model, body, self.version, check=False)
                    status, detail = response.status_code, "" if response.ok else response.text[:200]
                except ServingFailure as failure:
                    status, detail = None, str(failure)[:200]
                with self._lock:
                    self.outcomes.append(Outcome(model, started, time.monotonic(), status, detail))
        finally:
            client.close()

    def wait(self) -> list[Outcome]:
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self.outcomes

    def stop(self) -> list[Outcome]:
        self._stop.set()
        return self.wait()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]
