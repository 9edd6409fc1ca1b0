"""Collection rules shared by the test suite and the doctests of the three packages.

``nn_adapters`` and its tests need PyTorch (the ``torch`` extra). Without it they are not collected, and examples
that import torch are skipped, so that ``python -m pytest`` still checks ``submod`` and ``verification``, which
never import torch themselves (the dependency rule in DESIGN.md; torch is only an optional backend of
``submod.GramAccumulator``). CI runs the suite that way against the oldest numpy, scipy, scikit-learn and
matplotlib that ``pyproject.toml`` allows (``.ci/floor-constraints.txt``).
"""

import importlib.util

import pytest

HAVE_TORCH = importlib.util.find_spec("torch") is not None

collect_ignore_glob: list[str] = []
if not HAVE_TORCH:
    # the documentation's examples (README, docs/, benchmarks' --help) also need the full environment (``[all]``)
    collect_ignore_glob += ["nn_adapters/*", "tests/test_nn_*.py", "tests/test_transformer_*.py",
                            "tests/_torch_helpers.py", "tests/test_prune_*.py", "tests/test_docs_examples.py",
                            "submod/_gram_torch.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_TORCH:
        return
    skip = pytest.mark.skip(reason="the example imports torch, which is not installed")
    for item in items:
        examples = getattr(getattr(item, "dtest", None), "examples", ())
        if any("import torch" in ex.source for ex in examples):
            item.add_marker(skip)
