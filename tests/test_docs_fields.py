"""Every field of a public dataclass (result and report classes) is documented in its numpydoc docstring.

Users read a result's fields from its docstring (and the API reference built from it), so a field the code fills
but the docstring does not name is undocumented API. Public: listed in the ``__all__`` of one of the packages
``submod``, ``verification`` and ``nn_adapters`` or of one of their modules whose name does not start with an
underscore. Documented: named in the ``Attributes`` section, or in ``Parameters`` for a class users build
themselves (``nn_adapters.Pair``); one entry may name several fields (``params_before, params_after : int``).
Fields whose names start with an underscore are private.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

# the floor environment of CI installs the test extra only; the docs extra brings numpydoc
NumpyDocString = pytest.importorskip("numpydoc.docscrape").NumpyDocString

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("submod", "verification", "nn_adapters")
NEEDS = {"nn_adapters": "torch", "verification.strategies": "hypothesis"}

#: Fields still undocumented in files that other work is changing; each entry is removed with its fix (the test
#: fails once a listed field is documented, so the list cannot go stale).
KNOWN_GAPS: dict[str, set[str]] = {}


def _public_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])
                  if not m.name.startswith("_")]
    return names


def documented_names(cls: type) -> set[str]:
    """The names a class's numpydoc ``Attributes`` and ``Parameters`` sections describe."""
    doc = NumpyDocString(inspect.getdoc(cls) or "")
    return {name.strip() for section in ("Attributes", "Parameters") for entry in doc[section]
            for name in entry.name.split(",")}


def undocumented_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} - documented_names(cls)


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_field_of_a_public_dataclass_is_documented(module_name):
    for prefix, requirement in NEEDS.items():
        if module_name == prefix or module_name.startswith(prefix + "."):
            pytest.importorskip(requirement)
    module = importlib.import_module(module_name)
    classes = [getattr(module, name) for name in getattr(module, "__all__", [])]
    problems = []
    for cls in [c for c in classes if inspect.isclass(c) and dataclasses.is_dataclass(c)]:
        qualname = f"{cls.__module__}.{cls.__name__}"
        missing = undocumented_fields(cls)
        expected = KNOWN_GAPS.get(qualname, set())
        if missing - expected:
            problems.append(f"{qualname}: fields {sorted(missing - expected)} are missing from its docstring's "
                            "Attributes section")
        if expected - missing:
            problems.append(f"{qualname}: {sorted(expected - missing)} are documented now; remove them from "
                            "KNOWN_GAPS")
    assert not problems, "\n".join(problems)


def test_the_check_reads_numpydoc_sections():
    @dataclasses.dataclass
    class Example:
        """An example.

        Attributes
        ----------
        a, b : int
            Two numbers.
        c : str
        """

        a: int
        b: int
        c: str
        d: float
        _private: int = 0

    assert undocumented_fields(Example) == {"d"}
