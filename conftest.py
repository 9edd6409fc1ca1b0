"""Collection rules shared by the test suite and the doctests of the three packages.

``nn_adapters`` and its tests need PyTorch (the ``torch`` extra). Without it they are not collected, so that
``python -m pytest`` still checks ``submod`` and ``verification``, which never import torch (the dependency rule
in DESIGN.md); CI runs it that way against the oldest numpy, scipy, scikit-learn and matplotlib that
``pyproject.toml`` allows (``.ci/floor-constraints.txt``).
"""

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("torch") is None:
    # the documentation's examples (README, docs/, benchmarks' --help) also need the full environment (``[all]``)
    collect_ignore_glob += ["nn_adapters/*", "tests/test_nn_*.py", "tests/test_transformer_*.py",
                            "tests/_torch_helpers.py", "tests/test_docs_examples.py"]
