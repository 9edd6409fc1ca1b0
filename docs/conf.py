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
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
autodoc_mock_imports = ["transformers"]
templates_path = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
suppress_warnings = ["ref.citation"]
