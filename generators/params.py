"""Declarative request parameters: one place for types, ranges, defaults and the error messages.

The handler validates a JSON body against a model's specs; `describe` lists the same specs
for `GET /models/{name}?customized=true` and `json_schema` writes them as the OpenAPI schema of
docs/openapi.json, so documentation and enforcement cannot drift.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

MAX_SEED = 2**63 - 1
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
DESCRIBE_NAMES = {"description": "help", "minimum": "min", "maximum": "max", "enum": "choices"}


class InvalidParameter(ValueError):
    """A client error; `field` names the offending parameter (or parameters)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float, str or bool
    default: Any = None  # None: optional, absent from the validated dict unless given
    low: float | None = None
    high: float | None = None
    choices: Sequence[str] = ()
    help: str = ""
    required: bool = False  # absent or null is refused by coerce's own message, not filled with the default

    def coerce(self, value: Any) -> Any:
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidParameter(self.name, f"must be an integer{self._range()}, got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _is_finite(value):
                raise InvalidParameter(self.name, f"must be a number{self._range()}, got {value!r}")
            value = float(value)
        elif self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise InvalidParameter(self.name, f"must be one of {list(self.choices)}, got {value!r}")
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidParameter(self.name, f"must be true or false, got {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise InvalidParameter(self.name, f"must be{self._range()}, got {value!r}")
        return value

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        return f" in [{self.low}, {self.high}]"

    def describe(self) -> dict:
        """The json_schema facts under the names `GET /models/{name}?customized=true` lists them with."""
        return {DESCRIBE_NAMES.get(key, key): value for key, value in self.json_schema().items()}

    def json_schema(self) -> dict[str, Any]:
        """The OpenAPI 3.0 schema of the values `coerce` accepts (types, bounds, choices) and the default."""
        schema: dict[str, Any] = {"type": JSON_TYPES[self.kind], "description": self.help}
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.low is not None:
            schema["minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        if self.default is not None:
            schema["default"] = self.default
        return schema


RANDOM_CLASS = "random"  # a class label that asks for a class per image, drawn from the request's seed
NO_CLASS = "none"  # a class label that asks for unconditional samples
CLASS_KEYWORDS = [RANDOM_CLASS, NO_CLASS]


@dataclass(frozen=True)
class ClassLabelParam(Param):
    """A class given by name (case-insensitive) or by index; validates to the index. Two keywords besides:
    RANDOM_CLASS is kept as it is (the pipeline draws the classes), NO_CLASS validates to absent."""

    kind: type = str
    choices: Sequence[str] = field(default_factory=tuple)

    def coerce(self, value: Any) -> int | str | None:
        names = [c.lower() for c in self.choices]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in names:
            return names.index(word)
        if word in CLASS_KEYWORDS:
            return RANDOM_CLASS if word == RANDOM_CLASS else None
        raise InvalidParameter(self.name, f"must be a class index in [0, {len(names) - 1}] or one of "
                                          f"{list(self.choices) + CLASS_KEYWORDS}, got {value!r}")

    def describe(self) -> dict:
        described = {"type": "string or integer", "help": self.help, "choices": list(self.choices) + CLASS_KEYWORDS,
                     "min": 0, "max": len(self.choices) - 1}
        return described if self.default is None else dict(described, default=self.default)

    def json_schema(self) -> dict[str, Any]:
        schema = {"description": f"{self.help} (the server also takes names in any case)",
                  "oneOf": [{"type": "string", "enum": list(self.choices) + CLASS_KEYWORDS},
                            {"type": "integer", "minimum": 0, "maximum": len(self.choices) - 1}]}
        return schema if self.default is None else dict(schema, default=self.default)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class PNGImagesParam(Param):
    """A list of base64-encoded PNGs of one size and mode; validates to uint8 (N, H, W, C).

    Each image is checked before it is decoded: base64 alphabet, size of the encoded file, PNG
    signature, then the header's width, height and mode. Only then are pixels read, so a PNG that
    declares a large canvas (a decompression bomb) is refused without being expanded."""

    kind: type = list
    width: int = 32
    height: int = 32
    mode: str = "RGB"
    max_images: int = 64
    max_file_bytes: int = 16384
    required: bool = True

    @property
    def max_encoded_length(self) -> int:
        """Characters of base64 for a file of max_file_bytes."""
        return 4 * ((self.max_file_bytes + 2) // 3)

    def coerce(self, value: Any) -> np.ndarray:
        if not isinstance(value, list) or not 1 <= len(value) <= self.max_images:
            raise InvalidParameter(self.name, f"must be a list of 1 to {self.max_images} base64-encoded PNGs, "
                                              f"got {_summary(value)}")
        return np.stack([self._decode(i, item) for i, item in enumerate(value)])

    def _decode(self, i: int, item: Any) -> np.ndarray:
        where = f"{self.name}[{i}]"
        if not isinstance(item, str):
            raise InvalidParameter(where, f"must be a base64-encoded PNG string, got {_summary(item)}")
        if len(item) > self.max_encoded_length:
            raise InvalidParameter(where, f"is larger than {self.max_file_bytes} bytes; a {self.width}x{self.height} "
                                          f"{self.mode} PNG is far smaller")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameter(where, "is not valid base64") from None
        if not data.startswith(PNG_SIGNATURE):
            raise InvalidParameter(where, "is not a PNG (only PNG is accepted)")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                if image.size != (self.width, self.height) or image.mode != self.mode:
                    raise InvalidParameter(where, f"must be {self.width}x{self.height} {self.mode}, got "
                                                  f"{image.size[0]}x{image.size[1]} {image.mode}")
                image.load()
                return np.asarray(image, dtype=np.uint8).reshape(self.height, self.width, -1)
        except InvalidParameter:
            raise
        except Image.DecompressionBombError:
            raise InvalidParameter(where, f"declares far more than {self.width}x{self.height} pixels "
                                          "(a decompression bomb)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InvalidParameter(where, f"is not a readable PNG ({type(e).__name__})") from None

    def describe(self) -> dict:
        return {"type": "array of base64 PNG strings", "help": self.help, "min_items": 1,
                "max_items": self.max_images, "image": f"{self.width}x{self.height} {self.mode} PNG",
                "max_file_bytes": self.max_file_bytes}

    def json_schema(self) -> dict[str, Any]:
        """Shape only: that each string is base64 of a PNG of the right size and mode is checked by the server."""
        return {"type": "array", "description": self.help, "minItems": 1, "maxItems": self.max_images,
                "items": {"type": "string", "format": "byte", "maxLength": self.max_encoded_length,
                          "description": f"base64 of a {self.width}x{self.height} {self.mode} PNG of at most "
                                         f"{self.max_file_bytes} bytes"}}


def _is_finite(value: int | float) -> bool:
    """math.isfinite, also for JSON integers too large for a float (which it would raise OverflowError on)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _summary(value: Any) -> str:
    """A short description of a bad value, never the whole (possibly huge) thing."""
    if isinstance(value, (list, dict, str, bytes)):
        return f"a {type(value).__name__} of length {len(value)}"
    return repr(value)[:80]


COMMON_PARAMS: tuple[Param, ...] = (
    Param("n_images", int, 1, 1, 64, help="images to generate; more than one come back as a grid"),
    Param("seed", int, None, 0, MAX_SEED, help="same seed and parameters give the same image; random if absent"),
    Param("format", str, "png", choices=("png", "json"),
          help="png: one PNG (a grid for n_images > 1); json: {'images': [base64 PNG, ...], ...}"),
    Param("progress", bool, False,
          help="true: stream JSON progress lines ({'progress': 0.25, 'step': 5, 'steps': 20}) before the answer"),
)


def validate(body: Any, specs: Sequence[Param]) -> dict[str, Any]:
    """Check a parsed JSON body against `specs`; returns every parameter with its default filled in."""
    if not isinstance(body, dict):
        raise InvalidParameter("body", f"must be a JSON object, got {type(body).__name__}")
    by_name = {p.name: p for p in specs}
    unknown = sorted(set(body) - set(by_name))
    if unknown:
        raise InvalidParameter(unknown[0], f"unknown parameter; accepted: {sorted(by_name)}")
    out = {}
    for p in specs:
        given = body.get(p.name) is not None or p.required
        value = p.coerce(body.get(p.name)) if given else p.default
        if value is not None:  # None: absent (not given and no default, or given as a keyword meaning none)
            out[p.name] = value
    return out


def describe(specs: Sequence[Param]) -> dict[str, dict]:
    return {p.name: p.describe() for p in specs}


def json_schema(specs: Sequence[Param], required: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of a body `validate(body, specs)` accepts: an object of exactly these parameters
    (bounds that involve several parameters, such as a pipeline's work cap, are left to the server)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": {p.name: p.json_schema() for p in specs}}
    if required:
        schema["required"] = list(required)
    return schema


EMPTY_BODY_HINT = ('send a JSON object such as {"n_images": 4} with the header Content-Type: application/json')


def parse_request(request: dict[str, Any]) -> Any:
    """One request as TorchServe hands it over -> its parsed JSON body.

    TorchServe passes a JSON body already parsed under "body" (or "data"); a body it did not parse
    arrives as bytes, or as str for text/* content types. Form fields (`curl -d` without a JSON
    content type) arrive as other keys: they are refused, so a parameter is never silently ignored.
    (TorchServe 0.12 drops query-string parameters before the handler sees them.)
    """
    raw = request.get("body", request.get("data"))
    extra = sorted(k for k in request if k not in ("body", "data"))
    if extra:
        hint = "" if raw is not None else f"; {EMPTY_BODY_HINT}"
        raise InvalidParameter(extra[0][:80], f"query-string and form fields are not accepted, only a JSON body{hint}")
    if raw is None or (isinstance(raw, (bytes, bytearray, str)) and not raw.strip()):
        raise InvalidParameter("body", f"is empty; {EMPTY_BODY_HINT}")
    if isinstance(raw, (bytes, bytearray, str)):
        try:
            return json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer of over 4300 digits
            raise InvalidParameter("body", f"is not valid JSON ({e})") from None
        except RecursionError:
            raise InvalidParameter("body", "nests arrays or objects too deeply to parse") from None
    return raw
