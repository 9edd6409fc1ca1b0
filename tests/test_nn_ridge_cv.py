"""Tests of the cross-validated ridge (``ridge="cv"``) and of the per-layer report (error curves, verification).

Oracles are independent: an explicit K-fold ridge regression with intercept on the raw rows (numpy.linalg.solve),
and numpy ridge regression on the captured activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nn_adapters as nna
from nn_adapters._stats import CV_GRID, PairStats, cv_ridge, ridge_refit
from submod.sparse_regression import GramAccumulator

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _kfold_oracle(A: np.ndarray, Y: np.ndarray, sample_of_row: np.ndarray, cols: np.ndarray, K: int,
                  prior: np.ndarray | None = None, w: np.ndarray | None = None) -> np.ndarray:
    """Held-out relative error of ridge-with-intercept for every grid value, by brute force on the rows.

    ``prior``: the ridge pulls ``M`` toward it (``min sum_t w_t ||y_t - M^T a_t - b||^2 + lam ||M - prior||^2``,
    solved from its normal equations); ``w``: row weights (weighted means, weighted squared errors).
    """
    fold = sample_of_row % K
    w = np.ones(len(A)) if w is None else w
    M0 = np.zeros((cols.size, Y.shape[1])) if prior is None else prior
    out = []
    for g in CV_GRID:
        err = energy = 0.0
        for h in range(K):
            tr, te = fold != h, fold == h
            wt = w[tr]
            mt = wt @ A[tr] / wt.sum()
            scale = np.mean((wt[:, None] * (A[tr] - mt) ** 2).sum(0))   # ridge relative to the mean centred diagonal
            X = A[tr][:, cols] - mt[cols]
            yt = wt @ Y[tr] / wt.sum()
            lhs = (X * wt[:, None]).T @ X + g * scale * np.eye(cols.size)
            M = np.linalg.solve(lhs, (X * wt[:, None]).T @ (Y[tr] - yt) + g * scale * M0)
            b = yt - mt[cols] @ M
            err += (w[te][:, None] * (Y[te] - A[te][:, cols] @ M - b) ** 2).sum()
            energy += (w[te][:, None] * (Y[te] - yt) ** 2).sum()
        out.append(err / energy)
    return np.array(out)


def test_cv_ridge_matches_kfold_oracle_linear():
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
    pair = nna.find_pairs(net, torch.zeros(2, 6))[0][0]
    with torch.no_grad():
        h = torch.relu(net[0](torch.randn(23, 6)))
    st = PairStats(pair, net[2], folds=5)
    st.update(h[:7])          # two batches: the round-robin fold assignment continues across batches
    st.update(h[7:])
    A = h.double().numpy()
    Y = A @ net[2].weight.detach().double().numpy().T
    units = np.array([1, 4, 5, 8])
    best, rel = st.cv_ridge(units)
    want = _kfold_oracle(A, Y, np.arange(23), units, 5)
    np.testing.assert_allclose(rel, want, rtol=1e-8)
    assert best == CV_GRID[int(np.argmin(want))]


def test_cv_ridge_matches_kfold_oracle_conv_keeps_the_patches_of_a_sample_together():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2, stride=2)).eval()
    pair = nna.find_pairs(net, torch.zeros(2, 2, 6, 6))[0][0]
    with torch.no_grad():
        h = torch.relu(net[0](torch.randn(11, 2, 6, 6)))
    st = PairStats(pair, net[2], folds=3)
    st.update(h)
    cols = F.unfold(h.double(), 2, stride=2)                          # (N, C*4, L)
    L = cols.shape[2]
    A = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
    Y = A @ net[2].weight.detach().double().reshape(3, -1).numpy().T
    units = np.array([0, 2, 3])
    col_idx = np.concatenate([np.arange(4 * u, 4 * u + 4) for u in units])
    _, rel = st.cv_ridge(units)
    np.testing.assert_allclose(rel, _kfold_oracle(A, Y, np.repeat(np.arange(11), L), col_idx, 3), rtol=1e-8)


@pytest.mark.parametrize("refit_prior", ["original", "zero"])
def test_cv_refit_equals_ridge_regression_with_the_reported_ridge(refit_prior):
    net = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    x = torch.randn(30, 5)                     # 30 samples < 40 columns: the refit needs a ridge
    pruned, rep = nna.prune(net, x, keep=0.9, method="layer", refit_prior=refit_prior)
    lay = rep.layers[0]
    assert lay.ridge_choice == "5-fold cv" and lay.ridge in CV_GRID
    assert lay.cv_relative_error is not None and lay.cv_relative_error >= 0
    with torch.no_grad():
        A = torch.relu(net[0](x)).double().numpy()
    W = net[2].weight.detach().double().numpy()
    Y = A @ W.T
    kept = lay.kept_units
    M0 = W[:, kept].T if refit_prior == "original" else np.zeros((len(kept), 3))
    mu = A.mean(0)
    lam = lay.ridge * np.mean(((A - mu) ** 2).sum(0))
    X = A[:, kept] - mu[kept]
    M = np.linalg.solve(X.T @ X + lam * np.eye(len(kept)), X.T @ (Y - Y.mean(0)) + lam * M0)
    b = Y.mean(0) - mu[kept] @ M
    np.testing.assert_allclose(pruned[2].weight.detach().double().numpy(), M.T, atol=1e-4)
    np.testing.assert_allclose(pruned[2].bias.detach().double().numpy(),
                               net[2].bias.detach().double().numpy() + b, atol=1e-4)
    resid = ((Y - A[:, kept] @ M - b) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
    assert lay.relative_error == pytest.approx(resid, rel=1e-6, abs=1e-9)


def test_cv_with_prior_and_row_weights_matches_kfold_oracle():
    """The shared CV kernel (used by the transformer adapter too) with a prior and weighted rows, against the
    brute-force K-fold fit of the penalised, weighted normal equations; and the refit at the chosen ridge."""
    rng = np.random.default_rng(4)
    n, d, m, K = 60, 9, 3, 4
    A = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0
    Y = A @ rng.standard_normal((d, m)) + 0.3 * rng.standard_normal((n, m))
    w = rng.uniform(0.2, 3.0, n)
    sample = np.repeat(np.arange(n // 3), 3)          # three rows per "sentence", one fold per sentence
    folds = [GramAccumulator(d, m) for _ in range(K)]
    for h in range(K):
        rows = sample % K == h
        folds[h].update(A[rows], Y[rows], sample_weight=w[rows])
    cols = np.array([0, 2, 3, 7])
    prior = rng.standard_normal((cols.size, m))
    for M0 in (None, prior):
        best, rel = cv_ridge(folds, cols, CV_GRID, M0)
        want = _kfold_oracle(A, Y, sample, cols, K, M0, w)
        np.testing.assert_allclose(rel, want, rtol=1e-8)
        assert best == CV_GRID[int(np.argmin(want))]
    total = GramAccumulator(d, m)
    for f in folds:
        total.merge(f)
    M, b, rel_in = ridge_refit(total, cols, 0.1, prior)
    mu, my = w @ A / w.sum(), w @ Y / w.sum()
    lam = 0.1 * np.mean((w[:, None] * (A - mu) ** 2).sum(0))
    X = A[:, cols] - mu[cols]
    want = np.linalg.solve((X * w[:, None]).T @ X + lam * np.eye(cols.size),
                           (X * w[:, None]).T @ (Y - my) + lam * prior)
    np.testing.assert_allclose(M, want, rtol=1e-9)
    np.testing.assert_allclose(b, my - mu[cols] @ want, rtol=1e-9, atol=1e-12)
    resid = (w[:, None] * (Y - A[:, cols] @ M - b) ** 2).sum() / (w[:, None] * (Y - my) ** 2).sum()
    assert rel_in == pytest.approx(resid, rel=1e-9)
    assert 0 < rel.min() < 1


def test_cv_shrinks_more_when_samples_are_scarce():
    """Held-out error, not in-sample error, picks the ridge: with fewer samples than columns and noisy targets the
    chosen ridge is larger than with many samples, and the held-out estimate exceeds the in-sample error."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 60), nn.Tanh(), nn.Linear(60, 4)).eval()
    x_many, x_few = torch.randn(2000, 8, generator=g), torch.randn(40, 8, generator=g)
    # asym with a pruned first layer is the noisy case (targets outside the span of the kept units)
    ridges = {}
    for name, x in (("many", x_many), ("few", x_few)):
        _, rep = nna.prune(net, x, keep={"0->2": 0.5, "2->4": 0.8}, method="asym")
        ridges[name] = rep.layers[1]
    assert ridges["few"].ridge > ridges["many"].ridge
    assert ridges["few"].cv_relative_error > ridges["few"].relative_error


def test_too_few_samples_fall_back_to_a_fixed_ridge_and_say_so():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    _, rep = nna.prune(net, torch.randn(3, 4), keep=0.5)
    assert rep.layers[0].ridge == pytest.approx(1e-3)
    assert "too few samples" in rep.layers[0].ridge_choice and rep.layers[0].cv_relative_error is None


@pytest.mark.parametrize("bad", ["auto", -1.0, float("nan"), True])
def test_bad_ridge_is_rejected(bad):
    with pytest.raises(ValueError, match="ridge must be 'cv'"):
        nna.prune(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(20, 4), keep=0.5,
                  ridge=bad)


def test_error_curve_is_the_nested_greedy_path():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(200, 6)
    _, rep = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    lay = rep.layers[0]
    curve = np.array(lay.error_curve)
    assert curve.shape == (lay.kept + 1,) and curve[0] == pytest.approx(1.0)
    assert np.all(np.diff(curve) <= 1e-12)
    # independent check of every prefix: plain lstsq with intercept on the captured activations
    with torch.no_grad():
        A = torch.relu(net[0](x)).double().numpy()
    Y = A @ net[2].weight.detach().double().numpy().T
    Yc = Y - Y.mean(0)
    for j in range(1, lay.kept + 1):
        D = np.hstack([A[:, lay.pick_order[:j]], np.ones((len(A), 1))])
        r = Y - D @ np.linalg.lstsq(D, Y, rcond=None)[0]
        assert curve[j] == pytest.approx((r ** 2).sum() / (Yc ** 2).sum(), rel=1e-6, abs=1e-10)
    assert curve[-1] == pytest.approx(lay.relative_error, rel=1e-6, abs=1e-10)
    assert "greedy-path rel. objective" in rep.summary()


def test_verify_labels_every_number_and_the_bound_holds():
    pytest.importorskip("verification")
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    _, rep = nna.prune(net, torch.randn(150, 6), keep=0.5, method="asym", ridge=0.0, verify=True)
    for lay in rep.layers:
        v = lay.verification
        assert v["lambda_min"][1] == "proven lower bound" and v["lambda_min"][0] >= 0
        assert v["rel_err_at_k"][1] == "exact" and v["contraction"][1] == "estimate"
        assert v["bound_rel_err_at_k"][1] == "proven upper bound"
        assert v["rel_err_at_k"][0] <= v["bound_rel_err_at_k"][0] + 1e-9
        assert v["rel_err_at_k"][0] == pytest.approx(lay.error_curve[-1], rel=1e-6, abs=1e-10)
    assert "[proven upper bound]" in rep.summary()
    # every unit kept: the bound is err(V) and the measured error err(S_d) = err(V); the proven upper bound must
    # not be below the exact number (it was, by rounding)
    for seed in range(1, 5):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        _, rep_all = nna.prune(net, torch.randn(150, 6), keep=1.0, method="asym", ridge=0.0, verify=True)
        for lay in rep_all.layers:
            assert lay.verification["rel_err_at_k"][0] <= lay.verification["bound_rel_err_at_k"][0]
    _, rep = nna.prune(net, torch.randn(150, 6), keep=0.5, method="random")
    assert all(lay.verification is None and lay.error_curve is None for lay in rep.layers)


def test_verify_covers_wide_layers_and_says_why_it_skips(monkeypatch):
    """A layer of 100 units is verified (the bound holds on it); a convolution's objective counts 9 columns a channel
    against the limit, and a layer over it says so."""
    pytest.importorskip("verification")
    import nn_adapters.pruning as pruning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 100), nn.ReLU(), nn.Linear(100, 3)).eval()
    _, rep = nna.prune(net, torch.randn(300, 6), keep=0.5, method="asym", verify=True)
    v = rep.layers[0].verification
    assert "skipped" not in v and v["rel_err_at_k"][0] <= v["bound_rel_err_at_k"][0] + 1e-12
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(40, 1, 6, 6)
    for limit, skipped in ((71, True), (72, False)):
        monkeypatch.setattr(pruning, "VERIFY_MAX_COLUMNS", limit)
        _, rep = nna.prune(conv, x, keep=0.5, method="layer", verify=True)
        v = rep.layers[0].verification
        assert (v.get("skipped") == ("72 columns > 71", "n/a")) == skipped and ("lambda_min" in v) != skipped


def test_verify_lists_dead_and_duplicate_units_with_the_default_ridge():
    """With ridge="cv" (the default) the selection has a ridge; the dead and the duplicated unit must still be
    reported among the preconditions."""
    pytest.importorskip("verification")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[0].bias[1] = -1.0                            # unit 1: always 0 after the ReLU
        net[0].weight[5] = net[0].weight[4]
        net[0].bias[5] = net[0].bias[4]                  # unit 5: a copy of unit 4
    _, rep = nna.prune(net, torch.randn(200, 5, dtype=torch.float64), keep=0.5, method="layer", verify=True)
    pre, kind = rep.layers[0].verification["preconditions"]
    assert kind == "n/a"
    assert "dead units" in pre and "[1]" in pre
    assert "duplicate" in pre and "(4, 5)" in pre


def test_selection_ridge_rebuilds_the_verified_objective():
    """The verification numbers are about the selection objective, whose ridge (cross-validated with the default
    ridge="cv") differs from the refit's: the report must give it, so that a user can rebuild that objective. The
    oracle: ridge least squares with intercept by numpy lstsq on the hidden activations, stacked with
    sqrt(lam) I."""
    pytest.importorskip("verification")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(60, 5, dtype=torch.float64)
    _, rep = nna.prune(net, x, keep=0.5, method="layer", verify=True)
    lay = rep.layers[0]
    assert lay.selection_ridge is not None and lay.selection_ridge > 0
    with torch.no_grad():
        A = torch.relu(net[0](x)).numpy()
    Y = A @ net[2].weight.detach().numpy().T
    Ac, Yc = A - A.mean(axis=0), Y - Y.mean(axis=0)
    lam = lay.selection_ridge * float(np.mean((Ac ** 2).sum(axis=0)))
    S = np.asarray(lay.pick_order)
    X = np.vstack([Ac[:, S], np.sqrt(lam) * np.eye(S.size)])
    T = np.vstack([Yc, np.zeros((S.size, Y.shape[1]))])
    resid = T - X @ np.linalg.lstsq(X, T, rcond=None)[0]
    want = float((resid ** 2).sum() / (Yc ** 2).sum())
    assert lay.verification["rel_err_at_k"][0] == pytest.approx(want, rel=1e-8)
    assert lay.error_curve[-1] == pytest.approx(want, rel=1e-8)
    assert f"selection ridge {lay.selection_ridge:.0e}" in rep.summary()


def test_bad_refit_prior_is_rejected():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with pytest.raises(ValueError, match="refit_prior must be 'original'"):
        nna.prune(net, torch.randn(20, 4), keep=0.5, refit_prior="weights")


def test_infinite_ridge_is_the_limit_of_growing_ridges():
    """``ridge=inf`` with a prior keeps the prior and refits the bias from the means: the limit of large ridges."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 6)) + 1.0
    Y = A @ rng.standard_normal((6, 3)) + rng.standard_normal((40, 3))
    acc = GramAccumulator(6, 3)
    acc.update(A, Y)
    cols = np.array([0, 2, 5])
    prior = rng.standard_normal((3, 3))
    M, b, rel = ridge_refit(acc, cols, np.inf, prior)
    M_big, b_big, rel_big = ridge_refit(acc, cols, 1e12, prior)
    np.testing.assert_array_equal(M, prior)
    np.testing.assert_allclose(b, Y.mean(0) - A[:, cols].mean(0) @ prior, rtol=1e-12)
    np.testing.assert_allclose(b, b_big, rtol=1e-9)
    np.testing.assert_allclose(rel, rel_big, rtol=1e-9)
    with pytest.raises(ValueError, match="prior"):
        ridge_refit(acc, cols, np.inf)


def _net_with_constant_units() -> nn.Sequential:
    """A 2-layer MLP whose hidden units 5..7 are constant (zero weights, positive bias): they carry no signal."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[0].weight[5:] = 0.0
        net[0].bias[5:] = torch.tensor([0.5, 1.0, 2.0])
    return net


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_trained_weights_are_kept_when_they_reproduce_the_targets(method):
    """Every unit of the first pair kept (its inputs are unchanged): the refit toward the trained weights cannot
    improve on them, so no ridge is cross-validated and the layer keeps its trained weights."""
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(60, 6)
    pruned, rep = nna.prune(net, x, keep={"0->2": 1.0, "2->4": 0.5}, method=method)
    first, second = rep.layers
    assert first.kept == 12 and first.ridge is None and first.cv_relative_error is None
    assert first.ridge_choice.startswith("none: the trained weights")
    assert first.relative_error < 1e-12
    # the consumer of the first pair is the producer of the second: its kept rows are the trained rows
    torch.testing.assert_close(pruned[2].weight, net[2].weight[second.kept_units], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pruned[2].bias, net[2].bias[second.kept_units], rtol=1e-6, atol=1e-7)
    assert second.ridge is not None and second.ridge_choice == "5-fold cv"   # a real refit is cross-validated
    # the ordinary ridge (toward zero) does change the weights, so it is still cross-validated
    _, rep0 = nna.prune(net, x, keep={"0->2": 1.0, "2->4": 0.5}, method=method, refit_prior="zero")
    assert rep0.layers[0].ridge_choice == "5-fold cv" and rep0.layers[0].ridge is not None
    # a fixed ridge is the caller's choice and is used as given
    _, rep1 = nna.prune(net, x, keep={"0->2": 1.0, "2->4": 0.5}, method=method, ridge=1e-3)
    assert rep1.layers[0].ridge == 1e-3 and rep1.layers[0].ridge_choice == "fixed"


def test_removing_constant_units_moves_their_contribution_into_the_bias():
    """Removing units with constant activations loses nothing: the kept trained weights and a bias corrected from
    the means reproduce the original network's outputs (oracle: the original network itself)."""
    net = _net_with_constant_units()
    x = torch.randn(80, 6)
    pruned, rep = nna.prune(net, x, keep={"0->2": 5 / 8, "2->4": 1.0}, method="layer")
    first = rep.layers[0]
    assert sorted(first.kept_units) == [0, 1, 2, 3, 4]      # the constant units are worth nothing to the greedy
    assert first.ridge is None and first.ridge_choice.startswith("none")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)
        z = torch.randn(20, 6) * 3                           # new inputs: exact, not fitted to the calibration set
        torch.testing.assert_close(pruned(z), net(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_repeated_calibration_samples_share_a_fold_so_repeating_the_data_changes_nothing(method):
    """Copies of a sample go to the fold of its first occurrence: every fold of ``cat([x, x])`` then holds exactly
    twice the statistics of the same fold of ``x``, and the cross-validation (relative errors and ridges) must
    choose as for ``x``. With 101 samples dealt round-robin, the copies would land in other folds and be scored as
    held-out samples (held-out error equal to the in-sample one, ridge at the grid minimum)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(101, 1, 8, 8)
    _, once = nna.prune(net, x, keep=0.5, method=method)
    _, twice = nna.prune(net, [x[:60], torch.cat([x[60:], x])], keep=0.5, method=method)
    for a, b in zip(once.layers, twice.layers, strict=True):
        assert a.kept_units == b.kept_units and a.ridge == b.ridge
        assert b.cv_relative_error == pytest.approx(a.cv_relative_error, rel=1e-6)


def _scarce_rows_case(seed: int = 5, n: int = 16, d: int = 40, m: int = 3, K: int = 4):
    """Fewer calibration rows (16) than half the columns (40): the training Grams are rank-deficient."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + rng.standard_normal((n, d)) + 1.5
    Y = A @ rng.standard_normal((d, m)) + 0.2 * rng.standard_normal((n, m))
    w = rng.uniform(0.5, 2.0, n)
    sample = np.repeat(np.arange(n // 2), 2)          # two rows per sample, one fold per sample
    folds = [GramAccumulator(d, m) for _ in range(K)]
    for h in range(K):
        rows = sample % K == h
        folds[h].update(A[rows], Y[rows], sample_weight=w[rows])
    return rng, A, Y, w, sample, folds


def test_cv_with_fewer_rows_than_columns_matches_kfold_oracle():
    """The range-only path (pivoted Cholesky factors of the folds, thin SVD of the training factors) against the
    brute-force K-fold on the raw rows, with row weights, with and without a prior."""
    rng, A, Y, w, sample, folds = _scarce_rows_case()
    cols = np.arange(3, 39)                            # 36 columns, 16 rows
    prior = rng.standard_normal((cols.size, Y.shape[1]))
    for M0 in (None, prior):
        best, rel = cv_ridge(folds, cols, CV_GRID, M0)
        want = _kfold_oracle(A, Y, sample, cols, len(folds), M0, w)
        np.testing.assert_allclose(rel, want, rtol=1e-7)
        assert best == CV_GRID[int(np.argmin(want))]


def test_cv_with_fewer_rows_than_columns_decomposes_no_column_sized_matrix(monkeypatch):
    """With 16 rows for 40 columns no 40 x 40 eigendecomposition is needed (it was the cost of pruning wide layers
    from a few samples): only the folds' ranks enter the decompositions."""
    _, A, Y, w, sample, folds = _scarce_rows_case()
    cols = np.arange(40)
    shapes: list[tuple] = []

    def watched(real):
        def decompose(a, *args, **kwargs):
            shapes.append(np.shape(a))
            return real(a, *args, **kwargs)
        return decompose

    for name in ("eigh", "svd", "eig", "eigvalsh"):
        monkeypatch.setattr(np.linalg, name, watched(getattr(np.linalg, name)))
    _, rel = cv_ridge(folds, cols)
    assert shapes, "no decomposition was observed: the watch is not where the kernel decomposes"
    assert all(min(s[-2:]) < 16 for s in shapes), shapes   # never 40 x 40: the smaller side is at most the rank
    np.testing.assert_allclose(rel, _kfold_oracle(A, Y, sample, cols, len(folds), None, w), rtol=1e-7)


def test_cv_with_fewer_rows_than_columns_in_pruning_matches_kfold_oracle():
    """End to end through PairStats: a 64-unit layer pruned from 12 samples (the conv->linear shape of the demo at
    a larger width) cross-validates as the brute-force K-fold does."""
    net = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    pair = nna.find_pairs(net, torch.zeros(2, 6))[0][0]
    with torch.no_grad():
        h = torch.relu(net[0](torch.randn(12, 6)))
    st = PairStats(pair, net[2], folds=3)
    st.update(h)
    A = h.double().numpy()
    Y = A @ net[2].weight.detach().double().numpy().T
    units = np.arange(0, 64, 2)                        # 32 columns, 12 rows
    best, rel = st.cv_ridge(units)
    want = _kfold_oracle(A, Y, np.arange(12), units, 3)
    np.testing.assert_allclose(rel, want, rtol=1e-7)
    assert best == CV_GRID[int(np.argmin(want))]


def test_cv_with_fewer_rows_than_columns_keeps_columns_far_smaller_than_the_largest():
    """The pivoted Cholesky cut-off (``c * eps`` of the largest pivot) must not drop columns only because another
    column is a million times larger: here 999 small columns share the direction that drives ``Y`` (their sum is
    a direction of the Gram far above the smallest ridge), and dropping them from the held-out Gram made the
    held-out error 2% too small at c = 1000 (78% at c = 2000). Oracle: the kernel form of the K-fold ridge."""
    rng = np.random.default_rng(0)
    n, c, K = 24, 1000, 4
    A = np.outer(rng.standard_normal(n), np.ones(c)) * 0.5 + 1e-4 * rng.standard_normal((n, c))
    A[:, 0] = 1e6 * rng.standard_normal(n)
    Y = (A[:, 1:].sum(1) / c)[:, None] * np.array([[1.0, -2.0]]) + 1e-3 * rng.standard_normal((n, 2))
    fold = np.arange(n) % K
    folds = [GramAccumulator(c, 2) for _ in range(K)]
    for h in range(K):
        folds[h].update(A[fold == h], Y[fold == h])
    want = []
    for g in CV_GRID:
        err = energy = 0.0
        for h in range(K):
            tr, te = fold != h, fold == h
            mt, yt = A[tr].mean(0), Y[tr].mean(0)
            X = A[tr] - mt
            alpha = np.linalg.solve(X @ X.T + g * np.mean((X ** 2).sum(0)) * np.eye(tr.sum()), Y[tr] - yt)
            err += ((Y[te] - (A[te] - mt) @ (X.T @ alpha) - yt) ** 2).sum()
            energy += ((Y[te] - yt) ** 2).sum()
        want.append(err / energy)
    best, rel = cv_ridge(folds, np.arange(c))
    np.testing.assert_allclose(rel, want, rtol=1e-6)
    assert best == CV_GRID[int(np.argmin(want))]


class _TokenMLP(nn.Module):
    """An MLP on every token of ``(B, T, 4)`` inputs, with the tokens moved into the batch dim first
    (``reshape(B * T, C)``, as MobileViT moves its patches), or kept as ``(B, T, C)`` (``flat=False``)."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        self.flat = flat
        self.emb, self.fc1 = nn.Linear(4, 16), nn.Linear(16, 32)
        self.fc2, self.head = nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.emb(x)
        if self.flat:
            h = h.reshape(b * t, -1)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.reshape(b, t, -1).mean(1))


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_tokens_moved_into_the_batch_dim_keep_their_sample_s_fold(method):
    """With ``(B * T, C)`` at the consumer, each sample's T rows go to its fold, exactly as with ``(B, T, C)``: the
    same cross-validated ridge and errors, kept units and weights. (It raised 'the fold plan has 64' before.)"""
    torch.manual_seed(0)
    flat, tokens = _TokenMLP(True).eval(), _TokenMLP(False).eval()
    tokens.load_state_dict(flat.state_dict())
    x = torch.randn(64, 5, 4)
    a, ra = nna.prune(flat, x, keep=0.5, method=method)
    b, rb = nna.prune(tokens, x, keep=0.5, method=method)
    for la, lb in zip(ra.layers, rb.layers, strict=True):
        assert (la.kept_units, la.ridge) == (lb.kept_units, lb.ridge)
        np.testing.assert_allclose(la.cv_relative_error, lb.cv_relative_error, rtol=1e-9)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_a_consumer_with_rows_that_do_not_divide_into_the_samples_is_refused():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x.reshape(-1, 4)[1:])))  # one row dropped: rows are not per sample

    with pytest.raises(ValueError, match="not a multiple of them"):
        nna.prune(Odd(), torch.randn(32, 3, 4), keep=0.5, method="layer")
