"""Check greedy's approximation guarantees against a brute-force optimum on small ground sets."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

import submod
from submod import SetFunction
from submod._validation import check_k

from ._serialise import ResultDict
from ._values import ValueTable, mask_of, members, popcount
from .ratio import exact_ratio_from_table, monotone_tolerance, zero_tolerance

__all__ = ["GuaranteeCheck", "GuaranteeRow", "check_guarantee", "MAX_BRUTE_FORCE_N", "bian_bound"]

#: Largest ground set :func:`check_guarantee` accepts (a table of all ``2**n`` values is built).
MAX_BRUTE_FORCE_N = 14


def bian_bound(gamma: float, alpha: float) -> float:
    """Bian et al. (2017) approximation factor ``(1/alpha)(1 - exp(-alpha gamma))`` (``gamma`` when ``alpha = 0``).

    Examples
    --------
    >>> round(bian_bound(1.0, 1.0), 6) == round(1 - math.exp(-1), 6)
    True
    >>> bian_bound(0.5, 0.0)
    0.5
    """
    if alpha <= 0.0:
        return float(gamma)
    return float(-math.expm1(-alpha * gamma) / alpha)  # 1 - exp(x) would lose every digit for alpha near eps


@dataclass(frozen=True)
class GuaranteeRow(ResultDict):
    """One optimizer's value next to the bounds it should satisfy.

    Attributes
    ----------
    method : str
        ``"greedy"``, ``"lazy"`` or ``"stochastic"``.
    value : float
        ``F`` of the returned set (for stochastic: the mean over seeds, an estimate of the expectation).
    value_std : float
        Standard deviation over seeds (0 for deterministic methods).
    selected : tuple of int
        The returned set (stochastic: the first seed's).
    factor : float
        The approximation factor the bound uses (``1 - exp(-gamma)``, or ``1 - exp(-(1 - eps) gamma)`` for
        stochastic greedy).
    bound : float
        ``factor * OPT``.
    holds : bool
        ``value >= bound`` (up to round-off).
    bian_factor, bian_bound_value : float or None
        Bian et al.'s factor and bound (exact greedy and runs equal to it only).
    holds_bian : bool or None
    theorem : bool
        Whether the bound is a theorem for this method on this function (``False``: an empirical comparison).
    note : str
    violations : int
        Stale-bound violations (fresh gains larger than their stale bound) the lazy run saw: the length of its
        ``SelectionResult.violations``; 0 for greedy and stochastic greedy.
    """

    method: str
    value: float
    value_std: float
    selected: tuple[int, ...]
    factor: float
    bound: float
    holds: bool
    bian_factor: float | None
    bian_bound_value: float | None
    holds_bian: bool | None
    theorem: bool
    note: str
    violations: int = 0


@dataclass(frozen=True)
class GuaranteeCheck(ResultDict):
    """Result of :func:`check_guarantee`.

    Attributes
    ----------
    k : int
    opt : float
        The exact optimum ``OPT_k`` (brute force).
    opt_set : tuple of int
    gamma : float
        Exact ``gamma_{S_greedy, k}`` (the ratio Das & Kempe's theorem uses).
    gamma_reachable : float
        Exact ``min_{|L| <= k - 1} gamma_{L, k}`` (the ratio stochastic greedy's bound uses).
    alpha : float
        Exact generalised curvature along the greedy prefixes (Bian et al. 2017), against every ``Omega`` of
        size ``<= k``.
    rows : list of GuaranteeRow
    cost : dict

    ``to_dict()`` returns these attributes (each row a dict of its own attributes) and ``all_hold`` as
    JSON-serialisable builtins (a non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``).
    """

    k: int
    opt: float
    opt_set: tuple[int, ...]
    gamma: float
    gamma_reachable: float
    alpha: float
    rows: list[GuaranteeRow] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)

    _derived = ("all_hold",)

    @property
    def all_hold(self) -> bool:
        """Whether every bound that is a theorem holds."""
        return all(r.holds and (r.holds_bian is not False) for r in self.rows if r.theorem)

    def row(self, method: str) -> GuaranteeRow:
        """The row of ``method``."""
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)


def check_guarantee(f: SetFunction, k: int, methods: tuple[str, ...] = ("greedy", "lazy", "stochastic"), *,
                    n_seeds: int = 10, eps: float = submod.DEFAULT_EPS, lazy_fallback: bool = True,
                    rtol: float = 1e-9) -> GuaranteeCheck:
    r"""Brute-force ``OPT_k`` and check each optimizer against the bounds that apply to it.

    * greedy: ``F(S_G) >= (1 - exp(-gamma)) OPT`` with the exact ``gamma = gamma_{S_G, k}`` (Das & Kempe 2011)
      and ``F(S_G) >= (1/alpha)(1 - exp(-alpha gamma)) OPT`` with the exact generalised curvature ``alpha``
      along the greedy prefixes (Bian et al. 2017);
    * lazy: the same bounds are theorems when ``f`` is declared submodular or ``lazy_fallback=True`` (the core
      then re-evaluates every gain and returns greedy's set); plain lazy greedy on a non-submodular function is
      only compared with them;
    * stochastic: ``E[F] >= (1 - exp(-(1 - eps) gamma')) OPT`` with ``gamma'`` the exact ratio over every
      reachable set (``|L| <= k - 1``); the mean over ``n_seeds`` seeds estimates the expectation.

    Parameters
    ----------
    f : submod.SetFunction
        Monotone, with ``n <= 14``.
    k : int
        Budget, ``0 <= k <= n``. For ``k = 0`` the only feasible set is the empty one: ``opt = F(empty)``, every
        method returns it, ``gamma = gamma_reachable = 1`` (``0/0 := 1``, as :func:`submodularity_ratio`) and every
        bound holds.
    methods : str or tuple of str
        Optimizers to check.
    n_seeds : int, default 10
        Seeds ``0..n_seeds-1`` for stochastic greedy.
    eps : float
        Stochastic greedy's accuracy.
    lazy_fallback : bool, default True
        Passed to :func:`submod.maximize` for the lazy run.
    rtol : float
        Round-off tolerance (relative to ``max |F|``) of the exact ratios and the ``holds`` comparisons; for least
        squares ``64 eps ||Y||^2`` instead (see :func:`submodularity_ratio`). The monotonicity check allows drops
        up to ``verification.ratio.monotone_tolerance`` (the rounding of ``F``'s computation).

    Returns
    -------
    GuaranteeCheck

    Examples
    --------
    >>> import numpy as np
    >>> import submod, verification as vf
    >>> f = submod.FeatureBased(np.random.default_rng(0).random((8, 3)))
    >>> chk = vf.check_guarantee(f, 3, n_seeds=3)
    >>> chk.gamma, chk.all_hold
    (1.0, True)
    >>> bool(chk.row("greedy").value >= (1 - np.exp(-1)) * chk.opt)
    True
    """
    if not isinstance(f, SetFunction):
        raise ValueError(f"f must be a submod.SetFunction; got {type(f).__name__}.")
    if f.n > MAX_BRUTE_FORCE_N:
        raise ValueError(f"check_guarantee brute-forces the optimum over 2**n sets; n = {f.n} exceeds the limit "
                         f"{MAX_BRUTE_FORCE_N}. Check a sub-instance (a random subset of the ground set) or use "
                         "verification.certify for a proven upper bound on OPT at any size.")
    kk = check_k(k, f.n)
    if isinstance(methods, str):  # one method name, not its letters
        methods = (methods,)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be a number in [0, 1) (relative round-off tolerance); got {rtol!r}.")
    methods = tuple(methods)
    if not methods:  # all_hold over no rows would say True about nothing
        raise ValueError(f"methods is empty; pass at least one of {submod.METHODS}.")
    bad = [m for m in methods if m not in submod.METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {submod.METHODS}.")
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, (int, np.integer)) or n_seeds < 1:
        raise ValueError(f"n_seeds must be a positive integer; got {n_seeds!r}.")
    start = time.perf_counter()
    n = f.n
    table = ValueTable(f)
    vals = table.values
    atol = zero_tolerance(f, float(np.abs(vals).max()), rtol)
    # drops within the rounding of F's own computation are not evidence against monotonicity (least squares
    # loses about 1e-12 * ||Y||^2 once F has reached the rank of an under-determined problem)
    mono_tol = monotone_tolerance(f, float(np.abs(vals).max()), rtol)
    masks = np.arange(1 << n, dtype=np.int64)
    for j in range(n):  # monotone on the whole table, or the bounds below are not theorems for f
        without = masks[(masks >> j) & 1 == 0]
        drop = vals[without] - vals[without | (1 << j)]
        if drop.max() > mono_tol:
            i = int(np.argmax(drop))
            raise ValueError(f"F is not monotone: adding {j} to {members(int(without[i]), n).tolist()} lowers F by "
                             f"{drop[i]:.3g} (more than the rounding tolerance {mono_tol:.3g}). Greedy's "
                             "guarantees, and this check, are for monotone functions.")
    pc = popcount(masks)
    feasible = masks[pc <= kk]
    best = int(feasible[np.argmax(vals[feasible])])
    opt = float(vals[best])

    greedy = submod.maximize(f, kk, method="greedy")
    g_mask = mask_of(greedy.selected)
    gamma, _, _ = exact_ratio_from_table(table, _submasks_array(masks, g_mask), kk, rtol)
    gamma = min(gamma, 1.0)  # 1 when no pair has |S| >= 1 (k = 0): the empty S's ratio 0/0 := 1
    reach = masks[pc <= kk - 1]
    gamma_reach, _, _ = exact_ratio_from_table(table, reach, kk, rtol)
    gamma_reach = min(gamma_reach, 1.0)
    alpha = _curvature(vals, greedy.selected, kk, n, atol)
    factor = 1.0 - math.exp(-gamma)
    bfactor = bian_bound(gamma, alpha)

    rows = []
    for m in methods:
        if m == "stochastic":
            runs = [submod.maximize(f, kk, method="stochastic", seed=s, eps=eps) for s in range(n_seeds)]
            v = np.array([r.value for r in runs])
            sfactor = 1.0 - math.exp(-(1.0 - eps) * gamma_reach)
            mean = float(v.mean())
            rows.append(GuaranteeRow(
                method=m, value=mean, value_std=float(v.std()), selected=tuple(runs[0].selected.tolist()),
                factor=sfactor, bound=sfactor * opt, holds=bool(mean >= sfactor * opt - atol), bian_factor=None,
                bian_bound_value=None, holds_bian=None, theorem=True,
                note=f"mean over {n_seeds} seeds, an estimate of E[F]; the theorem bounds the expectation "
                     "(Mirzasoleiman et al. 2015; Khanna et al. 2017)"))
            continue
        if m == "greedy":
            res, theorem = greedy, True
            note = "Das & Kempe 2011 and Bian et al. 2017, with the exact gamma and alpha"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = submod.maximize(f, kk, method="lazy", lazy_fallback=lazy_fallback)
            theorem = bool(f.submodular or lazy_fallback)
            note = ("lazy with exact fallback returns greedy's set: the greedy theorems apply" if theorem and
                    not f.submodular else "exact for submodular functions" if theorem else
                    f"plain lazy greedy on a function not declared submodular ({len(res.violations)} stale-bound "
                    "violation(s) seen): not a theorem, an empirical comparison only")
        value = float(res.value)
        rows.append(GuaranteeRow(
            method=m, value=value, value_std=0.0, selected=tuple(res.selected.tolist()), factor=factor,
            bound=factor * opt, holds=bool(value >= factor * opt - atol), bian_factor=bfactor,
            bian_bound_value=bfactor * opt, holds_bian=bool(value >= bfactor * opt - atol), theorem=theorem, note=note,
            violations=len(res.violations)))
    cost = {"value_table_gain_evaluations": table.gain_evaluations, "state_updates": table.state_updates,
            "seconds": time.perf_counter() - start}
    return GuaranteeCheck(k=kk, opt=opt, opt_set=tuple(members(best, n).tolist()), gamma=gamma,
                          gamma_reachable=gamma_reach, alpha=alpha, rows=rows, cost=cost)


def _submasks_array(masks: np.ndarray, mask: int) -> np.ndarray:
    return masks[(masks & ~mask) == 0]


def _curvature(vals: np.ndarray, selected: np.ndarray, k: int, n: int, atol: float) -> float:
    """Exact generalised curvature along greedy prefixes (Bian et al. 2017, Def. 2, restricted as in their proof).

    ``alpha = max_i max_{Omega not containing s_i, |Omega| <= k} 1 - F(s_i | S_{i-1} u Omega) / F(s_i | S_{i-1})``
    over the picks with a positive gain, clipped to ``[0, 1]``.
    """
    masks = np.arange(1 << n, dtype=np.int64)
    omegas = masks[popcount(masks) <= k]
    alpha = 0.0
    prefix = 0
    for e in np.asarray(selected, dtype=np.int64):
        bit = 1 << int(e)
        rho = vals[prefix | bit] - vals[prefix]
        if rho > atol:
            om = omegas[(omegas & bit) == 0] | prefix
            rho2 = vals[om | bit] - vals[om]
            alpha = max(alpha, float(1.0 - rho2.min() / rho))
        prefix |= bit
    return float(min(max(alpha, 0.0), 1.0))

