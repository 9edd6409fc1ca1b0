"""Speed of greedy forward regression in Gram space (``submod.SparseRegression``), as ratios measured in one run.

Run from the repository root::

    python benchmarks/bench_sparse_regression.py            # all cases (several minutes on 2 cores)
    python benchmarks/bench_sparse_regression.py --cases a  # one case: a, b or c

Cases
-----
(a) single columns (a transformer FFN layer): N = 8192 rows, d = 1536 columns, m = 384 targets, k = 768 picks.
    Ratio = greedy selection time from the statistics / time to form G = A^T A from the rows (target <= 1.0).
(b) groups (a 3x3 convolution): 512 channels x 9 columns, m = 512, k = 256 channels, N = 8192 rows.
    Ratio = selection time / time to form G (target <= 2.0).
(c) baselines at sizes where they finish: the naive rule (one ``numpy.linalg.lstsq`` per candidate per step) and the
    published implementation's rule (every candidate projected on the residual over all N rows, one candidate at a
    time, in Python). Both pick the same units as the Gram-space greedy (checked). Ratios are baseline time / our
    time, with our time either the selection from the statistics or the whole run from the rows (forming G and B
    included). All of case (c) runs on one BLAS thread (the baselines make many small BLAS calls, which
    multi-threaded OpenBLAS slows down badly on a loaded machine; this keeps the comparison fair to them).

Every time is the minimum over ``--repeat`` runs (the least noisy estimate on a shared machine). The machine has
2 cores shared with other jobs: rerun when the load is high; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

import submod
from submod.sparse_regression import SparseRegression

_maximize = getattr(submod, "maximize", None)


def best_time(fn, repeat: int, *args) -> tuple[float, object]:
    """Minimum wall time of ``fn(*args)`` over ``repeat`` runs, and its last output."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "load average n/a"


def gram(A: np.ndarray) -> np.ndarray:
    return A.T @ A


def ours_from_rows(A: np.ndarray, Y: np.ndarray, k: int):
    return SparseRegression(A, Y).greedy_path(k)


def case_selection(name: str, n_rows: int, d: int, m: int, k: int, group: int, repeat: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_rows, d))
    # Correlated, low-rank-ish targets like a consumer layer's outputs, plus noise.
    Y = A @ (rng.standard_normal((d, m)) / np.sqrt(d)) + 0.1 * rng.standard_normal((n_rows, m))
    t_gram, G = best_time(gram, repeat, A)
    with threadpool_limits(1):
        t_gram1, _ = best_time(gram, repeat, A)
    B = A.T @ Y
    y2 = float(np.vdot(Y, Y))
    A = Y = None                                    # free the rows: selection only needs the statistics
    groups = None if group == 1 else group
    f = SparseRegression.from_gram(G, B, y2, groups=groups)
    t_sel, path = best_time(f.greedy_path, repeat, k)
    print(f"({name}) N={n_rows} d={d} ({f.n} units x {group} columns) m={m} k={k}  [{load()}]")
    print(f"    form G = A^T A from the rows : {t_gram:8.3f} s   (default BLAS threads; {t_gram1:.3f} s on 1 thread)")
    print(f"    greedy_path(k) from G, B     : {t_sel:8.3f} s   ratio selection / form G = {t_sel / t_gram:.3f}"
          f"   (vs form G on 1 thread: {t_sel / t_gram1:.3f})")
    if _maximize is not None:
        t_max, res = best_time(_maximize, 1, f, k)
        same = np.array_equal(res.selected, path.selected)
        print(f"    submod.maximize(f, k)        : {t_max:8.3f} s   ratio / form G = {t_max / t_gram:.3f}"
              f"   (same picks as greedy_path: {same})")
    print(f"    relative error after k picks: {path.relative_errors[-1]:.4f}")


# ---------------------------------------------------------------------------------------------- baselines
def naive_greedy(A: np.ndarray, Y: np.ndarray, k: int) -> list[int]:
    """Forward regression by definition: one least-squares solve per candidate per step."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_j = -np.inf, -1
        for j in range(A.shape[1]):
            if j in chosen:
                continue
            X = A[:, chosen + [j]]
            coef = np.linalg.lstsq(X, Y, rcond=None)[0]
            value = -float(((Y - X @ coef) ** 2).sum())
            if value > best:
                best, best_j = value, j
        chosen.append(best_j)
    return chosen


def published_rule_greedy(A: np.ndarray, Y: np.ndarray, k: int) -> list[int]:
    """The published implementation's rule: each candidate projected on the residual over all N rows, in Python.

    Keeps an orthonormal basis Q of the selected columns and the residual R = Y - Q Q^T Y; for every candidate j,
    r_j = a_j - Q Q^T a_j and gain_j = ||r_j^T R||^2 / ||r_j||^2, one candidate at a time.
    """
    n, d = A.shape
    Q = np.zeros((n, 0))
    R = Y.copy()
    chosen: list[int] = []
    for _ in range(k):
        best, best_j, best_r = -np.inf, -1, None
        for j in range(d):
            if j in chosen:
                continue
            r = A[:, j] - Q @ (Q.T @ A[:, j])
            nr = float(r @ r)
            if nr <= 1e-12 * float(A[:, j] @ A[:, j]):
                continue
            gain = float(((r @ R) ** 2).sum()) / nr
            if gain > best:
                best, best_j, best_r = gain, j, r / np.sqrt(nr)
        chosen.append(best_j)
        Q = np.column_stack([Q, best_r])
        R = R - np.outer(best_r, best_r @ R)
    return chosen


def case_baselines(sizes: list[tuple[int, int, int, int, bool]], repeat: int) -> None:
    for n_rows, d, m, k, with_naive in sizes:
        rng = np.random.default_rng(1)
        A = rng.standard_normal((n_rows, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d))
        Y = A @ rng.standard_normal((d, m)) + rng.standard_normal((n_rows, m))

        f = SparseRegression(A, Y)
        with threadpool_limits(1):      # everything on one BLAS thread: fair to the baselines' small BLAS calls
            t_sel, path = best_time(f.greedy_path, max(repeat, 5), k)
            t_rows, _ = best_time(ours_from_rows, max(repeat, 3), A, Y, k)
            t_pub, sel_pub = best_time(published_rule_greedy, 1, A, Y, k)
        ours = path.selected.tolist()
        print(f"(c) N={n_rows} d={d} m={m} k={k}  [{load()}]  published rule picks the same units: {sel_pub == ours}")
        print(f"    ours: selection from G, B {t_sel * 1e3:8.2f} ms;  from the rows (G, B formed) "
              f"{t_rows * 1e3:8.2f} ms")
        if with_naive:
            with threadpool_limits(1):
                t_naive, sel_naive = best_time(naive_greedy, 1, A, Y, k)
            print(f"    naive (lstsq per candidate per step) {t_naive:7.3f} s   ratio vs selection "
                  f"{t_naive / t_sel:9.0f}x   vs from rows {t_naive / t_rows:7.0f}x   "
                  f"(same picks: {sel_naive == ours})")
        print(f"    published rule (Python loop, N rows) {t_pub:7.3f} s   ratio vs selection {t_pub / t_sel:9.0f}x"
              f"   vs from rows {t_pub / t_rows:7.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="abc", help="which cases to run: any of a, b, c (default abc)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per timing; the minimum is reported")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical cores; "
          f"numpy {np.__version__}; {load()}")
    if "a" in args.cases:
        case_selection("a", 8192, 1536, 384, 768, 1, args.repeat)
    if "b" in args.cases:
        case_selection("b", 8192, 512 * 9, 512, 256, 9, max(1, args.repeat - 1))
    if "c" in args.cases:
        case_baselines([(1024, 128, 32, 8, True), (2048, 256, 64, 32, True), (4096, 512, 128, 32, False)],
                       args.repeat)


if __name__ == "__main__":
    main()
