"""Feature-based, graph-cut, log-determinant and coverage objectives: speed and parity against apricot / submodlib.

Each objective is built on the same data for every library, and greedy selects k = 100 items. A time covers
building the objective and one ``maximize`` call, after one untimed warm-up call (apricot compiles its numba
kernels on the first call). The runs of one objective are interleaved (one call of each, round after round, each
round starting with the next run) and each reports its median, so that a change in the machine's load affects all
of them alike. Data conversions a peer's API needs, such as features as a list of lists, happen outside the timed
call. Parity is reported as the overlap with submod's greedy set, and as submod's own objective value of each
peer's set. Ratios are peer seconds / submod seconds, measured in the same process.

Problems (seeded, generated here):
- feature-based sqrt: X = |N(0, 1)| masked to 20% density, 5000 x 100;
- graph cut, lam = 0.5 (apricot's alpha = 1 / lam gives the same maximiser): K = max(D) - D, 3000 points in R^50;
- log-determinant, ridge 1 (submodlib's lambdaVal = 1): RBF kernel exp(-D / mean(D)) on those points;
- coverage: binary incidence, 5000 items x 1000 concepts, 1% density;
- coverage, large: 50,000 items x 10,000 concepts, 0.1% density (submodlib only: apricot takes minutes there).

Run:  python benchmarks/bench_objectives.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

import submod

K_PICK = 100


def timed(runs: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """Median time and output of each run over ``repeats`` interleaved rounds, after one untimed warm-up call of each
    (numba compiles apricot's kernels on the first call; caches warm up for everyone)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    out: dict[str, np.ndarray] = {name: np.asarray(fn(), dtype=np.int64) for name, fn in runs.items()}
    names = list(runs)
    for r in range(repeats):
        # each round starts with another run: the first call of a round pays for the memory the previous round's
        # last run freed (page faults), which would otherwise always fall on the same run
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = runs[name]
            t = time.perf_counter()
            out[name] = np.asarray(fn(), dtype=np.int64)
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), out[name]) for name in runs}


def quiet(fn: Callable[[], object]) -> object:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


def submodlib_picks(obj: object) -> np.ndarray:
    picks = obj.maximize(budget=K_PICK, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                         verbose=False, show_progress=False)
    return np.array([j for j, _ in picks])


def problems() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    X = np.abs(rng.standard_normal((5000, 100))) * (rng.random((5000, 100)) < 0.2)
    Z = rng.standard_normal((3000, 50))
    sq = np.einsum("ij,ij->i", Z, Z)
    D = np.maximum(sq[:, None] + sq[None, :] - 2.0 * Z @ Z.T, 0.0)
    np.fill_diagonal(D, 0.0)
    K_cut = D.max() - D
    K_rbf = np.exp(-D / D.mean())
    C = (rng.random((5000, 1000)) < 0.01).astype(np.float64)
    C_sparse = sp.csr_matrix(C)  # each library gets coverage in its own sparse form, converted outside the timing
    feats = [list(map(float, row)) for row in X]
    covers = [set(np.flatnonzero(row).tolist()) for row in C]
    big = sp.random(50_000, 10_000, density=0.001, format="csr", random_state=1)
    big.data[:] = 1.0
    big_covers = [set(big.indices[big.indptr[i]:big.indptr[i + 1]].tolist()) for i in range(big.shape[0])]

    def sl(name: str, **kw: object) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            import submodlib

            return quiet(lambda: submodlib_picks(getattr(submodlib, name)(**kw)))
        return run

    def ap(cls: str, data: np.ndarray, **kw: object) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            import apricot

            return quiet(lambda: np.asarray(getattr(apricot, cls)(K_PICK, optimizer="lazy", verbose=False,
                                                                  **kw).fit(data).ranking))
        return run

    def fb_mode() -> object:
        from submodlib import FeatureBasedFunction

        return FeatureBasedFunction.__init__.__defaults__[-1].__class__.squareRoot

    return {
        "feature-based sqrt": {
            "f": lambda: submod.FeatureBased(X, "sqrt"),
            "peers": {"apricot lazy": ap("FeatureBasedSelection", X, concave_func="sqrt"),
                      "submodlib LazyGreedy": lambda: sl("FeatureBasedFunction", n=5000, features=feats,
                                                         numFeatures=100, sparse=False, mode=fb_mode())()}},
        "graph cut": {
            "f": lambda: submod.GraphCut(similarity=K_cut, lam=0.5),
            "peers": {"apricot lazy": ap("GraphCutSelection", K_cut, metric="precomputed", alpha=2.0),
                      "submodlib LazyGreedy": sl("GraphCutFunction", n=3000, mode="dense", lambdaVal=0.5,
                                                 ggsijs=K_cut, separate_rep=False)}},
        "log-determinant": {
            "f": lambda: submod.LogDeterminant(similarity=K_rbf, ridge=1.0),
            "peers": {"submodlib LazyGreedy": sl("LogDeterminantFunction", n=3000, mode="dense", lambdaVal=1.0,
                                                 sijs=K_rbf)}},
        "coverage": {
            "f": lambda: submod.Coverage(C_sparse),
            "peers": {"apricot lazy": ap("MaxCoverageSelection", C, threshold=1.0),
                      "submodlib LazyGreedy": sl("SetCoverFunction", n=5000, cover_set=covers, num_concepts=1000)}},
        "coverage, large": {
            "f": lambda: submod.Coverage(big),
            "peers": {"submodlib LazyGreedy": sl("SetCoverFunction", n=50_000, cover_set=big_covers,
                                                 num_concepts=10_000)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"k = {K_PICK}; seconds are medians over {args.repeats} interleaved calls; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"{'objective':<20}{'run':<24}{'seconds':>9}{'overlap':>9}{'f(S) / f(submod greedy)':>26}"
          f"{'peer / submod lazy':>20}")
    for name, prob in problems().items():
        f = prob["f"]()
        runs = {f"submod {method}": (lambda m=method, make=prob["f"]: submod.maximize(make(), K_PICK,
                                                                                    method=m).selected)
                for method in ("lazy", "greedy")}
        for peer, run in prob["peers"].items():
            try:
                run()
            except ImportError:
                print(f"({peer.split()[0]} not installed: skipped)")
                continue
            runs[peer] = run
        rows = timed(runs, args.repeats)
        ref = rows["submod greedy"][1]
        ref_value = f.value(ref)
        lazy_t = rows["submod lazy"][0]
        for run_name, (secs, sel) in rows.items():
            overlap = len(set(sel.tolist()) & set(ref.tolist()))
            ratio = "" if run_name.startswith("submod ") else f"{secs / lazy_t:.1f}x"
            print(f"{name:<20}{run_name:<24}{secs:>9.3f}{overlap:>9}{f.value(sel) / ref_value:>26.6f}{ratio:>20}")


if __name__ == "__main__":
    main()
