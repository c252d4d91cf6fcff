"""Streamed progress: a request with "progress": true gets JSON progress lines, then the body it gets without
progress, as one chunked response; in a batch only the requests that asked get them."""
from __future__ import annotations

import base64
import json
import re
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from ts.protocol.otf_message_handler import create_predict_response

import torch

from generators.params import COMMON_PARAMS, validate
from generators.pipelines import load_pipeline
from handlers.generator_handler import GeneratorHandler
from scripts.serving_api import failure_after_progress, split_progress
from tests.conftest import HTTP_TIMEOUT, ROOT
from tests.synthetic import tiny_checkpoint
from tests.test_batching import BLOCKER
from tests.test_handler import make_context
from tests.test_server import decode_png

QUICK = {"steps": 4, "seed": 21}  # diffusion: 4 steps, one image, a fraction of a second


def post_chunks(server, model: str, body: dict) -> tuple[requests.Response, list[bytes]]:
    """POST with the inference key; the answer's HTTP chunks as TorchServe framed them."""
    response = requests.post(f"{server.inference_url}/predictions/{model}", json=body, stream=True,
                             headers={"Authorization": f"Bearer {server.key('inference')}"}, timeout=HTTP_TIMEOUT)
    chunks = list(response.raw.read_chunked()) if response.raw.chunked else [response.raw.read()]
    return response, chunks


def progress_events(chunks: list[bytes]) -> list[dict]:
    """Every chunk but the last is one progress line."""
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks[:-1]), chunks[:-1]
    return [json.loads(chunk) for chunk in chunks[:-1]]


def assert_progress_in_order(events: list[dict], steps: int) -> None:
    assert len(events) >= 2, events
    assert all(set(event) == {"progress", "step", "steps"} and event["steps"] == steps for event in events), events
    done = [event["step"] for event in events]
    assert done == sorted(set(done)) and done[-1] == steps, events
    assert [event["progress"] for event in events] == [round(step / steps, 4) for step in done]


def max_pixel_difference(png: bytes, reference: bytes) -> int:
    served, expected = (np.asarray(decode_png(data), dtype=np.int16) for data in (png, reference))
    return int(np.abs(served - expected).max())


@pytest.mark.parametrize("value", [1, "true", 0, [True]])
def test_progress_must_be_a_json_boolean(value):
    with pytest.raises(ValueError, match="progress: must be true or false"):
        validate({"progress": value}, COMMON_PARAMS)
    assert validate({}, COMMON_PARAMS)["progress"] is False


@pytest.mark.parametrize("model,body,steps", [("diffusion", {"steps": 3}, 3), ("ebm", {"levels": 2}, 2),
                                              ("gan", {}, 1)])
def test_the_samplers_report_every_step(tmp_path, model, body, steps):
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / model, model))
    params = validate(dict(body, seed=0), pipeline.param_specs())
    heard: list[tuple[int, int]] = []
    with_progress = pipeline.sample_group([params], [torch.Generator().manual_seed(0)],
                                          lambda step, total: heard.append((step, total)))
    assert heard == [(step, steps) for step in range(1, steps + 1)]
    assert torch.equal(with_progress, pipeline.sample(params, torch.Generator().manual_seed(0)))


def test_split_progress_holds_however_the_stream_is_cut():
    events = [{"progress": 0.5, "step": 1, "steps": 2}, {"progress": 1.0, "step": 2, "steps": 2}]
    final = json.dumps({"images": ["iVBORw0KGgo="], "seed": 3}, indent=2).encode()  # as TorchServe sends JSON
    stream = b"".join(json.dumps(event).encode() + b"\n" for event in events) + final
    for size in (1, 3, 7, len(stream)):
        seen: list[dict] = []
        assert split_progress([stream[i:i + size] for i in range(0, len(stream), size)], seen.append) == final
        assert seen == events
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # a body that holds newlines and braces
    assert split_progress([png[:5], png[5:]], seen.append) == png


def worker_messages(data: bytes) -> list[dict[str, bytes]]:
    """The worker's responses to the frontend (ts/protocol/otf_message_handler.py's framing): request id -> body."""
    position = 0

    def take(n: int) -> bytes:
        nonlocal position
        position += n
        return data[position - n:position]

    def number() -> int:
        return struct.unpack("!i", take(4))[0]

    messages = []
    while position < len(data):
        number(), take(number())  # status code, message
        bodies = {}
        while (id_length := number()) != -1:
            request_id = take(id_length).decode()
            take(number())  # content type
            number(), take(number())  # status code, reason phrase
            for _ in range(number()):  # headers
                take(number()), take(number())
            bodies[request_id] = take(number())
        messages.append(bodies)
    return messages


def test_a_failure_after_progress_ends_the_stream_with_the_error_object(tmp_path):
    """In-process, with TorchServe's own response framing on a socket pair in place of the frontend."""
    tiny_checkpoint(tmp_path / "checkpoint", "diffusion")
    handler = GeneratorHandler()
    handler.initialize(make_context(tmp_path, 1))
    bodies = [{"seed": 1, "class_label": "cat", "progress": True}, {"seed": 2, "class_label": "horse", "progress": True},
              {"seed": 3, "class_label": "cat"}]
    alone = handler.handle([{"body": dict(bodies[0], progress=False)}], make_context(tmp_path, 1))[0]
    context = make_context(tmp_path, len(bodies))
    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}
    worker_end, frontend_end = socket.socketpair()
    context.cl_socket = worker_end
    passes_with_horses = []

    def fail_on_horses_after_their_first_step(module, args):  # no valid request fails, so a failure is injected
        labels = args[2]
        if labels is not None and (labels == 7).any():
            passes_with_horses.append(1)
            if len(passes_with_horses) > 1:
                raise RuntimeError("injected failure")

    hook = handler.pipeline.unet.register_forward_pre_hook(fail_on_horses_after_their_first_step)
    try:
        outputs = handler.handle([{"body": body} for body in bodies], context)
        worker_end.sendall(create_predict_response(outputs, context.request_ids, "Prediction success", 200, context))
    finally:
        hook.remove()
        worker_end.close()
    with frontend_end:
        data = b"".join(iter(lambda: frontend_end.recv(65536), b""))
    messages = worker_messages(data)
    assert all(set(message) <= {"request-0", "request-1"} for message in messages[:-1])  # only those that asked
    streams = {request_id: b"".join(message.get(request_id, b"") for message in messages)
               for request_id in context.request_ids.values()}
    answers = {}
    for request_id, stream in streams.items():
        events: list[dict] = []
        answers[request_id] = split_progress([stream], events.append), events
    body, events = answers["request-0"]
    assert body == alone and failure_after_progress(body) is None
    assert_progress_in_order(events, events[-1]["steps"])
    body, events = answers["request-1"]
    assert len(events) >= 1 and failure_after_progress(body) == "sampling failed: RuntimeError"
    body, events = answers["request-2"]
    assert events == [] and decode_png(body)


@pytest.mark.server
def test_progress_lines_then_the_same_png(server):
    plain = server.client().generate("diffusion", QUICK)
    response, chunks = post_chunks(server, "diffusion", dict(QUICK, progress=True))
    assert response.status_code == 200 and response.headers["X-Seed"] == str(QUICK["seed"])
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Classes"] == plain.headers["X-Classes"]  # sent with the first line
    assert_progress_in_order(progress_events(chunks), QUICK["steps"])
    assert chunks[-1] == plain.content  # alone, the same bytes

    json_plain = server.client().generate("diffusion", dict(QUICK, format="json")).json()
    _, chunks = post_chunks(server, "diffusion", dict(QUICK, format="json", progress=True))
    assert_progress_in_order(progress_events(chunks), QUICK["steps"])
    assert json.loads(chunks[-1])["images"] == json_plain["images"]


@pytest.mark.server
def test_a_bad_request_with_progress_gets_its_400_without_progress(server):
    response, chunks = post_chunks(server, "diffusion", {"steps": 0, "progress": True})
    assert response.status_code == 400 and len(chunks) == 1
    assert json.loads(chunks[0])["field"] == "steps"


@pytest.mark.server
def test_in_a_batch_only_the_requests_that_asked_get_progress(server):
    client = server.client()
    bodies = [dict(QUICK, seed=31, progress=True), dict(QUICK, seed=32), dict(QUICK, seed=33, progress=True),
              dict(QUICK, seed=34, format="json"), {"steps": 0, "progress": True}]
    alone = {body["seed"]: client.generate("diffusion", dict(body, format="png", progress=False)).content
             for body in bodies[:4]}
    with ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool:
        blocker = pool.submit(client.generate, "diffusion", BLOCKER, check=False)
        time.sleep(1.0)  # the worker has taken the blocker alone and is sampling it
        futures = [pool.submit(post_chunks, server, "diffusion", body) for body in bodies]
        answers = [future.result(timeout=HTTP_TIMEOUT) for future in futures]
        assert blocker.result(timeout=HTTP_TIMEOUT).status_code == 200
    logged = re.findall(rf"batch of {len(bodies)} requests: 4 sampled in groups of \[4\], 0 scored, 1 rejected",
                        server.log_tail(lines=400))
    assert logged, server.log_tail()  # sampled together, so the comparisons below allow one grey level

    for body, (response, chunks) in zip(bodies[:4], answers):
        assert response.status_code == 200 and response.headers["X-Seed"] == str(body["seed"])
        if body.get("progress"):
            assert_progress_in_order(progress_events(chunks), QUICK["steps"])
        else:
            assert len(chunks) == 1, chunks[:-1]
        if body.get("format") == "json":
            assert response.headers["Content-Type"] == "application/json"
            png = base64.b64decode(json.loads(chunks[-1])["images"][0])
        else:
            png = chunks[-1]
        assert max_pixel_difference(png, alone[body["seed"]]) <= 1, body
    response, chunks = answers[-1]
    assert response.status_code == 400 and len(chunks) == 1 and json.loads(chunks[0])["field"] == "steps"


@pytest.mark.server
def test_the_client_shows_a_bar_and_writes_the_final_png(server, tmp_path):
    reference = server.client().generate("diffusion", QUICK).content
    output = tmp_path / "progress.png"
    common = [sys.executable, "scripts/client.py", "--inference-url", server.inference_url, "--management-url",
              server.management_url, "--key-file", str(server.key_file), "generate", "diffusion", "--progress"]
    result = subprocess.run(common + ["--seed", str(QUICK["seed"]), "-p", f"steps={QUICK['steps']}", "-o",
                                      str(output)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == reference
    assert "diffusion sampling" in result.stderr and f"{QUICK['steps']}/{QUICK['steps']}" in result.stderr
    classes = server.client().generate("diffusion", QUICK).headers["X-Classes"]  # a random class by default
    assert result.stdout.strip() == f"wrote {output} (seed {QUICK['seed']}; classes {classes.replace(',', ', ')})"

    refused = subprocess.run(common + ["-p", "steps=0", "-o", str(tmp_path / "never.png")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "steps" in refused.stderr, refused.stderr
    assert not (tmp_path / "never.png").exists()
