"""Run the per-layer numerical work of layer-mode pruning on a ``concurrent.futures`` executor.

With LayerInChange statistics every layer's statistics come from the original network, so once they are gathered
the selection (greedy paths, cross-validated ridges) and the refit of one layer do not depend on any other layer.
:class:`OrderedJobs` runs such jobs one after another in this process (``executor=None``: exactly the serial
loop), or submits them to an executor (a ``ThreadPoolExecutor``, a ``ProcessPoolExecutor``, or Dask's
``distributed.Client(...).get_executor()``) as they come and hands the results back in the order of the jobs, so
that the caller shrinks the modules and writes the report in the same order as without one.

A job is a module-level function (it pickles by reference) with arguments that pickle: numpy arrays and the
statistics (:class:`submod.GramAccumulator` pickles as numpy on the host whatever its storage). A thread pool
pickles nothing and reads the statistics where they are. On an executor every job runs with one BLAS thread
(:func:`submod._sr_threads.one_blas_thread`): the parallelism is across layers. In the calling process the
thread that uses :class:`OrderedJobs` holds that reduction while jobs may run: OpenBLAS (0.3.31 here) ignores a
request from a thread other than the main one to raise its thread count, so a job thread could lower it for the
whole process but never give it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from submod._sr_threads import one_blas_thread
from submod._validation import check_executor, pickling_error

__all__ = ["check_executor", "OrderedJobs", "LAYER_ONLY"]

#: Why ``executor=`` needs layer-mode statistics (the end of the error raised otherwise).
LAYER_ONLY = ("every layer's statistics come from the network pruned before it, so the layers are pruned one "
              "after another; executor= runs the layers in parallel with LayerInChange statistics only, which "
              "come from the original network")


def _on_one_blas_thread(fn: Callable[..., Any], *args: object) -> Any:
    """``fn(*args)`` with one BLAS thread in the process that runs it: the jobs run in parallel with each other,
    not inside BLAS (as a Dask worker is set up by default)."""
    with one_blas_thread():
        return fn(*args)


def _failed(err: Exception, executor: object, what: str) -> Exception:
    """The error to raise for job ``what`` that failed with ``err`` on ``executor``."""
    where = type(executor).__name__
    cause = pickling_error(err)
    if cause is not None:
        return ValueError(f"{what}: the job and its statistics must pickle to run on {where}, and they do not "
                          f"({type(cause).__name__}: {cause}). Use a ThreadPoolExecutor (nothing is pickled) or no "
                          "executor.")
    return RuntimeError(f"{what} failed on {where}: {type(err).__name__}: {err}")


class OrderedJobs:
    """Jobs whose results are used in the order the jobs were added.

    Without an executor, :meth:`add` runs the job and uses its result at once: exactly a plain loop. With one,
    :meth:`add` submits the job and returns (so the caller's own work between two jobs, e.g. the forward pass
    of the next layer, overlaps with the running jobs), and :meth:`finish` uses the results in order as they
    arrive; :meth:`then` keeps a step without a job in that order. A job that fails raises a ``RuntimeError``
    naming it and the executor, with the worker's exception as its cause (a ``ValueError`` when it could not be
    pickled). Leaving the ``with`` block, also on an error, cancels the jobs that have not started.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> out = []
    >>> with ThreadPoolExecutor(2) as pool, OrderedJobs(pool) as jobs:
    ...     for x in (3, 1, 2):
    ...         jobs.add(f"square of {x}", pow, (x, 2), out.append)
    ...     jobs.then(lambda: out.append("done"))
    ...     jobs.finish()
    >>> out
    [9, 1, 4, 'done']
    """

    def __init__(self, executor: Executor | None) -> None:
        self.executor = executor
        self._todo: list[tuple[str, Future | None, Callable[..., None]]] = []
        self._blas = contextlib.ExitStack()

    def add(self, what: str, fn: Callable[..., Any], args: tuple, use: Callable[[Any], None]) -> None:
        """Run ``fn(*args)`` (``what`` names it in errors) and pass its result to ``use``, in order."""
        if self.executor is None:
            use(fn(*args))
            return
        try:
            fut = self.executor.submit(_on_one_blas_thread, fn, *args)
        except Exception as err:  # Dask pickles when it submits
            raise _failed(err, self.executor, what) from err
        self._todo.append((what, fut, use))

    def then(self, use: Callable[[], None]) -> None:
        """Call ``use()`` after the results of the jobs added so far have been used."""
        if self.executor is None:
            use()
        else:
            self._todo.append(("", None, use))

    def finish(self) -> None:
        """Use the results of the jobs (and call the steps of :meth:`then`) in order."""
        while self._todo:  # after an error, the rest is cancelled on leaving the with block
            what, fut, use = self._todo.pop(0)
            if fut is None:
                use()
                continue
            try:
                out = fut.result()
            except Exception as err:
                raise _failed(err, self.executor, what) from err
            use(out)

    def __enter__(self) -> OrderedJobs:
        if self.executor is not None:
            # one BLAS thread in this process while jobs may run, set and given back by this thread: jobs on a
            # thread pool then find it set, and OpenBLAS ignores a worker thread that raises the count back
            self._blas.enter_context(one_blas_thread())
        return self

    def __exit__(self, *exc: object) -> None:
        for _, fut, _ in self._todo:
            if fut is not None:
                fut.cancel()
        self._todo = []
        self._blas.close()
