"""Specification of :class:`submod.SparseRegression`, :class:`submod.GramAccumulator` and the greedy path.

Oracles are independent of the implementation: ``numpy.linalg.lstsq`` on explicit designs (with a ones column for
the intercept and ``[A; sqrt(ridge) I]`` for the ridge), brute-force forward regression / OMP with one lstsq per
candidate, and statistics computed directly from all rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import submod
from submod.sparse_regression import GramAccumulator, RegressionPath, SparseRegression

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9


# ---------------------------------------------------------------------------------------------- oracles
def design(A, Y, cols, ridge=0.0, intercept=False):
    """Explicit least-squares design for the columns ``cols``: ones column for the bias, ridge rows appended."""
    n = A.shape[0]
    X = A[:, cols]
    T = Y
    if intercept:
        X = np.hstack([X, np.ones((n, 1))])
    q = len(cols)
    if ridge > 0 and q:
        aug = np.zeros((q, X.shape[1]))
        aug[:, :q] = np.sqrt(ridge) * np.eye(q)
        X = np.vstack([X, aug])
        T = np.vstack([Y, np.zeros((q, Y.shape[1]))])
    return X, T


def energy(Y, intercept):
    Yc = Y - Y.mean(axis=0) if intercept else Y
    return float((Yc ** 2).sum())


def lstsq_value(A, Y, cols, ridge=0.0, intercept=False):
    """F(S) = energy - min residual, from numpy.linalg.lstsq on the explicit (augmented) design."""
    cols = list(cols)
    y2 = energy(Y, intercept)
    if not cols and not intercept:
        return 0.0
    X, T = design(A, Y, cols, ridge, intercept)
    M = np.linalg.lstsq(X, T, rcond=None)[0]
    return y2 - float(((T - X @ M) ** 2).sum())


def path_atol(A, Y, cols, ridge=0.0, intercept=False):
    """Absolute tolerance for the values ``F(S)`` of the prefixes of a path whose last set has columns ``cols``.

    The library computes ``F`` from Gram statistics (normal equations), whose rounding error grows like
    ``eps * cond(A_S)^2 * ||Y||^2`` (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 20), while
    lstsq's grows like ``eps * cond(A_S)``; on a correlated instance (cond 1.5e4, found by hypothesis) the two
    differed by 5e-10 of ``||Y||^2``, inside that bound but outside a fixed 1e-9. Removing columns cannot raise
    the condition number (the singular values interlace), so the last set's bounds every prefix."""
    X = A[:, list(cols)]
    if intercept:
        X = X - X.mean(axis=0)
    if ridge > 0:
        X = np.vstack([X, np.sqrt(ridge) * np.eye(X.shape[1])])
    cond = float(np.linalg.cond(X)) if X.shape[1] else 1.0
    return energy(Y, intercept) * max(REL, 10 * np.finfo(float).eps * cond ** 2)


def lstsq_fit(A, Y, cols, intercept=False):
    """(M, bias) from lstsq with an unpenalised ones column."""
    X, T = design(A, Y, list(cols), 0.0, intercept)
    coef = np.linalg.lstsq(X, T, rcond=None)[0]
    return (coef[:-1], coef[-1]) if intercept else (coef, None)


def brute_forward(A, Y, groups, k, ridge=0.0, intercept=False, rule="greedy", parts=None, quota=None):
    """Forward selection with one lstsq per candidate per step (the definition of the greedy / OMP rules); with
    ``parts`` (a label per unit), at most ``quota`` units of each label."""
    chosen: list[int] = []
    cols: list[int] = []
    for _ in range(k):
        full = set() if parts is None else {p for p in set(parts) if sum(parts[c] == p for c in chosen) >= quota}
        base = lstsq_value(A, Y, cols, ridge, intercept)
        scores = np.full(len(groups), -np.inf)
        if rule == "omp":
            X, T = design(A, Y, cols, ridge, intercept) if (cols or intercept) else (np.zeros((A.shape[0], 0)), Y)
            R = T - X @ np.linalg.lstsq(X, T, rcond=None)[0] if X.shape[1] else Y
            R = R[:A.shape[0]]
        for u, g in enumerate(groups):
            if u in chosen or (parts is not None and parts[u] in full):
                continue
            if rule == "greedy":
                scores[u] = lstsq_value(A, Y, cols + list(g), ridge, intercept) - base
            else:
                a = A[:, g] - (A[:, g].mean(axis=0) if intercept else 0.0)
                norms = (a ** 2).sum(axis=0) + ridge
                scores[u] = float((((a.T @ R) ** 2).sum(axis=1) / norms).sum())
        u = int(np.argmax(scores))
        chosen.append(u)
        cols += list(groups[u])
    return chosen


# ---------------------------------------------------------------------------------------------- instances
def random_groups(rng, p, max_size=3):
    perm = rng.permutation(p)
    out, i = [], 0
    while i < p:
        s = int(rng.integers(1, max_size + 1))
        out.append(sorted(perm[i:i + s].tolist()))
        i += s
    return out


def make_instance(seed, kind, n, p, m):
    rng = np.random.default_rng(seed)
    if kind == "random":
        A = rng.standard_normal((n, p))
    elif kind == "correlated":
        # Decaying spectrum (condition number 1e2) and a common offset, so columns are strongly correlated.
        U = np.linalg.qr(rng.standard_normal((p, p)))[0]
        A = rng.standard_normal((n, p)) @ (np.logspace(0, -2, p)[:, None] * U) + 3.0
    elif kind == "rank_deficient":
        # Small integers, so duplicates / sums are exact: zero, duplicate and sum columns.
        A = rng.integers(-3, 4, size=(n, p)).astype(float)
        if p >= 4:
            A[:, 1] = A[:, 0]
            A[:, 2] = 0.0
            A[:, 3] = A[:, 0] + 2.0 * A[:, p - 1]
    elif kind == "wide":
        A = rng.standard_normal((n, p))
    else:  # pragma: no cover
        raise AssertionError(kind)
    W = rng.standard_normal((p, m))
    Y = A @ W + 0.3 * rng.standard_normal((n, m))
    if rng.random() < 0.3:
        Y = rng.standard_normal((n, m))          # targets unrelated to A (asymmetric statistics)
    return A, Y


@st.composite
def instances(draw, kinds=("random", "correlated", "rank_deficient", "wide")):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    kind = draw(st.sampled_from(kinds))
    p = draw(st.integers(2, 9))
    n = draw(st.integers(2, max(2, p - 1))) if kind == "wide" else draw(st.integers(p + 2, 3 * p + 6))
    m = draw(st.integers(1, 4))
    A, Y = make_instance(seed, kind, n, p, m)
    rng = np.random.default_rng(seed + 1)
    groups = random_groups(rng, p) if draw(st.booleans()) else None
    ridge = draw(st.sampled_from([0.0, 0.0, 0.37, 5.0]))
    intercept = draw(st.booleans())
    mode = draw(st.sampled_from(["h", "b"]))
    block = draw(st.sampled_from([1, 2, 3, 48]))
    return A, Y, groups, ridge, intercept, mode, block, seed


def build(A, Y, groups, ridge, intercept, mode=None, block=None):
    f = SparseRegression(A, Y, ridge=ridge, groups=groups, fit_intercept=intercept)
    f._mode = mode
    if block is not None:
        f._block = block
    return f


# ---------------------------------------------------------------------------------------------- exactness
@SETTINGS
@given(instances())
def test_state_values_and_all_gains_equal_lstsq(inst):
    """After every add (random order), F(S) and the gains of all units equal lstsq differences to 1e-9 * ||Y||^2."""
    A, Y, groups, ridge, intercept, mode, block, seed = inst
    f = build(A, Y, groups, ridge, intercept, mode, block)
    units = [list(g) for g in f.groups]
    y2 = energy(Y, intercept)
    assert f.y_norm2 == pytest.approx(y2, rel=1e-12, abs=1e-12)
    tol = REL * max(y2, 1e-300)
    state = f.init_state()
    order = np.random.default_rng(seed).permutation(f.n)
    for j in order[: min(f.n, 6)]:
        cols = list(f.columns_of(state.selected))
        base = lstsq_value(A, Y, cols, ridge, intercept)
        assert state.value == pytest.approx(base, abs=tol)
        gains = state.gains()
        assert gains.shape == (f.n,) and np.all(np.isfinite(gains)) and np.all(gains >= 0)
        want = np.array([0.0 if u in state.selected else lstsq_value(A, Y, cols + units[u], ridge, intercept) - base
                         for u in range(f.n)])
        np.testing.assert_allclose(gains, want, rtol=0, atol=tol)
        # A subset of candidates gets the same numbers as the full batch.
        sub = np.array(order[::2])
        np.testing.assert_array_equal(state.gains(sub), gains[sub])
        state.add(int(j))
    assert f.value(state.selected) == pytest.approx(state.value, abs=tol)


@SETTINGS
@given(instances())
def test_value_and_residual_equal_lstsq(inst):
    A, Y, groups, ridge, intercept, _, _, seed = inst
    f = build(A, Y, groups, ridge, intercept)
    rng = np.random.default_rng(seed)
    y2 = energy(Y, intercept)
    for _ in range(3):
        S = rng.permutation(f.n)[: int(rng.integers(0, f.n + 1))]
        want = lstsq_value(A, Y, list(f.columns_of(S)), ridge, intercept)
        assert f.value(S) == pytest.approx(want, abs=REL * y2)
        assert f.residual(S) == pytest.approx(y2 - want, abs=REL * y2)


@SETTINGS
@given(instances(kinds=("random", "correlated")))
def test_greedy_path_equals_brute_force_forward_regression(inst):
    A, Y, groups, ridge, intercept, mode, block, _ = inst
    f = build(A, Y, groups, ridge, intercept, mode, block)
    k = min(f.n, 5)
    path = f.greedy_path(k)
    units = [list(g) for g in f.groups]
    assert path.selected.tolist() == brute_forward(A, Y, units, k, ridge, intercept)
    y2 = energy(Y, intercept)
    want = [lstsq_value(A, Y, list(f.columns_of(path.selected[:t])), ridge, intercept) for t in range(k + 1)]
    tol = path_atol(A, Y, f.columns_of(path.selected), ridge, intercept)
    np.testing.assert_allclose(path.values, want, rtol=0, atol=tol)
    np.testing.assert_allclose(path.gains, np.diff(want), rtol=0, atol=2 * tol)
    np.testing.assert_allclose(path.errors, y2 - np.array(want), rtol=0, atol=tol)
    np.testing.assert_allclose(path.relative_errors, (y2 - np.array(want)) / y2, rtol=0, atol=tol / y2)


@SETTINGS
@given(instances(kinds=("random", "correlated")))
def test_greedy_path_under_a_partition_matroid_equals_brute_force(inst):
    """Under PartitionMatroid(parts, quota) the path picks, at each step, the unit of largest exact gain among
    those whose part is not full (brute force with one lstsq per candidate); it fills every part to its quota
    when k is the matroid's rank; a k beyond the rank, another constraint or labels of the wrong length are
    refused."""
    A, Y, groups, ridge, intercept, mode, block, seed = inst
    f = build(A, Y, groups, ridge, intercept, mode, block)
    if f.n < 2:
        return
    rng = np.random.default_rng(seed)
    parts = rng.integers(0, 2, size=f.n)
    parts[:2] = [0, 1]  # both parts present
    quota = int(rng.integers(1, 3))
    c = submod.PartitionMatroid(parts, quota)
    rank = sum(min(int((parts == p).sum()), quota) for p in (0, 1))
    path = f.greedy_path(rank, constraint=c)
    assert path.constraint is c and f.greedy_path(1).constraint is None
    units = [list(g) for g in f.groups]
    assert path.selected.tolist() == brute_forward(A, Y, units, rank, ridge, intercept, parts=parts.tolist(),
                                                   quota=quota)
    assert all((parts[path.selected] == p).sum() == min((parts == p).sum(), quota) for p in (0, 1))
    want = [lstsq_value(A, Y, list(f.columns_of(path.selected[:t])), ridge, intercept) for t in range(rank + 1)]
    np.testing.assert_allclose(path.values, want, rtol=0,
                               atol=path_atol(A, Y, f.columns_of(path.selected), ridge, intercept))
    if rank < f.n:
        with pytest.raises(ValueError, match=f"exceeds what the constraint allows \\({rank} units"):
            f.greedy_path(rank + 1, constraint=c)
    with pytest.raises(ValueError, match="must be a submod.PartitionMatroid; got Knapsack"):
        f.greedy_path(1, constraint=submod.Knapsack(np.ones(f.n), 1.0))
    with pytest.raises(ValueError, match="one label per element"):
        f.greedy_path(1, constraint=submod.PartitionMatroid(parts[:-1], quota))


def test_greedy_path_under_a_loose_partition_matroid_is_the_plain_path():
    """A quota no part reaches changes nothing: the same picks and values as without the constraint."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 8))
    f = SparseRegression(A, A @ rng.standard_normal((8, 3)) + 0.1 * rng.standard_normal((40, 3)))
    plain = f.greedy_path(5)
    loose = f.greedy_path(5, constraint=submod.PartitionMatroid(np.arange(8) % 2, 5))
    assert loose.selected.tolist() == plain.selected.tolist()
    np.testing.assert_allclose(loose.values, plain.values, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(instances(kinds=("random", "correlated")))
def test_omp_path_follows_the_omp_rule(inst):
    A, Y, groups, _, intercept, mode, block, _ = inst
    f = build(A, Y, groups, 0.0, intercept, mode, block)
    k = min(f.n, 4)
    path = f.greedy_path(k, rule="omp")
    assert path.rule == "omp"
    units = [list(g) for g in f.groups]
    assert path.selected.tolist() == brute_forward(A, Y, units, k, 0.0, intercept, rule="omp")
    want = [lstsq_value(A, Y, list(f.columns_of(path.selected[:t])), 0.0, intercept) for t in range(k + 1)]
    np.testing.assert_allclose(path.values, want, rtol=0, atol=path_atol(A, Y, f.columns_of(path.selected), 0.0,
                                                                        intercept))


@SETTINGS
@given(instances(kinds=("random", "correlated")))
def test_refit_and_path_weights_equal_lstsq(inst):
    A, Y, groups, _, intercept, mode, block, seed = inst
    f = build(A, Y, groups, 0.0, intercept, mode, block)
    k = min(f.n, 5)
    path = f.greedy_path(k)
    for t in range(k + 1):
        cols = f.columns_of(path.selected[:t])
        M, bias = f.refit(path.selected[:t])
        Mw, bias_w = path.weights(t)
        assert M.shape == (cols.size, Y.shape[1])
        if t == 0:
            continue
        want_M, want_b = lstsq_fit(A, Y, cols, intercept)
        scale = max(1.0, float(np.abs(want_M).max()))
        np.testing.assert_allclose(M, want_M, rtol=0, atol=1e-8 * scale)
        np.testing.assert_allclose(Mw, M, rtol=0, atol=1e-8 * scale)
        if intercept:
            np.testing.assert_allclose(bias, want_b, rtol=0, atol=1e-8 * scale * (1 + np.abs(A).max()))
            np.testing.assert_allclose(bias_w, bias, rtol=0, atol=1e-8 * scale * (1 + np.abs(A).max()))
        else:
            assert bias is None and bias_w is None


@SETTINGS
@given(instances(kinds=("rank_deficient", "wide")))
def test_refit_on_degenerate_sets_reproduces_lstsq_fitted_values(inst):
    """Dependent columns get zero weight; the fitted values A_S M + b equal lstsq's (which is min-norm)."""
    A, Y, groups, _, intercept, _, _, seed = inst
    f = build(A, Y, groups, 0.0, intercept)
    rng = np.random.default_rng(seed)
    S = rng.permutation(f.n)[: int(rng.integers(1, f.n + 1))]
    cols = f.columns_of(S)
    M, bias = f.refit(S)
    assert np.all(np.isfinite(M))
    fitted = A[:, cols] @ M + (bias if intercept else 0.0)
    want_M, want_b = lstsq_fit(A, Y, cols, intercept)
    want = A[:, cols] @ want_M + (want_b if intercept else 0.0)
    np.testing.assert_allclose(fitted, want, rtol=0, atol=1e-8 * max(1.0, float(np.abs(Y).max())) * 10)
    assert f.reconstruction_error(S) == pytest.approx(float(((Y - fitted) ** 2).sum()), abs=REL * energy(Y, False))


def test_ridge_equals_augmented_design_without_ridge():
    rng = np.random.default_rng(3)
    A, Y = rng.standard_normal((30, 6)), rng.standard_normal((30, 2))
    lam = 2.5
    f = SparseRegression(A, Y, ridge=lam)
    # Augmented problem: rows sqrt(lam) I under A and zeros under Y, solved with ridge = 0. Its energy is the same.
    g = SparseRegression(np.vstack([A, np.sqrt(lam) * np.eye(6)]), np.vstack([Y, np.zeros((6, 2))]))
    for S in ([0], [1, 3], [0, 2, 4, 5], list(range(6))):
        # With every column kept, the augmented design's F equals the ridge F on that set.
        assert f.value(S) == pytest.approx(lstsq_value(A, Y, S, lam), rel=1e-10)
    assert f.value(list(range(6))) == pytest.approx(g.value(list(range(6))), rel=1e-10)
    M, _ = f.refit([1, 3])
    want = np.linalg.solve(A[:, [1, 3]].T @ A[:, [1, 3]] + lam * np.eye(2), A[:, [1, 3]].T @ Y)
    np.testing.assert_allclose(M, want, rtol=1e-10)
    # Plain reconstruction error of the ridge fit vs its definition; residual includes the penalty.
    err = float(((Y - A[:, [1, 3]] @ want) ** 2).sum())
    assert f.reconstruction_error([1, 3]) == pytest.approx(err, rel=1e-10)
    assert f.residual([1, 3]) == pytest.approx(err + lam * float((want ** 2).sum()), rel=1e-10)


def test_intercept_is_an_unpenalised_ones_column():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((40, 5)) + 10.0
    Y = A @ rng.standard_normal((5, 3)) + 7.0 + rng.standard_normal((40, 3))
    for ridge in (0.0, 1.5):
        f = SparseRegression(A, Y, ridge=ridge, fit_intercept=True)
        for S in ([], [2], [0, 4], [0, 1, 2, 3, 4]):
            assert f.value(S) == pytest.approx(lstsq_value(A, Y, S, ridge, True), abs=1e-10 * f.y_norm2)
    f = SparseRegression(A, Y, fit_intercept=True)
    M, b = f.refit([0, 4])
    want_M, want_b = lstsq_fit(A, Y, [0, 4], True)
    np.testing.assert_allclose(M, want_M, rtol=1e-9)
    np.testing.assert_allclose(b, want_b, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- streaming
@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), st.lists(st.integers(0, 40), min_size=1, max_size=6), st.booleans(),
       st.sampled_from([0.0, 1e4]))
def test_accumulator_equals_one_shot_statistics(seed, sizes, intercept, offset):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    if n == 0:
        sizes = [5]
        n = 5
    d, m = 4, 3
    A = rng.standard_normal((n, d)) + offset
    Y = rng.standard_normal((n, m)) - offset
    acc = GramAccumulator(d, m)
    lo = 0
    for s in sizes:
        acc.update(A[lo:lo + s], Y[lo:lo + s])
        lo += s
    assert acc.count == n
    Ac, Yc = A - A.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(acc.mean_a, A.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, rtol=1e-9, atol=1e-9 * n)
    np.testing.assert_allclose(acc.cross(centered=True), Ac.T @ Yc, rtol=1e-9, atol=1e-9 * n)
    assert acc.y_norm2(centered=True) == pytest.approx(float((Yc ** 2).sum()), rel=1e-9)
    raw_scale = 1e-12 * n * (1.0 + offset) ** 2
    np.testing.assert_allclose(acc.gram(), A.T @ A, rtol=1e-12, atol=raw_scale)
    np.testing.assert_allclose(acc.cross(), A.T @ Y, rtol=1e-12, atol=raw_scale)
    f = acc.to_objective(fit_intercept=intercept)
    g = SparseRegression(A, Y, fit_intercept=intercept)
    y2 = g.y_norm2
    assert f.y_norm2 == pytest.approx(y2, rel=1e-9)
    for S in ([0], [1, 3], [0, 1, 2, 3]):
        assert f.value(S) == pytest.approx(g.value(S), abs=1e-8 * y2)


@given(st.integers(0, 2 ** 32 - 1), st.lists(st.integers(0, 30), min_size=1, max_size=5), st.booleans(),
       st.sampled_from([0.0, 1e3]))
def test_weighted_accumulator_equals_scaled_rows_and_weighted_lstsq(seed, sizes, intercept, offset):
    """Oracle: weighted least squares = ordinary least squares on rows scaled by sqrt(w), with a weighted mean
    (the intercept column scaled too); checked through the statistics and through F(S) against lstsq."""
    rng = np.random.default_rng(seed)
    n = max(sum(sizes), 1)
    sizes = sizes if sum(sizes) else [1]
    d, m = 4, 2
    A = rng.standard_normal((n, d)) + offset
    Y = rng.standard_normal((n, m)) + 0.5 * A[:, :m]
    w = rng.uniform(0.0, 3.0, n)
    w[rng.random(n) < 0.2] = 0.0           # some rows of weight zero
    w[0] = 1.5                             # at least one positive weight
    acc = GramAccumulator(d, m)
    lo = 0
    for s in sizes:
        acc.update(A[lo:lo + s], Y[lo:lo + s], sample_weight=w[lo:lo + s])
        lo += s
    assert acc.count == n
    assert acc.weight_sum == pytest.approx(w.sum(), rel=1e-12)
    mu_a, mu_y = w @ A / w.sum(), w @ Y / w.sum()
    sw = np.sqrt(w)[:, None]
    Ac, Yc = (A - mu_a) * sw, (Y - mu_y) * sw
    np.testing.assert_allclose(acc.mean_a, mu_a, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, rtol=1e-8, atol=1e-8 * n)
    np.testing.assert_allclose(acc.cross(centered=True), Ac.T @ Yc, rtol=1e-8, atol=1e-8 * n)
    np.testing.assert_allclose(acc.gram(), (A * sw).T @ (A * sw), rtol=1e-10, atol=1e-10 * n * (1 + offset) ** 2)
    f = acc.to_objective(fit_intercept=intercept)
    design = np.hstack([A, np.ones((n, 1))]) if intercept else A
    for S in ([0], [1, 3], [0, 1, 2, 3]):
        cols = list(S) + ([d] if intercept else [])
        base = [d] if intercept else []
        def err(c):
            if not c:
                return float(((Y * sw) ** 2).sum())
            X = design[:, c] * sw
            M = np.linalg.lstsq(X, Y * sw, rcond=None)[0]
            return float(((Y * sw - X @ M) ** 2).sum())
        if _nearly_collinear(design[:, cols] * sw, f.tol):
            continue  # within the documented degenerate-column rule: a direction lstsq keeps and F gives 0
        expected = err(base) - err(cols)
        assert f.value(S) == pytest.approx(expected, rel=1e-6, abs=1e-7 * (1.0 + err(base)))


def _nearly_collinear(X, tol, margin=1e3):
    """Whether a column of ``X`` has a squared residual on the other columns below ``margin * tol`` times its
    squared norm (but not numerically zero): SparseRegression counts a column as degenerate (gain 0) at ``tol``
    (Notes of its docstring), while lstsq still fits its last direction, so the two oracles part there. (Found on a
    GPU machine, where hypothesis explored: 2 rows around 1e3 without an intercept, a residual of 2.5e-11 of the
    column's norm.)"""
    for j in range(X.shape[1]):
        others = np.delete(X, j, axis=1)
        xj = X[:, j]
        norm2 = float(xj @ xj)
        if norm2 == 0:
            continue
        r = xj - others @ np.linalg.lstsq(others, xj, rcond=None)[0] if others.shape[1] else xj
        if 1e-20 * norm2 < float(r @ r) <= margin * tol * norm2:  # below 1e-20: in the span, both give 0
            return True
    return False


def test_weighted_accumulator_bad_weights_and_zero_weight_batches():
    acc = GramAccumulator(2, 1)
    with pytest.raises(ValueError, match="one weight per row"):
        acc.update(np.ones((3, 2)), np.ones((3, 1)), sample_weight=np.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        acc.update(np.ones((3, 2)), np.ones((3, 1)), sample_weight=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.ones((3, 2)), np.ones((3, 1)), sample_weight=np.array([1.0, np.nan, 1.0]))
    acc.update(np.ones((3, 2)), np.ones((3, 1)), sample_weight=np.zeros(3))
    assert acc.count == 3 and acc.weight_sum == 0.0
    with pytest.raises(ValueError, match="positive weight"):
        acc.to_objective()
    other = GramAccumulator(2, 1)
    other.update(np.arange(8.0).reshape(4, 2), np.ones((4, 1)), sample_weight=np.full(4, 2.0))
    acc.merge(other)                       # merging into an all-zero-weight accumulator
    assert acc.count == 7 and acc.weight_sum == 8.0
    np.testing.assert_allclose(acc.mean_a, [3.0, 4.0])


def test_accumulator_centred_statistics_are_stable_with_large_means():
    """Raw sums lose all digits at mean 1e8; the pairwise update keeps the centred statistics exact-ish."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((3000, 3)) + 1e8
    Y = A[:, :2] - 1e8 + 0.1 * rng.standard_normal((3000, 2))
    acc = GramAccumulator(3, 2)
    for lo in range(0, 3000, 128):
        acc.update(A[lo:lo + 128], Y[lo:lo + 128])
    Ac = A - A.mean(0)
    scale = float(np.abs(Ac.T @ Ac).max())
    np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, rtol=0, atol=1e-8 * scale)
    # Centring the raw sums afterwards (what from_gram must do) loses everything at this offset.
    raw = A.T @ A - 3000 * np.outer(A.mean(0), A.mean(0))
    assert np.abs(raw - Ac.T @ Ac).max() > 1e-2 * scale
    f = acc.to_objective(fit_intercept=True)
    # Oracle on the explicitly centred rows (a ones column at offset 1e8 is too ill-conditioned for lstsq).
    assert f.value([0, 1]) == pytest.approx(lstsq_value(Ac, Y - Y.mean(0), [0, 1]), rel=1e-8)


def test_accumulator_takes_float32_batches_and_accumulates_in_float64():
    rng = np.random.default_rng(18)
    A = rng.standard_normal((100, 3)).astype(np.float32)
    Y = rng.standard_normal((100, 2)).astype(np.float32)
    acc = GramAccumulator(3, 2)
    for lo in range(0, 100, 7):
        acc.update(A[lo:lo + 7], Y[lo:lo + 7])
    A64, Y64 = A.astype(np.float64), Y.astype(np.float64)
    assert acc.gram().dtype == np.float64
    np.testing.assert_allclose(acc.gram(), A64.T @ A64, rtol=1e-12)
    np.testing.assert_allclose(acc.cross(), A64.T @ Y64, rtol=1e-12)


def test_accumulator_merge_and_asymmetric_targets():
    """Inputs from a 'pruned' network, targets from the 'original' one: G from A, B = A^T Y_orig."""
    rng = np.random.default_rng(6)
    A_orig = rng.standard_normal((500, 8))
    A_pruned = A_orig + 0.2 * rng.standard_normal((500, 8))
    W = rng.standard_normal((8, 4))
    Y = A_orig @ W
    a1, a2 = GramAccumulator(8, 4), GramAccumulator(8, 4)
    a1.update(A_pruned[:200], Y[:200])
    a2.update(A_pruned[200:], Y[200:])
    a1.merge(a2)
    f = a1.to_objective(groups=2)
    direct = SparseRegression(A_pruned, Y, groups=2)
    np.testing.assert_allclose(f.gram, A_pruned.T @ A_pruned, rtol=1e-12)
    np.testing.assert_allclose(f.cross, A_pruned.T @ Y, rtol=1e-12)
    for S in ([0], [1, 3], [0, 1, 2, 3]):
        want = lstsq_value(A_pruned, Y, list(f.columns_of(S)))
        assert f.value(S) == pytest.approx(want, rel=1e-10)
        assert direct.value(S) == pytest.approx(want, rel=1e-10)
    # The asymmetric objective cannot explain everything: the inputs differ from the ones that made Y.
    assert f.value([0, 1, 2, 3]) < f.y_norm2 * (1 - 1e-3)


def test_from_gram_with_intercept_matches_rows():
    rng = np.random.default_rng(7)
    A, Y = rng.standard_normal((60, 5)) + 2.0, rng.standard_normal((60, 2)) + 1.0
    f = SparseRegression.from_gram(A.T @ A, A.T @ Y, float((Y ** 2).sum()), fit_intercept=True,
                                   mean_a=A.mean(0), mean_y=Y.mean(0), count=60, ridge=0.5)
    g = SparseRegression(A, Y, fit_intercept=True, ridge=0.5)
    for S in ([0], [2, 4], [0, 1, 2, 3, 4]):
        assert f.value(S) == pytest.approx(g.value(S), rel=1e-10)
    np.testing.assert_allclose(f.refit([2, 4])[1], g.refit([2, 4])[1], rtol=1e-9)
    # One-dimensional B and targets.
    h = SparseRegression.from_gram(A.T @ A, A.T @ Y[:, 0], float((Y[:, 0] ** 2).sum()))
    assert h.n_targets == 1
    assert h.value([1, 2]) == pytest.approx(lstsq_value(A, Y[:, :1], [1, 2]), rel=1e-10)


# ---------------------------------------------------------------------------------------------- degenerate data
def test_degenerate_units_have_zero_gain_and_come_last():
    rng = np.random.default_rng(8)
    A = rng.standard_normal((50, 6))
    A[:, 1] = A[:, 0]           # duplicate
    A[:, 4] = 0.0               # dead
    Y = A @ rng.standard_normal((6, 2))
    f = SparseRegression(A, Y)
    state = f.init_state()
    assert state.gains()[4] == 0.0
    state.add(0)
    assert state.gains()[1] == 0.0          # exactly zero, not rounding noise
    path = f.greedy_path(6)
    useful = [j for j in path.selected[: path.n_useful]]
    assert path.n_useful == 4
    assert sorted(useful) in ([0, 2, 3, 5], [1, 2, 3, 5])
    assert set(path.selected[4:].tolist()) in ({1, 4}, {0, 4})
    np.testing.assert_allclose(path.gains[4:], 0.0, atol=0)
    assert path.errors[4] == pytest.approx(0.0, abs=1e-10 * f.y_norm2)
    M, _ = path.weights(6)
    cols = f.columns_of(path.selected)
    assert np.all(M[np.isin(cols, [4])] == 0.0)
    fitted = A[:, cols] @ M
    np.testing.assert_allclose(fitted, Y, atol=1e-8 * np.abs(Y).max())
    assert np.all(np.isfinite(path.values)) and np.all(np.isfinite(path.relative_errors))


def test_fewer_rows_than_columns():
    rng = np.random.default_rng(9)
    A, Y = rng.standard_normal((5, 12)), rng.standard_normal((5, 3))
    for mode in ("h", "b"):
        f = build(A, Y, None, 0.0, False, mode, 2)
        path = f.greedy_path(12)
        assert path.n_useful == 5
        assert path.values[5] == pytest.approx(f.y_norm2, rel=1e-10)
        np.testing.assert_allclose(path.gains[5:], 0.0, atol=0)
        assert np.all(np.isfinite(path.weights(12)[0]))
        np.testing.assert_allclose(A[:, f.columns_of(path.selected)] @ path.weights(12)[0], Y, atol=1e-8)


def test_refit_of_a_set_much_larger_than_the_rank():
    """Many dependent columns in one refit (the blocked path that finds them): weights 0, exact fit, no NaN."""
    rng = np.random.default_rng(19)
    A, Y = rng.standard_normal((6, 40)), rng.standard_normal((6, 2))
    f = SparseRegression(A, Y, fit_intercept=True)
    S = rng.permutation(40)
    M, b = f.refit(S)
    assert np.all(np.isfinite(M)) and np.count_nonzero(np.abs(M).sum(axis=1)) == 5   # rank of the centred rows
    np.testing.assert_allclose(A[:, f.columns_of(S)] @ M + b, Y, atol=1e-8)
    assert f.value(S) == pytest.approx(f.y_norm2, rel=1e-10)


def test_group_with_a_dependent_column_inside():
    rng = np.random.default_rng(10)
    A = rng.standard_normal((40, 5))
    A[:, 3] = A[:, 0] - A[:, 1]
    Y = rng.standard_normal((40, 2))
    groups = [[0, 1], [2, 3], [4]]
    f = SparseRegression(A, Y, groups=groups)
    state = f.init_state()
    state.add(0)
    g = state.gains()
    base = lstsq_value(A, Y, [0, 1])
    assert g[1] == pytest.approx(lstsq_value(A, Y, [0, 1, 2, 3]) - base, abs=1e-10 * f.y_norm2)
    M, _ = f.refit([0, 1])
    assert np.all(M[3] == 0.0) and np.any(M[2] != 0.0)


def test_near_singular_gram_gives_finite_results():
    rng = np.random.default_rng(11)
    A = rng.standard_normal((30, 4))
    A[:, 3] = A[:, 2] + 1e-13 * rng.standard_normal(30)     # collinear up to 1e-13: below the 1e-10 tolerance
    Y = rng.standard_normal((30, 2))
    f = SparseRegression(A, Y)
    path = f.greedy_path(4)
    for arr in (path.values, path.gains, path.errors, path.relative_errors, path.weights(4)[0]):
        assert np.all(np.isfinite(arr))
    assert path.n_useful == 3
    state = f.init_state()
    state.add(2)
    assert state.gains()[3] == 0.0


def test_zero_targets_and_zero_design():
    f = SparseRegression(np.zeros((4, 3)), np.zeros((4, 2)))
    path = f.greedy_path(3)
    assert np.all(path.values == 0) and np.all(path.relative_errors == 0)
    assert np.all(f.refit([0, 1])[0] == 0)
    f = SparseRegression(np.ones((4, 2)), np.ones(4), fit_intercept=True)   # constant columns: all dead
    assert f.greedy_path(2).n_useful == 0


def test_suppressor_shows_the_objective_is_not_submodular():
    """x1 alone explains nothing; together with x2 it explains everything (the gain of x1 grows)."""
    rng = np.random.default_rng(12)
    z, e = rng.standard_normal(200), rng.standard_normal(200)
    e -= e @ z / (z @ z) * z
    y = z
    A = np.column_stack([e, z + e])        # y = x2 - x1, x1 uncorrelated with y
    f = SparseRegression(A, y)
    assert f.submodular is False and f.monotone is True
    g_empty = f.gains([], [0])[0]
    g_after = f.gains([1], [0])[0]
    assert g_empty == pytest.approx(0.0, abs=1e-9 * f.y_norm2)
    assert g_after > 0.1 * f.y_norm2


# ---------------------------------------------------------------------------------------------- optimizer integration
def test_maximize_uses_the_state_and_matches_greedy_path():
    rng = np.random.default_rng(13)
    A = rng.standard_normal((80, 20)) @ rng.standard_normal((20, 20))
    Y = A @ rng.standard_normal((20, 4)) + rng.standard_normal((80, 4))
    f = SparseRegression(A, Y, groups=[[2 * i, 2 * i + 1] for i in range(10)])
    path = f.greedy_path(5)
    res = submod.maximize(f, 5, method="greedy")
    assert res.selected.tolist() == path.selected.tolist()
    np.testing.assert_allclose(res.values, path.values[1:], rtol=1e-9)
    lazy = submod.maximize(f, 5, method="lazy")
    assert lazy.value == pytest.approx(f.value(lazy.selected), rel=1e-9)
    sto = submod.maximize(f, 5, method="stochastic", seed=0)
    assert sto.value == pytest.approx(f.value(sto.selected), rel=1e-9)


# ---------------------------------------------------------------------------------------------- input checks
def test_inputs_are_not_modified():
    rng = np.random.default_rng(14)
    A, Y = rng.standard_normal((20, 4)), rng.standard_normal((20, 2))
    A0, Y0 = A.copy(), Y.copy()
    f = SparseRegression(A, Y, fit_intercept=True, ridge=0.1)
    f.greedy_path(4)
    f.refit([0, 1])
    G, B = A.T @ A, A.T @ Y
    G0, B0 = G.copy(), B.copy()
    g = SparseRegression.from_gram(G, B, float((Y ** 2).sum()), ridge=1.0)
    g.greedy_path(3)
    acc = GramAccumulator(4, 2)
    acc.update(A, Y)
    for x, x0 in ((A, A0), (Y, Y0), (G, G0), (B, B0)):
        np.testing.assert_array_equal(x, x0)
        assert x.flags.writeable
    with pytest.raises(ValueError):
        f.gram[0, 0] = 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"A": np.ones(3)}, "dimension"),
    ({"Y": np.ones((4, 1))}, "rows"),
    ({"A": np.array([[np.nan, 1.0]] * 5)}, "NaN"),
    ({"Y": np.full((5, 1), np.inf)}, "NaN or infinite"),
    ({"ridge": -1.0}, "ridge must be finite and >= 0"),
    ({"ridge": np.nan}, "ridge"),
    ({"groups": [[0], [0, 1]]}, "overlap"),
    ({"groups": [[0]]}, "do not cover columns \\[1\\]"),
    ({"groups": [[0], [1, 2]]}, "outside \\[0, 2\\)"),
    ({"groups": [[0], []]}, "empty"),
    ({"groups": [0, 1]}, "single integer"),
    ({"groups": [[0.5], [1]]}, "integer"),
    ({"groups": 3}, "multiple of 3"),
    ({"tol": 2.0}, "tol"),
])
def test_bad_input_is_a_clear_value_error(kwargs, match):
    args = {"A": np.ones((5, 2)), "Y": np.ones((5, 1))}
    args.update(kwargs)
    A, Y = args.pop("A"), args.pop("Y")
    with pytest.raises(ValueError, match=match):
        SparseRegression(A, Y, **args)


def _corr_lambda_min(G: np.ndarray) -> float:
    """Smallest eigenvalue of the correlation matrix D^-1/2 G D^-1/2 (zero columns left out): the oracle."""
    d = np.diag(G)
    live = d > 0
    s = 1.0 / np.sqrt(d[live])
    return float(np.linalg.eigvalsh(G[np.ix_(live, live)] * s[:, None] * s[None, :])[0])


def _indefinite_and_psd(p: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A rank-deficient PSD matrix (eigenvalues in [1, 10] and zeros) and the same with one eigenvalue -0.05."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((p, p)))[0]
    lam = np.concatenate([rng.uniform(1.0, 10.0, p // 2), np.zeros(p - p // 2)])
    psd = (Q * lam) @ Q.T
    lam[-1] = -0.05
    bad = (Q * lam) @ Q.T
    return (psd + psd.T) / 2, (bad + bad.T) / 2


def test_from_gram_refuses_an_indefinite_gram_at_any_scale():
    """A Gram matrix A^T A is PSD. An indefinite G (here the smallest eigenvalue of its correlation matrix is below
    -1e-3, far beyond rounding) is refused; multiplying G by c, or each column and row by its own factor, changes
    neither verdict (the tolerance is relative). It used to be accepted without a word."""
    psd, bad = _indefinite_and_psd()
    assert _corr_lambda_min(bad) < -1e-3 and _corr_lambda_min(psd) > -1e-12
    p = psd.shape[0]
    B, y2 = np.zeros(p), 1.0
    with pytest.raises(ValueError, match="not positive semidefinite"):
        SparseRegression.from_gram(np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        SparseRegression.from_gram(np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2), 1.0)  # zero diagonal
    d = 10.0 ** np.random.default_rng(1).uniform(-3, 3, p)   # squared column norms 12 orders of magnitude apart
    for c in (1e-100, 1e-8, 1.0, 1e8, 1e100):
        for D in (np.ones(p), d):
            SparseRegression.from_gram(c * (psd * D[:, None] * D[None, :]), B, y2)
            with pytest.raises(ValueError, match="not positive semidefinite"):
                SparseRegression.from_gram(c * (bad * D[:, None] * D[None, :]), B, y2)


def test_from_gram_accepts_float32_accumulated_grams_of_real_data():
    """Grams of real data computed in float32 (one product, or a float32 sum of per-batch Grams) are PSD only up
    to float32 rounding: the correlation matrix of the rank-deficient ones has eigenvalues below -1e-7, which
    float64 rounding never produces. They are accepted, and the objective is close to the float64 one."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits().data                   # 1797 x 64, constant (all-zero) pixels among them
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal((96, 40)) @ rng.standard_normal((40, 300)), 0.0) + 10.0
    relu[:, :5] = 0.0                                      # dead units
    relu[:, 5:10] = relu[:, 10:15]                         # duplicates; n = 96 < p = 300: rank deficient
    seen_rounding = []
    for A in (digits, relu):
        A32 = A.astype(np.float32)
        y = A @ rng.standard_normal(A.shape[1]) + rng.standard_normal(A.shape[0])
        for batches in (1, 8):
            G32 = np.zeros((A.shape[1], A.shape[1]), np.float32)
            for part in np.array_split(A32, batches):
                G32 += part.T @ part
            G = G32.astype(np.float64)
            seen_rounding.append(_corr_lambda_min(G))
            f = SparseRegression.from_gram(G, (A32.T @ y.astype(np.float32)).astype(np.float64), float(y @ y))
            exact = SparseRegression(A.astype(np.float32).astype(np.float64), y)
            S = [int(j) for j in np.argsort(-A.std(axis=0))[:3]]
            assert f.value(S) == pytest.approx(exact.value(S), rel=1e-3)
    assert min(seen_rounding) < -1e-7   # the rounding the check must tolerate did occur


def test_bad_statistics_and_calls():
    rng = np.random.default_rng(15)
    A, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    G, B, y2 = A.T @ A, A.T @ Y, float((Y ** 2).sum())
    with pytest.raises(ValueError, match="symmetric"):
        SparseRegression.from_gram(G + np.triu(np.ones((3, 3)), 1), B, y2)
    with pytest.raises(ValueError, match="square"):
        SparseRegression.from_gram(G[:2], B, y2)
    with pytest.raises(ValueError, match="shape \\(3, m\\)"):
        SparseRegression.from_gram(G, B[:2], y2)
    with pytest.raises(ValueError, match="negative"):
        SparseRegression.from_gram(G, B, -1.0)
    with pytest.raises(ValueError, match="inconsistent statistics"):
        SparseRegression.from_gram(G, B, np.sqrt(y2) / 10)
    with pytest.raises(ValueError, match="not a Gram matrix"):
        SparseRegression.from_gram(-G, B, y2)
    with pytest.raises(ValueError, match="mean_a, mean_y and count"):
        SparseRegression.from_gram(G, B, y2, fit_intercept=True)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        SparseRegression.from_gram(G, B, y2, count=0)
    f = SparseRegression(A, Y)
    with pytest.raises(ValueError, match="rule"):
        f.greedy_path(2, rule="lasso")
    with pytest.raises(ValueError, match="exceeds"):
        f.greedy_path(4)
    with pytest.raises(ValueError, match="outside"):
        f.refit([5])
    with pytest.raises(ValueError, match="repeated"):
        f.value([1, 1])
    acc = GramAccumulator(3, 2)
    with pytest.raises(ValueError, match="no rows"):
        acc.to_objective()
    with pytest.raises(ValueError, match="n_features=3"):
        acc.update(np.ones((4, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="n_targets=2"):
        acc.update(np.ones((4, 3)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="rows"):
        acc.update(np.ones((4, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((4, 3), np.nan), np.ones((4, 2)))
    with pytest.raises(ValueError, match="positive integer"):
        GramAccumulator(0, 2)
    with pytest.raises(ValueError, match="same n_features"):
        acc.merge(GramAccumulator(2, 2))
    acc.update(np.ones((0, 3)), np.ones((0, 2)))        # empty batch: a no-op
    assert acc.count == 0


def test_public_names_and_path_type():
    rng = np.random.default_rng(16)
    f = SparseRegression(rng.standard_normal((10, 3)), rng.standard_normal(10))
    path = f.greedy_path(2)
    assert isinstance(path, RegressionPath) and len(path) == 2
    assert path.values.shape == (3,) and path.errors.shape == (3,) and path.gains.shape == (2,)
    assert f.columns_of([2, 0]).tolist() == [2, 0]
    assert "SparseRegression(n=3" in repr(f)
    if hasattr(submod, "SparseRegression"):
        assert submod.SparseRegression is SparseRegression
        assert submod.GramAccumulator is GramAccumulator


@pytest.mark.slow
def test_larger_instance_against_lstsq():
    rng = np.random.default_rng(17)
    A = rng.standard_normal((600, 300)) @ rng.standard_normal((300, 300)) * 0.1
    Y = A @ rng.standard_normal((300, 40)) + rng.standard_normal((600, 40))
    for mode in ("h", "b"):
        f = build(A, Y, None, 0.0, False, mode, None)
        path = f.greedy_path(150)
        for t in (1, 37, 96, 150):
            want = lstsq_value(A, Y, list(path.selected[:t]))
            assert path.values[t] == pytest.approx(want, abs=1e-9 * f.y_norm2)


def test_from_gram_with_intercept_centres_the_target_energy():
    """With fit_intercept, from_gram's y_norm2 is ||Y - mean(Y)||^2 (not the raw ||Y||^2 it was given), so the
    residuals and relative errors of a path are those of least squares with a ones column (numpy lstsq)."""
    rng = np.random.default_rng(8)
    A, Y = rng.standard_normal((50, 4)) + 1.5, rng.standard_normal((50, 2)) + 3.0
    f = SparseRegression.from_gram(A.T @ A, A.T @ Y, float((Y ** 2).sum()), fit_intercept=True,
                                   mean_a=A.mean(0), mean_y=Y.mean(0), count=50)
    assert f.y_norm2 == pytest.approx(float(((Y - Y.mean(0)) ** 2).sum()), rel=1e-10)
    path = f.greedy_path(2)
    for k in range(3):
        X = np.hstack([A[:, path.selected[:k]], np.ones((50, 1))])
        resid = float(((Y - X @ np.linalg.lstsq(X, Y, rcond=None)[0]) ** 2).sum())
        assert path.errors[k] == pytest.approx(resid, rel=1e-9)
        assert path.relative_errors[k] == pytest.approx(resid / float(((Y - Y.mean(0)) ** 2).sum()), rel=1e-9)


def test_integer_groups_are_consecutive_blocks_of_columns():
    """groups=s makes unit u the columns s*u .. s*u + s - 1: its value is least squares on exactly those columns."""
    rng = np.random.default_rng(9)
    A, Y = rng.standard_normal((40, 6)), rng.standard_normal((40, 2))
    f = SparseRegression(A, Y, groups=2)
    assert [g.tolist() for g in f.groups] == [[0, 1], [2, 3], [4, 5]]
    for S in ([0], [2], [0, 2]):
        cols = np.concatenate([np.arange(2 * u, 2 * u + 2) for u in S])
        assert f.value(S) == pytest.approx(lstsq_value(A, Y, cols), rel=1e-10)


def test_from_gram_refuses_statistics_that_break_cauchy_schwarz_by_a_little():
    """A column equal to Y attains Cauchy-Schwarz with equality, ||B_j||^2 = G_jj ||Y||^2: a y_norm2 10% too small
    (statistics of different rows, a wrong normalisation) is impossible and must be refused."""
    rng = np.random.default_rng(10)
    y = rng.standard_normal(30)
    A = np.column_stack([y, rng.standard_normal(30)])
    SparseRegression.from_gram(A.T @ A, A.T @ y, float(y @ y))
    with pytest.raises(ValueError, match="inconsistent statistics"):
        SparseRegression.from_gram(A.T @ A, A.T @ y, 0.9 * float(y @ y))


@pytest.mark.parametrize("layout", ["C", "F", "float32", "strided"])
@pytest.mark.parametrize("method", ["greedy", "lazy", "stochastic"])
def test_no_pick_once_y_is_fully_explained(layout, method):
    """``Y = A[:, :2] W`` exactly: once the residual is 0 every true gain is 0, so greedy stops instead of picking
    more columns by rounding noise (it used to return [1, 0, 3, 2] with gains of 4e-16, and other columns for other
    memory layouts of the same data)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    Y = X[:, :2] @ np.array([[1.0], [1.0]])
    A = {"C": X, "F": np.asfortranarray(X), "float32": X.astype(np.float32),
         "strided": np.repeat(X, 2, axis=1)[:, ::2]}[layout]
    f = submod.SparseRegression(A, Y)
    res = submod.maximize(f, 5, method=method, seed=0)
    assert res.stopped_early
    assert res.value == pytest.approx(f.y_norm2, rel=1e-12)
    assert np.all(res.gains > 1e-12 * f.y_norm2)  # every pick explains a part of Y larger than rounding
    if method != "stochastic":
        assert sorted(res.selected.tolist()) == [0, 1]


def test_selector_stops_once_y_is_explained_with_or_without_intercept():
    """The same two features with and without an intercept (it used to add two noise features without one)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    y = X[:, 0] + X[:, 1]
    for fit_intercept in (True, False):
        with pytest.warns(UserWarning, match="fully explained"):
            sel = submod.SparseRegressionSelector(5, fit_intercept=fit_intercept).fit(X, y)
        assert sel.get_support(indices=True).tolist() == [0, 1]
