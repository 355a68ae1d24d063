"""One parser for plugin options, shared by every plugin and by request validation.

A plugin declares its options as a frozen dataclass: a typed field with a default per option, bounds
as ``Annotated`` markers (``Annotated[int, Ge(1)]``), cross-field rules in ``__post_init__`` (raise
``ValueError``). :func:`parse_options` checks a mapping against it with pydantic in strict mode: unknown
keys, wrong types (a string for a number, ``True`` for an integer, ``3.5`` for an integer), NaN and
infinities, and values out of bounds are refused, every problem named by its option. The offer
carries the dataclass, so the host checks a request's options before any plugin code runs.
``__post_init__`` may raise :class:`OptionsError` itself to name the option at fault.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from annotated_types import Ge, Gt, Interval, Le, Lt
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from diffstack.errors import shown

__all__ = ["Ge", "Gt", "Interval", "Le", "Lt", "OptionProblem", "OptionsError", "parse_options"]

Options = TypeVar("Options")


@dataclass(frozen=True)
class OptionProblem:
    """One bad option: its name (empty when the options clash as a whole) and what is wrong."""

    option: str
    message: str


class OptionsError(ValueError):
    """Options that do not fit their declaration; ``problems`` names each bad option."""

    def __init__(self, problems: list[OptionProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{p.option}: {p.message}" if p.option else p.message for p in problems))


def parse_options(schema: type[Options], options: Mapping[str, Any]) -> Options:
    """``schema`` built from ``options``, or :class:`OptionsError` listing every bad option."""
    try:
        checked = _validator(schema).model_validate(dict(options))
    except ValidationError as exc:
        raise OptionsError([_problem(schema, error) for error in exc.errors()]) from None
    given = {name: getattr(checked, name) for name in checked.model_fields_set}
    try:
        return schema(**given)
    except OptionsError:
        raise
    except (TypeError, ValueError) as exc:  # the schema's own cross-field rules
        raise OptionsError([OptionProblem("", str(exc))]) from None


_VALIDATORS: dict[type, type[BaseModel]] = {}


def _validator(schema: type) -> type[BaseModel]:
    """A strict pydantic model mirroring the dataclass's fields (built once per schema)."""
    if schema not in _VALIDATORS:
        _VALIDATORS[schema] = _build_validator(schema)
    return _VALIDATORS[schema]


def _build_validator(schema: type) -> type[BaseModel]:
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass of options")
    hints = typing.get_type_hints(schema, include_extras=True)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else ...)
        for f in dataclasses.fields(schema)
        if f.init
    }
    # Arbitrary types: an image option (``PIL.Image.Image``) is checked with isinstance.
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
    model: type[BaseModel] = create_model(f"{schema.__name__}Options", __config__=config, **fields)
    return model


def _problem(schema: type, error: Any) -> OptionProblem:
    option = ".".join(str(part) for part in error["loc"][:1])
    if error["type"] == "extra_forbidden":
        known = ", ".join(f.name for f in dataclasses.fields(schema) if f.init)
        return OptionProblem(option, f"unknown option; known: {known}")
    message = error["msg"]
    if "input" in error:
        message = f"{message}, got {shown(error['input'])}"
    return OptionProblem(option, message)
