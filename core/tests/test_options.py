"""The one options parser: strict types, bounds, unknown keys and cross-field rules, each named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from diffstack.options import Ge, Interval, OptionProblem, OptionsError, parse_options


@dataclass(frozen=True)
class Example:
    count: Annotated[int, Ge(1)] = 3
    fraction: Annotated[float, Interval(gt=0, le=1)] = 0.5
    flag: bool = False
    method: Literal["fast", "exact"] = "fast"
    limit: Annotated[int, Ge(0)] | None = None

    def __post_init__(self) -> None:
        if self.method == "exact" and self.flag:
            raise ValueError("flag needs method fast")


def problems(options: dict[str, object]) -> list[tuple[str, str]]:
    with pytest.raises(OptionsError) as failure:
        parse_options(Example, options)
    return [(p.option, p.message) for p in failure.value.problems]


def test_defaults_and_given_values() -> None:
    assert parse_options(Example, {}) == Example()
    assert parse_options(Example, {"count": 5, "fraction": 1, "limit": None}) == Example(
        count=5, fraction=1.0
    )


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({"count": 0}, "count", "Input should be greater than or equal to 1, got 0"),
        ({"count": "3"}, "count", "Input should be a valid integer, got '3'"),
        ({"count": 2.5}, "count", "Input should be a valid integer, got 2.5"),
        ({"count": True}, "count", "Input should be a valid integer, got True"),
        ({"fraction": float("nan")}, "fraction", "Input should be a finite number, got nan"),
        ({"fraction": float("inf")}, "fraction", "Input should be a finite number, got inf"),
        ({"fraction": 0}, "fraction", "Input should be greater than 0, got 0"),
        ({"flag": 1}, "flag", "Input should be a valid boolean, got 1"),
        ({"method": "slow"}, "method", "Input should be 'fast' or 'exact', got 'slow'"),
        ({"cuont": 3}, "cuont", "unknown option; known: count, fraction, flag, method, limit"),
    ],
)
def test_each_bad_option_is_named(options: dict[str, object], option: str, message: str) -> None:
    assert problems(options) == [(option, message)]


def test_every_problem_comes_back_at_once() -> None:
    assert {p[0] for p in problems({"count": 0, "flag": "yes", "x": 1})} == {"count", "flag", "x"}


def test_cross_field_rules_come_from_the_dataclass() -> None:
    assert problems({"method": "exact", "flag": True}) == [("", "flag needs method fast")]


def test_a_rule_may_name_its_option() -> None:
    @dataclass(frozen=True)
    class Named:
        start: float = 0

        def __post_init__(self) -> None:
            if self.start > 1:
                raise OptionsError([OptionProblem("start", "must be a fraction")])

    with pytest.raises(OptionsError) as failure:
        parse_options(Named, {"start": 2})
    assert failure.value.problems == (OptionProblem("start", "must be a fraction"),)


def test_echoed_values_are_bounded() -> None:
    [(_, message)] = problems({"count": "x" * 100_000})
    assert len(message) < 200


def test_only_dataclasses_declare_options() -> None:
    with pytest.raises(TypeError, match="not a dataclass"):
        parse_options(dict, {})
