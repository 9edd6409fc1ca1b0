"""The CI's floor environment (.ci/floor-constraints.txt, installed by .ci/run) tests the lower bounds that
pyproject.toml claims: one pin per core dependency, in the oldest minor version its lower bound allows, on the
oldest Python that requires-python allows, and the file's comment says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ROOT / ".ci" / "floor-constraints.txt"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the floor environment itself runs 3.10
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lower_bounds() -> dict[str, tuple[int, ...]]:
    bounds = {}
    for requirement in _pyproject()["project"]["dependencies"]:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        bounds[name.lower()] = tuple(int(p) for p in version.split("."))
    return bounds


def _pins() -> dict[str, tuple[int, ...]]:
    pins = {}
    for line in FLOOR.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = tuple(int(p) for p in version.split("."))
    return pins


def test_floor_pins_every_core_dependency_at_its_oldest_minor_version():
    bounds, pins = _lower_bounds(), _pins()
    assert set(pins) == set(bounds)
    for name, bound in bounds.items():
        assert pins[name] >= bound, name
        assert pins[name][:2] == bound[:2], f"{name}: pinned {pins[name]}, the lower bound's minor is {bound[:2]}"


def test_floor_python_is_the_oldest_python_allowed_and_the_comment_says_which():
    floor_python = re.fullmatch(r">=(3\.\d+)", _pyproject()["project"]["requires-python"]).group(1)
    ci_python = re.findall(r"pyenv prefix (3\.\d+)", (ROOT / ".ci" / "run").read_text())
    assert ci_python and set(ci_python) == {floor_python}
    comment = "\n".join(line for line in FLOOR.read_text().splitlines() if line.startswith("#"))
    named = set(re.findall(r"Python (3\.\d+)", comment))
    assert named == {floor_python}, f"the comment names Python {sorted(named)}; the floor is {floor_python}"
