"""Optional BLAS thread control for the sequential part of forward regression.

Adding a unit to a :class:`~submod._sr_kernels.ForwardRegressionState` makes small, memory-bound BLAS calls
(matrix-vector products over ``p x m`` or ``b x p`` matrices). Multi-threaded OpenBLAS runs such calls slower than
one thread, and far slower when the cores are shared: on the project's loaded 2-core machine a 1536 x 384
matrix-vector product took 14 ms with 2 threads and 0.3 ms with one. When ``threadpoolctl`` is installed (it comes
with scikit-learn), :func:`one_blas_thread` runs a block with one BLAS thread and restores the previous counts on
exit (about 30 us per use); without it, nothing changes.

Side effect to know: the BLAS thread count is process-wide, so BLAS calls made by other Python threads while a unit
is being added also run on one thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # optional: submod depends only on numpy and scipy
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - exercised only without threadpoolctl
    ThreadpoolController = None

_libs: list[Any] | None = None


def _blas_libs() -> list[Any]:
    """The BLAS libraries loaded in the process (found once, on first use)."""
    global _libs
    if _libs is None:
        _libs = []
        if ThreadpoolController is not None:
            try:
                _libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # pragma: no cover - a threadpoolctl that cannot inspect this process
                _libs = []
    return _libs


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with one BLAS thread (when threadpoolctl is available), then restore the thread counts."""
    libs = _blas_libs()
    saved = [lib.num_threads for lib in libs]
    if all(s == 1 for s in saved):
        yield
        return
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, s in zip(libs, saved):
            lib.set_num_threads(s)
