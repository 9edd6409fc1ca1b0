"""Statistics of strided transposed consumers: polyphase blocks vs full rows.

Run from the repository root::

    python benchmarks/bench_convt_stats.py [--images 128] [--channels 64] [--size 16] [--repeats 3]

A decoder step, ``Conv2d(C, C, 3, padding=1) -> ReLU -> ConvTranspose2d(C, C/2, k, stride=2, padding=1)`` on
``size x size`` feature maps upsampled to ``2 size``, for the two kernel sizes decoders use (``k = 4``: DCGAN,
VAE decoders; ``k = 3`` with ``output_padding=1``: U-Net-style up-convolutions). For each it times, on the same
batches, the statistics of the pair ``conv -> convT`` (``PairStats.update``, 5 cross-validation folds, as
``prune`` gathers them) streamed by polyphase blocks (the default) and as full rows (the path before, the private
switch ``nn_adapters._stats._POLYPHASE = False``), and one whole ``nna.prune(..., method="layer", keep=0.5)`` of
the network each way. It prints the medians over ``--repeats`` runs, the ratios full / polyphase (above 1: the
blocks are faster) and the largest relative difference of the two Gram matrices. torch runs with 1 thread, numpy's
BLAS with whatever it has (set ``OMP_NUM_THREADS`` to pin it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import nn_adapters as nna
from nn_adapters import _stats
from nn_adapters.pairs import find_pairs


def _net(c: int, k: int) -> nn.Module:
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(c, c // 2, k, stride=2, padding=1, output_padding=1 if k == 3 else 0)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), up,
                         nn.ReLU(), nn.Conv2d(c // 2, 3, 1)).eval()


def _stats_time(net: nn.Module, batches: list[torch.Tensor], polyphase: bool) -> tuple[float, np.ndarray]:
    _stats._POLYPHASE = polyphase
    pair = next(p for p in find_pairs(net, batches[0][:2])[0] if p.consumer == "4")
    st = _stats.PairStats(pair, net[4], folds=5)
    with torch.no_grad():
        inputs = [net[:4](b) for b in batches]
    t0 = time.perf_counter()
    for x in inputs:
        st.update(x)
    return time.perf_counter() - t0, st.acc.gram()


def _prune_time(net: nn.Module, x: torch.Tensor, polyphase: bool) -> float:
    _stats._POLYPHASE = polyphase
    t0 = time.perf_counter()
    nna.prune(net, x, keep=0.5, method="layer", seed=0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batches = list(x.split(32))
    print(f"torch {torch.__version__}, {args.images} images {args.size}x{args.size}, C = {args.channels}, "
          f"repeats {args.repeats} (medians)")
    print("| kernel | stats full s | stats polyphase s | ratio | prune full s | prune polyphase s | ratio | "
          "max rel. Gram diff |")
    print("|---|---|---|---|---|---|---|---|")
    for k in (4, 3):
        net = _net(args.channels, k)
        runs = {True: [], False: []}
        prunes = {True: [], False: []}
        grams = {}
        for _ in range(args.repeats):
            for poly in (False, True):  # interleaved, so that drift of the machine's load hits both alike
                t, grams[poly] = _stats_time(net, batches, poly)
                runs[poly].append(t)
                prunes[poly].append(_prune_time(net, x, poly))
        _stats._POLYPHASE = True
        diff = float(np.abs(grams[True] - grams[False]).max() / np.abs(grams[False]).max())
        s_full, s_poly = statistics.median(runs[False]), statistics.median(runs[True])
        p_full, p_poly = statistics.median(prunes[False]), statistics.median(prunes[True])
        print(f"| {k} | {s_full:.2f} | {s_poly:.2f} | {s_full / s_poly:.1f}x | {p_full:.2f} | {p_poly:.2f} | "
              f"{p_full / p_poly:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
