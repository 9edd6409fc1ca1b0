"""The cross-validated ridge with fewer calibration rows than columns: factored path against the full Gram.

``ridge="cv"`` (the default of ``nn_adapters.prune``) chooses each layer's ridge by 5-fold cross-validation from
per-fold statistics (:func:`nn_adapters._stats.cv_ridge`). With few samples for a wide layer (the data-efficient
regime the pruning is for) the Gram matrices are rank-deficient, and the CV works in the range of the training
Gram: pivoted Cholesky factors of the folds and a thin SVD, instead of one eigendecomposition of the full
``c x c`` training Gram per fold (``nn_adapters._stats.LOW_RANK_ROWS`` sets when; ``0`` forces the full path).
This script times both paths in the same run:

* ``cv_ridge``: synthetic fold statistics, ``c`` columns (default 4608 = 9 x 512, a 3x3 convolution over 512
  channels, as in VGG-11) and ``n`` rows (default 384 = 24 images x 4 x 4 positions), 5 folds, ``m = 512``
  targets; prints both times, their ratio and the largest relative difference of the held-out error curves;
* ``prune``: ``nn_adapters.prune(zoo.vgg11_cifar(width=...), 24 images of 32 x 32, compression=2, method="asym")``
  with random weights and Gaussian inputs, both paths; prints both times and their ratio and checks that both
  keep the same units with the same ridges.

torch and numpy use 2 threads (the CV itself runs on one BLAS thread in both paths). Timings are medians of
``--repeats`` interleaved runs (default 1: the full path of the ``cv_ridge`` part alone takes about 2 minutes
here); the load average is printed before and after. About 4 minutes in all on the 2-core machine.

Run:  python benchmarks/bench_cv_scarce.py [--columns 4608] [--rows 384] [--width 0.5] [--repeats 1]
      [--skip-cv] [--skip-prune]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import nn_adapters as nna
from nn_adapters import _stats, zoo
from submod.sparse_regression import GramAccumulator


def fold_statistics(c: int, n: int, m: int, folds: int, seed: int = 0) -> list[GramAccumulator]:
    """Per-fold accumulators of ``n`` rows with ``c`` correlated columns (a low-rank signal plus noise)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 32)) @ rng.standard_normal((32, c)) + 0.5 * rng.standard_normal((n, c))
    Y = A @ (rng.standard_normal((c, m)) / np.sqrt(c)) + 0.1 * rng.standard_normal((n, m))
    accs = [GramAccumulator(c, m) for _ in range(folds)]
    for h in range(folds):
        accs[h].update(A[h::folds], Y[h::folds])
    return accs


def timed(fn, low_rank: bool):
    saved = _stats.LOW_RANK_ROWS
    _stats.LOW_RANK_ROWS = saved if low_rank else 0.0
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        _stats.LOW_RANK_ROWS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", type=int, default=4608)
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--targets", type=int, default=512)
    ap.add_argument("--width", type=float, default=0.5, help="VGG-11 width multiplier of the prune part")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--skip-prune", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    if not args.skip_cv:
        accs = fold_statistics(args.columns, args.rows, args.targets, 5)
        cols = np.arange(args.columns)
        times: dict[bool, list[float]] = {True: [], False: []}
        curves = {}
        for _ in range(args.repeats):
            for low in (False, True):
                t, (_, rel) = timed(lambda: _stats.cv_ridge(accs, cols), low)
                times[low].append(t)
                curves[low] = rel
        full, fact = statistics.median(times[False]), statistics.median(times[True])
        diff = float(np.max(np.abs(curves[True] - curves[False]) / np.abs(curves[False])))
        print(f"cv_ridge, {args.columns} columns, {args.rows} rows, 5 folds, {args.targets} targets: full Gram "
              f"{full:.2f}s, factored {fact:.2f}s, ratio full/factored {full / fact:.1f}x; largest relative "
              f"difference of the held-out error curves {diff:.1e}")

    if not args.skip_prune:
        torch.manual_seed(0)
        model = zoo.vgg11_cifar(width=args.width).eval()
        x = torch.randn(24, 3, 32, 32)
        ptimes: dict[bool, list[float]] = {True: [], False: []}
        kept = {}
        for _ in range(args.repeats):
            for low in (False, True):
                t, (_, rep) = timed(lambda: nna.prune(model, x, compression=2, method="asym", seed=0), low)
                ptimes[low].append(t)
                kept[low] = [(lay.kept_units, lay.ridge) for lay in rep.layers]
        assert kept[True] == kept[False], "the two paths kept different units or ridges"
        full, fact = statistics.median(ptimes[False]), statistics.median(ptimes[True])
        print(f"prune VGG-11 (width {args.width}), 24 images, compression 2, asym: full Gram {full:.1f}s, factored "
              f"{fact:.1f}s, ratio full/factored {full / fact:.2f}x; same units and ridges")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
