r"""Partitioned (distributed) greedy over large ground sets: GreeDi with a random partition.

The two-round algorithm of Mirzasoleiman, Karbasi, Sarkar & Krause (NeurIPS 2013; JMLR 2016):

1. split the ground set ``V`` into ``m`` parts ``V_1, ..., V_m``;
2. on each part, independently (in parallel), run greedy for ``k`` picks on the objective restricted to the part
   (:meth:`submod.SetFunction.restrict`), giving ``A_1, ..., A_m``;
3. run greedy for ``k`` picks on the union ``B = A_1 u ... u A_m`` (at most ``m k`` elements);
4. return the better, under the full objective ``F``, of that set and the best ``A_i``.

Guarantees (monotone submodular ``F``, exact restrictions, greedy or lazy on the parts):

* For **every** partition, ``F(result) >= (1 - 1/e) / min(m, k) * OPT_k``: ``OPT_k`` splits into at most
  ``min(m, k)`` non-empty pieces ``O_i = OPT n V_i``, subadditivity gives ``max_i F(O_i) >= OPT_k / min(m, k)``,
  and greedy on ``V_i`` reaches ``(1 - 1/e) F(O_i)``. Mirzasoleiman et al. (NeurIPS 2013, Thm. 4.1) show that
  the ``1 / min(m, k)`` factor cannot be avoided for an adversarial partition.
* For the **random** partition used here (each element in a part drawn uniformly and independently), the expected
  value is ``E[F(result)] >= (1 - 1/e) / 2 * OPT_k`` (Barbosa, Ene, Nguyen & Ward, ICML 2015, RandGreeDi with
  greedy, which is ``(1 - 1/e)``-approximate and 1-nice).

For ``gamma``-weakly submodular ``F`` (e.g. :class:`submod.SparseRegression`), Khanna, Elenberg, Dimakis, Negahban &
Ghosh (AISTATS 2017) prove a constant-factor guarantee in expectation for the random partition that depends on
the submodularity ratio; its constant could not be checked against the paper here, so this module states none
for non-submodular ``F`` and relies on the certificate, which is a proven bound (with a proven ``gamma_lower``).

The certificate is the online bound of :mod:`submod.certificates` on the **full** objective at a few prefixes of
the returned set, the same code path as :func:`submod.maximize`: it needs only the returned set and ``F``.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._validation import check_executor, check_k, pickling_error, rng_from_seed
from .base import SetFunction
from .certificates import RatioBound
from .constraints import Cardinality
from .optimize import (
    DEFAULT_EPS,
    NonMonotoneWarning,
    SelectionResult,
    StaleBoundWarning,
    _budget_zero_certificate,
    _certificate,
    _check_gamma,
    _check_objective_and_method,
    _dispatch,
    _gains,
    _Run,
    _scale_tol,
    maximize,
)

__all__ = ["maximize_distributed", "DistributedInfo"]


@dataclass(frozen=True)
class DistributedInfo:
    """How :func:`maximize_distributed` split the ground set and which candidate set it returned.

    Attributes
    ----------
    n_parts : int
        Number of parts ``m`` (empty parts included).
    part_sizes : ndarray of int
        Elements in each part.
    part_values : ndarray of float
        ``F`` (the full objective) of each part's greedy solution (0 for an empty part).
    part_wall_times : ndarray of float
        Seconds each part's greedy took where it ran (0 for an empty part).
    union_size : int
        Elements in the union of the part solutions (the ground set of the second round).
    union_value : float
        ``F`` of the second round's greedy solution on the union.
    winner : {"union", "part", "whole"}
        Which set was returned: the second round's, the best part's (``winner_part``), or, for one part, greedy
        on the whole ground set.
    winner_part : int or None
        Index of the returned part solution when ``winner == "part"``.
    objective : {"restrict", "local"}
        What the parts were asked to maximize: the exact restriction of ``F``, or (``local=True``) GreeDi's local
        objective. Only facility location (and a :class:`~submod.WeightedSum` containing one) has a local
        objective; every other class runs its exact restriction either way, so for them the worst-case guarantee
        holds even under ``"local"``.
    certified_prefixes : tuple of int
        Sizes of the prefixes of the returned set at which the certificate evaluated every gain of ``F``; empty for
        one part, where :func:`maximize`'s own certificate (minimised over the prefixes its run visited) is
        returned, and for ``k = 0``, whose certificate is exact without any gain.
    """

    n_parts: int
    part_sizes: np.ndarray
    part_values: np.ndarray
    part_wall_times: np.ndarray
    union_size: int
    union_value: float
    winner: str
    winner_part: int | None
    objective: str
    certified_prefixes: tuple[int, ...]


@dataclass(frozen=True)
class _PartOutcome:
    """What a worker sends back: the part's picks (in the part's own numbering) and its costs."""

    selected: np.ndarray
    n_evaluations: int
    wall_time: float
    violations: list[tuple[int, int, float, float]]
    negative_gains: list[tuple[int, int, float]]


def _greedy_on_part(g: SetFunction, k: int, method: str, seed: int, eps: float,
                    lazy_fallback: bool) -> _PartOutcome:
    """Greedy on one part (run by a worker: a module-level function, so that it pickles by reference).

    It runs the optimizer without :func:`maximize`'s warnings rather than inside ``warnings.catch_warnings``,
    which edits the process-wide filters and is not thread-safe: parts running on a thread pool (or Dask with
    ``processes=False``) left ``NonMonotoneWarning`` and ``StaleBoundWarning`` ignored for the rest of the
    process. The caller reports what matters once (negative gains, plain lazy on a non-submodular function)."""
    start = time.perf_counter()
    run = _Run(g, k, Cardinality(), _check_gamma(g, None, k))
    _dispatch(run, method, False, seed, eps, lazy_fallback)
    return _PartOutcome(np.asarray(run.state.selected, dtype=np.int64), run.n_eval, time.perf_counter() - start,
                        run.violations, run.negative)


def maximize_distributed(f: SetFunction, k: int, *, n_parts: int | None = None, partition: ArrayLike | None = None,
                         executor: Executor | None = None, method: str = "lazy",
                         seed: int | np.random.Generator | None = None, local: bool = False,
                         eps: float = DEFAULT_EPS, gamma_lower: float | RatioBound | None = None,
                         lazy_fallback: bool = True,
                         certificate_prefixes: int = 3, constraint: None = None) -> SelectionResult:
    r"""Partitioned greedy (GreeDi) with a random partition: greedy on each part in parallel, then on the union.

    See :mod:`submod.distributed` for the algorithm and its guarantees.

    Parameters
    ----------
    f : SetFunction
        The objective on the whole ground set. With more than one part it must implement
        :meth:`SetFunction.restrict` (every built-in objective does).
    k : int
        Cardinality budget, ``0 <= k <= n``.
    n_parts : int, optional
        Number of parts ``m``, ``1 <= m <= n``. Required unless ``partition`` is given. ``n_parts=1`` is
        :func:`maximize` itself (same set, values and certificate).
    partition : array of int, shape (n,), optional
        The part of each element (labels ``0 .. m-1``), for data that is already split or to replay a
        partition; default a random partition: each element goes to a part drawn uniformly at random,
        independently of the others (the distribution Barbosa et al. analyse; parts are balanced only on average).
    executor : concurrent.futures.Executor, optional
        Runs the parts: a ``ProcessPoolExecutor``, a ``ThreadPoolExecutor``, or Dask's
        ``distributed.Client(...).get_executor()``. Default: the parts run one after another in this process. The
        parts' objectives (``f.restrict(part)``) are pickled to the workers; the second round and the certificate
        run here. All parts are submitted at once, so while they wait the executor holds every part's objective:
        for a dense precomputed similarity, up to one more copy of the ``n x n`` matrix in blocks (build
        facility location from features, which are sent instead, when memory is tight). A part that fails raises
        its exception here, and the parts that have not started are cancelled.
    method : {"lazy", "greedy", "stochastic"}, default "lazy"
        The greedy variant of both rounds (see :func:`maximize`).
    seed : int or numpy Generator, optional
        Randomness of the partition (and of stochastic greedy's samples): the same seed gives the same result,
        whatever the executor.
    local : bool, default False
        Let the parts maximize GreeDi's *local* objective where a class has a cheaper one
        (:meth:`FacilityLocation.restrict` with ``local=True``: a part's items represent each other, a
        ``|part|^2`` block instead of ``n x |part|``). The worst-case guarantee then no longer applies; the
        certificate, on the full ``f``, still does. The second round always uses the exact objective.
    eps : float, default 0.05
        Accuracy of stochastic greedy.
    gamma_lower : float or RatioEstimate, optional
        A *proven lower* bound on the submodularity ratio of ``f``, which enables the certificate for a function
        not declared submodular, checked as in :func:`maximize` (``1`` on a function not declared submodular, and
        a ratio estimate of kind upper bound or estimate, are refused).
    lazy_fallback : bool, default True
        As in :func:`maximize`.
    certificate_prefixes : int, default 3
        Number of prefixes of the returned set at which the certificate evaluates every gain of ``f``: the final
        set, the empty set, then evenly spaced sizes in between (1: the final set only; 0: no certificate). Each
        costs one full pass of gains (``n`` evaluations, e.g. ``O(n^2)`` for a dense facility location).
    constraint : None
        Only a cardinality budget is supported; a :class:`Knapsack` or :class:`PartitionMatroid` is refused.

    Returns
    -------
    SelectionResult
        ``selected`` in the original ground set and in pick order; ``gains`` and ``values`` the gains and prefix
        values of ``f`` along it (recomputed on the full ``f``); ``n_evaluations`` summed over the parts, the
        second round and the certificate; ``wall_time`` of the whole call; ``distributed`` a
        :class:`DistributedInfo`; ``violations`` and ``negative_gains`` those the rounds saw, with elements in the
        original numbering; ``stopped_early`` when fewer than ``k`` elements are returned.

    Notes
    -----
    *Guarantees* (proven for monotone submodular ``f``, method ``"greedy"`` or ``"lazy"``, ``local=False``):
    ``F(result) >= (1 - 1/e) / min(m, k) * OPT_k`` for every partition, and
    ``E[F(result)] >= (1 - 1/e) / 2 * OPT_k`` over the random partition (Barbosa et al., ICML 2015). None is
    stated for non-submodular ``f``, stochastic greedy or the local objective: the certificate is the check.

    *Certificate*: ``OPT_k <= F(A) + (1 / gamma) * (sum of the k largest gains F(j | A))`` minimised over the
    prefixes ``A`` listed in ``distributed.certified_prefixes``, with every gain of the full ``f`` computed
    fresh (:mod:`submod.certificates`); ``gamma = 1`` for a function declared submodular, else ``gamma_lower``
    (no certificate without one). As in :func:`maximize`, none for a function declared or seen non-monotone.

    *Cost*: each part computes what greedy needs on ``|V_i|`` candidates; the second round works on at most
    ``m k`` candidates and runs in this process, as do the value of each part's solution and the certificate
    (``certificate_prefixes`` full passes of gains of ``f``).

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> X = np.random.default_rng(0).standard_normal((400, 5))
    >>> f = submod.FacilityLocation(X)
    >>> res = submod.maximize_distributed(f, 10, n_parts=4, seed=0)
    >>> res.selected.size, int(res.distributed.part_sizes.sum()), bool(res.certificate.upper_bound >= res.value)
    (10, 400, True)
    >>> central = submod.maximize(f, 10)
    >>> bool(res.value >= (1 - 1 / np.e) / 4 * central.certificate.upper_bound)   # the worst-case guarantee
    True

    The parts can run on any ``concurrent.futures`` executor (here two processes):

    >>> from concurrent.futures import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(2) as pool:
    ...     par = submod.maximize_distributed(f, 10, n_parts=4, seed=0, executor=pool)
    >>> bool(np.array_equal(par.selected, res.selected))
    True
    """
    start = time.perf_counter()
    _check_objective_and_method(f, method)
    if constraint is not None:
        raise ValueError(f"maximize_distributed supports a cardinality budget only; got a "
                         f"{type(constraint).__name__}. Use submod.maximize for knapsack and partition-matroid "
                         "constraints.")
    kk = check_k(k, f.n)
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must be in (0, 1); got {eps}.")
    gamma = _check_gamma(f, gamma_lower, kk)
    if isinstance(certificate_prefixes, bool) or not isinstance(certificate_prefixes, numbers.Integral) \
            or certificate_prefixes < 0:
        raise ValueError(f"certificate_prefixes must be a non-negative integer (0 for no certificate); got "
                         f"{certificate_prefixes!r}.")
    check_executor(executor)
    rng = rng_from_seed(seed)
    labels, m = _labels(f.n, n_parts, partition, rng)
    if m == 1:
        res = maximize(f, kk, method=method, seed=seed, eps=eps, gamma_lower=gamma_lower,
                       lazy_fallback=lazy_fallback, certificate=certificate_prefixes > 0)
        res.distributed = DistributedInfo(
            n_parts=1, part_sizes=np.array([f.n]), part_values=np.array([res.value]),
            part_wall_times=np.array([res.wall_time]), union_size=int(res.selected.size), union_value=res.value,
            winner="whole", winner_part=None, objective="restrict", certified_prefixes=())
        res.wall_time = time.perf_counter() - start
        return res

    parts = [np.flatnonzero(labels == i) for i in range(m)]
    seeds = rng.integers(0, 2**63 - 1, size=m + 1)
    tasks = [(i, p) for i, p in enumerate(parts) if p.size]

    def jobs() -> Iterator[tuple[Callable[..., _PartOutcome], tuple]]:
        for i, p in tasks:  # restricted objectives are built one at a time, as the tasks are handed out
            g = _restricted(f, p, local)
            yield _greedy_on_part, (g, min(kk, p.size), method, int(seeds[i]), eps, lazy_fallback)

    if executor is None:
        outcomes = [fn(*args) for fn, args in jobs()]
    else:
        futures = []
        try:
            for fn, args in jobs():
                futures.append(executor.submit(fn, *args))  # Dask pickles here, a process pool later
            outcomes = [fut.result() for fut in futures]
        except BaseException as err:
            # the parts that have not started would run on the caller's executor after this call has failed
            # (or was interrupted): cancel them
            for fut in futures:
                fut.cancel()
            cause = pickling_error(err) if isinstance(err, Exception) else None
            if cause is None:
                raise
            raise ValueError(f"the parts' objectives must pickle to run on {type(executor).__name__}, and this one "
                             f"does not ({type(cause).__name__}: {cause}). A from_callable(...) objective needs a "
                             "module-level function, not a lambda or a nested function, and an objective's "
                             "attributes must pickle (no locks, open files or generators); or run the parts without "
                             "an executor or on a ThreadPoolExecutor.") from err

    violations: list[tuple[int, int, float, float]] = []
    negative: list[tuple[int, int, float]] = []
    n_eval = 0
    part_values = np.zeros(m)
    part_times = np.zeros(m)
    solutions: dict[int, np.ndarray] = {}
    for (i, p), out in zip(tasks, outcomes, strict=True):
        sel = p[np.asarray(out.selected, dtype=np.int64)]
        solutions[i] = sel
        n_eval += int(out.n_evaluations)
        part_times[i] = out.wall_time
        violations += [(s, int(p[j]), a, b) for s, j, a, b in out.violations]
        negative += [(s, int(p[j]), g) for s, j, g in out.negative_gains]
        part_values[i] = f.value(sel)

    # Second round: greedy on the union of the part solutions, with the exact objective.
    union = np.unique(np.concatenate(list(solutions.values())))
    if union.size:
        second = _greedy_on_part(_restricted(f, union, False), min(kk, union.size), method, int(seeds[m]), eps,
                                 lazy_fallback)
        n_eval += second.n_evaluations
        violations += [(s, int(union[j]), a, b) for s, j, a, b in second.violations]
        negative += [(s, int(union[j]), g) for s, j, g in second.negative_gains]
        union_sel = union[np.asarray(second.selected, dtype=np.int64)]
    else:  # no part found an element with a positive gain (e.g. an all-zero objective): nothing to choose from
        union_sel = union
    union_value = f.value(union_sel)
    best_part = max(solutions, key=lambda i: (part_values[i], -i))
    if part_values[best_part] > union_value:
        winner, winner_part, selected = "part", best_part, solutions[best_part]
    else:
        winner, winner_part, selected = "union", None, union_sel

    # The returned set on the full objective: its gains and prefix values, and the certificate.
    # k = 0: OPT_0 = F(empty) exactly, certified without a pass of gains
    sizes = _certified_sizes(selected.size, int(certificate_prefixes)) if kk else []
    run = _Run(f, kk, Cardinality(), gamma if sizes else None)
    _replay(run, selected, sizes)
    n_eval += run.n_eval
    negative += run.negative
    run.negative = negative
    gains, values = np.asarray(run.gains), np.asarray(run.values)
    value = float(values[-1]) if values.size else 0.0

    if negative:
        warnings.warn(f"observed {len(negative)} negative marginal gain(s): the function is not monotone, so "
                      "greedy's guarantees and the certificate do not apply. See result.negative_gains.",
                      NonMonotoneWarning, stacklevel=2)
    plain_lazy = method == "lazy" and not lazy_fallback and not f.submodular
    if plain_lazy:
        warnings.warn("plain lazy greedy on a function not declared submodular trusts stale gains that need not be "
                      "upper bounds; the parts' and the second round's sets may be worse than exact greedy's. Use "
                      "lazy_fallback=True or method='greedy'.", StaleBoundWarning, stacklevel=2)
    where = f"minimised over the prefixes of sizes {list(sizes)} of the returned set (fresh gains of the full F)"
    if kk == 0:
        certificate = _budget_zero_certificate(value) if certificate_prefixes > 0 else None
    else:
        certificate = _certificate(run, value, gamma_lower, where) if sizes else None
    info = DistributedInfo(n_parts=m, part_sizes=np.array([p.size for p in parts]), part_values=part_values,
                           part_wall_times=part_times, union_size=int(union.size), union_value=float(union_value),
                           winner=winner, winner_part=winner_part, objective="local" if local else "restrict",
                           certified_prefixes=tuple(sizes) if certificate is not None else ())
    return SelectionResult(selected=selected, gains=gains, values=values, value=value, n_evaluations=n_eval,
                           wall_time=time.perf_counter() - start, certificate=certificate, method=method,
                           violations=violations, negative_gains=negative[:20],
                           stopped_early=bool(selected.size < kk), distributed=info,
                           certificate_evaluations=run.n_eval)


def _restricted(f: SetFunction, indices: np.ndarray, local: bool) -> SetFunction:
    """``f.restrict(indices)``, checked: greedy reads element ``t`` of the result as ``indices[t]``, so a result on
    another number of elements would choose among the wrong elements (or fail in a worker)."""
    # a user's restrict(indices) without the local keyword still serves the exact restriction
    g = f.restrict(indices, local=True) if local else f.restrict(indices)
    if not isinstance(g, SetFunction) or g.n != indices.size:
        got = f"a SetFunction on {g.n} elements" if isinstance(g, SetFunction) else type(g).__name__
        raise ValueError(f"{type(f).__name__}.restrict(indices) must return a SetFunction on len(indices) = "
                         f"{indices.size} elements (element t standing for indices[t]); got {got}.")
    return g


def _labels(n: int, n_parts: object, partition: ArrayLike | None,
            rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The part of every element and the number of parts, from ``partition`` or drawn at random."""
    m = None
    if n_parts is not None:
        if isinstance(n_parts, bool) or not isinstance(n_parts, numbers.Integral) or not (1 <= n_parts <= n):
            raise ValueError(f"n_parts must be an integer between 1 and n = {n}; got {n_parts!r}.")
        m = int(n_parts)
    if partition is None:
        if m is None:
            raise ValueError("pass n_parts (the number of parts, e.g. the number of workers) or partition (the part "
                             "of each element).")
        # One part draws nothing, so that stochastic greedy sees the seed exactly as maximize does.
        return (np.zeros(n, dtype=np.int64) if m == 1 else rng.integers(0, m, size=n)), m
    try:
        labels, ragged = np.asarray(partition), False
    except ValueError:  # e.g. a list of the parts' index lists, of different lengths
        labels, ragged = np.asarray(partition, dtype=object), True
    if ragged or labels.ndim > 1:
        raise ValueError(f"partition must be the part of each element, an integer array of shape ({n},); got shape "
                         f"{labels.shape}. From a list of the parts' index arrays, build it with labels = "
                         "np.empty(n, dtype=int); for i, part in enumerate(parts): labels[part] = i.")
    if labels.shape != (n,) or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"partition must be an integer array of shape ({n},), the part of each element; got "
                         f"{labels.dtype} of shape {labels.shape}.")
    if labels.min() < 0:
        raise ValueError(f"partition labels must be non-negative part numbers; got {int(labels.min())}.")
    top = int(labels.max()) + 1
    if m is None:
        m = top
    elif top > m:
        raise ValueError(f"partition uses part {top - 1} but n_parts = {m}; labels must be in [0, n_parts).")
    if m > n:
        raise ValueError(f"partition uses part number {m - 1} for n = {n} elements; part numbers must be below n "
                         "(each number is a part, empty or not): renumber them with "
                         "np.unique(partition, return_inverse=True)[1].")
    return labels.astype(np.int64), m


def _certified_sizes(size: int, count: int) -> list[int]:
    """Prefix sizes to certify: the final set, then the empty set, then evenly spaced ones in between."""
    if count <= 0:
        return []
    if count == 1:
        return [size]
    return sorted({int(round(x)) for x in np.linspace(0, size, min(count, size + 1))})  # at most every prefix


def _replay(run: _Run, selected: np.ndarray, sizes: list[int]) -> None:
    """Add ``selected`` to ``run`` in order, bounding ``OPT`` from fresh gains at the prefixes of ``sizes``."""
    state = run.state
    todo = set(sizes)
    for t in range(selected.size + 1):
        if t in todo:
            g = _gains(state, run.f.n)
            run.n_eval += g.size
            run.note_negative(np.arange(g.size)[~state._in_set], g[~state._in_set], _scale_tol(g, state.value))
            run.bound(g, in_set_zero=True)
        if t == selected.size:
            break
        j = int(selected[t])
        before = state.value
        run.pick(j, math.nan)
        gain = float(state.value - before)   # F(A + j) - F(A), by definition
        run.gains[-1] = gain
        if gain < -_scale_tol(np.array([before, state.value])):
            run.negative.append((t, j, gain))
