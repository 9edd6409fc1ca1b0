"""``FacilityLocation(X, n_neighbors=k)``: the sparse k-nearest-neighbour similarity, against oracles.

The oracle builds the expected matrix from scratch: every distance from coordinate differences (not the Gram
expansion the library uses), a full sort of each row with the documented rule (the item itself first, then by
distance, ties to the smaller index), the dense shift ``max(D)`` over all pairs. Values are sums of maxima over
that matrix. The peers (apricot, submodlib) are compared after converting their documented conventions.
"""

import contextlib
import io
import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import submod

METRICS = ("sqeuclidean", "euclidean", "cosine")


# ------------------------------------------------------------------------------------------------- the oracle
def brute_dense(X, metric):
    """Dense similarity and the ranking key of each pair (smaller: nearer), from coordinate differences."""
    if metric == "cosine":
        norms = np.sqrt((X * X).sum(axis=1))
        norms[norms == 0] = 1.0
        U = X / norms[:, None]
        cos = (U[:, None, :] * U[None, :, :]).sum(axis=2)
        return 1.0 + cos, -cos
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)
    if metric == "euclidean":
        D = np.sqrt(D)
    return D.max() - D, D


def brute_neighbours(X, metric, k):
    """Which pairs the documented rule keeps (``keep[i, j]``: candidate ``j`` is among item ``i``'s ``k``), and
    the dense similarity, by sorting every row in full."""
    K, key = brute_dense(X, metric)
    n = X.shape[0]
    keep = np.zeros((n, n), dtype=bool)
    for i in range(n):
        not_self = np.arange(n) != i
        order = np.lexsort((np.arange(n), key[i], not_self))  # self first, then distance, then index
        keep[i, order[:min(k, n)]] = True
    return keep, K


def brute_knn(X, metric, k):
    """The documented k-nearest-neighbour similarity, dense: the kept pairs' similarities, 0 elsewhere."""
    keep, K = brute_neighbours(X, metric, k)
    return np.where(keep, K, 0.0)


def stored(K):
    """The stored pattern of a sparse matrix, explicit zeros included."""
    K = K.tocsr()
    out = np.zeros(K.shape, dtype=bool)
    out[np.repeat(np.arange(K.shape[0]), np.diff(K.indptr)), K.indices] = True
    return out


def sum_of_max(K, S):
    S = list(S)
    return float(K[:, S].max(axis=1).sum()) if S else 0.0


def random_sets(n, rng, count=12):
    return [rng.choice(n, size=rng.integers(0, n + 1), replace=False) for _ in range(count)]


# ----------------------------------------------------------------------------------- the matrix and its values
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 2, 5, 17, 39, 40, 55])
def test_similarity_equals_the_brute_force_knn(metric, k):
    X = np.random.default_rng(k).standard_normal((40, 3))
    f = submod.FacilityLocation(X, metric=metric, n_neighbors=k)
    keep, _ = brute_neighbours(X, metric, k)
    expected = brute_knn(X, metric, k)
    K = f.similarity
    assert sp.issparse(K) and K.shape == (40, 40)
    if k < 40:   # (with every pair kept, the matrix stores its nonzeros, and the farthest pair's 0 is rounding)
        np.testing.assert_array_equal(stored(K), keep)                 # the same neighbours, exactly
    np.testing.assert_allclose(K.toarray(), expected, rtol=1e-12, atol=1e-12 * expected.max())
    assert np.all(K.getnnz(axis=1) <= min(k, 40))
    rng = np.random.default_rng(0)
    for S in random_sets(40, rng):
        assert f.value(S) == pytest.approx(sum_of_max(expected, S), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_ties_go_to_the_smaller_index_and_an_item_is_its_own_first_neighbour(metric):
    # Integer points with many equal distances and duplicates (items 0, 5 and 9 coincide; so do 3 and 7): every
    # distance is an exact small integer (or its square root), so the tie rule alone decides the neighbours.
    X = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [0, 0], [2, 0], [-1, 0], [1, 1], [0, 0], [0, 2]],
                 dtype=float)
    for k in range(1, 12):
        f = submod.FacilityLocation(X, metric=metric, n_neighbors=k)
        keep, _ = brute_neighbours(X, metric, k)
        if k < X.shape[0]:
            np.testing.assert_array_equal(stored(f.similarity), keep)
        np.testing.assert_allclose(f.similarity.toarray(), brute_knn(X, metric, k), rtol=1e-13)
    # Spelled out for item 5 (a copy of items 0 and 9) with k = 2: itself, then item 0, the smaller duplicate.
    kept = submod.FacilityLocation(X, metric=metric, n_neighbors=2).similarity.tocsr()[5].indices
    assert sorted(kept.tolist()) == [0, 5]
    # and item 0 with k = 4: itself, its duplicates 5 and 9, then the smallest index at distance 1 (item 1).
    kept = submod.FacilityLocation(X, metric=metric, n_neighbors=4).similarity.tocsr()[0].indices
    assert sorted(kept.tolist()) == [0, 1, 5, 9]


@pytest.mark.parametrize("k", [3, 25])
def test_larger_sorted_data_with_ties_against_a_stable_sort(k):
    # 1500 items (the build probes every n // (4 sqrt(kn))-th column for a bound, so many columns are skipped),
    # sorted along a line with every position taken 3 times: the nearest neighbours of an item are all on one
    # side of the probe grid, and ties are everywhere.
    X = np.repeat(np.arange(500.0), 3)[:, None]
    f = submod.FacilityLocation(X, n_neighbors=k)
    D = (X - X.T) ** 2
    key = D.copy()
    np.fill_diagonal(key, -1.0)                             # itself first
    order = np.argsort(key, axis=1, kind="stable")[:, :k]   # stable: equal distances in index order
    keep = np.zeros(D.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    np.testing.assert_array_equal(stored(f.similarity), keep)
    np.testing.assert_allclose(f.similarity.toarray(), np.where(keep, D.max() - D, 0.0), rtol=1e-15)


def test_cosine_with_a_zero_row_keeps_itself_with_similarity_one():
    X = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.2]])
    f = submod.FacilityLocation(X, metric="cosine", n_neighbors=2)
    expected = brute_knn(X, "cosine", 2)
    np.testing.assert_allclose(f.similarity.toarray(), expected, rtol=1e-13)
    assert f.similarity[1, 1] == 1.0


def test_one_neighbour_is_modular_with_the_dense_shift():
    X = np.random.default_rng(3).standard_normal((25, 4))
    f = submod.FacilityLocation(X, n_neighbors=1)
    shift = brute_dense(X, "sqeuclidean")[1].max()
    np.testing.assert_allclose(f.similarity.toarray(), shift * np.eye(25), rtol=1e-12)
    assert f.value([2, 7, 11]) == pytest.approx(3 * shift, rel=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("extra", [0, 1, 50])
def test_n_neighbors_at_least_n_is_the_dense_objective_exactly(metric, extra):
    X = np.random.default_rng(7).standard_normal((60, 5))
    dense = submod.FacilityLocation(X, metric=metric)
    knn = submod.FacilityLocation(X, metric=metric, n_neighbors=60 + extra)
    assert sp.issparse(knn.similarity)
    rng = np.random.default_rng(1)
    for S in random_sets(60, rng):
        assert knn.value(S) == dense.value(S)                       # the same bits, not just close
    for method in ("greedy", "lazy"):
        a, b = submod.maximize(knn, 15, method=method), submod.maximize(dense, 15, method=method)
        np.testing.assert_array_equal(a.selected, b.selected)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-12)


def test_fewer_neighbours_never_exceed_the_dense_value_and_grow_with_k():
    # Zeroing entries of a non-negative K can only lower sum-of-max; more neighbours keep more entries.
    X = np.random.default_rng(11).standard_normal((50, 3))
    S = [3, 17, 29, 41]
    values = [submod.FacilityLocation(X, n_neighbors=k).value(S) for k in (1, 3, 8, 20, 50)]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(values))
    assert values[-1] == submod.FacilityLocation(X).value(S)


# ------------------------------------------------------------------------------------------ selection on it
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_maximize_equals_maximize_on_the_brute_force_sparse_matrix(metric, method):
    X = np.random.default_rng(5).standard_normal((300, 6))
    expected = sp.csr_matrix(brute_knn(X, metric, 10))
    a = submod.maximize(submod.FacilityLocation(X, metric=metric, n_neighbors=10), 25, method=method, seed=3)
    b = submod.maximize(submod.FacilityLocation(similarity=expected), 25, method=method, seed=3)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-12)


@pytest.mark.parametrize("constraint", ["knapsack", "partition"])
def test_constraints_run_on_the_knn_objective(constraint):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 4))
    if constraint == "knapsack":
        c = submod.Knapsack(rng.uniform(0.5, 2.0, 200), budget=8.0)
    else:
        c = submod.PartitionMatroid(rng.integers(0, 4, 200), budgets=3)
    a = submod.maximize(submod.FacilityLocation(X, n_neighbors=8), 12, constraint=c)
    b = submod.maximize(submod.FacilityLocation(similarity=sp.csr_matrix(brute_knn(X, "sqeuclidean", 8))), 12,
                        constraint=c)
    np.testing.assert_array_equal(a.selected, b.selected)
    assert a.value == pytest.approx(b.value, rel=1e-12)


def test_certificate_bounds_the_brute_force_optimum():
    X = np.random.default_rng(9).standard_normal((10, 2))
    f = submod.FacilityLocation(X, n_neighbors=3)
    K = brute_knn(X, "sqeuclidean", 3)
    opt = max(sum_of_max(K, S) for S in itertools.combinations(range(10), 3))
    res = submod.maximize(f, 3)
    assert res.value <= opt + 1e-9 <= res.certificate.upper_bound + 2e-9
    assert res.value >= (1 - 1 / np.e) * opt


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(1, 3), st.integers(1, 8), st.sampled_from(METRICS), st.integers(0, 2**32 - 1))
def test_monotone_and_submodular_on_random_small_instances(n, p, k, metric, seed):
    # Coordinates on a coarse grid, so that equal distances (ties) are common.
    X = np.random.default_rng(seed).integers(-2, 3, size=(n, p)).astype(float)
    f = submod.FacilityLocation(X, metric=metric, n_neighbors=k)
    gains = {S: f.gains(list(S)) for r in range(n + 1) for S in itertools.combinations(range(n), r)}
    tol = 1e-9 * max(1.0, f.value(range(n)))
    for S, g in gains.items():
        assert np.all(g >= -tol)                                    # monotone
        for j in set(range(n)) - set(S):                            # diminishing returns on S < S + j
            bigger = gains[tuple(sorted((*S, j)))]
            others = [c for c in range(n) if c not in S and c != j]
            assert np.all(g[others] >= bigger[others] - tol)


# ---------------------------------------------------------------------- restrict, distributed, pickle, repr
def test_restrict_exact_and_local():
    X = np.random.default_rng(4).standard_normal((80, 3))
    f = submod.FacilityLocation(X, n_neighbors=6)
    K = brute_knn(X, "sqeuclidean", 6)
    idx = np.random.default_rng(0).permutation(80)[:30]
    exact, local = f.restrict(idx), f.restrict(idx, local=True)
    assert exact.n == local.n == 30
    for S in random_sets(30, np.random.default_rng(1)):
        assert exact.value(S) == pytest.approx(f.value(idx[S]), rel=1e-12, abs=1e-12)
        # local: the global neighbour graph restricted to the part's items and candidates
        assert local.value(S) == pytest.approx(sum_of_max(K[np.ix_(idx, idx)], S), rel=1e-12, abs=1e-12)
    assert pickle.loads(pickle.dumps(exact)).value([0, 4]) == exact.value([0, 4])


@pytest.mark.parametrize("local", [False, True])
def test_maximize_distributed_on_processes(local):
    from concurrent.futures import ProcessPoolExecutor

    X = np.random.default_rng(6).standard_normal((400, 5))
    f = submod.FacilityLocation(X, n_neighbors=8)
    serial = submod.maximize_distributed(f, 10, n_parts=3, seed=0, local=local)
    with ProcessPoolExecutor(2) as pool:
        pooled = submod.maximize_distributed(f, 10, n_parts=3, seed=0, local=local, executor=pool)
    np.testing.assert_array_equal(serial.selected, pooled.selected)
    assert serial.value == pytest.approx(f.value(serial.selected), rel=1e-12)
    assert serial.certificate.upper_bound >= submod.maximize(f, 10).value - 1e-9


def test_pickle_and_repr():
    X = np.random.default_rng(8).standard_normal((50, 3))
    f = submod.FacilityLocation(X, metric="euclidean", n_neighbors=4)
    g = pickle.loads(pickle.dumps(f))
    assert (g.similarity != f.similarity).nnz == 0 and g.n_neighbors == 4
    assert g.value([1, 2, 30]) == f.value([1, 2, 30])
    assert repr(f) == "FacilityLocation(n=50, n_neighbors=4)"
    assert repr(submod.FacilityLocation(X)) == "FacilityLocation(n=50)"


def test_the_callers_features_are_not_modified():
    X = np.random.default_rng(10).standard_normal((30, 3))
    before = X.copy()
    submod.FacilityLocation(X, metric="cosine", n_neighbors=3)
    submod.FacilityLocation(X, n_neighbors=3)
    np.testing.assert_array_equal(X, before)


# ---------------------------------------------------------------------------------------------------- memory
def test_a_large_ground_set_builds_without_an_n_by_n_matrix(peak_bytes):
    n, k = 20_000, 10
    X = np.random.default_rng(0).standard_normal((n, 10))
    f, peak = peak_bytes(lambda: submod.FacilityLocation(X, n_neighbors=k))
    assert f.similarity.nnz == n * k
    assert peak < 0.02 * n * n * 8          # under 64 MB, against 3.2 GB for the dense matrix
    res = submod.maximize(f, 20, method="lazy")
    assert res.selected.size == 20


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("value", "match"), [(0, "at least 1"), (-3, "at least 1"), (2.5, "positive integer"),
                                              (True, "positive integer"), ("5", "positive integer")])
def test_bad_n_neighbors(value, match):
    with pytest.raises(ValueError, match=match):
        submod.FacilityLocation(np.zeros((5, 2)), n_neighbors=value)


def test_n_neighbors_takes_numpy_integers():
    f = submod.FacilityLocation(np.arange(10.0).reshape(5, 2), n_neighbors=np.int64(2))
    assert f.n_neighbors == 2 and isinstance(f.n_neighbors, int)


def test_n_neighbors_with_a_precomputed_similarity_is_an_error():
    with pytest.raises(ValueError, match="n_neighbors builds .* from features X"):
        submod.FacilityLocation(similarity=np.eye(4), n_neighbors=2)


def test_overflowing_features_are_an_error():
    X = np.array([[1e200, 0.0], [-1e200, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="overflow float64"):
        submod.FacilityLocation(X, n_neighbors=2)


# -------------------------------------------------------------------------------------------------- peers
def test_apricot_parity_after_converting_its_conventions():
    """apricot's ``n_neighbors=k`` keeps each candidate's k nearest plus itself, as a *candidate* row (our graph
    transposed), Euclidean (not squared) distances, shifted by the largest kept distance.

    apricot 0.6.1's own ``n_neighbors`` path fails with scikit-learn >= 1.x sparse graphs (int64 indices against
    its numba signature's int32), so its graph is built here as its ``_calculate_pairwise_distances`` builds it
    (``KNeighborsTransformer``, then ``max - data``) and passed precomputed with int32 indices.
    """
    apricot = pytest.importorskip("apricot")
    from sklearn.neighbors import KNeighborsTransformer

    X = np.random.default_rng(0).standard_normal((300, 5))
    k = 7
    G = KNeighborsTransformer(n_neighbors=k, metric="euclidean").fit_transform(X)
    G = sp.csr_matrix((G.data.max() - G.data, G.indices.astype(np.int32), G.indptr.astype(np.int32)),
                      shape=G.shape)
    ranking = apricot.FacilityLocationSelection(20, metric="precomputed", optimizer="lazy",
                                                verbose=False).fit(G).ranking
    K = submod.FacilityLocation(X, metric="euclidean", n_neighbors=k + 1).similarity.tocsr()
    distances = K.diagonal().max() - K.data              # K[i, i] = shift: an item's distance to itself is 0
    theirs = sp.csr_matrix((distances.max() - distances, K.indices, K.indptr), shape=K.shape)
    np.testing.assert_array_equal(stored(theirs), stored(G))          # the same pairs: k + 1 per candidate row
    np.testing.assert_allclose(theirs.toarray(), G.toarray(), rtol=1e-12, atol=1e-12)
    ours = submod.maximize(submod.FacilityLocation(similarity=theirs.T), 20)
    np.testing.assert_array_equal(ours.selected, ranking)


def test_submodlib_parity_after_converting_its_conventions():
    """submodlib keeps the same neighbours (row i: its k most similar, itself included) with similarity
    ``exp(-||x - y|| / p)``, and its objective reads the matrix as symmetric (``max(K, K^T)``)."""
    submodlib = pytest.importorskip("submodlib")
    for seed in range(3):
        X = np.random.default_rng(seed).standard_normal((300, 5))
        k = 8
        with contextlib.redirect_stdout(io.StringIO()):
            obj = submodlib.FacilityLocationFunction(n=300, mode="sparse", data=X, metric="euclidean",
                                                     num_neighbors=k)
            picks = obj.maximize(budget=20, optimizer="LazyGreedy", stopIfZeroGain=False,
                                 stopIfNegativeGain=False, verbose=False, show_progress=False)
        K = submod.FacilityLocation(X, metric="euclidean", n_neighbors=k).similarity.tocsr()
        np.testing.assert_array_equal(K.toarray() != 0, obj.sijs.toarray() != 0)   # the same neighbours
        distances = K.diagonal().max() - K.data
        E = sp.csr_matrix((np.exp(-distances / 5), K.indices, K.indptr), shape=K.shape)
        ours = submod.maximize(submod.FacilityLocation(similarity=E.maximum(E.T)), 20)
        np.testing.assert_array_equal(ours.selected, [j for j, _ in picks])
