"""Error decay along the greedy path: measured curves below every sound bound, oracle residuals from
numpy.linalg.lstsq, preconditions flagged, contraction fitted on a closed-form instance (docs/theory.rst,
"Exponential decay of the error")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submod.sparse_regression import SparseRegression
from verification import error_decay
from verification import strategies as vst
from verification._kernels import exp_rate_bound, path_bound


def lstsq_residual(A: np.ndarray, Y: np.ndarray, cols: np.ndarray) -> float:
    if cols.size == 0:
        return float((Y ** 2).sum())
    M = np.linalg.lstsq(A[:, cols], Y, rcond=None)[0]
    return float(((Y - A[:, cols] @ M) ** 2).sum())


@settings(max_examples=30, deadline=None)
@given(data=vst.regression_data(n_units=st.integers(2, 9), group_size=st.sampled_from([1, 1, 2])),
       ridge=st.sampled_from([0.0, 0.0, 0.2]), intercept=st.booleans())
def test_measured_error_below_every_sound_bound(data, ridge, intercept):
    f = SparseRegression(data.A, data.Y, ridge=ridge, groups=data.groups, fit_intercept=intercept)
    dec = error_decay(f)
    names = [b.name for b in dec.bounds]
    assert {"a-priori spectral", "per-step spectral", "per-step path ratio"} <= set(names)
    assert any(n.startswith("bicriteria") for n in names)
    tol = 1e-9 * max(dec.y_norm2, 1e-300)
    for b in dec.bounds:
        assert b.kind == "proven upper bound"
        assert np.all(dec.errors <= b.values + tol), b.name
        assert b.holds
        assert np.all(np.diff(b.values) <= tol)  # every factor is in [0, 1]
    assert dec.all_hold
    # the residualised lambda_min is a proven lower bound on the exact path ratio toward V, step by step
    lams = np.array(dec.parameters["per_step_lambdas"])
    ratios = np.array(dec.parameters["path_ratios_to_V"])
    # a path ratio of gains far below ||Y||^2 carries their rounding (about eps * ||Y||^2 each) relative to its
    # denominator F(V \ S_t | S_t) = err(S_t) - err(V)
    denom = np.maximum(dec.errors[:ratios.size] - (dec.y_norm2 - f.value(np.arange(f.n))), 1e-300)
    assert np.all(lams <= ratios + 1e-7 + 1e3 * np.finfo(float).eps * dec.y_norm2 / denom)
    # so the per-step spectral curve is never tighter than the path-ratio curve
    np.testing.assert_array_less(dec.bound("per-step path ratio").values - tol, dec.bound("per-step spectral").values
                                 + 2 * tol)
    if ridge == 0.0 and not intercept:  # independent oracle for the measured curve
        cols = [np.asarray(data.groups[u]) if data.groups else np.array([u]) for u in dec.selected]
        for k in range(dec.kept.size):
            c = np.concatenate(cols[:k]) if k else np.zeros(0, dtype=int)
            assert dec.errors[k] == pytest.approx(lstsq_residual(data.A, data.Y, c), rel=1e-6,
                                                  abs=1e-8 * dec.y_norm2)


def test_bicriteria_comparator_error_is_evaluated_exactly_on_near_collinear_columns():
    # Columns 0-2 agree to 3e-5: incremental gains carry rounding of the size of err(T) itself. The comparator's
    # error must come from a fresh evaluation, checked here against numpy's lstsq; with the table's value (0.0)
    # the proven bound was reported as violated.
    rng = np.random.default_rng(1)
    x, z, q, w, w2 = rng.standard_normal((5, 200))
    A = np.column_stack([x, x + 3e-5 * (z + 10 * q), x + 3e-5 * q, 30 * w, 30 * w2])
    y = 2 * x + 1e-4 * z
    d = error_decay(SparseRegression(A, y))
    for comp in d.parameters["comparators"]:
        T = np.asarray(comp["T"])
        resid = y - A[:, T] @ np.linalg.lstsq(A[:, T], y, rcond=None)[0]
        assert comp["err_T"] == pytest.approx(float(resid @ resid), rel=1e-3)
    assert d.all_hold


def test_contraction_fitted_on_geometric_decay():
    # Orthonormal columns with squared coefficients rho^j: greedy picks by size, err_k = sum_{j>=k} rho^j.
    rho = 0.6
    # With 30 columns the tail sum is rho^k / (1 - rho) up to rho^30 ~ 2e-7: a geometric sequence.
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((60, 30)))
    coef = np.sqrt(rho ** np.arange(30))
    Y = Q @ coef
    dec = error_decay(SparseRegression(Q, Y), 6)
    assert dec.selected.tolist() == list(range(6))
    want = np.array([np.sum(rho ** np.arange(k, 30)) for k in range(7)])
    np.testing.assert_allclose(dec.errors, want, rtol=1e-9)
    assert dec.contraction == pytest.approx(rho, rel=1e-4)
    assert dec.contraction_points == 7
    assert dec.lambda_min == pytest.approx(1.0)
    assert dec.preconditions == []


def test_preconditions_flag_dead_duplicate_and_few_rows():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((50, 5))
    A[:, 4] = A[:, 1]
    A[:, 3] = 0.0
    Y = rng.standard_normal((50, 2))
    dec = error_decay(SparseRegression(A, Y), 3)
    text = " ".join(dec.preconditions)
    assert "dead units" in text and "[3]" in text
    assert "duplicate" in text and "(1, 4)" in text
    assert dec.lambda_min == pytest.approx(0.0, abs=1e-8)
    assert dec.bound("a-priori spectral").vacuous
    assert dec.all_hold
    few = error_decay(SparseRegression(rng.standard_normal((4, 6)), rng.standard_normal((4, 1))), 3)
    assert any("fewer samples (4) than columns (6)" in p for p in few.preconditions)


def test_path_bound_kernels_match_hand_computation():
    # err_T = 1, F(T) = 4, ratios 1 and 2 toward sets of sizes 2 and 2: factors 1/2 and 0.
    np.testing.assert_allclose(path_bound(1.0, 4.0, np.array([1.0, 2.0]), np.array([2, 2])), [5.0, 3.0, 1.0])
    b = exp_rate_bound(0.0, 1.0, 0.5, 10, 4)
    np.testing.assert_allclose(b, np.exp(-0.05 * np.arange(5)))
    # the product form is below the exponential form (THEORY: prod (1 - lam/(d-t)) <= exp(-lam k / d))
    prod = path_bound(0.0, 1.0, np.full(4, 0.5), 10 - np.arange(4))
    assert np.all(prod <= b + 1e-15)
    assert math.isclose(prod[1], 1 - 0.05)


def test_user_comparators_and_bad_input():
    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)
    dec = error_decay(f, 4, comparators=[[0, 1], np.array([2, 3, 4])], per_step_spectral=False)
    names = [b.name for b in dec.bounds]
    assert "comparator 0 (s=2)" in names and "per-step spectral" not in names
    # T = {0, 1} is exact (err 0) and the path reaches it in two steps: bound 0 from k = 2 on.
    assert dec.bound("comparator 0 (s=2)").values[2] == pytest.approx(0.0, abs=1e-9 * dec.y_norm2)
    with pytest.raises(ValueError, match="SparseRegression"):
        import submod

        error_decay(submod.Modular([1.0, 2.0]))
    with pytest.raises(ValueError, match="k_max"):
        error_decay(f, 0)
    with pytest.raises(ValueError, match="comparators"):
        error_decay(f, 2, comparators="best")


def test_plot_does_not_draw_an_exact_zero_as_an_error_of_1e16():
    """Y lies in the span of two orthogonal columns, so after two picks the residual is exactly 0, which a log axis
    cannot show. The measured curve stops where the error leaves the axis; those points are open markers at the
    floor whose legend says they are 0, on a floor line the legend explains. Before, they sat on the curve at
    1e-16, as if measured there."""
    import matplotlib.pyplot as plt

    A = np.eye(6)[:, :4] * np.array([1.0, 2.0, 3.0, 4.0])
    dec = error_decay(SparseRegression(A, A @ np.array([1.0, 1.0, 0.0, 0.0])))
    assert dec.errors.tolist()[2:] == [0.0, 0.0, 0.0] and dec.errors[1] > 0
    fig = dec.plot()
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    measured = np.asarray(lines["measured (exact)"].get_ydata(), dtype=float)
    assert np.isnan(measured[2:]).all() and np.allclose(measured[:2], dec.errors[:2] / dec.y_norm2)
    zeros = lines["measured = 0 (exact), drawn at the floor"]
    assert np.asarray(zeros.get_xdata()).tolist() == [2, 3, 4] and zeros.get_marker() == "v"
    assert any(label.startswith("plot floor 1e-16") for label in lines)
    assert ax.get_ylim()[0] < dec.PLOT_FLOOR   # the markers are inside the axes, not on their edge
    plt.close(fig)
    # errors above the floor everywhere: no floor markers or line
    rng = np.random.default_rng(0)
    B = rng.standard_normal((40, 5))
    fig = error_decay(SparseRegression(B, B @ rng.standard_normal(5) + rng.standard_normal(40))).plot()
    assert not any("floor" in ln.get_label() for ln in fig.axes[0].get_lines())
    plt.close(fig)


def test_plot_is_written_with_agg(tmp_path):
    data = vst.suppressor_data()
    dec = error_decay(SparseRegression(data.A, data.Y))
    fig = dec.plot()
    out = tmp_path / "decay.png"
    fig.savefig(out)
    assert out.stat().st_size > 1000
    assert len(fig.axes[0].lines) == 1 + len(dec.bounds) + (1 if math.isfinite(dec.contraction) else 0)


def test_wide_design_with_ridge_is_flagged_weak_not_vacuous():
    rng = np.random.default_rng(0)
    A, Y = rng.standard_normal((6, 10)), rng.standard_normal((6, 2))
    plain = error_decay(SparseRegression(A, Y), 4)
    ridged = error_decay(SparseRegression(A, Y, ridge=0.5), 4)
    assert any("fewer samples" in p and "vacuous;" in p for p in plain.preconditions)
    assert any("fewer samples" in p and "not vacuous" in p for p in ridged.preconditions)
    assert ridged.lambda_min > 0


def test_preconditions_are_found_under_a_ridge_and_with_an_intercept():
    """Dead and duplicate units are properties of the data: a ridge keeps them from making lambda_min zero, but they
    must still be listed (a ridge is prune's default); and centring leaves count - 1 dimensions, so count = columns
    with an intercept is already too few samples."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((50, 5))
    A[:, 4] = A[:, 1]      # unit 4 duplicates unit 1
    A[:, 3] = 0.0          # unit 3 is dead
    Y = rng.standard_normal((50, 2))
    dec = error_decay(SparseRegression(A, Y, ridge=0.1), 3)
    text = " ".join(dec.preconditions)
    assert "dead units" in text and "[3]" in text
    assert "duplicate" in text and "(1, 4)" in text and "not vacuous" in text
    assert dec.lambda_min > 0
    # 6 samples, 6 columns, intercept: the centred Gram has rank <= 5 (checked here with numpy)
    B = rng.standard_normal((6, 6))
    assert np.linalg.matrix_rank(B - B.mean(axis=0)) == 5
    wide = error_decay(SparseRegression(B, rng.standard_normal((6, 1)), fit_intercept=True), 3)
    assert any("fewer samples (6, less 1 for the intercept) than columns (6)" in p for p in wide.preconditions)
    assert wide.bound("a-priori spectral").vacuous


def test_a_proven_upper_bound_is_never_below_the_exact_error():
    """Where the path reaches the comparator (S_k = T, or S_d = V), the bound err(T) and the measured err_k are the
    same quantity computed in two ways; the number labelled a proven upper bound must not come out below the one
    labelled exact (by rounding: 53 such shortfalls over these 40 instances before the fix)."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
        Y = A @ rng.standard_normal((6, 2)) + rng.standard_normal((40, 2))
        dec = error_decay(SparseRegression(A, Y, fit_intercept=bool(seed % 2)))
        for b in dec.bounds:
            assert np.all(b.values >= dec.errors), (seed, b.name)
            assert b.holds


def test_a_lifted_curve_never_hides_a_failed_check():
    """The lift of a rounding shortfall stays within the tolerance of ``holds``: with ``rtol=0`` nothing is
    forgiven, so a curve that does not hold must still show the point where it falls below the measured error."""
    shortfalls = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
        Y = A @ rng.standard_normal((6, 2)) + rng.standard_normal((40, 2))
        dec = error_decay(SparseRegression(A, Y, fit_intercept=bool(seed % 2)), rtol=0.0)
        for b in dec.bounds:
            shows = bool(np.all(dec.errors <= b.values))
            assert b.holds == shows, (seed, b.name)
            shortfalls += not b.holds
    assert shortfalls > 0  # the instances do produce rounding shortfalls, so the check above is exercised


def whitened_lambda_min(blocks: list[np.ndarray]) -> float:
    """lambda_min of the Gram of orthonormal bases (QR) of each block of columns, stacked side by side."""
    Q = np.hstack([np.linalg.qr(b)[0] for b in blocks])
    return float(np.linalg.eigvalsh(Q.T @ Q)[0])


def test_spectral_bounds_follow_their_closed_forms_over_units_of_two_columns():
    """With units of two columns (d = 4 units, 8 columns): the a-priori bound is err(V) + exp(-lambda k / d) F(V)
    with lambda from orthonormal bases of each unit and d the number of UNITS; the per-step bound is
    err(V) + prod_t (1 - l_t / (d - t)) F(V) with l_t from the remaining units residualised on the picked ones
    (numpy lstsq and QR as the oracle)."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((60, 8)) @ (np.eye(8) + 0.4 * rng.standard_normal((8, 8)))
    Y = A @ rng.standard_normal((8, 2))
    f = SparseRegression(A, Y, groups=2)
    dec = error_decay(f, comparators=None, per_step_spectral=True)
    d, y2 = 4, float((Y ** 2).sum())
    units = [A[:, 2 * u:2 * u + 2] for u in range(d)]
    err_v = lstsq_residual(A, Y, np.arange(8))
    k = np.arange(d + 1)
    expected = err_v + np.exp(-whitened_lambda_min(units) * k / d) * (y2 - err_v)
    np.testing.assert_allclose(dec.bound("a-priori spectral").values, expected, rtol=1e-8, atol=1e-8 * y2)
    factors = []
    for t in range(d):
        picked = np.hstack([units[u] for u in dec.selected[:t]]) if t else np.zeros((60, 0))
        rest = [u for u in range(d) if u not in dec.selected[:t]]
        resid = [units[u] - picked @ np.linalg.lstsq(picked, units[u], rcond=None)[0] if t else units[u]
                 for u in rest]
        factors.append(1.0 - whitened_lambda_min(resid) / (d - t))
    expected = err_v + np.concatenate([[1.0], np.cumprod(factors)]) * (y2 - err_v)
    np.testing.assert_allclose(dec.bound("per-step spectral").values, expected, rtol=1e-8, atol=1e-8 * y2)


def test_nearly_collinear_units_without_a_ridge_do_not_credit_a_ridge():
    """Two units 3e-5 apart (correlation above 1 - 1e-8) are flagged as duplicates; lambda_min is then tiny but
    above the 1e-10 cut-off. With ridge=0 the consequence must not say that 'the ridge (0) keeps lambda_min
    positive' (there is no ridge): the spectral bounds are nearly vacuous. Oracle: the ridge the objective was
    built with, and the a-priori rate exp(-lambda_min k / d) computed here, which is 1 to 9 digits."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((200, 5))
    A[:, 4] = A[:, 3] + 3e-5 * rng.standard_normal(200)
    dec = error_decay(SparseRegression(A, A @ rng.standard_normal((5, 2))))
    assert 1e-10 < dec.lambda_min < 1e-8
    assert np.exp(-dec.lambda_min * 5 / 5) > 1 - 1e-8      # the a-priori contraction does nothing
    dup = [p for p in dec.preconditions if p.startswith("duplicate")]
    assert len(dup) == 1 and "(3, 4)" in dup[0]
    assert "ridge (0)" not in dup[0] and "not vacuous" not in dup[0]
    assert "nearly vacuous" in dup[0]
