"""The handler in-process, with TorchServe's own Context and metrics cache (no server)."""
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import ts
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from handlers.generator_handler import GeneratorHandler
from tests.synthetic import tiny_checkpoint

SHAPES = {"diffusion": (32, 32, "RGB"), "ebm": (32, 32, "RGB"), "gan": (28, 28, "L")}


def make_context(model_dir: Path, n_requests: int, yaml_config: dict | None = None) -> Context:
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": "test", "modelVersion": "1.0"}}
    context = Context("test", str(model_dir), manifest, n_requests, None, "0.12.0", metrics=metrics,
                      model_yaml_config=yaml_config or {})
    context.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    return context


@pytest.fixture(scope="module", params=sorted(SHAPES))
def loaded(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    tiny_checkpoint(model_dir / "checkpoint", request.param)
    handler = GeneratorHandler()
    handler.initialize(make_context(model_dir, 1))
    return request.param, handler, model_dir


def run(handler, model_dir, bodies):
    context = make_context(model_dir, len(bodies))
    outputs = handler.handle([{"body": b} for b in bodies], context)
    statuses = [p.get_response_status_code() for p in context.request_processor]
    headers = [p.get_response_headers() for p in context.request_processor]
    return outputs, statuses, headers


def test_batch_with_a_bad_request_answers_each_on_its_own(loaded):
    model_type, handler, model_dir = loaded
    outputs, statuses, headers = run(handler, model_dir, [{"n_images": 4, "seed": 1}, {"n_image": 4},
                                                          b"not json", {"n_images": 1, "seed": 1}])
    assert statuses == [200, 400, 400, 200]
    w, h, mode = SHAPES[model_type]
    grid = Image.open(io.BytesIO(outputs[0]))
    assert grid.mode == mode and grid.size == (2 * w + 6, 2 * h + 6)
    single = Image.open(io.BytesIO(outputs[3]))
    assert single.size == (w, h)
    assert headers[0]["content-type"] == "image/png" and headers[0]["X-Seed"] == "1"
    assert outputs[1]["field"] == "n_image" and outputs[2]["field"] == "body"
    assert headers[1]["content-type"] == "application/json"


def test_same_seed_same_bytes_and_json_format(loaded):
    _, handler, model_dir = loaded
    outputs, statuses, _ = run(handler, model_dir, [{"seed": 7, "n_images": 2}, {"seed": 7, "n_images": 2},
                                                    {"seed": 8, "n_images": 2},
                                                    {"seed": 7, "n_images": 2, "format": "json"}])
    assert statuses == [200] * 4
    assert outputs[0] == outputs[1] != outputs[2]
    body = outputs[3]
    json.dumps(body)  # what TorchServe will do with it
    assert body["seed"] == 7 and len(body["images"]) == 2
    Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).verify()


def test_json_answer_names_each_images_class(loaded):
    """Random classes (the default) are named per image, in the JSON and in the X-Classes header of a PNG answer;
    a named class repeats; unconditional answers carry no classes. The GAN names its digits the same way."""
    model_type, handler, model_dir = loaded
    if model_type == "gan":
        outputs, _, headers = run(handler, model_dir, [{"seed": 7, "n_images": 6, "format": "json"},
                                                       {"seed": 7, "n_images": 2, "digit": 4}])
        assert len(outputs[0]["classes"]) == 6 and set(outputs[0]["classes"]) <= set("0123456789")
        assert len(set(outputs[0]["classes"])) > 1 and headers[0]["X-Classes"] == ",".join(outputs[0]["classes"])
        assert headers[1]["X-Classes"] == "4,4"
        return
    names = handler.pipeline.class_names
    outputs, statuses, headers = run(handler, model_dir, [
        {"seed": 7, "n_images": 6, "format": "json"}, {"seed": 7, "n_images": 2, "format": "json", "class_label": 3},
        {"seed": 7, "n_images": 2, "format": "json", "class_label": "none"}, {"seed": 7, "n_images": 6}])
    assert statuses == [200] * 4
    assert len(outputs[0]["classes"]) == 6 and set(outputs[0]["classes"]) <= set(names)
    assert outputs[0]["parameters"]["class_label"] == "random"
    assert outputs[1]["classes"] == [names[3]] * 2
    assert "classes" not in outputs[2] and "class_label" not in outputs[2]["parameters"]
    assert headers[0]["X-Classes"] == headers[3]["X-Classes"] == ",".join(outputs[0]["classes"])  # PNG too
    assert headers[1]["X-Classes"] == f"{names[3]},{names[3]}" and "X-Classes" not in headers[2]


def test_work_cap_is_a_400(loaded):
    _, handler, model_dir = loaded
    handler.pipeline.max_work = 10
    try:
        outputs, statuses, _ = run(handler, model_dir, [{"n_images": 11}])
    finally:
        handler.pipeline.max_work = type(handler.pipeline).max_work
    assert statuses == [400] and "n_images" in outputs[0]["field"]


def test_work_cap_error_says_what_guidance_costs(loaded):
    """A request guided by default (a random class) that is over the cap hears how to halve its cost."""
    model_type, handler, model_dir = loaded
    if model_type == "gan":
        return
    handler.pipeline.max_work = 10
    try:
        outputs, statuses, _ = run(handler, model_dir, [{"n_images": 11}, {"n_images": 11, "class_label": "none"}])
    finally:
        handler.pipeline.max_work = type(handler.pipeline).max_work
    assert statuses == [400, 400]
    assert 'class_label "none"' in outputs[0]["error"] and "class_label" not in outputs[1]["error"]


def test_metrics_are_recorded(loaded):
    _, handler, model_dir = loaded
    context = make_context(model_dir, 1)
    handler.handle([{"body": {"n_images": 3}}], context)
    assert context.metrics.get_metric("ImagesGenerated", MetricTypes.COUNTER) is not None
    assert context.metrics.get_metric("SamplingTimePerImage", MetricTypes.GAUGE) is not None


def test_describe_lists_device_identity_and_parameters(loaded):
    model_type, handler, _ = loaded
    info = handler.describe_handle()
    assert info["model_type"] == model_type and info["device"] == "cpu"
    assert len(info["weights_sha256"]) == 64 and info["training"]["steps"] == 0
    assert info["parameters"]["n_images"] == {"type": "integer", "help": info["parameters"]["n_images"]["help"],
                                              "default": 1, "min": 1, "max": 64}


def test_torch_threads_from_the_model_yaml(tmp_path):
    tiny_checkpoint(tmp_path / "checkpoint", "gan")
    before = torch.get_num_threads()
    try:
        GeneratorHandler().initialize(make_context(tmp_path, 1, {"handler": {"torch_threads": 1}}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", sorted(SHAPES))
def test_channels_last_setting_keeps_the_images(tmp_path, model_type):
    """The yaml's handler.channels_last stores the conv weights NHWC and changes no pixel by more than 1 level."""
    tiny_checkpoint(tmp_path / "checkpoint", model_type)
    images = {}
    for channels_last in (False, True):
        handler = GeneratorHandler()
        handler.initialize(make_context(tmp_path, 1, {"handler": {"channels_last": channels_last}}))
        convs = [m for net in handler.pipeline.networks().values() for m in net.modules()
                 if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
                             for m in convs if m.weight.shape[-1] > 1)
        outputs, statuses, _ = run(handler, tmp_path, [{"n_images": 4, "seed": 5}])
        assert statuses == [200]
        images[channels_last] = torch.from_numpy(np.asarray(Image.open(io.BytesIO(outputs[0])), dtype=np.int32))
    assert (images[False] - images[True]).abs().max() <= 1


def test_ebm_scores_images_in_a_batch_beside_sampling_requests(tmp_path):
    tiny_checkpoint(tmp_path / "checkpoint", "ebm")
    handler = GeneratorHandler()
    handler.initialize(make_context(tmp_path, 1))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    outputs, statuses, headers = run(handler, tmp_path, [{"images": [image, image]}, {"images": ["???"]},
                                                         {"n_images": 1, "seed": 3}])
    assert statuses == [200, 400, 200]
    assert len(outputs[0]["energies"]) == 2 and outputs[0]["energies"][0] == outputs[0]["energies"][1]
    assert outputs[0]["timestep"] == 20 and headers[0]["content-type"] == "application/json"
    assert outputs[1]["field"] == "images[0]"
    assert headers[2]["content-type"] == "image/png"


def test_models_that_cannot_score_call_images_an_unknown_parameter(tmp_path):
    tiny_checkpoint(tmp_path / "checkpoint", "gan")
    handler = GeneratorHandler()
    handler.initialize(make_context(tmp_path, 1))
    outputs, statuses, _ = run(handler, tmp_path, [{"images": []}])
    assert statuses == [400] and outputs[0]["field"] == "images"
