"""Greedy maximization of monotone (weakly) submodular set functions: exact, lazy and stochastic greedy."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ._validation import check_k, gains_array, rng_from_seed
from .base import GainState, SetFunction
from .certificates import _HOW_TO_PROVE, Certificate, RatioBound, _is_ratio_estimate, _sound_ratio_value
from .constraints import Cardinality, Constraint, Knapsack

if TYPE_CHECKING:
    from .distributed import DistributedInfo

__all__ = ["maximize", "SelectionResult", "METHODS", "DEFAULT_EPS"]

METHODS = ("greedy", "lazy", "stochastic")
#: Default ``eps`` of stochastic greedy: samples of ``ceil((n / k) ln(1 / eps))`` candidates per step, an
#: expected value ``>= (1 - 1/e - eps) OPT`` for monotone submodular functions (Mirzasoleiman et al. 2015).
DEFAULT_EPS = 0.05


class NonMonotoneWarning(UserWarning):
    """A negative marginal gain was observed: the function is not monotone."""


class StaleBoundWarning(UserWarning):
    """Plain lazy greedy met a fresh gain larger than its stale bound: its result may be worse than greedy."""


@dataclass
class SelectionResult:
    """Result of :func:`submod.maximize`; the same fields for every method.

    Attributes
    ----------
    selected : ndarray of int
        Chosen elements in pick order.
    gains : ndarray of float
        Marginal gain of each pick when it was made.
    values : ndarray of float
        ``F`` after each pick (the prefix value curve).
    value : float
        ``F(selected)``.
    n_evaluations : int
        Number of marginal-gain evaluations (one per candidate per evaluation), all of them: the method's own
        and those made only for the certificate (``certificate_evaluations``, included here). To compare what
        methods spend on *selecting*, use ``n_evaluations - certificate_evaluations``, or pass
        ``certificate=False``.
    wall_time : float
        Seconds spent in :func:`maximize`.
    certificate : Certificate or None
        A proven upper bound on the optimum, when one is known (see :mod:`submod.certificates`).
    method : str
        The method used.
    violations : list of tuple
        ``(step, element, stale_bound, fresh_gain)`` for every observed fresh gain larger than its stale bound
        (a violation of diminishing returns that plain lazy greedy would have trusted).
    negative_gains : list of tuple
        ``(step, element, gain)`` for observed negative gains (the function is not monotone); the first 20.
    stopped_early : bool
        True when no feasible candidate had a positive gain before the budget was used up.
    distributed : DistributedInfo or None
        How a partitioned run (:func:`submod.maximize_distributed`) split the ground set and which candidate set
        won; ``None`` for :func:`maximize`.
    certificate_evaluations : int
        The gain evaluations made only for the certificate, a part of ``n_evaluations``: stochastic greedy's full
        pass at its final set (``n``, made when a proven gamma is known), and
        :func:`submod.maximize_distributed`'s full passes at the certified prefixes. 0 for greedy and lazy
        greedy, whose certificate reuses the gains they evaluate anyway, and 0 with ``certificate=False``
        (``certificate_prefixes=0`` for :func:`submod.maximize_distributed`).
    constraint : Knapsack, PartitionMatroid or None
        The extra constraint the run was made under (``None``: the cardinality budget only). The certificate
        bounds the optimum of that problem; :func:`verification.certify`, which bounds ``OPT_k`` under a
        cardinality budget, refuses a constrained run.
    """

    selected: np.ndarray
    gains: np.ndarray
    values: np.ndarray
    value: float
    n_evaluations: int
    wall_time: float
    certificate: Certificate | None
    method: str
    violations: list[tuple[int, int, float, float]] = field(default_factory=list)
    negative_gains: list[tuple[int, int, float]] = field(default_factory=list)
    stopped_early: bool = False
    distributed: DistributedInfo | None = None
    certificate_evaluations: int = 0
    constraint: Constraint | None = None

    def __repr__(self) -> str:
        cert = "none" if self.certificate is None else f"OPT <= {self.certificate.upper_bound:.6g}"
        parts = "" if self.distributed is None else \
            f"n_parts={self.distributed.n_parts}, winner={self.distributed.winner!r}, "
        return (f"SelectionResult(method={self.method!r}, {parts}k={self.selected.size}, value={self.value:.6g}, "
                f"certificate: {cert}, n_evaluations={self.n_evaluations}, wall_time={self.wall_time:.3g}s, "
                f"violations={len(self.violations)}, negative_gains={len(self.negative_gains)})")


class _Run:
    """Book-keeping shared by the three methods: picks, certificate bounds, diagnostics."""

    def __init__(self, f: SetFunction, k: int, constraint: Constraint, gamma: float | None) -> None:
        self.f = f
        self.k = k
        self.constraint = constraint
        self.state: GainState = _checked_state(f)
        self.tracker = constraint._tracker(f.n)
        self.gamma = gamma
        self.gains: list[float] = []
        self.values: list[float] = []
        self.n_eval = 0
        self.cert_eval = 0  # the part of n_eval spent only on the certificate
        self.violations: list[tuple[int, int, float, float]] = []
        self.negative: list[tuple[int, int, float]] = []
        self.best_bound = math.inf
        self.best_prefix = 0
        self.singletons: np.ndarray | None = None

    @property
    def step(self) -> int:
        return len(self.gains)

    def feasible(self) -> np.ndarray:
        return self.tracker.allowed & ~self.state._in_set

    def note_negative(self, cand: np.ndarray, g: np.ndarray, tol: float) -> None:
        if g.size == 0 or g.min() >= -tol:  # the common case, in one pass
            return
        bad = np.flatnonzero(g < -tol)
        for i in bad[: max(0, 20 - len(self.negative))]:
            self.negative.append((self.step, int(cand[i]), float(g[i])))

    def bound(self, gains_all: np.ndarray, slack: float = 0.0, in_set_zero: bool = False) -> None:
        """Record the certificate at the current prefix from (upper bounds on) the gains of all elements.

        ``in_set_zero``: the gains of the elements of ``A`` are already 0 (fresh :meth:`GainState.gains`)."""
        if self.gamma is None:
            return
        # OPT is any feasible set of the original problem: every element outside A may be in it.
        g = gains_all if in_set_zero else np.where(self.state._in_set, 0.0, gains_all)
        b = self.state.value + (self.constraint._max_total_gain(g, self.k) + self.k * slack) / self.gamma
        if b < self.best_bound:
            self.best_bound, self.best_prefix = b, self.step

    def pick(self, j: int, gain: float) -> None:
        self.state.add(j)
        self.tracker.add(j)
        self.gains.append(float(gain))
        self.values.append(float(self.state.value))


def _check_gamma(f: SetFunction, gamma_lower: object, k: int) -> float | None:
    """The proven lower bound on the submodularity ratio that a certificate may use (``None``: no certificate).

    ``gamma_lower`` is ``None`` (``gamma = 1`` for a function declared submodular), a number, or a ratio estimate
    that says what it is (an object with ``value`` and ``kind``, such as ``verification.RatioEstimate``; duck-typed
    since ``submod`` does not import ``verification``). The rules are :func:`verification.certify`'s: only the
    kinds in :data:`SOUND_RATIO_KINDS`, computed for ``|S| >= k`` over the whole ground set, and never the number
    ``1`` for a function not declared submodular (the submodular online bound, which can fall below OPT)."""
    if gamma_lower is None:
        return 1.0 if f.submodular else None
    if _is_ratio_estimate(gamma_lower):
        return _sound_ratio_value(gamma_lower, k, outside_U=(
            "gamma_lower was computed for sets L inside a given U, but this run's certificate uses its own prefixes, "
            "which need not lie in U. Compute it over the whole ground set (U=None), or certify the result "
            "afterwards with verification.certify(f, result, estimate)."))
    if isinstance(gamma_lower, bool) or not isinstance(gamma_lower, numbers.Real):
        raise ValueError(f"gamma_lower must be None, a number or a ratio estimate such as verification."
                         f"submodularity_ratio(f, k, method='spectral'); got {type(gamma_lower).__name__}.")
    g = float(gamma_lower)
    if not (0.0 < g <= 1.0):
        raise ValueError(f"gamma_lower must be in (0, 1]; got {gamma_lower}. Pass a proven lower bound on gamma.")
    if g == 1.0 and not f.submodular:
        raise ValueError(f"gamma_lower = 1 on {type(f).__name__}, which is not declared submodular: that is the "
                         "submodular online bound, invalid for non-submodular functions (it can fall below the "
                         "optimum). If F is proven submodular, set its submodular attribute to True; otherwise "
                         + _HOW_TO_PROVE[0].lower() + _HOW_TO_PROVE[1:])
    return g


def maximize(f: SetFunction, k: int | None, method: str = "greedy", constraint: Constraint | None = None,
             seed: int | np.random.Generator | None = None, *, eps: float = DEFAULT_EPS,
             gamma_lower: float | RatioBound | None = None, lazy_fallback: bool = True,
             certificate: bool = True) -> SelectionResult:
    r"""Maximize a monotone set function under a cardinality (and optional extra) constraint.

    Parameters
    ----------
    f : SetFunction
        The objective (normalised, monotone).
    k : int or None
        Cardinality budget, ``0 <= k <= n``. ``None`` means no cardinality limit (only with ``constraint``).
    method : {"greedy", "lazy", "stochastic"}, default "greedy"
        ``"greedy"`` evaluates every feasible gain at every step (vectorised). ``"lazy"`` keeps stale gains in a
        priority queue (Minoux 1978); it is exact for submodular ``f``. For a function *not declared
        submodular*, stale gains are not upper bounds; with ``lazy_fallback=True`` (default) lazy then evaluates
        every gain at each step, returns exactly greedy's set and lists every stale-bound violation it saw;
        with ``lazy_fallback=False`` it runs plain lazy greedy, which can return a worse set, and always warns:
        it only detects the violations of candidates it re-evaluates, so an empty ``violations`` list does not
        show that its set equals greedy's. For objectives that keep every gain current (:class:`Coverage`,
        :class:`Modular`) reading all gains is cheaper than lazy's bookkeeping, so ``"lazy"`` runs the exact scan
        (same set, ``n_evaluations`` counts every gain read). ``"stochastic"`` evaluates a random sample of
        ``ceil((n / k) ln(1 / eps))`` feasible candidates per step (Mirzasoleiman et al. 2015).
    constraint : Knapsack or PartitionMatroid, optional
        Extra constraint. With :class:`Knapsack`, greedy and lazy use the cost-benefit rule with the
        best-singleton fix; stochastic greedy does not support it.
    seed : int or numpy Generator, optional
        Randomness of stochastic greedy.
    eps : float, default 0.05
        Accuracy of stochastic greedy, in ``(0, 1)``.
    gamma_lower : float or RatioEstimate, optional
        A *proven lower* bound on the submodularity ratio, which enables the certificate for a function not
        declared submodular. A number is trusted as such (the caller's responsibility), except ``1`` for a
        function not declared submodular, which is refused: that is the submodular online bound, and on a
        non-submodular function it can give a "bound" below the optimum. A ``verification.RatioEstimate`` (any
        object with ``value`` and ``kind``) is accepted when its kind is ``"exact"`` or ``"lower bound"``, it was
        computed for ``|S| >= k`` and over the whole ground set (``U=None``); an upper bound or an estimate is
        refused.
    lazy_fallback : bool, default True
        See ``method``.
    certificate : bool, default True
        Compute the certificate (``result.certificate``) when a proven gamma is known, or when only the empty set
        is feasible (exact, see Notes). ``False`` skips it:
        ``result.certificate`` is None and stochastic greedy saves its extra full pass of ``n`` gains (greedy
        and lazy greedy get their certificate from gains they evaluate anyway, so they cost the same).

    Returns
    -------
    SelectionResult

    Notes
    -----
    Greedy stops early when no feasible candidate has a positive gain. Ties are broken by the lowest index.
    The certificate is the minimum over prefixes ``A`` of ``F(A) + (1/gamma) * (best feasible total of gains at
    A)`` (see :mod:`submod.certificates`); lazy greedy uses its stale bounds (valid upper bounds for submodular
    functions) and stochastic greedy certifies its final set only. There is no certificate (``None``) for a
    function declared ``monotone=False`` or seen to have a negative gain, nor for plain lazy greedy
    (``lazy_fallback=False``) on a function not declared submodular, whose stale gains bound nothing;
    :func:`verification.certify` certifies any returned set from fresh gains. When only the empty set is feasible
    (``k = 0``, a :class:`Knapsack` whose every cost exceeds the budget, or a :class:`PartitionMatroid` whose every
    element's group has budget 0) nothing is evaluated and, for every objective and method, the certificate is
    exact: ``upper_bound = value = F(empty) = 0`` and its ``kind`` starts with ``"exact"``.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> X = np.random.default_rng(0).standard_normal((200, 5))
    >>> f = submod.FacilityLocation(X)
    >>> res = submod.maximize(f, 10, method="lazy")
    >>> res.selected.size, bool(res.certificate.upper_bound >= res.value)
    (10, True)
    >>> bool(np.array_equal(res.selected, submod.maximize(f, 10).selected))
    True
    """
    start = time.perf_counter()
    _check_objective_and_method(f, method)
    if constraint is not None and not isinstance(constraint, Constraint):
        raise ValueError(f"constraint must be a submod.Knapsack or submod.PartitionMatroid; got "
                         f"{type(constraint).__name__}. For a plain cardinality budget pass k.")
    if k is None and constraint is None:
        raise ValueError("k is required without a constraint; pass the number of elements to select.")
    kk = check_k(k, f.n, allow_none=True)
    budget = f.n if kk is None else kk
    cons = constraint if constraint is not None else Cardinality()
    cons._check(f.n)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in (0, 1); got {eps!r}.")
    gamma = _check_gamma(f, gamma_lower, budget)
    if not isinstance(certificate, (bool, np.bool_)):
        raise ValueError(f"certificate must be True or False; got {certificate!r}.")
    if not certificate:
        gamma = None  # no prefix is bounded, so no certificate and no pass made only for it
    knapsack = isinstance(cons, Knapsack)
    if method == "stochastic" and knapsack:
        raise ValueError("stochastic greedy supports cardinality and partition-matroid constraints; use "
                         "method='greedy' or 'lazy' with a Knapsack.")
    run = _Run(f, budget, cons, gamma)
    # Only the empty set is feasible when k = 0 or no element fits the constraint on its own (a knapsack whose
    # every cost exceeds the budget, a partition matroid whose every group has budget 0; both constraints are
    # downward closed, so no larger set fits either): nothing to evaluate, and the certificate is exact.
    empty_only = _empty_set_only(run, budget, constraint)
    if not empty_only:
        _dispatch(run, method, knapsack, seed, eps, lazy_fallback)
    if not empty_only and method == "lazy" and not lazy_fallback and not f.submodular:
        # Plain lazy greedy only sees the violations of the candidates it re-evaluates: absence proves nothing.
        warnings.warn(f"plain lazy greedy on a function not declared submodular trusts stale gains that need not "
                      f"be upper bounds; it detected {len(run.violations)} stale-bound violation(s), and its set may "
                      "be worse than exact greedy's even when it detected none. Use lazy_fallback=True or "
                      "method='greedy' for greedy's result.", StaleBoundWarning, stacklevel=2)
    if run.negative:
        warnings.warn(f"observed {len(run.negative)} negative marginal gain(s): the function is not monotone, "
                      "so greedy's guarantees and the certificate do not apply. See result.negative_gains.",
                      NonMonotoneWarning, stacklevel=2)

    selected = np.asarray(run.state.selected, dtype=np.int64)
    gains = np.asarray(run.gains)
    values = np.asarray(run.values)
    value = float(values[-1]) if values.size else 0.0
    stopped_early = bool(selected.size < budget and run.feasible().any())
    if knapsack and not empty_only:
        selected, gains, values, value = _best_singleton_fix(run, selected, gains, values, value)
    # A certificate needs gains that bound the true ones: plain lazy greedy on a function not declared submodular
    # only has stale gains, which need not be upper bounds.
    plain_lazy = method == "lazy" and not lazy_fallback and not f.submodular
    if empty_only:
        cert = _budget_zero_certificate(value, empty_only) if certificate else None
    else:
        cert = None if plain_lazy else _certificate(run, value, gamma_lower, "minimised over prefixes")
    return SelectionResult(selected=selected, gains=gains, values=values, value=value,
                           n_evaluations=run.n_eval, wall_time=time.perf_counter() - start,
                           certificate=cert, method=method, violations=run.violations,
                           negative_gains=run.negative, stopped_early=stopped_early,
                           certificate_evaluations=run.cert_eval, constraint=constraint)


def _dispatch(run: _Run, method: str, knapsack: bool, seed: int | np.random.Generator | None, eps: float,
              lazy_fallback: bool) -> None:
    """Run ``method`` on ``run`` (checked arguments); it warns about nothing, the callers do.

    :func:`submod.maximize_distributed` runs its parts through this rather than :func:`maximize` so that no worker
    thread touches the process-wide warning filters (``warnings.catch_warnings`` is not thread-safe)."""
    f = run.f
    if method == "stochastic":
        _stochastic(run, eps, rng_from_seed(seed))
    elif method == "lazy" and (f.submodular or not lazy_fallback) and not run.state._kept_gains:
        _lazy(run, knapsack)
    else:
        # Lazy greedy's fallback on a function not declared submodular lists the stale-bound violations it sees.
        _greedy(run, knapsack, track_violations=(method == "lazy" and not f.submodular))


def _check_objective_and_method(f: object, method: object) -> None:
    """The checks every optimizer entry point makes first: ``f`` is a :class:`SetFunction` (initialised: a subclass
    whose ``__init__`` skips ``super().__init__(n)`` has no ground-set size), ``method`` is known."""
    if not isinstance(f, SetFunction):
        raise ValueError(f"f must be a submod.SetFunction; got {type(f).__name__}. Wrap a value oracle with "
                         "submod.from_callable(value, n).")
    if not isinstance(getattr(f, "n", None), numbers.Integral):
        raise ValueError(f"{type(f).__name__} has no ground-set size n: its __init__ must call "
                         "super().__init__(n) (SetFunction.__init__ sets n).")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


def _checked_state(f: SetFunction) -> GainState:
    """``f.init_state()``, refused with the contract when it is not an initialised :class:`GainState` (a user state
    whose ``__init__`` skips ``super().__init__(n)`` lacks the set's bookkeeping)."""
    state = f.init_state()
    if not isinstance(state, GainState):
        raise ValueError(f"{type(f).__name__}.init_state() must return a submod.GainState; got "
                         f"{type(state).__name__}.")
    if not hasattr(state, "_in_set") or getattr(state, "n", None) != f.n:
        raise ValueError(f"{type(state).__name__} (from {type(f).__name__}.init_state()) is not initialised for "
                         f"{f.n} elements: its __init__ must call super().__init__(n) (GainState.__init__ sets n, "
                         "the current set and its value).")
    return state


def _certificate(run: _Run, value: float, gamma_lower: float | None, where: str) -> Certificate | None:
    """The certificate of a run whose :meth:`_Run.bound` calls saw fresh gains (or valid upper bounds on them).

    ``None`` without a proven gamma, for a function not declared monotone, after an observed negative gain, or
    when no prefix was bounded."""
    f = run.f
    if run.gamma is None or not f.monotone or run.negative or not math.isfinite(run.best_bound):
        return None
    what = "submodular online bound (Leskovec et al. 2007)" if gamma_lower is None else \
        f"online bound with proven gamma >= {run.gamma:g} (Das & Kempe 2011)"
    return Certificate(upper_bound=float(max(run.best_bound, value)), value=value, gamma_lower=run.gamma,
                       prefix_size=run.best_prefix, kind=f"proven upper bound on OPT: {what}, {where}")


def _empty_set_only(run: _Run, budget: int, constraint: Constraint | None) -> str:
    """Why the empty set is the only feasible set of this run (``""`` when another set is feasible).

    A budget of 0 admits no element; otherwise a constraint that admits no single element admits no larger set
    either (knapsack and partition-matroid feasibility are downward closed)."""
    if budget == 0:
        return "OPT_0 = F(empty set), the only set a budget of k = 0 allows"
    if run.tracker.allowed.any():
        return ""
    if isinstance(constraint, Knapsack):
        return (f"OPT = F(empty set), the only set the Knapsack allows (every cost exceeds the budget "
                f"{constraint.budget:g})")
    return (f"OPT = F(empty set), the only set the {type(constraint).__name__} allows (every element's group has "
            "budget 0)")


def _budget_zero_certificate(value: float, why: str = "OPT_0 = F(empty set), the only set a budget of k = 0 "
                                                     "allows") -> Certificate:
    """The certificate of a run whose only feasible set is the empty one (``why`` says why): ``OPT = F(empty)``,
    exactly.

    A budget ``k = 0``, or a constraint that admits no element, leaves only the empty set, so the optimum is known
    without any gain, submodularity ratio or monotonicity; ``value`` is the value of that set (0 for a normalised
    ``F``). ``gamma_lower`` is 1: the bound divides no gain by a ratio, and ``gamma_{U,0}`` is 1 by ``0/0 := 1``."""
    return Certificate(upper_bound=float(value), value=float(value), gamma_lower=1.0, prefix_size=0,
                       kind=f"exact: {why} (no gain, submodularity ratio or monotonicity used)")


def _gains(state: GainState, n: int, cand: np.ndarray | None = None) -> np.ndarray:
    """``state.gains(cand)``: finite float64 gains, one per candidate (``n`` of them when ``cand`` is None)."""
    return _finite(gains_array(state.gains(cand), n if cand is None else len(cand), cand), cand)


def _finite(g: np.ndarray, cand: np.ndarray | None = None) -> np.ndarray:
    """``g`` itself, or a clear error when an objective's gains hold NaN or infinity (``argmax`` would pick them)."""
    g = np.asarray(g, dtype=np.float64)
    if not np.isfinite(g).all():
        i = int(np.flatnonzero(~np.isfinite(g))[0])
        j = i if cand is None else int(cand[i])
        raise ValueError(f"the objective returned a non-finite gain ({g[i]}) for element {j}; gains must be finite "
                         "numbers. Check the function's GainState.gains (or value oracle) for 0/0, log(0) or overflow.")
    return g


def _scale_tol(g: np.ndarray, value: float = 0.0) -> float:
    """Rounding tolerance of the gains ``g`` at a set of value ``value``: relative to the larger of the two, with no
    absolute floor, so that multiplying ``F`` by any positive constant changes nothing (a floor of 1 hid the negative
    gains of a function whose values are far below 1, and left a certificate on it)."""
    return 1e-12 * max(abs(value), float(np.abs(g).max(initial=0.0)))


def _all_gains(g: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """``g`` (the gains of all ``n`` elements) as float64 with its minimum and maximum (0 included); a clear error
    for a wrong shape or non-finite gains.

    One pass each for the minimum and the maximum serves the finiteness check (NaN and infinities reach them),
    the tolerance scale and the negative-gain check of greedy's step."""
    g = gains_array(g, n, None)
    lo, hi = float(g.min(initial=0.0)), float(g.max(initial=0.0))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _finite(g)
    return g, lo, hi


def _greedy(run: _Run, knapsack: bool, track_violations: bool) -> None:
    """Exact greedy; with ``track_violations``, also list where gains grew (lazy's fallback mode)."""
    state = run.state
    n = run.f.n
    costs = run.constraint.costs if knapsack else None
    incremental = hasattr(state, "_incremental_init")
    g, lo, hi = _all_gains(state._incremental_init() if incremental else state.gains(), n)
    run.n_eval += n
    run.singletons = g.copy()
    # Incremental gains carry rounding error: candidates within ``slack`` of the best are re-evaluated exactly,
    # and the certificate adds the slack to every gain. Relative to the initial gains (the sums the increments come
    # from), with no absolute floor: a floor of 1 made the slack as large as the gains of an objective in small units,
    # re-evaluating nearly every candidate at each step and leaving a vacuous certificate.
    slack = 1e-9 * max(hi, -lo) if incremental else 0.0
    prev = g.copy() if track_violations else None
    while True:
        feas = run.feasible()
        tol = _scale_tol(np.array([lo, hi]), state.value) + slack
        if lo < -tol:  # some gain is negative: list the feasible ones
            run.note_negative(np.flatnonzero(feas), g[feas], tol)
        run.bound(g, slack, in_set_zero=not incremental)
        if run.step >= run.k:
            break
        score = np.where(feas, g / costs if knapsack else g, -np.inf)
        j = int(np.argmax(score))
        best = float(score[j])
        if best == -np.inf:  # no feasible candidate left (feasible scores are finite)
            break
        if incremental or knapsack:
            near = np.flatnonzero(score >= best - slack / (costs.min() if knapsack else 1.0))
            fresh = _gains(state, n, near)
            run.n_eval += near.size
            i = int(np.argmax(fresh / costs[near] if knapsack else fresh))
            j, gj = int(near[i]), float(fresh[i])
        else:
            gj = float(g[j])
        if gj <= 0.0:
            break
        run.pick(j, gj)
        g, lo, hi = _all_gains(state._incremental_update() if incremental else state.gains(), n)
        run.n_eval += n
        if track_violations:
            feas = run.feasible()
            for c in np.flatnonzero(feas & (g > prev + _scale_tol(prev, state.value))):
                run.violations.append((run.step, int(c), float(prev[c]), float(g[c])))
            prev = np.where(feas, g, prev)


def _lazy(run: _Run, knapsack: bool) -> None:
    """Lazy greedy (Minoux 1978): stale gains (gain/cost ratios for a knapsack) as upper bounds.

    Each step re-evaluates the candidate with the largest bound, then, by decreasing bound and in vectorised
    chunks, every stale candidate whose bound still reaches the best fresh score (the ones the textbook
    priority-queue version would re-evaluate one by one). The best fresh candidate then beats every stale bound;
    ties go to the lowest index, so the result equals exact greedy's whenever stale gains are upper bounds
    (submodular functions).
    """
    state = run.state
    n = run.f.n
    costs = run.constraint.costs if knapsack else None
    if hasattr(state, "_upper_bounds"):
        ub = state._upper_bounds()
        evaluated = np.zeros(n, dtype=bool)          # bounds only: nothing evaluated yet
    else:
        ub = _gains(state, n)
        run.n_eval += n
        evaluated = np.ones(n, dtype=bool)
        feas = run.feasible()
        run.note_negative(np.flatnonzero(feas), ub[feas], _scale_tol(ub))
        run.singletons = ub.copy()                   # exact singleton values
    run.bound(ub)
    # ``stale[j]``: bound on the score of a feasible candidate not evaluated at this step, -inf otherwise.
    stale = np.where(run.feasible(), ub / costs if knapsack else ub, -np.inf)
    while run.step < run.k:
        j0 = int(np.argmax(stale))
        if stale[j0] == -np.inf:
            break
        fresh = [j0]
        best_j, best = j0, _evaluate_lazy(run, np.array([j0]), ub, evaluated, stale, costs)[0]
        while True:
            todo = np.flatnonzero(stale >= best)
            if todo.size == 0:
                break
            # Decreasing bound, lowest index first on ties (a stable sort of increasing indices).
            todo = todo[np.argsort(-stale[todo], kind="stable")]
            # Chunks grow with the backlog: after the first pick nearly every bound is stale and loose.
            size = max(64, todo.size // 8)
            while todo.size:
                chunk = np.sort(todo[:size])
                scores = _evaluate_lazy(run, chunk, ub, evaluated, stale, costs)
                fresh.extend(chunk.tolist())
                i = int(np.argmax(scores))
                if scores[i] > best or (scores[i] == best and chunk[i] < best_j):
                    best_j, best = int(chunk[i]), float(scores[i])
                todo = todo[size:]
                todo = todo[stale[todo] >= best]
        # Lowest index among the fresh candidates that reach the best score.
        fr = np.array(fresh)
        fr_scores = ub[fr] / costs[fr] if knapsack else ub[fr]
        best_j = int(fr[fr_scores == best].min())
        if ub[best_j] <= 0.0:
            break
        run.pick(best_j, float(ub[best_j]))
        run.bound(ub)
        # Fresh values become the next step's stale bounds; infeasible candidates leave the race.
        stale[fr] = fr_scores
        stale[~run.feasible()] = -np.inf
    # Certify the final set: stale gains are valid upper bounds for submodular F, for every element outside A.
    run.bound(ub)


def _evaluate_lazy(run: _Run, top: np.ndarray, ub: np.ndarray, evaluated: np.ndarray, stale: np.ndarray,
                   costs: np.ndarray | None) -> np.ndarray:
    """Fresh gains of ``top``: record violations and negative gains, refresh the bounds, return the scores."""
    g = _gains(run.state, run.f.n, top)
    run.n_eval += top.size
    tol = _scale_tol(ub[top], run.state.value)
    grew = (g > ub[top] + tol) & evaluated[top]
    if grew.any():
        for i in np.flatnonzero(grew):
            run.violations.append((run.step, int(top[i]), float(ub[top[i]]), float(g[i])))
    run.note_negative(top, g, tol)
    ub[top] = g
    evaluated[top] = True
    stale[top] = -np.inf
    return g / costs[top] if costs is not None else g


def _stochastic(run: _Run, eps: float, rng: np.random.Generator) -> None:
    """Stochastic greedy (Mirzasoleiman et al. 2015): the best of a random sample of candidates per step."""
    state = run.state
    n = run.f.n
    # The number of picks the run can make: k, or the rank of a partition matroid if smaller.
    picks = min(run.k, run.constraint._max_picks(n))
    s = max(1, math.ceil(n / max(picks, 1) * math.log(1.0 / eps)))
    while run.step < run.k:
        feas = np.flatnonzero(run.feasible())
        if feas.size == 0:
            break
        cand = np.sort(rng.choice(feas, size=min(s, feas.size), replace=False))
        g = _gains(state, n, cand)
        run.n_eval += cand.size
        run.note_negative(cand, g, _scale_tol(g, state.value))
        i = int(np.argmax(g))
        if g[i] <= 0.0:
            # The sample saw no positive gain: look at every feasible candidate before stopping.
            cand = feas
            g = _gains(state, n, cand)
            run.n_eval += cand.size
            run.note_negative(cand, g, _scale_tol(g, state.value))
            i = int(np.argmax(g))
            if g[i] <= 0.0:
                break
        run.pick(int(cand[i]), float(g[i]))
    if run.gamma is not None:
        g_all = _gains(state, n)
        run.n_eval += n
        run.cert_eval += n
        feas = run.feasible()
        # a certificate needs monotone F
        run.note_negative(np.flatnonzero(feas), g_all[feas], _scale_tol(g_all, state.value))
        run.bound(g_all)


def _best_singleton_fix(run: _Run, selected: np.ndarray, gains: np.ndarray, values: np.ndarray,
                        value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Return the better of the cost-benefit greedy set and the best affordable singleton."""
    c = run.constraint
    singletons = run.singletons if run.singletons is not None else _gains(run.f.init_state(), run.f.n)
    single = np.where(c.costs <= c.budget, singletons, -np.inf)
    j = int(np.argmax(single))
    if not np.isfinite(single[j]):
        return selected, gains, values, value
    # Exact value of the candidate singleton; the greedy set wins ties (singleton values from an incremental or
    # differently ordered sum can exceed an equal set value in the last bit).
    v = float(run.f.value([j]))
    if v > value + 1e-12 * abs(value):  # relative only: the fix must not depend on the units of F
        return np.array([j]), np.array([v]), np.array([v]), v
    return selected, gains, values, value
