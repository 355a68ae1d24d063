"""Typed plugin options: ListPlugins gives each wrapper's option schema, and requests are checked
against the same declaration (INVALID_ARGUMENT naming ``spec.wrappers.<plugin>.<option>``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import grpc
import pytest

from diffstack.config import Settings
from diffstack.option_schema import OptionSpec, OptionType, option_schema
from diffstack.options import Ge, Interval, Lt
from diffstack.testing import BASELINE_PLUGINS
from diffstack_client import DiffstackClient, OptionSchema, ServiceError, WrapperSchema
from diffstack_client import OptionType as WireOptionType
from diffstack_server import BackgroundServer
from diffstack_server.testing import WAIT_S


@dataclass(frozen=True)
class Sample:
    """Options of every kind the schema describes."""

    steps: Annotated[int, Ge(1)] = 3
    """How many steps."""
    ratio: Annotated[float, Interval(gt=0, le=1)] = 0.5
    limit: Annotated[float, Lt(10)] | None = None
    """An optional upper limit."""
    label: str = "x"
    on: bool = True


def test_option_schema_reads_types_bounds_defaults_and_docstrings() -> None:
    assert option_schema(Sample) == (
        OptionSpec("steps", OptionType.INT, default=3, minimum=1.0, description="How many steps."),
        OptionSpec("ratio", OptionType.FLOAT, default=0.5, minimum=0.0, exclusive_minimum=True, maximum=1.0),
        OptionSpec(
            "limit",
            OptionType.FLOAT,
            nullable=True,
            maximum=10.0,
            exclusive_maximum=True,
            description="An optional upper limit.",
        ),
        OptionSpec("label", OptionType.STRING, default="x"),
        OptionSpec("on", OptionType.BOOL, default=True),
    )


def test_option_schema_refuses_what_it_cannot_describe() -> None:
    @dataclass(frozen=True)
    class Odd:
        pair: tuple[int, int] = (1, 2)

    with pytest.raises(TypeError, match="'pair'"):
        option_schema(Odd)


@pytest.mark.slow
def test_list_plugins_gives_wrapper_schemas_that_requests_are_checked_against(
    settings_for: Callable[..., Settings],
) -> None:
    settings = settings_for(plugins={"allow": [*BASELINE_PLUGINS, "deepcache"]}, engine={"warmup_steps": 0})
    with BackgroundServer(settings) as server, DiffstackClient(server.target, timeout=WAIT_S) as client:
        plugins = {plugin.name: plugin for plugin in client.plugins()}
        assert plugins["sdpa"].wrappers == ()
        (wrapper,) = plugins["deepcache"].wrappers
        assert isinstance(wrapper, WrapperSchema) and wrapper.wrapper == "deepcache"
        interval = next(option for option in wrapper.options if option.name == "interval")
        assert interval == OptionSchema(
            name="interval",
            type=WireOptionType.INT,
            nullable=False,
            default=3,
            minimum=1.0,
            exclusive_minimum=False,
            maximum=None,
            exclusive_maximum=False,
            description=interval.description,
        )
        assert interval.description.startswith("Every ``interval``-th step runs the whole UNet")
        assert next(o for o in wrapper.options if o.name == "end").nullable
        with pytest.raises(ServiceError) as failure:
            client.generate("a cube", steps=2, wrappers={"deepcache": {"interval": 0}})
        assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "spec.wrappers.deepcache.interval" in failure.value.violations
        assert client.generate("a cube", steps=2, wrappers={"deepcache": {"interval": 2}}).images
