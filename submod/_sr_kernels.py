"""Numerical kernels of :class:`submod.SparseRegression`: forward regression in Gram space.

Everything here works on sufficient statistics only: ``G = A^T A (+ ridge I)`` (p x p), ``B = A^T Y`` (p x m) and
``||Y||^2``. Inputs are trusted (validated at the public boundary in :mod:`submod.sparse_regression`).

Forward regression (greedy with exact gains) is Gram-Schmidt on the columns of ``A`` carried out on ``G``: after
selecting the columns ``S``, the residualised Gram matrix and cross term are

    G_res = G - G[:, S] G_SS^-1 G[S, :],        B_res = B - G[:, S] G_SS^-1 B_S,

and the exact gain of a single column ``j`` is ``||B_res[j]||^2 / G_res[j, j]`` (the squared norm of the target's
projection on the residualised column). Adding column ``j`` is the rank-1 update ``G_res -= r r^T`` with
``r = G_res[:, j] / sqrt(G_res[j, j])`` (a row of the Cholesky factor of ``G`` in pick order).

Adding a unit with ``s`` columns factors its ``s x s`` residual block (a small Cholesky, degenerate columns
skipped) and produces ``s`` factor rows ``R = L^-1 G_res[unit, :]``; the residual statistics then change by the
rank-s updates ``G_res -= R^T R`` and ``H_res -= W^T R + R^T W`` (``H_res = B_res B_res^T``, ``W`` from the cross
terms), and the candidates' residual norms by ``O(p s)`` work.

The state stores ``G_res`` and ``H_res`` (or ``B_res`` itself when ``m`` is small compared with ``p``) at the start
of a block of ``b`` added columns, and the factor rows added inside the block; the block's rank-b update is applied
with one BLAS-3 call when the block is full (delayed updates, as in blocked LU / QR with column pivoting,
Quintana-Orti, Sun & Bischof 1998). Columns needed inside a block are corrected on the fly in ``O(p b)``. Each
block costs ``O(p^2 b)`` in BLAS-3, so ``k`` added columns cost ``O(k p (p + m))`` flops, below the ``O(N p^2)`` of
forming ``G`` from ``N`` rows when ``N > k (1 + m / p)``.

Units are groups of columns. A group's gain ``tr(B_res[g]^T G_res[g, g]^+ B_res[g])`` is computed for all groups at
once by eliminating the columns of every group's ``s x s`` residual block in order, vectorised over groups.

Degenerate columns: a column whose residual squared norm is ``<= tol * (G_jj + ridge)`` (duplicate, all-zero,
in the span of the selected columns, or beyond the rank when there are fewer rows than columns) brings no new
direction; it contributes exactly 0 to a gain and is skipped (weight 0) when its unit is added.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from ._sr_threads import one_blas_thread
from .base import GainState

# Default number of columns added between two BLAS-3 updates of the residual statistics (at least 16 units' worth
# of columns for groups). Larger blocks make the rank-b updates more efficient and the in-block work larger.
DEFAULT_BLOCK = 96
# Compact the residual matrices when the active columns drop below this fraction of their stored size.
COMPACT_FRACTION = 0.65
# ``Y`` counts as fully explained once ``||Y||^2 - F(S)`` is at most this fraction of ``||Y||^2``: the rounding of
# values accumulated from quantities of size ``||Y||^2`` (the threshold below which :mod:`verification` reads a value
# of least squares as 0). Every gain is then 0, not rounding noise that greedy would pick columns by.
EXPLAINED_RTOL = 64 * np.finfo(np.float64).eps


class Problem:
    """Validated sufficient statistics of one regression problem (internal).

    Parameters
    ----------
    gram : (p, p) float64, symmetric, without the ridge.
    cross : (p, m) float64.
    y_norm2 : float, total (centred when there is an intercept) target energy.
    ridge : float >= 0.
    groups : list of int64 arrays partitioning ``range(p)``.
    tol : relative tolerance on residual squared norms.
    """

    def __init__(self, gram: np.ndarray, cross: np.ndarray, y_norm2: float, ridge: float,
                 groups: list[np.ndarray], tol: float) -> None:
        self.gram = gram
        self.cross = cross
        self.y_norm2 = float(y_norm2)
        self.ridge = float(ridge)
        self.groups = groups
        self.tol = float(tol)
        p = gram.shape[0]
        self.p = p
        self.m = cross.shape[1]
        self.n_units = len(groups)
        self.ref = np.diag(gram).copy() + self.ridge          # squared norm of each (augmented) column
        self.ref = np.maximum(self.ref, 0.0)
        self.sizes = np.array([g.size for g in groups], dtype=np.int64)
        self.s_max = int(self.sizes.max())
        # Padded (n_units, s_max) column index; padding points at a dummy column p.
        idx = np.full((self.n_units, self.s_max), p, dtype=np.int64)
        for u, g in enumerate(groups):
            idx[u, :g.size] = g
        self.idx = idx
        self.pad = idx == p
        self.unit_of_col = np.empty(p, dtype=np.int64)
        for u, g in enumerate(groups):
            self.unit_of_col[g] = u

    def regularised_block(self, cols: np.ndarray) -> np.ndarray:
        """``G[cols, cols] + ridge I`` as a new array."""
        block = self.gram[np.ix_(cols, cols)]
        if self.ridge:
            block[np.diag_indices_from(block)] += self.ridge
        return block


def inplace(result: np.ndarray, target: np.ndarray) -> None:
    """Make sure a BLAS update asked to overwrite ``target`` did (f2py copies non-conforming arrays)."""
    if not np.shares_memory(result, target):  # pragma: no cover - only if an array lost its F-contiguity
        target[...] = result


def _sym_columns(u: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Full columns ``cols`` (F-ordered, p x s copy) of a symmetric matrix stored in the upper triangle of ``u``."""
    out = u[:, cols]
    for t, j in enumerate(cols):
        out[j + 1:, t] = u[j, j + 1:]
    return out


def _sym_gather(u: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Entries ``(rows, cols)`` (broadcast) of a symmetric matrix stored in the upper triangle of ``u``."""
    return u[np.minimum(rows, cols), np.maximum(rows, cols)]


class ForwardRegressionState(GainState):
    """Incremental state of ``F(S) = ||Y||^2 - min_M ||Y - A_S M||^2`` (see the module docstring).

    ``mode`` selects how the residual cross term is kept: ``"h"`` keeps ``H_res = B_res B_res^T`` (p x p; per
    pick work independent of ``m``), ``"b"`` keeps ``B_res`` (p x m; one matrix product with it per added unit).
    The default picks ``"h"`` when ``2 m >= p * s_max`` (measured break-even for single columns: ``m ~ p / 2``)
    and ``"b"`` otherwise.

    The residual matrices are kept only for the *active* columns (those of units not in the set), stored in the
    upper triangle (BLAS ``syrk`` / ``syr2k`` updates), and compacted when the active set shrinks.
    """

    def __init__(self, prob: Problem, mode: str | None = None, block: int | None = None) -> None:
        super().__init__(prob.n_units)
        self._prob = prob
        p, m = prob.p, prob.m
        if mode is None:
            mode = "h" if 2 * m >= p * prob.s_max else "b"
        if mode not in ("h", "b"):  # pragma: no cover - internal misuse
            raise ValueError(f"mode must be 'h' or 'b'; got {mode!r}")
        self._mode = mode
        self._b = max(int(block), prob.s_max) if block else max(DEFAULT_BLOCK, 16 * prob.s_max)
        self._Gr = np.array(prob.gram.T, dtype=np.float64, order="F", copy=True)   # symmetric: a plain copy
        if prob.ridge:
            self._Gr[np.diag_indices(p)] += prob.ridge
        if mode == "h":
            self._Hr = blas.dsyrk(1.0, prob.cross.T, trans=1, lower=0)   # upper triangle of B B^T
        else:
            self._Br = np.array(prob.cross, dtype=np.float64, order="C", copy=True)
        self._thr_all = prob.tol * prob.ref
        self._nb = 0
        self.kept: list[int] = []                    # columns with a factor row, in pick order
        self.skipped: list[int] = []                 # degenerate columns of added units
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        self._set_active(np.arange(p))
        self._refresh()

    # ------------------------------------------------------------------ active columns
    def _set_active(self, act: np.ndarray) -> None:
        """Index maps and buffers for the active columns ``act`` (sorted original indices)."""
        prob = self._prob
        pl = act.size
        self._act = act
        loc = np.full(prob.p + 1, pl, dtype=np.int64)   # inactive columns and padding map to a dummy slot pl
        loc[act] = np.arange(pl)
        self._loc = loc
        self._gidx = loc[prob.idx]                      # (n_units, s_max) local positions, dummy = pl
        self._thr = self._thr_all[act]
        self._thr_ext = np.append(self._thr, np.inf)    # the dummy slot is never useful
        self._R = np.empty((self._b, pl))
        if self._mode == "h":
            self._W = np.empty((self._b, pl))
        else:
            self._C = np.empty((self._b, prob.m))

    def _compact(self) -> bool:
        """Drop the rows and columns of units already in the set from the residual matrices (when worth it)."""
        keep_cols = ~self._in_set[self._prob.unit_of_col[self._act]]
        if keep_cols.sum() > COMPACT_FRACTION * keep_cols.size:
            return False
        keep = np.flatnonzero(keep_cols)
        sub = np.ix_(keep, keep)
        self._Gr = np.asfortranarray(self._Gr[sub])
        if self._mode == "h":
            self._Hr = np.asfortranarray(self._Hr[sub])
        else:
            self._Br = np.ascontiguousarray(self._Br[keep])
        self._set_active(self._act[keep])
        return True

    # ------------------------------------------------------------------ statistics of the candidates
    def _refresh(self) -> None:
        """Recompute the candidates' residual statistics from the block-start matrices."""
        prob = self._prob
        if prob.s_max == 1:
            # Residual squared norms of the columns and of their cross terms, with a dummy slot at the end.
            self._den = np.append(np.diag(self._Gr), 1.0)
            if self._mode == "h":
                self._num = np.append(np.diag(self._Hr), 0.0)
            else:
                self._num = np.append(np.einsum("ij,ij->i", self._Br, self._Br), 0.0)
            self._col_of_unit = self._gidx[:, 0]
            return
        pl = self._act.size
        dummy = self._gidx == pl
        safe = np.where(dummy, 0, self._gidx)
        mask = (~dummy).astype(np.float64)
        pair = mask[:, :, None] * mask[:, None, :]
        rows, cols = safe[:, :, None], safe[:, None, :]
        self._Gb = _sym_gather(self._Gr, rows, cols) * pair
        if self._mode == "h":
            self._Hb = _sym_gather(self._Hr, rows, cols) * pair
        else:
            bg = self._Br[safe] * mask[:, :, None]
            self._Hb = np.matmul(bg, bg.transpose(0, 2, 1))

    def _update_stats(self, r: np.ndarray, w: np.ndarray) -> None:
        """Rank-q update of the candidates' statistics after adding columns with factor rows ``r`` (q x p_active)
        and ``w`` (``H_res -= w^T r + r^T w``)."""
        if self._prob.s_max == 1:
            if r.shape[0] == 1:
                self._den[:-1] -= r[0] * r[0]
                self._num[:-1] -= 2.0 * (w[0] * r[0])
            else:  # pragma: no cover - single-column units add one row at a time
                self._den[:-1] -= np.einsum("kp,kp->p", r, r)
                self._num[:-1] -= 2.0 * np.einsum("kp,kp->p", w, r)
            return
        q = r.shape[0]
        rb = np.concatenate([r, np.zeros((q, 1))], axis=1)[:, self._gidx].transpose(1, 2, 0)   # (n, s, q)
        wb = np.concatenate([w, np.zeros((q, 1))], axis=1)[:, self._gidx].transpose(1, 2, 0)
        self._Gb -= rb @ rb.transpose(0, 2, 1)
        cross = wb @ rb.transpose(0, 2, 1)
        self._Hb -= cross + cross.transpose(0, 2, 1)

    # ------------------------------------------------------------------ gains
    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        prob = self._prob
        if prob.s_max == 1:
            cols = self._col_of_unit
            den = self._den[cols]
            useful = den > self._thr_ext[cols]
            gains = self._num[cols]
            np.maximum(gains, 0.0, out=gains)
            gains /= np.where(useful, den, 1.0)
            gains[~useful] = 0.0
        else:
            gains, useful = _group_gains(self._Gb, self._Hb, self._thr_ext[self._gidx])
        room = prob.y_norm2 - self.value
        if room <= EXPLAINED_RTOL * prob.y_norm2:  # Y fully explained: what is left of the gains is rounding
            room = 0.0
        np.minimum(gains, room, out=gains)
        gains[self._in_set] = 0.0
        useful &= ~self._in_set
        return gains, useful

    def _ensure(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            self._cache = self._compute()
        return self._cache

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        g = self._ensure()[0]
        if candidates is None:
            return g.copy()
        return g[np.asarray(candidates, dtype=np.int64)]

    def useful(self) -> np.ndarray:
        """Mask of units not in the set that still have at least one non-degenerate column."""
        return self._ensure()[1].copy()

    def omp_scores(self) -> np.ndarray:
        """Orthogonal matching pursuit scores ``sum_{c in unit} ||B_res[c]||^2 / ||a_c||^2`` (no residual norm)."""
        prob = self._prob
        ref = prob.ref[self._act]
        inv_ref = np.append(np.where(ref > 0, 1.0 / np.where(ref > 0, ref, 1.0), 0.0), 0.0)[self._gidx]
        if prob.s_max == 1:
            num = self._num[self._gidx]
        else:
            num = np.einsum("uii->ui", self._Hb)
        scores = (np.maximum(num, 0.0) * inv_ref).sum(axis=1)
        scores[self._in_set] = 0.0
        return scores

    # ------------------------------------------------------------------ adding a unit
    def _columns(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Current residual columns for the local columns ``cols``.

        Returns ``G_res[:, cols]`` (p_active x s) and, in mode "h", ``H_res[:, cols]`` or, in mode "b",
        ``B_res[cols]`` (s x m).
        """
        nb = self._nb
        rb = self._R[:nb]
        gc = _sym_columns(self._Gr, cols)
        rc = rb[:, cols]
        if nb:
            gc -= rb.T @ rc
        if self._mode == "h":
            hc = _sym_columns(self._Hr, cols)
            if nb:
                wb = self._W[:nb]
                hc -= wb.T @ rc + rb.T @ wb[:, cols]
            return gc, hc, None
        bc = self._Br[cols]
        if nb:
            bc -= rc.T @ self._C[:nb]
        return gc, None, bc

    def _add(self, j: int) -> None:
        with one_blas_thread():
            self._add_unit(j)

    def _add_unit(self, j: int) -> None:
        """Add all columns of unit ``j`` at once: a rank-s' update (s' = its non-degenerate columns)."""
        prob = self._prob
        cols_orig = prob.groups[j]
        s = cols_orig.size
        if self._nb + s > self._b:
            self._flush()
        cols = self._loc[cols_orig]
        gc, hc, bc = self._columns(cols)
        if s == 1:
            self._add_column(int(cols[0]), int(cols_orig[0]), gc[:, 0], hc, bc)
            self._cache = None
            return
        # Cholesky of the unit's residual block in column order, skipping degenerate columns (same rule as the
        # gains): L restricted to the kept rows and columns is the factor of G_res[kept, kept].
        low = np.zeros((s, s))
        block = gc[cols].copy()
        kept = []
        for i in range(s):
            d = block[i, i]
            if not d > self._thr[cols[i]]:
                self.skipped.append(int(cols_orig[i]))
                continue
            li = block[i:, i] / np.sqrt(d)
            low[i:, i] = li
            block[i:, i:] -= np.outer(li, li)
            kept.append(i)
        if kept:
            kk = np.asarray(kept)
            lk = low[np.ix_(kk, kk)]
            kcols = cols[kk]
            r_new = _lower_solve(lk, gc[:, kk].T)                          # factor rows L^-1 G_res[kept, :]
            if self._mode == "h":
                v = _lower_solve(lk, hc[:, kk].T)                          # L^-1 H_res[kept, :]
                cc = _lower_solve(lk, v[:, kcols].T)                       # L^-1 H_res[kept, kept] L^-T
            else:
                c_new = _lower_solve(lk, bc[kk])                           # L^-1 B_res[kept]  (s' x m)
                v = c_new @ self._Br.T                                                               # C B_res^T
                nb = self._nb
                if nb:
                    v -= (c_new @ self._C[:nb].T) @ self._R[:nb]
                cc = c_new @ c_new.T
            cc = 0.5 * (cc + cc.T)
            w_new = v - 0.5 * (cc @ r_new)
            q = kk.size
            nb = self._nb
            self._R[nb:nb + q] = r_new
            if self._mode == "h":
                self._W[nb:nb + q] = w_new
            else:
                self._C[nb:nb + q] = c_new
            self._nb = nb + q
            self._update_stats(r_new, w_new)
            self.value += max(float(np.trace(cc)), 0.0)
            self.kept.extend(int(c) for c in cols_orig[kk])
        self.value = min(self.value, prob.y_norm2)
        self._cache = None

    def _add_column(self, col: int, col_orig: int, g: np.ndarray, hc: np.ndarray | None,
                    bc: np.ndarray | None) -> None:
        """Rank-1 case of :meth:`_add_unit` (a unit with one column), with scalars instead of factorisations."""
        d = g[col]
        if not d > self._thr[col]:
            self.skipped.append(col_orig)
            return
        sq = np.sqrt(d)
        r = g / sq
        nb = self._nb
        if self._mode == "h":
            v = hc[:, 0] / sq
            cc = hc[col, 0] / d
        else:
            c = bc[0] / sq
            v = self._Br @ c
            if nb:
                v -= self._R[:nb].T @ (self._C[:nb] @ c)
            cc = float(c @ c)
            self._C[nb] = c
        w = v - (0.5 * cc) * r
        self._R[nb] = r
        if self._mode == "h":
            self._W[nb] = w
        self._nb = nb + 1
        self._update_stats(r[None, :], w[None, :])
        self.value = min(self.value + max(cc, 0.0), self._prob.y_norm2)
        self.kept.append(col_orig)

    def _flush(self) -> None:
        """Apply the block's delayed rank-``nb`` update with BLAS-3, compact, refresh the candidates' statistics."""
        nb = self._nb
        if nb == 0:
            return
        self._apply_block(nb)
        self._nb = 0
        compacted = self._compact()
        if compacted or self._prob.s_max == 1:
            # Exact statistics from the updated matrices (cheap for single columns; for groups the per-unit blocks
            # are kept by the rank-q updates and recomputed only when the matrices are compacted).
            self._refresh()

    def _apply_block(self, nb: int) -> None:
        rt = self._R[:nb].T                      # (p_active, nb), F-contiguous
        inplace(blas.dsyrk(-1.0, rt, beta=1.0, c=self._Gr, trans=0, lower=0, overwrite_c=1), self._Gr)  # G -= R^T R
        if self._mode == "h":                                                                 # H -= W^T R + R^T W
            inplace(blas.dsyr2k(-1.0, self._W[:nb].T, rt, beta=1.0, c=self._Hr, trans=0, lower=0, overwrite_c=1),
                     self._Hr)
        else:                                                                                 # B -= R^T C
            bt = self._Br.T
            inplace(blas.dgemm(-1.0, self._C[:nb].T, rt, beta=1.0, c=bt, trans_b=1, overwrite_c=1), bt)


def _lower_solve(low: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``low^-1 rhs`` for a small lower-triangular ``low`` (LAPACK trtrs, without scipy's input checks)."""
    x, info = lapack.dtrtrs(low, rhs, lower=1)
    if info != 0:  # pragma: no cover - the diagonal of a kept factor is positive by construction
        raise np.linalg.LinAlgError(f"dtrtrs failed with info={info}")
    return x


def _group_gains(gb: np.ndarray, hb: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact gains of all groups from their residual blocks (n, s, s), eliminating columns in group order.

    Column ``i`` of a group contributes ``h_ii / g_ii`` (after the earlier columns of the group were projected
    out) when ``g_ii > thr_i`` and nothing otherwise, exactly as :meth:`ForwardRegressionState._add` does.
    """
    gb = gb.copy()
    hb = hb.copy()
    n, s, _ = gb.shape
    gains = np.zeros(n)
    useful = np.zeros(n, dtype=bool)
    for i in range(s):
        d = gb[:, i, i]
        ok = d > thr[:, i]
        inv = np.where(ok, 1.0 / np.where(ok, d, 1.0), 0.0)
        cc = np.maximum(hb[:, i, i] * inv, 0.0)
        gains += cc
        useful |= ok
        if i + 1 < s:
            sq = np.sqrt(inv)[:, None]
            r = gb[:, i, i + 1:] * sq
            v = hb[:, i, i + 1:] * sq
            w = v - 0.5 * cc[:, None] * r
            gb[:, i + 1:, i + 1:] -= r[:, :, None] * r[:, None, :]
            cross = w[:, :, None] * r[:, None, :]
            hb[:, i + 1:, i + 1:] -= cross + cross.transpose(0, 2, 1)
    return gains, useful


# ---------------------------------------------------------------------- factorisations for refits and values
def _potrf_first_bad(block: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, int]:
    """Cholesky ``block = L L^T``; return ``(L, q)`` where ``q`` is the first column whose pivot is ``<= thr``
    (or whose leading minor is not positive definite), ``-1`` if none."""
    low, info = lapack.dpotrf(block, lower=1, clean=1, overwrite_a=0)
    if info < 0:  # pragma: no cover - argument error inside LAPACK
        raise RuntimeError(f"dpotrf argument error {info}")
    if info > 0:
        q = info - 1
        piv = np.diag(low)[:q] ** 2
        bad = np.flatnonzero(~(piv > thr[:q]))
        return low, int(bad[0]) if bad.size else q
    piv = np.diag(low) ** 2
    bad = np.flatnonzero(~(piv > thr))
    return low, int(bad[0]) if bad.size else -1


def cholesky_dropping(block: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor of the columns of ``block`` kept in order, dropping each column whose pivot is ``<= thr``.

    Returns ``(L, kept)`` with ``kept`` the (sorted) positions kept and ``L`` the lower factor of
    ``block[kept, kept]``. One factorisation per dropped column: meant for few drops.
    """
    kept = np.arange(block.shape[0])
    while kept.size:
        low, q = _potrf_first_bad(block[np.ix_(kept, kept)], thr[kept])
        if q < 0:
            return low, kept
        kept = np.delete(kept, q)
    return np.zeros((0, 0)), kept


def factor_in_order(prob: Problem, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factor of ``G[cols, cols] + ridge I`` over the non-degenerate columns, in the given order.

    A column is degenerate when its squared residual norm on the earlier kept columns is ``<= tol * ref``, the
    same rule as the greedy state. Returns ``(L, kept)`` with ``kept`` positions into ``cols``.
    """
    if cols.size == 0:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    block = prob.regularised_block(cols)
    thr = prob.tol * prob.ref[cols]
    low, q = _potrf_first_bad(block, thr)
    if q < 0:
        return low, np.arange(cols.size)
    if cols.size - q > 16:
        # Many columns may be degenerate (e.g. fewer rows than columns): find them with the blocked greedy state
        # on the sub-problem, adding the columns in order, then factor the kept ones.
        sub = Problem(prob.gram[np.ix_(cols, cols)], prob.cross[cols], prob.y_norm2, prob.ridge,
                      [np.array([i]) for i in range(cols.size)], prob.tol)
        state = ForwardRegressionState(sub)
        for i in range(cols.size):
            state.add(i)
        pre = np.array(sorted(state.kept), dtype=np.int64)
        low, kept_in_pre = cholesky_dropping(block[np.ix_(pre, pre)], thr[pre])
        return low, pre[kept_in_pre]
    low, kept = cholesky_dropping(block, thr)
    return low, kept


def solve_factored(low: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(Z, M)`` with ``Z = L^-1 rhs`` and ``M = L^-T Z = (L L^T)^-1 rhs``."""
    if low.shape[0] == 0:
        return np.zeros((0, rhs.shape[1])), np.zeros((0, rhs.shape[1]))
    z = scipy.linalg.solve_triangular(low, rhs, lower=True, check_finite=False)
    m = scipy.linalg.solve_triangular(low, z, lower=True, trans="T", check_finite=False)
    return z, m
