"""The hypothesis strategies build the instances they promise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import submod
from submod.sparse_regression import SparseRegression
from verification import strategies as vst
from verification import submodularity_ratio


@settings(max_examples=25, deadline=None)
@given(data=vst.regression_data(n_units=st.integers(3, 6), group_size=st.sampled_from([1, 2, 3]),
                                rank_deficient=st.sampled_from(["none", "duplicate", "dead", "combination"]),
                                n_targets=st.integers(1, 3)))
def test_regression_data_structure(data):
    A, Y = data.A, data.Y
    g = A.shape[1] // data.n_units
    assert A.shape[1] == data.n_units * g and Y.shape[0] == A.shape[0] >= A.shape[1] + 2
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(Y))
    if g > 1:
        assert [c.tolist() for c in data.groups] == [list(range(u * g, (u + 1) * g)) for u in range(data.n_units)]
    else:
        assert data.groups is None
    f = SparseRegression(A, Y, groups=data.groups)
    assert f.n == data.n_units


def test_rank_deficiency_options_do_what_they_say():
    rng = np.random.default_rng(0)
    dup = vst._regression_arrays(rng, 4, 30, 1, 0.3, False, 2, "duplicate", 0.0)
    np.testing.assert_array_equal(dup.A[:, 6:8], dup.A[:, 4:6])
    dead = vst._regression_arrays(rng, 4, 30, 1, 0.3, False, 1, "dead", 0.0)
    assert not dead.A[:, 3].any()
    comb = vst._regression_arrays(rng, 4, 30, 1, 0.3, False, 1, "combination", 0.0)
    np.testing.assert_allclose(comb.A[:, 3], comb.A[:, 0] - 2 * comb.A[:, 1])
    assert np.linalg.matrix_rank(comb.A) == 3


@settings(max_examples=10, deadline=None)
@given(data=vst.regression_data(n_units=st.integers(3, 6), n_samples=st.integers(60, 100), suppressor=True,
                                correlation=0.0,
                                noise=0.0, rank_deficient="none"))
def test_planted_suppressor_makes_gamma_smaller_than_one(data):
    f = SparseRegression(data.A, data.Y)
    assert data.suppressor == (0, 1)
    r = submodularity_ratio(f, 2, U=[], method="exact")
    assert r.value < 0.95  # the pair {0, 1} at L = {} is worth far more together than apart


def _explained(A: np.ndarray, Y: np.ndarray) -> float:
    """||P_A Y||^2 by lstsq (independent of submod's kernels)."""
    if A.shape[1] == 0:
        return 0.0
    coef = np.linalg.lstsq(A, Y, rcond=None)[0]
    return float(np.sum((A @ coef) ** 2))


@settings(max_examples=40, deadline=None)
@given(data=vst.regression_data(n_units=st.integers(3, 6), group_size=st.sampled_from([1, 2]), noise=0.0,
                                suppressor=st.booleans(),
                                rank_deficient=st.sampled_from(["none", "duplicate", "dead", "combination"])))
def test_noise_free_targets_lie_in_the_span_of_the_columns(data):
    # The docstring's promise: noise = 0 gives Y = A W, so err(V) = 0, whatever rank deficiency was planted.
    resid = np.sum(data.Y ** 2) - _explained(data.A, data.Y)
    assert resid <= 1e-9 * np.sum(data.Y ** 2)


@settings(max_examples=60, deadline=None)
@given(noise=st.sampled_from([0.0, 0.1]), data=st.data())
def test_planted_suppressor_is_one_at_every_default_sample_size(noise, data):
    # Default rows go down to columns + 2: the pair must still be a suppressor there. Without noise, unit 1 alone
    # explains 0.25% of what the pair explains and the pair ratio is 0.5025 exactly; noise of 0.1 in as few as 4
    # rows moves both a little (noise of the target's own size could swamp any planted structure).
    d = data.draw(vst.regression_data(n_units=st.integers(2, 6), suppressor=True, n_targets=st.integers(1, 3),
                                      noise=noise,
                                      rank_deficient=st.sampled_from(["none", "duplicate", "dead", "combination"])))
    A, Y = d.A, d.Y
    f0, f1, f01 = _explained(A[:, [0]], Y), _explained(A[:, [1]], Y), _explained(A[:, [0, 1]], Y)
    assert f1 <= (0.0026 if noise == 0 else 0.05) * f01
    assert (f0 + f1) / f01 <= (0.5026 if noise == 0 else 0.6)


@settings(max_examples=20, deadline=None)
@given(f=vst.set_functions(n=st.integers(1, 6)))
def test_set_functions_are_valid_monotone_instances(f):
    assert isinstance(f, submod.SetFunction) and 1 <= f.n <= 6
    full = f.value(np.arange(f.n))
    assert full >= -1e-12
    assert np.all(f.gains([]) >= -1e-9)


def test_verification_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, verification, verification.cli, verification.strategies, verification.report; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(("strategy", "message"), [
    (vst.regression_data(correlation=1.5), "correlation must be a number in \\[0, 1\\)"),   # was: NaN arrays
    (vst.regression_data(correlation=1.0), "correlation"),                                # every column the same
    (vst.regression_data(rank_deficient="duplicates"), "rank_deficient must be one of"),  # was: silently "none"
    (vst.regression_data(n_units=0), "n_units must be an integer >= 1"),                  # was: 0 columns
    (vst.regression_data(group_size=0), "group_size"),
    (vst.regression_data(n_targets=0), "n_targets"),
    (vst.regression_data(noise=-1.0), "noise"),
    (vst.regression_data(n_units=st.integers(-3, -1)), "n_units"),                       # drawn values too
    (vst.coverage(density=2.0), "density"),
    (vst.modular(n=-1), "n must be an integer >= 1"),
    (vst.sparse_regression(data=[1, 2]), "data must be a regression_data"),
])
def test_strategies_refuse_arguments_outside_their_documented_range(strategy, message):
    with pytest.raises(InvalidArgument, match=message):
        find(strategy, lambda _: True, settings=settings(max_examples=5, database=None))


def test_sparse_regression_accepts_a_fixed_instance_as_the_module_promises():
    """'Every argument accepts a fixed value or a hypothesis strategy': data= of sparse_regression used to fail
    with AttributeError: 'RegressionData' object has no attribute 'validate'."""
    d = vst.suppressor_data()
    f = find(vst.sparse_regression(data=d, ridge=0.0, fit_intercept=False), lambda _: True,
             settings=settings(max_examples=2, database=None))
    assert f.n == d.n_units and f.value([0, 1]) == pytest.approx(SparseRegression(d.A, d.Y).value([0, 1]))
