"""Sphinx configuration of the submod documentation."""

# Every Python example of these pages and of README.md runs as a test, tests/test_docs_examples.py (its docstring
# has the rules): a page's blocks share one namespace, in page order; "# -> VALUE" after an expression and pycon
# output are checked; the rst comment ".. example-setup" holds hidden set-up code for the next block, and
# ".. slow-example" marks a block that runs only with "python -m pytest -m slow".

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

project = "submod"
author = "submod developers"
copyright = "2026, submod developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# "Bases: ..." under each class: autodoc shows it whenever the key is present (a value of False turned it on too).
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"
autodoc_mock_imports = ["transformers"]
templates_path = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
suppress_warnings = ["ref.citation"]

# The build runs nitpicky in CI (sphinx -n -W, .ci/run): every cross-reference must resolve. Names of this project
# resolve to their entries in api.rst; private names are written in double backticks, not linked. Classes and
# functions of other libraries cannot resolve: their inventories (intersphinx) need the internet, which neither CI
# nor an offline reader's build has, so references into them are left unlinked, by module prefix. Only third-party
# (and standard library) modules belong here, never submod, verification or nn_adapters.
nitpick_ignore_regex = [
    (r"py:.*", r"(abc|numpy|scipy|sklearn|torch)(\..*)?"),
]

_PACKAGES = ("submod", "verification", "nn_adapters")


def _public_bases(app, name, obj, options, bases):
    """Show a class's bases as readers can look them up: a base of this project that its package does not export
    (``submod.constraints.Constraint``, whose interface is private) is replaced by its own bases."""
    import importlib

    i = 0
    while i < len(bases):
        base = bases[i]
        package = getattr(base, "__module__", "").split(".")[0]
        if package in _PACKAGES and base.__name__ not in importlib.import_module(package).__all__:
            bases[i:i + 1] = list(base.__bases__)
        else:
            i += 1


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
