"""Quality benchmark: pruning the digits CNN without fine-tuning (El Halabi et al., NeurIPS 2022, at toy scale).

For each parameter compression (2x, 4x, 8x, 16x) and each of 5 seeds (the seed draws the 100 unlabeled calibration
images from the training split, and the random baseline's units), prune the cached digits CNN with every method
and measure test accuracy on the 360 held-out images. Prints mean +- std, checks the paper's ordering
asym >= seq >= layer, checks whether each submodular method with reweighting beats random and weight-norm with
reweighting and magnitude pruning without reweighting by a wide margin (>= 5 accuracy points on the mean), and
prints accuracy and pruning-time RATIOS against the weight-norm baseline measured in the same run.

Run:  python benchmarks/bench_prune_digits.py [--seeds 5] [--calib 100] [--plot docs/_static/pruning_digits.png]
All figures are empirical estimates on this data set (no guarantee is involved).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import nn_adapters as nna
from nn_adapters.digits import accuracy, load_digits_split, pretrained_digits_cnn

METHODS = [  # label, method, reweight, allocation
    ("asym", "asym", True, "uniform"),
    ("seq", "seq", True, "uniform"),
    ("layer", "layer", True, "uniform"),
    ("asym, error alloc.", "asym", True, "error"),
    ("asym, no refit", "asym", False, "uniform"),
    ("random+refit", "random", True, "uniform"),
    ("weight_norm+refit", "weight_norm", True, "uniform"),
    ("magnitude (no refit)", "weight_norm", False, "uniform"),
    ("act_norm+refit", "act_norm", True, "uniform"),
    ("actgrad+refit [labels]", "actgrad", True, "uniform"),
]
SUBMOD = ("asym", "seq", "layer")
BASES = ("random+refit", "weight_norm+refit", "magnitude (no refit)")
WIDE = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--compressions", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass

    model, _ = pretrained_digits_cnn()
    Xtr, ytr, Xte, yte = load_digits_split()
    dense = accuracy(model, Xte, yte)
    print(f"unpruned accuracy {100 * dense:.1f}%; {args.calib} calibration images; {args.seeds} seeds; no fine-tuning")
    acc = {(m[0], c): [] for m in METHODS for c in args.compressions}
    tim = {m[0]: [] for m in METHODS}
    for c in args.compressions:
        for s in range(args.seeds):
            idx = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(s))[:args.calib]
            calib = [(Xtr[idx], ytr[idx])]
            for label, method, rw, alloc in METHODS:
                t0 = time.perf_counter()
                pruned, rep = nna.prune(model, calib, compression=c, method=method, reweight=rw, seed=s,
                                        allocation=alloc)
                tim[label].append(time.perf_counter() - t0)
                acc[(label, c)].append(accuracy(pruned, Xte, yte))
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    std = {k: float(np.std(v)) for k, v in acc.items()}

    head = f"{'method':<24}" + "".join(f"{f'{c:g}x':>15}" for c in args.compressions)
    print("\ntest accuracy %, mean +- std over seeds\n" + head)
    for label, *_ in METHODS:
        print(f"{label:<24}" + "".join(f"{100 * mean[(label, c)]:>8.1f} +-{100 * std[(label, c)]:>4.1f}"
                                       for c in args.compressions))

    print("\nordering asym >= seq >= layer (on the means):")
    for c in args.compressions:
        a, s_, l_ = (mean[(m, c)] for m in SUBMOD)
        print(f"  {c:>4g}x: asym {'>=' if a >= s_ else '< '} seq, seq {'>=' if s_ >= l_ else '< '} layer"
              f"   (asym {100 * a:.1f}, seq {100 * s_:.1f}, layer {100 * l_:.1f})")

    print(f"\nwide margin (>= {100 * WIDE:.0f} accuracy points on the mean) over the baselines:")
    for c in args.compressions:
        cells = []
        for m in SUBMOD:
            wins = [f"{b.split('+')[0].split(' ')[0]}:{'yes' if mean[(m, c)] - mean[(b, c)] >= WIDE else 'no'}"
                    f"({100 * (mean[(m, c)] - mean[(b, c)]):+.1f})" for b in BASES]
            cells.append(f"{m}[{' '.join(wins)}]")
        print(f"  {c:>4g}x: " + "  ".join(cells))

    ref = "weight_norm+refit"
    print(f"\nratios against {ref} measured in this run (accuracy ratio at each compression; pruning-time ratio):")
    for label, *_ in METHODS:
        r = " ".join(f"{mean[(label, c)] / mean[(ref, c)]:.3f}" for c in args.compressions)
        print(f"  {label:<24} accuracy x[{r}]  time x{np.mean(tim[label]) / np.mean(tim[ref]):.2f} "
              f"(median {np.median(tim[label]):.2f}s per pruning)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dense": dense, "acc": {f"{k[0]}@{k[1]:g}": v for k, v in acc.items()},
                       "time": tim}, fh, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, *_ in METHODS:
            ys = np.array([100 * mean[(label, c)] for c in args.compressions])
            es = np.array([100 * std[(label, c)] for c in args.compressions])
            ax.errorbar(args.compressions, ys, yerr=es, fmt="-o" if label in SUBMOD else "--s", ms=4, capsize=2,
                        label=label)
        ax.axhline(100 * dense, color="k", ls=":", lw=0.8, label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameter compression (x)")
        ax.set_ylabel("test accuracy % (no fine-tuning)")
        ax.set_title(f"digits CNN, {args.calib} calibration images, mean +- std over {args.seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
