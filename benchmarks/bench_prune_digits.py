"""Quality benchmark: pruning the digits CNN without fine-tuning (El Halabi et al., NeurIPS 2022, at toy scale).

For each parameter compression (2x, 4x, 8x, 16x) and each of 5 seeds (the seed draws the 100 unlabeled calibration
images from the training split, and the random baseline's units), prune the cached digits CNN with every method
and measure test accuracy on the 360 held-out images. Prints mean +- std, checks the paper's ordering
asym >= seq >= layer, checks whether each submodular method with reweighting beats random and weight-norm with
reweighting and magnitude pruning without reweighting by a wide margin (>= 5 accuracy points on the mean), and
prints accuracy and pruning-time RATIOS against the weight-norm baseline measured in the same run.

Test accuracy alone cannot resolve differences of a few images (the unpruned network itself errs on 4 of the 360),
so the script also prints, on the same test images, what the pruning methods optimise, without labels: fidelity to
the unpruned network (how often the pruned network predicts the same class, and the mean KL divergence of its
softmax from the unpruned one's), and paired sign tests of each submodular method against random and weight norm
with refit (images where exactly one of the two is right, or agrees with the unpruned network, pooled over seeds).

With ``--folds 5`` the seeds are the folds of a stratified 5-fold split of all 1797 images: one network per fold,
trained (same recipe as the demo's) on the other folds and tested on its own, so every image is a test image once
(5x the resolution of the fixed 360-image test set, and the networks' own variance is in the spread).

Run:  python benchmarks/bench_prune_digits.py [--seeds 5] [--calib 100] [--ridge cv|1e-3] [--folds 5]
      [--plot docs/_static/pruning_digits.png]
All figures are empirical estimates on this data set (no guarantee is involved).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _tables import print_accuracy_table
from scipy.stats import binomtest

import nn_adapters as nna
from nn_adapters.digits import accuracy, load_digits_fold, load_digits_split, pretrained_digits_cnn, train_digits_cnn

METHODS = [  # label, method, reweight, allocation[, refit_from: the statistics a baseline's refit uses]
    ("asym", "asym", True, "uniform"),
    ("seq", "seq", True, "uniform"),
    ("layer", "layer", True, "uniform"),
    ("asym, error alloc.", "asym", True, "error-curve"),
    ("asym, no refit", "asym", False, "uniform"),
    ("random+refit", "random", True, "uniform"),
    ("weight_norm+refit", "weight_norm", True, "uniform"),
    ("magnitude (no refit)", "weight_norm", False, "uniform"),
    ("act_norm+refit", "act_norm", True, "uniform"),
    ("actgrad+refit [labels]", "actgrad", True, "uniform"),
    # matched refit: the baselines refitted from seq's / layer's own statistics, so that against seq and layer
    # only the selection differs (the rows above refit every baseline from the asym statistics, the default)
    ("random+refit (seq stats)", "random", True, "uniform", "seq"),
    ("weight_norm+refit (seq stats)", "weight_norm", True, "uniform", "seq"),
    ("random+refit (layer stats)", "random", True, "uniform", "layer"),
    ("weight_norm+refit (layer stats)", "weight_norm", True, "uniform", "layer"),
]
SUBMOD = ("asym", "seq", "layer")
BASES = ("random+refit", "weight_norm+refit", "magnitude (no refit)")
WIDE = 0.05


def layer_errors(orig: torch.nn.Module, pruned: torch.nn.Module, rep: nna.PruneReport, X: torch.Tensor) -> list[float]:
    """Relative error ``||out_pruned - out_orig||^2 / ||out_orig - mean||^2`` of every pair's consumer output
    (restricted to the kept output units when the consumer is itself pruned), i.e. the AsymInChange objective
    measured on the images ``X``: an empirical estimate, label-free."""
    outs = []
    for net in (orig, pruned):
        got, hooks = {}, []
        for lr in rep.layers:
            cons = lr.pair.split("->")[1]
            hooks.append(net.get_submodule(cons).register_forward_hook(
                lambda _m, _i, o, c=cons, g=got: g.__setitem__(c, o.detach().double())))
        with torch.no_grad():
            net.eval()(X)
        for h in hooks:
            h.remove()
        outs.append(got)
    kept_out = {lr.pair.split("->")[0]: lr.kept_units for lr in rep.layers}
    res = []
    for lr in rep.layers:
        cons = lr.pair.split("->")[1]
        a, b = outs[0][cons], outs[1][cons]
        if cons in kept_out:
            a = a[:, kept_out[cons]]
        a, b = a.transpose(0, 1).reshape(a.shape[1], -1).T, b.transpose(0, 1).reshape(b.shape[1], -1).T
        res.append(float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()))
    return res


def output_agreement(orig: torch.nn.Module, pruned: torch.nn.Module, X: torch.Tensor) -> list[float]:
    """Label-free: the fraction of images where the pruned network predicts the original network's class, and the
    95th percentile over images of ``||logits_pruned - logits_orig||^2 / mean_images ||logits_orig - mean||^2``."""
    with torch.no_grad():
        a, b = orig.eval()(X).double(), pruned.eval()(X).double()
    e = ((a - b) ** 2).sum(1) / ((a - a.mean(0)) ** 2).sum(1).mean()
    return [float((a.argmax(1) == b.argmax(1)).double().mean()), float(torch.quantile(e, 0.95))]


def outputs_on_test_set(orig_logits: torch.Tensor, pruned: torch.nn.Module, X: torch.Tensor,
                 y: torch.Tensor) -> dict[str, np.ndarray | float]:
    """Per test image: correct (against the labels) and same class as the unpruned network; and the mean over
    images of ``KL(softmax(orig) || softmax(pruned))`` in nats (label-free)."""
    with torch.no_grad():
        lp = pruned.eval()(X).double()
    lo = orig_logits.double()
    kl = (lo.softmax(1) * (lo.log_softmax(1) - lp.log_softmax(1))).sum(1).mean()
    return {"correct": (lp.argmax(1) == y).numpy(), "same": (lp.argmax(1) == lo.argmax(1)).numpy(), "kl": float(kl)}


def sign_test(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, int, float]:
    """Paired comparison of two methods over the same images and seeds: ``(n_a, n_b, p)`` where ``n_a`` counts the
    (image, seed) pairs where only ``a`` is true, ``n_b`` where only ``b`` is, and ``p`` is the exact two-sided sign
    test (McNemar) p-value of ``n_a`` vs ``n_b``. Pooling the seeds treats them as independent. Under ``--folds`` each
    seed has its own network and test images, so they are; otherwise they differ only in the calibration images they
    draw (the network and test images are the same), and ``p`` is indicative."""
    ta, tb = np.concatenate(a), np.concatenate(b)
    na, nb = int((ta & ~tb).sum()), int((tb & ~ta).sum())
    return na, nb, (binomtest(na, na + nb, 0.5).pvalue if na + nb else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--compressions", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--ridge", default="cv", help="'cv' (default: per-layer cross-validated ridge) or a fixed relative "
                    "ridge such as 1e-3 (the value used before the cross-validated choice existed)")
    ap.add_argument("--refit-prior", default="original", choices=["original", "zero"],
                    help="what the refit's ridge shrinks toward (nn_adapters.prune refit_prior); 'zero' reproduces "
                         "the ordinary-ridge configuration")
    ap.add_argument("--layer-errors", action="store_true",
                    help="also print, for asym/seq/layer, each consumer's relative output error against the ORIGINAL "
                         "network in-sample (calibration images) and held-out (500 other training images)")
    ap.add_argument("--folds", type=int, default=0,
                    help="cross-validated protocol: K stratified folds of all 1797 images, one CNN trained per fold on "
                         "the other folds and tested on its own (every image tested once); the seeds are the folds")
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--replot", metavar="JSON", help="only redraw --plot from the --json file of an earlier run")
    args = ap.parse_args()
    ridge = args.ridge if args.ridge == "cv" else float(args.ridge)
    if args.replot:
        replot(args.replot, args.plot or "pruning_digits.png")
        return
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass

    if args.folds:  # seed s = fold s: its own network, trained on the other folds, tested on fold s
        args.seeds = args.folds
        nets = []
        for f in range(args.folds):
            Xtr, ytr, Xte, yte = load_digits_fold(f, args.folds)
            nets.append((train_digits_cnn(seed=f, data=(Xtr, ytr)), Xtr, ytr, Xte, yte))
        n_test = sum(len(n[3]) for n in nets)
        per_fold = [accuracy(n[0], n[3], n[4]) for n in nets]
        dense = sum(a * len(n[3]) for a, n in zip(per_fold, nets, strict=True)) / n_test
        print(f"{args.folds}-fold protocol: one CNN per fold, {n_test} distinct test images in all; unpruned accuracy "
              f"per fold " + " ".join(f"{100 * a:.1f}" for a in per_fold) + " %")
    else:
        model, _ = pretrained_digits_cnn()
        nets = [(model, *load_digits_split())] * args.seeds
        dense = accuracy(model, nets[0][3], nets[0][4])
    orig_logits = []
    with torch.no_grad():
        for net, *_, Xte, _y in nets:
            orig_logits.append(net.eval()(Xte))
    print(f"unpruned accuracy {100 * dense:.1f}%; {args.calib} calibration images; {args.seeds} seeds; no fine-tuning; "
          f"ridge {ridge}, refit prior {args.refit_prior}")
    acc = {(m[0], c): [] for m in METHODS for c in args.compressions}
    tim = {m[0]: [] for m in METHODS}
    outs: dict = {k: [] for k in acc}
    lerr: dict = {}
    for c in args.compressions:
        for s in range(args.seeds):
            model, Xtr, ytr, Xte, yte = nets[s]
            perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(s))
            idx, held = perm[:args.calib], perm[args.calib:args.calib + 500]
            calib = [(Xtr[idx], ytr[idx])]
            for label, method, rw, alloc, *refit_from in METHODS:
                t0 = time.perf_counter()
                pruned, rep = nna.prune(model, calib, compression=c, method=method, reweight=rw, seed=s,
                                        allocation=alloc, ridge=ridge, refit_prior=args.refit_prior,
                                        refit_from=(refit_from or ["asym"])[0])
                tim[label].append(time.perf_counter() - t0)
                acc[(label, c)].append(accuracy(pruned, Xte, yte))
                outs[(label, c)].append(outputs_on_test_set(orig_logits[s], pruned, Xte, yte))
                if args.layer_errors and label in SUBMOD:
                    lerr.setdefault((label, c), []).append(
                        layer_errors(model, pruned, rep, Xtr[idx]) + layer_errors(model, pruned, rep, Xtr[held])
                        + output_agreement(model, pruned, Xtr[held]))
    mean, std, head = print_accuracy_table(acc, [m[0] for m in METHODS], args.compressions, 32, 15)

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

    print("\nmatched refit (each method against random and weight norm refitted from ITS statistics, so that only "
          "the selection differs; asym's are the default rows): difference of mean accuracy in points, and the "
          "paired sign test on correctness (only-method vs only-baseline images, p)")
    for c in args.compressions:
        cells = []
        for m in SUBMOD:
            tag = "" if m == "asym" else f" ({m} stats)"
            for b in ("random+refit", "weight_norm+refit"):
                na, nb, pv = sign_test([o["correct"] for o in outs[(m, c)]], [o["correct"] for o in outs[(b + tag, c)]])
                cells.append(f"{m} vs {b.split('+')[0]}: {100 * (mean[(m, c)] - mean[(b + tag, c)]):+.1f} "
                             f"({na} vs {nb}, p={pv:.2f})")
        print(f"  {c:>4g}x: " + "; ".join(cells))

    print("\nfidelity to the unpruned network on the test images (label-free; mean over seeds): "
          "% same predicted class, mean KL(unpruned || pruned) in millinats\n" + head)
    for label, *_ in METHODS:
        print(f"{label:<32}" + "".join(
            f"{100 * np.mean([o['same'].mean() for o in outs[(label, c)]]):>6.1f}%"
            f"{1000 * np.mean([o['kl'] for o in outs[(label, c)]]):>7.1f}m" for c in args.compressions))

    base = [(lo.argmax(1) == n[4]).numpy() for lo, n in zip(orig_logits, nets, strict=True)]
    n_err = np.mean([(~b).sum() for b in base])
    print(f"\naccuracy against the unpruned network's (it errs on {n_err:.1f} test images per seed), mean per seed: "
          "images it gets right that the pruned network gets wrong (broken) / images it gets wrong that the pruned "
          "network gets right (fixed)\n" + head)
    for label, *_ in METHODS:
        print(f"{label:<32}" + "".join(
            f"{np.mean([(b & ~o['correct']).sum() for b, o in zip(base, outs[(label, c)], strict=True)]):>8.1f} /"
            f"{np.mean([(~b & o['correct']).sum() for b, o in zip(base, outs[(label, c)], strict=True)]):>5.1f}"
            for c in args.compressions))

    print("\npaired sign tests over test images x seeds (only-A, only-B, two-sided p): A = submodular method, "
          "B = baseline with refit; 'correct' uses the labels, 'same' is agreement with the unpruned network")
    for c in args.compressions:
        for m in SUBMOD:
            cells = []
            for b in BASES[:2]:
                for key in ("correct", "same"):
                    na, nb, pv = sign_test([o[key] for o in outs[(m, c)]], [o[key] for o in outs[(b, c)]])
                    cells.append(f"{key}: {na:>3} vs {nb:>3} p={pv:.2f}")
                cells[-2] = f"vs {b.split('+')[0]:<12} " + cells[-2]
            print(f"  {c:>4g}x {m:<6} " + "   ".join(cells))

    if lerr:
        names = [lr.pair for lr in rep.layers]
        print("\nper-consumer relative output error vs the original network (mean over seeds; in-sample | held-out):")
        for (label, c), v in lerr.items():
            m = np.mean(v, axis=0)
            k = len(names)
            print(f"  {c:>4g}x {label:<6} " + " ".join(f"{n}:{m[i]:.3f}" for i, n in enumerate(names)) + "  |  "
                  + " ".join(f"{n}:{m[k + i]:.3f}" for i, n in enumerate(names))
                  + f"  | held-out: same prediction as the original {100 * m[2 * k]:.1f}%, per-image logit error "
                    f"p95 {m[2 * k + 1]:.3f}")

    ref = "weight_norm+refit"
    print(f"\nratios against {ref} measured in this run (accuracy ratio at each compression; pruning-time ratio):")
    for label, *_ in METHODS:
        r = " ".join(f"{mean[(label, c)] / mean[(ref, c)]:.3f}" for c in args.compressions)
        print(f"  {label:<32} accuracy x[{r}]  time x{np.mean(tim[label]) / np.mean(tim[ref]):.2f} "
              f"(median {np.median(tim[label]):.2f}s per pruning)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dense": dense, "calib": args.calib, "ridge": ridge,
                       "acc": {f"{k[0]}@{k[1]:g}": v for k, v in acc.items()},
                       "same_as_unpruned": {f"{k[0]}@{k[1]:g}": [float(o["same"].mean()) for o in v]
                                            for k, v in outs.items()},
                       "kl": {f"{k[0]}@{k[1]:g}": [o["kl"] for o in v] for k, v in outs.items()},
                       "time": tim}, fh, indent=1)
    if args.plot:
        plot(args.plot, args.compressions, mean, std, dense, args.calib, args.seeds)


def plot(path: str, compressions: list[float], mean: dict, std: dict, dense: float, calib: int, seeds: int) -> None:
    """Accuracy against compression: every method (left) and the top of the range (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for i, (label, *rest) in enumerate(METHODS):
            if len(rest) > 3:  # a refit_from entry: the matched-refit baselines are in the printed tables only
                continue
            ys = np.array([100 * mean[(label, c)] for c in compressions])
            if zoom and ys.min() < 80:
                continue
            es = np.array([100 * std[(label, c)] for c in compressions])
            ax.errorbar(compressions, ys, yerr=es, fmt="-o" if label in SUBMOD else "--s", ms=4, capsize=2,
                        label=label, color=f"C{i}")
        ax.axhline(100 * dense, color="k", ls=":", lw=0.8, label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameter compression (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("test accuracy % (no fine-tuning)")
    axes[0].set_title("all methods")
    axes[1].set_title("methods above 80% (zoom)")
    fig.suptitle(f"digits CNN, {calib} calibration images, mean +- std over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def replot(json_path: str, path: str) -> None:
    """Redraw the plot from a ``--json`` file of an earlier run (no pruning)."""
    with open(json_path) as fh:
        res = json.load(fh)
    acc = {tuple(k.split("@")): v for k, v in res["acc"].items()}
    comps = sorted({float(c) for _, c in acc})
    mean = {(lab, float(c)): float(np.mean(v)) for (lab, c), v in acc.items()}
    std = {(lab, float(c)): float(np.std(v)) for (lab, c), v in acc.items()}
    seeds = len(next(iter(acc.values())))
    plot(path, comps, mean, std, res["dense"], res.get("calib", 100), seeds)


if __name__ == "__main__":
    main()
