"""Quality benchmark for depthwise convolutions: pruning a small MobileNetV2 without fine-tuning.

The zoo's :func:`nn_adapters.zoo.mobilenetv2_cifar` (width multiplier 0.5: inverted-residual blocks of expand ratio
6, whose hidden channels are pruned through their depthwise convolutions) is trained on scikit-learn's digits (the
demo's fixed 80/20 split; the 8x8 grey images repeated over the 3 input channels; nothing is downloaded) with the
digits demo's recipe (30 epochs, seed 0) and cached in ``$SUBMOD_CACHE_DIR``. Then the protocol of
``bench_prune_mnist1d.py``: for each parameter compression and seed (the seed draws the unlabeled calibration
images from the training split, and the random baseline's units), the network is pruned with the submodular
methods (asym, seq, layer, with the least-squares refit) and the baselines (random and weight norm with the refit,
magnitude without it), and its accuracy is measured on the 360 test images, which nothing is tuned on. Prints mean
+- std over seeds and RATIOS against the baselines measured in the same run. Empirical estimates on one network.

Run:  python benchmarks/bench_prune_mobilenet_digits.py [--seeds 5] [--calib 100] [--compressions 2 4] [--fidelity]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_prune_mnist1d import METHODS, parse_args, run_protocol

from nn_adapters import zoo
from nn_adapters.digits import accuracy, cache_dir, cached_model, load_digits_split, train_classifier


def run_on_rgb_digits(description: str, build: Callable[[], torch.nn.Module], cache_name: str, label: str,
                      seeds: int = 5, methods: list[tuple] = METHODS) -> None:
    """Train (or load from the cache) the network ``build()`` on digits with the demo's recipe, the grey images
    repeated over 3 channels, and run the MNIST-1D script's pruning protocol on it (shared with
    ``bench_prune_se_digits.py``)."""
    args = parse_args(description, [2, 4], seeds=seeds)
    Xtr, ytr, Xte, yte = load_digits_split()
    Xtr, Xte = Xtr.repeat(1, 3, 1, 1), Xte.repeat(1, 3, 1, 1)  # grey images as RGB

    def train() -> torch.nn.Module:
        torch.manual_seed(0)
        return train_classifier(build(), Xtr, ytr, epochs=30, seed=0)

    model, info = cached_model(cache_dir() / cache_name, train, args.retrain)
    n_params = sum(p.numel() for p in model.parameters())
    how = "cached" if info["cached"] else f"trained in {info['train_time_s']:.0f}s"
    print(f"digits: {len(Xtr)} training / {len(Xte)} test images; {label} {n_params} parameters "
          f"({how}); unpruned test accuracy {100 * accuracy(model, Xte, yte):.1f}%; {args.calib} calibration images; "
          f"{args.seeds} seeds; no fine-tuning")
    run_protocol(model, Xtr, Xte, yte, args, methods)


def main() -> None:
    run_on_rgb_digits(__doc__.splitlines()[0], lambda: zoo.mobilenetv2_cifar(width_mult=0.5),
                      "digits_mobilenetv2-w0.5-v2-seed0.pt", "MobileNetV2 (width 0.5)")


if __name__ == "__main__":
    main()
