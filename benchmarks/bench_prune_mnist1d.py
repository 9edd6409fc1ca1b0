"""Quality benchmark on 1-D signals: pruning the MNIST-1D CNN (Conv1d layers) without fine-tuning.

MNIST-1D (Greydanus, "Scaling down deep learning", 2020) is generated offline by the ``mnist1d`` package with its
default arguments and seed (4000 training and 1000 test signals of length 40, 10 classes; nothing is downloaded).
The zoo's :func:`nn_adapters.zoo.mnist1d_cnn` (three Conv1d+BatchNorm+ReLU layers, max pooling, a Linear head) is
trained once with the digits demo's recipe (:func:`nn_adapters.digits.train_classifier`, 30 epochs, seed 0) and
cached in ``$SUBMOD_CACHE_DIR`` like the demo's CNN. For each parameter compression (2x, 4x, 8x) and each seed (the
seed draws the unlabeled calibration signals from the training split, and the random baseline's units), the network
is pruned with the submodular methods (asym, seq, layer, with the least-squares refit) and the baselines (random and
weight norm with the refit, magnitude without it), and its accuracy is measured on the 1000 test signals, which
nothing is tuned on. Prints mean +- std over seeds, and accuracy and pruning-time RATIOS against the baselines
measured in the same run. All figures are empirical estimates on this data set (no guarantee is involved).

With ``--fidelity`` it also prints, per method, the relative error of the pruned network's logits against the
original network's on the calibration signals (in-sample) and on the training signals not drawn for calibration
(held-out): a label-free measure of how faithful the pruned network is, next to its accuracy.

Run:  python benchmarks/bench_prune_mnist1d.py [--seeds 5] [--calib 100] [--compressions 2 4 8] [--fidelity] [--retrain]
Needs:  pip install mnist1d
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _tables import print_accuracy_table

import nn_adapters as nna
from nn_adapters import zoo
from nn_adapters.demo import DEMO_METHODS
from nn_adapters.digits import accuracy, cache_dir, cached_model, train_classifier

SUBMOD = ("asym", "seq", "layer")
BASES = ("random+refit", "weight_norm+refit", "magnitude (no refit)")
METHODS = [m for m in DEMO_METHODS if m[0] in SUBMOD + BASES]  # (label, method, reweight), the demo's labels


def load_mnist1d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)`` of MNIST-1D generated with the package's default arguments and seed:
    signals ``(N, 1, 40)`` float32 and int64 labels."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # generated here (make_dataset never downloads), seeded by the args

    def signals(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)[:, None, :])

    labels = {k: torch.from_numpy(np.asarray(d[k])).long() for k in ("y", "y_test")}
    return signals(d["x"]), labels["y"], signals(d["x_test"]), labels["y_test"]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x`` in eval mode, without gradients."""
    with torch.no_grad():
        return model.eval()(x)


def trained_cnn(Xtr: torch.Tensor, ytr: torch.Tensor, retrain: bool) -> tuple[torch.nn.Module, dict]:
    """The zoo CNN trained on the training split (seed 0), from the cache or trained now."""
    def train() -> torch.nn.Module:
        torch.manual_seed(0)
        return train_classifier(zoo.mnist1d_cnn(), Xtr, ytr, epochs=30, seed=0)

    return cached_model(cache_dir() / "mnist1d_cnn-v2-seed0.pt", train, retrain)


def parse_args(description: str, compressions: list[float], seeds: int = 5) -> argparse.Namespace:
    """The protocol's options (shared with ``bench_prune_mobilenet_digits.py`` and ``bench_prune_se_digits.py``);
    limits torch and BLAS to 1 thread."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--calib", type=int, default=100, help="unlabeled calibration samples")
    ap.add_argument("--compressions", type=float, nargs="+", default=compressions)
    ap.add_argument("--fidelity", action="store_true",
                    help="also print the relative logit error against the unpruned network, in-sample and held-out")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached model and train again")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    return args


def run_protocol(model: torch.nn.Module, Xtr: torch.Tensor, Xte: torch.Tensor, yte: torch.Tensor,
                 args: argparse.Namespace, methods: list[tuple] = METHODS) -> None:
    """Prune ``model`` with every method at every compression and seed (calibration drawn from ``Xtr``, unlabeled)
    and print test accuracy (mean +- std), the fidelity table with ``--fidelity``, and ratios against the
    baselines measured in the same run. ``methods`` are ``(label, method, reweight)`` or ``(label, method,
    reweight, extra keyword arguments of nna.prune)``; they must include the labels of ``SUBMOD`` and ``BASES``."""
    pairs, _ = nna.find_pairs(model, Xtr[:2])
    print(f"{len(pairs)} prunable pairs: " + ", ".join(
        f"{p.name} ({p.kind}, {p.n_units} units x {p.cols_per_unit} columns)" for p in pairs))

    acc = {(m[0], c): [] for m in methods for c in args.compressions}
    fid = {(m[0], c, part): [] for m in methods for c in args.compressions for part in ("in", "out")}
    tim = {m[0]: [] for m in methods}
    achieved = {c: [] for c in args.compressions}
    for c in args.compressions:
        for s in range(args.seeds):
            idx = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(s))[:args.calib]
            calib = Xtr[idx]  # unlabeled
            rest = torch.ones(len(Xtr), dtype=torch.bool)
            rest[idx] = False
            parts = {"in": calib, "out": Xtr[rest]}
            ref = {part: logits(model, x) for part, x in parts.items()} if args.fidelity else {}
            for label, method, rw, *extra in methods:
                t0 = time.perf_counter()
                pruned, rep = nna.prune(model, calib, compression=c, method=method, reweight=rw, seed=s,
                                        **(extra[0] if extra else {}))
                tim[label].append(time.perf_counter() - t0)
                acc[(label, c)].append(accuracy(pruned, Xte, yte))
                for part, r in ref.items():
                    fid[(label, c, part)].append(float((logits(pruned, parts[part]) - r).norm() / r.norm()))
                achieved[c].append(rep.compression)
    mean, _, head = print_accuracy_table(acc, [m[0] for m in methods], args.compressions, 24, 16)
    print(f"{'achieved compression':<24}" + "".join(f"{min(achieved[c]):>8.2f}-{max(achieved[c]):.2f}x"
                                                    for c in args.compressions))

    if args.fidelity:
        print("\nrelative logit error against the unpruned network, mean over seeds: in-sample (calibration "
              "signals) / held-out (the other training signals)\n" + head)
        for label, *_ in methods:
            cells = (f"{np.mean(fid[(label, c, 'in')]):>8.3f} /{np.mean(fid[(label, c, 'out')]):>6.3f}"
                     for c in args.compressions)
            print(f"{label:<24}" + "".join(cells))

    for ref in BASES:
        print(f"\nratios against {ref} measured in this run (mean accuracy ratio at each compression; mean "
              "pruning-time ratio):")
        for label in SUBMOD:
            r = " ".join(f"{mean[(label, c)] / mean[(ref, c)]:.3f}" for c in args.compressions)
            print(f"  {label:<8} accuracy x[{r}]  time x{np.mean(tim[label]) / np.mean(tim[ref]):.2f}")
    print("\nmedian pruning time per call: " + ", ".join(f"{lab} {np.median(tim[lab]):.2f}s" for lab, *_ in METHODS))




def main() -> None:
    args = parse_args(__doc__.splitlines()[0], [2, 4, 8])
    Xtr, ytr, Xte, yte = load_mnist1d()
    model, info = trained_cnn(Xtr, ytr, args.retrain)
    dense = accuracy(model, Xte, yte)
    n_params = sum(p.numel() for p in model.parameters())
    how = "cached" if info["cached"] else f"trained in {info['train_time_s']:.0f}s"
    print(f"MNIST-1D: {len(Xtr)} training / {len(Xte)} test signals; CNN {n_params} parameters ({how}); unpruned "
          f"test accuracy {100 * dense:.1f}%; {args.calib} calibration signals; {args.seeds} seeds; no fine-tuning")
    run_protocol(model, Xtr, Xte, yte, args)


if __name__ == "__main__":
    main()
