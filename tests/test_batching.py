"""Dynamic batching: requests sampled together get the images they get alone, incompatible ones are grouped
apart, a failure fails only its own request; and a live TorchServe really batches concurrent requests."""
import io
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from generators.imaging import to_uint8
from generators.params import validate
from generators.pipelines import MAX_IMAGES, load_pipeline
from handlers.generator_handler import GeneratorHandler
from tests.conftest import HTTP_TIMEOUT
from tests.synthetic import tiny_checkpoint
from tests.test_handler import make_context
from tests.test_server import decode_png, metric_values


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {m: load_pipeline(tiny_checkpoint(root / m, m)) for m in ("diffusion", "ebm", "gan")}


def validated(pipeline, bodies: list[dict]) -> list[dict]:
    return [validate(body, pipeline.param_specs()) for body in bodies]


# Requests that can share one group: other seeds, sizes and labels (random classes among them); an unconditional
# request beside conditional ones whose guidance acts at no step (tiny checkpoints: 4 steps, 3 levels, guidance 2
# by default).
COMPATIBLE = {
    "diffusion-ddim": ("diffusion", [
        {"seed": 1, "n_images": 2, "class_label": "none"}, {"seed": 2, "class_label": "cat", "guidance_scale": 1.0},
        {"seed": 3, "n_images": 3, "class_label": 5, "guidance_scale": 4.0, "guidance_t_max": 100}]),
    "diffusion-ddim-guided": ("diffusion", [
        {"seed": 4, "class_label": 1, "guidance_rescale": 0.5, "n_images": 2},
        {"seed": 5, "class_label": 8, "guidance_rescale": 0.5}, {"seed": 19, "n_images": 3, "guidance_rescale": 0.5}]),
    "diffusion-ddpm": ("diffusion", [
        {"seed": 6, "sampler": "ddpm", "n_images": 2, "class_label": "none"}, {"seed": 7, "sampler": "ddpm", "class_label": 2,
                                                         "guidance_scale": 1.0}]),
    "diffusion-ddpm-guided": ("diffusion", [
        {"seed": 8, "sampler": "ddpm", "class_label": 3}, {"seed": 9, "sampler": "ddpm", "class_label": 9,
                                                             "n_images": 3}]),
    "diffusion-dpm++2m-guided": ("diffusion", [
        {"seed": 10, "sampler": "dpm++2m", "class_label": 0}, {"seed": 11, "sampler": "dpm++2m", "class_label": 4}]),
    "ebm": ("ebm", [{"seed": 12, "n_images": 2, "class_label": "none"}, {"seed": 13, "class_label": 6, "guidance_scale": 1.0}]),
    "ebm-guided": ("ebm", [{"seed": 14, "class_label": 6}, {"seed": 15, "class_label": 2, "n_images": 2},
                           {"seed": 20, "n_images": 2}]),
    "gan": ("gan", [{"seed": 16, "n_images": 3}, {"seed": 17, "digit": 4}, {"seed": 18, "n_images": 2, "digit": 1}]),
}


@pytest.mark.parametrize("case", sorted(COMPATIBLE))
def test_requests_sampled_together_get_their_images_alone(pipelines, case):
    model, bodies = COMPATIBLE[case]
    pipeline = pipelines[model]
    requests = validated(pipeline, bodies)
    assert pipeline.groups(requests) == [list(range(len(requests)))]
    generators = [torch.Generator().manual_seed(r["seed"]) for r in requests]
    together = pipeline.sample_group(requests, generators).split([r["n_images"] for r in requests])
    for params, images in zip(requests, together):
        alone = pipeline.sample(params, torch.Generator().manual_seed(params["seed"]))
        assert images.shape == alone.shape
        assert (images - alone).abs().max() < 1e-4, params  # batched kernels may round differently
        difference = np.abs(to_uint8(images).astype(int) - to_uint8(alone).astype(int))
        assert difference.max() <= 1, params


def test_incompatible_requests_are_grouped_apart_and_never_rejected(pipelines):
    diffusion = pipelines["diffusion"]
    requests = validated(diffusion, [
        {"seed": 1, "class_label": "none"},                         # 0: unconditional ddim, 4 steps
        {"seed": 2, "sampler": "ddpm"},                             # 1: other sampler (a random class)
        {"seed": 3, "steps": 5},                                    # 2: other steps
        {"seed": 4, "class_label": 1},                              # 3: guided at scale 2
        {"seed": 5, "class_label": 2, "guidance_scale": 3.0},       # 4: another scale
        {"seed": 6, "class_label": 3, "guidance_t_min": 500},       # 5: another interval
        {"seed": 7, "class_label": 4, "guidance_rescale": 0.7},     # 6: rescaled
        {"seed": 8, "class_label": 5, "guidance_scale": 1.0},       # 7: plain conditional: same as 0
        {"seed": 9, "class_label": 6, "n_images": 4},               # 8: same as 3
        {"seed": 10, "steps": 5, "n_images": 2},                    # 9: same as 2
        {"seed": 11, "timestep_spacing": "linspace"},               # 10: other noise levels
        {"seed": 12, "class_label": 7, "guidance_parallel": 0.0},   # 11: no update along the image
    ])
    assert diffusion.groups(requests) == [[0, 7], [1], [2, 9], [3, 8], [4], [5], [6], [10], [11]]
    ebm = pipelines["ebm"]
    requests = validated(ebm, [
        {"seed": 1, "class_label": "none"}, {"seed": 2, "levels": 4}, {"seed": 3, "corrector_steps": 2}, {"seed": 4, "snr": 0.1},
        {"seed": 5, "class_label": 1}, {"seed": 6, "class_label": 2, "guidance_scale": 3.0},
        {"seed": 7, "class_label": 3, "guidance_scale": 1.0}, {"seed": 8, "class_label": 4},
        {"seed": 9, "timestep_spacing": "linspace"}])
    assert ebm.groups(requests) == [[0, 6], [1], [2], [3], [4, 7], [5], [8]]
    gan = pipelines["gan"]
    assert gan.groups(validated(gan, [{"seed": 1}, {"digit": 3}, {"n_images": 64}])) == [[0, 1], [2]]


def test_a_group_stays_within_one_requests_limits(pipelines):
    diffusion = pipelines["diffusion"]
    steps = diffusion.max_work // (3 * 8)  # 8 unconditional images at this many steps: a third of max_work
    requests = validated(diffusion, [{"seed": s, "n_images": 8, "steps": steps, "class_label": "none"} for s in range(4)])
    assert sum(diffusion.work(r) for r in requests) > diffusion.max_work
    groups = diffusion.groups(requests)
    assert groups == [[0, 1, 2], [3]]
    assert all(sum(diffusion.work(requests[i]) for i in g) <= diffusion.max_work for g in groups)
    gan = pipelines["gan"]
    requests = validated(gan, [{"n_images": 40}, {"n_images": 30}, {"n_images": 24}, {"n_images": 1}])
    assert gan.groups(requests) == [[0, 2], [1, 3]]
    assert all(sum(requests[i]["n_images"] for i in g) <= MAX_IMAGES for g in gan.groups(requests))


def test_random_classes_come_from_the_seed_and_leave_its_noise_alone(tmp_path):
    """The default class_label draws a class per image from the seed, on a stream apart from the noise: each image
    equals the one sampled with its class asked by name, and image_classes names those classes."""
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "diffusion", "diffusion"))
    torch.manual_seed(1)
    for weight in pipeline.unet.parameters():  # the untrained net's zero-initialised layers would ignore the class
        weight.add_(0.05 * torch.randn_like(weight))

    def images(body: dict) -> torch.Tensor:
        params = validate(dict(body, n_images=8), pipeline.param_specs())
        return pipeline.sample(params, torch.Generator().manual_seed(params["seed"]))

    params = validate({"seed": 7, "n_images": 8}, pipeline.param_specs())
    classes = pipeline.image_classes(params)
    assert len(classes) == 8 and len(set(classes)) > 1
    assert classes == pipeline.image_classes(dict(params)) != pipeline.image_classes(dict(params, seed=8))
    random = images({"seed": 7})
    for name in set(classes):
        named = images({"seed": 7, "class_label": name})
        for i in (i for i, c in enumerate(classes) if c == name):
            assert (random[i] - named[i]).abs().max() < 1e-5, (i, name)
    other = next(c for c in pipeline.class_names if c != classes[0])
    assert (random[0] - images({"seed": 7, "class_label": other})[0]).abs().max() > 1e-3  # the class matters


def test_random_digits_come_from_the_seed_and_leave_its_noise_alone(tmp_path):
    """The GAN draws a missing digit as the other models draw a random class: each image equals the one asked
    with its digit, and image_classes names the digits."""
    pipeline = load_pipeline(tiny_checkpoint(tmp_path / "gan", "gan"))

    def images(body: dict) -> torch.Tensor:
        params = validate(dict(body, n_images=8), pipeline.param_specs())
        return pipeline.sample(params, torch.Generator().manual_seed(params["seed"]))

    digits = pipeline.image_classes(validate({"seed": 7, "n_images": 8}, pipeline.param_specs()))
    assert len(set(digits)) > 1
    random = images({"seed": 7})
    for digit in set(digits):
        named = images({"seed": 7, "digit": int(digit)})
        for i in (i for i, d in enumerate(digits) if d == digit):
            assert (random[i] - named[i]).abs().max() < 1e-5, (i, digit)
    other = next(d for d in range(10) if str(d) != digits[0])
    assert (random[0] - images({"seed": 7, "digit": other})[0]).abs().max() > 1e-3  # the digit matters


def handle(handler, model_dir, bodies: list) -> tuple[list, list[int]]:
    context = make_context(model_dir, len(bodies))
    outputs = handler.handle([{"body": b} for b in bodies], context)
    return outputs, [p.get_response_status_code() for p in context.request_processor]


def emitted(caplog, metric: str) -> float:
    """The sum of a metric's values as the handler logs them for TorchServe's frontend."""
    lines = [record.getMessage() for record in caplog.records]
    return sum(float(m.group(1)) for line in lines for m in [re.search(rf"\[METRICS\]{metric}\.\w+:([\d.]+)\|", line)]
               if m)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_a_failing_request_fails_alone_and_its_group_is_sampled_again(tmp_path, caplog):
    tiny_checkpoint(tmp_path / "checkpoint", "diffusion")
    handler = GeneratorHandler()
    handler.initialize(make_context(tmp_path, 1))
    bodies = [{"seed": 1, "class_label": "cat", "n_images": 2}, {"seed": 2, "class_label": "horse"},
              {"seed": 3, "class_label": "cat"}, {"steps": 0}, {"seed": 4, "class_label": "ship"}]
    alone = [handle(handler, tmp_path, [body])[0][0] for body in bodies]

    def fail_on_horses(module, args):  # no real request fails once validated, so a failure is injected
        labels = args[2]
        if labels is not None and (labels == 7).any():
            raise RuntimeError("injected failure")

    hook = handler.pipeline.unet.register_forward_pre_hook(fail_on_horses)
    caplog.set_level(logging.INFO)
    caplog.clear()
    try:
        outputs, statuses = handle(handler, tmp_path, bodies)
    finally:
        hook.remove()
    assert statuses == [200, 500, 200, 400, 200]
    assert outputs[1] == {"code": 500, "error": "sampling failed: RuntimeError"}
    assert outputs[3]["field"] == "steps"
    for i in (0, 2, 4):
        assert np.abs(pixels(outputs[i]) - pixels(alone[i])).max() <= 1
    assert "sampling 4 requests together failed; sampling them one by one" in caplog.text
    assert emitted(caplog, "ImagesGenerated") == 4 and emitted(caplog, "RequestsSampledTogether") == 0


def test_the_handler_samples_a_batch_in_groups_and_counts_them(tmp_path, caplog):
    tiny_checkpoint(tmp_path / "checkpoint", "ebm")
    handler = GeneratorHandler()
    handler.initialize(make_context(tmp_path, 1))
    bodies = [{"seed": 1, "class_label": 2}, {"seed": 2, "levels": 2}, {"seed": 3, "class_label": 5, "n_images": 2},
              {"seed": 4, "levels": 2, "format": "json"}]
    caplog.set_level(logging.INFO)
    outputs, statuses = handle(handler, tmp_path, bodies)
    assert statuses == [200] * 4
    assert emitted(caplog, "RequestsSampledTogether") == 4  # groups [0, 2] and [1, 3]
    assert "batch of 4 requests: 4 sampled in groups of [2, 2], 0 scored, 0 rejected" in caplog.text
    for body, output in zip(bodies[:3], outputs[:3]):
        assert np.abs(pixels(output) - pixels(handle(handler, tmp_path, [body])[0][0])).max() <= 1
    assert outputs[3]["seed"] == 4 and len(outputs[3]["images"]) == 1


# ---------------------------------------------------------------- live server

# Distinct seeds and parameters, cheap steps: groups [0, 1], [2, 3], [4], [5], [6] (in arrival order); one bad request.
LIVE_BODIES = [
    {"steps": 4, "seed": 101, "n_images": 2, "class_label": "none"},
    {"steps": 4, "seed": 102, "class_label": "cat", "guidance_scale": 1.0},
    {"steps": 4, "seed": 103, "class_label": "ship"},
    {"steps": 4, "seed": 104, "class_label": "dog", "n_images": 3},
    {"steps": 4, "seed": 105, "sampler": "ddpm", "class_label": "frog"},
    {"steps": 4, "seed": 106, "sampler": "ddpm", "class_label": "none"},
    {"steps": 3, "seed": 107, "class_label": "truck", "guidance_scale": 2.0},
    {"steps": 0},
]
BLOCKER = {"steps": 80, "n_images": 2, "seed": 100}  # keeps the worker busy while the others queue up


@pytest.mark.server
def test_concurrent_requests_are_batched_and_answered_as_when_alone(server):
    client = server.client()
    good = [body for body in LIVE_BODIES if body.get("steps") != 0]
    alone = [client.generate("diffusion", body).content for body in good]
    pipeline = load_pipeline(server.checkpoints["diffusion"])
    groups = pipeline.groups(validated(pipeline, good))
    expected_together = sum(len(g) for g in groups if len(g) > 1)
    assert expected_together == 4
    before = metric_values(server, "RequestsSampledTogether").get("diffusion", 0.0)

    with ThreadPoolExecutor(max_workers=len(LIVE_BODIES) + 1) as pool:
        blocker = pool.submit(client.generate, "diffusion", BLOCKER, check=False)
        time.sleep(1.0)  # the worker has taken the blocker alone and is sampling it
        futures = [pool.submit(client.generate, "diffusion", body, check=False) for body in LIVE_BODIES]
        responses = [f.result(timeout=HTTP_TIMEOUT) for f in futures]
        assert blocker.result(timeout=HTTP_TIMEOUT).status_code == 200
    for response, reference, body in zip(responses, alone, good):
        assert response.status_code == 200, response.text[:300]
        assert response.headers["X-Seed"] == str(body["seed"])
        served, expected = (np.asarray(decode_png(png), dtype=np.int16) for png in (response.content, reference))
        assert np.abs(served - expected).max() <= 1, body
    assert responses[-1].status_code == 400 and responses[-1].json()["field"] == "steps"

    deadline = time.monotonic() + 30  # the frontend reads metrics from the worker's log asynchronously
    while (grown := metric_values(server, "RequestsSampledTogether").get("diffusion", 0.0) - before) \
            < expected_together and time.monotonic() < deadline:
        time.sleep(0.5)
    assert grown == expected_together, server.log_tail()
    logged = re.findall(rf"batch of {len(LIVE_BODIES)} requests: {len(good)} sampled in groups of \[([\d, ]+)\]",
                        server.log_tail(lines=400))
    assert logged, server.log_tail()
    # the groups follow the order the requests arrived in, which the threads do not fix
    assert sorted(int(n) for n in logged[-1].split(",")) == sorted(len(g) for g in groups) == [1, 1, 1, 2, 2]
