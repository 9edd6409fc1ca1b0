"""Classic monotone submodular objectives, each with a vectorised incremental state.

Every objective is normalised (``F(empty) = 0``), monotone and submodular under the input conditions its
constructor checks; each docstring states the formula and why it is submodular. Gains for one candidate never
depend on the other candidates in a batch (column sums are sequential over rows, row sums are along contiguous
rows), so lazy and exact greedy compare identical numbers.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from ._parallel import parallel_map, workers
from ._sr_threads import one_blas_thread
from ._validation import (
    as_float_array,
    as_index_array,
    check_ground_set_size,
    complex_message,
    frozen,
    is_symmetric,
)
from .base import GainState, SetFunction

__all__ = ["FacilityLocation", "FeatureBased", "Coverage", "LogDeterminant", "GraphCut", "Modular"]

_DISTANCE_METRICS = ("sqeuclidean", "euclidean", "cosine")


def _pairwise_similarity(X: np.ndarray, metric: str) -> tuple[np.ndarray, float]:
    """Dense similarity ``K`` (n x n, non-negative) from features ``X`` (n x p), and its shift.

    For distances ``K = shift - D`` with ``shift = max(D)``; for cosine ``K = 1 + cos`` (``shift = 1``). The shift
    is returned so that blocks of ``K`` can be rebuilt from rows of ``X`` alone (:func:`_similarity_block`).
    """
    if X.shape[0] == 0:
        raise ValueError("X has no rows: the ground set is empty. Pass at least one item.")
    # One n x n array, updated in place: a second one would double the peak memory (1.6 GB at n = 10,000).
    if metric == "cosine":
        Xn = _unit_rows(X)
        K = Xn @ Xn.T
        K += 1.0  # shift cosine similarity from [-1, 1] to [0, 2] so facility location stays monotone
        return K, 1.0
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as a ValueError below
        D = _distances(X, X, metric)
    if not np.isfinite(D).all():
        raise ValueError("the pairwise distances of X overflow float64: its values are too large (beyond about "
                         "1e150). Rescale X (e.g. divide by its largest magnitude).")
    shift = float(D.max())
    _check_no_underflow(X, shift)
    return np.subtract(shift, D, out=D), shift


def _check_no_underflow(X: np.ndarray, shift: float) -> None:
    """Refuse distances that all underflowed to 0 while the rows of ``X`` differ: ``K = max(D) - D`` would then be
    0 everywhere and greedy would select nothing, as if every item were a duplicate."""
    if shift == 0.0 and X.shape[0] > 1 and float(np.ptp(X, axis=0).max(initial=0.0)) > 0.0:
        raise ValueError("the pairwise distances of X underflow to 0 although its rows differ: its values are too "
                         "small (below about 1e-154). Rescale X (e.g. divide by its largest magnitude).")


def _distances(Xr: np.ndarray, Xc: np.ndarray, metric: str, rows: np.ndarray | None = None,
               cols: np.ndarray | None = None, col_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean (``metric="sqeuclidean"``) or Euclidean distances between the rows of ``Xr`` and of
    ``Xc``, as one array updated in place (a block of a large ground set is most of a worker's memory). An item's
    distance to itself is exactly 0: the diagonal when ``Xr`` and ``Xc`` are the same rows, else the pairs where the
    item numbers ``rows`` and ``cols`` meet (``cols=None`` with ``rows`` given: ``Xc`` is the whole ground set, so
    row ``t`` is item ``rows[t]`` of it). ``col_sq``, the squared norms of the rows of ``Xc``, saves recomputing them
    for every block of rows against the same ``Xc``."""
    D = (-2.0 * Xr) @ Xc.T    # scaling by -2 is exact, so this is -2 (Xr @ Xc.T) without a pass over D
    D += np.einsum("ij,ij->i", Xr, Xr)[:, None]
    D += (np.einsum("ij,ij->i", Xc, Xc) if col_sq is None else col_sq)[None, :]
    np.maximum(D, 0.0, out=D)
    if rows is None:
        np.fill_diagonal(D, 0.0)
    elif cols is None:
        D[np.arange(rows.size), rows] = 0.0
    else:
        _, at_r, at_c = np.intersect1d(rows, cols, assume_unique=True, return_indices=True)
        D[at_r, at_c] = 0.0
    if metric == "euclidean":
        np.sqrt(D, out=D)
    return D


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """The rows of ``X`` scaled to unit length (zero rows stay zero), for cosine similarity at any scale.

    Each row is first multiplied by the power of two that brings its largest magnitude into ``[0.5, 1)``: exact,
    and the same division afterwards, so rows of ordinary size get the same bits; without it a squared norm
    overflows beyond about ``1e154`` or underflows below about ``1e-154``, and the row became a zero vector.
    """
    _, exponent = np.frexp(np.max(np.abs(X), axis=1, initial=0.0))
    Xs = np.ldexp(X, -exponent[:, None])
    norms = np.linalg.norm(Xs, axis=1)
    norms[norms == 0] = 1.0
    return Xs / norms[:, None]


def _similarity_block(X: np.ndarray, rows: np.ndarray, cols: np.ndarray, metric: str, shift: float) -> np.ndarray:
    """``K[rows][:, cols]`` of :func:`_pairwise_similarity` ``(X, metric)``, from those rows of ``X`` only.

    The same arithmetic as the full matrix (:func:`_distances`), so equal to its block up to the rounding of the
    matrix product over fewer rows; an item's distance to itself is exactly 0, as in the full matrix.
    """
    Xr, Xc = X[rows], X[cols]
    if metric == "cosine":
        K = _unit_rows(Xr) @ _unit_rows(Xc).T
        K += 1.0
        return K
    D = _distances(Xr, Xc, metric, rows, cols)
    # shift - D, in place; rounding can push an entry a hair below 0, which facility location must not see
    np.subtract(shift, D, out=D)
    return np.maximum(D, 0.0, out=D)


def _knn_similarity(X: np.ndarray, metric: str, n_neighbors: int) -> sp.csc_matrix:
    """The k-nearest-neighbour similarity of :class:`FacilityLocation` (``n x n``, CSC, ``n * n_neighbors`` entries).

    Row ``i`` (an item) keeps the similarities of its ``n_neighbors`` nearest candidates: itself first, then the
    others by increasing distance (decreasing cosine), ties broken by the smaller index; every other entry is 0.
    Euclidean neighbours are ranked by squared distance (the same order, save where two squared distances round
    to one distance: the smaller squared distance then goes first).
    The values are those of the dense matrix, ``K = shift - D`` with the global ``shift = max(D)`` over all pairs
    (``1 + cos`` for cosine), so the result is the dense :func:`_pairwise_similarity` with the far entries of each
    row set to 0, up to rounding: a block of rows times all columns can round differently from the full product
    (a few units in the last place). Computed block by block of rows against all columns, one block per thread of
    the shared pool: memory ``O(n * n_neighbors + workers * block * n)``.
    With ``n_neighbors >= n`` every entry is kept: the dense matrix itself (the same arithmetic, so the same bits).
    """
    n = X.shape[0]
    if n_neighbors >= n:
        K, _ = _pairwise_similarity(X, metric)
        return sp.csc_matrix(K)
    k = n_neighbors
    cosine = metric == "cosine"
    Xu = _unit_rows(X) if cosine else X
    col_sq = None if cosine else np.einsum("ij,ij->i", X, X)
    nearest = np.empty((n, k), dtype=np.int64)
    keys = np.empty((n, k))   # distance of each kept pair (minus the cosine for cosine)
    block = min(n, max(_KNN_BLOCK_MIN_ROWS, _KNN_BLOCK_ENTRIES // n))
    probe_step = _knn_probe_step(n, k)

    def build(starts: list[int]) -> float:
        """Rows ``[lo, lo + block)`` for each ``lo`` in ``starts``; returns their largest squared distance."""
        top = 0.0
        for lo in starts:
            hi = min(lo + block, n)
            rows = np.arange(lo, hi)
            if cosine:
                D = Xu[lo:hi] @ Xu.T
                np.negative(D, out=D)     # rank by -cos: the most similar first
            else:
                # Squared distances rank as the distances do; the square root is taken of the kept ones only.
                with np.errstate(over="ignore", invalid="ignore"):
                    D = _distances(X[lo:hi], X, "sqeuclidean", rows, col_sq=col_sq)
                    block_top = float(D.max())   # NaN where an overflow met its opposite (inf - inf)
                if not np.isfinite(block_top):   # (tested before max(): Python's max(top, nan) is top)
                    raise ValueError("the pairwise distances of X overflow float64: its values are too large "
                                     "(beyond about 1e150). Rescale X (e.g. divide by its largest magnitude).")
                top = max(top, block_top)
            own = (np.arange(hi - lo), rows)
            self_key = D[own]
            D[own] = -np.inf              # every item is its own first neighbour
            cols = _k_smallest(D, k, probe_step)
            nearest[lo:hi] = cols
            keys[lo:hi] = np.take_along_axis(D, cols, axis=1)
            keys[lo:hi, 0] = self_key
        return top

    # The blocks are dealt to the shared pool's threads (:func:`workers`, two here), each calling BLAS on
    # one thread: on the quiet 2-core machine the build took 1.6x-1.9x less time than one thread over every block
    # (n = 20,000 and 50,000, 20 features); on a busy one neither helps. Several BLAS threads per block product
    # ran 3x slower under load.
    starts = list(range(0, n, block))
    w = min(workers(), len(starts))
    with one_blas_thread():
        top = max(parallel_map(build, [starts[i::w] for i in range(w)]))
    if metric == "euclidean":   # sqrt is monotone and correctly rounded: sqrt(max) = max(sqrt), bit for bit
        np.sqrt(keys, out=keys)
        top = float(np.sqrt(top))
    shift = 1.0 if cosine else top
    if not cosine:
        _check_no_underflow(X, shift)
    values = np.subtract(shift, keys, out=keys)   # shift - D; for cosine 1 - (-cos) = 1 + cos
    np.maximum(values, 0.0, out=values)
    K = sp.csr_matrix((values.ravel(), nearest.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    return K.tocsc()


#: Entries of one block of distances in the k-nearest-neighbour build (rows x n, float64: 4 MiB), and the fewest
#: rows of a block: fewer make the matrix product inefficient (at n = 50,000 with 50 features, blocks of 8 rows
#: took 40 s in all, 32 rows 28 s, 64 rows 25 s, on one thread of the development machine).
_KNN_BLOCK_ENTRIES = 1 << 19
_KNN_BLOCK_MIN_ROWS = 32


def _knn_probe_step(n: int, k: int) -> int:
    """The stride of the probe columns of :func:`_k_smallest`: at least ``2 k`` of them, about ``4 sqrt(k n)``."""
    return max(1, n // max(2 * k, int(4 * np.sqrt(k * n))))


def _k_smallest(D: np.ndarray, k: int, probe_step: int) -> np.ndarray:
    """Columns of the ``k`` smallest entries of each row of ``D`` (finite or ``-inf``), ordered by (value, column).

    Exact, with ties broken by the smaller column. The ``k``-th smallest entry of each row over the probe columns
    ``0, probe_step, 2 probe_step, ...`` (at least ``k`` of them) bounds the row's ``k``-th smallest entry from
    above, so the entries at or below it hold the answer (about ``k * probe_step`` of them per row on data in no
    particular order); they are sorted by (row, value) with a stable sort, which keeps equal values in column
    order. (A strided view of the probe columns copies 3x faster than a fancy index.) Where the probes mislead
    (many ties, or data laid out on the stride: up to every entry of a row at or below the bound, and a sort 50x
    slower than the distances), each row's ``k`` smallest are first chosen exactly (:func:`_k_smallest_mask`).
    """
    b, n = D.shape
    bound = np.partition(D[:, ::probe_step], k - 1, axis=1)[:, k - 1]
    below = D <= bound[:, None]
    if np.count_nonzero(below) * _KNN_SORT_FRACTION > b * n:
        below = _k_smallest_mask(D, k)
    flat = np.flatnonzero(below)  # row-major: columns ascending within a row (10x faster than a 2-D np.nonzero)
    r, c = np.divmod(flat, n)
    order = np.lexsort((D.ravel()[flat], r))
    starts = np.zeros(b, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=b)[:-1], out=starts[1:])
    return c[order[(starts[:, None] + np.arange(k)).ravel()]].reshape(b, k)


#: Beyond ``1 / _KNN_SORT_FRACTION`` of a block's entries at or below the probed bounds, :func:`_k_smallest`
#: selects each row's ``k`` smallest exactly before sorting: about where the sort of those entries (about 100 ns
#: each) costs as much as the selection (about 6 ns per entry of the block, measured at n = 20,000).
_KNN_SORT_FRACTION = 16


def _k_smallest_mask(D: np.ndarray, k: int) -> np.ndarray:
    """Where the ``k`` smallest entries of each row of ``D`` are (exactly ``k`` per row, ties to the smaller column).

    The row's ``k``-th smallest value (a selection, linear in the row's length), every entry below it, and as many
    entries equal to it as are still missing, the leftmost first: those are counted over the first ``w`` columns,
    ``w`` growing 4x at a time until every row has enough (where ties abound, a few columns hold them).
    """
    n = D.shape[1]
    kth = np.partition(D, k - 1, axis=1)[:, k - 1:k]
    mask = D < kth
    ties = D == kth
    missing = k - np.count_nonzero(mask, axis=1)
    if np.array_equal(np.count_nonzero(ties, axis=1), missing):   # no tie to break at the k-th value
        return mask | ties
    w = min(n, 64 * k)
    while w < n and np.any(np.count_nonzero(ties[:, :w], axis=1) < missing):
        w = min(n, 4 * w)
    rank = np.cumsum(ties[:, :w], axis=1, dtype=np.int64)
    mask[:, :w] |= ties[:, :w] & (rank <= missing[:, None])
    return mask


class FacilityLocation(SetFunction):
    r"""Facility location, ``F(S) = sum_i max_{j in S} K[i, j]`` (with ``max`` over the empty set = 0).

    Item ``i`` is represented by its most similar chosen item ``j``. Monotone and submodular for ``K >= 0``
    (a pointwise maximum of non-negative modular terms; Cornuejols, Fisher & Nemhauser 1977).

    Parameters
    ----------
    X : array of shape (n, p), optional
        Features; the similarity is built with ``metric``.
    metric : {"sqeuclidean", "euclidean", "cosine"}, default "sqeuclidean"
        For distances, ``K = max(D) - D`` (the convention of apricot and submodlib); for cosine,
        ``K = 1 + cos``.
    similarity : array of shape (n, n) or scipy sparse matrix, optional
        A precomputed non-negative similarity instead of ``X``. ``K[i, j]`` is how well candidate ``j``
        represents item ``i``; a sparse matrix (e.g. a k-nearest-neighbour graph) treats missing entries as 0.
    n_neighbors : int, optional
        Only with ``X``: keep, for each item ``i``, the similarities to its ``n_neighbors`` nearest candidates
        (itself included) and treat every other entry as 0. The ``n x n`` matrix is never formed: it is built
        block by block of rows, in ``O(n * n_neighbors)`` memory plus a block per thread, and ``similarity`` is then a
        scipy sparse matrix. ``n_neighbors >= n`` keeps every entry: the dense objective's values exactly.
        ``None`` (default): the dense similarity. See *k nearest neighbours* below.

    Notes
    -----
    *k nearest neighbours* (``n_neighbors=k``). Row ``i`` of ``K`` (the item) keeps its ``k`` nearest candidates:
    item ``i`` itself first (``K[i, i]`` is the row's largest similarity, even when a duplicate of ``i`` is just as
    close), then the others by increasing distance (decreasing cosine), a tie at the ``k``-th distance going to the
    smaller index. (Distances are computed as ``|x|^2 + |y|^2 - 2 x.y``; Euclidean ones are ranked by their
    squares, which differs only where two squares round to one distance.) The kept values are the dense matrix's,
    ``K[i, j] = max(D) - D[i, j]`` with ``max(D)`` over *all* pairs (taken during the same blockwise pass, at no
    extra cost), and ``1 + cos`` for cosine, up to the rounding of the blockwise matrix product (a few units in the
    last place; ``n_neighbors >= n`` builds the dense matrix itself). So the sparse ``K`` is the dense one with
    each row's far entries set to 0: it is non-negative, ``F`` stays monotone and submodular, ``F(S)`` never
    exceeds the dense objective (but for that rounding), and item ``i`` contributes its dense term whenever ``S``
    holds one of its ``k`` nearest candidates. (A
    shift taken over the kept distances only would give the farthest kept pair a similarity of 0 and change every
    value with ``k``.) ``K`` is not symmetric. :meth:`restrict` slices this sparse ``K`` like a precomputed one,
    and its local objective (``local=True``) is the restriction of the same global neighbour graph to the part,
    not a neighbour graph recomputed inside it.

    The peers differ. apricot's ``FacilityLocationSelection(n_neighbors=k)`` uses scikit-learn's
    ``KNeighborsTransformer``: ``k`` neighbours plus the item itself, and a candidate ``c`` represents the items
    among *its own* neighbours (the transpose of the graph here); with ``n_neighbors`` its ``"euclidean"`` is the
    plain Euclidean distance (squared without it), the shift is the largest *kept* distance, and cosine becomes
    ``cos^2``. So ``FacilityLocation(X, metric="euclidean", n_neighbors=k + 1)`` keeps apricot's pairs,
    transposed, with a different shift. submodlib's ``FacilityLocationFunction(mode="sparse", num_neighbors=k)``
    stores the graph as here (row ``i`` keeps its ``k`` most similar, itself included, ties in heap order), with
    similarity ``exp(-||x - y|| / p)`` (``p`` features) or the raw cosine, in float32; its objective then reads the
    matrix as symmetric, keeping a pair when either item is among the other's neighbours (``max(K, K^T)``;
    observed with submodlib-py 0.0.3). ``tests/test_fl_knn.py`` checks both peers after these conversions.

    A dense ``similarity`` is used by reference, not copied (an ``n x n`` copy would double the memory of large
    problems); ``f.similarity`` is a read-only view of it. Do not modify the array while the objective is in
    use: the symmetry test, the first bounds of lazy greedy and a transposed copy are derived from it once. Pass
    ``similarity=K.copy()`` to decouple them. (A sparse ``similarity`` is copied.) Symmetry is detected with a
    fixed probe vector ``v``, as ``K v = K^T v`` up to rounding: an asymmetric matrix whose antisymmetric part
    happens to annihilate ``v`` would be taken for symmetric, which does not occur for data that was not built
    against this ``v``; symmetrise such a matrix or transpose it yourself.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> K = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.9], [0.0, 0.9, 1.0]])
    >>> f = submod.FacilityLocation(similarity=K)
    >>> f.value([1])  # 0.2 + 1.0 + 0.9
    2.1
    >>> submod.maximize(f, 2).selected.tolist()
    [1, 0]

    From features, each item keeping its 2 nearest candidates (itself and one other): the four points on a
    line 0, 1, 3, 7 have ``max(D) = 49``.

    >>> X = np.array([[0.0], [1.0], [3.0], [7.0]])
    >>> g = submod.FacilityLocation(X, n_neighbors=2)
    >>> g
    FacilityLocation(n=4, n_neighbors=2)
    >>> g.similarity.toarray()
    array([[49., 48.,  0.,  0.],
           [48., 49.,  0.,  0.],
           [ 0., 45., 49.,  0.],
           [ 0.,  0., 33., 49.]])
    >>> g.value([2]), submod.FacilityLocation(X).value([2])   # 49 + 33 against 40 + 45 + 49 + 33
    (82.0, 167.0)
    >>> submod.FacilityLocation(X, n_neighbors=4).value([2]) == submod.FacilityLocation(X).value([2])
    True
    """

    submodular = True
    monotone = True

    #: The number of nearest candidates each item keeps (``None``: all of them, a dense similarity).
    n_neighbors: int | None = None

    def __init__(self, X: ArrayLike | None = None, *, metric: str = "sqeuclidean",
                 similarity: ArrayLike | sp.spmatrix | None = None, n_neighbors: int | None = None) -> None:
        if (X is None) == (similarity is None):
            raise ValueError("pass exactly one of X (features) or similarity= (a precomputed matrix).")
        if metric not in _DISTANCE_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {_DISTANCE_METRICS} or pass "
                             "similarity= directly.")
        if n_neighbors is not None:
            if similarity is not None:
                raise ValueError("n_neighbors builds a k-nearest-neighbour similarity from features X; it cannot "
                                 "sparsify a precomputed similarity=. Pass the features as X, or pass your own "
                                 "sparse matrix (each row's largest entries) as similarity= without n_neighbors.")
            if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral):
                raise ValueError(f"n_neighbors must be a positive integer (or None for the dense similarity); got "
                                 f"{n_neighbors!r}.")
            if n_neighbors < 1:
                raise ValueError(f"n_neighbors must be at least 1 (each item counts itself as its first "
                                 f"neighbour); got {n_neighbors}.")
            n_neighbors = int(n_neighbors)
        scan = None
        if similarity is not None:
            if np.iscomplexobj(similarity):  # the float64 conversions below would keep the real part, silently
                raise ValueError(complex_message("similarity"))
            if sp.issparse(similarity):
                K = sp.csc_matrix(similarity, dtype=np.float64, copy=True)  # sum_duplicates works in place
                if K.shape[0] != K.shape[1]:
                    raise ValueError(f"similarity must be square (n x n); got shape {K.shape}.")
                K.sum_duplicates()
                if not np.all(np.isfinite(K.data)):
                    raise ValueError("similarity contains NaN or infinite values; remove them first.")
                if K.nnz and K.data.min() < 0:
                    raise ValueError("similarity has negative entries, which break monotonicity of facility "
                                     "location; shift it (K - K.min()) or clip it at 0.")
                self._sparse = True
            else:
                try:
                    K = np.asarray(similarity, dtype=np.float64)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"similarity must be a numeric matrix ({exc}).") from exc
                if K.ndim != 2 or K.shape[0] != K.shape[1]:
                    raise ValueError(f"similarity must be square (n x n); got shape {K.shape}. For features, "
                                     "pass them as X instead.")
                scan = _scan_similarity(K)
                if not scan.finite:
                    raise ValueError("similarity contains NaN or infinite values; remove them first.")
                if scan.minimum < 0:
                    raise ValueError("similarity has negative entries, which break monotonicity of facility "
                                     "location; shift it (K - K.min()) or clip it at 0.")
                self._sparse = False
        else:
            Xa = as_float_array(X, "X", ndim=2)
            if Xa.shape[0] == 0:
                raise ValueError("X has no rows: the ground set is empty. Pass at least one item.")
            if n_neighbors is None:
                K, shift = _pairwise_similarity(Xa, metric)
            else:
                K = _knn_similarity(Xa, metric, n_neighbors)
            self._sparse = n_neighbors is not None
        # The features behind a dense K (for restrict: a part's block is rebuilt from its rows of X, never
        # shipped). A k-nearest-neighbour K is restricted by slicing, like any sparse similarity.
        self._features = (frozen(Xa, copy=False), metric, shift) if X is not None and not self._sparse else None
        if not self._sparse:
            K = frozen(K, copy=False)  # by reference (an n x n copy is too much memory), read-only through f
        # K^T with contiguous rows, used for fresh gains: K itself when symmetric (always, from features).
        kt = K if self._features is not None or (not self._sparse and scan.symmetric) else None
        super().__init__(K.shape[0])
        self.n_neighbors = n_neighbors
        self.similarity = K
        self._kt: np.ndarray | None = kt
        self._column_bounds = scan.column_bounds if scan is not None else None

    def init_state(self) -> GainState:
        if self._sparse:
            return _SparseFacilityState(self.similarity)
        return _DenseFacilityState(self)

    def __repr__(self) -> str:
        if self.n_neighbors is None:
            return super().__repr__()
        return f"{type(self).__name__}(n={self.n}, n_neighbors={self.n_neighbors})"

    def _rows_by_candidate(self) -> np.ndarray:
        """``K^T`` as a C-contiguous array (``K`` itself when symmetric), computed once when first needed."""
        if self._kt is None:
            self._kt = np.ascontiguousarray(self.similarity.T)
        return self._kt

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> FacilityLocation:
        r"""Facility location over the candidates ``indices`` (see :meth:`SetFunction.restrict`).

        Exact (default): every item ``i`` of the ground set is still represented,
        ``F'(S) = sum_{i in V} max_{s in S} K[i, indices[s]] = F(indices[S])``; the result holds the
        ``n x len(indices)`` block of columns. ``local=True``: GreeDi's *local* objective, only the candidates
        themselves are represented, ``F'(S) = sum_{i in indices} max_{s in S} K[i, indices[s]]``, a
        ``len(indices)^2`` block: ``n_parts`` times less memory and work per part, but it is a different function
        and the worst-case guarantee of :func:`submod.maximize_distributed` does not cover it (its certificate,
        computed on the full objective, still does).

        Built from features ``X``, the result keeps the rows of ``X`` it needs (all of them for the exact
        restriction, the candidates' for the local one) and computes its block when first used, so that a worker
        receives features, not similarities. A precomputed similarity is sliced (a dense block is copied).

        Examples
        --------
        >>> import numpy as np
        >>> import submod
        >>> K = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.9], [0.0, 0.9, 1.0]])
        >>> f = submod.FacilityLocation(similarity=K)
        >>> f.restrict([2, 0]).value([0]) == f.value([2])             # 0.0 + 0.9 + 1.0
        True
        >>> f.restrict([2, 0], local=True).value([0])                 # items 2 and 0 only: 1.0 + 0.0
        1.0
        """
        idx = self._restrict_indices(indices)
        items = idx if local else None
        if self._features is not None:
            X, metric, shift = self._features
            if local:  # only the candidates' rows: they are both the items and the candidates of the block
                own = np.arange(idx.size)
                return _FacilityBlock(features=(frozen(X[idx], copy=False), own, own, metric, shift))
            return _FacilityBlock(features=(X, idx, items, metric, shift))
        if self._sparse:
            block = self.similarity[:, idx]
            return _FacilityBlock(similarity=block[items] if local else block)
        kt = self._rows_by_candidate()
        return _FacilityBlock(kt=kt[np.ix_(idx, items)] if local else kt[idx])


class _FacilityBlock(FacilityLocation):
    """Facility location with a rectangular similarity: items (rows) represented by candidates (columns).

    What :meth:`FacilityLocation.restrict` returns. The block is held as ``K^T`` (candidates by items, C order:
    the rows the gains read) with ``similarity`` its transposed view, or as a sparse CSC matrix; from features it
    is computed on first use and is not pickled (a worker rebuilds it from the features it received).
    """

    def __init__(self, *, kt: np.ndarray | None = None, similarity: sp.spmatrix | None = None,
                 features: tuple | None = None) -> None:
        self._kt = None if kt is None else frozen(np.ascontiguousarray(kt), copy=False)
        self._sparse_block = None if similarity is None else sp.csc_matrix(similarity)
        self._spec = features
        self._sparse = similarity is not None
        self._features = None
        self._column_bounds = None
        if features is not None:
            n = features[1].size
        elif kt is not None:
            n = kt.shape[0]
        else:
            n = similarity.shape[1]
        SetFunction.__init__(self, n)

    @property
    def similarity(self) -> np.ndarray | sp.csc_matrix:  # type: ignore[override]
        """The block ``K[items][:, candidates]`` (read-only view; built from the features on first use)."""
        if self._sparse:
            return self._sparse_block
        return self._rows_by_candidate().T

    def _rows_by_candidate(self) -> np.ndarray:
        if self._kt is None:
            X, cand, items, metric, shift = self._spec
            rows = np.arange(X.shape[0]) if items is None else items
            self._kt = frozen(_similarity_block(X, cand, rows, metric, shift), copy=False)
        return self._kt

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> FacilityLocation:
        """Fewer candidates, the same items (``local`` is ignored: a block has no items of its own to keep)."""
        idx = self._restrict_indices(indices)
        if self._spec is not None:
            X, cand, items, metric, shift = self._spec
            return _FacilityBlock(features=(X, cand[idx], items, metric, shift))
        if self._sparse:
            return _FacilityBlock(similarity=self._sparse_block[:, idx])
        return _FacilityBlock(kt=self._kt[idx])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._spec is not None:
            state["_kt"] = None  # rebuilt from the features where it is used
        return state


class _Scan(NamedTuple):
    finite: bool
    minimum: float
    symmetric: bool
    column_bounds: np.ndarray


def _scan_similarity(K: np.ndarray, block: int = 64) -> _Scan:
    """Check a square ``K`` in one pass over memory: finiteness, minimum, symmetry, column-sum bounds.

    With a fixed random probe ``v`` in ``[1, 1.001)``, the matrix-vector products ``K v`` and ``K^T v`` are
    non-finite if any entry is (then confirmed element by element, so an overflow cannot raise a false alarm),
    and ``K^T v >= K^T 1`` bounds the column sums from above when ``K >= 0`` (lazy greedy's first bounds). ``K``
    is treated as symmetric when ``|K v - K^T v| <= 1e-12 (K v + K^T v)`` entrywise: symmetric up to rounding,
    all that the row-wise gain evaluation needs; an asymmetric ``K`` is transposed once instead. Both products
    and the minimum are taken block by block of rows, so each block is read from memory once and reused from
    cache; the two halves of the rows go to two threads, each calling BLAS on one thread (several BLAS threads
    on such small products only add synchronisation).
    """
    n = K.shape[0]
    v = 1.0 + 1e-3 * np.random.default_rng(20221128).random(n)
    right = np.empty(n)

    def scan_rows(bounds: tuple[int, int]) -> tuple[np.ndarray, float]:
        left_part, low = np.zeros(n), np.inf
        for lo in range(bounds[0], bounds[1], block):
            rows = K[lo:min(lo + block, bounds[1])]
            right[lo:lo + rows.shape[0]] = rows @ v
            left_part += v[lo:lo + rows.shape[0]] @ rows
            low = min(low, float(rows.min()))
        return left_part, low

    cut = (n // (2 * block)) * block if n >= 4 * block else n
    with one_blas_thread():
        halves = parallel_map(scan_rows, [(0, cut), (cut, n)] if cut < n else [(0, n)])
    left = sum(h[0] for h in halves)
    minimum = min(h[1] for h in halves)
    finite = bool(np.isfinite(right).all() and np.isfinite(left).all()) or bool(np.isfinite(K).all())
    if not finite:
        return _Scan(False, np.nan, False, left)
    symmetric = bool(np.all(np.abs(right - left) <= 1e-12 * (np.abs(right) + np.abs(left)) + 1e-300))
    return _Scan(True, minimum, symmetric, left)


class _DenseFacilityState(GainState):
    """Gains of candidate ``c`` are ``sum_i max(K[i, c] - cur_i, 0)``.

    Fresh gains read candidates as contiguous rows of ``K^T`` (``K`` itself when symmetric) and sum each row
    along its contiguous axis, so a candidate's gain has the same bits whatever the batch. Exact greedy uses
    the incremental path (:meth:`_incremental_init`, :meth:`_incremental_update`): after a pick only the rows
    whose best similarity rose change the gains, so a step costs ``O(|changed rows| * n)``.
    """

    def __init__(self, f: FacilityLocation) -> None:
        super().__init__(f.n)
        self._Kt = f._rows_by_candidate()
        self._K = f.similarity
        self._column_bounds = f._column_bounds
        self._cur = np.zeros(self._K.shape[0])   # best similarity of each item (rows; n of them unless restricted)
        self._old = self._cur

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        cand = self._all(candidates)
        base = self._cur.sum()
        # Large batches (lazy greedy's first re-evaluation after a pick, stochastic samples) are split over the
        # cores; each row's sum is computed the same way in any split.
        parts = np.array_split(cand, workers()) if cand.size >= 128 else [cand]
        out = np.concatenate(parallel_map(self._row_sums, parts)) - base
        np.maximum(out, 0.0, out=out)
        return self._zero_in_set(out, candidates)

    def _row_sums(self, cand: np.ndarray) -> np.ndarray:
        """``sum_i max(K[i, c], cur_i)`` for each candidate ``c``, block by block of cache-sized rows."""
        out = np.empty(cand.size)
        items = self._cur.size
        block = max(1, (1 << 17) // items)
        buf = np.empty((min(block, cand.size), items))
        for lo in range(0, cand.size, block):
            c = cand[lo:lo + block]
            sub = np.maximum(self._Kt[c], self._cur, out=buf[:c.size])
            out[lo:lo + c.size] = sub.sum(axis=1)
        return out

    def _add(self, j: int) -> None:
        self._old = self._cur
        self._cur = np.maximum(self._cur, self._Kt[j])   # column j of K, read as a contiguous row
        self.value = float(self._cur.sum())

    def _upper_bounds(self) -> np.ndarray:
        """Upper bounds on the gains at the empty set: column sums, or the scan's bounds on them, inflated past
        any rounding error."""
        bounds = self._column_bounds if self._column_bounds is not None else self._K.sum(axis=0)
        return bounds * (1.0 + 1e-12) + 1e-300

    def _incremental_init(self) -> np.ndarray:
        self._inc = self._K.sum(axis=0)
        return self._inc

    def _incremental_update(self) -> np.ndarray:
        rows = np.flatnonzero(self._cur > self._old)
        if rows.size:
            # Candidate c loses sum over changed rows i of clip(K[i, c], old_i, new_i) - old_i.
            Kr = self._K[rows]
            old = self._old[rows, None]
            np.maximum(Kr, old, out=Kr)
            np.minimum(Kr, self._cur[rows, None], out=Kr)
            Kr -= old
            self._inc -= Kr.sum(axis=0)
        self._inc[self._in_set] = 0.0
        return self._inc


class _SparseFacilityState(GainState):
    def __init__(self, K: sp.csc_matrix) -> None:
        super().__init__(K.shape[1])               # candidates: columns
        self._K = K
        self._cur = np.zeros(K.shape[0])          # items: rows

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        K = self._K
        cand = self._all(candidates)
        starts, ends = K.indptr[cand], K.indptr[cand + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        out = np.zeros(cand.size)
        if total:
            # Gather the stored entries of the candidate columns, one segment per candidate.
            seg_start = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            pos = np.arange(total) + seg_start
            diff = np.maximum(K.data[pos] - self._cur[K.indices[pos]], 0.0)
            nonempty = lengths > 0
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
            out[nonempty] = np.add.reduceat(diff, offsets)
        return self._zero_in_set(out, candidates)

    def _add(self, j: int) -> None:
        K = self._K
        rows = K.indices[K.indptr[j]:K.indptr[j + 1]]
        vals = K.data[K.indptr[j]:K.indptr[j + 1]]
        self._cur[rows] = np.maximum(self._cur[rows], vals)
        self.value = float(self._cur.sum())


def _inverse(x: np.ndarray) -> np.ndarray:
    """``x / (1 + x)`` (a module-level function, so that the objective pickles)."""
    return x / (1.0 + x)


_CONCAVE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sqrt": np.sqrt,
    "log1p": np.log1p,
    "inverse": _inverse,
}


def _check_concave(phi: Callable[[np.ndarray], np.ndarray], grid: np.ndarray) -> None:
    """Refuse a ``phi`` that is not vectorised, zero at zero, non-decreasing and concave on ``grid`` (a sample: this
    cannot prove concavity). The tolerances are relative to the largest ``|phi|`` on the grid, with no absolute
    floor, so that ``c * phi`` passes or fails as ``phi`` does: a floor of 1 let a convex or decreasing ``phi`` in small
    units through, declared monotone submodular."""
    try:
        vals = np.asarray(phi(grid), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"concave must be a vectorised function of a float array, returning floats; calling it on "
                         f"an array failed ({exc}).") from exc
    if vals.shape != grid.shape:
        raise ValueError(f"concave must be vectorised: called on an array of shape {grid.shape} it returned shape "
                         f"{vals.shape}; use numpy functions (np.sqrt, np.log1p, ...) rather than math ones.")
    if not np.isfinite(vals).all():
        raise ValueError("concave returned NaN or infinite values on [0, the largest feature sum]; it must be finite "
                         "there.")
    scale = float(np.abs(vals).max())
    if abs(vals[0]) > 1e-12 * scale:
        raise ValueError(f"concave must be zero at zero (F(empty) = 0); concave(0) = {vals[0]:.6g}. Subtract it.")
    steps = np.diff(vals)
    if np.any(steps < -1e-12 * scale):
        x = float(grid[int(np.argmin(steps)) + 1])
        raise ValueError(f"concave must be non-decreasing (else F is not monotone); it decreases near x = {x:.6g}.")
    if np.any(np.diff(steps) > 1e-9 * scale):
        x = float(grid[int(np.argmax(np.diff(steps))) + 1])
        raise ValueError(f"concave must be concave (else F is not submodular); its slope increases near x = {x:.6g}. "
                         "Pass e.g. np.sqrt, np.log1p or 'inverse'.")


class FeatureBased(SetFunction):
    r"""Feature-based function, ``F(S) = sum_f w_f * phi(sum_{j in S} X[j, f])``.

    ``phi`` is concave, non-decreasing, with ``phi(0) = 0``; a concave function of a non-negative modular
    function is submodular, and a non-negative sum of submodular functions is submodular (Wei et al. 2014).

    Parameters
    ----------
    X : array of shape (n, p)
        Non-negative feature scores of each item.
    concave : {"sqrt", "log1p", "inverse"} or callable, default "sqrt"
        ``phi``; ``"inverse"`` is ``x / (1 + x)``. A callable must be vectorised, concave, non-decreasing and
        zero at zero (checked on a grid; the check cannot prove concavity, so declare it honestly).
    weights : array of shape (p,), optional
        Non-negative feature weights (default ones).

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> f = submod.FeatureBased(np.array([[4.0, 0.0], [0.0, 9.0], [5.0, 0.0]]))
    >>> f.value([0, 1])  # sqrt(4) + sqrt(9)
    5.0
    """

    submodular = True
    monotone = True

    def __init__(self, X: ArrayLike, concave: str | Callable[[np.ndarray], np.ndarray] = "sqrt",
                 weights: ArrayLike | None = None) -> None:
        Xa = as_float_array(X, "X", ndim=2)
        if Xa.shape[0] == 0:
            raise ValueError("X has no rows: the ground set is empty. Pass at least one item.")
        if Xa.size and Xa.min() < 0:
            raise ValueError("X must be non-negative for a feature-based function; shift or clip the features.")
        if isinstance(concave, str):
            if concave not in _CONCAVE:
                raise ValueError(f"unknown concave function {concave!r}; choose one of {sorted(_CONCAVE)} "
                                 "or pass a callable.")
            phi = _CONCAVE[concave]
        elif callable(concave):
            phi = concave
            # on the range F evaluates phi on, [0, the largest feature sum] (no floor of 1: in small units a grid
            # over [0, 1] would step over all of it)
            top = float(Xa.sum(axis=0).max())
            _check_concave(phi, np.linspace(0.0, top if top > 0 else 1.0, 257))
        else:
            raise ValueError(f"concave must be a name or a callable; got {type(concave).__name__}.")
        w = np.ones(Xa.shape[1]) if weights is None else as_float_array(weights, "weights", ndim=1)
        if w.shape != (Xa.shape[1],):
            raise ValueError(f"weights must have one entry per feature ({Xa.shape[1]}); got {w.shape}.")
        if np.any(w < 0):
            raise ValueError("weights must be non-negative.")
        super().__init__(Xa.shape[0])
        self.X = frozen(Xa)
        self.weights = frozen(w)
        self.concave = phi

    def init_state(self) -> GainState:
        return _FeatureState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> FeatureBased:
        """The same function of the rows ``X[indices]`` (exact: features are sums over the chosen items; ``local``
        is ignored)."""
        idx = self._restrict_indices(indices)
        out = copy.copy(self)
        out.n = idx.size
        out.X = frozen(self.X[idx], copy=False)
        return out


class _FeatureState(GainState):
    def __init__(self, f: FeatureBased) -> None:
        super().__init__(f.n)
        self._f = f
        self._m = np.zeros(f.X.shape[1])
        self._phi_m = f.concave(self._m)

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        f = self._f
        X = f.X if candidates is None else f.X[self._all(candidates)]
        out = ((f.concave(X + self._m) - self._phi_m) * f.weights).sum(axis=1)
        return self._zero_in_set(out, candidates)

    def _add(self, j: int) -> None:
        self._m = self._m + self._f.X[j]
        self._phi_m = self._f.concave(self._m)
        self.value = float((self._phi_m * self._f.weights).sum())


class Coverage(SetFunction):
    r"""Weighted coverage, ``F(S) = sum_c w_c [concept c is covered by some j in S]``.

    A weighted set cover value; monotone submodular for ``w >= 0`` (Nemhauser, Wolsey & Fisher 1978).

    Parameters
    ----------
    incidence : array or sparse matrix of shape (n, p)
        ``incidence[j, c]`` is non-zero when item ``j`` covers concept ``c``.
    weights : array of shape (p,), optional
        Non-negative concept weights (default ones).

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> sets = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    >>> f = submod.Coverage(sets)
    >>> f.value([0, 2])
    4.0
    """

    submodular = True
    monotone = True

    def __init__(self, incidence: ArrayLike | sp.spmatrix, weights: ArrayLike | None = None) -> None:
        if sp.issparse(incidence):
            if np.iscomplexobj(incidence):  # as the dense path: a complex entry is no statement of coverage
                raise ValueError(complex_message("incidence"))
            M = sp.csr_matrix(incidence, copy=True)  # eliminate_zeros works in place
            if not np.all(np.isfinite(M.data)):
                raise ValueError("incidence contains NaN or infinite values.")
        else:
            M = sp.csr_matrix(as_float_array(incidence, "incidence", ndim=2))
        M.sum_duplicates()  # one entry per (item, concept), so a concept's weight is counted once
        M.eliminate_zeros()
        M = sp.csr_matrix((np.ones_like(M.data), M.indices, M.indptr), shape=M.shape)
        if M.shape[0] == 0:
            raise ValueError("incidence has no rows: the ground set is empty. Pass at least one item.")
        w = np.ones(M.shape[1]) if weights is None else as_float_array(weights, "weights", ndim=1)
        if w.shape != (M.shape[1],):
            raise ValueError(f"weights must have one entry per concept ({M.shape[1]}); got {w.shape}.")
        if np.any(w < 0):
            raise ValueError("weights must be non-negative (a negative weight breaks monotonicity).")
        super().__init__(M.shape[0])
        self.incidence = M
        self.weights = frozen(w)
        self._csc: sp.csc_matrix | None = None  # the incidence by concept, built by the first state that needs it

    def init_state(self) -> GainState:
        return _CoverageState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> Coverage:
        """The rows ``incidence[indices]`` over the same concepts and weights (exact; ``local`` is ignored)."""
        idx = self._restrict_indices(indices)
        out = copy.copy(self)
        out.n = idx.size
        out.incidence = self.incidence[idx]
        out._csc = None
        return out

    def _by_concept(self) -> sp.csc_matrix:
        """The incidence by concept (CSC), built once, for the incremental gain updates."""
        if self._csc is None:
            self._csc = self.incidence.tocsc()
        return self._csc


class _CoverageState(GainState):
    """Gains kept up to date incrementally: a newly covered concept lowers the gain of every item covering it by its
    weight, read from the concept's column of the incidence (CSC), so a whole run touches each non-zero once
    instead of a sparse product per step. The gains are re-summed from the open weights every
    :data:`_RESUM_EVERY` picks, which bounds the rounding a long chain of subtractions could accumulate."""

    _RESUM_EVERY = 64
    _kept_gains = True

    def __init__(self, f: Coverage) -> None:
        super().__init__(f.n)
        self._f = f
        self._open = f.weights.copy()  # weight of each concept not yet covered, 0 once covered
        self._gain = np.asarray(f.incidence @ self._open, dtype=np.float64).ravel()
        self._since_resum = 0
        self._csc: sp.csc_matrix | None = None

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        return self._zero_in_set(self._of(self._gain, candidates), candidates)

    def _add(self, j: int) -> None:
        M = self._f.incidence
        concepts = M.indices[M.indptr[j]:M.indptr[j + 1]]
        new = concepts[self._open[concepts] > 0.0]
        # add the newly covered weight (total - open would cancel digits when weights differ widely in size)
        self.value += float(self._open[new].sum())
        self._open[new] = 0.0
        self._since_resum += 1
        if self._since_resum >= self._RESUM_EVERY:
            self._gain = np.asarray(M @ self._open, dtype=np.float64).ravel()
            self._since_resum = 0
        elif new.size:
            if self._csc is None:
                self._csc = self._f._by_concept()
            csc = self._csc
            ptr = csc.indptr
            # the items of each newly covered concept lose its weight (an item covering several loses each)
            items = np.concatenate([csc.indices[ptr[c]:ptr[c + 1]] for c in new.tolist()])
            np.subtract.at(self._gain, items, np.repeat(self._f.weights[new], ptr[new + 1] - ptr[new]))
            np.maximum(self._gain, 0.0, out=self._gain)


class LogDeterminant(SetFunction):
    r"""Log-determinant, ``F(S) = log det(I + K_SS / ridge)``.

    For a positive semidefinite ``K`` this is monotone (every added item multiplies the determinant by
    ``1 + residual variance / ridge >= 1``) and submodular (conditional variances shrink as ``S`` grows). It is
    the entropy-style diversity objective of determinantal point processes; gains use the incremental Cholesky
    updates of Chen, Zhang & Zhou (NeurIPS 2018), ``O(n |S|)`` per pick for all candidates.

    Parameters
    ----------
    X : array of shape (n, p), optional
        Features; ``K = X X^T`` (linear kernel).
    similarity : array of shape (n, n), optional
        A precomputed positive semidefinite kernel instead of ``X``.
    ridge : float, default 1.0
        Positive regulariser; smaller values reward diversity more sharply.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> f = submod.LogDeterminant(similarity=np.eye(3))
    >>> round(f.value([0, 1]), 6)  # log(2) * 2
    1.386294
    """

    submodular = True
    monotone = True

    def __init__(self, X: ArrayLike | None = None, *, similarity: ArrayLike | None = None,
                 ridge: float = 1.0) -> None:
        if (X is None) == (similarity is None):
            raise ValueError("pass exactly one of X (features) or similarity= (a PSD kernel).")
        if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not np.isfinite(ridge) or ridge <= 0:
            raise ValueError(f"ridge must be a positive finite number; got {ridge!r}.")
        if similarity is not None:
            K = as_float_array(similarity, "similarity", ndim=2)
            if K.shape[0] != K.shape[1]:
                raise ValueError(f"similarity must be square; got shape {K.shape}.")
            # tolerances relative to the kernel's largest entry, with no absolute floor: in small units (1e-14) a
            # floor of 1 let an asymmetric kernel through, silently symmetrised
            scale = max(-float(K.min(initial=0.0)), float(K.max(initial=0.0)))
            if not is_symmetric(K, rtol=1e-10, atol=1e-12 * scale):
                raise ValueError("similarity must be symmetric (a PSD kernel); symmetrise it with (K + K.T) / 2.")
            K = (K + K.T) / 2.0
        else:
            Xa = as_float_array(X, "X", ndim=2)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as a ValueError below
                K = Xa @ Xa.T
            if not np.isfinite(K).all():
                raise ValueError("the linear kernel X @ X.T overflows float64: the values of X are too large (beyond "
                                 "about 1e150). Rescale X (e.g. divide by its largest magnitude).")
        if K.shape[0] == 0:
            raise ValueError("the ground set is empty. Pass at least one item.")
        # Small kernels are checked here; on large ones the greedy state checks the conditional variances it
        # computes anyway (a negative one proves K is not PSD).
        scale = float(np.abs(np.diag(K)).max())   # relative, as above: c * K is PSD exactly when K is
        lam_min = float(np.linalg.eigvalsh(K)[0]) if K.shape[0] <= 500 else float(np.diag(K).min())
        if lam_min < -1e-8 * scale:
            raise ValueError(f"similarity is not positive semidefinite (eigenvalue or diagonal {lam_min:.3g}); "
                             "log-determinant needs a PSD kernel (e.g. X @ X.T or an RBF kernel).")
        super().__init__(K.shape[0])
        self.similarity = frozen(K, copy=False)  # a new array already: (K + K.T) / 2 or X @ X.T
        self.ridge = float(ridge)

    def value(self, S: ArrayLike) -> float:
        idx = as_index_array(S, self.n)
        if idx.size == 0:
            return 0.0
        sub = self.similarity[np.ix_(idx, idx)] / self.ridge + np.eye(idx.size)
        sign, logdet = np.linalg.slogdet(sub)
        if sign <= 0:  # det(I + K_SS / ridge) >= 1 for a PSD kernel: K is not PSD on S
            raise ValueError(f"the similarity is not positive semidefinite on S = {idx.tolist()} (det(I + K_SS / "
                             "ridge) <= 0); pass a PSD kernel, e.g. K = X @ X.T or an RBF kernel.")
        return float(logdet)

    def init_state(self) -> GainState:
        return _LogDetState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> LogDeterminant:
        """The kernel block ``K[indices][:, indices]`` (exact: ``F(S)`` only reads ``K_SS``; ``local`` is
        ignored)."""
        idx = self._restrict_indices(indices)
        out = copy.copy(self)
        out.n = idx.size
        out.similarity = frozen(self.similarity[np.ix_(idx, idx)], copy=False)
        return out


class _LogDetState(GainState):
    def __init__(self, f: LogDeterminant) -> None:
        super().__init__(f.n)
        self._K = f.similarity / f.ridge
        self._d2 = 1.0 + np.diag(self._K).copy()   # 1 + conditional variance of each item given S
        self._C = np.zeros((0, f.n))              # rows: Cholesky-style vectors of the picks

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        out = np.log(np.maximum(self._of(self._d2, candidates), 1.0))
        return self._zero_in_set(out, candidates)

    def _add(self, j: int) -> None:
        dj = np.sqrt(max(self._d2[j], 1e-300))
        e = (self._K[j] - self._C[:, j] @ self._C) / dj
        self.value += float(np.log(max(self._d2[j], 1.0)))
        self._C = np.vstack([self._C, e])
        self._d2 = self._d2 - e * e
        # 1 + conditional variance below 1 means a negative conditional variance: K is not PSD.
        if self._d2.min(initial=1.0) < 1.0 - 1e-8 * (1.0 + float(np.abs(np.diag(self._K)).max())):
            raise ValueError("similarity is not positive semidefinite (a conditional variance became negative); "
                             "log-determinant needs a PSD kernel (e.g. X @ X.T or an RBF kernel).")


class GraphCut(SetFunction):
    r"""Graph-cut style representativeness, ``F(S) = sum_{i in V, j in S} K[i, j] - lam * sum_{i, j in S} K[i, j]``.

    The first term rewards items similar to the whole set, the second penalises redundancy. For a symmetric
    ``K >= 0`` it is submodular, and monotone when ``0 <= lam <= 0.5`` (the gain of ``j`` is
    ``sum_i K[i, j] - lam * (2 sum_{s in S} K[s, j] + K[j, j]) >= 0``), the range this class accepts.

    Parameters
    ----------
    X : array of shape (n, p), optional
        Features; similarity built with ``metric`` as in :class:`FacilityLocation`.
    similarity : array of shape (n, n), optional
        Symmetric non-negative similarity.
    lam : float, default 0.5
        Redundancy penalty in ``[0, 0.5]``.
    metric : str, default "sqeuclidean"

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> K = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> submod.GraphCut(similarity=K, lam=0.5).value([0, 1])  # 3.0 - 0.5 * 3.0
    1.5
    """

    submodular = True
    monotone = True

    def __init__(self, X: ArrayLike | None = None, *, similarity: ArrayLike | None = None, lam: float = 0.5,
                 metric: str = "sqeuclidean") -> None:
        if (X is None) == (similarity is None):
            raise ValueError("pass exactly one of X (features) or similarity= (a precomputed matrix).")
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0.0 <= lam <= 0.5):
            raise ValueError(f"lam must be a number in [0, 0.5] for graph cut to be monotone; got {lam!r}.")
        if similarity is not None:
            K = as_float_array(similarity, "similarity", ndim=2)
            if K.shape[0] != K.shape[1]:
                raise ValueError(f"similarity must be square; got shape {K.shape}.")
            lo, hi = float(K.min(initial=0.0)), float(K.max(initial=0.0))
            if not is_symmetric(K, rtol=1e-10, atol=1e-12 * max(-lo, hi)):
                raise ValueError("similarity must be symmetric; symmetrise it with (K + K.T) / 2.")
            if lo < 0:
                raise ValueError("similarity must be non-negative for graph cut; shift or clip it.")
        else:
            if metric not in _DISTANCE_METRICS:
                raise ValueError(f"unknown metric {metric!r}; choose one of {_DISTANCE_METRICS}.")
            K, _ = _pairwise_similarity(as_float_array(X, "X", ndim=2), metric)
        if K.shape[0] == 0:
            raise ValueError("the ground set is empty. Pass at least one item.")
        super().__init__(K.shape[0])
        self.similarity = frozen(K)  # a private copy: the column sums below are cached from it
        self.lam = float(lam)
        self._colsum = self.similarity.sum(axis=0)
        self._diag = np.diag(self.similarity).copy()

    def init_state(self) -> GainState:
        return _GraphCutState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> GraphCut:
        """Exact: the block ``K[indices][:, indices]`` (the redundancy term) and the *global* column sums
        ``sum_{i in V} K[i, j]`` of the candidates (the coverage term), ``|indices|^2 + |indices|`` numbers; already
        as cheap as a local objective, so ``local`` is ignored."""
        idx = self._restrict_indices(indices)
        out = copy.copy(self)
        out.n = idx.size
        out.similarity = frozen(self.similarity[np.ix_(idx, idx)], copy=False)
        out._colsum = self._colsum[idx]
        out._diag = self._diag[idx]
        return out


class _GraphCutState(GainState):
    def __init__(self, f: GraphCut) -> None:
        super().__init__(f.n)
        self._f = f
        self._m = np.zeros(f.n)  # sum_{s in S} K[s, j]

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        f = self._f
        out = self._of(f._colsum, candidates) - f.lam * (2.0 * self._of(self._m, candidates)
                                                          + self._of(f._diag, candidates))
        return self._zero_in_set(out, candidates)

    def _add(self, j: int) -> None:
        f = self._f
        self.value += float(f._colsum[j] - f.lam * (2.0 * self._m[j] + f.similarity[j, j]))
        self._m += f.similarity[j]


class Modular(SetFunction):
    r"""Modular (additive) function, ``F(S) = sum_{j in S} w_j`` with ``w >= 0``.

    Both submodular and supermodular; the building block of the other objectives and a test oracle.

    Examples
    --------
    >>> import submod
    >>> submod.Modular([3.0, 1.0, 2.0]).value([0, 2])
    5.0
    """

    submodular = True
    monotone = True

    def __init__(self, weights: ArrayLike | Sequence[float]) -> None:
        w = as_float_array(weights, "weights", ndim=1)
        n = check_ground_set_size(w.size, "len(weights)") if w.size else check_ground_set_size(0)
        if np.any(w < 0):
            raise ValueError("modular weights must be non-negative for a monotone function.")
        super().__init__(n)
        self.weights = frozen(w)

    def init_state(self) -> GainState:
        return _ModularState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> Modular:
        """The weights ``w[indices]`` (exact; ``local`` is ignored)."""
        idx = self._restrict_indices(indices)
        return Modular(self.weights[idx])


class _ModularState(GainState):
    _kept_gains = True

    def __init__(self, f: Modular) -> None:
        super().__init__(f.n)
        self._w = f.weights

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        return self._zero_in_set(self._of(self._w, candidates), candidates)

    def _add(self, j: int) -> None:
        self.value += float(self._w[j])
