#!/usr/bin/env python3
"""Reliability checks against a live TorchServe that this script starts on free loopback ports and always stops.

    python scripts/stress.py                     # every check at full size -> docs/reliability.json
    python scripts/stress.py --checks fuzz load --fuzz-bodies 500 --load-requests 200 --json /tmp/reliability.json

Options (counts, concurrency, time bound, which checks, output):
  --checks fuzz load kill swap restart   which checks, run in this order (default: all)
  --fuzz-bodies 10000    bad bodies drawn by hypothesis       --load-requests 2000   requests of the load check
  --concurrency 16       client threads of every load         --max-minutes 40       the whole run's time bound
  --seed 0               hypothesis seed                      --json docs/reliability.json   the figures
  --work-dir DIR         keep the server's directory (archives, logs) there instead of a deleted temp dir

The server runs the repo's checkpoints as archives through scripts/serve.sh, as `make serve` does.
  fuzz     hypothesis draws bad requests for every model and inference route (wrong types, out of range, NaN/inf,
           huge integers, unknown keys; non-JSON, binary, empty, deeply nested and oversized bodies; form and odd
           content types; to the EBM's scoring route truncated, oversized, bomb, wrong-mode and wrong-size PNGs):
           each must get a 4xx with a message, none a 5xx, and no worker may restart (ids, pids, start times)
  load     cheap requests mixed over the models at a fixed concurrency: none may fail; no worker's RSS may grow
           by 50 MB or more from start to end
  kill     kill -9 one worker under load: TorchServe must restart it and the model answer again within 10 s;
           only requests in flight at the kill (or sent within 1 s after it, before TorchServe notices the
           death) may fail, and they are counted. Run twice: with the archives' one worker per model, and with
           the model scaled to two workers for the check
  swap     under load, archive, register and set-default a new gan version, then roll back the same way
           (set-default the old one, unregister the new): no request may fail
  restart  with a second gan version as the default, stop and start serve.sh: the same models, versions,
           defaults and batch settings must come back (then the server is rolled back to one version)
Killing training during a checkpoint save is tested in tests/test_reliability.py. Exit status 0 when every
check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import signal
import struct
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import requests
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.checkpoint import atomic_write_bytes  # noqa: E402
from scripts.local_server import (  # noqa: E402
    HTTP_TIMEOUT, MODELS, Server, restart_server, run_archive, running_server,
)
from scripts.load import ClosedLoop, Outcome, failures  # noqa: E402
from scripts.serving_api import TorchServeClient  # noqa: E402
from training.evaluate import machine  # noqa: E402

CHECKS = ("fuzz", "load", "kill", "swap", "restart")
MAX_RSS_GROWTH_MB = 50
MAX_RECOVERY_S = 10
DETECTION_WINDOW_S = 1.0  # after a kill -9, within which TorchServe may still give a request to the dead worker
SWAP_MODEL, SWAP_VERSION = "gan", "2.0"
KILL_MODEL = "diffusion"  # its requests take longest, so the kill is likely to find one in flight
# Every route TorchServe 0.12 hands to the handler; {m} the model, {v} its version.
ROUTES = ("/predictions/{m}", "/predictions/{m}/{v}", "/explanations/{m}", "/v1/models/{m}:predict",
          "/v1/models/{m}:explain", "/v2/models/{m}/infer", "/v2/models/{m}/explain")
CONTENT_TYPES = (None, "application/json", "application/json; charset=utf-8", "text/plain", "application/octet-stream",
                 "image/png", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "foo/bar;;")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_REQUEST_BYTES = 1048576  # config.properties' max_request_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--fuzz-bodies", type=int, default=10000)
    p.add_argument("--load-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "reliability.json")
    p.add_argument("--work-dir", type=Path, help="an empty or new directory to keep")
    return p.parse_args(argv)


# ---------------------------------------------------------------- PNGs


def png_bytes(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def good_png(seed_value: int, side: int = 32) -> bytes:
    """A side x side RGB PNG of random pixels: what the EBM's scoring route accepts."""
    pixels = np.random.default_rng(seed_value).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(pixels, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunks(png: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset of its data, length of its data) of each chunk of a PNG."""
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        yield kind, at + 8, length
        at += 12 + length


def truncated_png(png: bytes, keep: float) -> bytes:
    """The PNG cut within the first half of its image data, so its pixels cannot all be decoded."""
    _, start, length = next(c for c in chunks(png) if c[0] == b"IDAT")
    return png[:int(keep * (start + length // 2))]


def padded_png(png: bytes, extra: int) -> bytes:
    """A valid PNG made `extra` bytes larger by a text chunk before IEND."""
    return png[:-12] + png_chunk(b"tEXt", b"padding\x00" + b"x" * extra) + png[-12:]


def png_with_header(width: int, height: int, depth: int, colour: int) -> bytes:
    """A PNG whose header declares this canvas over a few bytes of pixels (a decompression bomb when large)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------- bad requests (hypothesis strategies)


@dataclass(frozen=True)
class BadRequest:
    kind: str  # what makes it bad, e.g. "bad value: steps", "truncated PNG"
    model: str
    route: str
    content_type: str | None
    body: bytes

    def summary(self) -> str:
        return f"{self.kind} -> {self.route} [{self.content_type}] {self.body[:120]!r} ({len(self.body)} bytes)"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
not_numbers = st.booleans() | st.text(max_size=12) | st.lists(json_values, max_size=3) \
    | st.dictionaries(st.text(max_size=6), json_values, max_size=2)
huge_integers = st.builds(lambda digits, sign: sign * 10 ** digits, st.integers(19, 4000), st.sampled_from([1, -1]))
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def bad_values(spec: dict[str, Any]) -> st.SearchStrategy:
    """Values `spec` (one entry of the served `parameters`) refuses: other types, out of range, NaN/inf, huge."""
    kind, low, high = spec["type"], spec.get("min"), spec.get("max")
    out_of_range = [st.integers(max_value=math.ceil(low) - 1)] if low is not None else []
    out_of_range += [st.integers(min_value=math.floor(high) + 1)] if high is not None else []
    if kind == "integer":  # any float, 4.0 included, is not an integer
        return st.one_of(not_numbers, st.floats(), huge_integers, *out_of_range)
    if kind == "number":
        below = st.floats(max_value=low, exclude_max=True, allow_nan=False)
        above = st.floats(min_value=high, exclude_min=True, allow_nan=False)
        return st.one_of(not_numbers, non_finite, huge_integers, below, above, *out_of_range)
    if kind == "boolean":  # 0, 1 and "true" are not booleans
        return st.one_of(st.integers(), st.floats(), st.text(max_size=12), st.lists(json_values, max_size=2))
    names = {c.lower() for c in spec.get("choices", [])}
    other_text = st.text(max_size=12).filter(lambda s: s.strip().lower() not in names)
    if kind == "string or integer":  # a class: a name in any case, or its index
        return st.one_of(other_text, st.floats(), st.booleans(), st.lists(json_values, max_size=2), *out_of_range)
    return st.one_of(other_text, st.integers(), st.floats(), st.booleans(), st.lists(json_values, max_size=2))


def good_values(spec: dict[str, Any]) -> st.SearchStrategy:
    """Small accepted values, for the fields beside the bad one."""
    kind, low, high = spec["type"], spec.get("min"), spec.get("max")
    if kind == "integer":
        return st.integers(low, min(high, low + 3))
    if kind == "number":
        return st.floats(low, high)
    if kind == "string or integer":
        return st.sampled_from(spec["choices"]) | st.integers(low, high)
    if kind == "boolean":
        return st.booleans()
    return st.sampled_from(spec["choices"])


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def sampling_body_with(draw, specs: dict[str, dict], bad_name: str | None = None) -> dict:
    """Some of the accepted fields with accepted values, and `bad_name` (if any) with a refused one."""
    names = sorted(n for n in specs if n != bad_name)
    body = {n: draw(good_values(specs[n])) for n in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))}
    if bad_name is not None:
        body[bad_name] = draw(bad_values(specs[bad_name]))
    return body


@st.composite
def bad_sampling_body(draw, specs: dict[str, dict]) -> tuple[str, bytes]:
    """Bodies for any model's sampling parameters."""
    choice = draw(st.sampled_from(["bad value"] * 3 + ["unknown key", "giant integer literal", "not an object",
                                   "not JSON", "binary", "empty", "deep nesting", "oversized", "form fields"]))
    if choice == "bad value":
        name = draw(st.sampled_from(sorted(specs)))
        return f"bad value: {name}", encode(draw(sampling_body_with(specs, name)))
    if choice == "unknown key":
        key = draw(st.text(max_size=20).filter(lambda k: k not in specs and k != "images")
                   | st.sampled_from(sorted(specs)).map(str.upper))
        return choice, encode({**draw(sampling_body_with(specs)), key: draw(json_values)})
    if choice == "giant integer literal":  # over the 4300 digits Python's int() parses
        name, digits = draw(st.sampled_from(sorted(specs))), draw(st.integers(4301, 20000))
        return choice, b'{"%s": %s}' % (name.encode(), b"7" * digits)
    if choice == "not an object":
        return choice, encode(draw(json_scalars | st.lists(json_values, max_size=4)))
    if choice == "not JSON":
        return choice, draw(st.text(min_size=1, max_size=200).filter(lambda t: not parses_to_object(t.encode()))
                            ).encode()
    if choice == "binary":
        return choice, draw(st.binary(min_size=1, max_size=2000).filter(lambda b: not parses_to_object(b)))
    if choice == "empty":
        return choice, draw(st.sampled_from([b"", b" ", b"\n", b"\t \r\n"]))
    if choice == "deep nesting":
        depth = draw(st.integers(2, 200000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"n_images":[', b"]}")]))
        unbalanced = draw(st.booleans())
        return choice, opener * depth + (b"1" if opener.endswith(b":") else b"") + closer * (depth - unbalanced)
    if choice == "oversized":  # over max_request_size: TorchServe itself answers
        size = draw(st.integers(MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 200000))
        return choice, b'{"n_images": "' + b"x" * size + b'"}'
    pairs = draw(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), min_size=1, max_size=3))
    return "form fields", "&".join(f"{requests.utils.quote(k)}={requests.utils.quote(v)}"
                                   for k, v in pairs.items()).encode()


def parses_to_object(data: bytes) -> bool:
    """Whether the body is a JSON object (then it may be a valid request; such bodies are not drawn as bad)."""
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def bad_image(draw, width: int, height: int, mode: str, max_file_bytes: int) -> tuple[str, Any]:
    """One refused item of "images": (what is wrong with it, the JSON value)."""
    good = good_png(draw(st.integers(0, 2**32 - 1)), width)
    choice = draw(st.sampled_from(["not a string", "not base64", "not a PNG", "truncated PNG", "wrong mode or size",
                                   "oversized PNG", "decompression bomb", "invalid PNG header"]))
    if choice == "not a string":
        return choice, draw(json_values.filter(lambda v: not isinstance(v, str)))
    if choice == "not base64":
        return choice, draw(st.text(min_size=1, max_size=60).filter(lambda t: not is_base64(t)))
    if choice == "not a PNG":
        data = draw(st.binary(max_size=3000).filter(lambda b: not b.startswith(PNG_SIGNATURE)))
    elif choice == "truncated PNG":
        data = truncated_png(good, draw(st.floats(0, 1)))
    elif choice == "wrong mode or size":
        side = st.integers(1, 64)
        w, h, m = draw(st.tuples(side, side, st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])).filter(
            lambda wh_m: wh_m != (width, height, mode)))
        pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = png_bytes(pixels, m)
    elif choice == "oversized PNG":
        data = padded_png(good, draw(st.integers(max_file_bytes - len(good) + 1, 3 * max_file_bytes)))
    elif choice == "decompression bomb":
        side = st.integers(1, 2**31 - 1)
        w, h = draw(st.tuples(side, side).filter(lambda wh: wh != (width, height)))
        data = png_with_header(w, h, 8, 2)
    else:  # bit depth / colour type pairs the PNG standard does not allow
        data = png_with_header(width, height, *draw(st.sampled_from([(4, 2), (16, 3), (1, 6), (8, 5), (8, 1), (0, 2)])))
    return choice, base64.b64encode(data).decode("ascii")


def is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return True
    except ValueError:
        return False


@st.composite
def bad_scoring_body(draw, scoring: dict[str, dict], sampling: dict[str, dict]) -> tuple[str, bytes]:
    """Bodies for the EBM's scoring route: {"images": [...]} with something wrong."""
    image = scoring["images"]
    width, height, mode = re.fullmatch(r"(\d+)x(\d+) (\S+) PNG", image["image"]).groups()
    width, height = int(width), int(height)
    seeds = draw(st.lists(st.integers(0, 99), max_size=3))
    good = [base64.b64encode(good_png(i, width)).decode("ascii") for i in seeds]
    choice = draw(st.sampled_from(["bad image", "images not a list", "too few or many images", "bad timestep",
                                   "extra key beside images"]))
    if choice == "bad image":
        kind, item = draw(bad_image(width, height, mode, image["max_file_bytes"]))
        good.insert(draw(st.integers(0, len(good))), item)
        return kind, encode({"images": good})
    if choice == "images not a list":
        return choice, encode({"images": draw(json_values.filter(lambda v: not isinstance(v, list)))})
    if choice == "too few or many images":
        count = draw(st.sampled_from([0, image["max_items"] + 1, image["max_items"] + draw(st.integers(2, 40))]))
        return choice, encode({"images": [base64.b64encode(good_png(0, width)).decode("ascii")] * count})
    images = good or [base64.b64encode(good_png(1, width)).decode("ascii")]
    if choice == "bad timestep":
        return choice, encode({"images": images, "timestep": draw(bad_values(scoring["timestep"]))})
    key = draw(st.sampled_from(sorted(sampling)) | st.text(max_size=10).filter(lambda k: k not in scoring))
    value = draw(json_values | good_values(sampling.get(key, scoring["timestep"])))
    return choice, encode({"images": images, key: value})


def bad_requests(descriptions: dict[str, dict], versions: dict[str, str]) -> st.SearchStrategy:
    """BadRequest over every model, route and content type; `descriptions` are the served customized metadata."""

    @st.composite
    def draw_request(draw) -> BadRequest:
        model = draw(st.sampled_from(sorted(descriptions)))
        meta = descriptions[model]
        route = draw(st.sampled_from(ROUTES)).format(m=model, v=versions[model])
        scoring = meta.get("scoring_parameters")
        if scoring and draw(st.booleans()):
            kind, body = draw(bad_scoring_body(scoring, meta["parameters"]))
        else:
            kind, body = draw(bad_sampling_body(meta["parameters"]))
        return BadRequest(kind, model, route, draw(st.sampled_from(CONTENT_TYPES)), body)

    return draw_request()


# ---------------------------------------------------------------- sending


def post(server: Server, path: str, body: bytes, content_type: str | None = "application/json") -> requests.Response:
    return server.post_raw("", body, content_type, path=path)


def frontend_form_decoder_error(response: requests.Response, content_type: str | None) -> bool:
    """TorchServe 0.12's known 500: its frontend (Netty's form decoder) fails on a form body before any handler
    runs (a malformed %-escape, bytes that are not UTF-8, a field whose name is empty once trimmed); README
    section 3 and tests/test_reliability.py's strict xfail test keep it in view."""
    if response.status_code != 500 or content_type != "application/x-www-form-urlencoded":
        return False
    try:
        return response.json().get("type") == "ErrorDataDecoderException"
    except ValueError:
        return False


def refusal_problem(response: requests.Response) -> str | None:
    """None when the answer is a 4xx with a message, else what is wrong with it."""
    if response.status_code >= 500:
        return f"{response.status_code} (server error)"
    if response.status_code < 400:
        return f"{response.status_code} (accepted a bad request)"
    try:
        body = response.json()
    except ValueError:
        body = None
    message = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
    if isinstance(message, str) and message.strip():
        return None
    if not response.content and response.reason:  # TorchServe's own refusals (413) carry only the status line
        return None
    return f"{response.status_code} without a message: {response.content[:200]!r}"


def worker_identities(server: Server) -> dict[str, list[tuple]]:
    """(version, worker id, pid, start time) of every worker: any restart changes them."""
    client = server.client()
    return {m: sorted((d["modelVersion"], w["id"], w["pid"], w["startTime"]) for d in client.describe(m, "all")
                      for w in d["workers"]) for m in MODELS}


def served_descriptions(server: Server) -> tuple[dict[str, dict], dict[str, str]]:
    """Each model's customized metadata (accepted parameters) and default version."""
    client = server.client()
    metas, versions = {}, {}
    for m in MODELS:
        entry = client.describe(m, customized=True)[0]
        meta = entry["customizedMetadata"]
        metas[m] = json.loads(meta) if isinstance(meta, str) else meta
        versions[m] = entry["modelVersion"]
    return metas, versions


# ---------------------------------------------------------------- fuzz


def draw_requests(strategy: st.SearchStrategy, count: int, seed_value: int) -> list[BadRequest]:
    """`count` examples of `strategy`, as hypothesis draws them with this seed."""
    drawn: list[BadRequest] = []

    @seed(seed_value)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(request: BadRequest) -> None:
        drawn.append(request)

    collect()
    return drawn


def fuzz(server: Server, bodies: int, seed_value: int, deadline: float, concurrency: int,
         chunk: int = 500) -> dict[str, Any]:
    """Send `bodies` bad requests, drawn by hypothesis in runs of `chunk` (seeds seed_value, seed_value + 1, ...)
    and sent from `concurrency` threads, so bad requests also share batches."""
    descriptions, versions = served_descriptions(server)
    strategy = bad_requests(descriptions, versions)
    before = worker_identities(server)
    statuses: dict[int, int] = {}
    kinds: dict[str, int] = {}
    problems: list[str] = []
    started = time.monotonic()
    run = 0

    def send(request: BadRequest) -> tuple[BadRequest, int, str | None]:
        response = post(server, request.route, request.body, request.content_type)
        return request, response.status_code, refusal_problem(response)

    with ThreadPoolExecutor(concurrency) as pool:
        while sum(statuses.values()) < bodies and time.monotonic() < deadline:
            batch = draw_requests(strategy, min(chunk, bodies - sum(statuses.values())), seed_value + run)
            run += 1
            for request, status, problem in pool.map(send, batch):
                statuses[status] = statuses.get(status, 0) + 1
                kinds[request.kind] = kinds.get(request.kind, 0) + 1
                if problem:
                    problems.append(f"{problem}: {request.summary()}")
    after = worker_identities(server)
    sent = sum(statuses.values())
    return {
        "bodies": sent, "concurrency": concurrency, "seconds": round(time.monotonic() - started, 1),
        "seed": seed_value, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(n for code, n in statuses.items() if code >= 500),
        "problems": len(problems), "problem_examples": problems[:10], "kinds": dict(sorted(kinds.items())),
        "routes": list(ROUTES), "workers_restarted": before != after,
        "passed": sent >= bodies and not problems and before == after,
    }


# ---------------------------------------------------------------- load


def load_mix(descriptions: dict[str, dict]) -> list[tuple[str, dict]]:
    """The cheapest request of each kind: one image, the fewest steps or levels; and one EBM scoring request."""
    image = descriptions["ebm"]["scoring_parameters"]["images"]["image"]
    side = int(image.split("x")[0])
    return [("gan", {"n_images": 1}),
            ("diffusion", {"n_images": 1, "steps": 2}),
            ("ebm", {"n_images": 1, "levels": 2, "corrector_steps": 0}),
            ("ebm", {"images": [base64.b64encode(good_png(7, side)).decode("ascii")]})]


def new_client(server: Server) -> Callable[[], TorchServeClient]:
    """One kept-open client per load thread."""
    return lambda: server.client(keep_alive=True)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def worker_rss(server: Server) -> dict[str, float]:
    """Resident memory of each model's workers (MB), keyed 'model/worker id'."""
    client = server.client()
    return {f"{m}/{w['id']}": rss_mb(int(w["pid"])) for m in MODELS for w in client.describe(m)[0]["workers"]}


def latency_summary(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    by_model: dict[str, list[float]] = {}
    for o in outcomes:
        by_model.setdefault(o.model, []).append(o.ended - o.started)
    return {m: {"requests": len(t), "p50_s": round(float(np.percentile(t, 50)), 3),
                "p95_s": round(float(np.percentile(t, 95)), 3)} for m, t in sorted(by_model.items())}


def load(server: Server, total: int, concurrency: int) -> dict[str, Any]:
    """`total` mixed requests at `concurrency`; worker RSS is taken after one warm-up request of each kind."""
    descriptions, _ = served_descriptions(server)
    mix = load_mix(descriptions)
    ClosedLoop(new_client(server), mix, 1, total=len(mix)).wait()  # warm-up: first-request allocations are not growth
    rss_start = worker_rss(server)
    java_start = rss_mb(server.pid)
    before = worker_identities(server)
    started = time.monotonic()
    outcomes = ClosedLoop(new_client(server), mix, concurrency, total=total).wait()
    seconds = time.monotonic() - started
    rss_end = worker_rss(server)
    growth = {k: round(rss_end[k] - rss_start[k], 1) for k in rss_start if k in rss_end}
    failed = failures(outcomes)
    return {
        "requests": len(outcomes), "concurrency": concurrency, "failures": len(failed),
        "server_errors": sum(1 for o in failed if o.status is not None and o.status >= 500),
        "failure_examples": [f"{o.model}: {o.status} {o.detail}" for o in failed[:5]],
        "seconds": round(seconds, 1), "requests_per_second": round(len(outcomes) / seconds, 1),
        "mix": [{"model": m, "body": body if "images" not in body else {"images": ["<one 32x32 RGB PNG>"]}}
                for m, body in mix],
        "latency": latency_summary(outcomes),
        "worker_rss_mb": {"start": {k: round(v, 1) for k, v in rss_start.items()},
                          "end": {k: round(v, 1) for k, v in rss_end.items()}, "growth": growth},
        "max_rss_growth_mb": max(growth.values()), "frontend_rss_mb": {"start": round(java_start, 1),
                                                                       "end": round(rss_mb(server.pid), 1)},
        "workers_restarted": before != worker_identities(server),
        "passed": not failed and len(growth) == len(rss_start) and max(growth.values()) < MAX_RSS_GROWTH_MB
                  and before == worker_identities(server),
    }


# ---------------------------------------------------------------- kill -9 a worker


def wait_for(condition, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until condition() held, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def scale(server: Server, model: str, min_workers: int, max_workers: int) -> None:
    """Set a model's worker range over the management API and wait until its workers are up."""
    response = requests.put(f"{server.management_url}/models/{model}", timeout=HTTP_TIMEOUT,
                            params={"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"},
                            headers={"Authorization": f"Bearer {server.key('management')}"})
    response.raise_for_status()


def kill_worker(server: Server, concurrency: int, workers: int = 1, model: str = KILL_MODEL, warm_up_s: float = 3,
                timeout: float = 60) -> dict[str, Any]:
    """SIGKILL one of `model`'s workers (it runs `workers` for the check) under load; TorchServe must start a
    new one and the model answer again. With one worker the model is down until the new one has started."""
    descriptions, _ = served_descriptions(server)
    client = server.client()
    original = client.describe(model)[0]
    scale(server, model, workers, max(workers, original["maxWorkers"]))
    victim = client.describe(model)[0]["workers"][0]
    others_before = {m: ids for m, ids in worker_identities(server).items() if m != model}
    load_ = ClosedLoop(new_client(server), load_mix(descriptions), concurrency)
    try:
        time.sleep(warm_up_s)
        killed_at = time.monotonic()
        os.kill(int(victim["pid"]), signal.SIGKILL)

        def replaced() -> bool:
            current = client.describe(model)[0]["workers"]
            return len(current) == workers and all(w["pid"] != victim["pid"] and w["status"] == "READY"
                                                   for w in current)

        def answered_again() -> bool:
            return any(o.model == model and o.status == 200 and o.started > killed_at for o in load_.snapshot())

        worker_ready_s = wait_for(replaced, timeout)
        wait_for(answered_again, timeout)
        time.sleep(warm_up_s)  # the recovered model under load a while longer
    finally:
        outcomes = load_.stop()
        scale(server, model, original["minWorkers"], original["maxWorkers"])
    recovered = [o.ended - killed_at for o in outcomes
                 if o.model == model and o.status == 200 and o.started > killed_at]
    in_flight = [o for o in outcomes if o.started <= killed_at <= o.ended]
    failed = failures(outcomes)
    # TorchServe notices the death when the worker's socket closes; a request sent in that moment can still be
    # taken into a batch for the dead worker and fail with it.
    just_after = [o for o in failed if killed_at < o.started <= killed_at + DETECTION_WINDOW_S]
    unexplained = [o for o in failed if not o.started <= killed_at <= o.ended and o not in just_after]
    recovery_s = round(min(recovered), 2) if recovered else None
    return {
        "model": model, "workers": workers, "killed_pid": victim["pid"], "requests": len(outcomes),
        "concurrency": concurrency, "in_flight_at_kill": len(in_flight), "failures": len(failed),
        "failures_in_flight": len(failed) - len(just_after) - len(unexplained),
        "failures_sent_within_detection_window": len(just_after), "failures_otherwise": len(unexplained),
        "failure_examples": [f"{o.model}: {o.status} {o.detail} (sent {o.started - killed_at:+.3f} s, answered "
                             f"{o.ended - killed_at:+.3f} s from the kill)" for o in failed[:5]],
        "worker_restarted_after_s": round(worker_ready_s, 2) if worker_ready_s is not None else None,
        "recovery_s": recovery_s,
        "other_workers_restarted": others_before != {m: ids for m, ids in worker_identities(server).items()
                                                     if m != model},
        "passed": recovery_s is not None and recovery_s <= MAX_RECOVERY_S and not unexplained
                  and worker_ready_s is not None,
    }


def kill_workers(server: Server, concurrency: int) -> dict[str, Any]:
    """The kill check as the archives serve (one worker per model), then with a second worker standing by."""
    results = {f"{n}_worker{'s' * (n > 1)}": kill_worker(server, concurrency, workers=n) for n in (1, 2)}
    return {**results, "passed": all(r["passed"] for r in results.values())}


# ---------------------------------------------------------------- hot swap


def responses_sent(server: Server, model: str, version: str) -> int:
    """Responses the workers of one model version sent, from TorchServe's log (its metrics do not tell
    which version served a request that named none)."""
    worker = re.compile(rf"W-\d+-{re.escape(model)}_{re.escape(version)} \S+BatchAggregator - Sending response")
    log = server.root / "logs" / "ts_log.log"
    return sum(1 for line in log.read_text(errors="replace").splitlines() if worker.search(line))


def default_version(server: Server, model: str) -> str:
    return server.client().describe(model)[0]["modelVersion"]


def hot_swap(server: Server, concurrency: int, settle_s: float = 5, timeout: float = 120) -> dict[str, Any]:
    """Under load: archive, register and set-default SWAP_VERSION of SWAP_MODEL; then set-default the old version
    and unregister the new one once its queue is empty. No request may fail."""
    descriptions, versions = served_descriptions(server)
    client = server.client()
    old = versions[SWAP_MODEL]
    steps: dict[str, float] = {}
    load_ = ClosedLoop(new_client(server), load_mix(descriptions), concurrency)
    try:
        started = time.monotonic()
        built = run_archive(server.checkpoints[SWAP_MODEL], SWAP_VERSION, server.model_store)
        if built.returncode != 0:
            raise RuntimeError(f"archive.py failed: {built.stdout[-2000:]}{built.stderr[-2000:]}")
        steps["archive_s"] = time.monotonic() - started
        client.register(f"{SWAP_MODEL}-{SWAP_VERSION}.mar")
        steps["register_s"] = time.monotonic() - started - steps["archive_s"]
        client.set_default(SWAP_MODEL, SWAP_VERSION)
        new_default = default_version(server, SWAP_MODEL)
        served_before = responses_sent(server, SWAP_MODEL, SWAP_VERSION)
        served_new = wait_for(lambda: responses_sent(server, SWAP_MODEL, SWAP_VERSION) > served_before + 10, timeout)
        time.sleep(settle_s)
        client.set_default(SWAP_MODEL, old)
        rolled_back_default = default_version(server, SWAP_MODEL)
        # Requests already queued for the new version finish there before it goes.
        wait_for(lambda: client.describe(SWAP_MODEL, SWAP_VERSION)[0]["jobQueueStatus"]["pendingRequests"] == 0,
                 timeout)
        time.sleep(2)
        client.unregister(SWAP_MODEL, SWAP_VERSION)
        time.sleep(settle_s)
    finally:
        outcomes = load_.stop()
    failed = failures(outcomes)
    remaining = sorted(d["modelVersion"] for d in client.describe(SWAP_MODEL, "all"))
    return {
        "model": SWAP_MODEL, "old_version": old, "new_version": SWAP_VERSION, "requests": len(outcomes),
        "concurrency": concurrency, "failures": len(failed),
        "failure_examples": [f"{o.model}: {o.status} {o.detail}" for o in failed[:5]],
        "default_after_set_default": new_default, "new_version_served_requests": served_new is not None,
        "default_after_rollback": rolled_back_default, "versions_after_rollback": remaining,
        **{k: round(v, 1) for k, v in steps.items()},
        "passed": not failed and new_default == SWAP_VERSION and served_new is not None
                  and rolled_back_default == old and remaining == [old],
    }


# ---------------------------------------------------------------- restart


def serving_state(server: Server) -> dict[str, Any]:
    """What a restart must keep: per model, the default version and each version's settings."""
    client = server.client()
    keys = ("modelUrl", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
    return {m: {"default": client.describe(m)[0]["modelVersion"],
                "versions": {d["modelVersion"]: {k: d.get(k) for k in keys} for d in client.describe(m, "all")}}
            for m in MODELS}


def restart(server: Server) -> dict[str, Any]:
    """Make SWAP_VERSION the default (so the state differs from a fresh start), stop, start, compare; then roll
    back to the old default and unregister SWAP_VERSION, leaving the server as it was."""
    client = server.client()
    old = default_version(server, SWAP_MODEL)
    if not (server.model_store / f"{SWAP_MODEL}-{SWAP_VERSION}.mar").exists():
        built = run_archive(server.checkpoints[SWAP_MODEL], SWAP_VERSION, server.model_store)
        if built.returncode != 0:
            raise RuntimeError(f"archive.py failed: {built.stdout[-2000:]}{built.stderr[-2000:]}")
    try:
        if SWAP_VERSION not in [d["modelVersion"] for d in client.describe(SWAP_MODEL, "all")]:
            client.register(f"{SWAP_MODEL}-{SWAP_VERSION}.mar")
        client.set_default(SWAP_MODEL, SWAP_VERSION)
        before = serving_state(server)
        started = time.monotonic()
        restart_server(server)
        seconds = time.monotonic() - started
        after = serving_state(server)
        answers = {m: client.generate(m, body, check=False).status_code
                   for m, body in load_mix(served_descriptions(server)[0])[:3]}
    finally:
        client.set_default(SWAP_MODEL, old)
        client.unregister(SWAP_MODEL, SWAP_VERSION)
    return {
        "before": before, "after": after, "same": before == after, "restart_s": round(seconds, 1),
        "answers_after_restart": answers,
        "passed": before == after and all(code == 200 for code in answers.values()),
    }


# ---------------------------------------------------------------- main


def batching(server: Server) -> dict[str, dict[str, Any]]:
    """The batch settings the archives were registered with, as the management API reports them."""
    client = server.client()
    keys = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout")
    return {m: {k: d.get(k) for k in keys} for m in MODELS for d in client.describe(m)[:1]}


def run_checks(server: Server, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for check in CHECKS:
        if check not in args.checks:
            continue
        if time.monotonic() > deadline:
            results[check] = {"passed": False, "skipped": "out of time (--max-minutes)"}
            continue
        print(f"--- {check}", flush=True)
        try:
            if check == "fuzz":
                results[check] = fuzz(server, args.fuzz_bodies, args.seed, deadline, args.concurrency)
            elif check == "load":
                results[check] = load(server, args.load_requests, args.concurrency)
            elif check == "kill":
                results[check] = kill_workers(server, args.concurrency)
            elif check == "swap":
                results[check] = hot_swap(server, args.concurrency)
            else:
                results[check] = restart(server)
        except Exception as error:  # a check that cannot finish fails; the others still run
            results[check] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps({k: v for k, v in results[check].items() if k not in ("before", "after")}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes
    report: dict[str, Any] = {
        "command": "python scripts/stress.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(torch.device("cpu")),
        "load_average_at_start": os.getloadavg(), "settings": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v
                                                               for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="stress-") as temp:
        work = args.work_dir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        with running_server(work, via_serve_sh=True) as server:
            report["server_start_s"] = round(time.monotonic() - started, 1)
            report["batching"] = batching(server)
            report["checks"] = run_checks(server, args, deadline)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["passed"] = all(result["passed"] for result in report["checks"].values())
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: "
          + ", ".join(f"{name} {'ok' if r['passed'] else 'FAILED'}" for name, r in report["checks"].items())
          + f"; {report['seconds']} s; figures in {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
