"""Facility location on the apricot / submodlib setting: parity of rankings and time per ``maximize`` call.

Problem: X = default_rng(0).standard_normal((5000, 50)), K = max(D) - D with D the squared Euclidean distances,
k = 100. Each timing includes building the objective from K. Peers (apricot-select, submodlib-py) are timed in
the same process when installed; ratios are peer time / our time.

Run:  python benchmarks/bench_facility_location.py [--repeats 5] [--naive] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time

import numpy as np

import submod


def problem(n: int = 5000, p: int = 50) -> np.ndarray:
    X = np.random.default_rng(0).standard_normal((n, p))
    sq = np.einsum("ij,ij->i", X, X)
    D = sq[:, None] + sq[None, :] - 2.0 * X @ X.T
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, 0.0)
    return D.max() - D


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ours(K: np.ndarray, method: str) -> np.ndarray:
    return submod.maximize(submod.FacilityLocation(similarity=K), 100, method=method, seed=0).selected


def apricot_run(K: np.ndarray, optimizer: str) -> np.ndarray:
    from apricot import FacilityLocationSelection

    return np.asarray(FacilityLocationSelection(100, metric="precomputed", optimizer=optimizer,
                                                verbose=False).fit(K).ranking)


def submodlib_run(K: np.ndarray, optimizer: str) -> np.ndarray:
    from submodlib import FacilityLocationFunction

    with contextlib.redirect_stdout(io.StringIO()):
        obj = FacilityLocationFunction(n=K.shape[0], mode="dense", sijs=K, separate_rep=False)
        picks = obj.maximize(budget=100, optimizer=optimizer, stopIfZeroGain=False, stopIfNegativeGain=False,
                             verbose=False, show_progress=False)
    return np.array([j for j, _ in picks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive", action="store_true", help="also time the peers' naive greedy (slow)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    K = problem()
    rows: dict[str, dict] = {}
    for method in ("lazy", "greedy", "stochastic"):
        t, sel = timed(lambda m=method: ours(K, m), args.repeats)
        rows[f"submod {method}"] = {"seconds": t, "ranking": sel}
    peers = [("apricot", apricot_run, "lazy"), ("submodlib", submodlib_run, "LazyGreedy")]
    if args.naive:
        peers += [("apricot", apricot_run, "naive"), ("submodlib", submodlib_run, "NaiveGreedy")]
    for name, fn, opt in peers:
        try:
            t, sel = timed(lambda f=fn, o=opt: f(K, o), 1 if "aive" in opt else max(1, args.repeats // 2))
        except ImportError:
            print(f"({name} not installed: skipped)")
            continue
        rows[f"{name} {opt}"] = {"seconds": t, "ranking": sel}

    f = submod.FacilityLocation(similarity=K)
    ref = rows["submod greedy"]["ranking"]
    print(f"facility location, n = 5000, k = 100; f(greedy set) = {f.value(ref):.1f} (expected 898378.1)")
    print(f"{'run':<24}{'seconds':>10}{'same ranking as submod greedy':>32}{'f(S)':>14}")
    for name, row in rows.items():
        same = bool(np.array_equal(row["ranking"], ref))
        row["same_ranking"] = same
        row["value"] = f.value(row["ranking"])
        print(f"{name:<24}{row['seconds']:>10.3f}{str(same):>32}{row['value']:>14.1f}")
    lazy, greedy = rows["submod lazy"]["seconds"], rows["submod greedy"]["seconds"]
    print("\nratios (peer seconds / submod seconds, same process):")
    for name, row in rows.items():
        if not name.startswith("submod "):
            ours_t = greedy if "aive" in name else lazy
            print(f"  {name:<22} / submod {'greedy' if 'aive' in name else 'lazy':<7} = "
                  f"{row['seconds'] / ours_t:6.1f}x")
    print(f"\ntargets: lazy <= 0.15 s: {lazy:.3f} s ({'met' if lazy <= 0.15 else 'MISSED'}); "
          f"greedy <= 2 s: {greedy:.3f} s ({'met' if greedy <= 2.0 else 'MISSED'})")
    if args.json:
        out = {k: {kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
               for k, v in rows.items()}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
