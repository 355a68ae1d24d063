"""Bad requests: every problem reported at once, each naming the client's field."""

from __future__ import annotations

import pytest
from PIL import Image

from diffstack.engine import Engine, GenerationRequest
from diffstack.errors import InvalidRequest


def fields_of(engine: Engine, **fields: object) -> set[str]:
    with pytest.raises(InvalidRequest) as error:
        engine.prepare(GenerationRequest(**{"prompt": "a red circle", **fields}))  # type: ignore[arg-type]
    return {v.field for v in error.value.violations}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": -8}, "height"),
        ({"width": 4096, "height": 4096}, "width"),
        ({"steps": 1000}, "steps"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": float("nan")}, "guidance"),
        ({"sampler": "nope"}, "sampler"),
        ({"sampler": "flow_euler"}, "sampler"),
        ({"schedule": "nope"}, "schedule"),
        ({"schedule": "karras", "sampler": "ddim"}, "schedule"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 99}, "num_images"),
        ({"seeds": (1, 2, 3)}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"prompt": "cat " * 100}, "prompt"),
        ({"negative_prompt": "dog " * 100}, "negative_prompt"),
        ({"wrappers": {"nope": {}}}, "wrappers"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 1.5}, "strength"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.01}, "strength"),
        ({"model": "../etc"}, "model"),
    ],
)
def test_each_bad_field_is_named(engine: Engine, fields: dict[str, object], field: str) -> None:
    assert field in fields_of(engine, **fields)


def test_all_violations_come_back_together(engine: Engine) -> None:
    assert fields_of(engine, width=3, steps=10_000, sampler="x") >= {"width", "steps", "sampler"}


def test_flux_takes_no_negative_prompt(engine: Engine) -> None:
    assert "negative_prompt" in fields_of(engine, model="tiny-flux", negative_prompt="blurry")


def test_defaults_come_from_the_model_card(engine: Engine) -> None:
    request = engine.prepare(GenerationRequest("a red circle"))
    assert (request.width, request.height, request.steps, request.sampler) == (64, 64, 4, "euler")
    assert len(request.seeds) == 1
