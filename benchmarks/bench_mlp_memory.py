"""Pruning a wide MLP's layer pairs (``nna.prune``): peak memory and time, this checkout against an earlier one.

A randomly initialised MLP (``--width`` 2048 by default, ``--depth`` 8 Linear layers with ReLU between them, 128 MiB
of float32 weights) keeps half of the units of every hidden layer with ``--method`` (``asym`` by default, with the
refit) from ``--samples`` random calibration inputs (256 a batch); with ``--compression C`` the network is pruned
to ``C`` times fewer parameters instead, the layers' budgets set by the error-curve allocation. Each run is a fresh
process, so that its peak resident memory is its own; the figure printed is the peak during the pruning minus the
peak before it (model, data). What the pruning holds: the float64 statistics of each layer pair (Gram matrices,
independent of the number of samples), the cached inputs of the sequential modes, the networks it runs (the
unpruned one and the one being pruned) and the pruned model it returns.

With ``--baseline-src DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/old 09556bc``, where
both networks were deep copies of the caller's weights) that code is measured in the same run, right before this
checkout's, and the kept units and errors are checked to be the same.

With ``--stats-memory-gib G`` this checkout is also run with ``stats_memory=G`` GiB (layer-wise statistics gathered
in groups of layers that fit, one pass over the calibration data per group) and compared with its one-pass run.

Run:  python benchmarks/bench_mlp_memory.py [--width 2048] [--depth 8] [--samples 4096] [--method asym]
          [--compression C] [--stats-memory-gib G] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _memory import baseline_options, peak_mib, run_child, same_results, sources

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One pruning run in this process; prints a JSON line (peak memory in MiB, seconds, kept units, errors)."""
    import torch
    from torch import nn

    import nn_adapters as nna

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(args.depth):
        layers += [nn.Linear(args.width, args.width)] + ([nn.ReLU()] if i < args.depth - 1 else [])
    model = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(min(256, args.samples - b), args.width, generator=g) for b in range(0, args.samples, 256)]
    before = peak_mib()
    t0 = time.perf_counter()
    budget = {"keep": 0.5} if args.compression is None else {"compression": args.compression,
                                                              "allocation": "error-curve"}
    if args.stats_memory_gib is not None:
        budget["stats_memory"] = int(args.stats_memory_gib * 2**30)
    _, report = nna.prune(model, batches, method=args.method, seed=0, **budget)
    print(json.dumps({"mib": peak_mib() - before, "seconds": time.perf_counter() - t0,
                      "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                      "kept": [r.kept_units for r in report.layers],
                      "errors": [r.relative_error for r in report.layers]}))


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--width", type=int, default=2048)
    options.add_argument("--depth", type=int, default=8)
    options.add_argument("--samples", type=int, default=4096)
    options.add_argument("--method", default="asym")
    options.add_argument("--compression", type=float, default=None)
    options.add_argument("--stats-memory-gib", type=float, default=None,
                         help="also measure this checkout with stats_memory= this many GiB")
    args = baseline_options(options).parse_args()
    if args.child:
        child(args)
        return
    budget = ("keep half of every hidden layer" if args.compression is None
              else f"compression={args.compression:g} (error-curve allocation)")
    print(f"python {sys.version.split()[0]}; MLP of {args.depth} Linear layers of width {args.width}; {budget}, "
          f"method={args.method!r}, {args.samples} samples; peak memory during the pruning")
    srcs = sources(args.baseline_src, ROOT)
    argv = ["--width", str(args.width), "--depth", str(args.depth), "--samples", str(args.samples),
            "--method", args.method] + ([] if args.compression is None else ["--compression", str(args.compression)])
    runs = {name: run_child(__file__, src, argv, name) for name, src in srcs.items()}
    if args.stats_memory_gib is not None:
        limited = f"this checkout, stats_memory={args.stats_memory_gib:g} GiB"
        runs[limited] = run_child(__file__, ROOT, [*argv, "--stats-memory-gib", str(args.stats_memory_gib)], limited)
    for name, r in runs.items():
        print(f"{name}: {r['mib']:.0f} MiB, {r['seconds']:.1f} s")
    print(f"the model's weights: {runs['this checkout']['model_mib']:.0f} MiB")
    if args.stats_memory_gib is not None:
        one, parts = runs["this checkout"], runs[limited]
        same = "same" if same_results([parts, one]) else "DIFFERENT"
        print(f"one pass / stats_memory={args.stats_memory_gib:g} GiB: {one['mib'] / parts['mib']:.2f}x the peak, "
              f"{one['seconds'] / parts['seconds']:.2f}x the time; {same} kept units and errors")
    if "baseline" in runs:
        old, new = runs["baseline"], runs["this checkout"]
        same = "same" if same_results([new, old]) else "DIFFERENT"
        print(f"baseline / this checkout: {old['mib'] / new['mib']:.2f}x the peak ({old['mib'] - new['mib']:.0f} MiB "
              f"less), {old['seconds'] / new['seconds']:.2f}x the time; {same} kept units and errors")


if __name__ == "__main__":
    main()
