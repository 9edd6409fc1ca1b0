"""Split memory-bound numpy work over the machine's cores with threads.

numpy releases the GIL inside ufuncs, reductions and matrix products on large arrays, so two threads working on
disjoint halves of a batch run in parallel. Results are bit-identical to a single thread whenever each output
element depends on one half only (as for per-candidate gains).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_WORKERS = max(1, min(2, os.cpu_count() or 1))
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()  # callers on several threads create one pool, not one each (the extras would leak)


def _forget_pool() -> None:
    """In a forked child the pool object survives but its threads do not: start a fresh one when needed (a
    ``ProcessPoolExecutor`` worker forked after this process used the pool would otherwise wait forever)."""
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()  # a lock held by another thread at the fork would never be released here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def workers() -> int:
    """Number of threads :func:`parallel_map` uses (at most 2: memory bandwidth saturates beyond that)."""
    return _WORKERS


def parallel_map(fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
    """``[fn(p) for p in parts]``, run on the shared thread pool when there is more than one part and core."""
    global _POOL
    if len(parts) <= 1 or _WORKERS <= 1:
        return [fn(p) for p in parts]
    pool = _POOL
    if pool is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="submod")
            pool = _POOL
    return list(pool.map(fn, parts))
