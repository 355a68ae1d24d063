"""LoRAs through gRPC: ListLoras, bad LoRAs as INVALID_ARGUMENT on their field, and the embedded
model's own LoRA (colour-swap) doing to the pictures what it was trained to do, as the analyser reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from diffstack.config import Settings
from diffstack.synthetic.analysis import analyse
from diffstack.synthetic.scenes import Scene
from diffstack_client import DiffstackClient, ServiceError
from diffstack_server.testing import serving_client

SWAP = {"red": "green", "green": "red", "yellow": "purple", "purple": "yellow"}
SCENES = [
    Scene("circle", "red", "large", "center", "black"),
    Scene("square", "green", "large", "left", "white"),
    Scene("triangle", "yellow", "large", "top", "gray"),
    Scene("diamond", "purple", "large", "right", "black"),
    Scene("square", "red", "large", "bottom", "blue"),
    Scene("circle", "yellow", "large", "top left", "blue"),
]


@pytest.fixture(scope="module")
def embedded_client(
    tmp_path_factory: pytest.TempPathFactory, settings_at: Callable[..., Settings]
) -> Iterator[DiffstackClient]:
    """A server on the embedded default model (with its trained LoRA), no other models."""
    settings = settings_at(tmp_path_factory.mktemp("no-models"), engine={"default_model": ""})
    with serving_client(settings) as client:
        yield client


def colours(client: DiffstackClient, **params: object) -> list[str | None]:
    read = []
    for index, scene in enumerate(SCENES):
        generation = client.generate(scene.prompt(), seed=index, **params)  # type: ignore[arg-type]
        read.append(analyse(generation.images[0].to_pil()).colour)
    return read


@pytest.mark.slow
def test_the_embedded_lora_swaps_the_colours_the_analyser_reads(embedded_client: DiffstackClient) -> None:
    plain = colours(embedded_client)
    swapped = colours(embedded_client, loras={"colour-swap": 1.0})
    asked = [scene.colour for scene in SCENES]
    assert sum(r == a for r, a in zip(plain, asked, strict=True)) >= len(SCENES) - 1, plain
    assert sum(r == SWAP[a] for r, a in zip(swapped, asked, strict=True)) >= len(SCENES) - 1, swapped
    assert colours(embedded_client) == plain, "a request without the LoRA draws the base model again"


@pytest.mark.slow
def test_list_loras_says_which_models_take_them(embedded_client: DiffstackClient) -> None:
    (lora,) = [lora for lora in embedded_client.loras() if lora.name == "colour-swap"]
    assert list(lora.compatible_models) == ["default"] and not lora.problems
    assert lora.base == "unet" and lora.rank == 8 and lora.size_bytes > 0
    assert list(lora.target_modules) == ["to_k", "to_out.0", "to_q", "to_v"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loras", "field"),
    [
        ({"nope": 1.0}, "spec.loras[0].name"),
        ({"../x": 1.0}, "spec.loras[0].name"),
        ({"colour-swap": 9.0}, "spec.loras[0].scale"),
    ],
)
def test_bad_loras_are_invalid_argument_on_their_field(
    embedded_client: DiffstackClient, loras: dict[str, float], field: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        embedded_client.generate("a red circle", loras=loras)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.violations, caught.value


def test_an_unset_scale_is_one_on_the_server() -> None:
    from diffstack_client.v1 import types_pb2
    from diffstack_server.convert import explicit_fields

    spec = types_pb2.GenerationSpec(prompt="x", loras=[types_pb2.LoraSpec(name="a")])
    (lora,) = explicit_fields(spec)["loras"]
    assert (lora.name, lora.scale) == ("a", 1.0)
