r"""The submodularity ratio ``gamma_{U,k}``: exact, sampled (upper bound), spectral (lower bound), greedy path.

``gamma_{U,k} = min { sum_{j in S} F(j|L) / F(S|L) : L subset of U, S disjoint from L, 1 <= |S| <= k }`` with
``0/0 := 1`` (Das & Kempe 2011); ``gamma_{U,0} = 1``, the ratio ``0/0`` of the empty ``S``, the only set of size
``<= 0``. A pair with ``F(S|L) = 0 < sum_j F(j|L)`` has ratio ``+inf`` and never attains
the minimum. ``gamma_{U,k}`` decreases when ``U`` or ``k`` grows, lies in ``[0, 1]`` and equals 1 for all
``(U, k)`` iff ``F`` is submodular.

Which answers are sound where (see the theory page):

* ``"exact"``: enumeration; usable everywhere (guarantees, certificates);
* ``"spectral"``: a proven LOWER bound for :class:`submod.SparseRegression`; usable in guarantees/certificates;
* ``"sampled"``: the minimum over random pairs is an UPPER bound; falsification only;
* ``"greedy-path"``: exact ratios at the pairs met along a greedy run, so again an UPPER bound on ``gamma``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

import submod
from submod import SetFunction
from submod._validation import as_index_array, check_k, rng_from_seed

from ._kernels import lambda_min, n_unit_subsets, sparse_lambda_min, whitened_gram
from ._serialise import ResultDict
from ._values import MAX_TABLE_N, ValueTable, bit_matrix, mask_of, members, popcount

__all__ = ["RatioEstimate", "submodularity_ratio", "METHODS", "KINDS", "DEFAULT_MAX_PAIRS", "regression_stats"]

METHODS = ("exact", "sampled", "spectral", "greedy-path")
KINDS = ("exact", "lower bound", "upper bound", "estimate")
#: Default largest number of ``(L, S)`` pairs that ``method="exact"`` enumerates.
DEFAULT_MAX_PAIRS = 2_000_000


@dataclass(frozen=True)
class RatioEstimate(ResultDict):
    """An answer about the submodularity ratio that says what it is.

    Attributes
    ----------
    value : float
        The number.
    kind : {"exact", "lower bound", "upper bound", "estimate"}
        Its relation to the true ``gamma_{U,k}``. Only ``"exact"`` and ``"lower bound"`` may be used in a
        guarantee or a certificate.
    method : str
        How it was obtained.
    k : int
        Size limit of ``S``.
    U : tuple of int or None
        The set whose subsets ``L`` range over (``None``: the whole ground set).
    parameters : dict
        Everything else that defines the number (sample count and seed, tolerances, restrictions, witness...).
    cost : dict
        ``gain_evaluations``, ``state_updates`` (or ``eigen_problems``) and ``seconds``.
    details : dict
        Per-method extras (e.g. the ratios along a greedy path, stale-bound violations).

    ``to_dict()`` returns these attributes and ``sound_lower`` as JSON-serialisable builtins (arrays as lists, a
    non-finite float, such as an infinite path ratio, as the string ``"nan"``, ``"inf"`` or ``"-inf"``).
    """

    value: float
    kind: str
    method: str
    k: int
    U: tuple[int, ...] | None
    parameters: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    _derived = ("sound_lower",)

    @property
    def sound_lower(self) -> bool:
        """Whether ``value`` may be used as a proven lower bound on ``gamma`` (kind exact or lower bound)."""
        return self.kind in ("exact", "lower bound")

    def __str__(self) -> str:
        where = "V" if self.U is None else f"U (|U| = {len(self.U)})"
        return f"gamma_{{{where}, k={self.k}}}: {self.value:.6g} [{self.kind}; method {self.method}]"


#: Added to the note of a sampled or greedy-path estimate of a function declared ``monotone=False``.
NON_MONOTONE_NOTE = ("F is declared monotone=False: gamma and its greedy guarantee are defined for monotone F only, "
                     "so this number can only refute (a value below 1 shows that F is not submodular); ")


def _ratio_array(numer: np.ndarray, denom: np.ndarray, atol: float) -> np.ndarray:
    """Ratios with the conventions ``0/0 := 1`` and ``x/0 := +inf`` (``|.| <= atol`` counts as 0)."""
    zero_d = denom <= atol
    zero_n = numer <= atol
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(zero_d, np.where(zero_n, 1.0, np.inf), numer / np.where(zero_d, 1.0, denom))
    return r


def _exact_pairs(n: int, u_size: int, k: int) -> int:
    return sum(math.comb(u_size, l_) * sum(math.comb(n - l_, s) for s in range(1, k + 1))
               for l_ in range(u_size + 1))


def exact_ratio_from_table(table: ValueTable, L_masks: np.ndarray, k: int, rtol: float = 1e-9
                           ) -> tuple[float, tuple[np.ndarray, np.ndarray] | None, int]:
    """``min`` of the ratio over ``L`` in ``L_masks`` and ``1 <= |S| <= k`` from a value table.

    Returns the minimum, the witness ``(L, S)`` (``None`` if no pair exists) and the number of pairs.
    """
    n = table.n
    vals = table.values
    all_masks = np.arange(1 << n, dtype=np.int64)
    pc = popcount(all_masks)
    S_masks = all_masks[(pc >= 1) & (pc <= k)]
    S_bits = bit_matrix(S_masks, n).astype(np.float64)
    atol = zero_tolerance(table.f, float(np.nanmax(np.abs(vals))), rtol)
    mono_tol = monotone_tolerance(table.f, float(np.nanmax(np.abs(vals))), rtol)
    best, witness, pairs = math.inf, None, 0
    singles = 1 << np.arange(n, dtype=np.int64)
    for L in np.asarray(L_masks, dtype=np.int64):
        ok = (S_masks & L) == 0
        if not ok.any():
            continue
        S = S_masks[ok]
        g = vals[L | singles] - vals[L]
        g[(L >> np.arange(n)) & 1 == 1] = 0.0
        # F is monotone up to mono_tol (checked below), so a negative gain is rounding of a zero gain
        numer = S_bits[ok] @ np.maximum(g, 0.0)
        denom = vals[L | S] - vals[L]
        if np.isnan(denom).any() or np.isnan(g).any():
            raise RuntimeError("internal error: the value table misses a set the ratio needs.")
        if denom.min() < -mono_tol:
            i = int(np.argmin(denom))
            hint = (f" Least squares is monotone, and this drop exceeds the rounding bound {mono_tol:.3g} "
                    "(verification.ratio.monotone_tolerance), which nearly collinear columns can still do. Pass a "
                    "ridge (e.g. ridge=1e-6 * the largest squared column norm) or remove near-duplicate columns."
                    if is_regression(table.f) else "")
            raise ValueError(f"F is not monotone: F(S|L) = {denom[i]:.3g} < 0 at L = {members(int(L), n).tolist()}"
                             f", S = {members(int(S[i]), n).tolist()}. The submodularity ratio (and its greedy "
                             f"guarantee) is defined for monotone functions only.{hint}")
        r = _ratio_array(numer, denom, atol)
        pairs += S.size
        i = int(np.argmin(r))
        if r[i] < best:
            best, witness = float(r[i]), (members(int(L), n), members(int(S[i]), n))
    return best, witness, pairs


#: For least squares, values within this multiple of ``eps * ||Y||^2`` of zero are rounding (F is computed from
#: quantities of the size of ``||Y||^2``). A relative threshold would zero real gains: they can be far below
#: ``1e-9 * max F`` (columns scaled over many orders of magnitude) or ``1e-9 * ||Y||^2`` (most of ``Y`` outside the
#: span of the columns), and zeroed gains make a ratio look like ``0/0 := 1``, i.e. too large to be "exact".
ROUNDING_FLOOR = 64 * np.finfo(np.float64).eps


def zero_tolerance(f: object, scale: float, rtol: float) -> float:
    """Absolute threshold below which a value or gain of ``f`` counts as 0: for least squares
    ``ROUNDING_FLOOR * ||Y||^2``, for other functions ``rtol * scale`` (``scale`` = the largest ``|F|`` at hand)."""
    if is_regression(f):
        return ROUNDING_FLOOR * max(float(f.y_norm2), np.finfo(float).tiny)
    return rtol * max(abs(float(scale)), np.finfo(float).tiny)


def monotone_tolerance(f: object, scale: float, rtol: float) -> float:
    """Largest drop ``F(T) - F(T + j)`` that the monotonicity checks read as rounding, not as a non-monotone ``F``.

    For a function other than least squares this is :func:`zero_tolerance` (``rtol * scale``): a user function
    that decreases by more is refused. Least squares is monotone, so a drop can only be rounding, and its rounding
    is larger than ``ROUNDING_FLOOR * ||Y||^2``: :class:`submod.SparseRegression` documents gains accurate to about
    ``eps * k * ||Y||^2 * (G_jj / residual_jj)``. A column is used only while ``residual_jj > tol * (G_jj +
    ridge)``, and ``residual_jj >= lambda_min * (G_jj + ridge)`` with ``lambda_min`` the smallest eigenvalue of
    the column-normalised ``G + ridge I`` over its live columns (Schur complement and interlacing), so the
    amplification is at most ``1 / max(tol, lambda_min)``. The bound is ``eps * d * ||Y||^2 / max(tol,
    lambda_min)`` with ``d`` the number of columns (no set has more), and never below :func:`zero_tolerance`.
    With fewer samples than columns ``lambda_min = 0`` and the bound is ``eps * d * ||Y||^2 / tol`` (about
    ``2e-6 * d * ||Y||^2`` at the default ``tol = 1e-10``): the drops of ``1e-12 * ||Y||^2`` seen once ``F``
    has reached the rank are far inside it.
    """
    base = zero_tolerance(f, scale, rtol)
    if not is_regression(f):
        return base
    G, _, ridge = regression_stats(f)
    diag = np.diag(G) + ridge
    live = diag > 0  # all-zero columns are dropped with gain exactly 0
    if not live.any():
        return base
    scale_ = 1.0 / np.sqrt(diag[live])
    C = (G[np.ix_(live, live)] + ridge * np.eye(int(live.sum()))) * scale_[:, None] * scale_[None, :]
    lam = lambda_min(C)
    amplification = 1.0 / max(float(f.tol), lam)
    eps = float(np.finfo(np.float64).eps)
    return max(base, eps * G.shape[0] * max(float(f.y_norm2), np.finfo(float).tiny) * amplification)


def is_regression(f: object) -> bool:
    """Whether ``f`` is a :class:`submod.SparseRegression`."""
    from submod.sparse_regression import SparseRegression

    return isinstance(f, SparseRegression)


def regression_stats(f: SetFunction) -> tuple[np.ndarray, list[np.ndarray], float]:
    """``(G, groups, ridge)`` of a :class:`submod.SparseRegression` (``G`` centred when it fits an intercept).

    Raises a clear ``ValueError`` for any other function.
    """
    if not is_regression(f):
        raise ValueError(f"the spectral bound needs a submod.SparseRegression (a least-squares objective); got "
                         f"{type(f).__name__}. For a small ground set use method='exact'; otherwise "
                         "method='sampled' gives an upper bound (falsification only).")
    G = np.asarray(f.gram, dtype=np.float64)
    return G, [np.asarray(g, dtype=np.int64) for g in f.groups], float(f.ridge)


def _check_U(U: ArrayLike | None, n: int) -> np.ndarray | None:
    if U is None:
        return None
    if isinstance(U, (int, np.integer)):
        raise ValueError(f"U must be a set of indices (a list or array of int); got {U!r}. Pass [{U!r}] for the set "
                         "holding that one element, [] for the empty set, or None for the whole ground set.")
    return np.sort(as_index_array(U, n, "U"))


def submodularity_ratio(f: SetFunction, k: int, U: ArrayLike | None = None, *, method: str = "exact",
                        n_samples: int = 1000, seed: int | np.random.Generator | None = None,
                        comparator: ArrayLike | None = None, result: submod.SelectionResult | None = None,
                        max_pairs: int = DEFAULT_MAX_PAIRS, max_subsets: int = 20000,
                        rtol: float = 1e-9) -> RatioEstimate:
    r"""Compute, bound or estimate the submodularity ratio ``gamma_{U,k}`` of ``f``.

    Parameters
    ----------
    f : submod.SetFunction
        A normalised monotone set function.
    k : int
        Largest size of ``S`` (``0 <= k <= n``). For ``k = 0`` the only ``S`` is the empty set, whose ratio is
        ``0/0 := 1``: every method answers ``1.0`` of kind ``"exact"`` without evaluating ``f``.
    U : array of int, optional
        The set ``L`` ranges over (its subsets); default the whole ground set. For the greedy guarantee use the
        greedy set; for a certificate, a set containing every prefix it uses.
    method : {"exact", "sampled", "spectral", "greedy-path"}, default "exact"
        * ``"exact"``: enumerate every pair from a memoised table of values (kind ``"exact"``). Refuses when
          ``n > 20`` or when there are more than ``max_pairs`` pairs.
        * ``"sampled"``: ``n_samples`` random pairs (``L`` a uniform random subset of ``U``, ``S`` of uniform
          random size ``1..k`` outside ``L``); the minimum is a proven UPPER bound (kind ``"upper bound"``).
        * ``"spectral"``: for :class:`submod.SparseRegression` only, the proven LOWER bound
          ``min_{|S|=k} lambda_min(C_{U u S})`` of the block-whitened Gram (the normalised Gram
          ``D^-1/2 G D^-1/2`` for one-column units, with ``G + ridge I`` under a ridge), enumerating the
          ``S`` when there are at most ``max_subsets`` of them and otherwise using the full ``lambda_min(C)``;
          independent of the targets (Das & Kempe 2011).
        * ``"greedy-path"``: the exact ratios at ``L = S_t`` (greedy prefixes, from ``result`` or a fresh greedy
          run of ``k`` steps) toward ``S = comparator \ S_t`` (default: every element); their minimum is an
          UPPER bound on ``gamma_{S_k, k'}`` with ``k' = max(k, max_t |comparator \ S_t|)`` (pass an optimal
          ``k``-set, or any ``k``-set, as comparator to bound ``gamma_{S_k, k}`` itself). Also reports the stale-bound
          violations of plain lazy greedy as an upper bound on the diminishing-returns ratio.
    n_samples : int, default 1000
        Number of pairs for ``"sampled"``.
    seed : int or numpy Generator, optional
        Randomness of ``"sampled"``.
    comparator : array of int, optional
        ``T`` for ``"greedy-path"``.
    result : submod.SelectionResult, optional
        The greedy run for ``"greedy-path"`` (a lazy run also contributes its violations).
    max_pairs : int, default 2_000_000
        Size limit of ``"exact"``.
    max_subsets : int, default 20000
        Enumeration limit of ``"spectral"``.
    rtol : float, default 1e-9
        Values within ``rtol * max |F|`` of zero count as zero (for ``0/0 := 1``). For least squares
        (:class:`submod.SparseRegression`) the threshold is instead ``64 eps ||Y||^2``, the rounding of values
        computed from quantities of size ``||Y||^2``: real gains can lie far below ``rtol * max |F|``.

    Returns
    -------
    RatioEstimate

    References
    ----------
    Das & Kempe, "Submodular meets spectral", ICML 2011 / JMLR 2018; Elenberg et al., Ann. Stat. 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import submod, verification as vf
    >>> f = submod.Modular([1.0, 2.0, 3.0])
    >>> r = vf.submodularity_ratio(f, 2)
    >>> r.value, r.kind
    (1.0, 'exact')
    >>> g = submod.from_callable(lambda S: float(len(S) ** 2), n=4)   # supermodular
    >>> round(vf.submodularity_ratio(g, 2).value, 6)
    0.5
    """
    if not isinstance(f, SetFunction):
        raise ValueError(f"f must be a submod.SetFunction; got {type(f).__name__}. Wrap a value oracle with "
                         "submod.from_callable(value, n).")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    kk = check_k(k, f.n)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be a number in [0, 1) (relative zero threshold); got {rtol!r}. The default 1e-9 "
                         "suits float64 values.")
    rtol = float(rtol)
    Uarr = _check_U(U, f.n)
    if method == "greedy-path" and Uarr is not None:
        raise ValueError("method='greedy-path' bounds the ratio at the greedy run's own prefixes (U = the greedy set); "
                         "it does not take U. Pass result= (a run) and comparator= instead, or use 'exact', "
                         "'sampled' or 'spectral' for a given U.")
    if kk == 0:
        # the only S with |S| <= 0 is the empty set: 0/0 := 1 for every L, whatever F and the method
        return RatioEstimate(value=1.0, kind="exact", method=method, k=0, U=None if Uarr is None else
                             tuple(Uarr.tolist()), parameters={"rtol": rtol, "note": "k = 0: the only S is the empty "
                                                               "set, whose ratio is 0/0 := 1"},
                             cost={"gain_evaluations": 0, "seconds": 0.0})
    if method == "exact":
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
            raise ValueError(f"max_pairs must be a positive integer (the most (L, S) pairs 'exact' may enumerate; "
                             f"default {DEFAULT_MAX_PAIRS:,}); got {max_pairs!r}.")
        return _exact(f, kk, Uarr, max_pairs, rtol)
    if method == "sampled":
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
        return _sampled(f, kk, Uarr, int(n_samples), rng_from_seed(seed), rtol)
    if method == "spectral":
        if isinstance(max_subsets, bool) or not isinstance(max_subsets, (int, np.integer)) or max_subsets < 0:
            raise ValueError(f"max_subsets must be a non-negative integer; got {max_subsets!r}.")
        return _spectral(f, kk, Uarr, max_subsets)
    if result is not None and not isinstance(result, submod.SelectionResult):
        raise ValueError(f"result must be the submod.SelectionResult of a greedy run (submod.maximize(f, k)); got "
                         f"{type(result).__name__}.")
    return _greedy_path(f, kk, comparator, result, rtol)


def _exact(f: SetFunction, k: int, U: np.ndarray | None, max_pairs: int, rtol: float) -> RatioEstimate:
    n = f.n
    u_size = n if U is None else U.size
    pairs = _exact_pairs(n, u_size, k)
    if n > MAX_TABLE_N or pairs > max_pairs:
        raise ValueError(f"exact enumeration would examine {pairs:,} (L, S) pairs (n = {n}, |U| = {u_size}, "
                         f"k = {k}); the limit is {max_pairs:,} pairs and n <= {MAX_TABLE_N}. Use "
                         "method='spectral' (a proven lower bound, least squares) or method='sampled' (an upper "
                         "bound), reduce U or k, or raise max_pairs if you can afford it.")
    start = time.perf_counter()
    inside = (1 << n) - 1 if U is None else mask_of(U)
    table = ValueTable(f, inside=inside, max_outside=k)
    value, witness, npairs = exact_ratio_from_table(table, _submasks(inside), k, rtol)
    return RatioEstimate(
        value=value, kind="exact", method="exact", k=k, U=None if U is None else tuple(U.tolist()),
        parameters={"rtol": rtol, "pairs": npairs,
                    "witness_L": None if witness is None else witness[0].tolist(),
                    "witness_S": None if witness is None else witness[1].tolist()},
        cost={"gain_evaluations": table.gain_evaluations, "state_updates": table.state_updates,
              "seconds": time.perf_counter() - start})


def _submasks(mask: int) -> np.ndarray:
    """Every submask of ``mask`` (including 0 and ``mask``)."""
    bits = [1 << j for j in range(mask.bit_length()) if mask >> j & 1]
    out = np.zeros(1, dtype=np.int64)
    for b in bits:
        out = np.concatenate([out, out | b])
    return out


def _sampled(f: SetFunction, k: int, U: np.ndarray | None, n_samples: int, rng: np.random.Generator,
             rtol: float) -> RatioEstimate:
    start = time.perf_counter()
    n = f.n
    pool = np.arange(n) if U is None else U
    # One tolerance for all pairs, from F(V) = max F (monotone): at least the exact method's, so a pair that
    # "exact" resolves as 0/0 is never read here as a tiny ratio below the exact minimum.
    atol = zero_tolerance(f, float(f.value(np.arange(n))), rtol)
    mono_tol = monotone_tolerance(f, float(f.value(np.arange(n))), rtol) if f.monotone else math.inf
    best, witness = math.inf, None
    gain_evals, updates = 0, n
    for _ in range(n_samples):
        L = pool[rng.random(pool.size) < 0.5]
        rest = np.setdiff1d(np.arange(n), L)
        if rest.size == 0:
            continue
        s = int(rng.integers(1, min(k, rest.size) + 1))
        S = rng.choice(rest, size=s, replace=False)
        state = f.init_state()
        for j in L:
            state.add(int(j))
        base = float(state.value)
        g = np.asarray(state.gains(S), dtype=np.float64)
        for j in S:
            state.add(int(j))
        updates += L.size + S.size
        gain_evals += S.size
        drop = float(state.value) - base
        if drop < -mono_tol:  # a pair that refutes the declaration: the exact method refuses it too
            raise ValueError(f"F is declared monotone but is not: F(S|L) = {drop:.3g} < 0 at L = "
                             f"{np.sort(L).tolist()}, S = {np.sort(S).tolist()} (a sampled pair). The submodularity "
                             "ratio (and its greedy guarantee) is defined for monotone functions only; if F can "
                             "decrease, declare it monotone=False.")
        r = float(_ratio_array(np.array([g.sum()]), np.array([drop]), atol)[0])
        if r < best:
            best, witness = r, (np.sort(L), np.sort(S))
    value = min(best, 1.0) if math.isfinite(best) else 1.0
    return RatioEstimate(
        value=value, kind="upper bound", method="sampled", k=k, U=None if U is None else tuple(U.tolist()),
        parameters={"n_samples": n_samples, "rtol": rtol,
                    "witness_L": None if witness is None else witness[0].tolist(),
                    "witness_S": None if witness is None else witness[1].tolist(),
                    "note": ("" if f.monotone else NON_MONOTONE_NOTE)
                    + "minimum over random pairs (capped at 1, the ratio of any singleton S): an upper bound on "
                      "gamma, never usable in a guarantee"},
        cost={"gain_evaluations": gain_evals, "state_updates": updates, "seconds": time.perf_counter() - start})


def _spectral(f: SetFunction, k: int, U: np.ndarray | None, max_subsets: int) -> RatioEstimate:
    start = time.perf_counter()
    G, groups, ridge = regression_stats(f)
    C, unit_cols, dead = whitened_gram(G, groups, ridge, tol=f.tol)
    n = len(groups)
    base = np.arange(n) if U is None else U
    count = n_unit_subsets(n - base.size, k)
    value, enumerated, examined = sparse_lambda_min(C, unit_cols, k, containing=base, max_subsets=max_subsets)
    value = float(min(max(value, 0.0), 1.0))
    how = ("min over every S of k units outside U of lambda_min(C_{U u S})" if enumerated else
           f"full lambda_min(C) (the {count:,} restricted submatrices exceed max_subsets = {max_subsets:,})")
    return RatioEstimate(
        value=value, kind="lower bound", method="spectral", k=k, U=None if U is None else tuple(U.tolist()),
        parameters={"bound": how, "enumerated": enumerated, "ridge": ridge, "whitened_columns": C.shape[0],
                    "dead_units": dead, "max_subsets": max_subsets,
                    "note": "sound for least squares (Das & Kempe 2011), block-whitened Gram for column groups"},
        cost={"eigen_problems": examined, "seconds": time.perf_counter() - start})


def _greedy_path(f: SetFunction, k: int, comparator: ArrayLike | None, result: submod.SelectionResult | None,
                 rtol: float) -> RatioEstimate:
    start = time.perf_counter()
    n = f.n
    T = np.arange(n) if comparator is None else np.unique(as_index_array(comparator, n, "comparator"))
    if result is None:
        result = submod.maximize(f, k, method="greedy")
    sel = np.asarray(result.selected, dtype=np.int64)
    ratios, sizes, updates, gain_evals = path_ratios(f, sel, T, rtol)
    # An upper bound on gamma_{S_k, k'} is one on gamma_{S_k, k} too when k' <= k (gamma decreases in k).
    k_prime = max(k, int(sizes.max(initial=0)))
    violations = list(result.violations)
    if not violations and not f.submodular:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lazy = submod.maximize(f, sel.size, method="lazy", lazy_fallback=False)
        violations = list(lazy.violations)
        gain_evals += lazy.n_evaluations
    dr = [stale / fresh for (_, _, stale, fresh) in violations if fresh > 0]
    finite = ratios[np.isfinite(ratios)]
    value = float(min(1.0, finite.min())) if finite.size else 1.0
    return RatioEstimate(
        value=value, kind="upper bound", method="greedy-path", k=k_prime, U=tuple(sel.tolist()),
        parameters={"comparator": None if comparator is None else T.tolist(), "rtol": rtol,
                    "note": ("" if f.monotone else NON_MONOTONE_NOTE)
                    + "exact ratios at the pairs (L = S_t, S = T \\ S_t) of a greedy run: their minimum is an upper "
                      "bound on gamma_{S_k, k'} with k' = max(k, max_t |T \\ S_t|)"},
        cost={"gain_evaluations": gain_evals, "state_updates": updates, "seconds": time.perf_counter() - start},
        details={"path_ratios": ratios, "sizes": sizes, "violations": violations,
                 "dr_ratio_upper": float(min(dr)) if dr else None,
                 "dr_note": "min stale/fresh over stale-bound violations: an upper bound on the diminishing-"
                            "returns ratio (None: no violation seen)"})


def path_ratios(f: SetFunction, selected: np.ndarray, T: np.ndarray, rtol: float = 1e-9
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Exact ratios ``sum_{j in T \\ S_t} F(j|S_t) / F(T \\ S_t | S_t)`` for every prefix ``S_t`` of ``selected``.

    Returns ``(ratios, sizes, state_updates, gain_evaluations)`` with ``sizes[t] = |T \\ S_t|``; one entry per
    prefix ``t = 0..len(selected) - 1`` (the prefixes greedy chose a next element from). ``F(T u S_t)`` is kept
    in a second state that starts at ``T`` and only grows when greedy picks outside ``T``.
    """
    n = f.n
    in_T = np.zeros(n, dtype=bool)
    in_T[T] = True
    state, probe = f.init_state(), f.init_state()
    for j in T:
        probe.add(int(j))
    updates, gain_evals = T.size, 0
    sizes, numers, denoms = [], [], []
    for t in range(selected.size):
        rest = np.flatnonzero(in_T & ~state._in_set)
        sizes.append(rest.size)
        g = np.asarray(state.gains(rest), dtype=np.float64) if rest.size else np.zeros(0)
        gain_evals += rest.size
        numers.append(float(g.sum()))
        denoms.append(float(probe.value) - float(state.value))
        j = int(selected[t])
        state.add(j)
        if not in_T[j]:
            probe.add(j)
            updates += 1
        updates += 1
    atol = zero_tolerance(f, float(probe.value), rtol)
    ratios = _ratio_array(np.array(numers), np.array(denoms), atol) if numers else np.zeros(0)
    sizes_arr = np.array(sizes, dtype=np.int64)
    # with one element left, numerator and denominator are the same gain F(j|S_t) computed by two routes: the
    # ratio is exactly 1 (0/0 := 1 included), whereas their rounding errors can give anything when it is tiny
    ratios[sizes_arr == 1] = 1.0
    return ratios, sizes_arr, updates, gain_evals
