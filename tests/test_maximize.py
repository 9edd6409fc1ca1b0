"""Optimizers against brute force: greedy, lazy (bit for bit), stochastic, constraints, certificates, bad input."""

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import submod

nonneg = st.floats(0.0, 10.0, allow_nan=False, width=64)


@st.composite
def submodular_instances(draw):
    """Small instances of every built-in submodular objective."""
    n = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["facility", "sparse-facility", "feature", "coverage", "logdet", "graphcut",
                                 "modular", "sum"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "facility":
        K = draw(arrays(np.float64, (n, n), elements=nonneg))
        return submod.FacilityLocation(similarity=K)
    if kind == "sparse-facility":
        import scipy.sparse as sp
        K = np.where(rng.random((n, n)) < 0.5, rng.random((n, n)), 0.0)
        return submod.FacilityLocation(similarity=sp.csr_matrix(K))
    if kind == "feature":
        X = draw(arrays(np.float64, (n, 3), elements=nonneg))
        return submod.FeatureBased(X, concave=draw(st.sampled_from(["sqrt", "log1p", "inverse"])))
    if kind == "coverage":
        return submod.Coverage(rng.random((n, 6)) < 0.4, weights=rng.random(6))
    if kind == "logdet":
        X = rng.standard_normal((n, 3))
        return submod.LogDeterminant(X, ridge=0.5)
    if kind == "graphcut":
        A = rng.random((n, n))
        return submod.GraphCut(similarity=A + A.T, lam=0.4)
    if kind == "modular":
        return submod.Modular(draw(arrays(np.float64, (n,), elements=nonneg)))
    X = rng.random((n, 2))
    return submod.FeatureBased(X) + 0.5 * submod.FacilityLocation(similarity=rng.random((n, n)))


def brute_force_greedy(f, k):
    """Textbook greedy from the value oracle alone: largest gain, lowest index on ties, stop at gain <= 0."""
    S, val = [], 0.0
    for _ in range(k):
        best, best_gain = None, 0.0
        for j in range(f.n):
            if j in S:
                continue
            g = f.value(S + [j]) - val
            if g > best_gain + 1e-9 * max(1.0, abs(val)):
                best, best_gain = j, g
        if best is None:
            break
        S.append(best)
        val = f.value(S)
    return S, val


def brute_opt(f, k, feasible=lambda S: True):
    return max(f.value(list(S)) for r in range(k + 1) for S in itertools.combinations(range(f.n), r)
               if feasible(S))


@settings(max_examples=60, deadline=None)
@given(submodular_instances(), st.integers(0, 8))
def test_greedy_matches_brute_force_greedy_and_lazy_matches_greedy_bit_for_bit(f, k):
    k = min(k, f.n)
    greedy = submod.maximize(f, k)
    S, val = brute_force_greedy(f, k)
    # The brute force treats gains within 1e-9 * max(1, value) as ties and stops below that; greedy takes any
    # positive gain (sqrt of a 1e-17 feature gains 1e-9). So the values agree to k such steps.
    tol = (k + 1) * 1e-9 * max(1.0, abs(val))
    assert greedy.value == pytest.approx(val, rel=0, abs=tol)
    assert greedy.value == pytest.approx(f.value(S), rel=0, abs=tol)
    lazy = submod.maximize(f, k, method="lazy")
    np.testing.assert_array_equal(lazy.selected, greedy.selected)
    np.testing.assert_array_equal(lazy.gains, greedy.gains)
    np.testing.assert_array_equal(lazy.values, greedy.values)
    assert lazy.violations == []
    assert lazy.n_evaluations <= greedy.n_evaluations + f.n


@settings(max_examples=40, deadline=None)
@given(submodular_instances(), st.integers(1, 8))
def test_certificates_bound_brute_force_opt(f, k):
    k = min(k, f.n)
    opt = brute_opt(f, k)
    for method in submod.METHODS:
        res = submod.maximize(f, k, method=method, seed=1)
        assert res.certificate is not None
        assert res.certificate.upper_bound >= opt - 1e-9 * max(1.0, opt)
        assert res.value <= opt + 1e-9 * max(1.0, opt)
        assert res.certificate.ratio <= 1.0


@settings(max_examples=40, deadline=None)
@given(submodular_instances(), st.integers(1, 8))
def test_greedy_reaches_one_minus_one_over_e(f, k):
    k = min(k, f.n)
    opt = brute_opt(f, k)
    assert submod.maximize(f, k).value >= (1 - 1 / math.e) * opt - 1e-9


@settings(max_examples=15, deadline=None)
@given(submodular_instances(), st.integers(1, 4))
def test_stochastic_greedy_mean_over_seeds_meets_its_bound(f, k):
    k = min(k, f.n)
    opt = brute_opt(f, k)
    eps = submod.DEFAULT_EPS
    mean = np.mean([submod.maximize(f, k, method="stochastic", seed=s).value for s in range(30)])
    assert mean >= (1 - 1 / math.e - eps) * opt - 1e-9


def test_stochastic_greedy_is_seeded_and_samples_the_documented_number():
    f = submod.FacilityLocation(np.random.default_rng(0).standard_normal((300, 4)))
    a = submod.maximize(f, 10, method="stochastic", seed=7)
    b = submod.maximize(f, 10, method="stochastic", seed=7)
    np.testing.assert_array_equal(a.selected, b.selected)
    per_step = math.ceil(300 / 10 * math.log(1 / submod.DEFAULT_EPS))
    # per-step samples plus one full pass for the certificate
    assert a.n_evaluations == 10 * per_step + 300


def lstsq_value(A, y):
    def value(S):
        if len(S) == 0:
            return 0.0
        coef, *_ = np.linalg.lstsq(A[:, S], y, rcond=None)
        return float(y @ y - np.sum((y - A[:, S] @ coef) ** 2))
    return value


def suppressor_instance():
    """y = t; x0 = s is useless alone but decisive next to x1 = t + s; x2, x3 are noisy copies of t."""
    rng = np.random.default_rng(0)
    t, s = rng.standard_normal(500), rng.standard_normal(500)
    A = np.column_stack([s, t + s, t + 1.2 * rng.standard_normal(500), t + 1.2 * rng.standard_normal(500)])
    return A, t


def test_lazy_with_fallback_equals_greedy_where_plain_lazy_fails():
    A, y = suppressor_instance()
    f = submod.from_callable(lstsq_value(A, y), n=4)   # least squares: not submodular
    greedy = submod.maximize(f, 2)
    assert greedy.selected.tolist() == [1, 0]          # the pair explains y exactly
    assert greedy.value == pytest.approx(y @ y, rel=1e-9)
    with pytest.warns(UserWarning, match="stale gains"):
        plain = submod.maximize(f, 2, method="lazy", lazy_fallback=False)
    assert plain.value < 0.9 * greedy.value            # plain lazy trusted x0's stale gain of ~0
    assert 0 not in plain.selected.tolist()
    safe = submod.maximize(f, 2, method="lazy")
    np.testing.assert_array_equal(safe.selected, greedy.selected)
    assert safe.value == greedy.value
    assert any(step == 1 and j == 0 for step, j, _, _ in safe.violations)
    assert all(fresh > stale for _, _, stale, fresh in safe.violations)
    # No certificate without a proven gamma; the gamma = 1 online bound would even be wrong here.
    assert greedy.certificate is None
    assert submod.online_bound(f.gains([1]), f.value([1]), 2) >= y @ y  # at A = {x1} it happens to hold
    assert submod.online_bound(f.gains([]), 0.0, 2) < y @ y              # at A = {} it is below OPT


def test_gamma_lower_enables_a_sound_certificate():
    A, y = suppressor_instance()
    f = submod.from_callable(lstsq_value(A, y), n=4)
    res = submod.maximize(f, 2, gamma_lower=0.01)
    assert res.certificate is not None and res.certificate.gamma_lower == 0.01
    assert res.certificate.upper_bound >= brute_opt(f, 2)


def exact_gamma_by_enumeration(value, n, k):
    """gamma_{V,k} from its definition: min over L and disjoint non-empty S, |S| <= k (0/0 := 1)."""
    best = 1.0
    for r in range(n + 1):
        for L in itertools.combinations(range(n), r):
            fl = value(list(L))
            rest = [j for j in range(n) if j not in L]
            for s in range(1, k + 1):
                for S in itertools.combinations(rest, s):
                    den = value(list(L) + list(S)) - fl
                    num = sum(value(list(L) + [j]) - fl for j in S)
                    if den > 1e-12:
                        best = min(best, num / den)
    return best


def test_no_certificate_from_stale_gains_of_a_non_submodular_function():
    # Plain lazy greedy keeps stale gains; for least squares they are not upper bounds, so a certificate built
    # from them (even with a proven gamma) can fall below OPT. Exact greedy and lazy with fallback keep theirs.
    A = np.array([[2.0, -3, -2], [-2, -2, 2], [3, 1, -3], [-3, -1, 0]])
    y = np.array([1.0, 0, -2, -2])
    f = submod.SparseRegression(A, y)
    gamma = exact_gamma_by_enumeration(lstsq_value(A, y), 3, 2)  # about 0.1955: proven, as it is exact
    with pytest.warns(submod.optimize.StaleBoundWarning):
        plain = submod.maximize(f, 2, method="lazy", lazy_fallback=False, gamma_lower=gamma)
    assert plain.certificate is None
    for kw in ({"method": "greedy"}, {"method": "lazy"}):
        res = submod.maximize(f, 2, gamma_lower=gamma, **kw)
        assert res.certificate.upper_bound >= brute_opt(f, 2) * (1 - 1e-9)


def test_stochastic_greedy_reports_negative_gains_and_gives_no_certificate_then():
    # Declared submodular and (by default) monotone, but F drops by 300 when 0 and 99 are both in: at the final
    # set of this seed the gain of 99 is -180 and a certificate from those gains would be 119 < F = 129 reachable.
    w = np.ones(100)
    w[0], w[99] = 100.0, 120.0

    def value(S):
        S = list(S)
        return float(w[S].sum() - (300.0 if (0 in S and 99 in S) else 0.0))

    f = submod.from_callable(value, n=100, submodular=True)
    with pytest.warns(UserWarning, match="not monotone"):
        res = submod.maximize(f, 10, method="stochastic", seed=17)
    assert res.negative_gains and res.certificate is None


def test_stochastic_sample_size_follows_the_matroid_rank():
    # n = 60 in 6 groups of 10, one pick per group: 6 picks at most, so ceil((60 / 6) ln(1 / 0.05)) = 30 samples
    # per step (capped by the feasible candidates left), not ceil((60 / 60) ln 20) = 3 as k = n would give.
    f = submod.Modular(np.random.default_rng(0).uniform(1.0, 2.0, 60))
    c = submod.PartitionMatroid(np.repeat(np.arange(6), 10), 1)
    res = submod.maximize(f, None, method="stochastic", constraint=c, seed=0)
    per_step = [min(30, 60 - 10 * t) for t in range(6)]
    assert res.selected.size == 6
    assert res.n_evaluations == sum(per_step) + 60  # + one full pass for the final-set certificate


@pytest.mark.parametrize("method", submod.METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gains_are_refused(method, bad):
    class Bad(submod.SetFunction):
        submodular = True

        def init_state(self):
            return _BadState(self.n)

    class _BadState(submod.GainState):
        def gains(self, candidates=None):
            c = self._all(candidates)
            g = (~self._in_set[c]).astype(float)
            g[c == 1] = bad
            return g

        def _add(self, j):
            self.value += 1.0

    with pytest.raises(ValueError, match="non-finite gain"):
        submod.maximize(Bad(4), 2, method=method, seed=0)


def test_value_oracle_may_modify_its_argument():
    # An oracle that sorts S in place must not corrupt the base set of the next candidates.
    w = np.array([5.0, 1.0, 4.0, 2.0, 3.0])

    def value(S):
        S.sort()
        return float(w[S].sum())

    f = submod.from_callable(value, n=5, submodular=True)
    np.testing.assert_allclose(f.gains([4]), [5.0, 1.0, 4.0, 2.0, 0.0])
    assert submod.maximize(f, 3).selected.tolist() == [0, 2, 4]


def test_function_declared_non_monotone_gets_no_certificate():
    # Submodular but not monotone; no negative gain shows on the greedy path, yet the online bound needs
    # monotonicity (here it would be 6.45 < OPT = 7.57).
    C = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]], bool)
    a, b = np.array([1.137, 1.009, 2.823]), np.array([0.605, 0.87, 0.099])

    def val(S):
        c = C[:, list(S)].sum(1)
        return float((a * c - b * c ** 2).sum())

    f = submod.from_callable(val, 5, submodular=True, monotone=False)
    res = submod.maximize(f, 3)
    assert res.certificate is None
    assert brute_opt(f, 3) > 7.5


def test_non_monotone_function_is_reported():
    f = submod.from_callable(lambda S: float(len(S) - 0.4 * len(S) ** 2), n=5)
    with pytest.warns(UserWarning, match="not monotone"):
        res = submod.maximize(f, 3)
    assert res.negative_gains and res.certificate is None
    assert res.selected.size == 1 and res.stopped_early


def test_stops_when_no_candidate_has_positive_gain_and_breaks_ties_by_lowest_index():
    res = submod.maximize(submod.Modular([0.0, 2.0, 2.0, 0.0, 1.0]), 5)
    assert res.selected.tolist() == [1, 2, 4]
    assert res.stopped_early
    f = submod.Coverage(np.array([[1, 0], [1, 0], [0, 1], [0, 1]]))
    for method in submod.METHODS:
        assert submod.maximize(f, 4, method=method, seed=0).selected.size == 2
    assert submod.maximize(f, 2, method="lazy").selected.tolist() == [0, 2]


def test_lazy_on_objectives_that_keep_their_gains_runs_the_exact_scan():
    """Coverage and Modular keep every gain current, so lazy's bookkeeping would cost more than reading them all:
    lazy returns greedy's result and, as documented, counts every gain it read."""
    rng = np.random.default_rng(5)
    for f in (submod.Coverage(sp.csr_matrix(rng.random((400, 60)) < 0.05), weights=rng.random(60)),
              submod.Modular(rng.random(50))):
        greedy, lazy = submod.maximize(f, 20), submod.maximize(f, 20, method="lazy")
        np.testing.assert_array_equal(lazy.selected, greedy.selected)
        np.testing.assert_array_equal(lazy.values, greedy.values)
        assert lazy.n_evaluations == greedy.n_evaluations == 21 * f.n
        assert lazy.certificate.upper_bound == greedy.certificate.upper_bound


def test_k_zero_returns_the_empty_set():
    res = submod.maximize(submod.Modular([1.0, 2.0]), 0)
    assert res.selected.size == 0 and res.value == 0.0


@settings(max_examples=30, deadline=None)
@given(submodular_instances(), st.floats(0.5, 3.0))
def test_knapsack_guarantee_and_certificate(f, budget):
    rng = np.random.default_rng(f.n)
    costs = rng.uniform(0.2, 1.5, f.n)
    c = submod.Knapsack(costs, budget)
    opt = brute_opt(f, f.n, lambda S: costs[list(S)].sum() <= budget)
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, None, method=method, constraint=c)
        assert costs[res.selected].sum() <= budget + 1e-12
        assert res.value >= (1 - 1 / math.e) / 2 * opt - 1e-9
        assert res.certificate.upper_bound >= opt - 1e-9 * max(1, opt)
    g, lz = (submod.maximize(f, None, method=m, constraint=c) for m in ("greedy", "lazy"))
    np.testing.assert_array_equal(g.selected, lz.selected)


@settings(max_examples=40, deadline=None)
@given(submodular_instances(), st.floats(0.3, 3.0), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_knapsack_with_a_cardinality_limit_certificate_bounds_opt(f, budget, k, seed):
    # Both limits at once: the bound must hold for the best set of at most k items within the budget. (Filling
    # the fractional knapsack by gain/cost and stopping after k items is not an upper bound: a cheap low-gain
    # item can use up one of the k places.)
    k = min(k, f.n)
    costs = np.random.default_rng(seed).uniform(0.01, 1.5, f.n)
    opt = brute_opt(f, k, lambda S: costs[list(S)].sum() <= budget)
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, k, method=method, constraint=submod.Knapsack(costs, budget))
        assert res.selected.size <= k and costs[res.selected].sum() <= budget + 1e-12
        assert res.certificate.upper_bound >= opt - 1e-9 * max(1, opt)


def test_knapsack_with_cardinality_counterexample():
    # A cheap, nearly worthless item has the best gain/cost ratio; with k = 2 the optimum is the two others.
    f = submod.Modular([1.0, 100.0, 100.0])
    res = submod.maximize(f, 2, constraint=submod.Knapsack([0.01, 50.0, 50.0], 100.01))
    assert res.certificate.upper_bound >= 200.0


def test_knapsack_keeps_the_greedy_set_when_the_best_singleton_only_ties():
    # Every item is worth the same: cost-benefit greedy takes the cheapest (index 2) and no singleton beats it.
    f = submod.FacilityLocation(similarity=np.full((8, 8), 3.27268851))
    costs = np.array([0.625, 1.48, 0.614, 1.23, 1.33, 0.708, 0.769, 0.685])
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, None, method=method, constraint=submod.Knapsack(costs, 1.0))
        assert res.selected.tolist() == [2]


def test_knapsack_best_singleton_fix():
    # Cost-benefit greedy takes the cheap item first and then cannot afford the valuable one.
    f = submod.Modular([1.0, 10.0])
    res = submod.maximize(f, None, constraint=submod.Knapsack([0.1, 1.0], budget=1.0))
    assert res.selected.tolist() == [1] and res.value == 10.0


def test_knapsack_with_k_zero_selects_nothing():
    # The best-singleton fix used to replace the empty k = 0 set by the best affordable item.
    for method in ("greedy", "lazy"):
        res = submod.maximize(submod.Modular([5.0, 4.0, 3.0]), 0, method=method,
                              constraint=submod.Knapsack([1.0, 1.0, 1.0], 2.0))
        assert res.selected.size == 0 and res.value == 0.0


def least_squares_instance(n: int) -> submod.SparseRegression:
    """A weakly submodular objective (not declared submodular): maximize certifies it only with a proven gamma."""
    A = np.random.default_rng(n).standard_normal((12, n))
    return submod.SparseRegression(A, A @ np.arange(1.0, n + 1))


@settings(max_examples=30, deadline=None)
@given(st.one_of(submodular_instances(), st.integers(1, 6).map(least_squares_instance)),
       st.floats(0.0, 2.0), st.integers(0, 2**32 - 1), st.booleans())
def test_a_constraint_that_admits_only_the_empty_set_gets_the_exact_certificate(f, budget, seed, with_k):
    """A knapsack whose every cost exceeds the budget, or a partition matroid whose groups all have budget 0,
    admits only the empty set, so OPT = F(empty) exactly (brute force over every set the constraint allows). maximize
    gave the online bound there (0.6 instead of 0 for Modular([3, 1, 2]) under Knapsack([5, 6, 7], 1)), labelled a
    bound rather than exact, and no certificate at all for least squares without a proven gamma."""
    rng = np.random.default_rng(seed)
    costs = budget + rng.uniform(1e-3, 2.0, f.n)                 # every single element is over budget
    groups = rng.integers(0, 3, f.n)
    cases = [(submod.Knapsack(costs, budget), lambda S: costs[list(S)].sum() <= budget),
             (submod.PartitionMatroid(groups, 0), lambda S: len(S) == 0 or
              max(np.bincount(groups[list(S)])) <= 0)]
    k = int(rng.integers(1, f.n + 1)) if with_k else None
    for constraint, feasible in cases:
        opt = brute_opt(f, f.n, feasible)
        assert [S for r in range(f.n + 1) for S in itertools.combinations(range(f.n), r) if feasible(S)] == [()]
        methods = ("greedy", "lazy") if isinstance(constraint, submod.Knapsack) else submod.METHODS
        for method in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                res = submod.maximize(f, k, method=method, constraint=constraint, seed=0)
            cert = res.certificate
            assert res.selected.size == 0 and res.value == opt == f.value([])
            assert cert is not None and cert.upper_bound == opt and cert.kind.startswith("exact")
            assert res.n_evaluations == 0 and not res.stopped_early
            assert submod.maximize(f, k, method=method, constraint=constraint, seed=0,
                                   certificate=False).certificate is None


@pytest.mark.parametrize("scale", [1.0, 1e-13, 1e-20, 1e6])
def test_knapsack_budget_holds_at_any_cost_scale(scale):
    # The tracker's slack was at least 1e-12 in absolute terms, so costs of 1e-13 all fitted a budget of 2e-13.
    f = submod.Modular([4.0, 3.0, 2.0, 1.0])
    c = submod.Knapsack(np.full(4, scale), budget=2 * scale)
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, None, method=method, constraint=c)
        assert res.selected.tolist() == [0, 1]
        assert c.costs[res.selected].sum() <= c.budget


@settings(max_examples=30, deadline=None)
@given(submodular_instances(), st.integers(0, 2), st.integers(1, 8))
def test_partition_matroid_guarantee_and_certificate(f, budget, k):
    k = min(k, f.n)
    groups = np.arange(f.n) % 3
    c = submod.PartitionMatroid(groups, budget)

    def feasible(S):
        return all(np.sum(groups[list(S)] == g) <= budget for g in range(3))

    opt = brute_opt(f, k, feasible)
    for method in submod.METHODS:
        res = submod.maximize(f, k, method=method, constraint=c, seed=0)
        assert feasible(res.selected.tolist()) and res.selected.size <= k
        if method != "stochastic":
            assert res.value >= 0.5 * opt - 1e-9
        assert res.certificate.upper_bound >= opt - 1e-9 * max(1, opt)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": -1}, "non-negative"),
    ({"k": 4}, "exceeds"),
    ({"k": 2.5}, "integer"),
    ({"k": None}, "k is required"),
    ({"k": 1, "method": "fast"}, "unknown method"),
    ({"k": 1, "eps": 0.0}, "eps"),
    ({"k": 1, "gamma_lower": 1.5}, "gamma_lower"),
    ({"k": 1, "gamma_lower": "0.5"}, "gamma_lower"),
    ({"k": 1, "constraint": "knapsack"}, "constraint"),
    ({"k": 1, "constraint": submod.Knapsack([1.0, 1.0], 1.0)}, "one cost per element"),
    ({"k": 1, "constraint": submod.PartitionMatroid([0, 1], 1)}, "one label per element"),
    ({"k": 1, "method": "stochastic", "constraint": submod.Knapsack([1.0] * 3, 1.0)}, "Knapsack"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        submod.maximize(submod.Modular([1.0, 2.0, 3.0]), **kwargs)


def test_bad_objective_and_constraints_are_rejected():
    with pytest.raises(ValueError, match="from_callable"):
        submod.maximize(lambda S: 1.0, 1)
    with pytest.raises(ValueError, match="positive"):
        submod.Knapsack([1.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="budget"):
        submod.Knapsack([1.0], -1.0)
    for bad in ("3", None, True):
        with pytest.raises(ValueError, match="budget must be a number"):
            submod.Knapsack([1.0], bad)
    with pytest.raises(ValueError, match="one per group"):
        submod.PartitionMatroid([0, 1, 1], [1])
    for bad in (1.5, -0.5, True):  # a fractional scalar budget used to be truncated silently
        with pytest.raises(ValueError, match="budgets"):
            submod.PartitionMatroid([0, 0, 1, 1], bad)
    assert submod.PartitionMatroid([0, 0, 1, 1], np.int32(2)).budgets.tolist() == [2, 2]


def test_partition_matroid_labels_are_not_slots():
    """Labels are names, not positions: a label of 10**12 with one int budget took a budget slot per label up to it
    (8 TB, a MemoryError). Greedy on a modular function is optimal on a matroid, so the oracle is brute force over
    the sets the budgets allow; renumbering the labels changes nothing."""
    w = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    huge = np.array([0, 10**12, 1, 10**12, 1, 10**12, 7])
    dense = np.unique(huge, return_inverse=True)[1]
    for k in range(1, 6):
        for b in (1, 2):
            c = submod.PartitionMatroid(huge, budgets=b)
            feasible = [S for r in range(k + 1) for S in itertools.combinations(range(7), r)
                        if all(np.sum(dense[list(S)] == g) <= b for g in range(4))]
            res = submod.maximize(submod.Modular(w), k, constraint=c)
            assert res.value == pytest.approx(max(w[list(S)].sum() for S in feasible))
            assert res.selected.tolist() == submod.maximize(
                submod.Modular(w), k, constraint=submod.PartitionMatroid(dense, b)).selected.tolist()
            assert res.certificate.upper_bound >= res.value
    # per-group budgets given as an array still index it by label (no huge label possible there without the array)
    c = submod.PartitionMatroid([0, 3, 3, 1], [1, 0, 5, 2])
    assert c.budgets.tolist() == [1, 0, 5, 2]
    res = submod.maximize(submod.Modular([1.0, 2.0, 3.0, 4.0]), 4, constraint=c)
    assert sorted(res.selected.tolist()) == [0, 1, 2]   # group 3 allows both, group 0 its one; label 1 allows none


def test_value_oracle_returning_nan_is_rejected():
    f = submod.from_callable(lambda S: float("nan") if len(S) == 2 else float(len(S)), n=3)
    with pytest.raises(ValueError, match="finite"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            submod.maximize(f, 2)


def documented_certificate(f, prefixes, k, gamma):
    """max(F(A), min over the prefixes A of F(A) + (1/gamma) * (sum of the k largest positive F(j|A), j not in A)),
    computed from the value oracle alone."""
    bounds = []
    for A in prefixes:
        fa = f.value(list(A))
        gains = sorted((max(f.value(list(A) + [j]) - fa, 0.0) for j in range(f.n) if j not in A), reverse=True)
        bounds.append(fa + sum(gains[:k]) / gamma)
    return max(f.value(list(prefixes[-1])), min(bounds))


def test_greedy_certificate_is_the_documented_minimum_over_prefixes():
    """The certificate equals F(A) + (1/gamma) * (k largest gains at A), minimised over greedy's prefixes: with a
    proven gamma < 1 (least squares) and with gamma = 1 (a submodular function), not merely some number >= OPT."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((40, 6))
    A[:, 1] += 0.8 * A[:, 0]
    f = submod.SparseRegression(A, A[:, :3] @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(40))
    res = submod.maximize(f, 3, gamma_lower=0.2)
    prefixes = [res.selected[:t].tolist() for t in range(4)]
    assert res.certificate.upper_bound == pytest.approx(documented_certificate(f, prefixes, 3, 0.2), rel=1e-9)
    g = submod.FacilityLocation(similarity=rng.random((8, 8)))
    res = submod.maximize(g, 3)
    prefixes = [res.selected[:t].tolist() for t in range(4)]
    # rel 1e-7: greedy widens its bound by k * 1e-9 * (largest gain) for the rounding of incremental gains
    assert res.certificate.upper_bound == pytest.approx(documented_certificate(g, prefixes, 3, 1.0), rel=1e-7)


@settings(max_examples=30, deadline=None)
@given(submodular_instances())
def test_certificate_of_a_run_that_exhausts_every_gain_is_its_value(f):
    """With k = n every method ends at a prefix where no gain is positive, so the minimum over prefixes of
    F(A) + sum of the k largest gains is F(A) itself: the certificate equals the value (stale gains of elements
    already in A must not count)."""
    for method in submod.METHODS:
        res = submod.maximize(f, f.n, method=method, seed=0)
        assert res.certificate.upper_bound == pytest.approx(res.value, rel=1e-8, abs=1e-8)


def test_lazy_breaks_a_tie_with_an_exact_stale_bound_like_greedy():
    """Coverage (from a value oracle) where, after the first pick, a stale bound equals the best fresh gain: the
    element holding it (lower index) must be re-evaluated and win the tie, as in exact greedy."""
    sets = [{4}, {1, 2, 3}, {1, 5}]   # gains at the empty set 1, 3, 2; after picking 1: 1, -, 1
    f = submod.from_callable(lambda S: float(len(set().union(*(sets[j] for j in S)))), n=3, submodular=True)
    assert submod.maximize(f, 2).selected.tolist() == [1, 0]
    assert submod.maximize(f, 2, method="lazy").selected.tolist() == [1, 0]


def test_knapsack_certificate_is_the_fractional_knapsack_bound():
    """The knapsack certificate is min over greedy prefixes A of F(A) + min(LP relaxation of the gains at A, k
    largest gains); for a modular F the LP is solved independently with scipy's linprog (budget 4.5: item 1, then
    item 0 fractionally, LP = 10 at the empty set)."""
    from scipy.optimize import linprog

    w, c, budget = np.array([6.0, 5.0, 4.0, 1.0]), np.array([3.0, 2.0, 2.0, 1.0]), 4.5
    f = submod.Modular(w)
    res = submod.maximize(f, None, constraint=submod.Knapsack(c, budget))
    assert res.selected.tolist() == [1, 2] and res.value == 9.0
    bounds = []
    for t in range(res.selected.size + 1):
        rest = np.setdiff1d(np.arange(4), res.selected[:t])
        lp = -linprog(-w[rest], A_ub=c[rest][None, :], b_ub=[budget], bounds=(0, 1)).fun
        bounds.append(w[res.selected[:t]].sum() + lp)
    assert res.certificate.upper_bound == pytest.approx(min(bounds), rel=1e-12)
    assert res.certificate.upper_bound == pytest.approx(10.0, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_partition_matroid_certificate_of_a_modular_function_is_opt(data):
    """For a modular F the matroid relaxation at the empty set (the budgets[g] largest gains of every group, then
    the k largest of those) is exact, so the certificate equals the brute-force optimum."""
    n = data.draw(st.integers(1, 7))
    w = np.array(data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n)))
    groups = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    n_groups = int(groups.max()) + 1
    budgets = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n_groups, max_size=n_groups)))
    k = data.draw(st.integers(1, n))
    res = submod.maximize(submod.Modular(w), k, constraint=submod.PartitionMatroid(groups, budgets))
    ok = lambda S: all(np.sum(groups[list(S)] == g) <= b for g, b in enumerate(budgets))  # noqa: E731
    assert res.certificate.upper_bound == pytest.approx(brute_opt(submod.Modular(w), k, ok), rel=1e-12)


# The finding's least-squares instance (FINDINGS_user.md #4): greedy's online bound with gamma = 1 lies below the
# brute-force OPT_3, so gamma_lower = 1 must be refused for a function not declared submodular.
GAMMA_ONE_A = np.array([[-1.895, -1.504, 0.846, -0.223, -1.422], [-0.198, -0.636, 2.13, 0.269, -0.789],
                        [-1.986, -1.479, -0.089, 0.226, 0.257], [-0.263, -0.463, -1.576, 0.147, -0.825]])
GAMMA_ONE_Y = np.array([0.223, 0.223, -0.344, -2.013])


def test_gamma_lower_one_is_refused_for_a_function_not_declared_submodular():
    f = submod.SparseRegression(GAMMA_ONE_A, GAMMA_ONE_Y)
    opt = brute_opt(f, 3)
    # why: the gamma = 1 online bound, minimised over greedy's prefixes (F and gains from the plain lstsq oracle),
    # falls below OPT on this instance
    value = lstsq_value(GAMMA_ONE_A, GAMMA_ONE_Y)
    sel = submod.maximize(f, 3).selected
    bounds = []
    for t in range(sel.size + 1):
        A_t = list(sel[:t])
        gains = [value(A_t + [j]) - value(A_t) for j in range(5) if j not in A_t]
        bounds.append(value(A_t) + sum(sorted(gains)[-3:]))
    assert min(bounds) < opt - 1e-6
    match = "gamma_lower = 1 on SparseRegression, which is not declared submodular"
    for gamma in (1.0, 1, np.float64(1.0)):
        with pytest.raises(ValueError, match=match):
            submod.maximize(f, 3, gamma_lower=gamma)
        with pytest.raises(ValueError, match=match):
            submod.maximize_distributed(f, 3, n_parts=2, seed=0, gamma_lower=gamma)
    # the selector builds the objective inside fit: its message names its own parameter, gamma_lower
    with pytest.raises(ValueError, match="gamma_lower=1: that is the submodular online bound"):
        submod.SparseRegressionSelector(3, fit_intercept=False, gamma_lower=1.0).fit(GAMMA_ONE_A, GAMMA_ONE_Y)
    with pytest.raises(ValueError, match=r"gamma_lower\(objective, k\) returned 1: that is the submodular"):
        submod.SparseRegressionSelector(3, fit_intercept=False, gamma_lower=lambda f, k: 1.0).fit(GAMMA_ONE_A,
                                                                                                  GAMMA_ONE_Y)
    # a function declared submodular keeps gamma_lower = 1 (the online bound is valid there)
    g = submod.FeatureBased(np.abs(GAMMA_ONE_A))
    res = submod.maximize(g, 3, gamma_lower=1.0)
    assert res.certificate.upper_bound >= brute_opt(g, 3) * (1 - 1e-12)


def test_gamma_lower_takes_a_ratio_estimate_and_checks_its_kind():
    import verification as vf

    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 6))
    A[:, 1] += 0.8 * A[:, 0]  # correlated columns: gamma < 1
    f = submod.SparseRegression(A, A @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((30, 2)))
    opt = brute_opt(f, 3)
    exact = vf.submodularity_ratio(f, 3, method="exact")
    spectral = vf.submodularity_ratio(f, 3, method="spectral")
    assert (exact.kind, spectral.kind) == ("exact", "lower bound")
    for est in (exact, spectral):
        for res in (submod.maximize(f, 3, gamma_lower=est),
                    submod.maximize(f, 3, method="stochastic", seed=0, gamma_lower=est),
                    submod.maximize_distributed(f, 3, n_parts=2, seed=0, gamma_lower=est)):
            assert res.certificate.gamma_lower == est.value
            assert res.certificate.upper_bound >= opt * (1 - 1e-12)
    sampled = vf.submodularity_ratio(f, 3, method="sampled", seed=0)
    path = vf.submodularity_ratio(f, 3, method="greedy-path")
    for est in (sampled, path):
        assert est.kind == "upper bound"
        with pytest.raises(ValueError, match="gamma_lower is an upper bound .* proven LOWER bound"):
            submod.maximize(f, 3, gamma_lower=est)
        with pytest.raises(ValueError, match="gamma_lower is an upper bound"):
            submod.maximize_distributed(f, 3, n_parts=2, seed=0, gamma_lower=est)
    guess = vf.RatioEstimate(value=0.5, kind="estimate", method="fitted", k=3, U=None)
    with pytest.raises(ValueError, match="gamma_lower is an estimate"):
        submod.maximize(f, 3, gamma_lower=guess)
    with pytest.raises(ValueError, match=r"computed for \|S\| <= 2 .* k >= 3"):
        submod.maximize(f, 3, gamma_lower=vf.submodularity_ratio(f, 2, method="spectral"))
    with pytest.raises(ValueError, match="inside a given U"):
        submod.maximize(f, 3, gamma_lower=vf.submodularity_ratio(f, 3, U=[0, 1], method="exact"))


def test_feature_selector_takes_a_ratio_estimate():
    import verification as vf

    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 6))
    X[:, 2] += X[:, 3]
    y = X @ rng.standard_normal(6) + 0.1 * rng.standard_normal(40)

    def spectral(f, k):
        return vf.submodularity_ratio(f, k, method="spectral")

    def sampled(f, k):
        return vf.submodularity_ratio(f, k, method="sampled", seed=0)

    sel = submod.SparseRegressionSelector(3, gamma_lower=spectral).fit(X, y)
    Xc, yc = X - X.mean(0), y - y.mean()
    best = max(1 - np.linalg.lstsq(Xc[:, list(S)], yc, rcond=None)[1][0] / (yc @ yc)
               for S in itertools.combinations(range(6), 3))
    assert sel.certificate_ >= best * (1 - 1e-12)
    with pytest.raises(ValueError, match="gamma_lower is an upper bound"):
        submod.SparseRegressionSelector(3, gamma_lower=sampled).fit(X, y)


def test_certificate_evaluations_are_reported_apart_and_can_be_skipped():
    # Stochastic greedy samples ceil((n / k) ln(1 / eps)) candidates per step (Mirzasoleiman et al. 2015); the
    # certificate needs one more full pass of n gains at the final set, reported in certificate_evaluations.
    X = np.random.default_rng(0).standard_normal((300, 4))
    f = submod.FacilityLocation(X)
    n, k, eps = 300, 6, 0.5
    sampled = k * math.ceil(n / k * math.log(1 / eps))
    with_cert = submod.maximize(f, k, method="stochastic", seed=0, eps=eps)
    assert with_cert.certificate is not None
    assert with_cert.certificate_evaluations == n
    assert with_cert.n_evaluations - with_cert.certificate_evaluations == sampled
    bare = submod.maximize(f, k, method="stochastic", seed=0, eps=eps, certificate=False)
    assert bare.certificate is None and bare.certificate_evaluations == 0
    assert bare.n_evaluations == sampled
    np.testing.assert_array_equal(bare.selected, with_cert.selected)
    for method in ("greedy", "lazy"):
        a = submod.maximize(f, k, method=method)
        b = submod.maximize(f, k, method=method, certificate=False)
        assert a.certificate is not None and b.certificate is None
        assert a.certificate_evaluations == b.certificate_evaluations == 0
        assert a.n_evaluations == b.n_evaluations
        np.testing.assert_array_equal(a.selected, b.selected)
    with pytest.raises(ValueError, match="certificate must be True or False"):
        submod.maximize(f, k, certificate="no")


def test_distributed_reports_its_certificate_passes_and_one_part_honours_certificate_prefixes_zero():
    X = np.random.default_rng(1).standard_normal((120, 3))
    f = submod.FacilityLocation(X)
    res = submod.maximize_distributed(f, 5, n_parts=3, seed=0, certificate_prefixes=3)
    # prefixes of sizes 0, 2 or 3, and 5: three full passes of n = 120 gains
    assert len(res.distributed.certified_prefixes) == 3
    assert res.certificate_evaluations == 3 * 120
    bare = submod.maximize_distributed(f, 5, n_parts=3, seed=0, certificate_prefixes=0)
    assert bare.certificate is None and bare.certificate_evaluations == 0
    assert bare.n_evaluations == res.n_evaluations - res.certificate_evaluations
    one = submod.maximize_distributed(f, 5, n_parts=1, certificate_prefixes=0)
    assert one.certificate is None


def test_partition_matroid_accepts_groups_without_elements():
    # Labels taken from a subsample need not reach every group: 2 budgets, every label 0 (group 1 empty).
    w = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    c = submod.PartitionMatroid(np.zeros(6, int), [1, 2])
    assert c.budgets.tolist() == [1, 2]
    res = submod.maximize(submod.Modular(w), 3, constraint=c)
    assert res.selected.tolist() == [5]  # the only feasible picks: one element of group 0; the best is 9
    # an empty group in the middle: the oracle is brute force over the sets the budgets allow
    groups = np.array([0, 0, 2, 2, 2, 0])
    c = submod.PartitionMatroid(groups, [1, 3, 2])
    f = submod.Modular(w)
    feasible = [S for r in range(4) for S in itertools.combinations(range(6), r)
                if all(np.sum(groups[list(S)] == g) <= b for g, b in enumerate([1, 3, 2]))]
    opt = max(f.value(list(S)) for S in feasible)
    res = submod.maximize(f, 3, constraint=c)
    assert res.value == pytest.approx(opt)  # modular: greedy is optimal on a matroid
    with pytest.raises(ValueError, match="labels reach 3; pass budgets with one per group"):
        submod.PartitionMatroid([0, 3], [1, 1])
    with pytest.raises(ValueError, match="1-D array of integers"):
        submod.PartitionMatroid([0, 1], [[1, 1]])


def _user_modular(weights, gains_of):
    """A user-written modular function whose GainState.gains is ``gains_of(state, candidates)``."""
    w = np.asarray(weights, dtype=np.float64)

    class State(submod.GainState):
        def gains(self, candidates=None):
            return gains_of(self, candidates, w)

        def _add(self, j):
            self.value += w[j]

    class Mod(submod.SetFunction):
        submodular = True

        def init_state(self):
            return State(self.n)

    return Mod(w.size)


@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
@pytest.mark.parametrize("bad", ["ignores candidates", "column vector", "scalar"])
def test_user_gain_state_of_the_wrong_shape_is_refused(bad, method):
    """GainState.gains must return one gain per candidate; a state that returns every element's gain whatever the
    candidates (or a column, or a scalar) is refused with the contract, never used misaligned: stochastic greedy
    used to pair the first sampled candidates with the gains of elements 0, 1, 2... and return a worse set
    silently."""
    weights = [1.0, 5.0, 2.0, 4.0, 3.0, 0.5]

    def gains_of(state, cand, w):
        g = np.where(state._in_set, 0.0, w)
        if bad == "ignores candidates":
            return g
        g = g[state._all(cand)]
        return g[:, None] if bad == "column vector" else float(g[0])

    f = _user_modular(weights, gains_of)
    if bad == "ignores candidates" and method == "greedy":  # exact greedy always asks for every element
        assert sorted(submod.maximize(f, 3, method=method).selected.tolist()) == [1, 3, 4]
        return
    with pytest.raises(ValueError, match=r"GainState\.gains returned shape .* one per candidate"):
        submod.maximize(f, 3, method=method, seed=0)


@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_user_gain_state_may_return_a_list(method):
    """Any sequence of numbers of the right length is a valid answer (the brute-force optimum of a modular
    function: its 3 largest weights)."""
    weights = [1.0, 5.0, 2.0, 4.0, 3.0, 0.5]
    f = _user_modular(weights, lambda state, cand, w: np.where(state._in_set, 0.0, w)[state._all(cand)].tolist())
    best = max(itertools.combinations(range(6), 3), key=lambda S: sum(weights[j] for j in S))
    res = submod.maximize(f, 3, method=method, seed=0)
    assert sorted(res.selected.tolist()) == sorted(best)


@pytest.mark.parametrize("seed", [-1, 1.5, "abc"])
def test_a_bad_seed_is_named_with_what_to_pass(seed):
    """numpy's own messages ('expected non-negative integer', 'SeedSequence expects int...') named neither the
    argument nor what it accepts, and 1.5 or 'abc' raised a TypeError."""
    import verification as vf

    f = submod.Modular(np.arange(1.0, 11.0))
    match = r"seed must be None, a non-negative integer or a numpy Generator"
    with pytest.raises(ValueError, match=match):
        submod.maximize(f, 3, method="stochastic", seed=seed)
    with pytest.raises(ValueError, match=match):
        submod.maximize_distributed(f, 3, n_parts=2, seed=seed)
    with pytest.raises(ValueError, match=match):
        vf.submodularity_ratio(f, 2, method="sampled", seed=seed)
    with pytest.raises(ValueError, match=match):
        submod.SparseRegressionSelector(2, method="stochastic", seed=seed).fit(np.eye(4), np.arange(4.0))


def test_a_user_class_that_skips_super_init_is_told_to_call_it():
    """A SetFunction or GainState subclass whose ``__init__`` does not call ``super().__init__(n)`` (or an
    ``init_state`` that returns something else) used to fail with AttributeError: 'NoSuper' object has no
    attribute 'n' / '_in_set', or "'NoneType' object has no attribute 'gains'"."""

    class NoSuper(submod.SetFunction):
        def __init__(self, w):
            self.w = np.asarray(w)

        def init_state(self):
            return None

    class State(submod.GainState):
        def __init__(self, w):
            self.w = w

        def gains(self, candidates=None):
            return self.w[self._all(candidates)]

        def _add(self, j):
            self.value += self.w[j]

    class StateNoSuper(submod.SetFunction):
        def init_state(self):
            return State(np.ones(self.n))

    class ReturnsNone(submod.SetFunction):
        def init_state(self):
            return None

    for method in submod.METHODS:
        with pytest.raises(ValueError, match=r"NoSuper has no ground-set size n: .* super\(\).__init__\(n\)"):
            submod.maximize(NoSuper([1.0, 2.0]), 1, method=method)
        with pytest.raises(ValueError, match=r"State .* not initialised .* super\(\).__init__\(n\)"):
            submod.maximize(StateNoSuper(3), 1, method=method)
        with pytest.raises(ValueError, match=r"init_state\(\) must return a submod.GainState; got NoneType"):
            submod.maximize(ReturnsNone(3), 1, method=method)


@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_a_weighted_sum_checks_each_terms_gains(method):
    """A user term whose gains come back as one number broadcast into every candidate of a WeightedSum, so the
    sum's shape looked right and the term's gains were silently replaced by the first candidate's."""
    weights = [1.0, 5.0, 2.0, 4.0, 3.0, 0.5]
    bad = _user_modular(weights, lambda state, cand, w: float(np.where(state._in_set, 0.0, w)[state._all(cand)][0]))
    f = submod.Modular([0.1] * 6) + bad
    with pytest.raises(ValueError, match=r"GainState\.gains returned shape \(\)"):
        submod.maximize(f, 3, method=method, seed=0)


def test_threads_calling_parallel_map_at_once_share_one_pool(monkeypatch):
    # several user threads reaching the shared pool's creation together must create one pool, not one each (the
    # others would be dropped with their idle threads); a slow constructor widens the window of the race
    import threading
    import time

    from submod import _parallel

    made = []

    class SlowPool(_parallel.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            made.append(self)
            time.sleep(0.05)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_parallel, "ThreadPoolExecutor", SlowPool)
    monkeypatch.setattr(_parallel, "_POOL", None)
    monkeypatch.setattr(_parallel, "_WORKERS", 2)
    start = threading.Barrier(6)
    out = [None] * 6

    def call(i):
        start.wait()
        out[i] = _parallel.parallel_map(lambda v: v * i, [1, 2])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(made) == 1
        assert out == [[i, 2 * i] for i in range(6)]
    finally:
        for pool in made:
            pool.shutdown()


def test_a_budget_of_zero_gets_an_exact_certificate_for_every_objective_method_and_constraint():
    """k = 0 admits only the empty set, so OPT_0 = F(empty) = 0 is known exactly, whatever F is. maximize gave a
    certificate (labelled an online bound) for submodular F only, and None for SparseRegression (weakly submodular)
    or any function without a proven gamma. The oracle is the definition: the empty set is the only feasible set."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 6))
    objectives = [
        submod.FacilityLocation(rng.standard_normal((6, 3))),                 # submodular
        submod.SparseRegression(A, A @ rng.standard_normal(6)),               # weakly submodular
        submod.from_callable(lambda S: float(len(S) % 2), n=6),               # neither monotone nor submodular
    ]
    constraints = [None, submod.PartitionMatroid([0, 0, 1, 1, 2, 2], 1), submod.Knapsack(np.ones(6), 2.0)]
    for f in objectives:
        opt0 = brute_opt(f, 0)   # the best of the sets of size <= 0: the empty set alone
        for method, constraint, lazy_fallback in itertools.product(submod.METHODS, constraints, (True, False)):
            if method == "stochastic" and isinstance(constraint, submod.Knapsack):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error")   # nothing is evaluated: no stale bound, no negative gain to warn of
                res = submod.maximize(f, 0, method=method, constraint=constraint, seed=0,
                                      lazy_fallback=lazy_fallback)
            cert = res.certificate
            assert res.selected.size == 0 and res.value == opt0 == 0.0
            assert cert is not None, (type(f).__name__, method, constraint)
            assert cert.upper_bound == opt0 and cert.value == opt0 and cert.ratio == 1.0
            assert cert.kind.startswith("exact") and cert.prefix_size == 0
            assert res.n_evaluations == 0
            assert submod.maximize(f, 0, method=method, constraint=constraint, seed=0,
                                   certificate=False).certificate is None
        dist = submod.maximize_distributed(f, 0, n_parts=2, seed=0)
        assert dist.certificate.upper_bound == opt0 and dist.certificate.kind.startswith("exact")
        assert submod.maximize_distributed(f, 0, n_parts=2, seed=0, certificate_prefixes=0).certificate is None


def test_online_bound_takes_a_ratio_estimate_and_refuses_what_is_not_a_proven_lower_bound():
    """online_bound took a number only: a verification.RatioEstimate raised a TypeError (comparing an object with
    floats) instead of being read by its kind. Now an exact value or a proven lower bound is used, and gives a bound
    at least the brute-force OPT_3 at every prefix of greedy's run on the instance where gamma = 1 falls below it;
    an upper bound or an estimate is refused with the reason and what to pass instead."""
    import verification as vf

    f = submod.SparseRegression(GAMMA_ONE_A, GAMMA_ONE_Y)
    k = 3
    opt = brute_opt(f, k)
    sel = submod.maximize(f, k).selected
    exact = vf.submodularity_ratio(f, k, method="exact")
    spectral = vf.submodularity_ratio(f, k, method="spectral")
    assert (exact.kind, spectral.kind) == ("exact", "lower bound")
    for est in (exact, spectral):
        for t in range(sel.size + 1):
            A_t = sel[:t].tolist()
            bound = submod.online_bound(f.gains(A_t), f.value(A_t), k, gamma_lower=est)
            assert bound >= opt * (1 - 1e-12)
            assert bound == submod.online_bound(f.gains(A_t), f.value(A_t), k, gamma_lower=float(est.value))
    refused = [vf.submodularity_ratio(f, k, method="sampled", seed=0),
               vf.submodularity_ratio(f, k, method="greedy-path"),
               vf.RatioEstimate(value=0.5, kind="estimate", method="fitted", k=k, U=None)]
    assert [r.kind for r in refused] == ["upper bound", "upper bound", "estimate"]
    for est in refused:
        with pytest.raises(ValueError, match=rf"gamma_lower is an {est.kind} .* needs a proven LOWER bound .* may "
                                             r"exceed the true ratio.* Pass a proven lower bound: verification\."
                                             r"submodularity_ratio\(f, k, method='spectral'\)"):
            submod.online_bound(f.gains([]), 0.0, k, gamma_lower=est)
    with pytest.raises(ValueError, match=r"computed for \|S\| <= 2 .* k >= 3"):
        submod.online_bound(f.gains([]), 0.0, k, gamma_lower=vf.submodularity_ratio(f, 2, method="spectral"))
    with pytest.raises(ValueError, match="inside a given U, and online_bound cannot check that A lies in U"):
        submod.online_bound(f.gains([]), 0.0, k, gamma_lower=vf.submodularity_ratio(f, k, U=[0, 1], method="exact"))
    with pytest.raises(ValueError, match="gamma_lower must be a number in \\(0, 1\\] or a ratio estimate"):
        submod.online_bound(f.gains([]), 0.0, k, gamma_lower="0.5")


@settings(max_examples=40, deadline=None)
@given(gains=st.lists(st.floats(-10, 10), max_size=8), value=st.floats(0, 100), k=st.integers(0, 10))
def test_online_bound_takes_an_integral_k_and_refuses_a_float_or_bool_one(gains, value, k):
    """online_bound let a float k reach np.partition ('Partition index must be integer', a TypeError about the
    internals) and read True as k = 1. An int (Python or numpy) gives the closed form F(A) + the sum of the k
    largest non-negative gains; a float, even a whole one, a bool or a string is refused naming k, as check_k does
    for maximize."""
    top = sum(sorted((max(g, 0.0) for g in gains), reverse=True)[:k])
    for kk in (k, np.int64(k)):
        assert submod.online_bound(gains, value, kk) == pytest.approx(value + top, rel=1e-12, abs=1e-12)
    for bad in (float(k), k + 0.5, np.float64(k), bool(k % 2), np.bool_(k % 2), str(k)):
        with pytest.raises(ValueError, match="k must be a non-negative integer"):
            submod.online_bound(gains, value, bad)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_partition_matroid_with_named_groups_is_solved_exactly_for_a_modular_function(data):
    """Group labels could only be non-negative integers; layer names had to be renumbered by hand. Now any hashable
    label works, with one int or a dict {label: budget}. Greedy is optimal for a modular F on a matroid, so its
    value must equal the brute-force optimum over every subset the budgets allow, its set must be feasible, and it
    must pick exactly what greedy picks under the same groups renumbered as integers."""
    n = data.draw(st.integers(1, 7))
    names = ["conv1", "conv2", ("block", 3), "fc"]
    groups = data.draw(st.lists(st.sampled_from(names), min_size=n, max_size=n))
    present = list(dict.fromkeys(groups))
    if data.draw(st.booleans()):
        budgets = {g: data.draw(st.integers(0, 2)) for g in present}
        budget_of = budgets.__getitem__
    else:
        budgets = data.draw(st.integers(0, 2))
        budget_of = lambda g: budgets  # noqa: E731
    w = np.array(data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n)))
    k = data.draw(st.integers(1, n))
    f = submod.Modular(w)

    def feasible(S):
        return all(sum(groups[j] == g for j in S) <= budget_of(g) for g in present)

    opt = brute_opt(f, k, feasible)
    c = submod.PartitionMatroid(groups, budgets)
    as_ints = np.array([present.index(g) for g in groups])
    int_budgets = [budget_of(g) for g in present]
    for method in ("greedy", "lazy"):
        res = submod.maximize(f, k, method=method, constraint=c)
        assert feasible(res.selected.tolist()) and res.selected.size <= k
        assert res.value == pytest.approx(opt, rel=1e-12)
        assert res.certificate.upper_bound >= opt * (1 - 1e-12)
        renumbered = submod.maximize(f, k, method=method, constraint=submod.PartitionMatroid(as_ints, int_budgets))
        assert res.selected.tolist() == renumbered.selected.tolist()
    res = submod.maximize(f, k, method="stochastic", constraint=c, seed=0)
    assert feasible(res.selected.tolist()) and res.selected.size <= k


def test_partition_matroid_named_groups_attributes_and_errors():
    groups = ["fc1", "fc2", "fc1", "fc2"]
    budgets = {"fc2": 1, "fc1": 2}
    c = submod.PartitionMatroid(groups, budgets)
    assert c.groups.tolist() == groups and c.groups.dtype == object
    assert dict(c.budgets) == {"fc1": 2, "fc2": 1}
    with pytest.raises(ValueError, match="read-only"):
        c.groups[0] = "fc2"
    with pytest.raises(TypeError):
        c.budgets["fc1"] = 5
    budgets["fc1"] = 0          # the caller's dict is neither modified nor kept
    groups[0] = "fc2"
    assert dict(c.budgets) == {"fc1": 2, "fc2": 1} and c.groups[0] == "fc1"
    assert dict(submod.PartitionMatroid(["a", "b", "a"], 1).budgets) == {"a": 1, "b": 1}
    # a dict for integer labels: the same constraint as the array, labels in the mapping
    d = submod.PartitionMatroid([0, 5, 5], {5: 2, 0: 1})
    assert dict(d.budgets) == {0: 1, 5: 2} and d.groups.dtype == np.int64
    f = submod.Modular([1.0, 2.0, 3.0])
    assert submod.maximize(f, 3, constraint=d).selected.tolist() == [2, 1, 0]
    tuples = submod.PartitionMatroid([("a", 1), ("a", 1), ("b", 2)], {("a", 1): 1, ("b", 2): 1})
    assert tuples.groups.shape == (3,)
    assert sorted(submod.maximize(f, 3, constraint=tuples).selected.tolist()) == [1, 2]
    for bad_budgets, match in [
            ({"fc1": 1}, "no budget for label\\(s\\) 'fc2'"),
            ({"fc1": 1, "fc2": 1, "fc3": 1}, "unknown label\\(s\\) 'fc3', which no element has \\(a typo\\?\\)"),
            ({"fc1": 1, "fc_2": 1}, "no budget for label\\(s\\) 'fc2'; unknown label\\(s\\) 'fc_2'"),
            ([1, 1], "budgets must be one int or a dict \\{label: budget\\}; an array of budgets indexes integer"),
            ({"fc1": 1, "fc2": -1}, "budgets\\['fc2'\\] must be a non-negative integer"),
            ({"fc1": 1, "fc2": 1.5}, "budgets\\['fc2'\\] must be a non-negative integer"),
            (-1, "budgets must be non-negative")]:
        with pytest.raises(ValueError, match=match):
            submod.PartitionMatroid(["fc1", "fc2"], bad_budgets)
    with pytest.raises(ValueError, match="is not hashable"):
        submod.PartitionMatroid(["fc1", ["fc2"]], 1)
    with pytest.raises(ValueError, match="not equal to itself"):
        submod.PartitionMatroid([float("nan"), 1.0], 1)
    with pytest.raises(ValueError, match="unknown label"):
        submod.PartitionMatroid([0, 1], {0: 1, 1: 1, 2: 1})
    with pytest.raises(ValueError, match="integer group labels must be non-negative"):
        submod.PartitionMatroid([-1, 0], 1)
