"""docs/openapi.json is what scripts/openapi.py generates from the handler's specs, and its request schemas
accept and refuse the same bodies the handler does (checked with a small validator of the JSON Schema subset
the description uses: type, enum, bounds, lengths, items, properties, required, additionalProperties, oneOf)."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generators.params import InvalidParameter, validate
from scripts.openapi import OUTPUT, build_document, load_pipelines
from tests.conftest import ROOT

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def conforms(value: Any, schema: dict[str, Any], document: dict[str, Any]) -> bool:
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:
        return sum(conforms(value, option, document) for option in schema["oneOf"]) == 1
    if "type" in schema and not TYPES[schema["type"]](value):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if TYPES["number"](value) and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        return False
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        return False
    if isinstance(value, list):
        return (schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
                and all(conforms(item, schema.get("items", {}), document) for item in value))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return (set(schema.get("required", ())) <= set(value)
                and (schema.get("additionalProperties", True) or set(value) <= set(properties))
                and all(conforms(v, properties[k], document) for k, v in value.items() if k in properties))
    return True


def png_base64(width: int = 32, height: int = 32) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PNG = png_base64()
# (model, body, valid): none of these is refused only for the work cap, which the schema leaves to the server
BODIES = [
    ("diffusion", {}, True),
    ("diffusion", {"n_images": 4, "steps": 10, "sampler": "ddpm", "class_label": "ship", "guidance_scale": 3}, True),
    ("diffusion", {"class_label": 3, "seed": 0, "format": "json", "guidance_rescale": 0.5}, True),
    ("ebm", {"levels": 5, "snr": 0.2, "class_label": "cat"}, True),
    ("ebm", {"images": [PNG, PNG], "timestep": 10}, True),
    ("gan", {"digit": 7, "n_images": 64, "seed": 2**63 - 1}, True),
    ("diffusion", {"n_images": 65}, False),
    ("diffusion", {"steps": "4"}, False),
    ("diffusion", {"n_image": 4}, False),
    ("diffusion", {"sampler": "euler"}, False),
    ("diffusion", {"class_label": "dragon"}, False),
    ("diffusion", {"class_label": 10}, False),
    ("diffusion", {"guidance_scale": 21}, False),
    ("diffusion", {"n_images": True}, False),
    ("ebm", {"images": []}, False),
    ("ebm", {"images": [PNG], "n_images": 2}, False),
    ("ebm", {"images": "not a list"}, False),
    ("ebm", {"steps": 5}, False),
    ("gan", {"digit": 10}, False),
    ("gan", {"seed": -1}, False),
    ("gan", {"format": "gif"}, False),
    ("gan", [1, 2], False),
]


@pytest.fixture(scope="module")
def pipelines():
    return load_pipelines()


def handler_accepts(pipeline, body: Any) -> bool:
    """The handler's verdict: a body with "images" goes to a model that scores as a scoring request."""
    scoring = isinstance(body, dict) and "images" in body and bool(pipeline.scoring_specs())
    specs = pipeline.scoring_specs() if scoring else pipeline.param_specs()
    try:
        validate(body, specs)
    except InvalidParameter:
        return False
    return True


@pytest.mark.parametrize("model,body,valid", BODIES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BODIES)])
def test_schema_and_handler_agree_on_bodies(pipelines, model, body, valid):
    document = build_document(pipelines)
    schema = document["paths"][f"/predictions/{model}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert conforms(body, schema, document) is valid
    assert handler_accepts(pipelines[model], body) is valid


def test_schema_defaults_are_the_handlers(pipelines):
    document = build_document(pipelines)
    for model, pipeline in pipelines.items():
        properties = document["components"]["schemas"][f"{model.capitalize()}Request"]["properties"]
        defaults = {name: p["default"] for name, p in properties.items() if "default" in p}
        assert defaults == validate({}, pipeline.param_specs())


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/openapi.py", "--check", "--out", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_committed_description_is_current():
    result = check(OUTPUT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stale_description_is_caught(tmp_path):
    stale = tmp_path / "openapi.json"
    shutil.copy(OUTPUT, stale)
    text = stale.read_text()
    assert '"maximum": 64' in text
    stale.write_text(text.replace('"maximum": 64', '"maximum": 65', 1))
    result = check(stale)
    assert result.returncode == 1 and "stale" in result.stderr
