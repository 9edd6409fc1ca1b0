"""The Hypothesis profile that tests/conftest.py loads: examples are never timed (a loaded machine is not a
failure of the code), and they are drawn the same on every run only where ``CI`` is set."""

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")


def test_examples_have_no_deadline():
    assert hypothesis.settings.default.deadline is None


def test_examples_are_fixed_only_in_ci():
    assert hypothesis.settings.default.derandomize == bool(os.environ.get("CI"))
