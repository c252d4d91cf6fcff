import base64
import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from generators.params import (COMMON_PARAMS, NO_CLASS, PNG_SIGNATURE, RANDOM_CLASS, ClassLabelParam,
                               InvalidParameter, Param, PNGImagesParam, parse_request, validate)

SPECS = list(COMMON_PARAMS) + [
    Param("steps", int, 50, 1, 1000),
    Param("guidance_scale", float, 2.0, 0.0, 20.0),
    ClassLabelParam("class_label", choices=("airplane", "cat")),
]


def field_of(body) -> str:
    with pytest.raises(InvalidParameter) as info:
        validate(body, SPECS)
    return info.value.field


def test_defaults_fill_in_and_optional_stay_absent():
    assert validate({}, SPECS) == {"n_images": 1, "format": "png", "progress": False, "steps": 50,
                                   "guidance_scale": 2.0}


def test_accepts_valid_values():
    out = validate({"n_images": 64, "seed": 0, "steps": 1, "guidance_scale": 3, "class_label": "Cat"}, SPECS)
    assert out["guidance_scale"] == 3.0 and isinstance(out["guidance_scale"], float)
    assert out["class_label"] == 1
    assert validate({"class_label": 0}, SPECS)["class_label"] == 0


def test_class_keywords_random_by_default_and_none_for_unconditional():
    specs = SPECS[:-1] + [ClassLabelParam("class_label", default=RANDOM_CLASS, choices=("airplane", "cat"))]
    assert validate({}, specs)["class_label"] == RANDOM_CLASS
    assert validate({"class_label": " Random"}, specs)["class_label"] == RANDOM_CLASS
    assert "class_label" not in validate({"class_label": "NONE"}, specs)
    assert validate({"class_label": "cat"}, specs)["class_label"] == 1
    with pytest.raises(InvalidParameter, match="'random', 'none'"):
        validate({"class_label": "any"}, specs)
    assert NO_CLASS in specs[-1].describe()["choices"] and specs[-1].describe()["default"] == RANDOM_CLASS


@pytest.mark.parametrize("body,field", [
    ({"n_image": 4}, "n_image"),  # typo
    ({"n_images": "4"}, "n_images"),
    ({"n_images": True}, "n_images"),
    ({"n_images": 4.0}, "n_images"),
    ({"n_images": 0}, "n_images"),
    ({"n_images": 65}, "n_images"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"steps": 1001}, "steps"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"format": "jpeg"}, "format"),
    ({"class_label": "dragon"}, "class_label"),
    ({"class_label": 2}, "class_label"),
    ({"class_label": True}, "class_label"),
])
def test_rejects_bad_values_naming_the_field(body, field):
    assert field_of(body) == field


def test_error_message_states_the_accepted_range():
    with pytest.raises(InvalidParameter) as info:
        validate({"n_images": 65}, SPECS)
    assert "[1, 64]" in str(info.value)


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_an_object(body):
    assert field_of(body) == "body"


@pytest.mark.parametrize("request_dict,field", [
    ({"body": b""}, "body"),
    ({"body": bytearray(b"  ")}, "body"),
    ({}, "body"),
    ({"body": b"{not json"}, "body"),
    ({"body": b"\xff\xfe"}, "body"),
    ({'{"n_images": 4}': bytearray(b"")}, '{"n_images": 4}'),  # curl -d without a JSON content type
    ({"body": {"n_images": 1}, "n_images": bytearray(b"3")}, "n_images"),  # a form field beside the body
    ({"body": "  "}, "body"),
    ({"body": "{oops"}, "body"),
])
def test_parse_request_rejects(request_dict, field):
    with pytest.raises(InvalidParameter) as info:
        parse_request(request_dict)
    assert info.value.field == field


def test_parse_request_accepts_parsed_and_raw_json():
    assert parse_request({"body": {"n_images": 2}}) == {"n_images": 2}
    assert parse_request({"data": bytearray(b'{"n_images": 2}')}) == {"n_images": 2}
    assert parse_request({"body": '{"n_images": 2}'}) == {"n_images": 2}  # text/plain


# ---------------------------------------------------------------- images to score

def png_bytes(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height RGB: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024, 9))
            + chunk(b"IEND", b""))


IMAGES = PNGImagesParam("images", width=32, height=32, mode="RGB", max_images=4)


def test_png_images_decode_to_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    decoded = IMAGES.coerce([b64(png_bytes(p)) for p in pixels])
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, pixels)


GOOD = b64(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))


@pytest.mark.parametrize("value,field,words", [
    ("abc", "images", "list"),
    ([], "images", "list"),
    ([GOOD] * 5, "images", "1 to 4"),
    ([GOOD, 3], "images[1]", "string"),
    (["%%%"], "images[0]", "base64"),
    ([b64(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8), fmt="JPEG"))], "images[0]", "not a PNG"),
    ([b64(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8), fmt="BMP"))], "images[0]", "not a PNG"),
    ([b64(png_bytes(np.zeros((28, 32, 3), dtype=np.uint8)))], "images[0]", "32x32 RGB"),
    ([b64(png_bytes(np.zeros((32, 32), dtype=np.uint8)))], "images[0]", "got 32x32 L"),
    ([b64(png_bytes(np.zeros((32, 32, 4), dtype=np.uint8), "RGBA"))], "images[0]", "got 32x32 RGBA"),
    ([b64(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8))[:60])], "images[0]", "readable"),  # truncated
    ([b64(png_declaring(2000, 2000))], "images[0]", "got 2000x2000"),  # header read, pixels never decompressed
    ([b64(png_declaring(40000, 40000))], "images[0]", "decompression bomb"),
    ([b64(b"\x00" * 20000)], "images[0]", "larger than"),
])
def test_bad_images_are_refused_naming_the_image(value, field, words):
    with pytest.raises(InvalidParameter) as info:
        IMAGES.coerce(value)
    assert info.value.field == field and words in info.value.message, info.value.message


def test_a_bomb_is_refused_before_its_pixels_are_read(monkeypatch):
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self) or None)
    with pytest.raises(InvalidParameter):
        IMAGES.coerce([b64(png_declaring(2000, 2000))])
    assert loads == []
