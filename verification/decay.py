r"""Exponential decay of the least-squares residual along the greedy path, against sound bounds.

With ``err_k = ||Y||^2 - F(S_k)`` the residual after ``k`` greedy picks (the penalised residual under a ridge),
for any comparator ``T`` and any proven lower bounds ``g_t`` on the ratio of the prefix ``S_t`` toward
``T \ S_t``:

    err_k <= err(T) + prod_{t<k} (1 - g_t / |T \ S_t|) F(T)

(greedy's gain is at least the average gain over ``T \ S_t``, which is at least ``g_t F(T \ S_t | S_t) /
|T \ S_t|``; Das & Kempe 2011, Elenberg et al. 2018). The bounds reported:

``a-priori spectral``
    ``T = V``, ``g_t >= lambda_min(C)``: ``err_k <= err(V) + exp(-lambda k / d) F(V)``. Known before running
    greedy; often nearly vacuous on correlated activations.
``per-step spectral``
    ``T = V``, ``g_t >=`` ``lambda_min`` of the block-whitened Gram of the remaining units residualised on the
    picked ones.
``per-step path ratio``
    ``T = V`` with the exact ratio ``g_t`` measured along the path.
``bicriteria s=...``
    ``T`` of size ``s``: the exact best ``s``-subset (brute force, small instances) or a greedy prefix, with the
    exact path ratios toward it.

All four are proven upper bounds on ``err_k``. The fitted contraction factor is an empirical estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from submod import SetFunction
from submod._validation import as_index_array

from ._kernels import exp_rate_bound, fit_contraction, lambda_min, path_bound, schur_complement, whitened_gram
from ._serialise import ResultDict
from ._values import MAX_TABLE_N, ValueTable, members, popcount
from .ratio import is_regression, monotone_tolerance, path_ratios, regression_stats

__all__ = ["BoundCurve", "ErrorDecay", "error_decay"]

#: Default largest number of units for the brute-force bicriteria comparators.
BRUTE_FORCE_MAX_UNITS = 12
#: Default largest number of Gram columns for the per-step spectral bound (one eigenproblem per step).
PER_STEP_MAX_COLUMNS = 400


@dataclass(frozen=True)
class BoundCurve(ResultDict):
    """A bound on ``err_k`` for ``k = 0..k_max``.

    Attributes
    ----------
    name : str
    values : ndarray
        The bound at ``k = 0..k_max``; where it falls below the measured ``err_k`` by rounding alone (at most
        ``verification.ratio.monotone_tolerance`` and the ``rtol * ||Y||^2`` of ``holds``, e.g. at
        ``S_k = T``, where both are ``err(T)`` computed in two ways) it is lifted to ``err_k``; a larger shortfall
        is left visible, and ``holds`` is then ``False``.
    kind : str
        ``"proven upper bound"`` for every curve :func:`error_decay` compares against.
    description : str
    holds : bool
        Whether the measured curve stays at or below it (up to round-off).
    vacuous : bool
        Whether it never improves on the trivial ``err_k <= ||Y||^2``.
    """

    name: str
    values: np.ndarray
    kind: str
    description: str
    holds: bool
    vacuous: bool


@dataclass(frozen=True)
class ErrorDecay(ResultDict):
    """Result of :func:`error_decay`.

    Attributes
    ----------
    kept : ndarray
        Kept sizes ``0..k``.
    selected : ndarray
        Greedy picks, in order.
    errors : ndarray
        Measured ``err_k`` (exact, from the greedy path).
    y_norm2 : float
        ``||Y||^2`` (centred with an intercept); the trivial bound.
    lambda_min : float
        Proven lower bound on every ratio toward ``V`` (``lambda_min`` of the block-whitened Gram).
    bounds : list of BoundCurve
        Proven upper bounds.
    contraction : float
        Fitted ``rho`` in ``err_k ~ c rho^k`` (an empirical estimate, never a guarantee).
    contraction_points : int
    preconditions : list of str
        Degenerate units and data: duplicate units and fewer samples than columns (fewer than columns + 1 with
        an intercept), which make the spectral bounds vacuous unless there is a ridge, and dead units (listed,
        but excluded from ``lambda_min``: they do not weaken the bounds). They are found on the Gram without
        the ridge, so a ridge does not hide them; each line says what it does to the bounds.
    parameters, cost : dict

    ``to_dict()`` returns these attributes (each bound curve a dict of its own attributes), ``relative_errors``
    and ``all_hold`` as JSON-serialisable builtins (arrays as lists, a non-finite float, such as an undefined
    ``contraction``, as the string ``"nan"``, ``"inf"`` or ``"-inf"``).
    """

    kept: np.ndarray
    selected: np.ndarray
    errors: np.ndarray
    y_norm2: float
    lambda_min: float
    bounds: list[BoundCurve]
    contraction: float
    contraction_points: int
    preconditions: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    _derived = ("relative_errors", "all_hold")

    @property
    def relative_errors(self) -> np.ndarray:
        """``err_k / ||Y||^2``."""
        return self.errors / self.y_norm2 if self.y_norm2 > 0 else np.zeros_like(self.errors)

    @property
    def all_hold(self) -> bool:
        """Whether the measured curve is below every sound bound."""
        return all(b.holds for b in self.bounds)

    def bound(self, name: str) -> BoundCurve:
        """The bound called ``name``."""
        for b in self.bounds:
            if b.name == name:
                return b
        raise KeyError(f"no bound {name!r}; available: {[b.name for b in self.bounds]}")

    #: Smallest relative error the log-scale :meth:`plot` can show; smaller values (an exact fit has error 0) are
    #: drawn on it, marked as such.
    PLOT_FLOOR = 1e-16

    def plot(self, ax: Any = None) -> Any:
        """Log relative error vs kept size with the bounds overlaid; returns the matplotlib Figure (Agg-safe).

        A log axis cannot show 0: measured errors below :attr:`PLOT_FLOOR` (``1e-16`` of ``||Y||^2``; an exact fit
        has error 0) are drawn as open down-triangles on a dotted floor line, outside the measured curve, and the
        legend says so; bound values below the floor are drawn on it too (below the axes when no error is).
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=110)
        else:
            fig = ax.figure
        scale = self.y_norm2 if self.y_norm2 > 0 else 1.0
        floor = self.PLOT_FLOOR
        rel = self.errors / scale
        seen = rel >= floor
        # the curve only through the errors the axis can show (NaN breaks the line): a point at the floor would
        # claim an error of 1e-16 where it is below that, often exactly 0
        ax.semilogy(self.kept, np.where(seen, rel, np.nan), "k-o", ms=3, lw=2, label="measured (exact)")
        if not seen.all():
            exact_zero = bool(np.all(rel[~seen] == 0))
            ax.semilogy(self.kept[~seen], np.full(int((~seen).sum()), floor), linestyle="none", marker="v", ms=6,
                        mfc="none", mec="k", label=f"measured {'= 0' if exact_zero else f'< {floor:g}'} (exact), "
                                                   f"drawn at the floor")
            ax.axhline(floor, color="0.4", lw=0.8, ls=":", label=f"plot floor {floor:g}: values below drawn on it")
        styles = ["--", "-.", ":", (0, (5, 2, 1, 2)), (0, (1, 1)), (0, (8, 3))]
        for i, b in enumerate(self.bounds):
            ax.semilogy(self.kept, np.maximum(b.values / scale, floor), linestyle=styles[i % len(styles)],
                        lw=1.4, label=f"{b.name} (proven bound)")
        if math.isfinite(self.contraction) and self.errors[0] > 0:
            ax.semilogy(self.kept, np.maximum(self.errors[0] / scale * self.contraction ** self.kept, floor),
                        color="0.6", lw=1, label=f"fit rho = {self.contraction:.3f} (estimate)")
        ax.set_xlabel("kept units k")
        ax.set_ylabel("relative residual err_k / ||Y||^2")
        top = 1.5
        low = float(np.min(np.maximum(rel, floor))) / 3   # the floor, when used, stays inside the axes
        ax.set_ylim(low, top)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.set_title("greedy residual vs sound bounds")
        fig.tight_layout()
        return fig


def _check_regression(f: SetFunction) -> None:
    if not is_regression(f):
        raise ValueError(f"error_decay needs a submod.SparseRegression (the least-squares pruning objective); got "
                         f"{type(f).__name__}. Build one with submod.SparseRegression(A, Y) or from streamed "
                         "statistics with submod.GramAccumulator.")


def error_decay(f: SetFunction, k_max: int | None = None, *, comparators: str | list[ArrayLike] | None = "auto",
                per_step_spectral: bool | None = None, brute_force_max_units: int = BRUTE_FORCE_MAX_UNITS,
                rtol: float = 1e-9) -> ErrorDecay:
    r"""Residual error along the greedy path next to the sound bounds, with the fitted contraction factor.

    Parameters
    ----------
    f : submod.SparseRegression
        The least-squares objective (any pruning layer).
    k_max : int, optional
        Longest prefix (default: every unit).
    comparators : "auto", list of arrays, or None
        Bicriteria comparators ``T`` of sizes ``s`` about ``0.15, 0.3, 0.5`` times ``k_max``. ``"auto"``: the
        exact best ``s``-subsets (brute force) when there are at most ``brute_force_max_units`` units, otherwise
        the greedy prefixes of those sizes. A list gives your own sets (e.g. another method's selection).
    per_step_spectral : bool, optional
        Compute the per-step spectral bound (one eigenproblem per step); default when the Gram has at most 400
        columns.
    brute_force_max_units : int, default 12
    rtol : float, default 1e-9
        A bound "holds" when ``measured <= bound + rtol * ||Y||^2``.

    Returns
    -------
    ErrorDecay

    Notes
    -----
    Preconditions: two units spanning a common direction (duplicates) or fewer samples than columns make
    ``lambda_min = 0`` (without a ridge), so the spectral bounds are vacuous (still true); the path-ratio and
    bicriteria bounds remain informative. Dead units (all-zero columns) have gains exactly 0 and are left out
    of ``lambda_min``, so they do not make it 0. Each is listed in ``preconditions``, whatever the ridge (a ridge
    keeps duplicates and too few samples from making ``lambda_min`` zero, but they are still there).

    Examples
    --------
    >>> import numpy as np
    >>> import submod, verification as vf
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((100, 6)); Y = A @ rng.standard_normal((6, 2))
    >>> dec = vf.error_decay(submod.SparseRegression(A, Y))
    >>> dec.all_hold, [b.name for b in dec.bounds][:3]
    (True, ['a-priori spectral', 'per-step spectral', 'per-step path ratio'])
    """
    start = time.perf_counter()
    _check_regression(f)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be a number in [0, 1) (relative tolerance of the 'holds' checks); got {rtol!r}.")
    if isinstance(brute_force_max_units, bool) or not isinstance(brute_force_max_units, (int, np.integer)) or \
            brute_force_max_units < 0:
        raise ValueError(f"brute_force_max_units must be a non-negative integer (the most units for which 'auto' "
                         f"comparators are found by brute force; default {BRUTE_FORCE_MAX_UNITS}); got "
                         f"{brute_force_max_units!r}.")
    d = f.n
    k = d if k_max is None else k_max
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (1 <= k <= d):
        raise ValueError(f"k_max must be an integer in [1, {d}] (the number of units); got {k_max!r}.")
    path = f.greedy_path(int(k), rule="greedy")
    selected = np.asarray(path.selected, dtype=np.int64)
    values = np.asarray(path.values, dtype=np.float64)
    y2 = float(f.y_norm2)
    errors = y2 - values
    kept = np.arange(values.size)
    full_value = float(f.value(np.arange(d)))
    err_full = y2 - full_value
    tol = rtol * max(y2, np.finfo(float).tiny)

    G, groups, ridge = regression_stats(f)
    C, unit_cols, dead = whitened_gram(G, groups, ridge, tol=f.tol)
    lam = max(0.0, lambda_min(C))
    curves: list[tuple[str, np.ndarray, str]] = []
    curves.append(("a-priori spectral", exp_rate_bound(err_full, full_value, lam, d, selected.size),
                   f"err(V) + exp(-lambda k / d) F(V) with lambda = lambda_min(C) = {lam:.4g} (proven lower bound "
                   "on every ratio toward V), d = number of units"))
    n_cols = G.shape[0]
    do_step = n_cols <= PER_STEP_MAX_COLUMNS if per_step_spectral is None else bool(per_step_spectral)
    step_lams = None
    if do_step:
        step_lams = _per_step_lambdas(G + ridge * np.eye(n_cols) if ridge else G, groups, selected, f.tol)
        curves.append(("per-step spectral",
                       path_bound(err_full, full_value, step_lams, d - np.arange(selected.size)),
                       "err(V) + prod_t (1 - l_t/(d - t)) F(V), l_t = lambda_min of the whitened Gram of the "
                       "remaining units residualised on S_t (a proven lower bound on the path ratio)"))
    all_units = np.arange(d)
    r_v, s_v, _, _ = path_ratios(f, selected, all_units, rtol)
    curves.append(("per-step path ratio", path_bound(err_full, full_value, r_v, s_v),
                   "err(V) + prod_t (1 - g_t/(d - t)) F(V) with g_t the exact ratio of S_t toward V \\ S_t"))
    comp_info = []
    for name, T, err_T, how in _comparators(f, comparators, selected, errors, y2, brute_force_max_units):
        r_T, s_T, _, _ = path_ratios(f, selected, T, rtol)
        value_T = y2 - err_T
        curves.append((name, path_bound(err_T, value_T, r_T, s_T),
                       f"err(T) + prod_t (1 - g_t/|T \\ S_t|) F(T), T = {how} (|T| = {T.size}, exact "
                       f"err(T) = {err_T:.4g}), g_t the exact path ratio toward T"))
        comp_info.append({"name": name, "T": T.tolist(), "err_T": err_T, "how": how})

    # err(T) is computed afresh, err_k from the path's incremental gains: where the path reaches T (S_k = V at
    # k = d, or S_k = T for a comparator) the bound err(T) and the measured err_k are one number computed twice,
    # and the bound can come out below it by rounding. Such a shortfall (at most F's rounding, and within the
    # tolerance the holds check uses, so that a lifted curve never hides a failed check) is lifted, so that a number
    # labelled a proven upper bound is never below the one labelled exact; a larger one is left visible.
    rounding = min(monotone_tolerance(f, y2, rtol), tol)
    bounds = []
    for name, vals, desc in curves:
        holds = bool(np.all(errors <= vals + tol))
        vals = np.where((errors > vals) & (errors - vals <= rounding), errors, vals)
        vacuous = bool(np.all(vals >= y2 - tol))
        bounds.append(BoundCurve(name=name, values=vals, kind="proven upper bound", description=desc,
                                 holds=holds, vacuous=vacuous))
    rho, used = fit_contraction(errors, floor=max(1e3 * tol, err_full + 1e3 * tol))
    # degenerate units are a property of the data, not of the ridge: look for them on the un-regularised Gram
    # (with a ridge every column is live and no two are collinear in the regularised one)
    C0, unit_cols0, dead0 = whitened_gram(G, groups, 0.0, tol=f.tol) if ridge else (C, unit_cols, dead)
    pre = _preconditions(f, C0, unit_cols0, dead0, lam, n_cols)
    params = {"k_max": int(k), "ridge": ridge, "rtol": rtol, "comparators": comp_info,
              "per_step_lambdas": None if step_lams is None else step_lams.tolist(),
              "path_ratios_to_V": r_v.tolist(), "err_full_set": err_full, "value_full_set": full_value}
    return ErrorDecay(kept=kept, selected=selected, errors=errors, y_norm2=y2, lambda_min=lam, bounds=bounds,
                      contraction=rho, contraction_points=used, preconditions=pre, parameters=params,
                      cost={"seconds": time.perf_counter() - start})


def _per_step_lambdas(Gr: np.ndarray, groups: list[np.ndarray], selected: np.ndarray, tol: float) -> np.ndarray:
    """``lambda_min`` of the whitened Gram of the remaining units residualised on each prefix (a column whose
    residual is within ``tol`` of its original squared norm is dropped, as :class:`submod.SparseRegression` does)."""
    d = len(groups)
    out = np.empty(selected.size)
    picked = np.zeros(d, dtype=bool)
    for t in range(selected.size):
        rest = np.flatnonzero(~picked)
        given = np.concatenate([groups[u] for u in np.flatnonzero(picked)]) if picked.any() else \
            np.zeros(0, dtype=np.int64)
        keep = np.concatenate([groups[u] for u in rest])
        S = schur_complement(Gr, keep, given)
        offsets = np.cumsum([0] + [groups[u].size for u in rest])
        local = [np.arange(offsets[i], offsets[i + 1]) for i in range(rest.size)]
        C, _, _ = whitened_gram(S, local, 0.0, tol=tol, ref=np.diag(Gr)[keep])
        out[t] = max(0.0, lambda_min(C))
        picked[selected[t]] = True
    return out


def _comparators(f: SetFunction, comparators: str | list[ArrayLike] | None, selected: np.ndarray,
                 errors: np.ndarray, y2: float, max_units: int) -> list[tuple[str, np.ndarray, float, str]]:
    d = f.n
    k = selected.size
    if comparators is None:
        return []
    if isinstance(comparators, str):
        if comparators != "auto":
            raise ValueError(f"comparators must be 'auto', None or a list of index arrays; got {comparators!r}.")
        sizes = sorted({min(max(1, round(k * q)), d) for q in (0.15, 0.3, 0.5)})
        if d <= min(max_units, MAX_TABLE_N):
            table = ValueTable(f)
            masks = np.arange(1 << d, dtype=np.int64)
            pc = popcount(masks)
            out = []
            for s in sizes:
                cand = masks[pc == s]
                best = members(int(cand[np.argmax(table.values[cand])]), d)
                # err(T) from a fresh evaluation: the table is filled from incremental gains, whose rounding on
                # near-collinear columns can exceed the bound's tolerance
                out.append((f"bicriteria s={s}", best, y2 - float(f.value(best)),
                            f"the best {s}-subset (brute force)"))
            return out
        return [(f"bicriteria s={s}", np.sort(selected[:s]), float(errors[s]), f"the greedy prefix of size {s}")
                for s in sizes]
    if isinstance(comparators, np.ndarray) and comparators.ndim == 1 and comparators.dtype != object or \
            isinstance(comparators, (list, tuple)) and comparators and all(
                isinstance(T, (int, np.integer)) for T in comparators):
        raise ValueError(f"comparators must be a list of sets (one index array per comparator T); got one flat list "
                         f"of indices {list(comparators)[:8]}. Pass [[...]] for a single set, e.g. "
                         f"comparators=[{list(comparators)[:4]}].")
    out = []
    for i, T in enumerate(comparators):
        if isinstance(T, (int, np.integer)):
            raise ValueError(f"comparators[{i}] must be a set of indices (a list or array of int); got {T!r}.")
        Ti = np.unique(as_index_array(T, d, f"comparators[{i}]"))
        out.append((f"comparator {i} (s={Ti.size})", Ti, y2 - float(f.value(Ti)), "a set you supplied"))
    return out


def _preconditions(f: SetFunction, C: np.ndarray, unit_cols: list[np.ndarray], dead: list[int], lam: float,
                   n_cols: int) -> list[str]:
    """What degenerates the spectral bounds, each line with its consequence.

    ``C``, ``unit_cols`` and ``dead`` come from the whitened Gram *without* the ridge (dead and duplicate units are
    properties of the data; a ridge only keeps them from making ``lambda_min`` zero); ``lam`` is the
    ``lambda_min`` the bounds use (with the ridge).
    """
    ridge = float(getattr(f, "ridge", 0.0) or 0.0)
    if lam <= 1e-10:
        consequence = (f"lambda_min(C) = {lam:.3g}" + (f" even with the ridge ({ridge:g})" if ridge > 0 else "")
                       + ", so the spectral bounds are vacuous")
    elif ridge > 0:
        consequence = (f"the ridge ({ridge:g}) keeps the regularised lambda_min positive ({lam:.3g}), so the "
                       "spectral bounds are weak but not vacuous")
    else:  # nearly collinear units without a ridge: lambda_min is tiny but not zero, and no ridge props it up
        consequence = (f"lambda_min(C) = {lam:.3g} is nearly zero (there is no ridge), so the spectral bounds are "
                       "nearly vacuous")
    out = []
    if dead:
        out.append(f"dead units (all-zero columns, after centring with an intercept): {dead[:20]}"
                   f"{' ...' if len(dead) > 20 else ''}; their gains are exactly 0, and lambda_min is taken without "
                   "them (they do not weaken the bounds)")
    owner = np.concatenate([np.full(c.size, u) for u, c in enumerate(unit_cols)]) if unit_cols else np.zeros(0)
    if C.shape[0] > 1:
        off = np.abs(C) >= 1.0 - 1e-8
        off &= owner[:, None] != owner[None, :]
        i, j = np.nonzero(np.triu(off, 1))
        pairs = sorted({(int(min(owner[a], owner[b])), int(max(owner[a], owner[b]))) for a, b in zip(i, j,
                                                                                                       strict=True)})
        if pairs:
            out.append(f"duplicate (collinear) units: {pairs[:10]}{' ...' if len(pairs) > 10 else ''}; "
                       f"{consequence}")
    count = getattr(f, "count", None)
    # centring removes one dimension: with an intercept the centred Gram has rank at most count - 1
    rows = None if count is None else int(count) - (1 if getattr(f, "fit_intercept", False) else 0)
    if rows is not None and rows < n_cols:
        have = f"fewer samples ({count}{', less 1 for the intercept' if rows != count else ''}) than columns " \
               f"({n_cols}): the Gram alone is singular; "
        if lam > 1e-10:
            out.append(have + consequence)
        else:
            out.append(have + consequence + "; collect more samples than columns or add a ridge")
    if lam <= 1e-10 and not any(consequence in s for s in out):
        out.append(f"lambda_min(C) = {lam:.3g}: the columns are (numerically) linearly dependent, so the a-priori "
                   "spectral bound is vacuous")
    return out
