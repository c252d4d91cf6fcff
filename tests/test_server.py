"""End-to-end tests against a real TorchServe serving the diffusion, ebm and gan archives.

Everything goes over HTTP to the server started by the `server` fixture (tests/conftest.py);
nothing is mocked. Tests leave the server as they found it, so their order does not matter.
"""
from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from generators.imaging import grid_size, to_uint8
from generators.params import validate
from generators.pipelines import load_pipeline
from scripts.serving_api import ServerError
from tests.conftest import HTTP_TIMEOUT, MODELS, VERSION, run_archive

pytestmark = pytest.mark.server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixel mode and side of one image; cheap settings so the suite stays fast on 2 CPU cores.
SPEC = {
    "diffusion": {"mode": "RGB", "side": 32, "fast": {"steps": 5}},
    "ebm": {"mode": "RGB", "side": 32, "fast": {"levels": 3}},
    "gan": {"mode": "L", "side": 28, "fast": {}},
}
# (width, height) of the PNG for n images: one image, or a near-square grid with 2-pixel padding.
EXPECTED_SIZE = {
    ("diffusion", 1): (32, 32), ("diffusion", 16): (138, 138),
    ("ebm", 1): (32, 32), ("ebm", 16): (138, 138),
    ("gan", 1): (28, 28), ("gan", 16): (122, 122), ("gan", 5): (92, 62),  # 5 -> 3 columns x 2 rows
}


def decode_png(data: bytes) -> Image.Image:
    assert data[:8] == PNG_SIGNATURE, f"not a PNG: {data[:80]!r}"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def params(model: str, **extra) -> dict:
    return {**SPEC[model]["fast"], **extra}


def assert_rejected(response: requests.Response, field: str | tuple[str, ...]) -> dict:
    """400 with the JSON error body naming `field` (every name in a tuple), and no image."""
    assert response.status_code == 400, f"{response.status_code}: {response.content[:300]!r}"
    assert not response.content.startswith(PNG_SIGNATURE)
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    assert body["code"] == 400
    assert isinstance(body["error"], str) and body["error"]
    for name in (field,) if isinstance(field, str) else field:
        assert name in body["field"], body
    return body


def assert_refused(response: requests.Response) -> None:
    """An authentication failure: a 4xx, and certainly no image."""
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.content[:300]!r}"
    assert not response.content.startswith(PNG_SIGNATURE)
    assert "image/png" not in response.headers.get("Content-Type", "")


def auth(server, token: str | None) -> dict:
    """Headers for a key kind ('inference', 'management'), a literal Authorization value, or none."""
    if token in ("inference", "management"):
        return {"Authorization": f"Bearer {server.key(token)}"}
    return {"Authorization": token} if token else {}


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("model,n", sorted(EXPECTED_SIZE))
def test_png_has_the_right_size(client, model, n):
    response = client.generate(model, params(model, n_images=n, seed=1))
    assert response.headers["Content-Type"].startswith("image/png")
    image = decode_png(response.content)
    side = SPEC[model]["side"]
    assert image.size == EXPECTED_SIZE[model, n] == grid_size(n, side, side)
    assert image.mode == SPEC[model]["mode"]
    assert response.headers["X-Seed"] == "1"


@pytest.mark.parametrize("model", MODELS)
def test_json_format_returns_each_image(client, model):
    response = client.generate(model, params(model, n_images=3, seed=7, format="json"))
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert len(body["images"]) == 3
    side = SPEC[model]["side"]
    for encoded in body["images"]:
        image = decode_png(base64.b64decode(encoded, validate=True))
        assert image.size == (side, side) and image.mode == SPEC[model]["mode"]
    assert body["seed"] == 7 and response.headers["X-Seed"] == "7"
    # a random class (a digit for the GAN) per image by default, named in the body and, for a PNG too, in a header
    assert response.headers["X-Classes"] == ",".join(body["classes"]) and len(body["classes"]) == 3
    png = client.generate(model, params(model, n_images=3, seed=7))
    assert png.headers["X-Classes"] == response.headers["X-Classes"]
    assert body["parameters"]["n_images"] == 3 and body["parameters"]["format"] == "json"
    # The three images of one request are different samples.
    assert len(set(body["images"])) == 3


@pytest.mark.parametrize("model,extra", [
    ("diffusion", {}), ("diffusion", {"sampler": "ddpm", "class_label": "cat"}), ("ebm", {}), ("gan", {}),
    ("gan", {"digit": 3}),
], ids=["diffusion-ddim", "diffusion-ddpm-cat", "ebm", "gan", "gan-digit"])
def test_same_seed_same_bytes_other_seed_other_bytes(client, model, extra):
    first = client.generate(model, params(model, n_images=2, seed=123, **extra)).content
    again = client.generate(model, params(model, n_images=2, seed=123, **extra)).content
    other = client.generate(model, params(model, n_images=2, seed=124, **extra)).content
    decode_png(first)
    assert first == again
    assert first != other


def test_random_seed_is_reported_and_replayable(client):
    first = client.generate("gan", {"n_images": 2})
    second = client.generate("gan", {"n_images": 2})
    seeds = [int(first.headers["X-Seed"]), int(second.headers["X-Seed"])]
    assert seeds[0] != seeds[1]  # drawn from 2**63 values
    replay = client.generate("gan", {"n_images": 2, "seed": seeds[0]})
    assert replay.content == first.content


# ---------------------------------------------------------------- bad input


BAD_BODIES = [
    ("gan", {"n_image": 4}, "n_image"),
    ("gan", {"n_images": "4"}, "n_images"),
    ("gan", {"n_images": True}, "n_images"),
    ("gan", {"n_images": 4.0}, "n_images"),
    ("gan", {"n_images": 65}, "n_images"),
    ("gan", {"n_images": 0}, "n_images"),
    ("gan", {"seed": -1}, "seed"),
    ("gan", {"format": "jpeg"}, "format"),
    ("gan", {"digit": 10}, "digit"),
    ("diffusion", {"steps": 0}, "steps"),
    ("diffusion", {"class_label": "dragon"}, "class_label"),
    ("diffusion", {"guidance_scale": "strong", "class_label": "cat"}, "guidance_scale"),
    ("diffusion", {"n_images": 64, "steps": 1000}, ("n_images", "steps")),
    ("ebm", {"levels": 0}, "levels"),
    ("ebm", {"n_images": 64, "levels": 1000}, ("n_images", "levels")),
    ("ebm", {"steps": 5}, "steps"),  # a diffusion parameter is unknown to the EBM
    ("ebm", {"digit": 3}, "digit"),  # a GAN parameter is unknown to the EBM
    ("gan", [1, 2], "body"),
    ("gan", 4, "body"),
]


@pytest.mark.parametrize("model,body,field", BAD_BODIES, ids=[f"{m}-{json.dumps(b)}" for m, b, _ in BAD_BODIES])
def test_bad_parameters_are_rejected(client, model, body, field):
    assert_rejected(client.generate(model, body, check=False), field)


@pytest.mark.parametrize("data,content_type", [
    (b"n_images=4", "application/json"),
    (b"{\"n_images\": 4", "application/json"),
    (b"not json", "text/plain"),
    (b"\xff\xfe\x00", "application/octet-stream"),
], ids=["form-as-json", "truncated-json", "text", "binary"])
def test_non_json_body_is_rejected(server, data, content_type):
    assert_rejected(server.post_raw("gan", data, content_type), "body")


@pytest.mark.parametrize("content_type", ["application/json", None])
def test_empty_body_is_rejected(server, content_type):
    assert_rejected(server.post_raw("gan", b"", content_type), "body")


def test_form_fields_are_rejected(server):
    # TorchServe hands form fields to the handler as separate inputs; they must not be ignored.
    # (Query-string parameters on a POST are dropped by TorchServe 0.12 before the handler sees them.)
    response = requests.post(f"{server.inference_url}/predictions/gan", data={"n_images": "4"},
                             headers=auth(server, "inference"), timeout=HTTP_TIMEOUT)
    assert_rejected(response, "n_images")


def test_workers_survive_bad_requests(server, client):
    for model in MODELS:
        assert_rejected(client.generate(model, {"n_images": 65}, check=False), "n_images")
        assert_rejected(server.post_raw(model, b"{oops", "application/json"), "body")
        assert_rejected(server.post_raw(model, b""), "body")
    for model in MODELS:
        workers = server.workers(model)
        assert workers and all(w["status"] == "READY" for w in workers), workers
        decode_png(client.generate(model, params(model, seed=5)).content)


# ---------------------------------------------------------------- token authorization


@pytest.mark.parametrize("token", [None, "Bearer wrong-key", "management"], ids=["none", "wrong", "management-key"])
def test_inference_needs_the_inference_key(server, token):
    assert_refused(server.post_raw("gan", json.dumps({"n_images": 1}), token=token))
    assert_refused(requests.get(f"{server.inference_url}/ping", headers=auth(server, token), timeout=HTTP_TIMEOUT))


def test_inference_key_works(server, client):
    assert client.ping()["status"] == "Healthy"
    assert server.post_raw("gan", json.dumps({"n_images": 1}), token="inference").content.startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("token", [None, "Bearer wrong-key", "inference"], ids=["none", "wrong", "inference-key"])
def test_management_needs_the_management_key(server, client, token):
    headers = auth(server, token)
    url = server.management_url
    assert_refused(requests.get(f"{url}/models", headers=headers, timeout=HTTP_TIMEOUT))
    assert_refused(requests.get(f"{url}/models/gan", headers=headers, timeout=HTTP_TIMEOUT))
    assert_refused(requests.put(f"{url}/models/gan", params={"min_worker": 3, "synchronous": "true"},
                                headers=headers, timeout=HTTP_TIMEOUT))
    assert_refused(requests.delete(f"{url}/models/gan/{VERSION}", headers=headers, timeout=HTTP_TIMEOUT))
    # Nothing happened: gan is still registered, with its one worker.
    assert len(server.workers("gan")) == 1
    models = requests.get(f"{url}/models", headers=auth(server, "management"), timeout=HTTP_TIMEOUT).json()["models"]
    assert {m["modelName"] for m in models} == set(MODELS)


# ---------------------------------------------------------------- management


def wait_for_workers(server, model: str, count: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        workers = server.workers(model)
        if len(workers) == count and all(w["status"] == "READY" for w in workers):
            return workers
        if time.monotonic() > deadline:
            pytest.fail(f"{model}: wanted {count} READY workers, have {workers}\n{server.log_tail()}")
        time.sleep(0.5)


def test_scale_gan_up_and_down(server, client):
    try:
        client.scale("gan", 2)
        wait_for_workers(server, "gan", 2)
        decode_png(client.generate("gan", {"seed": 1}).content)
        client.scale("gan", 1)
        wait_for_workers(server, "gan", 1)
    finally:
        if len(server.workers("gan")) != 1:
            client.scale("gan", 1)
    decode_png(client.generate("gan", {"seed": 1}).content)


def test_register_second_version_and_set_default(server, client):
    done = run_archive(server.checkpoints["gan"], "2.0", server.model_store, "--register", "--set-default",
                       "--management-url", server.management_url, "--key-file", str(server.key_file))
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert (server.model_store / "gan-2.0.mar").exists()
        assert client.describe("gan")[0]["modelVersion"] == "2.0"
        listing = client.describe("gan", "all")
        assert sorted(d["modelVersion"] for d in listing) == ["1.0", "2.0"]
        wait_for_workers(server, "gan", 1)
        assert len(server.workers("gan", "2.0")) == 1
        old = client.generate("gan", {"seed": 9}, version="1.0")
        default = client.generate("gan", {"seed": 9})
        assert decode_png(old.content).size == decode_png(default.content).size == (28, 28)
        meta = customized(client, "gan", "2.0")
        assert meta["version"] == "2.0"
    finally:  # leave gan as the other tests expect it, whatever failed above
        for undo in (lambda: client.set_default("gan", VERSION), lambda: client.unregister("gan", "2.0")):
            try:
                undo()
            except ServerError:
                pass
    assert client.describe("gan")[0]["modelVersion"] == VERSION
    assert [d["modelVersion"] for d in client.describe("gan", "all")] == [VERSION]


@pytest.mark.parametrize("url", ["https://example.com/gan-3.0.mar", "file:///etc/passwd"])
def test_register_refuses_urls_outside_allowed_urls(server, client, url):
    response = requests.post(f"{server.management_url}/models", params={"url": url, "synchronous": "true"},
                             headers=auth(server, "management"), timeout=HTTP_TIMEOUT)
    assert 400 <= response.status_code < 500, response.text
    assert "allowed" in response.text.lower(), response.text
    assert [d["modelVersion"] for d in client.describe("gan", "all")] == [VERSION]


def customized(client, model: str, version: str | None = None) -> dict:
    meta = client.describe(model, version, customized=True)[0]["customizedMetadata"]
    return json.loads(meta) if isinstance(meta, str) else meta


@pytest.mark.parametrize("model", MODELS)
def test_customized_metadata(server, client, model):
    meta = customized(client, model)
    config = server.configs[model]
    assert meta["model_type"] == model and meta["model_name"] == model and meta["version"] == VERSION
    assert meta["device"] == "cpu"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    assert meta["weights_sha256"] == config["weights_sha256"]
    assert meta["training"]["steps"] == config["training"]["steps"]
    parameters = meta["parameters"]
    assert {"n_images", "seed", "format"} <= set(parameters)
    assert parameters["n_images"]["max"] == 64 and parameters["n_images"]["default"] == 1
    expected = {"diffusion": {"steps", "sampler", "timestep_spacing", "class_label", "guidance_scale"},
                "ebm": {"levels", "corrector_steps", "snr", "timestep_spacing", "class_label", "guidance_scale"},
                "gan": {"digit"}}[model]
    assert expected <= set(parameters)


# ---------------------------------------------------------------- metrics


def metric_values(server, name: str) -> dict[str, float]:
    """Prometheus lines `name{...ModelName="m"...} value` -> {m: value} (summed over other labels)."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=HTTP_TIMEOUT)  # no token needed
    assert response.status_code == 200
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = re.match(rf'{name}\{{(.*)\}}\s+(\S+)$', line)
        if match:
            model = re.search(r'ModelName="([^"]*)"', match.group(1))
            assert model, f"no ModelName label: {line}"
            values[model.group(1)] = values.get(model.group(1), 0.0) + float(match.group(2))
    return values


def test_metrics_count_images_per_model(server, client):
    before = metric_values(server, "ImagesGenerated")
    for model in MODELS:
        client.generate(model, params(model, n_images=3, seed=2))
    deadline = time.monotonic() + 30  # the frontend picks metrics up from the worker's log asynchronously
    while True:
        after = metric_values(server, "ImagesGenerated")
        grown = {m: after.get(m, 0.0) - before.get(m, 0.0) for m in MODELS}
        if all(g >= 3 for g in grown.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(g >= 3 for g in grown.values()), (before, after)
    timing = metric_values(server, "SamplingTimePerImage")
    assert set(MODELS) <= set(timing), timing
    assert all(value > 0 for value in timing.values()), timing


# ---------------------------------------------------------------- concurrency


def test_concurrent_requests_are_answered_independently(server, client):
    good = [{"seed": 11, "n_images": 4}, {"seed": 12, "digit": 7}, {"seed": 13, "n_images": 2, "format": "json"}]
    reference = [client.generate("gan", body).content for body in good]
    jobs = [
        ("good", 0, lambda: client.generate("gan", good[0], check=False)),
        ("bad", "n_images", lambda: client.generate("gan", {"n_images": 65}, check=False)),
        ("good", 1, lambda: client.generate("gan", good[1], check=False)),
        ("bad", "body", lambda: server.post_raw("gan", b"{not json", "application/json")),
        ("good", 2, lambda: client.generate("gan", good[2], check=False)),
        ("bad", "digit", lambda: client.generate("gan", {"digit": -1}, check=False)),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(call) for _, _, call in jobs]
        responses = [f.result(timeout=HTTP_TIMEOUT) for f in futures]
    for (kind, expected, _), response in zip(jobs, responses):
        if kind == "bad":
            assert_rejected(response, expected)
        else:
            assert response.status_code == 200, response.text[:300]
            assert response.content == reference[expected]


# ---------------------------------------------------------------- served == in-process


@pytest.mark.parametrize("model,extra", [("diffusion", {"class_label": "ship"}), ("ebm", {"class_label": "cat"}),
                                         ("gan", {})], ids=["diffusion", "ebm", "gan"])
def test_served_sample_equals_the_in_process_one(server, client, model, extra):
    body = params(model, n_images=2, seed=2024, format="json", **extra)
    served = client.generate(model, body).json()["images"]
    pipeline = load_pipeline(server.checkpoints[model])
    local = to_uint8(pipeline.sample(validate(body, pipeline.param_specs()), torch.Generator().manual_seed(2024)))
    for encoded, expected in zip(served, local):
        pixels = np.asarray(decode_png(base64.b64decode(encoded)), dtype=np.int16).reshape(expected.shape)
        # the worker may use another thread count, so float sums can round differently: 1 grey level at most
        assert np.abs(pixels - expected.astype(np.int16)).max() <= 1


# ---------------------------------------------------------------- EBM energies


def png_base64(pixels: np.ndarray, mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_ebm_scores_posted_images(client):
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 120, dtype=np.uint8)
    images = [png_base64(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), png_base64(flat)]
    first = client.generate("ebm", {"images": images}).json()
    again = client.generate("ebm", {"images": images, "timestep": first["timestep"]}).json()
    assert len(first["energies"]) == 2 and all(np.isfinite(first["energies"]))
    assert first["energies"] == again["energies"]
    assert first["energies"][0] != first["energies"][1]


def test_bad_images_to_score_are_rejected_and_the_worker_lives(server, client):
    good = png_base64(np.zeros((32, 32, 3), dtype=np.uint8))
    for body, field in [({"images": ["not base64!"]}, "images[0]"),
                        ({"images": [good, png_base64(np.zeros((32, 33, 3), dtype=np.uint8))]}, "images[1]"),
                        ({"images": [png_base64(np.zeros((32, 32, 4), dtype=np.uint8), "RGBA")]}, "images[0]"),
                        ({"images": [good] * 65}, "images"),
                        ({"images": []}, "images"),
                        ({"images": [good], "n_images": 2}, "n_images")]:
        assert_rejected(server.post_raw("ebm", json.dumps(body)), field)
    assert len(client.generate("ebm", {"images": [good]}).json()["energies"]) == 1
