"""Supervised feature selection: ``submod.SparseRegressionSelector`` against scikit-learn's selectors, in one run.

Run from the repository root (30-60 s on 2 cores; no downloads, scikit-learn's bundled data only)::

    python benchmarks/bench_feature_selection.py
    python benchmarks/bench_feature_selection.py --quick     # fewer k and no SequentialFeatureSelector

Supervised cases: select ``k`` features on a training split (70 %, ``random_state=0``), fit
``LinearRegression`` on them, report the held-out R^2 on the other 30 % and the wall time of the selection alone.

* ``diabetes``: ``load_diabetes`` (442 x 10), the disease-progression target.
* ``breast-cancer``: ``load_breast_cancer`` (569 x 30), the 0/1 label as a regression target (a linear
  probability model: what a least-squares selector optimises).
* ``synthetic``: ``make_regression(2000 x 100, 20 informative, effective_rank=20, noise=1)`` (a low-rank-plus-tail
  design) plus a noisy copy of every column (correlation about 0.9): 200 features in correlated pairs, where the
  selection rules differ most.

Selectors (all fitted on the training split only):

* ``ours greedy`` / ``ours lazy``: ``SparseRegressionSelector(k, method=...)``: forward regression (largest exact
  R^2 gain per step). On this non-submodular objective ``lazy`` evaluates every gain too (same set as greedy) and
  only records stale-bound violations, so it is not faster.
* ``SFS``: ``SequentialFeatureSelector(LinearRegression(), direction="forward", cv=3)``: forward selection by the
  cross-validated R^2 (``k * d * 3`` model fits); the slow reference. Skipped where it would exceed ~40 s.
* ``OMP``: ``OrthogonalMatchingPursuit(n_nonzero_coefs=k)`` on standardised features (OMP's rule depends on column
  scale; ours does not): the largest correlation with the residual, a weaker rule.
* ``KBest``: ``SelectKBest(f_regression, k)``: univariate F-test ranking, ignores redundancy.
* ``Lasso path``: the first ``k`` distinct features to enter ``lars_path(method="lasso")`` on standardised features
  (one full path; its time is that of the whole path, which serves every ``k``).

Column subset selection (``digits-css``): choose ``k`` of the 64 pixel columns of ``load_digits`` that best
reconstruct all 64 (``Y = X``, multi-output least squares); held-out R^2 (variance-weighted over the 64 outputs) of
the linear reconstruction from the chosen pixels. Baselines: the ``k`` highest-variance pixels and random pixels
(mean over 20 draws).

Printed ratios, per case and ``k``: time = baseline seconds / ``ours greedy`` seconds (above 1: we are faster);
quality = ``ours greedy`` R^2 - baseline R^2 (above 0: we generalise better). Times are the minimum over
``--repeat`` runs, except SequentialFeatureSelector (one run). Everything runs on one BLAS thread (the problems are
small; two threads on a shared 2-core machine only add noise).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import sklearn
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, make_regression
from sklearn.feature_selection import SelectKBest, SequentialFeatureSelector, f_regression
from sklearn.linear_model import LinearRegression, OrthogonalMatchingPursuit, lars_path
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from submod import SparseRegressionSelector

SEED = 0


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "load average n/a"


def timed(fn, repeat: int):
    """``(minimum wall time over repeat runs, last output)``."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------------------------------------- selectors
def ours(method: str):
    def select(X, y, k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # early stops are reported by the support size
            return np.flatnonzero(SparseRegressionSelector(k, method=method).fit(X, y).support_)
    return select


def sfs(X, y, k):
    sel = SequentialFeatureSelector(LinearRegression(), n_features_to_select=k, direction="forward", cv=3)
    return np.flatnonzero(sel.fit(X, y).get_support())


def omp(X, y, k):
    Xs = StandardScaler().fit_transform(X)
    return np.flatnonzero(OrthogonalMatchingPursuit(n_nonzero_coefs=k).fit(Xs, y).coef_)


def kbest(X, y, k):
    return np.flatnonzero(SelectKBest(f_regression, k=k).fit(X, y).get_support())


def lasso_entry_order(X, y):
    """Features in the order they first become non-zero along the LARS-lasso path (standardised X)."""
    Xs = StandardScaler().fit_transform(X)
    _, _, coefs = lars_path(Xs, y - y.mean(), method="lasso")
    order: list[int] = []
    for col in coefs.T:
        for j in np.flatnonzero(col):
            if j not in order:
                order.append(int(j))
    return np.array(order, dtype=np.int64)


def heldout_r2(Xtr, ytr, Xte, yte, cols) -> float:
    if len(cols) == 0:
        return 0.0
    model = LinearRegression().fit(Xtr[:, cols], ytr)
    return float(r2_score(yte, model.predict(Xte[:, cols]), multioutput="variance_weighted"))


# ---------------------------------------------------------------------------------------------- cases
def correlated_regression() -> tuple[np.ndarray, np.ndarray]:
    """``make_regression`` (2000 x 100, 20 informative, effective rank 20, noise 1) plus a noisy copy of every
    column (correlation about 0.9 with its original): 200 features in correlated pairs."""
    X, y = make_regression(n_samples=2000, n_features=100, n_informative=20, effective_rank=20, noise=1.0,
                           random_state=SEED)
    rng = np.random.default_rng(SEED)
    copies = X + 0.5 * X.std(axis=0) * rng.standard_normal(X.shape)
    return np.hstack([X, copies]), y


def datasets(quick: bool):
    X, y = load_diabetes(return_X_y=True)
    yield "diabetes", X, y, [2, 4, 6], 1e9
    X, y = load_breast_cancer(return_X_y=True)
    yield "breast-cancer", X, y.astype(float), [3, 5, 10], 1e9
    yield "synthetic", *correlated_regression(), [5, 10, 20], 10  # SequentialFeatureSelector up to k = 10 (time)


def run_supervised(name, X, y, ks, sfs_max_k, repeat, quick) -> list[tuple]:
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=SEED)
    if quick:
        ks = ks[:2]
    print(f"\n[{name}] train {Xtr.shape[0]} x {Xtr.shape[1]}, test {Xte.shape[0]}  [{load()}]")
    t_lasso, order = timed(lambda: lasso_entry_order(Xtr, ytr), repeat)
    runs = {"ours greedy": ours("greedy"), "ours lazy": ours("lazy"), "SFS (cv=3)": sfs, "OMP": omp,
            "KBest f_regression": kbest}
    table: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in [*runs, "Lasso path (entry order)"]}
    for k in ks:
        for method, fn in runs.items():
            if method.startswith("SFS") and (quick or k > sfs_max_k):
                continue
            t, cols = timed(lambda fn=fn, k=k: fn(Xtr, ytr, k), 1 if method.startswith("SFS") else repeat)
            table[method][k] = (heldout_r2(Xtr, ytr, Xte, yte, cols), t)
        table["Lasso path (entry order)"][k] = (heldout_r2(Xtr, ytr, Xte, yte, order[:k]), t_lasso)
    print_table(table, ks)
    return ratio_rows(name, table, ks)


def run_css(ks, repeat, quick) -> list[tuple]:
    X = load_digits().data
    Xtr, Xte = train_test_split(X, test_size=0.3, random_state=SEED)
    if quick:
        ks = ks[:2]
    print(f"\n[digits-css] reconstruct all 64 pixel columns from k of them; train {Xtr.shape[0]}, test "
          f"{Xte.shape[0]}  [{load()}]")
    rng = np.random.default_rng(SEED)
    table: dict[str, dict[int, tuple[float, float]]] = {"ours greedy": {}, "ours lazy": {}, "variance top-k": {},
                                                         "random (mean of 20)": {}}
    for k in ks:
        for method in ("greedy", "lazy"):
            t, cols = timed(lambda k=k, method=method: ours(method)(Xtr, Xtr, k), repeat)
            table[f"ours {method}"][k] = (heldout_r2(Xtr, Xtr, Xte, Xte, cols), t)
        t, cols = timed(lambda k=k: np.argsort(-Xtr.var(axis=0), kind="stable")[:k], repeat)
        table["variance top-k"][k] = (heldout_r2(Xtr, Xtr, Xte, Xte, cols), t)
        draws = [heldout_r2(Xtr, Xtr, Xte, Xte, rng.choice(64, size=k, replace=False)) for _ in range(20)]
        table["random (mean of 20)"][k] = (float(np.mean(draws)), float("nan"))  # no selection time to speak of
    print_table(table, ks)
    return ratio_rows("digits-css", table, ks)


# ---------------------------------------------------------------------------------------------- output
def print_table(table, ks) -> None:
    head = "".join(f"  k={k:<3d} R2    time(s)" for k in ks)
    print(f"  {'selector':<26s}{head}")
    for method, row in table.items():
        cells = "".join(f"  {row[k][0]:8.4f} {row[k][1]:9.4f}" if k in row else f"  {'-':>8s} {'-':>9s}"
                        for k in ks)
        print(f"  {method:<26s}{cells}")


def ratio_rows(name, table, ks) -> list[tuple]:
    rows = []
    ref = table["ours greedy"]
    for method, row in table.items():
        if method == "ours greedy":
            continue
        for k in ks:
            if k in row:
                r2, t = row[k]
                rows.append((name, method, k, ref[k][0] - r2, t / ref[k][1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per fast timing (the minimum is kept)")
    parser.add_argument("--quick", action="store_true", help="two k per case, no SequentialFeatureSelector")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} logical cores; Python {platform.python_version()}, "
          f"numpy {np.__version__}, scikit-learn {sklearn.__version__}")
    start = time.perf_counter()
    rows = []
    with threadpool_limits(limits=1):  # small problems: one BLAS thread is fastest and stable on a shared machine
        for name, X, y, ks, sfs_max_k in datasets(args.quick):
            rows += run_supervised(name, X, y, ks, sfs_max_k, args.repeat, args.quick)
        rows += run_css([4, 8, 16], args.repeat, args.quick)
    print("\nratios vs ours greedy: quality = ours R2 - baseline R2 (held out; > 0: ours better), "
          "time = baseline s / ours s (> 1: ours faster)")
    print(f"  {'case':<14s} {'baseline':<26s} {'k':>3s} {'quality':>9s} {'time':>9s}")
    for name, method, k, dq, rt in rows:
        speed = f"{rt:9.2f}x" if np.isfinite(rt) else f"{'n/a':>10s}"
        print(f"  {name:<14s} {method:<26s} {k:3d} {dq:+9.4f} {speed}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
