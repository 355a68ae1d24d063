"""The schema of a plugin's per-request options, read from the dataclass that declares them.

The same frozen dataclass that :func:`diffstack.options.parse_options` checks requests against is
described here for clients in any language: each option's name, type, whether it may be null
(``X | None``), its bounds (``Annotated`` ``Ge``/``Gt``/``Le``/``Lt``/``Interval`` markers), its
default and its description (the attribute's docstring, as the plugin guide asks plugins to write).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

from annotated_types import Ge, Gt, Interval, Le, Lt
from PIL import Image as PILImage

__all__ = ["OptionSpec", "OptionType", "option_schema"]


class OptionType(enum.StrEnum):
    """The kind of value an option takes."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    IMAGE = "image"


_TYPES = {
    bool: OptionType.BOOL,
    int: OptionType.INT,
    float: OptionType.FLOAT,
    str: OptionType.STRING,
    PILImage.Image: OptionType.IMAGE,
}


@dataclass(frozen=True)
class OptionSpec:
    """One option as a client sees it; bounds are None where the declaration sets none."""

    name: str
    type: OptionType
    nullable: bool = False
    default: bool | int | float | str | None = None
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    exclusive_maximum: bool = False
    description: str = ""


def option_schema(schema: type) -> tuple[OptionSpec, ...]:
    """Every option ``schema`` (a dataclass of options) declares, in declaration order."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass of options")
    hints = typing.get_type_hints(schema, include_extras=True)
    described = _attribute_docstrings(schema)
    return tuple(
        _spec(f.name, hints[f.name], f.default, described.get(f.name, ""))
        for f in dataclasses.fields(schema)
        if f.init
    )


def _spec(name: str, hint: Any, default: Any, description: str) -> OptionSpec:
    nullable = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        nullable = len(members) < len(typing.get_args(hint))
        if len(members) != 1:
            raise TypeError(f"option {name!r}: a union of several types has no schema")
        hint = members[0]
    metadata: tuple[Any, ...] = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extra = typing.get_args(hint)
        metadata = tuple(extra)
    if hint not in _TYPES:
        raise TypeError(
            f"option {name!r}: type {hint!r} has no schema (bool, int, float, str or PIL.Image.Image)"
        )
    spec = OptionSpec(
        name=name,
        type=_TYPES[hint],
        nullable=nullable,
        default=None if default is dataclasses.MISSING else default,
        description=description,
    )
    for marker in metadata:
        spec = _bounded(spec, marker)
    return spec


def _bounded(spec: OptionSpec, marker: Any) -> OptionSpec:
    if isinstance(marker, Interval):
        for part in (Ge, Gt, Le, Lt):
            value = getattr(marker, part.__name__.lower())
            if value is not None:
                spec = _bounded(spec, part(value))
        return spec
    bound: Any = getattr(marker, type(marker).__name__.lower(), None)
    if isinstance(marker, Ge | Gt):
        return dataclasses.replace(spec, minimum=float(bound), exclusive_minimum=isinstance(marker, Gt))
    if isinstance(marker, Le | Lt):
        return dataclasses.replace(spec, maximum=float(bound), exclusive_maximum=isinstance(marker, Lt))
    return spec


def _attribute_docstrings(schema: type) -> dict[str, str]:
    """The string literal under each annotated attribute of the class body, by attribute name."""
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):  # no source at hand (a class built at run time): no descriptions
        return {}
    body = ast.parse(source).body
    if not body or not isinstance(body[0], ast.ClassDef):
        return {}
    found: dict[str, str] = {}
    statements = body[0].body
    for statement, following in itertools.pairwise(statements):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found
