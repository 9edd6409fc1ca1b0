"""Shrinking a transformer's blocks: the wall time of ``prune_transformer`` where it is mostly the building of the
smaller layers, this checkout against another.

A randomly initialised Llama (``transformers``, nothing downloaded; hidden width ``--hidden``, 2048 by default, 4
layers, 11/4 as many FFN neurons, key/value groups of 4 query heads: 696 MiB of float32 weights) loses half of its
FFN neurons and key/value groups by weight magnitude without refit (``method="magnitude"``, ``reweight=False``:
no statistics are gathered, so the time is the selection's bookkeeping and the shrinking), from one batch of 2 x 32
token ids. Each smaller layer used to be built as a fresh ``nn.Linear`` (randomly initialised: a write of the whole
layer) before the kept weights were copied into it; it is now built on ``meta`` and given empty storage
(``_uninitialised``). Each run is a fresh process (``--repeats`` runs of each checkout, interleaved; the median is
printed); the pruned models' outputs are compared.

With ``--baseline-src DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/old 645e80b``) that code
prunes the same model in the same run.

Run:  python benchmarks/bench_shrink_time.py [--hidden 2048] [--repeats 3] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _memory import baseline_options, run_child, sources
from bench_load_memory import build

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """Prune the model once; prints a JSON line (seconds, the first outputs of the pruned model)."""
    import torch

    from nn_adapters.transformer import prune_transformer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, ids = build(args.hidden)
    t0 = time.perf_counter()
    pruned, _ = prune_transformer(model, [{"input_ids": ids}], keep=0.5, target="all", method="magnitude",
                                  reweight=False)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = pruned(input_ids=ids).last_hidden_state
    print(json.dumps({"seconds": seconds, "out": out.flatten()[:64].tolist()}))


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--hidden", type=int, default=2048)
    options.add_argument("--repeats", type=int, default=3)
    args = baseline_options(options).parse_args()
    if args.child:
        child(args)
        return
    srcs = sources(args.baseline_src, ROOT)
    runs: dict[str, list[dict]] = {name: [] for name in srcs}
    for _ in range(args.repeats):
        for name, src in srcs.items():
            runs[name].append(run_child(__file__, src, ["--hidden", str(args.hidden)], name))
    print(f"Llama, hidden width {args.hidden}, 4 layers; half of the FFN neurons and key/value groups removed by "
          f"magnitude without refit; median of {args.repeats} fresh processes")
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    outs = [r["out"] for rs in runs.values() for r in rs]
    for name, seconds in median.items():
        print(f"{name}: {seconds:.2f} s")
    print("pruned models' outputs: " + ("equal" if all(o == outs[0] for o in outs) else "DIFFERENT"))
    if "baseline" in median:
        print(f"baseline / this checkout: {median['baseline'] / median['this checkout']:.2f}x the time")


if __name__ == "__main__":
    main()
