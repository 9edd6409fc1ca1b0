"""SparseRegressionSelector: forward regression as a scikit-learn feature selector.

The oracles are independent of the library's Gram-space kernels: forward regression written from its definition
(``numpy.linalg.lstsq`` for every candidate, the largest increase of explained energy wins), scikit-learn's
``LinearRegression`` / ``r2_score``, and brute force over all subsets.
"""

import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from submod import SparseRegressionSelector

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402
from sklearn.metrics import r2_score  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- oracles
def explained(X, Y, cols, ridge=0.0, fit_intercept=True):
    """``||Y_c||^2 - min ||Y_c - X_c[:, cols] W||^2 - ridge ||W||^2`` by lstsq on the augmented design."""
    Y = Y.reshape(len(Y), -1)
    if fit_intercept:
        X, Y = X - X.mean(axis=0), Y - Y.mean(axis=0)
    total = float((Y ** 2).sum())
    if len(cols) == 0:
        return 0.0, total
    A, T = X[:, cols], Y
    if ridge:
        A = np.vstack([A, np.sqrt(ridge) * np.eye(len(cols))])
        T = np.vstack([Y, np.zeros((len(cols), Y.shape[1]))])
    W = np.linalg.lstsq(A, T, rcond=None)[0]
    return total - float(((T - A @ W) ** 2).sum()), total


def units_of(groups, p):
    return [[j] for j in range(p)] if groups is None else [list(g) for g in groups]


def check_forward_regression(X, Y, sel, ridge, fit_intercept, groups, k):
    """Every pick of ``sel`` is an argmax of the brute-force gains given the picks before it; an early stop happens
    only when no remaining unit adds anything; ``r2_path_`` is the brute-force explained fraction."""
    units = units_of(groups, X.shape[1])
    chosen: list[int] = []
    _, total = explained(X, Y, [], ridge, fit_intercept)
    tol = 1e-8 * max(total, 1e-300)
    for t in range(k):
        base, _ = explained(X, Y, sum((units[u] for u in chosen), []), ridge, fit_intercept)
        gains = {u: explained(X, Y, sum((units[v] for v in chosen + [u]), []), ridge, fit_intercept)[0] - base
                 for u in range(len(units)) if u not in chosen}
        best = max(gains.values())
        if t == sel.ranking_.size:  # greedy stopped early: nothing left to explain
            assert best <= tol, (t, best)
            return
        pick = int(sel.ranking_[t])
        assert gains[pick] >= best - tol, (t, pick, gains)
        chosen.append(pick)
        value, _ = explained(X, Y, sum((units[u] for u in chosen), []), ridge, fit_intercept)
        assert sel.r2_path_[t] == pytest.approx(value / total, abs=1e-8)
    assert sel.ranking_.size == k


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(4, 30))
    p = draw(st.integers(1, 7))
    m = draw(st.sampled_from([None, 1, 2, 3]))  # None: 1-D y
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p))  # correlated columns
    X += draw(st.floats(-3, 3)) * rng.standard_normal(p)            # non-zero means
    W = rng.standard_normal((p, m or 1)) * (rng.random((p, 1)) < 0.6)
    Y = X @ W + 0.3 * rng.standard_normal((n, m or 1))
    y = Y[:, 0] if m is None else Y
    groups = None
    if draw(st.booleans()) and p >= 2:
        cut = sorted(draw(st.sets(st.integers(1, p - 1), max_size=p - 1)))
        perm = rng.permutation(p)
        groups = [perm[a:b].tolist() for a, b in zip([0, *cut], [*cut, p])]
    ridge = draw(st.sampled_from([0.0, 0.0, 0.1, 2.0]))
    fit_intercept = draw(st.booleans())
    n_units = p if groups is None else len(groups)
    k = draw(st.integers(1, n_units))
    return X, y, ridge, fit_intercept, groups, k


# ---------------------------------------------------------------------------------------------- the selection
@SETTINGS
@given(problems())
def test_ranking_is_forward_regression_by_brute_force(problem):
    X, y, ridge, fit_intercept, groups, k = problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = SparseRegressionSelector(k, ridge=ridge, fit_intercept=fit_intercept, groups=groups).fit(X, y)
    stopped = sel.ranking_.size < k
    assert stopped == any("stopped early" in str(w.message) for w in caught)
    check_forward_regression(X, y, sel, ridge, fit_intercept, groups, k)
    units = units_of(groups, X.shape[1])
    mask = np.zeros(X.shape[1], dtype=bool)
    for u in sel.ranking_:
        mask[units[u]] = True
    np.testing.assert_array_equal(sel.support_, mask)
    np.testing.assert_array_equal(sel.get_support(), mask)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), m=st.sampled_from([None, 1, 3]), k=st.integers(1, 6))
def test_r2_path_is_linear_regression_score_and_refit_is_lstsq(seed, m, k):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 8)) + rng.standard_normal(8)
    Y = X[:, :3] @ rng.standard_normal((3, m or 1)) + rng.standard_normal((40, m or 1)) + 5.0
    y = Y[:, 0] if m is None else Y
    sel = SparseRegressionSelector(k).fit(X, y)
    assert sel.ranking_.size == k
    for j in range(k):
        cols = sel.ranking_[: j + 1]
        lr = LinearRegression().fit(X[:, cols], y)
        r2 = r2_score(y, lr.predict(X[:, cols]), multioutput="variance_weighted")
        assert sel.r2_path_[j] == pytest.approx(r2, abs=1e-9)
        if m is None:
            assert sel.r2_path_[j] == pytest.approx(lr.score(X[:, cols], y), abs=1e-9)
    # coef_ is over all features, zeros outside the support; lstsq with a column of ones gives the reference
    S = np.flatnonzero(sel.support_)
    sol = np.linalg.lstsq(np.column_stack([X[:, S], np.ones(len(X))]), Y, rcond=None)[0]
    coef = np.zeros((Y.shape[1], X.shape[1]))
    coef[:, S] = sol[:-1].T
    expect_coef, expect_b = (coef[0], sol[-1, 0]) if m is None else (coef, sol[-1])
    assert np.shape(sel.coef_) == np.shape(expect_coef) and np.shape(sel.intercept_) == np.shape(expect_b)
    np.testing.assert_allclose(sel.coef_, expect_coef, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sel.intercept_, expect_b, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(X @ np.atleast_2d(sel.coef_).T + sel.intercept_, X[:, S] @ sol[:-1] + sol[-1],
                               rtol=1e-7, atol=1e-8)


def test_ridge_refit_is_the_augmented_least_squares_and_no_intercept_means_raw_energy():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((30, 6)) + 2.0
    y = X @ rng.standard_normal(6) + rng.standard_normal(30)
    sel = SparseRegressionSelector(3, ridge=1.5).fit(X, y)
    S = np.flatnonzero(sel.support_)
    Xc, yc = X[:, S] - X[:, S].mean(axis=0), y - y.mean()
    w = np.linalg.lstsq(np.vstack([Xc, np.sqrt(1.5) * np.eye(S.size)]), np.r_[yc, np.zeros(S.size)],
                        rcond=None)[0]
    np.testing.assert_allclose(sel.coef_[S], w, rtol=1e-9)
    assert sel.intercept_ == pytest.approx(y.mean() - X[:, S].mean(axis=0) @ w)
    raw = SparseRegressionSelector(3, fit_intercept=False).fit(X, y)
    S = np.flatnonzero(raw.support_)
    w = np.linalg.lstsq(X[:, S], y, rcond=None)[0]
    np.testing.assert_allclose(raw.coef_[S], w, rtol=1e-9)
    assert raw.intercept_ == 0.0
    assert raw.r2_path_[-1] == pytest.approx(1 - ((y - X[:, S] @ w) ** 2).sum() / (y ** 2).sum())


def test_groups_are_selected_together_and_counted_as_groups():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 6))
    y = X[:, 4] + X[:, 5] + 0.5 * X[:, 0]
    groups = [[0, 1], [2, 3], [4, 5]]
    sel = SparseRegressionSelector(1, groups=groups).fit(X, y)
    assert sel.ranking_.tolist() == [2] and sel.get_support(indices=True).tolist() == [4, 5]
    sel = SparseRegressionSelector(0.7, groups=groups).fit(X, y)   # floor(0.7 * 3) = 2 groups
    assert sel.n_features_to_select_ == 2 and sel.ranking_.tolist() == [2, 0]
    assert sel.transform(X).shape == (100, 4)


def test_budget_defaults_to_half_and_fractions_round_down():
    X = np.random.default_rng(1).standard_normal((50, 7))
    y = X.sum(axis=1)
    assert SparseRegressionSelector().fit(X, y).n_features_to_select_ == 3
    assert SparseRegressionSelector(0.5).fit(X, y).n_features_to_select_ == 3
    assert SparseRegressionSelector(0.01).fit(X, y).n_features_to_select_ == 1
    assert SparseRegressionSelector(1.0).fit(X, y).n_features_to_select_ == 7
    assert SparseRegressionSelector().fit(X[:, :1], y).n_features_to_select_ == 1


def test_lazy_and_stochastic_methods():
    # A suppressor: x1 is useless alone and decisive next to x0, so stale gains are not upper bounds.
    rng = np.random.default_rng(0)
    t, s = rng.standard_normal((2, 500))
    X = np.column_stack([t + s, s, t + 1.5 * rng.standard_normal(500), rng.standard_normal((500, 3))])
    y = t
    greedy = SparseRegressionSelector(2).fit(X, y)
    lazy = SparseRegressionSelector(2, method="lazy").fit(X, y)
    assert greedy.ranking_.tolist() == lazy.ranking_.tolist() == [0, 1]
    assert lazy.result_.violations, "lazy greedy must record the stale-bound violation of the suppressor"
    assert any(element == 1 for _, element, _, _ in lazy.result_.violations)
    y = t + 0.3 * rng.standard_normal(500)
    a = SparseRegressionSelector(3, method="stochastic", seed=4).fit(X, y)
    b = SparseRegressionSelector(3, method="stochastic", seed=4).fit(X, y)
    np.testing.assert_array_equal(a.ranking_, b.ranking_)
    np.testing.assert_allclose(a.r2_path_, [explained(X, y, a.ranking_[: j + 1])[0] / explained(X, y, [])[1]
                                            for j in range(3)], atol=1e-9)


# ---------------------------------------------------------------------------------------------- certificates
def best_r2_brute_force(X, y, k):
    total = explained(X, y, [])[1]
    return max(explained(X, y, list(S))[0] for S in itertools.combinations(range(X.shape[1]), k)) / total


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), corr=st.floats(0.0, 0.95))
def test_certificate_bounds_the_best_subset(seed, k, corr):
    verification = pytest.importorskip("verification")
    rng = np.random.default_rng(seed)
    p = 7
    C = (1 - corr) * np.eye(p) + corr * np.ones((p, p))
    X = rng.standard_normal((25, p)) @ np.linalg.cholesky(C).T
    y = X @ rng.standard_normal(p) + 0.5 * rng.standard_normal(25)

    def spectral(f, kk):
        return verification.submodularity_ratio(f, kk, method="spectral").value

    assert SparseRegressionSelector(k).fit(X, y).certificate_ is None  # not submodular: no bound without gamma
    sel = SparseRegressionSelector(k, gamma_lower=spectral).fit(X, y)
    opt = best_r2_brute_force(X, y, k)
    assert sel.certificate_ is not None
    assert sel.r2_path_[-1] <= opt + 1e-12
    assert sel.certificate_ >= opt - 1e-12
    assert sel.certificate_ == pytest.approx(min(1.0, sel.result_.certificate.upper_bound
                                                 / explained(X, y, [])[1]))


def test_a_zero_gamma_bound_gives_no_certificate():
    X = np.random.default_rng(0).standard_normal((20, 4))
    X[:, 3] = X[:, 0]
    y = X[:, 0] + X[:, 1]
    assert SparseRegressionSelector(2, gamma_lower=lambda f, k: 0.0).fit(X, y).certificate_ is None
    with pytest.raises(ValueError, match="gamma_lower"):
        SparseRegressionSelector(2, gamma_lower=1.5).fit(X, y)


def test_gamma_lower_one_is_refused_in_terms_of_the_selectors_parameter():
    """The objective is built inside fit, so the error names gamma_lower and how to compute a proven bound, not the
    objective's submodular attribute (which the user cannot reach)."""
    X = np.random.default_rng(0).standard_normal((20, 4))
    y = X[:, 0] + X[:, 1]
    for gamma, said in ((1.0, "gamma_lower=1"), (1, "gamma_lower=1"), (np.float64(1.0), "gamma_lower=1"),
                         (lambda f, k: 1.0, r"gamma_lower\(objective, k\) returned 1")):
        with pytest.raises(ValueError, match=said) as info:
            SparseRegressionSelector(2, gamma_lower=gamma).fit(X, y)
        message = str(info.value)
        assert "submodularity_ratio(f, k, method='spectral')" in message and "gamma_lower=None" in message
        assert "attribute" not in message


def test_sparse_input_is_refused_clearly():
    """Refused as SparseRegression refuses it (a ValueError saying .toarray(), not scikit-learn's TypeError)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4))
    y = X[:, 0] + X[:, 1]
    for Xs, ys, name in ((sp.csr_matrix(X), y, "X"), (sp.csc_array(X), y, "X"), (X, sp.csr_matrix(y[:, None]), "y")):
        with pytest.raises(ValueError, match=rf"{name} must be a dense array.*{name}\.toarray\(\)"):
            SparseRegressionSelector(2).fit(Xs, ys)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 30), p=st.integers(1, 6), grouped=st.booleans())
def test_a_budget_of_zero_selects_nothing_in_both_selectors_and_transform_warns(seed, n, p, grouped):
    """One rule for both selectors, as maximize(f, 0) and scikit-learn's SelectKBest(k=0): a budget of 0 selects
    nothing, and transform returns an empty array with a UserWarning. SubmodularSelector(k=0) accepted it (silently)
    while SparseRegressionSelector(0) refused it. Oracles: the only set of size 0 is the empty one, so the best
    score is exactly 0 and the least-squares model is the intercept alone, the mean of y."""
    from submod import SubmodularSelector

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    y = X @ rng.standard_normal(p) + rng.standard_normal()
    sel = SparseRegressionSelector(0, groups=1 if grouped else None).fit(X, y)
    assert not sel.support_.any() and sel.ranking_.size == 0 and sel.r2_path_.size == 0
    assert sel.n_features_to_select_ == 0 and sel.certificate_ == 0.0
    assert sel.result_.certificate.kind.startswith("exact")
    np.testing.assert_array_equal(sel.coef_, np.zeros(p))
    assert sel.intercept_ == pytest.approx(y.mean(), rel=1e-12, abs=1e-12)
    with pytest.warns(UserWarning, match="No features were selected"):
        assert sel.transform(X).shape == (n, 0)
    rows = SubmodularSelector(k=0).fit(X)
    assert not rows.get_support().any() and rows.get_support(indices=True).size == 0
    assert rows.result_.certificate.upper_bound == 0.0 and rows.result_.certificate.kind.startswith("exact")
    with pytest.warns(UserWarning, match="No rows were selected"):
        assert rows.transform(X).shape == (0, p)


# ---------------------------------------------------------------------------------------------- early stop
def test_duplicate_and_constant_columns_stop_greedy_early():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 60))
    X = np.column_stack([a, a, np.full(60, 3.0), b, 2 * b])
    y = a - b
    with pytest.warns(UserWarning, match="selected 2 of n_features_to_select=4 features"):
        sel = SparseRegressionSelector(4).fit(X, y)
    assert sorted(sel.ranking_.tolist()) == [0, 3] and sel.result_.stopped_early
    assert sel.r2_path_[-1] == pytest.approx(1.0)
    assert sel.transform(X).shape == (60, 2)
    with pytest.warns(UserWarning, match="y is constant"):
        sel = SparseRegressionSelector(2).fit(X, np.full(60, 7.0))
    assert sel.ranking_.size == 0 and not sel.support_.any() and sel.intercept_ == 7.0
    with pytest.warns(UserWarning, match="selected 0 of .*the rest are constant"):
        sel = SparseRegressionSelector(1).fit(X[:, [2]], y)
    assert sel.r2_path_.size == 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "X_fn", "y_fn", "match"), [
    ({}, lambda X: np.where(X > 1.5, np.nan, X), None, "NaN"),
    ({}, lambda X: np.where(X > 1.5, np.inf, X), None, "infinity|inf"),
    ({}, None, lambda y: np.where(y > 1, np.nan, y), "NaN"),
    ({}, None, lambda y: y[:-1], "inconsistent numbers of samples|rows"),
    ({"n_features_to_select": -1}, None, None, r"out of range for X with n_features = 5; pass an int in \[0, 5\]"),
    ({"n_features_to_select": 6}, None, None, r"out of range for X with n_features = 5; pass an int in \[0, 5\]"),
    ({"n_features_to_select": 1.5}, None, None, r"outside \(0, 1\]"),
    ({"n_features_to_select": 0.0}, None, None, r"outside \(0, 1\]"),
    ({"n_features_to_select": "half"}, None, None, "must be an int"),
    ({"n_features_to_select": True}, None, None, "must be an int"),
    ({"method": "fast"}, None, None, "unknown method 'fast'"),
    ({"groups": [[0, 1], [1, 2], [3, 4]]}, None, None, "groups overlap"),
    ({"groups": [[0, 1], [2, 3, 4]], "n_features_to_select": 3}, None, None, "n_features = 5 in 2 groups"),
    ({"groups": [[0, 1], [2]]}, None, None, "do not cover columns"),
    ({"ridge": -1.0}, None, None, "ridge must be finite and >= 0"),
    ({"fit_intercept": "yes"}, None, None, "fit_intercept must be True or False"),
])
def test_bad_input_raises_a_clear_error(kwargs, X_fn, y_fn, match):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 5))
    y = X[:, 0] + rng.standard_normal(30)
    X = X if X_fn is None else X_fn(X)
    y = y if y_fn is None else y_fn(y)
    sel = SparseRegressionSelector(**{"n_features_to_select": 2, **kwargs})
    with pytest.raises(ValueError, match=match):
        sel.fit(X, y)
    assert not hasattr(sel, "support_")


def test_a_failed_refit_leaves_the_selector_unfitted():
    from sklearn.exceptions import NotFittedError

    X = np.random.default_rng(0).standard_normal((30, 5))
    y = X[:, 0] + X[:, 1]
    sel = SparseRegressionSelector(2).fit(X, y)
    with pytest.raises(ValueError, match="out of range"):
        sel.set_params(n_features_to_select=9).fit(X, y)
    with pytest.raises(NotFittedError):
        sel.transform(X)
    with pytest.raises(NotFittedError):
        SparseRegressionSelector().get_support()


@pytest.mark.filterwarnings("ignore:selected 1 of n_features_to_select=2 groups")  # groups=2: Y is in group 0
def test_the_callers_arrays_are_not_modified():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)) + 3.0
    Y = X[:, :2] @ rng.standard_normal((2, 2)) + 1.0
    X0, Y0 = X.copy(), Y.copy()
    X.flags.writeable = False  # a write would raise, not just show up in the comparison
    Y.flags.writeable = False
    for kwargs in ({}, {"ridge": 0.3}, {"fit_intercept": False}, {"groups": 2}, {"method": "lazy"}):
        sel = SparseRegressionSelector(2, **kwargs).fit(X, Y)
        sel.transform(X)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Y, Y0)


def test_one_column_y_as_1d_or_2d():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 5))
    y = X[:, 1] - X[:, 3] + 0.1 * rng.standard_normal(50)
    one = SparseRegressionSelector(2).fit(X, y)
    two = SparseRegressionSelector(2).fit(X, y[:, None])
    np.testing.assert_array_equal(one.ranking_, two.ranking_)
    np.testing.assert_allclose(one.r2_path_, two.r2_path_)
    assert one.coef_.shape == (5,) and isinstance(one.intercept_, float)
    assert two.coef_.shape == (1, 5) and two.intercept_.shape == (1,)
    np.testing.assert_allclose(two.coef_[0], one.coef_)


# ---------------------------------------------------------------------------------------------- scikit-learn
def test_pipeline_grid_search_and_clone():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    pipe = Pipeline([("select", SparseRegressionSelector()), ("model", LinearRegression())])
    search = GridSearchCV(pipe, {"select__n_features_to_select": [1, 3, 5, 10]}, cv=3).fit(X, y)
    assert search.best_params_["select__n_features_to_select"] in (3, 5, 10)
    assert search.best_estimator_[0].support_.sum() == search.best_params_["select__n_features_to_select"]
    sel = SparseRegressionSelector(4, ridge=0.5, method="lazy", groups=None, seed=3)
    twin = clone(sel)
    assert twin.get_params() == sel.get_params() and not hasattr(twin, "support_")
    assert " ".join(repr(sel).split()) == ("SparseRegressionSelector(method='lazy', n_features_to_select=4, "
                                           "ridge=0.5, seed=3)")
    inv = sel.fit(X, y).inverse_transform(sel.transform(X))
    np.testing.assert_array_equal(inv[:, sel.support_], X[:, sel.support_])
    assert not inv[:, ~sel.support_].any()


def test_dataframe_feature_names():
    pd = pytest.importorskip("pandas")
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True)
    X, y = data.data, data.target
    sel = SparseRegressionSelector(3).fit(X, y)
    assert list(sel.feature_names_in_) == list(X.columns)
    names = sel.get_feature_names_out()
    assert list(names) == [c for c in X.columns if c in set(X.columns[sel.ranking_])]
    assert list(names) == list(X.columns[np.sort(sel.ranking_)])
    out = sel.set_output(transform="pandas").transform(X)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(names)
    with pytest.warns(UserWarning, match="feature names"):  # scikit-learn's check: fitted with names, given none
        sel.transform(X.to_numpy())


@parametrize_with_checks([SparseRegressionSelector(), SparseRegressionSelector(2, ridge=0.1, method="lazy")])
def test_scikit_learn_estimator_checks(estimator, check):
    # Every check applies and passes (check_array_api_input skips itself unless SCIPY_ARRAY_API is set).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # early stops on the checks' tiny, degenerate data
        check(estimator)


def test_works_without_scikit_learn():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "import numpy as np, submod\n"
            "X = np.random.default_rng(0).standard_normal((50, 6)); y = X[:, 1] - X[:, 4]\n"
            "s = submod.SparseRegressionSelector(2).fit(X, y)\n"
            "assert s.ranking_.tolist() == [1, 4] and s.transform(X).shape == (50, 2)\n"
            "assert s.get_support(indices=True).tolist() == [1, 4]\n"
            "assert s.set_params(ridge=1.0).get_params()['ridge'] == 1.0\n"
            "try:\n    submod.SparseRegressionSelector().get_support()\nexcept ValueError as e:\n"
            "    assert 'not fitted' in str(e)\nelse:\n    raise AssertionError\n"
            "try:\n    s.fit(X, None)\nexcept ValueError as e:\n    assert 'requires y' in str(e)\n"
            "else:\n    raise AssertionError\n"
            "import warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n"
            "    assert submod.SparseRegressionSelector(0).fit(X, y).transform(X).shape == (50, 0)\n"
            "assert any('No features were selected' in str(w.message) for w in seen)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
