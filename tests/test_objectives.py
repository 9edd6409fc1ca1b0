"""Each objective equals its brute-force definition, on values and on marginal gains at random sets."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import submod

finite = st.floats(0.0, 10.0, allow_nan=False, width=64)


def brute_facility(K, S):
    return float(sum(max((K[i, j] for j in S), default=0.0) for i in range(K.shape[0])))


def brute_feature(X, w, phi, S):
    return float(sum(w[f] * phi(sum(X[j, f] for j in S)) for f in range(X.shape[1])))


def brute_coverage(M, w, S):
    covered = {c for j in S for c in range(M.shape[1]) if M[j, c] != 0}
    return float(sum(w[c] for c in covered))


def brute_logdet(K, S, ridge):
    S = list(S)
    if not S:
        return 0.0
    return float(np.log(np.linalg.det(np.eye(len(S)) + K[np.ix_(S, S)] / ridge)))


def brute_graphcut(K, lam, S):
    S = list(S)
    return float(sum(K[i, j] for i in range(K.shape[0]) for j in S) - lam * sum(K[i, j] for i in S for j in S))


def all_subsets(n, max_size=None):
    for r in range((max_size or n) + 1):
        yield from itertools.combinations(range(n), r)


def check_against(f, brute, n):
    """Values on every subset and gains at every subset equal the brute-force definition."""
    for S in all_subsets(n):
        assert f.value(list(S)) == pytest.approx(brute(S), rel=1e-10, abs=1e-10)
    rng = np.random.default_rng(0)
    for S in [(), tuple(rng.choice(n, size=min(2, n), replace=False))]:
        g = f.gains(list(S))
        for j in range(n):
            expected = 0.0 if j in S else brute(tuple(S) + (j,)) - brute(S)
            assert g[j] == pytest.approx(expected, rel=1e-9, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.just(6)), elements=finite))
def test_facility_location_dense_matches_definition(A):
    n = A.shape[0]
    K = np.abs(A[:, :n])
    check_against(submod.FacilityLocation(similarity=K), lambda S: brute_facility(K, S), n)


@settings(max_examples=15, deadline=None)
@given(arrays(np.float64, (6, 6), elements=finite), st.floats(0.0, 1.0))
def test_facility_location_sparse_matches_definition(K, density):
    mask = np.random.default_rng(int(density * 1000)).random(K.shape) < density
    Ks = np.where(mask, K, 0.0)
    f = submod.FacilityLocation(similarity=sp.csr_matrix(Ks))
    check_against(f, lambda S: brute_facility(Ks, S), 6)


def test_facility_location_asymmetric_similarity_uses_columns_as_candidates():
    K = np.array([[1.0, 5.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    f = submod.FacilityLocation(similarity=K)
    check_against(f, lambda S: brute_facility(K, S), 3)
    assert submod.maximize(f, 1).selected.tolist() == [1]  # column sums 3, 6, 1


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_facility_location_from_features(metric):
    X = np.random.default_rng(1).standard_normal((7, 3))
    diff = X[:, None, :] - X[None, :, :]
    if metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        K = 1.0 + Xn @ Xn.T
    else:
        D = (diff ** 2).sum(-1)
        if metric == "euclidean":
            D = np.sqrt(D)
        K = D.max() - D
    f = submod.FacilityLocation(X, metric=metric)
    check_against(f, lambda S: brute_facility(K, S), 7)


def test_coverage_gains_along_a_long_run_match_the_definition():
    """The gains are updated incrementally and re-summed every 64 picks: compare with brute force at every step of
    a 150-pick run, picking items whose concepts are already covered too."""
    rng = np.random.default_rng(3)
    M = (rng.random((300, 120)) < 0.04).astype(np.int8)
    w = rng.uniform(0.1, 10.0, 120)
    f = submod.Coverage(sp.csr_matrix(M), weights=w)
    state = f.init_state()
    for step in range(150):
        S = list(state.selected)
        covered = M[S].any(axis=0) if S else np.zeros(M.shape[1], dtype=bool)  # from scratch, every step
        want = (M[:, ~covered] @ w[~covered]).astype(float)  # the weight each item would newly cover
        want[S] = 0.0
        np.testing.assert_allclose(state.gains(), want, rtol=1e-12, atol=1e-9)
        assert state.value == pytest.approx(brute_coverage(M, w, S), rel=1e-12)
        free = np.setdiff1d(np.arange(300), S)
        state.add(int(free[np.argmax(want[free])]) if step % 3 else int(rng.choice(free)))


@settings(max_examples=20, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=finite),
       st.sampled_from(["sqrt", "log1p", "inverse"]))
def test_feature_based_matches_definition(X, name):
    phi = {"sqrt": np.sqrt, "log1p": np.log1p, "inverse": lambda x: x / (1 + x)}[name]
    w = np.arange(1, X.shape[1] + 1, dtype=float)
    f = submod.FeatureBased(X, concave=name, weights=w)
    check_against(f, lambda S: brute_feature(X, w, phi, S), X.shape[0])


@settings(max_examples=20, deadline=None)
@given(arrays(np.int8, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 1)))
def test_coverage_matches_definition(M):
    w = np.linspace(0.5, 2.0, M.shape[1])
    check_against(submod.Coverage(M, weights=w), lambda S: brute_coverage(M, w, S), M.shape[0])
    check_against(submod.Coverage(sp.csr_matrix(M), weights=w), lambda S: brute_coverage(M, w, S), M.shape[0])


@settings(max_examples=20, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 4)),
              elements=st.floats(-3, 3, allow_nan=False)), st.floats(0.1, 5.0))
def test_log_determinant_matches_definition(X, ridge):
    K = X @ X.T
    check_against(submod.LogDeterminant(similarity=K, ridge=ridge), lambda S: brute_logdet(K, S, ridge), X.shape[0])


@settings(max_examples=20, deadline=None)
@given(arrays(np.float64, (5, 5), elements=finite), st.floats(0.0, 0.5))
def test_graph_cut_matches_definition(A, lam):
    K = (A + A.T) / 2
    check_against(submod.GraphCut(similarity=K, lam=lam), lambda S: brute_graphcut(K, lam, S), 5)


def test_modular_and_weighted_sum_match_definition():
    w = np.array([1.0, 0.0, 2.5, 4.0])
    K = np.abs(np.random.default_rng(3).standard_normal((4, 4)))
    f = 2.0 * submod.Modular(w) + submod.FacilityLocation(similarity=K)
    assert f.submodular and isinstance(f, submod.WeightedSum)
    check_against(f, lambda S: 2.0 * sum(w[j] for j in S) + brute_facility(K, S), 4)


def test_builtin_sum_of_set_functions_is_their_weighted_sum():
    """``sum([f, g, h])`` starts from 0, so it needs ``0 + f``: it is ``f`` itself, and the sum matches the definition;
    any other number stays refused (``F + c`` is not normalised)."""
    w = np.array([1.0, 0.0, 2.5, 4.0])
    K = np.abs(np.random.default_rng(4).standard_normal((4, 4)))
    f, g = submod.Modular(w), submod.FacilityLocation(similarity=K)
    assert 0 + f is f and 0.0 + g is g and np.float64(0.0) + f is f
    total = sum([f, g, 3.0 * f])
    assert isinstance(total, submod.WeightedSum) and total.submodular
    check_against(total, lambda S: 4.0 * sum(w[j] for j in S) + brute_facility(K, S), 4)
    for bad in (1, 0.5, "0", None, True):
        with pytest.raises(TypeError):
            bad + f


def test_from_callable_normalises_and_flags():
    f = submod.from_callable(lambda S: 3.0 + len(S), n=4)
    assert f.value([]) == 0.0 and f.value([1, 2]) == 2.0
    assert not f.submodular
    np.testing.assert_array_equal(f.gains([0]), [0.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("make, match", [
    (lambda: submod.FacilityLocation(similarity=-np.ones((3, 3))), "negative"),
    (lambda: submod.FacilityLocation(similarity=np.ones((3, 2))), "square"),
    (lambda: submod.FacilityLocation(similarity=np.array([[1.0, np.nan], [0.0, 1.0]])), "NaN"),
    (lambda: submod.FacilityLocation(similarity=np.array([[1.0, np.inf], [0.0, 1.0]])), "NaN"),
    (lambda: submod.FacilityLocation(np.zeros((0, 3))), "empty"),
    (lambda: submod.FacilityLocation(np.ones((3, 2)), metric="manhattan"), "unknown metric"),
    (lambda: submod.FacilityLocation(), "exactly one"),
    (lambda: submod.FeatureBased(-np.ones((2, 2))), "non-negative"),
    (lambda: submod.FeatureBased(np.ones((2, 2)), concave="square"), "unknown concave"),
    (lambda: submod.FeatureBased(np.ones((2, 2)), concave=lambda x: x ** 2), "concave"),
    (lambda: submod.Coverage(np.ones((2, 2)), weights=[-1.0, 1.0]), "non-negative"),
    (lambda: submod.LogDeterminant(similarity=-np.eye(2)), "positive semidefinite"),
    (lambda: submod.LogDeterminant(similarity=np.eye(2), ridge=0.0), "ridge"),
    (lambda: submod.GraphCut(similarity=np.ones((2, 2)), lam=0.9), "monotone"),
    (lambda: submod.Modular([1.0, -1.0]), "non-negative"),
    (lambda: submod.Modular([]), "empty"),
    (lambda: submod.from_callable(3, n=2), "callable"),
    (lambda: submod.from_callable(len, n=0), "empty"),
    (lambda: submod.GraphCut(np.zeros((0, 3))), "empty"),
    (lambda: submod.GraphCut(similarity=1e-9 * np.array([[0.0, 1, 0], [0, 0, 0], [0, 0, 0]])), "symmetric"),
    (lambda: submod.FeatureBased(np.ones((2, 2)) * (1 + 1j)), "real"),
    (lambda: submod.SparseRegression(1e200 * np.eye(3), np.ones(3)), "overflow"),
    (lambda: submod.SparseRegression(1e-170 * np.eye(3), np.ones(3)), "underflow"),
    (lambda: submod.FacilityLocation(1e200 * np.eye(3)), "overflow"),
    (lambda: submod.LogDeterminant(1e200 * np.eye(3)), "overflow"),  # was numpy's 'Eigenvalues did not converge'
    # distinct rows whose distances underflow to 0: K = 0 and greedy selected nothing, as if all were duplicates
    (lambda: submod.FacilityLocation(1e-200 * np.eye(3)), "underflow"),
    (lambda: submod.FacilityLocation(1e-200 * np.eye(5), n_neighbors=2), "underflow"),
    (lambda: submod.GraphCut(1e-200 * np.eye(3), metric="euclidean"), "underflow"),
    (lambda: submod.FacilityLocation(similarity=np.eye(2), metric="bogus"), "unknown metric"),  # was ignored
    (lambda: submod.LogDeterminant(similarity=np.eye(2), ridge="1"), "ridge must be"),  # was a numpy TypeError
    (lambda: submod.FeatureBased(sp.random(5, 3, density=0.5, format="csr")), r"dense array.*toarray"),
    (lambda: submod.SparseRegression(sp.eye(5, format="csr"), np.ones(5)), r"dense array.*toarray"),
    (lambda: submod.Modular([[1.0, 2.0]]), r"np\.ravel"),  # the advice used to be reshape(-1, 1)
])
def test_bad_input_is_rejected_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


_C = np.array([[1.0, 0.5j, 0.0], [-0.5j, 1.0, 0.2], [0.0, 0.2, 1.0]])   # Hermitian, non-negative real part


@pytest.mark.parametrize("make", [
    lambda: submod.FacilityLocation(similarity=_C),              # kept the real part, silently
    lambda: submod.FacilityLocation(similarity=sp.csr_matrix(_C)),
    lambda: submod.FacilityLocation(similarity=_C.real + 0j),    # a complex dtype, even with no imaginary part
    lambda: submod.FacilityLocation(_C),
    lambda: submod.FeatureBased(np.abs(_C) + 0j),
    lambda: submod.FeatureBased(np.ones((3, 2)), weights=[1.0, 1j]),
    lambda: submod.LogDeterminant(similarity=_C),
    lambda: submod.LogDeterminant(_C),
    lambda: submod.GraphCut(similarity=_C),
    lambda: submod.Coverage(_C),
    lambda: submod.Coverage(sp.csr_matrix(_C)),                  # the non-zero pattern was taken as coverage
    lambda: submod.Coverage(np.ones((3, 3)), weights=[1.0, 1j, 1.0]),
    lambda: submod.Modular([1.0, 1j, 2.0]),
    lambda: 1j * submod.Modular([1.0, 0.0, 2.0]),                # weight 1j became 0, silently
    lambda: submod.WeightedSum([submod.Modular([1.0, 2.0, 3.0])], [1 + 1j]),
    lambda: submod.SparseRegression(_C, np.ones(3)),
    lambda: submod.SparseRegression(np.eye(3), _C),
    lambda: submod.SparseRegression.from_gram(_C, np.ones(3), 3.0),
    lambda: submod.SparseRegression.from_gram(np.eye(3), 1j * np.ones(3), 3.0),
    lambda: submod.SparseRegression.from_gram(np.eye(3), np.ones(3), 3.0 + 0j),
])
def test_complex_matrices_are_refused_by_every_objective(make):
    """No objective keeps the real part of complex input: each refuses it and says what to pass instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # numpy's ComplexWarning is the silent real part: it must not be reached
        with pytest.raises(ValueError, match="must be real.*real part"):
            make()


def test_caller_arrays_are_not_modified():
    K = np.abs(np.random.default_rng(0).standard_normal((20, 20)))
    K_copy = K.copy()
    f = submod.FacilityLocation(similarity=K)
    for method in submod.METHODS:
        submod.maximize(f, 5, method=method, seed=0)
    np.testing.assert_array_equal(K, K_copy)


def test_objectives_do_not_change_with_the_callers_arrays():
    # Everything an objective caches is derived from a private copy, except facility location's dense similarity
    # (documented: by reference, for memory), which the objective only exposes read-only.
    rng = np.random.default_rng(0)
    K = np.abs(rng.standard_normal((6, 6)))
    K = K + K.T
    X = np.abs(rng.standard_normal((6, 3)))
    w = np.abs(rng.standard_normal(6))
    made = {"graph-cut": (submod.GraphCut(similarity=K, lam=0.3), K),
            "feature-based": (submod.FeatureBased(X, weights=np.ones(3)), X),
            "modular": (submod.Modular(w), w)}
    before = {name: [f.value(S) for S in ([0], [1, 2], [0, 3, 5])] for name, (f, _) in made.items()}
    for _, arr in made.values():
        arr *= 3.0
    for name, (f, _) in made.items():
        assert [f.value(S) for S in ([0], [1, 2], [0, 3, 5])] == before[name], name
    fl = submod.FacilityLocation(similarity=K)
    with pytest.raises(ValueError, match="read-only"):
        fl.similarity[0, 0] = 0.0
    costs = np.ones(6)
    c = submod.Knapsack(costs, budget=2.0)
    costs[:] = 10.0
    assert submod.maximize(submod.Modular(np.arange(1.0, 7.0)), None, constraint=c).selected.size == 2


def test_coverage_values_keep_small_weights_next_to_huge_ones():
    # value = sum of covered weights, accumulated directly (total - uncovered cancels the small ones to 0)
    f = submod.Coverage([[0, 1, 0], [0, 0, 1]], weights=[1e17, 1.0, 2.0])
    assert f.value([0]) == 1.0 and f.value([0, 1]) == 3.0
    res = submod.maximize(f, 2)
    assert res.values.tolist() == [2.0, 3.0] and res.certificate.upper_bound >= 3.0
    # a duplicate (item, concept) entry in a sparse incidence counts its concept once
    M = sp.csr_matrix((np.ones(3), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 2))
    assert submod.Coverage(M, weights=[5.0, 7.0]).value([0]) == 12.0


def test_log_determinant_value_refuses_a_kernel_that_is_not_psd_on_the_set():
    K = np.eye(600)  # large enough to skip the construction-time eigenvalue check
    K[0, 1] = K[1, 0] = 5.0
    f = submod.LogDeterminant(similarity=K)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        f.value([0, 1])  # log|det| would be log 21 = 3.04


def test_caller_sparse_matrices_are_not_modified():
    # Unsorted indices, a duplicate entry and an explicit zero: the objectives canonicalise their own copy.
    M = sp.csr_matrix((np.array([1.0, 0.0, 1.0]), np.array([0, 1, 1]), np.array([0, 2, 3])), shape=(2, 2))
    K = sp.csc_matrix((np.array([2.0, 1.0, 0.5]), np.array([1, 0, 1]), np.array([0, 3, 3])), shape=(2, 2))
    before = [(a.data.copy(), a.indices.copy(), a.indptr.copy()) for a in (M, K)]
    submod.maximize(submod.Coverage(M), 1)
    submod.maximize(submod.FacilityLocation(similarity=K), 1)
    for a, (data, indices, indptr) in zip((M, K), before, strict=True):
        np.testing.assert_array_equal(a.data, data)
        np.testing.assert_array_equal(a.indices, indices)
        np.testing.assert_array_equal(a.indptr, indptr)


def test_log_determinant_detects_non_psd_kernels_during_the_run():
    # Large enough to skip the construction-time eigenvalue check; [[1, 2], [2, 1]] blocks are indefinite.
    K = np.kron(np.eye(300), np.array([[1.0, 2.0], [2.0, 1.0]]))
    f = submod.LogDeterminant(similarity=K)
    with pytest.raises(ValueError, match="positive semidefinite"):
        submod.maximize(f, 600)


def test_facility_location_gains_are_batch_independent_bit_for_bit():
    # Batches of >= 512 candidates are split over threads; each gain must keep its bits in any batch.
    rng = np.random.default_rng(5)
    K = np.abs(rng.standard_normal((700, 700)))
    for sim in (K, K + K.T):                     # asymmetric (transposed copy) and symmetric (rows of K)
        state = submod.FacilityLocation(similarity=sim).init_state()
        for j in (3, 500, 42):
            state.add(j)
        full = state.gains()
        one_by_one = np.concatenate([state.gains(np.array([c])) for c in range(700)])
        np.testing.assert_array_equal(full, one_by_one)
        expected = np.maximum(sim - sim[:, [3, 500, 42]].max(axis=1, keepdims=True), 0.0).sum(axis=0)
        expected[[3, 500, 42]] = 0.0
        np.testing.assert_allclose(full, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1e-13, 1e-6]))
def test_blocked_symmetry_check_matches_the_definition(n, seed, bump):
    """One entry off by ``bump`` (relative), anywhere, including blocks far from the diagonal and on either side of
    the row-block boundaries: the blocked check agrees with the entrywise definition on the full matrix."""
    from submod._validation import is_symmetric

    rng = np.random.default_rng(seed)
    A = rng.random((n, n))
    K = A + A.T
    i, j = rng.integers(0, n, 2)
    K[i, j] *= 1.0 + bump
    rtol, atol = 1e-10, 1e-12
    want = bool(np.all(np.abs(K - K.T) <= atol + rtol * np.maximum(np.abs(K), np.abs(K.T))))
    assert is_symmetric(K, rtol=rtol, atol=atol) == want
    if bump == 1e-6 and i != j:
        assert not want  # the oracle sees the bump, so the check was tested on an asymmetric matrix


@pytest.mark.parametrize("make", [lambda K: submod.GraphCut(similarity=K), lambda K: submod.LogDeterminant(
    similarity=K)])
def test_asymmetry_far_from_the_diagonal_is_rejected(make):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((600, 5))
    K = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 10)
    make(K)  # symmetric: accepted
    K[590, 10] += 1e-3  # below the diagonal, in the last row block
    with pytest.raises(ValueError, match="symmetric"):
        make(K)


def test_lazy_first_bounds_of_facility_location_are_upper_bounds():
    """K = I + 0.02 (n = 10): F(S) = |S| + 0.2 for S non-empty, first gain 1.2 and every later gain 1, so for k = 3
    the prefix bounds F(A) + 3 * (largest gain) are 3.6, 4.2, 5.2, 6.2 and the certificate is 3.6 (closed form).
    Lazy greedy certifies its prefix 0 from bounds on the column sums: they must not be below the true gains."""
    f = submod.FacilityLocation(similarity=np.eye(10) + 0.02)
    greedy, lazy = submod.maximize(f, 3), submod.maximize(f, 3, method="lazy")
    assert greedy.value == pytest.approx(3.2) and lazy.value == pytest.approx(3.2)
    assert greedy.certificate.upper_bound == pytest.approx(3.6, rel=1e-8)
    assert lazy.certificate.upper_bound >= 3.6


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_facility_location_from_features_holds_one_n_by_n_array(metric, peak_bytes):
    """The dense similarity is built in place: its peak memory is one n x n float64 array (plus O(n p)), not two."""
    X = np.random.default_rng(0).standard_normal((1500, 8))
    one = 1500 * 1500 * 8
    f, peak = peak_bytes(lambda: submod.FacilityLocation(X, metric=metric))
    assert peak < 1.3 * one, f"peak {peak / one:.2f} x the n x n matrix"
    # the values are the definition's: K = max(D) - D (1 + cos for cosine), computed here independently
    if metric == "cosine":
        U = X / np.linalg.norm(X, axis=1, keepdims=True)
        K = 1.0 + U @ U.T
    else:
        D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        D = np.sqrt(D) if metric == "euclidean" else D
        K = D.max() - D
    np.testing.assert_allclose(f.similarity, K, rtol=1e-9, atol=1e-9 * np.abs(K).max())
