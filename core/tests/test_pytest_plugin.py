"""diffstack's pytest plugin: a test that needs the tiny models is ``slow`` without saying so."""

from __future__ import annotations

import pytest


def test_a_test_using_the_tiny_models_is_marked_slow(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_with_models(models_dir):
            pass

        def test_pure():
            pass
        """
    )
    # Collection only: deselection happens before any fixture (and so any model) is built.
    result = pytester.runpytest("-p", "diffstack.pytest_plugin", "-m", "not slow", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_pure*", "*1/2 tests collected (1 deselected)*"])
    result.stdout.no_fnmatch_line("*test_with_models*")
