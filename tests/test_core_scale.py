"""The optimizers do not depend on the units of the objective: ``c * F`` for any ``c > 0`` gives the same set, the
same negative-gain reports and the same certificate ratio as ``F``.

Oracles: the invariance itself (exact in arithmetic, so the runs must agree up to rounding), brute force over all
feasible sets, and the definition of monotonicity on a table-given function.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import submod

SCALES = [1.0, 1e-14, 1e-200, 1e12]


def _table_function(table: dict[tuple[int, ...], float], n: int, scale: float) -> submod.CallableFunction:
    return submod.from_callable(lambda S: scale * table[tuple(sorted(int(i) for i in S))], n=n, submodular=True)


@pytest.mark.parametrize("scale", SCALES)
def test_knapsack_best_singleton_fix_at_any_scale(scale):
    # Cost-benefit greedy takes item 0 (ratio 1 > 10 / 10.1) and then item 1 no longer fits; the best affordable
    # singleton, item 1, is worth ten times more. Brute force over the feasible sets confirms it is the optimum.
    weights, costs, budget = np.array([1.0, 10.0]) * scale, np.array([1.0, 10.1]), 10.1
    f = submod.Modular(weights)
    feasible = [S for r in range(3) for S in itertools.combinations(range(2), r) if costs[list(S)].sum() <= budget]
    opt = max(f.value(list(S)) for S in feasible)
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, None, method=method, constraint=submod.Knapsack(costs, budget))
        assert res.selected.tolist() == [1]
        assert res.value == opt


# Not monotone: adding 1 or 2 to {0} loses value, and F({0}) = 2 < F({1, 2}) = 3 = OPT_2. Greedy takes 0 first.
NON_MONOTONE = {(): 0.0, (0,): 2.0, (1,): 1.5, (2,): 1.5, (0, 1): 1.0, (0, 2): 1.0, (1, 2): 3.0, (0, 1, 2): 0.0}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_negative_gains_reported_at_any_scale(scale, method):
    f = _table_function(NON_MONOTONE, 3, scale)
    opt = max(f.value(list(S)) for S in NON_MONOTONE if len(S) <= 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = submod.maximize(f, 2, method=method, seed=0)
    negatives = [(j, g) for _, j, g in res.negative_gains]
    # the gains F(1 | {0}) and F(2 | {0}) are -1 (times the scale): both seen, and no certificate (its "bound" 2 would
    # lie below OPT_2 = 3)
    assert sorted({j for j, _ in negatives}) == [1, 2]
    assert all(np.isclose(g, -scale, rtol=1e-9, atol=0.0) for _, g in negatives)
    assert any(issubclass(w.category, submod.NonMonotoneWarning) for w in caught)
    assert res.certificate is None
    assert res.value < opt  # the reason a certificate would have been wrong


@pytest.mark.parametrize("scale", SCALES[1:])
@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_facility_location_runs_do_not_depend_on_units(scale, method):
    X = np.random.default_rng(0).standard_normal((300, 4))
    K = submod.FacilityLocation(X).similarity
    base = submod.maximize(submod.FacilityLocation(similarity=np.array(K)), 15, method=method, seed=3)
    res = submod.maximize(submod.FacilityLocation(similarity=K * scale), 15, method=method, seed=3)
    assert np.array_equal(res.selected, base.selected)
    assert res.n_evaluations == base.n_evaluations
    assert np.isclose(res.value, base.value * scale, rtol=1e-12, atol=0.0)
    assert np.isclose(res.certificate.ratio, base.certificate.ratio, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("phi", "why"), [
    (lambda x: x ** 2, "concave"),              # convex: F would be supermodular
    (lambda x: -x, "non-decreasing"),           # decreasing: F would not be monotone
    (lambda x: np.sqrt(x) + 1.0, "zero at zero"),
])
def test_feature_based_refuses_a_non_concave_phi_at_any_scale(scale, phi, why):
    with pytest.raises(ValueError, match=why):
        submod.FeatureBased(np.ones((3, 2)), concave=lambda x: scale * phi(x))


@pytest.mark.parametrize("unit", [1e-3, 1e-9])
def test_feature_based_checks_phi_where_it_is_used(unit):
    # min(x^2, c) is convex below sqrt(c) and flat above: on a grid over [0, 1] it looks concave, but features in
    # small units (sums below sqrt(c)) only ever reach its convex part, where F is supermodular
    X = unit * np.random.default_rng(2).random((5, 3))
    top = float(X.sum(axis=0).max())
    with pytest.raises(ValueError, match="concave"):
        submod.FeatureBased(X, concave=lambda x: np.minimum(x ** 2, (2 * top) ** 2))
    submod.FeatureBased(X, concave=np.sqrt)  # a concave phi is still accepted in these units


@pytest.mark.parametrize("scale", SCALES)
def test_feature_based_accepts_a_scaled_concave_phi(scale):
    X = np.random.default_rng(1).random((6, 3))
    f = submod.FeatureBased(X, concave=lambda x: scale * np.sqrt(x))
    S = [0, 2, 5]
    assert np.isclose(f.value(S), scale * np.sqrt(X[S].sum(axis=0)).sum(), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("K", "why"), [
    (np.array([[1.0, 0.9], [0.0, 1.0]]), "symmetric"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), "positive semidefinite"),   # eigenvalues 3 and -1
])
def test_log_determinant_checks_the_kernel_at_any_scale(scale, K, why):
    with pytest.raises(ValueError, match=why):
        submod.LogDeterminant(similarity=scale * K, ridge=scale)


@pytest.mark.parametrize("scale", SCALES)
def test_log_determinant_accepts_a_scaled_psd_kernel(scale):
    X = np.random.default_rng(2).standard_normal((5, 3))
    K = X @ X.T
    f = submod.LogDeterminant(similarity=scale * K, ridge=scale)   # log det(I + K_SS): the scale cancels
    S = [0, 3, 4]
    assert np.isclose(f.value(S), np.linalg.slogdet(np.eye(3) + K[np.ix_(S, S)])[1], rtol=1e-9, atol=0.0)


@pytest.mark.parametrize(("call", "match"), [
    (lambda X: submod.GraphCut(X, lam="0.3"), r"lam must be a number in \[0, 0.5\].*'0.3'"),
    (lambda X: submod.maximize(submod.FacilityLocation(X), 2, method="stochastic", eps="0.1"),
     r"eps must be a number in \(0, 1\).*'0.1'"),
    (lambda X: submod.FacilityLocation(X).value(3), r"S must be a set of indices .* Pass \[3\]"),
    (lambda X: submod.FacilityLocation(X).value([1e20]), r"index outside \[0, 6\): min 1e\+20"),
])
def test_wrong_argument_types_get_a_clear_error(call, match):
    # a string where a number goes, a single index where a set goes, a float index past int64: one clear
    # ValueError naming the argument, not a raw TypeError or an index wrapped around by the int cast
    X = np.random.default_rng(0).random((6, 3))
    with pytest.raises(ValueError, match=match):
        call(X)
