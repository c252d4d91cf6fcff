import math

import pytest

from generators.params import COMMON_PARAMS, ClassLabelParam, InvalidParameter, Param, parse_request, validate

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
    assert validate({}, SPECS) == {"n_images": 1, "format": "png", "steps": 50, "guidance_scale": 2.0}


def test_accepts_valid_values():
    out = validate({"n_images": 64, "seed": 0, "steps": 1, "guidance_scale": 3, "class_label": "Cat"}, SPECS)
    assert out["guidance_scale"] == 3.0 and isinstance(out["guidance_scale"], float)
    assert out["class_label"] == 1
    assert validate({"class_label": 0}, SPECS)["class_label"] == 0


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
