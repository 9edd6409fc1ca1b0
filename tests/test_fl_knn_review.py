"""Review of ``FacilityLocation(X, n_neighbors=k)``: inputs that broke it, each against an independent oracle.

* Features whose squared distances overflow float64 give ``inf - inf = NaN`` in the Gram expansion; the dense
  build reports the overflow, the k-nearest-neighbour build must too (it returned an all-zero similarity).
"""

import numpy as np
import pytest

import submod

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
