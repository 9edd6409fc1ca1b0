"""Partitioned greedy (``submod.maximize_distributed``) against plain ``submod.maximize`` in the same run.

Two instances: facility location on points from ``sklearn.datasets.make_blobs`` (similarity ``K = max(D) - D``
from squared distances) and sparse regression on ``make_regression`` columns. For each number of parts, the
distributed run is timed serially (parts one after another in this process) and on a ``ProcessPoolExecutor``
with 2 workers, for the exact restriction and, for facility location, GreeDi's local objective. Printed:

* value ratio: ``F(distributed) / F(centralized)`` (same ``k``, same objective);
* time ratios: ``t(maximize) / t(maximize_distributed)``, serial and with the pool (above 1: distributed is
  faster), and serial without the certificate (``certificate_prefixes=0``: the two greedy rounds alone);
  building the objective is shared and timed separately;
* certificate gap: ``upper_bound / F(distributed) - 1``, a proven bound on how far the distributed value can be
  from ``OPT_k`` (for sparse regression with the spectral lower bound on gamma of ``verification``).

Run:  python benchmarks/bench_distributed.py [--points 10000] [--columns 2000] [--k 50] [--parts 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from sklearn.datasets import make_blobs, make_regression

import submod


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def compare(name: str, f: submod.SetFunction, k: int, parts: list[int], locals_: list[bool],
            gamma_lower: float | None = None) -> None:
    central, t_central = timed(submod.maximize, f, k, method="lazy", gamma_lower=gamma_lower)
    gap = central.certificate.upper_bound / central.value - 1 if central.certificate else float("nan")
    print(f"\n{name}: k = {k}; centralized lazy greedy {t_central:.2f} s, value {central.value:.6g}, "
          f"certificate gap {gap:.2%}")
    print(f"{'parts':>5} {'objective':>9} {'value ratio':>11} {'time ratio serial':>17} {'time ratio pool(2)':>18} "
          f"{'serial, no cert.':>16} {'winner':>7} {'cert. gap':>9}")
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(abs, [1, 2]))  # start the workers before timing
        for m in parts:
            for local in locals_:
                kw = dict(n_parts=m, seed=0, local=local, method="lazy", gamma_lower=gamma_lower)
                serial, t_serial = timed(submod.maximize_distributed, f, k, **kw)
                par, t_pool = timed(submod.maximize_distributed, f, k, executor=pool, **kw)
                _, t_bare = timed(submod.maximize_distributed, f, k, certificate_prefixes=0, **kw)
                assert np.array_equal(serial.selected, par.selected)
                cert = par.certificate
                dgap = cert.upper_bound / par.value - 1 if cert else float("nan")
                print(f"{m:>5} {'local' if local else 'restrict':>9} {par.value / central.value:>11.4f} "
                      f"{t_central / t_serial:>17.2f} {t_central / t_pool:>18.2f} {t_central / t_bare:>16.2f} "
                      f"{par.distributed.winner:>7} "
                      f"{dgap:>9.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10000, help="facility-location ground set size")
    parser.add_argument("--columns", type=int, default=2000, help="sparse-regression columns")
    parser.add_argument("--k", type=int, default=50, help="budget (sparse regression uses 2k)")
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8], help="numbers of parts")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores; numpy {np.__version__}")

    X, _ = make_blobs(n_samples=args.points, n_features=16, centers=40, cluster_std=3.0, random_state=0)
    f, t_build = timed(submod.FacilityLocation, X)
    print(f"facility location: {args.points} points x 16 features, similarity built in {t_build:.2f} s "
          "(shared by both sides, not in the ratios)")
    compare(f"FacilityLocation (n = {args.points})", f, args.k, args.parts, [False, True])
    del f

    import verification as vf  # the proven gamma lower bound for the sparse-regression certificate

    A, y = make_regression(n_samples=int(2.5 * args.columns), n_features=args.columns, n_informative=args.columns // 10,
                           noise=5.0, random_state=0)
    g, t_build = timed(submod.SparseRegression, A, y)
    ratio, t_gamma = timed(vf.submodularity_ratio, g, 2 * args.k, method="spectral")
    print(f"\nsparse regression: {A.shape[0]} samples x {args.columns} columns, statistics in {t_build:.2f} s, "
          f"proven gamma >= {ratio.value:.3g} ({ratio.kind}) in {t_gamma:.2f} s")
    compare(f"SparseRegression (p = {args.columns})", g, 2 * args.k, args.parts, [False], gamma_lower=ratio.value)


if __name__ == "__main__":
    main()
