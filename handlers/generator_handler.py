"""TorchServe handler for all three generators: validate -> sample -> encode.

The archive holds the `generators` package and `checkpoint/` (safetensors + config.json);
the checkpoint's `model_type` picks the pipeline. Each request in a batch is validated and
answered on its own, so one bad request gets its 400 without failing its neighbours.
"""
from __future__ import annotations

import base64
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from generators.imaging import encode_png, grid, to_uint8
from generators.params import MAX_SEED, InvalidParameter, parse_request, validate
from generators.pipelines import load_pipeline

logger = logging.getLogger(__name__)


class GeneratorHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        threads = (context.model_yaml_config or {}).get("handler", {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.pipeline = load_pipeline(Path(properties["model_dir"]) / "checkpoint", self.device)
        self.specs = self.pipeline.param_specs()
        self.scoring_specs = self.pipeline.scoring_specs()
        self.manifest = context.manifest
        self.initialized = True
        logger.info("loaded %s on %s", self.pipeline.model_type, self.device)

    def handle(self, data: list[dict], context) -> list[Any]:
        self.context = context
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
        results: list[tuple[dict, torch.Tensor] | Exception] = []
        for params in jobs:
            if isinstance(params, Exception):
                results.append(params)
                continue
            try:
                if "images" in params:
                    results.append((params, self.pipeline.score(params)))
                    self.context.metrics.add_counter("ImagesScored", len(params["images"]), None)
                    continue
                start = time.perf_counter()
                images = self.pipeline.sample(params, torch.Generator().manual_seed(params["seed"]))
                elapsed_ms = 1000 * (time.perf_counter() - start)
                self.context.metrics.add_counter("ImagesGenerated", params["n_images"], None)
                self.context.metrics.add_time("SamplingTimePerImage", elapsed_ms / params["n_images"], None, "ms")
                results.append((params, images))
            except Exception as error:  # one request's failure must not take the batch down
                logger.exception("sampling failed for %s", params)
                results.append(error)
        return results

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
        self.context.set_response_header(idx, "X-Seed", str(params["seed"]))
        if params["format"] == "json":
            self.context.set_response_content_type(idx, "application/json")
            return {"images": [base64.b64encode(encode_png(image)).decode("ascii") for image in pixels],
                    "seed": params["seed"], "parameters": params}
        self.context.set_response_content_type(idx, "image/png")
        return encode_png(grid(pixels))

    def describe_handle(self) -> dict[str, Any]:
        model = (self.manifest or {}).get("model", {})
        return dict(self.pipeline.describe(), model_name=model.get("modelName"), version=model.get("modelVersion"))
