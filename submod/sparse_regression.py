r"""Sparse multi-output least-squares regression as a (weakly submodular) set function.

For a design ``A`` (N x p) and targets ``Y`` (N x m), the units of the ground set are groups of columns of ``A``
(one column for a neuron, ``kh * kw`` columns for a convolution channel, ``head_dim`` columns for an attention
head) and

.. math::  F(S) = \|Y\|^2 - \min_M \|Y - A_S M\|^2 = \operatorname{tr}(B_S^T G_{SS}^{-1} B_S),
           \qquad G = A^T A,\ B = A^T Y,

where ``A_S`` holds the columns of the units in ``S``. ``F`` is normalised, monotone and weakly submodular but
*not* submodular (Das & Kempe, ICML 2011; Elenberg et al., Ann. Stat. 2018). Ridge replaces ``G_SS`` by
``G_SS + ridge I`` (the augmented design ``[A; sqrt(ridge) I]``, ``[Y; 0]``); an intercept centres ``A`` and ``Y``
and refits the bias from the means (the bias is not penalised).

Everything is computed from the sufficient statistics ``(G, B, ||Y||^2)`` (plus means and count for the
intercept), which :class:`GramAccumulator` streams in float64 from batches of rows. Greedy selection is forward
regression with exact gains, computed for all candidates at once by incremental, blocked Gram-Schmidt updates in
Gram space (see :mod:`submod._sr_kernels`).
"""

from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from scipy.linalg import blas, lapack

from ._sr_kernels import (
    ForwardRegressionState,
    Problem,
    factor_in_order,
    inplace,
    solve_factored,
)
from ._sr_threads import one_blas_thread
from ._validation import as_float_array, as_index_array, check_k, frozen, width_message
from .base import GainState, SetFunction
from .constraints import PartitionMatroid

if TYPE_CHECKING:
    import torch

__all__ = ["GramAccumulator", "RegressionPath", "SparseRegression"]

#: Non-zero columns of A or Y whose largest magnitude is below this are refused: their squares underflow float64.
_UNDERFLOW = 1e-150

#: Default relative tolerance: a column whose squared residual norm is ``<= tol * (G_jj + ridge)`` is degenerate.
DEFAULT_TOL = 1e-10


# ---------------------------------------------------------------------------------------------- validation helpers
def _check_ridge(ridge: object) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise ValueError(f"ridge must be a non-negative real number; got {ridge!r}.")
    r = float(ridge)
    if not np.isfinite(r) or r < 0:
        raise ValueError(f"ridge must be finite and >= 0 (it is the weight of the penalty ridge * ||M||^2); got "
                         f"{ridge!r}. Pass ridge=0.0 for ordinary least squares.")
    return r


#: Relative tolerance of the positive-semidefiniteness check of :meth:`SparseRegression.from_gram`, per sqrt(p):
#: float32 rounding of a Gram matrix moves the eigenvalues of its correlation matrix ``D^-1/2 G D^-1/2`` by about
#: ``sqrt(p) * 2^-23`` (measured up to 3.3 times that on rank-deficient ReLU-like activations with a large mean,
#: p = 1024 to 3072, float32 products and float32 sums of batch Grams); the check allows 32 times that.
_PSD_TOL_PER_SQRT_P = 32 * 2.0 ** -23
#: A floor of the same check, relative to the largest entry of G: what a zero column (a dead unit) and a diagonal
#: entry within rounding of 0 (``from_gram`` lets a diagonal down to ``-1e-12`` of the largest entry through as
#: rounding, counted here as 0) need to factorise. Columns whose squared norm is more than about ``1e-14 / tol``
#: of the largest are checked at their own scale.
_PSD_FLOOR = 1e-14


def _check_psd(g: np.ndarray) -> None:
    """Refuse a symmetric ``g`` that is not positive semidefinite up to rounding (a Gram matrix ``A^T A`` is).

    With ``diag(g)`` clipped at 0, ``g + diag(tol * diag(g) + floor)`` must have a Cholesky factor, where
    ``tol = 32 sqrt(p) 2^-23`` and ``floor = 1e-14 max|g|`` (``max|g| = max(diag(g))`` for a PSD ``g``). For columns
    well above the floor this is ``lambda_min(D^-1/2 g D^-1/2) >= -tol``, the smallest eigenvalue of the correlation
    matrix: the check is invariant to the scale of ``g`` and (above the floor) of each column, and lets the rounding
    of a float32-accumulated Gram through. One Cholesky (``p^3 / 3`` flops, a tenth of an eigenvalue decomposition)
    and one ``p x p`` copy.
    """
    p = g.shape[0]
    diag = np.maximum(np.diag(g), 0.0)
    top = float(np.abs(g).max(initial=0.0))   # the largest diagonal entry when g is PSD
    if top == 0.0:
        return
    m = g.copy()
    m[np.diag_indices(p)] = diag * (1.0 + _PSD_TOL_PER_SQRT_P * np.sqrt(p)) + _PSD_FLOOR * top
    _, info = lapack.dpotrf(m, lower=1, clean=0, overwrite_a=1)
    if info > 0:
        raise ValueError(f"G is not positive semidefinite (its leading {info} x {info} block is not, beyond float32 "
                         "rounding); a Gram matrix A^T A is. Check that G = A^T A over the same rows as B and "
                         "y_norm2 (a sum of per-batch Grams is one; a matrix of pairwise estimates, e.g. with "
                         "missing values, need not be), or build the objective with GramAccumulator.")


def _check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0.0 <= float(tol) < 1.0):
        raise ValueError(f"tol must be a real number in [0, 1); got {tol!r}. The default {DEFAULT_TOL} suits "
                         "float64 statistics.")
    return float(tol)


def _check_groups(groups: object, p: int) -> list[np.ndarray]:
    """Return the units as a list of int64 column arrays that partition ``range(p)``."""
    if groups is None:
        return [np.array([j], dtype=np.int64) for j in range(p)]
    if isinstance(groups, numbers.Integral) and not isinstance(groups, bool):
        s = int(groups)
        if s <= 0:
            raise ValueError(f"groups={s}: an int is the block size (consecutive blocks of that many columns form one "
                             f"unit), so it must be a positive divisor of the {p} columns; pass e.g. groups=1 or None "
                             "for one unit per column.")
        if p % s:
            raise ValueError(f"groups={s} asks for consecutive blocks of {s} columns, but the design has {p} "
                             f"columns, not a positive multiple of {s}. Pass a list of column-index lists instead.")
        return [np.arange(u * s, (u + 1) * s, dtype=np.int64) for u in range(p // s)]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise ValueError(f"groups must be None, an int (block size) or a sequence of column-index sequences; got "
                         f"{type(groups).__name__}.")
    out: list[np.ndarray] = []
    owner = np.full(p, -1, dtype=np.int64)
    for u, g in enumerate(groups):
        if isinstance(g, (numbers.Integral, np.integer)):
            raise ValueError(f"groups[{u}] is the single integer {g!r}; each unit must be a sequence of column "
                             f"indices, e.g. [[0, 1], [2]] (use [[j] for j in range(p)] for single columns).")
        try:
            arr = np.asarray(list(g) if not isinstance(g, np.ndarray) else g)
        except TypeError as exc:
            raise ValueError(f"groups[{u}] must be a sequence of column indices; got {g!r}.") from exc
        arr = arr.ravel()
        if arr.size == 0:
            raise ValueError(f"groups[{u}] is empty; every unit needs at least one column. Remove it.")
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                     or (np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0))):
            raise ValueError(f"groups[{u}] must hold integer column indices; got dtype {arr.dtype}.")
        arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() >= p:
            raise ValueError(f"groups[{u}] holds column index {int(arr.min() if arr.min() < 0 else arr.max())} "
                             f"outside [0, {p}); the design has {p} columns.")
        if np.unique(arr).size != arr.size:
            raise ValueError(f"groups[{u}] repeats a column; list each column once.")
        taken = owner[arr] >= 0
        if taken.any():
            c = int(arr[np.argmax(taken)])
            raise ValueError(f"groups overlap: column {c} is in groups[{int(owner[c])}] and groups[{u}]. Units "
                             "must be disjoint; assign each column to exactly one group.")
        owner[arr] = u
        out.append(arr)
    if not out:
        raise ValueError("groups is empty; pass None for one unit per column.")
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise ValueError(f"groups do not cover columns {missing[:10].tolist()}{' ...' if missing.size > 10 else ''} "
                         f"({missing.size} of {p}). Every column must belong to a unit: add them as their own "
                         "groups, or drop them from the design.")
    return out


def _as_targets(Y: ArrayLike, name: str) -> np.ndarray:
    y = as_float_array(Y, name, (1, 2))
    return y[:, None] if y.ndim == 1 else y


# ---------------------------------------------------------------------------------------------- the objective
class SparseRegression(SetFunction):
    r"""Explained target energy of least squares on a subset of column groups.

    ``F(S) = ||Y||^2 - min_{M, b} ||Y - A_S M - 1 b^T||^2 - ridge ||M||^2`` (the bias ``b`` only with
    ``fit_intercept``), i.e. ``tr(B_S^T (G_SS + ridge I)^{-1} B_S)`` with centred statistics when fitting an
    intercept. Monotone and weakly submodular, not submodular (``submodular = False``).

    Parameters
    ----------
    A : array_like, shape (N, p)
        Design (e.g. the inputs of the consumer layer, one row per sample or sample x position).
    Y : array_like, shape (N, m) or (N,)
        Targets. They may come from another source than ``A`` (asymmetric pruning: ``A`` from the pruned network,
        ``Y`` from the original one).
    ridge : float, default 0.0
        Ridge penalty ``ridge * ||M||^2`` (never on the bias); equals least squares on the augmented design.
    groups : None, int, or sequence of sequences of int
        Units: ``None`` for one unit per column, an int ``s`` for consecutive blocks of ``s`` columns, or a list of
        disjoint column-index lists covering all ``p`` columns.
    fit_intercept : bool, default False
        Fit an unpenalised bias: centre ``A`` and ``Y``; ``y_norm2`` is then the centred target energy.
    tol : float, default 1e-10
        Relative tolerance for degenerate columns (see Notes).

    Attributes
    ----------
    n : int
        Number of units.
    n_features, n_targets : int
        ``p`` and ``m``.
    y_norm2 : float
        Total target energy ``||Y||^2`` (centred with an intercept): ``F(S) <= y_norm2``.
    groups : list of int arrays
        The columns of each unit.

    Notes
    -----
    *Degenerate columns.* When the units of ``S`` are added in order, a column whose squared residual norm on the
    columns before it is ``<= tol * (G_jj + ridge)`` (all-zero, duplicate, in the span of earlier columns, or past
    the rank when ``N < p``) brings no new direction: it contributes exactly 0 to gains and values and gets weight
    0 in :meth:`refit` (a basic solution, not the minimum-norm one; the fitted values ``A_S M`` equal those of
    ``numpy.linalg.lstsq``). A unit made only of degenerate columns has gain exactly 0, so it is never picked ahead
    of a unit with a positive gain; :meth:`greedy_path` picks it only when no non-degenerate unit remains.

    *Accuracy.* Gains are exact up to float64 rounding in Gram space: the absolute error is about
    ``eps * k * ||Y||^2 * (G_jj / residual_jj)``, so a column that is nearly (but not within ``tol``) collinear
    with the selected ones has a less accurate gain, as with any normal-equations method.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((200, 6))
    >>> Y = A[:, [1, 4]] @ np.array([[2.0, 0.0], [1.0, -1.0]])
    >>> f = SparseRegression(A, Y)
    >>> path = f.greedy_path(2)
    >>> sorted(path.selected.tolist())
    [1, 4]
    >>> float(path.relative_errors[-1]) < 1e-12
    True
    >>> M, bias = f.refit([1, 4])
    >>> np.round(M, 6) + 0.0
    array([[ 2.,  0.],
           [ 1., -1.]])
    """

    submodular = False
    monotone = True

    def __init__(self, A: ArrayLike, Y: ArrayLike, ridge: float = 0.0, groups: object = None,
                 fit_intercept: bool = False, *, tol: float = DEFAULT_TOL) -> None:
        a = as_float_array(A, "A", 2)
        y = _as_targets(Y, "Y")
        if a.shape[0] != y.shape[0]:
            raise ValueError(f"A has {a.shape[0]} rows but Y has {y.shape[0]}; pass one target row per design row.")
        if a.shape[0] == 0 or a.shape[1] == 0 or y.shape[1] == 0:
            raise ValueError(f"A (shape {a.shape}) and Y (shape {y.shape}) must have at least one row and column.")
        for name, arr in (("A", a), ("Y", y)):
            colmax = np.abs(arr).max(axis=0)
            tiny = np.flatnonzero((colmax > 0) & (colmax < _UNDERFLOW))
            if tiny.size:
                raise ValueError(f"{name} column {int(tiny[0])} (and {tiny.size - 1} more) has values below "
                                 f"{_UNDERFLOW:g} in magnitude: their squares underflow float64 and the statistics "
                                 f"lose all precision. Rescale {name} (columns may be scaled one by one: F depends "
                                 "only on the span of A's columns).")
        count = a.shape[0]
        mean_a = a.mean(axis=0)
        mean_y = y.mean(axis=0)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as a ValueError by _setup
            if fit_intercept:
                ac = a - mean_a
                yc = y - mean_y
                gram, cross, y_norm2 = ac.T @ ac, ac.T @ yc, float(np.vdot(yc, yc))
            else:
                gram, cross, y_norm2 = a.T @ a, a.T @ y, float(np.vdot(y, y))
        self._setup(gram, cross, y_norm2, ridge, groups, bool(fit_intercept), mean_a, mean_y, count, tol)

    @classmethod
    def from_gram(cls, G: ArrayLike, B: ArrayLike, y_norm2: float, *, ridge: float = 0.0, groups: object = None,
                  fit_intercept: bool = False, mean_a: ArrayLike | None = None, mean_y: ArrayLike | None = None,
                  count: int | None = None, tol: float = DEFAULT_TOL) -> SparseRegression:
        r"""Build the objective from raw sufficient statistics.

        Parameters
        ----------
        G : array_like, shape (p, p)
            ``A^T A`` (raw, uncentred), symmetric positive semi-definite. Both are checked, up to rounding, relative
            to the scale of ``G`` and of each column: an asymmetric or indefinite ``G`` is refused, a Gram
            accumulated in float32 is accepted (the smallest eigenvalue of the correlation matrix
            ``D^-1/2 G D^-1/2`` may be as low as ``-32 sqrt(p) 2^-23``). The check is one Cholesky factorisation of
            ``G`` (``p^3 / 3`` flops).
        B : array_like, shape (p, m) or (p,)
            ``A^T Y``.
        y_norm2 : float
            ``||Y||^2`` (raw).
        ridge, groups, tol
            As in :class:`SparseRegression`.
        fit_intercept : bool, default False
            Centre the statistics with ``mean_a``, ``mean_y`` and ``count`` (all required then):
            ``G - count * mean_a mean_a^T`` etc. Centring raw sums loses digits when the means are large compared
            with the spread; :class:`GramAccumulator` keeps centred statistics and avoids this.
        mean_a, mean_y : array_like, optional
            Column means of ``A`` and ``Y``.
        count : int, optional
            Number of rows.

        Returns
        -------
        SparseRegression

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> A, Y = rng.standard_normal((50, 4)), rng.standard_normal((50, 2))
        >>> f = SparseRegression.from_gram(A.T @ A, A.T @ Y, float((Y ** 2).sum()))
        >>> bool(np.isclose(f.value([0, 2]), SparseRegression(A, Y).value([0, 2])))
        True
        """
        g = as_float_array(G, "G", 2)
        if g.shape[0] != g.shape[1] or g.shape[0] == 0:
            raise ValueError(f"G must be a square (p, p) Gram matrix A^T A; got shape {g.shape}.")
        p = g.shape[0]
        b = as_float_array(B, "B", (1, 2))
        b = b[:, None] if b.ndim == 1 else b
        if b.shape[0] != p or b.shape[1] == 0:
            raise ValueError(f"B must have shape ({p}, m) to match G ({p} x {p}); got {b.shape}. B is A^T Y.")
        y2 = as_float_array(y_norm2, "y_norm2")
        if y2.ndim != 0:
            raise ValueError(f"y_norm2 must be a scalar (the total energy ||Y||^2); got shape {y2.shape}.")
        y2 = float(y2)
        if y2 < 0:
            raise ValueError(f"y_norm2 = {y2} is negative; it must be ||Y||^2 >= 0 (a sum of squares).")
        scale = float(np.abs(g).max(initial=0.0))
        if np.abs(g - g.T).max(initial=0.0) > 1e-10 * max(scale, 1e-300):
            raise ValueError("G is not symmetric; a Gram matrix A^T A is. Pass (G + G.T) / 2 if the asymmetry is "
                             "rounding, or check that G = A^T A.")
        if np.diag(g).min() < -1e-12 * scale:
            raise ValueError("G has a negative diagonal entry, so it is not a Gram matrix A^T A (diagonal = squared "
                             "column norms). Check the statistics.")
        g = 0.5 * (g + g.T)
        _check_psd(g)
        ma = mb = None
        if mean_a is not None:
            ma = as_float_array(mean_a, "mean_a", 1)
            if ma.shape != (p,):
                raise ValueError(f"mean_a must have shape ({p},); got {ma.shape}.")
        if mean_y is not None:
            mb = as_float_array(mean_y, "mean_y", (0, 1)).reshape(-1)
            if mb.shape != (b.shape[1],):
                raise ValueError(f"mean_y must have shape ({b.shape[1]},) like the columns of B; got {mb.shape}.")
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count <= 0):
            raise ValueError(f"count must be a positive integer (the number of rows); got {count!r}.")
        if fit_intercept:
            if ma is None or mb is None or count is None:
                raise ValueError("fit_intercept=True needs mean_a, mean_y and count to centre the raw statistics; "
                                 "pass them, or build the objective with GramAccumulator.to_objective.")
            n = float(count)
            g = g - n * np.outer(ma, ma)
            b = b - n * np.outer(ma, mb)
            y2 = max(y2 - n * float(mb @ mb), 0.0)
        # Cauchy-Schwarz, per column: ||B_j||^2 <= G_jj ||Y||^2. A violation means mismatched statistics.
        lhs = np.einsum("ij,ij->i", b, b)
        rhs = np.maximum(np.diag(g), 0.0) * y2
        if np.any(lhs > rhs * (1 + 1e-8) + 1e-12 * max(float(lhs.max(initial=0.0)), 1e-300)):
            j = int(np.argmax(lhs - rhs))
            raise ValueError(f"inconsistent statistics: ||B[{j}]||^2 = {lhs[j]:.6g} exceeds G[{j},{j}] * y_norm2 = "
                             f"{rhs[j]:.6g}, impossible for G = A^T A, B = A^T Y, y_norm2 = ||Y||^2 (did you pass "
                             "||Y|| instead of its square, or statistics of different rows?).")
        obj = cls.__new__(cls)
        obj._setup(g, b, y2, ridge, groups, bool(fit_intercept), ma, mb, count, tol)
        return obj

    @classmethod
    def _from_centred(cls, gram: np.ndarray, cross: np.ndarray, y_norm2: float, *, ridge: float, groups: object,
                      mean_a: np.ndarray, mean_y: np.ndarray, count: int, tol: float) -> SparseRegression:
        obj = cls.__new__(cls)
        obj._setup(gram, cross, y_norm2, ridge, groups, True, mean_a, mean_y, count, tol)
        return obj

    def _setup(self, gram: np.ndarray, cross: np.ndarray, y_norm2: float, ridge: object, groups: object,
               fit_intercept: bool, mean_a: np.ndarray | None, mean_y: np.ndarray | None, count: int | None,
               tol: object) -> None:
        p = gram.shape[0]
        ridge = _check_ridge(ridge)
        tol = _check_tol(tol)
        units = _check_groups(groups, p)
        super().__init__(len(units))
        # Every caller passes a freshly computed gram; cross may be the caller's array: copy it (then both are
        # made read-only, so the objective's statistics cannot change under its states).
        gram = np.ascontiguousarray(gram, dtype=np.float64)
        cross = np.array(cross, dtype=np.float64, order="C", copy=True)
        if not (np.isfinite(gram).all() and np.isfinite(cross).all() and np.isfinite(y_norm2)):
            raise ValueError("the statistics A^T A, A^T Y or ||Y||^2 overflow float64: the values are too large "
                             "(beyond about 1e150). Rescale A and Y (e.g. divide by their largest magnitude); "
                             "the selection does not depend on the scale.")
        gram.flags.writeable = False
        cross.flags.writeable = False
        self._prob = Problem(gram, cross, float(y_norm2), ridge, units, tol)
        self.fit_intercept = fit_intercept
        self.mean_a = mean_a
        self.mean_y = mean_y
        self.count = count
        self._mode: str | None = None     # "h" / "b" to force a state representation (tests); None = automatic
        self._block: int | None = None   # columns per BLAS-3 block; None = automatic

    # ----------------------------------------------------------------------------------------- properties
    @property
    def n_features(self) -> int:
        """Number of columns ``p`` of the design."""
        return self._prob.p

    @property
    def n_targets(self) -> int:
        """Number of target columns ``m``."""
        return self._prob.m

    @property
    def y_norm2(self) -> float:
        """Total target energy ``||Y||^2`` (centred when ``fit_intercept``); ``F(S) <= y_norm2``."""
        return self._prob.y_norm2

    @property
    def ridge(self) -> float:
        """Ridge penalty."""
        return self._prob.ridge

    @property
    def tol(self) -> float:
        """Relative tolerance for degenerate columns."""
        return self._prob.tol

    @property
    def groups(self) -> list[np.ndarray]:
        """The columns of each unit (copies)."""
        return [g.copy() for g in self._prob.groups]

    @property
    def gram(self) -> np.ndarray:
        """The Gram matrix used (centred with an intercept, without the ridge); read-only."""
        return self._prob.gram

    @property
    def cross(self) -> np.ndarray:
        """The cross term ``A^T Y`` used (centred with an intercept); read-only."""
        return self._prob.cross

    def __repr__(self) -> str:
        return (f"SparseRegression(n={self.n}, n_features={self.n_features}, n_targets={self.n_targets}, "
                f"ridge={self.ridge}, fit_intercept={self.fit_intercept})")

    # ----------------------------------------------------------------------------------------- set function
    def init_state(self) -> GainState:
        """A fresh incremental state at the empty set; its ``gains()`` gives all exact gains in one call."""
        return ForwardRegressionState(self._prob, mode=self._mode, block=self._block)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> SparseRegression:
        """The same regression over the units ``indices`` only (see :meth:`SetFunction.restrict`).

        Exact: least squares on a subset of the candidate units needs only their block of the statistics, so the
        result holds ``G[cols, cols]`` and ``B[cols]`` for the columns ``cols`` of those units (with the same
        ``y_norm2``, ridge, intercept statistics and tolerance) and ``restrict(idx).value(S) == value(idx[S])``.
        ``local`` is ignored.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> A, y = rng.standard_normal((40, 6)), rng.standard_normal(40)
        >>> f = SparseRegression(A, y, groups=[[0, 1], [2], [3, 4], [5]])
        >>> g = f.restrict([3, 0])
        >>> g.n, g.n_features, bool(np.isclose(g.value([1, 0]), f.value([0, 3])))
        (2, 3, True)
        """
        idx = self._restrict_indices(indices)
        prob = self._prob
        groups, cols, start = [], [], 0
        for u in idx:
            g = prob.groups[u]
            groups.append(list(range(start, start + g.size)))
            cols.append(g)
            start += g.size
        c = np.concatenate(cols)
        out = SparseRegression.__new__(SparseRegression)
        out._setup(prob.gram[np.ix_(c, c)], prob.cross[c], prob.y_norm2, prob.ridge, groups, self.fit_intercept,
                   None if self.mean_a is None else self.mean_a[c], self.mean_y, self.count, prob.tol)
        out._mode, out._block = self._mode, self._block
        return out

    def columns_of(self, S: Iterable[int] | ArrayLike) -> np.ndarray:
        """Column indices of the units in ``S``, unit by unit in the order given.

        Examples
        --------
        >>> import numpy as np
        >>> f = SparseRegression(np.eye(4), np.ones((4, 1)), groups=[[0, 1], [2], [3]])
        >>> f.columns_of([2, 0]).tolist()
        [3, 0, 1]
        """
        idx = as_index_array(S, self.n)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self._prob.groups[u] for u in idx])

    def _factor(self, S: Iterable[int] | ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols = self.columns_of(S)
        low, kept = factor_in_order(self._prob, cols)
        return cols, low, kept

    def value(self, S: Iterable[int] | ArrayLike) -> float:
        """``F(S)``, from a Cholesky factorisation of ``G_SS + ridge I`` (degenerate columns skipped in order)."""
        cols, low, kept = self._factor(S)
        z, _ = solve_factored(low, self._prob.cross[cols[kept]])
        return float(min(max(np.vdot(z, z), 0.0), self.y_norm2))

    def residual(self, S: Iterable[int] | ArrayLike) -> float:
        """``y_norm2 - F(S)``: the least-squares residual ``min ||Y - A_S M - b||^2`` (plus ``ridge ||M||^2``).

        With ``ridge > 0`` this is the residual of the augmented design (it includes the penalty); see
        :meth:`reconstruction_error` for the plain residual of the ridge fit.
        """
        return max(self.y_norm2 - self.value(S), 0.0)

    def reconstruction_error(self, S: Iterable[int] | ArrayLike) -> float:
        """``||Y - A_S M - b||^2`` at the refit ``(M, b)``, without the ridge penalty (equals :meth:`residual`
        when ``ridge == 0``)."""
        cols, low, kept = self._factor(S)
        kc = cols[kept]
        z, m = solve_factored(low, self._prob.cross[kc])
        if not self.ridge:
            return max(self.y_norm2 - float(np.vdot(z, z)), 0.0)
        fitted = float(np.vdot(m, self._prob.gram[np.ix_(kc, kc)] @ m))
        return max(self.y_norm2 - 2.0 * float(np.vdot(m, self._prob.cross[kc])) + fitted, 0.0)

    def refit(self, S: Iterable[int] | ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        """Least-squares weights (and bias) on the columns of ``S``: ``M = (G_SS + ridge I)^-1 B_S``.

        Returns
        -------
        M : ndarray, shape (len(columns_of(S)), m)
            Rows in the order of :meth:`columns_of`; degenerate columns get zero rows.
        bias : ndarray, shape (m,), or None
            ``mean_y - mean_a[cols] @ M`` when ``fit_intercept``, else None.
        """
        cols, low, kept = self._factor(S)
        _, m_kept = solve_factored(low, self._prob.cross[cols[kept]])
        M = np.zeros((cols.size, self.n_targets))
        M[kept] = m_kept
        return M, self._bias(cols, M)

    def _bias(self, cols: np.ndarray, M: np.ndarray) -> np.ndarray | None:
        if not self.fit_intercept:
            return None
        return self.mean_y - self.mean_a[cols] @ M

    def greedy_path(self, k_max: int, rule: str = "greedy", constraint: PartitionMatroid | None = None
                    ) -> RegressionPath:
        """Nested forward selection of ``k_max`` units; every prefix is the selection for its budget.

        Parameters
        ----------
        k_max : int
            Number of units to pick (``0 <= k_max <= n``).
        rule : {"greedy", "omp"}
            ``"greedy"``: forward regression, the unit with the largest exact gain ``F(u | S)`` (the rule with the
            ``1 - exp(-gamma)`` guarantee). ``"omp"``: orthogonal matching pursuit, the unit with the largest
            ``sum_c ||a_c^T R||^2 / ||a_c||^2`` (correlation of the original, not residualised, columns with the
            residual ``R``); a weaker rule, given for comparison. Both refit all weights after each pick.
        constraint : PartitionMatroid, optional
            Pick at most ``budgets[g]`` units of each group ``g`` (the rule picks among the units whose group is
            not full): e.g. as many attention heads from each of the model-parallel blocks of a fused projection.
            ``k_max`` must not exceed the matroid's rank (the sum over groups of ``min(size, budget)``). Every
            prefix is then feasible but is the constrained greedy's choice only for its own budgets; the
            ``1 - exp(-gamma)`` bound of the cardinality case does not apply (for a submodular ``F``, greedy under
            a matroid is within 1/2 of the optimum: Fisher, Nemhauser & Wolsey 1978).

        Returns
        -------
        RegressionPath

        Notes
        -----
        Ties and degenerate units: among the units not yet picked, a unit with at least one non-degenerate column is
        always preferred to one without (ties in score go to the lowest index). When only degenerate units remain
        the path continues with them at gain 0 (values and errors stay flat), so the path always has ``k_max``
        units; ``n_useful`` counts the picks made while a non-degenerate unit was available.

        Examples
        --------
        >>> import numpy as np
        >>> import submod
        >>> rng = np.random.default_rng(0)
        >>> A = rng.standard_normal((50, 6))
        >>> f = submod.SparseRegression(A, A[:, 0] + 0.5 * A[:, 1] + 0.1 * A[:, 4])
        >>> f.greedy_path(3).selected.tolist()
        [0, 1, 4]
        >>> c = submod.PartitionMatroid(groups=[0, 0, 0, 1, 1, 1], budgets=1)   # one unit of each half
        >>> f.greedy_path(2, constraint=c).selected.tolist()
        [0, 4]
        """
        k_max = check_k(k_max, self.n)
        if rule not in ("greedy", "omp"):
            raise ValueError(f"rule must be 'greedy' or 'omp'; got {rule!r}.")
        tracker = None
        if constraint is not None:
            if not isinstance(constraint, PartitionMatroid):
                raise ValueError(f"constraint must be a submod.PartitionMatroid; got {type(constraint).__name__}. "
                                 "For a knapsack use submod.maximize(f, k, constraint=...).")
            constraint._check(self.n)
            rank = constraint._max_picks(self.n)
            if k_max > rank:
                raise ValueError(f"k_max={k_max} exceeds what the constraint allows ({rank} units: at most its "
                                 "budget from each group); pass k_max <= that.")
            tracker = constraint._tracker(self.n)
        state = ForwardRegressionState(self._prob, mode=self._mode, block=self._block)
        selected = np.zeros(k_max, dtype=np.int64)
        values = np.zeros(k_max + 1)
        kept_counts = np.zeros(k_max + 1, dtype=np.int64)
        n_useful = 0
        with one_blas_thread():
            for t in range(k_max):
                gains, useful = state._ensure()
                score = gains if rule == "greedy" else state.omp_scores()
                if tracker is not None:
                    useful = useful & tracker.allowed
                if useful.any():
                    j = int(np.argmax(np.where(useful, score, -np.inf)))
                    n_useful += 1
                else:
                    j = int(np.flatnonzero(~state._in_set & (True if tracker is None else tracker.allowed))[0])
                state.add(j)
                if tracker is not None:
                    tracker.add(j)
                selected[t] = j
                values[t + 1] = state.value
                kept_counts[t + 1] = len(state.kept)
        return RegressionPath(self, selected, values, np.array(state.kept, dtype=np.int64), kept_counts, rule,
                              n_useful, constraint)


# ---------------------------------------------------------------------------------------------- the path
@dataclass(eq=False)
class RegressionPath:
    """The nested path of a forward selection (:meth:`SparseRegression.greedy_path`).

    Attributes
    ----------
    objective : SparseRegression
        The objective the path was computed on (:meth:`weights` refits on its statistics).
    selected : int64 array (k,)
        Units in pick order; ``selected[:j]`` is the selection for budget ``j``.
    values : float array (k + 1,)
        ``F`` of every prefix, ``values[0] = 0``.
    kept_columns : int64 array
        The design columns (indices as in :meth:`SparseRegression.columns_of`) that enter the least-squares fit, in
        pick order (a unit's own columns in column order): the columns of the picked units that are not
        degenerate given the columns kept before them. A degenerate column is left out of the fit and gets a zero
        row in :meth:`weights`.
    kept_counts : int64 array (k + 1,)
        ``kept_counts[j]``: how many of ``kept_columns`` belong to the first ``j`` picks (``kept_counts[0] = 0``).
    gains : float array (k,)
        ``values[1:] - values[:-1]``: the exact gain of each pick.
    errors : float array (k + 1,)
        ``y_norm2 - values``: the least-squares residual ``||Y - A_S M - b||^2`` of every prefix (with a ridge,
        of the augmented design, i.e. including ``ridge ||M||^2``).
    relative_errors : float array (k + 1,)
        ``errors / y_norm2`` (0 when ``y_norm2 == 0``).
    rule : str
        ``"greedy"`` or ``"omp"``.
    n_useful : int
        Number of leading picks made while a unit with a non-degenerate column was available.
    constraint : PartitionMatroid or None
        The constraint the picks were made under (:meth:`SparseRegression.greedy_path`), or ``None``: with one,
        the cardinality case's ``1 - exp(-gamma)`` bound and the path bounds of ``verification`` do not apply.
    """

    objective: SparseRegression
    selected: np.ndarray
    values: np.ndarray
    kept_columns: np.ndarray
    kept_counts: np.ndarray
    rule: str
    n_useful: int
    constraint: PartitionMatroid | None = None
    gains: np.ndarray = field(init=False)
    errors: np.ndarray = field(init=False)
    relative_errors: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        y2 = self.objective.y_norm2
        self.gains = np.diff(self.values)
        self.errors = np.maximum(y2 - self.values, 0.0)
        self.relative_errors = self.errors / y2 if y2 > 0 else np.zeros_like(self.errors)
        self._factor: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.selected.size)

    def _full_factor(self) -> tuple[np.ndarray, np.ndarray]:
        if self._factor is None:
            low, pos = factor_in_order(self.objective._prob, self.kept_columns)
            self._factor = (low, pos)
        return self._factor

    def weights(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Refit ``(M, bias)`` for the first ``k`` picked units (rows ordered like ``columns_of(selected[:k])``).

        One Cholesky factorisation of the whole path serves every prefix (the factor of a prefix is the leading
        block of the factor in pick order).
        """
        k = check_k(k, len(self))
        f = self.objective
        cols = f.columns_of(self.selected[:k])
        low, pos = self._full_factor()
        q = int(np.searchsorted(pos, self.kept_counts[k]))     # kept columns that belong to the first k picks
        kept_cols = self.kept_columns[pos[:q]]
        _, m_kept = solve_factored(low[:q, :q], f._prob.cross[kept_cols])
        M = np.zeros((cols.size, f.n_targets))
        if q:
            where = {int(c): i for i, c in enumerate(cols)}
            M[[where[int(c)] for c in kept_cols]] = m_kept
        return M, f._bias(cols, M)


# ---------------------------------------------------------------------------------------------- streaming
class GramAccumulator:
    """Stream batches of rows into float64 sufficient statistics (memory O(d^2 + d m), independent of rows).

    Keeps the running means and the *centred* co-moments, merged batch by batch with the pairwise update of Chan,
    Golub & LeVeque (1979), which is stable when the means are large compared with the spread; the raw statistics
    ``A^T A = C + count * mean mean^T`` are recovered exactly when no intercept is fitted.

    Rows may carry non-negative weights (``sample_weight`` in :meth:`update`): the statistics are then those of
    the weighted least-squares problem ``sum_t w_t ||y_t - M^T a_t - b||^2``, i.e. of the rows scaled by
    ``sqrt(w_t)``, with weighted means for the intercept. ``count`` stays the number of rows; ``weight_sum`` is
    the sum of the weights (equal to ``count`` without weights) and takes its place in every formula.

    Parameters
    ----------
    n_features : int
        ``d``, columns of the inputs.
    n_targets : int
        ``m``, columns of the targets.
    device : str or torch.device, optional
        Where the statistics are kept and updated. ``None`` (default): numpy arrays on the host, except that the
        first batch holding a torch tensor on a device other than the CPU (a GPU) moves the statistics to that
        device, so that activations of a model on a GPU are never copied to the host row by row. A device
        (``"cpu"``, ``"cuda"``, ``torch.device("cuda:1")``) keeps float64 torch tensors there from the start
        (torch storage: batches, numpy or torch of any float dtype, are moved to that device and the ``O(rows
        d^2)`` products run there). Both storages take the same batches (numpy storage reads a CPU tensor of any
        dtype, with or without grad, on the host) and give the same statistics up to rounding and the same errors.
        A device that cannot hold float64 statistics (the meta device; Apple's MPS, which has no float64) is
        refused with a ``ValueError``, also when a batch there would be adopted, and the statistics stay put.
        On the CPU numpy is faster (its ``A^T A`` is a symmetric BLAS product), which is why ``None`` keeps it.

    Notes
    -----
    Every read-out (:meth:`gram`, :meth:`cross`, :meth:`y_norm2`, :attr:`mean_a`, :meth:`to_objective`, ...) is
    numpy float64 on the host whatever the storage: the selection and refit run on the host. With torch storage
    the statistics are copied to the host once after each change and that copy serves every read-out until the
    next :meth:`update` or :meth:`merge`. :attr:`mean_a` and :attr:`mean_y` are read-only snapshots with either
    storage (writing into them raises; later batches do not change an array already read); the other read-outs
    are fresh arrays the caller owns.
    :meth:`merge` works between accumulators with different storages (the result keeps this one's).
    ``copy.deepcopy`` keeps the storage and device; pickling (and ``copy.copy``) stores copies of the statistics
    as numpy arrays, so that a pickle loads without torch and without the device, the loaded accumulator has numpy
    storage (with the ``device=None`` rule above for later batches), and a copy never shares an array with the
    original.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> A, Y = rng.standard_normal((300, 5)), rng.standard_normal((300, 2))
    >>> acc = GramAccumulator(5, 2)
    >>> for lo in range(0, 300, 64):
    ...     acc.update(A[lo:lo + 64], Y[lo:lo + 64])
    >>> acc.count
    300
    >>> f = acc.to_objective(fit_intercept=True)
    >>> bool(np.isclose(f.value([0, 3]), SparseRegression(A, Y, fit_intercept=True).value([0, 3])))
    True

    Weights act like repeated rows:

    >>> w = rng.integers(0, 3, size=300).astype(float)
    >>> acc_w = GramAccumulator(5, 2)
    >>> acc_w.update(A, Y, sample_weight=w)
    >>> rep = np.repeat(np.arange(300), w.astype(int))
    >>> bool(np.isclose(acc_w.to_objective(fit_intercept=True).value([0, 3]),
    ...                 SparseRegression(A[rep], Y[rep], fit_intercept=True).value([0, 3])))
    True

    Torch storage (here on the CPU; ``device="cuda"`` on a GPU) gives the same statistics; read-outs are numpy:

    >>> import torch
    >>> acc_t = GramAccumulator(5, 2, device="cpu")
    >>> acc_t.update(torch.as_tensor(A), torch.as_tensor(Y, dtype=torch.float32))
    >>> acc_t.device, type(acc_t.gram()).__name__
    (device(type='cpu'), 'ndarray')
    >>> bool(np.allclose(acc_t.gram(), A.T @ A, rtol=1e-12))
    True
    """

    def __init__(self, n_features: int, n_targets: int, *, device: str | torch.device | None = None) -> None:
        for name, v in (("n_features", n_features), ("n_targets", n_targets)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        self.n_features = int(n_features)
        self.n_targets = int(n_targets)
        self.count = 0
        self.weight_sum = 0.0
        self._device: torch.device | None = None  # None: numpy storage
        self._host_copy: tuple | None = None       # torch storage: the statistics on the host, until they change
        self._ma = np.zeros(self.n_features)
        self._my = np.zeros(self.n_targets)
        self._caa = np.zeros((self.n_features, self.n_features))
        self._cay = np.zeros((self.n_features, self.n_targets))
        self._cyy: float | torch.Tensor = 0.0
        if device is not None:
            self._move_to(_torch_backend().as_device(device))

    @property
    def device(self) -> torch.device | None:
        """The torch device the statistics are kept on, or ``None`` for numpy storage on the host."""
        return self._device

    @property
    def mean_a(self) -> np.ndarray:
        """Mean of the input rows (weighted with ``sample_weight``), ``(d,)``: a read-only snapshot."""
        return self._snapshot(0)

    @property
    def mean_y(self) -> np.ndarray:
        """Mean of the target rows (weighted with ``sample_weight``), ``(m,)``: a read-only snapshot."""
        return self._snapshot(1)

    def _snapshot(self, i: int) -> np.ndarray:
        """Entry ``i`` of :meth:`_host` as a read-only array that later batches leave alone: the cached host copy
        with torch storage (replaced, never changed, on the next change), a read-only copy of the live array
        with numpy storage (which is updated in place), so that no caller can write into the statistics."""
        arr = self._host()[i]
        return arr if self._device is not None else frozen(arr)

    def _move_to(self, dev: torch.device) -> None:
        """Keep the statistics (those gathered so far included) as float64 tensors on ``dev``."""
        state = _torch_backend().state_to(dev, *self._host())
        self._ma, self._my, self._caa, self._cay, self._cyy = state
        # the device they are on, with its index: "cuda" alone would send later batches to whichever GPU is
        # current when they arrive, not to the statistics
        self._device = state[2].device
        self._host_copy = None

    def _host(self) -> tuple:
        """``(mean_a, mean_y, C_aa, C_ay, C_yy)`` as numpy on the host (the live arrays with numpy storage, a
        cached read-only copy with torch storage)."""
        if self._device is None:
            return self._ma, self._my, self._caa, self._cay, self._cyy
        if self._host_copy is None:
            tb = _torch_backend()
            self._host_copy = (tb.to_host(self._ma), tb.to_host(self._my), tb.to_host(self._caa),
                               tb.to_host(self._cay), float(self._cyy))
        return self._host_copy

    def update(self, A_batch: ArrayLike, Y_batch: ArrayLike, sample_weight: ArrayLike | None = None) -> None:
        """Add a batch of rows: ``A_batch`` (b, d) inputs and ``Y_batch`` (b, m) targets (any float dtype;
        numpy arrays or torch tensors).

        ``sample_weight`` (b,): optional finite, non-negative weight of each row (default 1).
        """
        if self._device is None and "torch" in sys.modules:  # only then can a batch be a tensor
            dev = _torch_backend().non_cpu_device(A_batch, Y_batch, sample_weight)
            if dev is not None:
                self._move_to(dev)
        checked = self._check_batch(A_batch, Y_batch, sample_weight)
        if checked is not None:
            self._add_rows(*checked)

    def update_blocks(self, blocks: Iterable[tuple[ArrayLike, ArrayLike, ArrayLike]],
                      sample_weight: Iterable[ArrayLike | None] | None = None) -> None:
        """Add a batch of rows known to be zero outside some columns, block by block.

        Block ``(columns, A_part, Y_part)`` stands for the rows whose entries in ``columns`` (distinct column
        indices, in ``A_part``'s column order) are ``A_part`` (``(b, len(columns))``) and whose other entries are
        zero, with targets ``Y_part`` (``(b, m)``). The statistics are those of :meth:`update` with all the blocks'
        rows written out in full (up to rounding), but the products cost ``sum b * len(columns)^2`` instead of
        ``sum b * d^2``: the polyphase components of a strided transposed convolution's unfolded input, for
        instance, each read ``1 / stride^2`` of the kernel taps. Blocks may share columns.

        The batch's co-moments are formed from each block's centred rows and the spread of the blocks' means
        (the pooled within/between decomposition), then merged like any batch: no raw, uncentred products.

        Parameters
        ----------
        blocks : iterable of (columns, A_part, Y_part)
            ``columns``: 1-D integer indices in ``[0, n_features)``, no repeats; ``A_part``, ``Y_part``: any float
            dtype, numpy arrays or torch tensors, as in :meth:`update`.
        sample_weight : iterable of array or None, optional
            One entry per block: the weights of its rows (as in :meth:`update`) or ``None`` (weight 1).

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> A = np.zeros((6, 4))
        >>> A[:3, [0, 2]] = rng.standard_normal((3, 2))     # rows 0-2 live in columns 0 and 2
        >>> A[3:, [1, 3]] = rng.standard_normal((3, 2))     # rows 3-5 in columns 1 and 3
        >>> Y = rng.standard_normal((6, 1))
        >>> acc = GramAccumulator(4, 1)
        >>> acc.update_blocks([([0, 2], A[:3, [0, 2]], Y[:3]), ([1, 3], A[3:, [1, 3]], Y[3:])])
        >>> bool(np.allclose(acc.gram(), A.T @ A)), bool(np.allclose(acc.cross(centered=True),
        ...                                                          (A - A.mean(0)).T @ (Y - Y.mean(0))))
        (True, True)
        """
        blocks = list(blocks)
        weights = [None] * len(blocks) if sample_weight is None else list(sample_weight)
        if len(weights) != len(blocks):
            raise ValueError(f"sample_weight has {len(weights)} entries for {len(blocks)} blocks; pass one weight "
                             "array (or None) per block.")
        for i, blk in enumerate(blocks):
            if not isinstance(blk, (tuple, list)) or len(blk) != 3:
                raise ValueError(f"block {i} must be a tuple (columns, A_part, Y_part); got {type(blk).__name__}.")
        if self._device is None and "torch" in sys.modules:
            dev = _torch_backend().non_cpu_device(*(x for blk in blocks for x in blk), *weights)
            if dev is not None:
                self._move_to(dev)
        parts = []
        for i, blk in enumerate(blocks):
            raw = blk[0].cpu() if hasattr(blk[0], "cpu") else blk[0]  # a torch tensor of indices, on any device
            if np.ndim(raw) != 1:
                raise ValueError(f"the columns of block {i} must be a 1-D list of column indices; got shape "
                                 f"{np.shape(raw)}.")
            cols = as_index_array(raw, self.n_features, f"the columns of block {i}")
            checked = self._check_batch(blk[1], blk[2], weights[i], width=cols.size)
            if checked is not None:
                parts.append((cols, *checked))
        nb = sum(p[4] for p in parts)
        wsum = sum(p[5] for p in parts)
        if nb == 0:
            return
        self._host_copy = None
        if wsum <= 0.0:
            self.count += nb  # rows of weight zero are seen but change no statistic
            return
        if self._device is not None:
            _torch_backend().add_blocks(self, parts, nb, wsum)
        else:
            self._add_blocks(parts, nb, wsum)

    def _add_blocks(self, parts: list[tuple], nb: int, wsum: float) -> None:
        """Numpy storage: add checked blocks ``(columns, a, y, w, rows, weight sum)`` of total weight ``wsum > 0``,
        each block's rows zero outside its columns, in place (no ``d x d`` temporary: only the blocks' own products
        and one low-rank update of the whole matrix).

        The pooled decomposition: each block's co-moments about its own means, scattered into place, plus the
        between-block term ``sum_p t_p t_p^T / w_p`` (and ``t_p s_p^T / w_p``, ``s_p^T s_p / w_p``) with ``t_p =
        sum_i w_i (a_i - mean_a)`` and ``s_p = sum_i w_i (y_i - mean_y)`` over the block's rows (``a_i`` written
        out, zero outside the block's columns): summing the rows' deviations from the batch means, rather than
        differencing the block means, keeps the term accurate when the means are large (a block mean is rounded to
        its own magnitude; the deviations are not)."""
        d, m = self.n_features, self.n_targets
        ma, my = np.zeros(d), np.zeros(m)
        live = []
        for cols, a, y, w, _, wp in parts:
            if wp > 0.0:
                mu, nu = (a.mean(axis=0), y.mean(axis=0)) if w is None else ((w @ a) / wp, (w @ y) / wp)
                ma[cols] += wp * mu
                my += wp * nu
                live.append((cols, a, y, w, wp, mu, nu))
        ma /= wsum
        my /= wsum
        cyy = 0.0
        T, S = np.empty((len(live), d)), np.empty((len(live), m))  # t_p / sqrt(w_p), s_p / sqrt(w_p)
        for j, (cols, a, y, w, wp, mu, nu) in enumerate(live):
            ac, yc = a - mu, y - nu
            da, dy = a - ma[cols], y - my
            if w is not None:
                root = np.sqrt(w)[:, None]
                ac, yc = ac * root, yc * root
                da, dy = da * w[:, None], dy * w[:, None]
            self._caa[np.ix_(cols, cols)] += ac.T @ ac
            self._cay[cols] += ac.T @ yc
            cyy += float(np.vdot(yc, yc))
            T[j] = -wp * ma
            T[j, cols] = da.sum(axis=0)
            S[j] = dy.sum(axis=0)
            T[j] /= np.sqrt(wp)
            S[j] /= np.sqrt(wp)
        # C_aa += T^T T and C_ay += T^T S in place, through the F-ordered transposes of the C-ordered arrays
        caa_t, cay_t = self._caa.T, self._cay.T
        inplace(blas.dgemm(1.0, T, T, beta=1.0, c=caa_t, trans_a=1, overwrite_c=1), caa_t)
        inplace(blas.dgemm(1.0, S, T, beta=1.0, c=cay_t, trans_a=1, overwrite_c=1), cay_t)
        self._shift(nb, wsum, ma, my, cyy + float(np.vdot(S, S)))

    def _check_batch(self, A_batch: ArrayLike, Y_batch: ArrayLike, sample_weight: ArrayLike | None,
                     width: int | None = None) -> tuple | None:
        """The batch checked and converted for this storage, ``(a, y, w, rows, weight sum)``; ``None`` if empty.
        ``width``: the columns ``A_batch`` must have, when it is a block of :meth:`update_blocks` (default all)."""
        if self._device is not None:
            return _torch_backend().validate(self, A_batch, Y_batch, sample_weight, width)
        if "torch" in sys.modules:  # tensors (of any dtype, with or without grad) are read on the host
            tb = _torch_backend()
            A_batch, Y_batch = tb.host_array(A_batch, "A_batch"), tb.host_array(Y_batch, "Y_batch")
            sample_weight = tb.host_array(sample_weight, "sample_weight")
        a = as_float_array(A_batch, "A_batch", 2)
        y = _as_targets(Y_batch, "Y_batch")
        if width is not None and a.shape[1] != width:
            raise ValueError(width_message(a.shape[1], width))
        if width is None and a.shape[1] != self.n_features:
            raise ValueError(f"A_batch has {a.shape[1]} columns but the accumulator was built for "
                             f"n_features={self.n_features}; reshape the batch to (rows, {self.n_features}).")
        if y.shape[1] != self.n_targets:
            raise ValueError(f"Y_batch has {y.shape[1]} columns but the accumulator was built for "
                             f"n_targets={self.n_targets}; reshape the batch to (rows, {self.n_targets}).")
        if a.shape[0] != y.shape[0]:
            raise ValueError(f"A_batch has {a.shape[0]} rows but Y_batch has {y.shape[0]}; pass matching rows.")
        nb = a.shape[0]
        if nb == 0:
            return None
        if sample_weight is None:
            return a, y, None, nb, float(nb)
        w = as_float_array(sample_weight, "sample_weight", 1)
        if w.shape[0] != nb:
            raise ValueError(f"sample_weight has {w.shape[0]} entries but the batch has {nb} rows; pass one "
                             "weight per row.")
        if np.any(w < 0):
            raise ValueError("sample_weight must be non-negative (a weight per row of the least-squares problem).")
        return a, y, w, nb, float(w.sum())

    def _add_rows(self, a: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                  w: np.ndarray | torch.Tensor | None, nb: int, wsum: float) -> None:
        """Add rows checked by :meth:`_check_batch` (arrays of this storage; ``wsum`` is the sum of ``w``)."""
        self._host_copy = None
        if self._device is not None:
            _torch_backend().add_rows(self, a, y, w, nb, wsum)
            return
        if wsum <= 0.0:
            self.count += nb  # rows of weight zero are seen but change no statistic
            return
        if w is None:
            ma = a.mean(axis=0)
            my = y.mean(axis=0)
            ac = a - ma
            yc = y - my
        else:
            ma = (w @ a) / wsum
            my = (w @ y) / wsum
            root = np.sqrt(w)[:, None]  # rows scaled by sqrt(w): x^T x is a symmetric product (BLAS syrk in numpy)
            ac = (a - ma) * root
            yc = (y - my) * root
        self._merge(nb, wsum, ma, my, ac.T @ ac, ac.T @ yc, float(np.vdot(yc, yc)))

    def merge(self, other: GramAccumulator) -> None:
        """Add the statistics of another accumulator (e.g. one filled in parallel on other rows), whatever its
        storage (numpy or a torch device); this accumulator keeps its own."""
        if not isinstance(other, GramAccumulator) or (other.n_features, other.n_targets) != (
                self.n_features, self.n_targets):
            raise ValueError("merge needs a GramAccumulator with the same n_features and n_targets.")
        if other.weight_sum <= 0:
            self.count += other.count
            return
        self._host_copy = None
        if self._device is not None:
            # the other's tensors are used where they are (moved if on another device), numpy ones are moved
            state = (other._ma, other._my, other._caa, other._cay, other._cyy)
            _torch_backend().merge(self, other.count, other.weight_sum, *state)
        else:
            self._merge(other.count, other.weight_sum, *other._host())

    def _merge(self, nb: int, wb: float, ma: np.ndarray, my: np.ndarray, caa: np.ndarray, cay: np.ndarray,
               cyy: float) -> None:
        """Numpy storage: add the centred statistics of ``nb`` other rows of weight ``wb``."""
        self._caa += caa
        self._cay += cay
        self._shift(nb, wb, ma, my, cyy)

    def _shift(self, nb: int, wb: float, ma: np.ndarray, my: np.ndarray, cyy: float) -> None:
        """Numpy storage: the pairwise update's corrections for the difference of the means, after the centred
        co-moments of ``nb`` other rows of weight ``wb`` (means ``ma``, ``my``; ``cyy``) were added."""
        wa = self.weight_sum
        wt = wa + wb
        da = ma - self._ma
        dy = my - self._my
        w = wa * wb / wt
        if wa > 0:
            # In-place rank-1 corrections (no d x d temporaries, so the peak memory does not depend on the number
            # of batches). The C-ordered arrays are updated through their F-ordered transposes.
            caa_t, cay_t = self._caa.T, self._cay.T
            inplace(blas.dger(w, da, da, a=caa_t, overwrite_a=1), caa_t)
            inplace(blas.dger(w, dy, da, a=cay_t, overwrite_a=1), cay_t)
            self._cyy += cyy + w * float(dy @ dy)
        else:
            self._cyy += cyy
        self._ma += da * (wb / wt)
        self._my += dy * (wb / wt)
        self.count += nb
        self.weight_sum = wt

    def __getstate__(self) -> dict:
        """Pickle copies of the statistics as numpy arrays (see the class notes): loadable without torch or the
        device, and never shared with this accumulator (``copy.copy`` uses this state too, and numpy storage
        updates its arrays in place)."""
        state = self.__dict__.copy()
        ma, my, caa, cay, cyy = self._host()
        state.update(_ma=np.array(ma), _my=np.array(my), _caa=np.array(caa), _cay=np.array(cay), _cyy=float(cyy),
                     _device=None, _host_copy=None)
        return state

    def __deepcopy__(self, memo: dict) -> GramAccumulator:
        """A copy with the same storage and device."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, None if key == "_host_copy" else copy.deepcopy(value, memo))
        return new

    def gram(self, centered: bool = False, columns: ArrayLike | None = None) -> np.ndarray:
        """``A^T A`` over all rows seen (``centered=True``: of the centred rows); ``columns``: only the
        ``(c, c)`` block of those columns (no full copy)."""
        ma_all, _, caa, _, _ = self._host()
        if columns is None:
            g, ma = caa.copy(), ma_all
        else:
            cols = self._columns(columns)
            g, ma = caa[np.ix_(cols, cols)], ma_all[cols]
        if not centered:
            g += self.weight_sum * np.outer(ma, ma)
        return 0.5 * (g + g.T)

    def gram_diagonal(self, centered: bool = False) -> np.ndarray:
        """The diagonal of :meth:`gram` (the columns' sums of squares), without forming the matrix.

        Examples
        --------
        >>> import numpy as np
        >>> A = np.arange(12.0).reshape(4, 3)
        >>> acc = GramAccumulator(3, 1)
        >>> acc.update(A, A[:, :1])
        >>> acc.gram_diagonal().tolist(), np.diag(acc.gram()).tolist()
        ([126.0, 166.0, 214.0], [126.0, 166.0, 214.0])
        >>> acc.gram(columns=[2, 0]).tolist()            # the block of columns 2 and 0, in that order
        [[214.0, 162.0], [162.0, 126.0]]
        """
        ma, _, caa, _, _ = self._host()
        diag = np.diag(caa).copy()
        if not centered:
            diag += self.weight_sum * ma ** 2
        return diag

    def cross(self, centered: bool = False, columns: ArrayLike | None = None) -> np.ndarray:
        """``A^T Y`` over all rows seen (``centered=True``: of the centred rows); ``columns``: only those rows of
        it."""
        ma_all, my, _, cay, _ = self._host()
        if columns is None:
            b, ma = cay.copy(), ma_all
        else:
            cols = self._columns(columns)
            b, ma = cay[cols], ma_all[cols]
        if not centered:
            b += self.weight_sum * np.outer(ma, my)
        return b

    def _columns(self, columns: ArrayLike) -> np.ndarray:
        cols = np.asarray(columns)
        if cols.ndim != 1 or (cols.size and (cols.dtype.kind not in "iu" or cols.min() < 0
                                            or cols.max() >= self.n_features)):
            raise ValueError(f"columns must be a 1-D array of column indices in [0, {self.n_features}); got "
                             f"{columns!r}.")
        return cols

    def y_norm2(self, centered: bool = False) -> float:
        """``||Y||^2`` over all rows seen (``centered=True``: of the centred targets)."""
        _, my, _, _, cyy = self._host()
        return float(cyy + (0.0 if centered else self.weight_sum * float(my @ my)))

    def to_objective(self, ridge: float = 0.0, groups: object = None, fit_intercept: bool = False, *,
                     tol: float = DEFAULT_TOL) -> SparseRegression:
        """The :class:`SparseRegression` of the rows streamed so far."""
        if self.weight_sum <= 0:
            raise ValueError("the accumulator has seen no rows of positive weight; call update(A_batch, Y_batch) "
                             "first.")
        if fit_intercept:
            return SparseRegression._from_centred(self.gram(True), self.cross(True), self.y_norm2(True),
                                                  ridge=ridge, groups=groups, mean_a=self.mean_a.copy(),
                                                  mean_y=self.mean_y.copy(), count=self.count, tol=tol)
        f = SparseRegression.__new__(SparseRegression)
        f._setup(self.gram(), self.cross(), self.y_norm2(), ridge, groups, False, self.mean_a.copy(),
                 self.mean_y.copy(), self.count, tol)
        return f

    def __repr__(self) -> str:
        where = "" if self._device is None else f", device={str(self._device)!r}"
        return (f"GramAccumulator(n_features={self.n_features}, n_targets={self.n_targets}, count={self.count}"
                f"{where})")


def _torch_backend() -> ModuleType:
    """:mod:`submod._gram_torch`, imported on first use (it imports torch, which :mod:`submod` does not need)."""
    try:
        from . import _gram_torch
    except ImportError as exc:
        raise ImportError(f"GramAccumulator(device=...) keeps the statistics in torch tensors and needs torch "
                          f"({exc}); install torch, or pass device=None for numpy storage.") from exc
    return _gram_torch
