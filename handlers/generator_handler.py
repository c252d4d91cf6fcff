"""TorchServe handler for all three generators: validate -> sample -> encode.

The archive holds the `generators` package and `checkpoint/` (safetensors + config.json);
the checkpoint's `model_type` picks the pipeline. Each request in a TorchServe batch is validated
and answered on its own, so one bad request gets its 400 without failing its neighbours. Valid
sampling requests are sampled together where the pipeline says they can be (`Pipeline.groups`);
if such a group fails, its requests are sampled one by one, so only a request that fails alone fails.

A request with `"progress": true` gets its answer as one chunked HTTP response: a JSON line per progress
event (TorchServe's intermediate responses, one chunk each, sent only to the requests of the batch that
asked), then the same body as without progress. Its status and headers go out with the first event.
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from generators.imaging import encode_png, grid, to_uint8
from generators.params import MAX_SEED, InvalidParameter, parse_request, validate
from generators.pipelines import Progress, lean_settings, load_pipeline

logger = logging.getLogger(__name__)

PROGRESS_EVENTS = 10  # at most this many progress lines per request: one per tenth of the steps
PROGRESS_CONTENT_TYPE = "application/octet-stream"  # JSON lines, then a PNG or JSON body


class GeneratorHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        settings = (context.model_yaml_config or {}).get("handler", {})
        if settings.get("torch_threads"):
            torch.set_num_threads(int(settings["torch_threads"]))
        self.pipeline = load_pipeline(Path(properties["model_dir"]) / "checkpoint", self.device,
                                      **lean_settings(settings))
        self.specs = self.pipeline.param_specs()
        self.scoring_specs = self.pipeline.scoring_specs()
        self.manifest = context.manifest
        self.initialized = True
        logger.info("loaded %s on %s", self.pipeline.model_type, self.device)

    def handle(self, data: list[dict], context) -> list[Any]:
        self.context = context
        self.progress_sent: dict[int, int] = {}  # batch index -> tenths of its steps reported so far
        if self._is_describe():
            return [self.describe_handle()]
        jobs = self.preprocess(data)
        return self.postprocess(self.inference(jobs))

    def preprocess(self, data: list[dict]) -> list[dict | Exception]:
        """Per request: the validated parameters and seed, or the InvalidParameter that rejects it.
        A body with "images" asks a model that can score (the EBM) for their energies instead."""
        jobs: list[dict | Exception] = []
        for request in data:
            try:
                body = parse_request(request)
                if self.scoring_specs and isinstance(body, dict) and "images" in body:
                    jobs.append(validate(body, self.scoring_specs))
                    continue
                params = validate(body, self.specs)
                self.pipeline.check_work(params)
                params.setdefault("seed", secrets.randbelow(MAX_SEED + 1))
                jobs.append(params)
            except InvalidParameter as error:
                jobs.append(error)
        return jobs

    def inference(self, jobs: list[dict | Exception]) -> list[tuple[dict, torch.Tensor] | Exception]:
        """Rejected requests keep their error; posted images are scored one request at a time; sampling
        requests are sampled in the pipeline's groups."""
        results: list[tuple[dict, torch.Tensor] | Exception] = list(jobs)
        valid = [i for i, params in enumerate(jobs) if not isinstance(params, Exception)]
        scoring = [i for i in valid if "images" in jobs[i]]
        sampling = [i for i in valid if "images" not in jobs[i]]
        for i in scoring:
            results[i] = self._score(jobs[i])
        groups = [[sampling[k] for k in group] for group in self.pipeline.groups([jobs[i] for i in sampling])]
        for group in groups:
            for i, images in zip(group, self._sample(group, [jobs[i] for i in group])):
                results[i] = images if isinstance(images, Exception) else (jobs[i], images)
        if len(jobs) > 1:
            logger.info("batch of %d requests: %d sampled in groups of %s, %d scored, %d rejected", len(jobs),
                        len(sampling), [len(group) for group in groups], len(scoring), len(jobs) - len(valid))
        return results

    def _score(self, params: dict) -> tuple[dict, torch.Tensor] | Exception:
        try:
            energies = self.pipeline.score(params)
        except Exception as error:  # one request's failure must not take the batch down
            logger.exception("scoring failed")
            return error
        self.context.metrics.add_counter("ImagesScored", len(params["images"]), None)
        return params, energies

    def _sample(self, indices: list[int], requests: list[dict]) -> list[torch.Tensor | Exception]:
        """Each request's images (`indices`: their places in the batch), sampled as one group; if that fails,
        one request at a time."""
        n_images = [params["n_images"] for params in requests]
        start = time.perf_counter()
        try:
            images = self.pipeline.sample_group(
                requests, [torch.Generator().manual_seed(params["seed"]) for params in requests],
                self._progress_reporter({i: params for i, params in zip(indices, requests) if params["progress"]}))
        except Exception as error:  # one request's failure must not take the batch down
            if len(requests) == 1:
                logger.exception("sampling failed for %s", requests[0])
                return [error]
            logger.exception("sampling %d requests together failed; sampling them one by one", len(requests))
            return [outcome for i, params in zip(indices, requests) for outcome in self._sample([i], [params])]
        elapsed_ms = 1000 * (time.perf_counter() - start)
        self.context.metrics.add_counter("ImagesGenerated", sum(n_images), None)
        self.context.metrics.add_time("SamplingTimePerImage", elapsed_ms / sum(n_images), None, "ms")
        if len(requests) > 1:
            self.context.metrics.add_counter("RequestsSampledTogether", len(requests), None)
        return list(images.split(n_images))

    def _progress_reporter(self, streaming: dict[int, dict]) -> Progress | None:
        """A sampler callback that streams a JSON line to the requests that asked (batch index -> parameters)
        each time another tenth of the steps is done; never one going backwards, so a group resampled request
        by request after a failure stays silent until it passes what was already reported."""
        if not streaming:
            return None

        def report(step: int, total: int) -> None:
            tenths = PROGRESS_EVENTS * step // total
            due = [i for i in streaming if tenths > self.progress_sent.get(i, 0)]
            if not due:
                return
            event = json.dumps({"progress": round(step / total, 4), "step": step, "steps": total}) + "\n"
            for i in due:
                if i not in self.progress_sent:  # the context keeps them; they go out with the first line
                    self.context.set_response_content_type(i, PROGRESS_CONTENT_TYPE)
                    self._set_sample_headers(i, streaming[i])
                self.progress_sent[i] = tenths
            send_intermediate_predict_response({i: event for i in due}, {i: self.context.request_ids[i] for i in due},
                                               "Intermediate Prediction success", 200, self.context)

        return report

    def postprocess(self, results: list[tuple[dict, torch.Tensor] | Exception]) -> list[Any]:
        return [self._encode(idx, result) for idx, result in enumerate(results)]

    def _encode(self, idx: int, result: tuple[dict, torch.Tensor] | Exception) -> Any:
        """One response body; sets its status and headers (TorchServe sends no Content-Type unless set)."""
        if isinstance(result, Exception):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(result, InvalidParameter):
                self.context.set_response_status(400, "Bad Request", idx)
                return {"code": 400, "field": result.field, "error": str(result)}
            code = 507 if isinstance(result, MemoryError) else 500
            self.context.set_response_status(code, "Sampling failed", idx)
            return {"code": code, "error": f"sampling failed: {type(result).__name__}"}
        params, output = result
        if "images" in params:
            self.context.set_response_content_type(idx, "application/json")
            return {"energies": output.tolist(), "timestep": params["timestep"]}
        pixels = to_uint8(output)
        classes = self._set_sample_headers(idx, params)
        if params["format"] == "json":
            self.context.set_response_content_type(idx, "application/json")
            return {"images": [base64.b64encode(encode_png(image)).decode("ascii") for image in pixels],
                    "seed": params["seed"], "parameters": params, **({"classes": classes} if classes else {})}
        self.context.set_response_content_type(idx, "image/png")
        return encode_png(grid(pixels))

    def _set_sample_headers(self, idx: int, params: dict) -> list[str] | None:
        """X-Seed, and X-Classes (each image's class name or GAN digit, comma-separated, grid order) for a request
        sampled with one, so a PNG answer says what a random class drew; returns those classes."""
        self.context.set_response_header(idx, "X-Seed", str(params["seed"]))
        classes = self.pipeline.image_classes(params)
        if classes:
            self.context.set_response_header(idx, "X-Classes", ",".join(classes))
        return classes

    def describe_handle(self) -> dict[str, Any]:
        model = (self.manifest or {}).get("model", {})
        return dict(self.pipeline.describe(), model_name=model.get("modelName"), version=model.get("modelVersion"))
