"""Hypothesis strategies that build random instances of :mod:`submod` objectives for property-based tests.

Every argument accepts a fixed value or a hypothesis strategy. Numeric arrays come from a numpy generator
seeded by a drawn integer (fast, reproducible, and hypothesis still shrinks the structural choices: sizes,
correlation, suppressor pairs, groups, rank deficiency).

Use them in your own tests, for example to check that greedy meets its guarantee on your objective:

.. code-block:: python

    from hypothesis import given, settings
    import submod, verification as vf
    from verification import strategies as vst

    @settings(max_examples=25, deadline=None)
    @given(f=vst.set_functions(n=vst.st.integers(2, 8)))
    def test_greedy_meets_its_guarantee(f):
        chk = vf.check_guarantee(f, k=min(3, f.n), methods=("greedy",))
        assert chk.all_hold

    @settings(max_examples=25, deadline=None)
    @given(data=vst.regression_data(n_units=6, suppressor=True, correlation=0.8))
    def test_my_solver_on_correlated_least_squares(data):
        f = submod.SparseRegression(data.A, data.Y, groups=data.groups)
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

import submod
from submod.sparse_regression import SparseRegression

__all__ = ["st", "RegressionData", "modular", "coverage", "facility_location", "feature_based", "regression_data",
           "sparse_regression", "set_functions", "suppressor_data", "lazy_trap_data"]

_SEEDS = st.integers(0, 2**32 - 1)
# Default strategies (immutable, shared).
_SIZES = st.integers(1, 8)
_CONCEPTS = st.integers(1, 12)
_DENSITY = st.floats(0.05, 0.6)
_DIMS = st.integers(1, 4)
_FEATURES = st.integers(1, 5)
_CONCAVE = st.sampled_from(["sqrt", "log1p", "inverse"])
_UNITS = st.integers(2, 8)
_TARGETS = st.integers(1, 3)
_CORRELATION = st.floats(0.0, 0.95)
_BOOLS = st.booleans()
_ONE = st.just(1)
_NOISE = st.sampled_from([0.0, 0.1, 1.0])
_RIDGE = st.sampled_from([0.0, 0.0, 0.1])
_DEFICIENCIES = ("none", "duplicate", "dead", "combination")
_DEFICIENCY = st.sampled_from(["none", "none", "duplicate", "dead", "combination"])


def _draw(draw: Any, x: Any) -> Any:
    return draw(x) if isinstance(x, SearchStrategy) else x


def _int_arg(where: str, name: str, value: Any, low: int, meaning: str) -> int:
    """``value`` (fixed or drawn) as an int ``>= low``, or InvalidArgument naming the argument and its meaning."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgument(f"{where}: {name} must be an integer >= {low} ({meaning}), or a strategy of such "
                              f"integers; got {value!r}.")
    return int(value)


def _float_arg(where: str, name: str, value: Any, low: float, high: float, high_open: bool, meaning: str
               ) -> float:
    """``value`` (fixed or drawn) as a float in ``[low, high]`` (``[low, high)`` when ``high_open``)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and low <= value and (value < high if high_open else value <= high))
    if not ok:
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidArgument(f"{where}: {name} must be a number in {interval} ({meaning}), or a strategy of such "
                              f"numbers; got {value!r}.")
    return float(value)


@st.composite
def modular(draw: Any, n: int | SearchStrategy[int] = _SIZES) -> submod.Modular:
    """A :class:`submod.Modular` with non-negative weights (some exactly zero).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from verification import strategies as vst
    >>> @settings(max_examples=5, deadline=None)
    ... @given(vst.modular(n=4))
    ... def check(f):
    ...     assert f.n == 4 and f.submodular
    >>> check()
    """
    size = _int_arg("modular", "n", _draw(draw, n), 1, "the ground-set size")
    rng = np.random.default_rng(draw(_SEEDS))
    w = rng.exponential(size=size) * (rng.random(size) > 0.2)
    return submod.Modular(w)


@st.composite
def coverage(draw: Any, n: int | SearchStrategy[int] = _SIZES,
             n_concepts: int | SearchStrategy[int] = _CONCEPTS,
             density: float | SearchStrategy[float] = _DENSITY) -> submod.Coverage:
    """A weighted :class:`submod.Coverage` with a random incidence matrix."""
    size = _int_arg("coverage", "n", _draw(draw, n), 1, "the ground-set size")
    p = _int_arg("coverage", "n_concepts", _draw(draw, n_concepts), 1, "the number of concepts")
    rho = _float_arg("coverage", "density", _draw(draw, density), 0.0, 1.0, False,
                     "the probability that an item covers a concept")
    rng = np.random.default_rng(draw(_SEEDS))
    inc = rng.random((size, p)) < rho
    return submod.Coverage(inc.astype(float), weights=rng.exponential(size=p))


@st.composite
def facility_location(draw: Any, n: int | SearchStrategy[int] = _SIZES,
                      dim: int | SearchStrategy[int] = _DIMS) -> submod.FacilityLocation:
    """A :class:`submod.FacilityLocation` on random points (``K = max(D) - D`` with squared distances)."""
    size = _int_arg("facility_location", "n", _draw(draw, n), 1, "the ground-set size")
    p = _int_arg("facility_location", "dim", _draw(draw, dim), 1, "the dimension of the points")
    rng = np.random.default_rng(draw(_SEEDS))
    return submod.FacilityLocation(rng.standard_normal((size, p)))


@st.composite
def feature_based(draw: Any, n: int | SearchStrategy[int] = _SIZES,
                  n_features: int | SearchStrategy[int] = _FEATURES,
                  concave: str | SearchStrategy[str] = _CONCAVE
                  ) -> submod.FeatureBased:
    """A :class:`submod.FeatureBased` with sparse non-negative features."""
    size = _int_arg("feature_based", "n", _draw(draw, n), 1, "the ground-set size")
    p = _int_arg("feature_based", "n_features", _draw(draw, n_features), 1, "the number of features")
    phi = _draw(draw, concave)
    rng = np.random.default_rng(draw(_SEEDS))
    X = rng.exponential(size=(size, p)) * (rng.random((size, p)) < 0.6)
    return submod.FeatureBased(X, concave=phi)


@dataclass(frozen=True)
class RegressionData:
    """Arrays of a least-squares instance.

    Attributes
    ----------
    A : ndarray (n_samples, n_columns)
        Inputs.
    Y : ndarray (n_samples, n_targets)
        Targets.
    groups : list of int arrays or None
        Columns of each unit (``None``: one column per unit).
    n_units : int
    suppressor : tuple of int or None
        ``(relevant, suppressor)`` units when a suppressor pair was planted.
    """

    A: np.ndarray
    Y: np.ndarray
    groups: list[np.ndarray] | None
    n_units: int
    suppressor: tuple[int, int] | None


def _orthonormal_pair(rng: np.random.Generator, others: np.ndarray, n_samples: int) -> tuple[np.ndarray, ...]:
    """Two sample vectors of norm ``sqrt(n_samples)`` orthogonal to each other and (when possible) to ``others``.

    Exact sample orthogonality keeps the planted suppressor pair a suppressor at any sample size: with
    ``u, v`` orthonormal and orthogonal to the other units, unit 1 alone explains ``0.05^2 / 1.0025`` (0.25%) of
    the ``u`` part of the target, unit 0 alone half of it, and both together all of it.
    """
    if n_samples < 2:
        raise ValueError(f"a suppressor pair needs n_samples >= 2 (two orthogonal columns); got {n_samples}.")
    basis = others[:, np.linalg.norm(others, axis=0) > 0]
    Q = np.linalg.qr(basis)[0] if basis.shape[1] else np.zeros((n_samples, 0))
    out = []
    for _ in range(2):
        x = rng.standard_normal(n_samples)
        for _ in range(2):  # twice, for orthogonality to round-off
            x = x - Q @ (Q.T @ x)
            for y in out:
                x = x - (y @ x) * y  # y has unit norm here
        out.append(x / np.linalg.norm(x))
    return tuple(np.sqrt(n_samples) * x for x in out)


def _regression_arrays(rng: np.random.Generator, n_units: int, n_samples: int, n_targets: int, correlation: float,
                       suppressor: bool, group_size: int, rank_deficient: str, noise: float) -> RegressionData:
    cols = n_units * group_size
    common = rng.standard_normal((n_samples, 1))
    A = np.sqrt(correlation) * common + np.sqrt(1.0 - correlation) * rng.standard_normal((n_samples, cols))
    W = rng.standard_normal((cols, n_targets)) * (rng.random((cols, 1)) < 0.7)
    sup = u = None
    if suppressor and n_units >= 2:
        # unit 0 = u + v is relevant alone; unit 1 = v + 0.05 u is nearly useless alone but cancels v with unit 0.
        c0, c1 = 0, group_size
        others = np.delete(A, [c0, c1], axis=1)
        u, v = _orthonormal_pair(rng, others if n_samples >= cols + 2 else others[:, :0], n_samples)
        A[:, c0] = u + v
        A[:, c1] = v + 0.05 * u
        # the target comes from the other units and u only (the replaced columns' weights are dropped)
        W[c0:c0 + group_size] = 0.0
        W[c1:c1 + group_size] = 0.0
        sup = (0, 1)
    if rank_deficient == "duplicate" and n_units >= 3:
        A[:, (n_units - 1) * group_size:] = A[:, (n_units - 2) * group_size:(n_units - 1) * group_size]
    elif rank_deficient == "dead" and n_units >= 3:
        A[:, (n_units - 1) * group_size:] = 0.0
    elif rank_deficient == "combination" and n_units >= 3:
        A[:, -1] = A[:, 0] - 2.0 * A[:, group_size]
    if rank_deficient != "none" and n_units >= 3:
        W[(n_units - 1) * group_size:] = 0.0  # the rewritten last unit carries no target of its own
    Y = A @ W  # after the edits above, so that noise = 0 gives Y in the span of A (err(V) = 0)
    if u is not None:
        Y = 0.2 * Y + np.outer(u, rng.choice([-1.0, 1.0], n_targets) * 2.0)
    Y = Y + noise * rng.standard_normal(Y.shape)
    groups = None if group_size == 1 else [np.arange(u * group_size, (u + 1) * group_size) for u in range(n_units)]
    return RegressionData(A=A, Y=Y, groups=groups, n_units=n_units, suppressor=sup)


@st.composite
def regression_data(draw: Any, n_units: int | SearchStrategy[int] = _UNITS,
                    n_samples: int | SearchStrategy[int] | None = None,
                    n_targets: int | SearchStrategy[int] = _TARGETS,
                    correlation: float | SearchStrategy[float] = _CORRELATION,
                    suppressor: bool | SearchStrategy[bool] = _BOOLS,
                    group_size: int | SearchStrategy[int] = _ONE,
                    rank_deficient: str | SearchStrategy[str] = _DEFICIENCY,
                    noise: float | SearchStrategy[float] = _NOISE) -> RegressionData:
    """Arrays ``(A, Y, groups)`` of a least-squares instance with controllable structure.

    Parameters
    ----------
    n_units : int or strategy
        Number of units (each ``group_size`` columns).
    n_samples : int or strategy, optional
        Rows; default between ``columns + 2`` and ``3 * columns + 10`` (pass fewer to test the rows-vs-columns
        precondition).
    n_targets : int or strategy
    correlation : float or strategy in [0, 1)
        Equicorrelation of the columns through a shared latent factor.
    suppressor : bool or strategy
        Plant a suppressor pair in units 0 and 1: unit 1 is nearly useless alone and decisive with unit 0, the
        case where ``gamma < 1`` and lazy greedy's stale bounds fail. Needs ``n_units >= 2`` (with one unit none is
        planted and ``suppressor`` of the result is ``None``) and ``n_samples >= 2``.
    group_size : int or strategy
        Columns per unit (``> 1`` builds column groups, like conv channels or attention heads).
    rank_deficient : {"none", "duplicate", "dead", "combination"} or strategy
        Make the last unit a duplicate of the previous one, all zero, or (its last column) a combination of
        two others. Needs ``n_units >= 3``; with fewer units the instance is left as drawn.
    noise : float or strategy
        Standard deviation of target noise (``0`` gives ``Y = A W`` and ``err(V) = 0``).

    Raises
    ------
    hypothesis.errors.InvalidArgument
        At the first draw, when an argument (fixed or drawn) is out of its range: a size below 1, a
        ``correlation`` outside ``[0, 1)``, a negative ``noise``, an unknown ``rank_deficient``.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from verification import strategies as vst
    >>> @settings(max_examples=5, deadline=None)
    ... @given(vst.regression_data(n_units=4, group_size=2, suppressor=True))
    ... def check(data):
    ...     assert data.A.shape[1] == 8 and data.suppressor == (0, 1)
    >>> check()
    """
    where = "regression_data"
    units = _int_arg(where, "n_units", _draw(draw, n_units), 1, "the number of units")
    g = _int_arg(where, "group_size", _draw(draw, group_size), 1, "columns per unit")
    cols = units * g
    rows = _int_arg(where, "n_samples", _draw(draw, n_samples), 1, "rows of A") if n_samples is not None else \
        draw(st.integers(cols + 2, 3 * cols + 10))
    targets = _int_arg(where, "n_targets", _draw(draw, n_targets), 1, "columns of Y")
    rho = _float_arg(where, "correlation", _draw(draw, correlation), 0.0, 1.0, True,
                     "the equicorrelation of the columns; 1 would make every column the same")
    deficiency = _draw(draw, rank_deficient)
    if deficiency not in _DEFICIENCIES:
        raise InvalidArgument(f"{where}: rank_deficient must be one of {_DEFICIENCIES}, or a strategy of them; got "
                              f"{deficiency!r}.")
    sigma = _float_arg(where, "noise", _draw(draw, noise), 0.0, math.inf, True,
                       "the standard deviation of the target noise")
    rng = np.random.default_rng(draw(_SEEDS))
    return _regression_arrays(rng, units, rows, targets, rho, bool(_draw(draw, suppressor)), g, deficiency, sigma)


@st.composite
def sparse_regression(draw: Any, data: RegressionData | SearchStrategy[RegressionData] | None = None,
                      ridge: float | SearchStrategy[float] = _RIDGE,
                      fit_intercept: bool | SearchStrategy[bool] = _BOOLS) -> Any:
    """A :class:`submod.SparseRegression` built from ``data``: a :func:`regression_data` strategy (default: its
    default arguments) or a fixed :class:`RegressionData` (e.g. :func:`suppressor_data`)."""
    if data is None:
        data = regression_data()
    if not isinstance(data, (SearchStrategy, RegressionData)):
        raise InvalidArgument(f"sparse_regression: data must be a regression_data(...) strategy or a RegressionData "
                              f"(e.g. suppressor_data()); got {type(data).__name__}.")
    dat = _draw(draw, data)
    return SparseRegression(dat.A, dat.Y, ridge=float(_draw(draw, ridge)), groups=dat.groups,
                                   fit_intercept=bool(_draw(draw, fit_intercept)))


def set_functions(n: int | SearchStrategy[int] = _SIZES) -> SearchStrategy[submod.SetFunction]:
    """Any of the strategies above (least squares with ``n`` units), for tests that hold for every objective."""
    return st.one_of(modular(n=n), coverage(n=n), facility_location(n=n), feature_based(n=n),
                     sparse_regression(data=regression_data(n_units=n)))


def suppressor_data(n_samples: int = 200, n_noise: int = 4, seed: int = 0) -> RegressionData:
    """A fixed correlated least-squares instance with a suppressor pair, where ``gamma < 1``.

    Units: 0 = ``u + v`` (relevant alone: ``R^2`` about 0.5 in the population, 0.43 with the default seed),
    1 = ``v + 0.3 u`` (nearly useless alone: ``R^2`` about 0.08 in the population, 0.04 with the default seed;
    with unit 0 it cancels ``v`` and recovers the target ``y = u`` exactly), then ``n_noise`` weakly relevant noisy
    units ``0.25 u + noise``. So ``OPT_2 = ||y||^2`` while the submodular online bound (``gamma = 1``) at the empty
    set, the sum of the two largest singleton gains, is about half of it (0.52 ``||y||^2`` with the default seed):
    invalid. Plain lazy greedy re-evaluates unit 1 after picking unit 0 and sees its gain jump from its stale value:
    a stale-bound violation.

    Examples
    --------
    >>> from submod import SparseRegression
    >>> from verification.strategies import suppressor_data
    >>> d = suppressor_data()
    >>> d.A.shape, d.suppressor
    ((200, 6), (0, 1))
    >>> f = SparseRegression(d.A, d.Y)
    >>> r2 = [f.value([j]) / f.y_norm2 for j in range(6)]
    >>> bool(r2[1] < 0.1), bool(f.value([0, 1]) / f.y_norm2 > 0.999999)
    (True, True)
    >>> bool(sum(sorted(r2)[-2:]) < 0.6)   # the gamma = 1 online bound, far below OPT_2 = 1
    True
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(n_samples)
    v = rng.standard_normal(n_samples)
    cols = [u + v, v + 0.3 * u]
    for _ in range(n_noise):
        cols.append(0.25 * u + rng.standard_normal(n_samples))
    A = np.column_stack(cols)
    return RegressionData(A=A, Y=u[:, None].copy(), groups=None, n_units=A.shape[1], suppressor=(0, 1))


def lazy_trap_data(n_samples: int = 200, seed: int = 0) -> RegressionData:
    """A least-squares instance where plain lazy greedy returns a worse set *without seeing any violation*.

    Units: 0 = ``u + v``, 1 = ``v + 0.3 u`` (the suppressor), 2 = ``w``; target ``y = u + 0.4 w``. With
    ``k = 2``, greedy picks ``{0, 1}`` (``R^2`` 0.86 with the default seed, optimal). Plain lazy greedy picks unit
    0, then re-evaluates only unit 2 (largest stale gain: ``R^2`` 0.19 alone), finds its fresh gain (0.14) still
    above unit 1's stale gain (0.05) and takes it: ``R^2`` 0.53, and unit 1's jump (to 0.47) is never observed. So
    "no violation seen" is no evidence that a lazy run equals greedy; only re-evaluating every gain
    (``lazy_fallback=True``) is.

    Examples
    --------
    >>> from submod import SparseRegression
    >>> from verification.strategies import lazy_trap_data
    >>> d = lazy_trap_data()
    >>> d.A.shape
    (200, 3)
    >>> f = SparseRegression(d.A, d.Y)
    >>> stale = [f.value([j]) for j in (1, 2)]
    >>> fresh = [f.value([0, j]) - f.value([0]) for j in (1, 2)]
    >>> bool(fresh[1] > stale[0]), bool(fresh[0] > fresh[1])   # lazy takes unit 2; unit 1 was worth more
    (True, True)
    """
    rng = np.random.default_rng(seed)
    u, v, w = rng.standard_normal((3, n_samples))
    A = np.column_stack([u + v, v + 0.3 * u, w])
    return RegressionData(A=A, Y=(u + 0.4 * w)[:, None], groups=None, n_units=3, suppressor=(0, 1))
