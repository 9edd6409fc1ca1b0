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

from bench_prune_mnist1d import METHODS
from bench_prune_mobilenet_digits import run_on_rgb_digits

from nn_adapters import zoo

NO_CORRECTION = [("asym, SE corr. off", "asym", True, {"se_bias_correction": False}),
                 ("magnitude, SE corr. off", "weight_norm", False, {"se_bias_correction": False})]


def main() -> None:
    run_on_rgb_digits(__doc__.splitlines()[0], lambda: zoo.efficientnet_cifar(width_mult=0.5),
                      "digits_efficientnet-w0.5-v2-seed0.pt", "EfficientNet (width 0.5, squeeze-and-excitation)",
                      seeds=3, methods=METHODS + NO_CORRECTION)


if __name__ == "__main__":
    main()
