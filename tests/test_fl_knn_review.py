"""Review of ``FacilityLocation(X, n_neighbors=k)``: inputs that broke it, each against an independent oracle.

* Features whose squared distances overflow float64 give ``inf - inf = NaN`` in the Gram expansion; the dense
  build reports the overflow, the k-nearest-neighbour build must too (it returned an all-zero similarity).
* Cosine similarity does not depend on the scale of a row, so features scaled by ``2**600`` or ``2**-600`` (or any
  factor) must give the cosine objective of the unscaled features (the row norms overflowed or underflowed to 0,
  which made every such row a zero vector: similarity 1 to everything).
* The strided probe for each row's k-th distance stays exact on any layout of the data, and where it misleads
  (data laid out on the stride, many ties) the build no longer sorts nearly every entry of every row (104 s
  against 2 s at n = 20,000): each row's k smallest are then selected exactly first.
"""

import numpy as np
import pytest

import submod
from tests.test_fl_knn import brute_dense, brute_knn

DISTANCES = ("sqeuclidean", "euclidean")


@pytest.mark.parametrize("metric", DISTANCES)
@pytest.mark.parametrize("X", [
    # two equal huge rows: |x|^2 = inf and -2 x.x = -inf, so the expansion gives inf - inf = NaN
    np.array([[0.0, 1.0], [0.0, 2.0], [1e200, 0.0], [1e200, 0.0]]),
    # distinct rows: the squared distance (1e155)^2 = 1e310 is beyond float64's largest value, 1.8e308
    np.array([[1e155, 0.0], [2e155, 0.0], [0.0, 1.0]]),
    # every row huge, over several blocks of rows (each block holds a NaN, so each block's max is NaN)
    1e200 * np.random.default_rng(0).standard_normal((1000, 3)),
])
@pytest.mark.parametrize("k", [1, 2])
def test_overflowing_squared_distances_are_an_error_not_a_zero_objective(metric, X, k):
    # The largest squared distance exceeds float64's range, so no finite shift max(D) exists.
    assert np.max(np.abs(X)) > np.sqrt(np.finfo(np.float64).max)
    with pytest.raises(ValueError, match="overflow float64"):
        submod.FacilityLocation(X, metric=metric)                   # the dense build says so
    with pytest.raises(ValueError, match="overflow float64"):
        submod.FacilityLocation(X, metric=metric, n_neighbors=k)


@pytest.mark.parametrize("scale", [2.0 ** 600, 2.0 ** -600, 1e200, 1e-200, 1e-300])
@pytest.mark.parametrize("k", [2, 5, None])
def test_cosine_does_not_depend_on_the_scale_of_the_features(scale, k):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((12, 4))
    X[3] = 0.0                                                      # a zero row stays a zero row
    Xs = X * scale
    assert np.all(np.isfinite(Xs)) and np.all((Xs != 0) == (X != 0))   # representable, nothing flushed to 0
    # Oracle: cosine on the unscaled features, from coordinate sums (cos(a x, b y) = cos(x, y) for a, b > 0).
    expected = brute_dense(X, "cosine")[0] if k is None else brute_knn(X, "cosine", k)
    f = submod.FacilityLocation(Xs, metric="cosine", n_neighbors=k)
    K = np.asarray(f.similarity.toarray() if k is not None else f.similarity)
    np.testing.assert_allclose(K, expected, rtol=1e-13, atol=1e-13)
    # A row of each scale: rows of very different magnitudes in one matrix.
    mixed = X * np.where(np.arange(12) % 2 == 0, scale, 1.0)[:, None]
    g = submod.FacilityLocation(mixed, metric="cosine", n_neighbors=k)
    K = np.asarray(g.similarity.toarray() if k is not None else g.similarity)
    np.testing.assert_allclose(K, expected, rtol=1e-13, atol=1e-13)
    # and the blocks that restrict() rebuilds from the features (dense objective)
    if k is None:
        idx = np.array([5, 0, 3, 11])
        for S in ([0], [1, 2], [0, 1, 2, 3]):
            expected_value = expected[:, idx[S]].max(axis=1).sum()
            assert f.restrict(idx).value(S) == pytest.approx(expected_value, rel=1e-13)


def test_power_of_two_scaling_leaves_cosine_bit_for_bit_unchanged():
    # Scaling a row by 2**e is exact, and so is its norm's scaling: the unit rows, hence K, have the same bits.
    X = np.random.default_rng(2).standard_normal((50, 6))
    for k in (None, 4):
        base = submod.FacilityLocation(X, metric="cosine", n_neighbors=k).similarity
        for scale in (2.0 ** 600, 2.0 ** -600, 2.0 ** 40):
            K = submod.FacilityLocation(X * scale, metric="cosine", n_neighbors=k).similarity
            if k is None:
                np.testing.assert_array_equal(K, base)
            else:
                assert (K != base).nnz == 0


def _adversarial_layouts(n, k):
    """Data on which the strided probe of the k-th-distance bound (every ``probe_step``-th column) misleads.

    Integer coordinates, so that every squared distance is computed exactly and ties are exact."""
    from submod.objectives import _knn_probe_step

    step = _knn_probe_step(n, k)
    rng = np.random.default_rng(3)
    far = rng.integers(0, 40, (n, 3)).astype(float)
    far[::step] += 1000.0           # the probed columns are far from every other item
    classes = np.eye(step)[np.arange(n) % step] * 20 + rng.integers(0, 3, (n, step))
    return {
        "probed columns far away": far,
        "constant": np.ones((n, 3)),                       # every distance 0: all ties
        "one-hot, 2 categories": np.eye(2)[rng.integers(0, 2, n)],
        "round-robin classes on the stride": classes,      # every probed column in class 0
    }


@pytest.mark.parametrize("k", [1, 4])
def test_misleading_probes_keep_the_exact_neighbours_and_bounded_work(monkeypatch, k):
    # Exact: against a stable full sort of every row (itself first, then distance, ties to the smaller index).
    # Work: the entries sorted per row stay few (here under 4 sqrt(k n)), not about n, whatever the layout (on
    # "probed columns far away" at n = 20,000 the build sorted nearly every entry: 104 s against 2 s on Gaussian
    # data).
    from tests.test_fl_knn import stored

    n = 3000
    sorted_entries = []
    lexsort = np.lexsort

    def counting_lexsort(keys, *args, **kwargs):
        sorted_entries.append(len(keys[0]))
        return lexsort(keys, *args, **kwargs)

    for name, X in _adversarial_layouts(n, k).items():
        sorted_entries.clear()
        with monkeypatch.context() as m:
            m.setattr(np, "lexsort", counting_lexsort)
            f = submod.FacilityLocation(X, n_neighbors=k)
        assert sum(sorted_entries) <= n * 4 * np.sqrt(k * n), name
        D = np.zeros((n, n))
        for column in X.T:                                  # coordinate differences, one feature at a time
            D += (column[:, None] - column[None, :]) ** 2
        np.fill_diagonal(D, -1.0)
        order = np.argsort(D, axis=1, kind="stable")[:, :k]
        keep = np.zeros((n, n), dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        np.testing.assert_array_equal(stored(f.similarity), keep, err_msg=name)


def test_k_smallest_against_a_stable_sort_whatever_the_probe_and_the_ties():
    # Rows of small integers (ties everywhere), of distinct values, with the equal values late in long rows (the
    # exact selection widens its window of columns), a -inf (an item itself) anywhere; every probe stride.
    from submod.objectives import _k_smallest, _k_smallest_mask

    rng = np.random.default_rng(4)
    for trial in range(300):
        b, n = int(rng.integers(1, 6)), int(rng.integers(2, 3000))
        kind = trial % 4
        if kind == 0:
            D = rng.integers(0, 3, (b, n)).astype(float)
        elif kind == 1:
            D = rng.permutation(b * n).reshape(b, n).astype(float)
        elif kind == 2:                                   # all large, ties only near the end of the row
            D = rng.permutation(b * n).reshape(b, n) + 10.0 * n
            D[:, -5:] = 1.0
        else:
            D = np.zeros((b, n))
        D[np.arange(b), rng.integers(0, n, b)] = -np.inf
        k = int(rng.integers(1, n))
        expected = np.argsort(D, axis=1, kind="stable")[:, :k]
        keep = np.zeros(D.shape, dtype=bool)
        np.put_along_axis(keep, expected, True, axis=1)
        np.testing.assert_array_equal(_k_smallest_mask(D, k), keep)
        probe_step = int(rng.integers(1, max(1, n // k) + 1))   # at least k probed columns
        np.testing.assert_array_equal(_k_smallest(D, k, probe_step), expected)
