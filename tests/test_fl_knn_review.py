"""Review of ``FacilityLocation(X, n_neighbors=k)``: inputs that broke it, each against an independent oracle.

* Features whose squared distances overflow float64 give ``inf - inf = NaN`` in the Gram expansion; the dense
  build reports the overflow, the k-nearest-neighbour build must too (it returned an all-zero similarity).
* Cosine similarity does not depend on the scale of a row, so features scaled by ``2**600`` or ``2**-600`` (or any
  factor) must give the cosine objective of the unscaled features (the row norms overflowed or underflowed to 0,
  which made every such row a zero vector: similarity 1 to everything).
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
