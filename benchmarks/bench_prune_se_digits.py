"""Quality benchmark for squeeze-and-excitation gates: pruning a small EfficientNet without fine-tuning.

The zoo's :func:`nn_adapters.zoo.efficientnet_cifar` (width multiplier 0.5: MBConv blocks whose hidden channels
are pruned through their depthwise convolutions and squeeze-and-excitation gates, the gate's ``fc1`` columns and
``fc2`` rows following the kept channels) is trained on scikit-learn's digits (the demo's fixed 80/20 split; the
8x8 grey images repeated over the 3 input channels; nothing is downloaded) with the digits demo's recipe (30
epochs, seed 0) and cached in ``$SUBMOD_CACHE_DIR``. Then the protocol of ``bench_prune_mnist1d.py``: for each
parameter compression and seed (the seed draws the unlabeled calibration images from the training split, and the
random baseline's units), the network is pruned with the submodular methods (asym, seq, layer, with the
least-squares refit) and the baselines (random and weight norm with the refit, magnitude without it), and its
accuracy is measured on the 360 test images, which nothing is tuned on. Two more rows switch off the gates' bias
correction (``se_bias_correction=False``: a removed channel's pooled value becomes 0 in ``fc1`` instead of its
calibration mean), for asym and for magnitude pruning. Prints mean +- std over seeds and RATIOS against the
baselines measured in the same run. Empirical estimates on one network.

Run:  python benchmarks/bench_prune_se_digits.py [--seeds 3] [--calib 100] [--compressions 2 4] [--fidelity]
"""

from __future__ import annotations

import torch
from bench_prune_mnist1d import METHODS, parse_args, run_protocol

from nn_adapters import zoo
from nn_adapters.digits import accuracy, cache_dir, cached_model, load_digits_split, train_classifier

NO_CORRECTION = [("asym, SE corr. off", "asym", True, {"se_bias_correction": False}),
                 ("magnitude, SE corr. off", "weight_norm", False, {"se_bias_correction": False})]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], [2, 4], seeds=3)
    Xtr, ytr, Xte, yte = load_digits_split()
    Xtr, Xte = Xtr.repeat(1, 3, 1, 1), Xte.repeat(1, 3, 1, 1)  # grey images as RGB

    def train() -> torch.nn.Module:
        torch.manual_seed(0)
        return train_classifier(zoo.efficientnet_cifar(width_mult=0.5), Xtr, ytr, epochs=30, seed=0)

    model, info = cached_model(cache_dir() / "digits_efficientnet-w0.5-v1-seed0.pt", train, args.retrain)
    n_params = sum(p.numel() for p in model.parameters())
    how = "cached" if info["cached"] else f"trained in {info['train_time_s']:.0f}s"
    print(f"digits: {len(Xtr)} training / {len(Xte)} test images; EfficientNet (width 0.5, squeeze-and-excitation) "
          f"{n_params} parameters ({how}); unpruned test accuracy {100 * accuracy(model, Xte, yte):.1f}%; "
          f"{args.calib} calibration images; {args.seeds} seeds; no fine-tuning")
    run_protocol(model, Xtr, Xte, yte, args, METHODS + NO_CORRECTION)


if __name__ == "__main__":
    main()
