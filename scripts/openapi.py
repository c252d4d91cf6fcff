#!/usr/bin/env python3
"""Write docs/openapi.json: an OpenAPI 3.0 description of POST /predictions/{diffusion,ebm,gan}.

    python scripts/openapi.py            # regenerate docs/openapi.json
    python scripts/openapi.py --check    # exit 1 if docs/openapi.json is not what this would write

The request bodies are generated from the parameter specs the handler validates with: each pipeline's
param_specs() (and the EBM's scoring_specs()) loaded from the committed checkpoints/<model>, so ranges,
choices and defaults (the checkpoint's config.json) are the server's own. Regenerate after changing a
spec or a checkpoint's serving defaults; the tests fail until the file is current.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.params import json_schema  # noqa: E402
from generators.pipelines import Pipeline, load_pipeline  # noqa: E402
from handlers.generator_handler import PROGRESS_CONTENT_TYPE, PROGRESS_EVENTS  # noqa: E402
from scripts.archive import snapshot_checkpoint  # noqa: E402

MODELS = ("diffusion", "ebm", "gan")
OUTPUT = ROOT / "docs" / "openapi.json"
JSON = "application/json"

BASE64_PNG = {"type": "string", "format": "byte", "description": "base64 of one PNG"}
COMMON_SCHEMAS: dict[str, Any] = {
    "Images": {
        "type": "object", "required": ["images", "seed", "parameters"],
        "description": 'The answer to "format": "json": one PNG per image.',
        "properties": {"images": {"type": "array", "items": BASE64_PNG},
                       "seed": {"type": "integer", "description": "the seed used"},
                       "parameters": {"type": "object", "description": "the validated parameters, defaults filled in"},
                       "classes": {"type": "array", "items": {"type": "string"},
                                   "description": "each image's class name, for a request sampled with a class "
                                                  "(absent when unconditional); for the gan, each image's digit"}},
    },
    "Error": {
        "type": "object", "required": ["code", "error"],
        "description": "The handler's answer to a bad request (400) or a failed sampling (500, 507 out of memory).",
        "properties": {"code": {"type": "integer"},
                       "field": {"type": "string", "description": "the parameter(s) at fault (400 only)"},
                       "error": {"type": "string", "description": "what is wrong and what is accepted"}},
    },
    "TorchServeError": {
        "type": "object", "required": ["code", "type", "message"],
        "description": "TorchServe's own answer: a missing, wrong or expired key (400 InvalidKeyException), "
                       "an unknown model or version (404), no worker free (503).",
        "properties": {"code": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}},
    },
    "Energies": {
        "type": "object", "required": ["energies", "timestep"],
        "description": "The answer to a scoring request: one energy per posted image (lower: more like the data).",
        "properties": {"energies": {"type": "array", "items": {"type": "number"}},
                       "timestep": {"type": "integer", "description": "the noise level the energies were taken at"}},
    },
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def load_pipelines(checkpoints: Path = ROOT / "checkpoints") -> dict[str, Pipeline]:
    """Each model's pipeline, from a consistent copy of its checkpoint (a training run may be saving into it)."""
    pipelines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            snapshot_checkpoint(checkpoints / model, Path(tmp) / model)
            pipelines[model] = load_pipeline(Path(tmp) / model)
    return pipelines


def request_schema_names(model: str) -> tuple[str, str]:
    """Component names of a model's generation body and (for a model that scores) its scoring body."""
    name = model.capitalize()
    return f"{name}Request", f"{name}ScoringRequest"


def operation(model: str, pipeline: Pipeline) -> dict[str, Any]:
    generation, scoring = request_schema_names(model)
    scores = bool(pipeline.scoring_specs())
    body = {"oneOf": [ref(generation), ref(scoring)]} if scores else ref(generation)
    answers = {"oneOf": [ref("Images"), ref("Energies")]} if scores else ref("Images")
    description = (f"Generate {pipeline.model_type} images; {{}} takes every default. Besides what the schema says, "
                   f"the server bounds the work of one request ({pipeline.work_fields}) to {pipeline.max_work} "
                   f"image-evaluations and answers more with a 400. A version is addressed as "
                   f"/predictions/{model}/{{version}}.")
    if scores:
        description += ' A body with "images" asks for their energies instead.'
    return {
        "operationId": f"predict_{model}",
        "summary": f"{model}: generate" + (" or score images" if scores else ""),
        "description": description,
        "requestBody": {"required": True, "content": {JSON: {"schema": body}}},
        "responses": {
            "200": {
                "description": "A PNG (one image, or a grid for n_images > 1), or JSON with format json"
                               + (" or a scoring request" if scores else ""),
                "headers": {"X-Seed": {"description": "the seed used" + (" (absent for scoring)" if scores else ""),
                                       "schema": {"type": "string"}},
                            "X-Classes": {"description": "each image's class name, comma-separated in grid order, "
                                                         "for a request sampled with a class" if pipeline.class_names
                                                         else "each image's digit, comma-separated in grid order",
                                          "schema": {"type": "string"}}},
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                            JSON: {"schema": answers},
                            PROGRESS_CONTENT_TYPE: {"schema": {
                                "type": "string", "format": "binary",
                                "description": f'With "progress": true, streamed in chunks: up to {PROGRESS_EVENTS} '
                                               'lines of JSON, each {"progress": fraction, "step": n, "steps": total} '
                                               'and a newline, then the PNG or JSON answer. A request that fails '
                                               'after the first line gets the Error JSON as that answer (its '
                                               'status, sent with the first line, says 200).'}}},
            },
            "400": {"description": "A bad request, named by field; or a missing, wrong or expired key",
                    "content": {JSON: {"schema": {"anyOf": [ref("Error"), ref("TorchServeError")]}}}},
            "default": {"description": "Another failure",
                        "content": {JSON: {"schema": {"anyOf": [ref("Error"), ref("TorchServeError")]}}}},
        },
    }


def build_document(pipelines: dict[str, Pipeline]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for model, pipeline in pipelines.items():
        generation, scoring = request_schema_names(model)
        schemas[generation] = json_schema(pipeline.param_specs())
        if pipeline.scoring_specs():
            schemas[scoring] = json_schema(pipeline.scoring_specs(), required=["images"])
        paths[f"/predictions/{model}"] = {"post": operation(model, pipeline)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Generators behind TorchServe", "version": "1.0",
                 "description": "Request bodies generated by scripts/openapi.py from the parameter specs the "
                                "handler validates with, defaults from the committed checkpoints."},
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"inferenceKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"inferenceKey": {
                "type": "http", "scheme": "bearer",
                "description": "The inference key from key_file.json in TorchServe's working directory"}},
            "schemas": {**schemas, **COMMON_SCHEMAS},
        },
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    p.add_argument("--out", type=Path, default=OUTPUT, help=f"the file (default: {OUTPUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    text = render(build_document(load_pipelines()))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run scripts/openapi.py to regenerate it", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
