"""Shared fixtures. torch is imported lazily so that the core tests run without it.

Hypothesis: where the environment variable ``CI`` is set (``.ci/run`` sets it), the ``ci`` profile draws the same
examples on every run, so a CI result does not depend on luck; elsewhere every run draws new examples and keeps
exploring (that is how a rare rounding case in ``verification.certify`` was found). ``--hypothesis-profile=ci``
reproduces a CI run locally. Neither profile has a deadline: a test's examples are not timed, since a loaded
machine (a 16-worker run on a GPU machine) made one example of a 4-column least-squares test take 273 ms against
Hypothesis's default 200 ms deadline, a failure that says nothing about the code under test.
"""

import os

import pytest

try:
    from hypothesis import settings
except ImportError:  # the core tests do not need it
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None, print_blob=True)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def torch_one_thread():
    """Run a test with one torch thread and a fixed seed (small models on a shared 2-core machine run fastest
    single-threaded), restoring the thread count afterwards."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def peak_bytes():
    """``peak_bytes(fn)`` runs ``fn()`` under ``tracemalloc`` and returns ``(its result, peak traced bytes)``."""
    import tracemalloc

    def run(fn):
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return run
