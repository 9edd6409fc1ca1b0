"""Guarantees against brute force and sound certificates (docs/theory.rst, "Certificates" and "Guarantees")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import submod
from submod.optimize import NonMonotoneWarning
from submod.sparse_regression import SparseRegression
from verification import certify, check_guarantee, submodularity_ratio
from verification import strategies as vst
from verification.guarantee import bian_bound


def brute_opt(f: submod.SetFunction, k: int) -> float:
    return max(f.value(list(T)) for T in itertools.combinations(range(f.n), k))


@settings(max_examples=30, deadline=None)
@given(f=st.one_of(vst.set_functions(n=st.integers(2, 8)),
                   vst.sparse_regression(vst.regression_data(n_units=st.integers(2, 8), suppressor=st.just(True)))),
       k=st.integers(1, 4))
def test_greedy_meets_das_kempe_and_bian_bounds(f, k):
    k = min(k, f.n)
    chk = check_guarantee(f, k, n_seeds=3)
    opt = brute_opt(f, k)
    assert chk.opt == pytest.approx(opt, rel=1e-9, abs=1e-9)
    gamma = submodularity_ratio(f, k, U=chk.row("greedy").selected, method="exact").value
    assert chk.gamma == pytest.approx(min(gamma, 1.0), abs=1e-9)
    greedy = chk.row("greedy")
    slack = 1e-9 * max(1.0, abs(opt))
    assert greedy.value >= (1 - math.exp(-chk.gamma)) * opt - slack
    assert greedy.value >= bian_bound(chk.gamma, chk.alpha) * opt - slack
    assert 0.0 <= chk.alpha <= 1.0
    # every subset of the greedy prefix of size k - 1 is reachable by stochastic greedy
    prefix = list(chk.row("greedy").selected[: k - 1])
    assert chk.gamma_reachable <= submodularity_ratio(f, k, U=prefix, method="exact").value + 1e-9
    assert chk.all_hold
    for row in chk.rows:
        assert row.value <= opt + slack


def test_bian_bound_is_between_das_kempe_and_gamma():
    for gamma in (0.1, 0.5, 1.0):
        for alpha in (0.0, 0.3, 1.0):
            b = bian_bound(gamma, alpha)
            assert 1 - math.exp(-gamma) - 1e-12 <= b <= gamma + 1e-12
    assert bian_bound(0.7, 1.0) == pytest.approx(1 - math.exp(-0.7))


@pytest.mark.parametrize("alpha", [3e-16, 4.4e-16, 1e-15, 1e-13, 1e-10])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_bian_bound_for_a_curvature_at_rounding_level_is_gamma(gamma, alpha):
    """A curvature measured as rounding noise (4.4e-16 came out of a modular-like instance) must give the limit
    gamma of (1 - exp(-alpha gamma)) / alpha, up to its next term alpha gamma^2 / 2: 1 - exp(x) loses every digit
    for |x| near eps (factors of 0.37 to 1.0 for gamma = 0.5), which could report a guarantee failure that is not
    one (and make ``submod verify`` exit 3)."""
    assert bian_bound(gamma, alpha) == pytest.approx(gamma * (1 - alpha * gamma / 2), rel=1e-12)
    assert 1 - math.exp(-gamma) - 1e-12 <= bian_bound(gamma, alpha) <= gamma


def test_modular_function_has_zero_curvature_and_greedy_is_optimal():
    f = submod.Modular([5.0, 1.0, 3.0, 2.0])
    chk = check_guarantee(f, 2, methods=("greedy",))
    assert chk.alpha == 0.0 and chk.gamma == 1.0
    assert chk.row("greedy").value == chk.opt == 8.0
    assert chk.row("greedy").bian_factor == 1.0
    # one method may be named by a plain string (not iterated letter by letter)
    assert [r.method for r in check_guarantee(f, 2, methods="greedy").rows] == ["greedy"]


@settings(max_examples=20, deadline=None)
@given(data=vst.regression_data(n_units=st.integers(2, 7), group_size=st.sampled_from([1, 2])),
       k=st.integers(1, 3), method=st.sampled_from(["greedy", "lazy", "stochastic"]))
def test_certificates_with_proven_gamma_are_above_brute_force_opt(data, k, method):
    f = SparseRegression(data.A, data.Y, groups=data.groups)
    k = min(k, f.n)
    res = submod.maximize(f, k, method=method, seed=0)
    opt = brute_opt(f, k)
    slack = 1e-9 * max(1.0, opt)
    U = res.selected
    for how in ("exact", "spectral"):
        g = submodularity_ratio(f, k, U=U, method=how)
        # k given: a run that stops early (no positive gain, e.g. targets orthogonal to every unit) holds fewer
        # than k picks, possibly none, and certify would infer the budget from them
        if g.value <= 0:
            with pytest.raises(ValueError, match="no certificate"):
                certify(f, res, g, k=k)
            continue
        cert = certify(f, res, g, k=k)
        assert cert.upper_bound >= opt - slack
        assert cert.value <= cert.upper_bound + slack
        assert cert.upper_bound <= cert.full_set_value + slack


@settings(max_examples=20, deadline=None)
@given(f=vst.set_functions(n=st.integers(2, 8)).filter(lambda f: f.submodular), k=st.integers(1, 4))
def test_submodular_certificate_is_above_opt(f, k):
    k = min(k, f.n)
    # k given: a run that stops early (no positive gain) holds fewer than k picks, possibly none
    cert = certify(f, submod.maximize(f, k, method="lazy"), k=k)
    assert cert.gamma_lower == 1.0
    assert cert.upper_bound >= brute_opt(f, k) - 1e-9 * max(1.0, cert.upper_bound)


def test_certify_refuses_unsound_gamma():
    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)
    res = submod.maximize(f, 2)
    with pytest.raises(ValueError, match="not declared submodular"):
        certify(f, res)
    with pytest.raises(ValueError, match="invalid for non-submodular"):
        certify(f, res, 1.0)
    sampled = submodularity_ratio(f, 2, U=res.selected, method="sampled", n_samples=20, seed=0)
    with pytest.raises(ValueError, match="upper bound"):
        certify(f, res, sampled)
    with pytest.raises(ValueError, match="k >= 4"):
        certify(f, res, submodularity_ratio(f, 2, U=res.selected, method="spectral"), k=4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        certify(f, res, 1.5)
    with pytest.raises(ValueError, match="RatioEstimate or a number"):
        certify(f, res, "0.5")
    # The gamma = 1 bound really is below OPT here, which is why it is refused.
    from verification.certify import prefix_bounds

    b1, _ = prefix_bounds(f, res.selected, 2, 1.0)
    assert b1.min() < brute_opt(f, 2) * 0.9


def test_certify_uses_only_prefixes_inside_U():
    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)
    res = submod.maximize(f, 3)
    g = submodularity_ratio(f, 3, U=res.selected[:1], method="spectral")  # covers prefixes of size 0 and 1
    cert = certify(f, res, g, use_full_set=False)
    assert cert.prefix_bounds.size == 2
    assert cert.upper_bound >= brute_opt(f, 3) - 1e-9


def test_check_guarantee_refuses_large_or_bad_input():
    with pytest.raises(ValueError, match="exceeds the limit"):
        check_guarantee(submod.Modular(np.ones(15)), 2)
    with pytest.raises(ValueError, match="unknown method"):
        check_guarantee(submod.Modular(np.ones(5)), 2, methods=("greedy", "best"))
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        check_guarantee(submod.Modular(np.ones(5)), 9)


def test_plain_lazy_is_not_claimed_as_a_theorem_on_non_submodular_functions():
    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)
    chk = check_guarantee(f, 2, methods=("greedy", "lazy"), lazy_fallback=False)
    lazy = chk.row("lazy")
    assert not lazy.theorem and lazy.violations >= 1
    assert chk.gamma < 1.0


def test_check_guarantee_refuses_a_function_that_is_not_monotone_anywhere_in_its_table():
    # F({0, 2, 3}) = 1.1 < F({2, 3}) = 2, away from the greedy sets: reported as a failed theorem before.
    def value(S):
        S = set(S)
        if S >= {2, 3}:
            return 1.1 if 0 in S else 2.0
        return float(len(S)) * 0.5

    f = submod.from_callable(value, 4)
    with pytest.raises(ValueError, match=r"F is not monotone: adding 0 to \[2, 3\]"):
        check_guarantee(f, 2)


def test_verification_arguments_are_checked_up_front(tmp_path):
    from verification import error_decay, report

    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 5))
    f = SparseRegression(A, A @ rng.standard_normal(5))
    for call, match in ((lambda: check_guarantee(f, 2, rtol=-1), "rtol must be"),
                        (lambda: error_decay(f, rtol="x"), "rtol must be"),
                        (lambda: submodularity_ratio(f, 2, method="greedy-path", result=[0, 1]), "SelectionResult"),
                        (lambda: submodularity_ratio(f, 2, method="spectral", max_subsets=-5), "max_subsets"),
                        (lambda: report(f, 2, tmp_path / "r1", n_samples=0, figures=False), "n_samples"),
                        (lambda: report(f, 2, tmp_path / "r2", k_max=99, figures=False), "k_max")):
        with pytest.raises(ValueError, match=match):
            call()
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # nothing left behind


def ratio_by_definition(f: submod.SetFunction, Ls: list[tuple[int, ...]], k: int) -> float:
    """min over L in Ls and non-empty S disjoint from L, |S| <= k, of sum_j F(j|L) / F(S|L) (0/0 := 1)."""
    best = 1.0
    for L in Ls:
        fl = f.value(list(L))
        rest = [j for j in range(f.n) if j not in L]
        for s in range(1, k + 1):
            for S in itertools.combinations(rest, s):
                den = f.value(list(L) + list(S)) - fl
                if den > 1e-12:
                    best = min(best, sum(f.value(list(L) + [j]) - fl for j in S) / den)
    return best


def test_stochastic_row_uses_the_ratio_over_every_reachable_set():
    """Stochastic greedy's bound is 1 - exp(-(1 - eps) gamma') with gamma' the ratio over every L with |L| <= k - 1
    (any set it may reach), not greedy's gamma over the subsets of its own set; both by brute force here."""
    data = vst.suppressor_data(n_noise=2)
    f = SparseRegression(data.A, data.Y)
    k, eps = 2, submod.DEFAULT_EPS
    chk = check_guarantee(f, k, methods=("greedy", "stochastic"), n_seeds=2)
    greedy_set = chk.row("greedy").selected
    gamma = ratio_by_definition(f, [L for r in range(k + 1) for L in itertools.combinations(greedy_set, r)], k)
    reach = ratio_by_definition(f, [L for r in range(k) for L in itertools.combinations(range(f.n), r)], k)
    assert abs(gamma - reach) > 0.01                       # the two ratios differ on this instance
    assert chk.gamma == pytest.approx(gamma, rel=1e-6)
    assert chk.gamma_reachable == pytest.approx(reach, rel=1e-6)
    assert chk.row("stochastic").factor == pytest.approx(1.0 - math.exp(-(1.0 - eps) * reach), rel=1e-6)


def _capped_count(full_value: float) -> submod.SetFunction:
    """F(S) = min(|S|, 2) on 3 elements (submodular), except F(V) = ``full_value``: F(V) evaluated a little low
    stands for F(V) summed in another order than F(S) when S already explains everything."""
    return submod.from_callable(lambda S: full_value if len(S) == 3 else float(min(len(S), 2)), n=3,
                                submodular=True)


def test_certificate_below_the_value_by_rounding_is_lifted_to_the_value():
    """OPT_k >= F(S) for the certified S (|S| <= k), so a bound under F(S) by rounding alone is lifted to F(S);
    the hypothesis example of docs/tutorial_verify.rst once failed `upper_bound >= f.value(selected)` this way
    (F(V) 1 ulp below F(S), on data the selection explains exactly)."""
    f = _capped_count(2.0 * (1.0 - 4e-16))
    res = submod.maximize(f, 2)
    cert = certify(f, res, use_full_set=True)
    assert res.value == 2.0 and cert.prefix_size == -1  # the F(V) bound is the smallest
    assert cert.upper_bound == 2.0 and cert.upper_bound >= cert.value


def test_certificate_far_below_the_value_is_not_hidden():
    """A shortfall beyond rounding means F breaks the assumptions (here F(V) < F(S): not monotone); the bound is
    reported as computed, so the contradiction shows (ratio value / bound > 1 is capped at 1 in .ratio only)."""
    f = _capped_count(1.5)
    with pytest.warns(NonMonotoneWarning):  # greedy sees the negative gain too
        res = submod.maximize(f, 2)
    cert = certify(f, res, use_full_set=True)
    assert cert.upper_bound == 1.5 < cert.value == 2.0


def test_underdetermined_least_squares_is_never_refused_as_non_monotone():
    # Least squares is monotone; with fewer samples than units F reaches the rank and later "drops" are rounding
    # (about 1e-12 ||Y||^2). The finding's sizes (6 samples, 10 units) aborted in 32 of 40 random instances.
    rng = np.random.default_rng(0)
    for _ in range(40):
        f = SparseRegression(rng.standard_normal((6, 10)), rng.standard_normal((6, 2)))
        chk = check_guarantee(f, 3, n_seeds=1, methods=("greedy",))
        assert chk.all_hold
        gamma = submodularity_ratio(f, 2, U=np.arange(7), method="exact")
        assert 0.0 <= gamma.value <= 1.0


def test_a_planted_small_decrease_is_still_refused():
    # F(S) = |S|, less 1.004 on the sets containing 0, 1 and 2: adding 2 to a set containing 0 and 1 lowers F by
    # 4e-3 (1e-3 of max F = 4), far beyond rounding, so both checks must still refuse it.
    def value(S):
        S = set(S.tolist())
        v = float(len(S))
        if {0, 1} <= S and 2 in S:
            v -= 1.0 + 1e-3 * 4  # F({0, 1, 2} u T) = F({0, 1} u T) - 4e-3
        return v

    f = submod.from_callable(value, 4)
    assert f.value([0, 1, 2]) < f.value([0, 1])
    with pytest.raises(ValueError, match="F is not monotone"):
        check_guarantee(f, 2)
    with pytest.raises(ValueError, match="not monotone"):
        submodularity_ratio(f, 3, method="exact")


def test_certify_refuses_a_knapsack_run_whose_optimum_its_bound_misses():
    """Cost-benefit greedy picks item 0 (cost 0.9) and nothing else fits; the knapsack optimum (brute force) takes
    the three cheap items, 9.9. certify used to bound OPT_1 = 9.5 instead and claim the run reached 100% of the
    optimum; it now refuses the constrained run, whose own certificate bounds the knapsack optimum."""
    f = submod.Modular([9.5, 3.3, 3.3, 3.3])
    kn = submod.Knapsack([0.9, 0.33, 0.33, 0.33], budget=1.0)
    res = submod.maximize(f, None, constraint=kn)
    opt = max(f.value(list(S)) for m in range(5) for S in itertools.combinations(range(4), m)
              if kn.costs[list(S)].sum() <= kn.budget)
    assert opt > res.value
    assert res.certificate.upper_bound >= opt
    with pytest.raises(ValueError, match="Knapsack constraint"):
        certify(f, res)
    pm = submod.PartitionMatroid([0, 0, 1, 1], budgets=1)
    with pytest.raises(ValueError, match="PartitionMatroid constraint"):
        certify(f, submod.maximize(f, 2, constraint=pm))
    assert certify(f, submod.maximize(f, 2)).upper_bound >= 9.5 + 3.3  # OPT_2 of the cardinality problem


def test_certify_refuses_a_function_declared_not_monotone():
    """The cut of one edge is submodular but not monotone. Its optimum (brute force) is 1, yet the online bound at
    the full set and F(V) are both 0: certify used to return 'OPT_2 <= 0', a proven upper bound below the optimum,
    because both bounds need F(OPT) <= F(OPT u A). A function declared monotone=False is now refused."""
    cut = {(): 0.0, (0,): 1.0, (1,): 1.0, (0, 1): 0.0}
    f = submod.from_callable(lambda S: cut[tuple(sorted(S.tolist()))], n=2, submodular=True, monotone=False)
    opt = max(cut.values())
    from verification.certify import prefix_bounds

    b, _ = prefix_bounds(f, np.array([0, 1]), 2, 1.0)
    assert b.min() < opt and f.value([0, 1]) < opt  # the unsound numbers the refusal keeps out
    for selected in ([0, 1], [0]):
        with pytest.raises(ValueError, match="monotone=False"):
            certify(f, selected, k=2)
    with pytest.raises(ValueError, match="monotone=False"):
        certify(f, [0], 0.5, k=2)


def test_guarantee_rows_hold_python_bools_and_the_check_serialises_to_json():
    """holds / holds_bian are documented as bool; on least squares they were numpy.bool_ (the tolerance is a numpy
    float), so json.dumps(dataclasses.asdict(check)) failed and `row.holds is True` was False."""
    import dataclasses
    import json

    data = vst.suppressor_data()
    chk = check_guarantee(SparseRegression(data.A, data.Y), 2, n_seeds=2)
    for r in chk.rows:
        assert type(r.holds) is bool and type(r.theorem) is bool
        assert r.holds_bian is None or type(r.holds_bian) is bool
    assert json.loads(json.dumps(dataclasses.asdict(chk)))["rows"][0]["holds"] is True


def test_no_methods_is_refused_rather_than_holding_vacuously():
    f = submod.FacilityLocation(np.random.default_rng(0).random((6, 2)))
    with pytest.raises(ValueError, match="methods is empty"):
        check_guarantee(f, 2, methods=())
    assert check_guarantee(f, 2, methods=["greedy"]).all_hold  # a list works as the tuple does


@settings(max_examples=20, deadline=None)
@given(f=st.one_of(vst.set_functions(n=st.integers(1, 6)),
                   vst.sparse_regression(vst.regression_data(n_units=st.integers(1, 6)))),
       picks=st.integers(0, 6))
def test_an_explicit_budget_of_zero_is_certified_exactly_as_maximize_does(f, picks):
    """k = 0 admits only the empty set, so OPT_0 = F(empty) (brute force over the sets of size <= 0). certify
    refused k = 0 while maximize(f, 0) returns that exact certificate; now certify gives it too, with kind 'exact',
    for any run and any function, least squares included without a gamma (none is used)."""
    selected = list(range(min(picks, f.n)))
    for run in (selected, submod.maximize(f, 0)):
        cert = certify(f, run, k=0)
        assert cert.upper_bound == brute_opt(f, 0) == f.value([])
        assert cert.kind.startswith("exact") and cert.k == 0 and cert.prefix_size == 0
        assert cert.value == f.value(run if isinstance(run, list) else run.selected)
        assert cert.cost["gain_evaluations"] == 0


def test_a_budget_of_zero_is_exact_when_given_and_refused_when_inferred_from_an_empty_run():
    """An explicit k = 0 is answered exactly (OPT_0 = F(empty), brute force), even for a function declared not
    monotone (no monotonicity is used, as in maximize); a gamma_lower passed anyway is still checked. An empty run
    without k is still refused: its budget may have been larger (greedy stops early)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 4))
    g = SparseRegression(A, A[:, 0] + A[:, 1])
    cut = submod.from_callable(lambda S: float(len(set(S) & {0, 1}) == 1), n=2, monotone=False)
    for fn in (submod.Modular([1.0, 2.0, 3.0]), g, cut):
        assert certify(fn, [], k=0).upper_bound == brute_opt(fn, 0) == 0.0
    assert certify(g, [], 0.5, k=0).kind.startswith("exact")
    with pytest.raises(ValueError, match="not declared submodular"):
        certify(g, [], 1.0, k=0)
    with pytest.raises(ValueError, match="upper bound"):
        certify(g, [], submodularity_ratio(g, 2, method="sampled", seed=0), k=0)
    f = submod.Modular([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="the run selected nothing.*pass k="):
        certify(f, submod.maximize(f, 0))
    with pytest.raises(ValueError, match="the run selected nothing"):
        certify(f, [])
    with pytest.raises(ValueError, match="monotone=False"):
        certify(cut, [0], k=1)                                      # only k = 0 skips the monotonicity check
    assert certify(f, [], k=2).upper_bound == pytest.approx(5.0)   # an empty run with a budget is still certified


@settings(max_examples=15, deadline=None)
@given(f=st.one_of(vst.set_functions(n=st.integers(1, 6)),
                   vst.sparse_regression(vst.regression_data(n_units=st.integers(1, 6), suppressor=st.just(True)))))
def test_check_guarantee_at_a_budget_of_zero_matches_brute_force(f):
    """check_guarantee refused k = 0 ("k must be at least 1") although OPT_0 = F(empty) is a brute-force optimum
    like any other: every method returns the empty set, gamma_{U,0} = 1 (0/0 := 1) and every bound holds."""
    chk = check_guarantee(f, 0, n_seeds=2)
    assert chk.k == 0 and chk.opt == brute_opt(f, 0) and chk.opt_set == ()
    assert chk.gamma == chk.gamma_reachable == 1.0
    assert all(r.selected == () and r.value == brute_opt(f, 0) for r in chk.rows)
    assert chk.all_hold and all(r.holds for r in chk.rows)
