"""Shared fixtures. torch is imported lazily so that the core tests run without it."""

import pytest


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
