"""Hierarchical vision transformers without fine-tuning: Swin and Swin V2 trained on digits, then pruned.

A small Swin (``transformers``' ``SwinForImageClassification``: 8x8 patches of one pixel, embedding width 32, two
stages of 2 layers, 8x8 then 4x4 tokens after the patch merging, windows of 4x4 shifted every other layer, 2 and 4
heads) and the same Swin V2 (LayerNorms after the attention and FFN outputs) are trained on scikit-learn's digits
(the demo's fixed 80/20 split, nothing downloaded; AdamW at 2e-3 with weight decay 0.05, one-cycle schedule, 60
epochs of mini-batches of 64, float32, seed 0: about 30 s each on 2 cores; cached in ``$SUBMOD_CACHE_DIR`` as a
state dict; the demo's recipe for the CNN leaves Swin at 88% and Swin V2 at chance). Each is pruned at 50% of its
FFN neurons, of its heads, and of both, in every stage, with ``--calib`` unlabeled calibration images drawn from the
training split by each seed: the greedy methods with the least-squares refit (asym, layer) and the baselines
(magnitude without refit, what Torch-Pruning gives before fine-tuning; magnitude, Wanda-style and random with the
same refit). Accuracy on the 360 test images, which nothing is tuned on: mean +- std over seeds, and asym's accuracy
as a RATIO to each baseline measured in the same run. Empirical estimates on one trained network per architecture.

Run:  python benchmarks/bench_prune_swin_digits.py [--seeds 5] [--calib 100] [--arch swin swinv2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tables import print_method_rows  # noqa: E402
from _train import digits_setup, prune_over_seeds, train, trained  # noqa: E402

from nn_adapters.digits import accuracy  # noqa: E402

# label -> (method, reweight, extra options)
METHODS = {
    "asym (greedy, refit)": ("asym", True, {}),
    "layer (greedy, refit)": ("layer", True, {}),
    "magnitude, no refit": ("magnitude", False, {}),
    "magnitude + refit": ("magnitude", True, {}),
    "wanda + refit": ("wanda", True, {}),
    "random + refit": ("random", True, {}),
}
BASELINES = ["magnitude, no refit", "magnitude + refit", "wanda + refit", "random + refit"]


class SwinDigits(nn.Module):
    """``SwinForImageClassification`` (or Swin V2's) on 1x8x8 images, returning the logits."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        import transformers

        config = dict(image_size=8, patch_size=1, num_channels=1, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                      window_size=4, num_labels=10)
        if arch == "swin":
            self.net = transformers.SwinForImageClassification(transformers.SwinConfig(**config))
        else:
            self.net = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def main() -> None:
    args, (Xtr, ytr, Xte, yte) = digits_setup(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--arch", nargs="+", default=["swin", "swinv2"], choices=["swin", "swinv2"]))
    for arch in args.arch:
        torch.manual_seed(0)
        model, how = trained(SwinDigits(arch), f"digits_{arch}-e32-d22-adamw60-seed0.pt",
                             lambda m: train(m, Xtr, ytr), args.retrain)
        base = accuracy(model, Xte, yte)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n{arch}: {n_params} parameters ({how}); unpruned test accuracy {100 * base:.2f}%")
        for target in ("ffn", "heads", "all"):
            runs = {label: {"keep": 0.5, "target": target, "method": method, "reweight": reweight, **extra}
                    for label, (method, reweight, extra) in METHODS.items()}
            acc, secs, reports = prune_over_seeds(model, (Xtr, ytr, Xte, yte), args.seeds, args.calib, runs)
            params = reports[-1].params_after
            print(f"\n  target={target}, keep 50% in every stage: {params} parameters "
                  f"({n_params / params:.2f}x fewer); test accuracy %, mean +- std over seeds")
            print_method_rows(acc, secs, "asym (greedy, refit)", BASELINES, 24)

if __name__ == "__main__":
    main()
