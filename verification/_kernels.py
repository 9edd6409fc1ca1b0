"""Pure numerical kernels of :mod:`verification` (arrays in, arrays out; no set functions, no I/O).

Spectral lower bounds on the submodularity ratio of least squares (Das & Kempe 2011, 2018), the error-decay
bound recursions along a greedy path, and the fitted contraction factor.

Soundness of the spectral bounds for column groups
--------------------------------------------------
For a least-squares objective the value ``F(S)`` only depends on the *span* of the columns of the units in ``S``.
We may therefore replace the columns of each unit ``u`` by an orthonormal basis of their span without changing
``F``: the block ``G_uu`` becomes the identity ("block whitening"; for one-column units this is the usual
normalisation ``C = D^-1/2 G D^-1/2``). With ``C`` the whitened Gram, ``r`` the residual of a target at ``L`` and
``b_u = R_u^T r`` (``R_u`` the unit's whitened columns residualised on ``span(A_L)``):

* ``F(u | L) = b_u^T (C^L_uu)^+ b_u >= ||b_u||^2`` because the Schur complement ``C^L_uu <= C_uu = I``;
* ``F(S | L) = b_S^T (C^L_SS)^+ b_S <= ||b_S||^2 / lambda_min(C^L_SS)`` and, by interlacing of Schur
  complements, ``lambda_min(C^L_SS) >= lambda_min(C_{L u S})``.

Hence ``sum_{u in S} F(u | L) / F(S | L) >= lambda_min(C_{L u S})`` for every target, and for several targets
too (a ratio of sums is at least the smallest ratio). Minimising over the allowed ``(L, S)`` and using that
``lambda_min`` of a principal submatrix only decreases when rows/columns are added gives
``gamma_{U,k} >= min_{|S| = k} lambda_min(C_{U u S})`` (``S`` ranges over unions of ``k`` units outside ``U``),
which is at least Das & Kempe's ``lambda_min(C, |U| + k)`` and at least ``lambda_min(C)``.

Which directions count is decided exactly as :class:`submod.SparseRegression` decides it, so that the bound is
about the function the library evaluates: within each unit, in column order, a column is kept when its squared
residual on the unit's earlier kept columns exceeds ``tol * ref_j`` (``ref_j = G_jj + ridge`` of the original
Gram, ``tol`` the objective's own tolerance) and dropped otherwise (weight 0: it adds no direction). A column's
scale is irrelevant (``F`` depends only on the span), so a tiny but non-zero column counts fully, and a
near-dependent column that ``SparseRegression`` keeps is kept here too, however ill-conditioned its unit (the
bound then comes out small, which is sound). The kept columns are whitened through the Cholesky factor of their
normalised block. Callers report the units left without any column.
"""

from __future__ import annotations

import math
from itertools import combinations, islice

import numpy as np
import scipy.linalg

from submod._sr_kernels import cholesky_dropping

#: Default relative tolerance of degenerate columns: :class:`submod.SparseRegression`'s default (pass ``f.tol``).
DEAD_TOL = 1e-10


def whitened_gram(G: np.ndarray, groups: list[np.ndarray], ridge: float = 0.0, tol: float = DEAD_TOL,
                  ref: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Block-whiten ``G + ridge I`` unit by unit, keeping the columns :class:`submod.SparseRegression` keeps.

    Parameters
    ----------
    G : array (d, d)
        Gram matrix of the columns (symmetric positive semi-definite, float64); may be a residual (Schur
        complement) Gram, with ``ref`` the original squared norms.
    groups : list of int arrays
        Columns of each unit, in order.
    ridge : float
        Ridge added to the diagonal (the least-squares problem on ``[A; sqrt(ridge) I]``).
    tol : float
        Relative tolerance of degenerate columns (the objective's ``tol``).
    ref : array (d,), optional
        Squared norms the tolerance is relative to (default the diagonal of ``G + ridge I``).

    Returns
    -------
    C : array (r, r)
        Whitened Gram; each unit's diagonal block is the identity.
    unit_cols : list of int arrays
        Columns of ``C`` belonging to each unit (empty for a dead unit).
    dead : list of int
        Units without any kept column.

    Examples
    --------
    >>> import numpy as np
    >>> C, cols, dead = whitened_gram(np.array([[4.0, 2.0], [2.0, 9.0]]), [np.array([0]), np.array([1])])
    >>> np.round(C, 3).tolist(), dead
    ([[1.0, 0.333], [0.333, 1.0]], [])
    """
    G = np.asarray(G, dtype=np.float64)
    d = G.shape[0]
    Gr = G + ridge * np.eye(d) if ridge else G
    diag = np.diag(Gr).copy()
    ref = diag if ref is None else np.asarray(ref, dtype=np.float64)
    live = (diag > 0.0) & (diag > tol * ref)
    inv_s = np.zeros(d)
    inv_s[live] = 1.0 / np.sqrt(diag[live])
    Gn = Gr * np.outer(inv_s, inv_s)  # normalised Gram: unit diagonal on live columns
    blocks, unit_cols, dead = [], [], []
    start = 0
    for u, cols in enumerate(groups):
        cols = np.asarray(cols, dtype=np.int64)
        cols = cols[live[cols]]
        # SparseRegression's own rule, in column order: a pivot (squared residual on the earlier kept columns,
        # here relative to the column's norm) <= tol * ref_j / diag_j drops the column
        L, pos = cholesky_dropping(Gn[np.ix_(cols, cols)], tol * ref[cols] / diag[cols])
        kept = cols[pos]
        if kept.size:
            W = scipy.linalg.solve_triangular(L, np.eye(kept.size), lower=True).T  # W^T Gn_kk W = I
        else:
            W = np.zeros((0, 0))
            dead.append(u)
        blocks.append((kept, W))
        unit_cols.append(np.arange(start, start + kept.size, dtype=np.int64))
        start += kept.size
    T = np.zeros((d, start))
    for (kept_cols, W), uc in zip(blocks, unit_cols, strict=True):
        if uc.size:
            T[np.ix_(kept_cols, uc)] = W
    C = T.T @ Gn @ T
    C = 0.5 * (C + C.T)
    for uc in unit_cols:  # exact identities on the diagonal blocks (removes round-off)
        if uc.size:
            C[np.ix_(uc, uc)] = np.eye(uc.size)
    return C, unit_cols, dead


def lambda_min(C: np.ndarray) -> float:
    """Smallest eigenvalue of a symmetric matrix (``1.0`` for an empty one, the 0 x 0 convention).

    Examples
    --------
    >>> lambda_min(np.array([[1.0, 0.5], [0.5, 1.0]]))
    0.5
    """
    if C.shape[0] == 0:
        return 1.0
    return float(np.linalg.eigvalsh(C)[0])


def n_unit_subsets(n_free: int, m: int) -> int:
    """Number of ways to choose ``m`` of ``n_free`` units (``m`` clipped to ``n_free``)."""
    return math.comb(n_free, min(m, n_free))


def sparse_lambda_min(C: np.ndarray, unit_cols: list[np.ndarray], m: int, containing: np.ndarray | None = None,
                      max_subsets: int = 20000, chunk: int = 2048) -> tuple[float, bool, int]:
    """``min lambda_min(C_T)`` over unions ``T`` of ``m`` units added to the units ``containing``.

    Enumerates every choice of ``m`` units outside ``containing`` (batched ``eigvalsh`` over stacked principal
    submatrices, padded with identity blocks, which leaves ``lambda_min <= 1`` unchanged) when there are at most
    ``max_subsets`` of them; otherwise returns the full ``lambda_min(C)``, a weaker but still sound lower bound
    (interlacing).

    Returns
    -------
    value : float
    enumerated : bool
        Whether the value is the exact restricted sparse eigenvalue (``False``: full ``lambda_min``).
    n_subsets : int
        Number of principal submatrices examined.

    Examples
    --------
    >>> C = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> cols = [np.array([0]), np.array([1]), np.array([2])]
    >>> v, exact, count = sparse_lambda_min(C, cols, 1, containing=np.array([2]))
    >>> round(v, 6), exact, count
    (1.0, True, 2)
    >>> round(sparse_lambda_min(C, cols, 2)[0], 6)
    0.1
    """
    n_units = len(unit_cols)
    base = np.zeros(0, dtype=np.int64) if containing is None else np.asarray(containing, dtype=np.int64)
    free = np.setdiff1d(np.arange(n_units), base)
    m = min(m, free.size)
    if m == free.size:
        T = np.concatenate([unit_cols[u] for u in np.concatenate([base, free])]) if n_units else np.zeros(0, int)
        return lambda_min(C[np.ix_(T, T)]), True, 1
    count = math.comb(free.size, m)
    if count > max_subsets:
        return lambda_min(C), False, 1
    base_cols = np.concatenate([unit_cols[u] for u in base]) if base.size else np.zeros(0, dtype=np.int64)
    sizes = np.array([unit_cols[u].size for u in free])
    width = base_cols.size + int(np.sort(sizes)[::-1][:m].sum())
    if width == 0:
        return 1.0, True, count
    best = math.inf
    combos = combinations(range(free.size), m)
    while True:
        batch = list(islice(combos, chunk))
        if not batch:
            break
        stack = np.broadcast_to(np.eye(width), (len(batch), width, width)).copy()
        for b, combo in enumerate(batch):
            T = np.concatenate([base_cols] + [unit_cols[free[i]] for i in combo])
            stack[b, :T.size, :T.size] = C[np.ix_(T, T)]
        best = min(best, float(np.linalg.eigvalsh(stack)[:, 0].min()))
    return best, True, count


def schur_complement(G: np.ndarray, keep: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Gram of the columns ``keep`` residualised on the span of the columns ``given``.

    ``G_KK - G_KS G_SS^+ G_SK`` (pseudo-inverse, so a singular ``G_SS`` is handled).

    Examples
    --------
    >>> G = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> schur_complement(G, np.array([1]), np.array([0])).tolist()
    [[0.75]]
    """
    if given.size == 0:
        return G[np.ix_(keep, keep)].copy()
    Gss = G[np.ix_(given, given)]
    Gsk = G[np.ix_(given, keep)]
    X = np.linalg.lstsq(Gss, Gsk, rcond=None)[0]
    out = G[np.ix_(keep, keep)] - Gsk.T @ X
    return 0.5 * (out + out.T)


def path_bound(err_T: float, value_T: float, ratios: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sound upper bounds on the greedy residual ``err_k`` toward a comparator ``T``, ``k = 0..len(ratios)``.

    ``err_k <= err(T) + prod_{t<k} (1 - g_t / |T \\ S_t|) F(T)`` where ``g_t`` is the submodularity ratio of the
    greedy prefix ``S_t`` toward ``T \\ S_t`` (or any proven lower bound on it) and ``sizes[t] = |T \\ S_t|``.
    A step with ``sizes[t] == 0`` (``T`` already inside ``S_t``) gives factor 0. Ratios are clipped to
    ``[0, sizes[t]]`` (the exact ratio never leaves that range for a monotone function).

    Examples
    --------
    >>> path_bound(0.0, 1.0, np.array([1.0, 1.0]), np.array([2, 1])).tolist()
    [1.0, 0.5, 0.0]
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(sizes > 0, 1.0 - np.clip(ratios, 0.0, sizes) / np.where(sizes > 0, sizes, 1.0), 0.0)
    prod = np.concatenate([[1.0], np.cumprod(factor)])
    return err_T + prod * value_T


def exp_rate_bound(err_V: float, value_V: float, lam: float, d: int, k_max: int) -> np.ndarray:
    """A-priori spectral bound ``err_k <= err(V) + exp(-lam k / d) F(V)``, ``k = 0..k_max``.

    Follows from :func:`path_bound` with ``T = V`` and every ``g_t >= lam`` because
    ``prod_t (1 - lam/(d - t)) <= exp(-lam sum_t 1/(d - t)) <= exp(-lam k / d)``.

    Examples
    --------
    >>> np.round(exp_rate_bound(0.0, 1.0, 1.0, 2, 2), 4).tolist()
    [1.0, 0.6065, 0.3679]
    """
    k = np.arange(k_max + 1, dtype=np.float64)
    return err_V + np.exp(-max(lam, 0.0) * k / d) * value_V


def fit_contraction(errors: np.ndarray, floor: float) -> tuple[float, int]:
    """Least-squares fit of ``log err_k = a + k log rho`` over the prefix of errors above ``floor``.

    Returns ``(rho, points used)``; ``rho = nan`` when fewer than two points qualify. An *estimate*, never a
    bound.

    Examples
    --------
    >>> rho, used = fit_contraction(np.array([1.0, 0.5, 0.25, 0.125]), 1e-12)
    >>> round(rho, 6), used
    (0.5, 4)
    """
    errors = np.asarray(errors, dtype=np.float64)
    above = errors > floor
    stop = int(np.argmin(above)) if not above.all() else errors.size
    if stop < 2:
        return math.nan, stop
    k = np.arange(stop, dtype=np.float64)
    slope = np.polyfit(k, np.log(errors[:stop]), 1)[0]
    return float(math.exp(slope)), stop
