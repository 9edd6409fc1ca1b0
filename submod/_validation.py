"""Input checks shared by the public entry points of :mod:`submod`.

Every check raises :class:`ValueError` (or :class:`TypeError`) with a message that names the problem and the
fix, so that the numerical kernels below the public boundary can trust their inputs.
"""

from __future__ import annotations

import numbers
import pickle
from collections.abc import Iterable
from concurrent.futures import Executor

import numpy as np
from numpy.typing import ArrayLike


def as_float_array(x: ArrayLike, name: str, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``x`` as a float64 array, checking its dimension and that it is finite.

    The caller's array is never modified: a copy is made whenever the conversion needs one, and callers that
    later write into the result must copy it themselves.
    """
    if hasattr(x, "tocsr") and hasattr(x, "nnz"):  # a scipy sparse matrix or array
        raise ValueError(f"{name} must be a dense array here; got a scipy sparse {type(x).__name__}. Pass "
                         f"{name}.toarray() (FacilityLocation(similarity=...) and Coverage take sparse matrices "
                         "as they are).")
    if np.iscomplexobj(x):
        raise ValueError(complex_message(name))
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array; got {type(x).__name__} that numpy cannot convert "
                         f"to float64 ({exc}).") from exc
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            raise ValueError(ndim_message(name, allowed, arr.shape))
    # One pass: a finite sum proves every entry finite; only a non-finite sum needs the element-wise check.
    if not np.isfinite(arr.sum()) and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(nonfinite_message(name, bad))
    return arr


# The messages of as_float_array, shared with the torch storage of GramAccumulator (submod._gram_torch), which
# checks tensors on their device and must word every error as the numpy path does.
def complex_message(name: str) -> str:
    """The error for complex input."""
    return (f"{name} must be real; got complex values. Pass the real part, the modulus or the real and imaginary "
            "parts as separate features.")


def ndim_message(name: str, allowed: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The error for an array whose number of dimensions is not in ``allowed``."""
    how = "np.ravel(...) for one value per element" if allowed == (1,) else \
        "np.atleast_2d(...) or .reshape(-1, 1) for one row per item"
    return (f"{name} must have {' or '.join(map(str, allowed))} dimension(s); got shape {tuple(shape)}. Reshape "
            f"it, e.g. with {how}.")


def nonfinite_message(name: str, bad: int) -> str:
    """The error for an array with ``bad`` NaN or infinite entries."""
    return f"{name} contains {bad} NaN or infinite value(s); remove or impute them first."


def width_message(got: int, width: int) -> str:
    """The error for a block of :meth:`~submod.GramAccumulator.update_blocks` whose columns do not match its list."""
    return (f"A_batch has {got} columns but its block lists {width} column indices; pass one index per column "
            "of the block's rows.")


def check_ground_set_size(n: object, name: str = "n") -> int:
    """Check that ``n`` is a positive integer ground-set size."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer; got {n!r}.")
    if int(n) <= 0:
        raise ValueError(f"{name} must be positive: the ground set is empty (n = {n}). Pass at least one item.")
    return int(n)


def check_k(k: object, n: int, allow_none: bool = False) -> int | None:
    """Check a budget ``0 <= k <= n``."""
    if k is None and allow_none:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be a non-negative integer; got {k!r}.")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be non-negative; got k = {k}.")
    if k > n:
        raise ValueError(f"k = {k} exceeds the ground-set size n = {n}; pass k <= {n}.")
    return k


def as_index_array(S: Iterable[int] | ArrayLike, n: int, name: str = "S") -> np.ndarray:
    """Return ``S`` as an int64 array of distinct indices in ``[0, n)``, in the order given.

    Raises if an index is out of range or repeated.
    """
    if isinstance(S, (numbers.Number, str, bytes)) or (isinstance(S, np.ndarray) and S.ndim == 0):
        raise ValueError(f"{name} must be a set of indices (a list or array of int); got {S!r}. Pass [{S!r}] for "
                         "the set holding that one element.")
    idx = np.asarray(list(S) if not isinstance(S, np.ndarray) else S)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"boolean mask {name} must have shape ({n},); got {idx.shape}.")
        return np.flatnonzero(idx).astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        if np.issubdtype(idx.dtype, np.floating) and np.all(np.isfinite(idx)) and np.all(np.mod(idx, 1) == 0):
            if idx.min() < 0 or idx.max() >= n:  # before the cast, which would wrap a huge float around
                raise ValueError(f"{name} holds an index outside [0, {n}): min {idx.min():g}, max {idx.max():g}.")
            idx = idx.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer indices; got dtype {idx.dtype}.")
    idx = idx.astype(np.int64).ravel()
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"{name} holds an index outside [0, {n}): min {idx.min()}, max {idx.max()}.")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name} holds repeated indices; a set has each element once.")
    return idx


def frozen(arr: np.ndarray, copy: bool = True) -> np.ndarray:
    """A read-only float64 array: a private copy (``copy=True``), or a read-only view of ``arr`` itself."""
    out = np.array(arr, dtype=np.float64, copy=True) if copy else arr.view()
    out.flags.writeable = False
    return out


def is_symmetric(K: np.ndarray, rtol: float, atol: float, block: int = 32) -> bool:
    """Whether ``|K_ij - K_ji| <= atol + rtol * max(|K_ij|, |K_ji|)`` for all ``i, j`` (a square, finite ``K``).

    Compares blocks of rows above the diagonal with the matching blocks of columns, so that no temporary is larger
    than ``block x n`` (``np.allclose(K, K.T)`` makes several full-size ones, which cost more than the check). Narrow
    blocks read the mirrored columns a cache line at a time: 32 rows took 0.043 s at n = 3000 on the development
    machine, 256 rows 0.084 s, ``np.allclose`` 0.25 s.
    """
    n = K.shape[0]
    for lo in range(0, n, block):
        upper = K[lo:lo + block, lo:]       # rows lo..hi, from the diagonal block to the right
        lower = K[lo:, lo:lo + block].T     # the same entries mirrored
        tol = np.maximum(np.abs(upper), np.abs(lower))
        tol *= rtol
        tol += atol
        if not np.all(np.abs(upper - lower) <= tol):
            return False
    return True


def check_executor(executor: object) -> None:
    """Refuse an ``executor`` that is neither ``None`` nor a ``concurrent.futures.Executor`` instance (or an object
    with its ``submit``, as Dask's ``Client.get_executor()`` returns)."""
    if isinstance(executor, type):
        raise ValueError(f"executor must be a concurrent.futures.Executor instance, e.g. {executor.__name__}(2); got "
                         f"the class {executor.__name__} itself.")
    if executor is not None and not isinstance(executor, Executor) and not callable(getattr(executor, "submit",
                                                                                          None)):
        raise ValueError(f"executor must be a concurrent.futures.Executor (e.g. ThreadPoolExecutor, "
                         f"ProcessPoolExecutor, or distributed.Client(...).get_executor()); got "
                         f"{type(executor).__name__}.")


def pickling_error(err: BaseException | None) -> BaseException | None:
    """The exception, ``err`` or one it was raised from, that says something could not be pickled (else ``None``).

    Python raises ``PicklingError``, ``AttributeError`` ("Can't pickle local object") or ``TypeError`` ("cannot
    pickle '_thread.lock' object"); Dask raises ``TypeError('Could not serialize object of type ...')`` from
    the pickler's error, when a job is submitted: the pickler's error is the one that names what failed."""
    while err is not None:
        if isinstance(err, pickle.PicklingError) or (isinstance(err, (AttributeError, TypeError))
                                                     and "pickle" in str(err).lower()):
            return err
        err = err.__cause__
    return None


def rng_from_seed(seed: object, name: str = "seed") -> np.random.Generator:
    """``np.random.default_rng(seed)``, with an error that names ``name`` and what to pass when numpy refuses the
    seed (its own messages, 'expected non-negative integer' or 'SeedSequence expects int...', name neither).

    Examples
    --------
    >>> bool(rng_from_seed(0).integers(10) == np.random.default_rng(0).integers(10))
    True
    """
    try:
        return np.random.default_rng(seed)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be None, a non-negative integer or a numpy Generator; got {seed!r} "
                         f"({exc}).") from exc


def gains_array(g: object, size: int, cand: np.ndarray | None) -> np.ndarray:
    """``g`` as a float64 array of shape ``(size,)``, or a clear error naming the :meth:`GainState.gains` contract.

    The optimizers index gains by position: a state that returns every element's gain when asked for a few
    candidates, a column vector or a scalar would otherwise misalign gains with candidates (a wrong set, silently,
    for stochastic greedy) or fail deep inside numpy."""
    try:
        arr = np.asarray(g, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the objective's GainState.gains must return an array of numbers; got "
                         f"{type(g).__name__} ({exc}).") from exc
    if arr.shape != (size,):
        asked = "candidates=None (every element)" if cand is None else f"{size} candidate(s)"
        raise ValueError(f"the objective's GainState.gains returned shape {arr.shape} when asked for {asked}; it "
                         f"must return a 1-D array of {size} gains, one per candidate in the order given (all n "
                         "elements when candidates is None). Index your gains with the candidates, e.g. "
                         "gains_of_all[self._all(candidates)].")
    return arr
