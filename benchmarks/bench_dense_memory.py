"""Pruning a dense decoder: peak memory and time against the number of calibration tokens.

A randomly initialised Llama (``transformers``, nothing downloaded; hidden width 1024 (``--hidden``), 4 layers, 16
query heads of 64 over 4 key/value heads, FFN 2816) keeps half of the units of ``--target`` (``ffn`` by default;
``all``: key/value groups too) with ``--method`` (``asym`` by default, with the refit) from ``--tokens``
calibration tokens (sequences of 256 random tokens, 8 a batch). Each run is a fresh process, so that its peak
resident memory is its own; the figure printed is the peak during the pruning minus the peak before it (model,
data). The statistics (Gram matrices per block and stage, their cross-validation folds) take the same memory
whatever the number of tokens; what grows with the tokens is what the sequential modes cache: every calibration
token's hidden state at a block's input, in the original and in the pruned network, and the targets of asym mode.
The growth per token is the least-squares slope over the token counts given (noisy by a few KiB a token: the
allocator's peaks are not exactly reproducible).

With ``--baseline-src DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/old 170c940``) that
code is measured in the same run, each token count right before this checkout's, and the kept units and errors
are checked to be the same.

Run:  python benchmarks/bench_dense_memory.py [--tokens 4096 8192 16384] [--hidden 1024] [--target ffn|heads|all]
          [--method asym|seq|layer|...] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _memory import measure_pruning, parser, run_child, same_results, sources

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One pruning run in this process; prints a JSON line (peak memory in MiB, seconds, kept units, errors)."""
    import torch
    import transformers

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                   num_hidden_layers=4, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=args.hidden // 256, head_dim=64)
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    print(json.dumps(measure_pruning(model, args.tokens[0], target=args.target, method=args.method)))


def slope(x: list[int], y: list[float]) -> float:
    """The least-squares slope of ``y`` against ``x``."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def main() -> None:
    options = parser(__doc__, [4096, 8192, 16384])
    options.add_argument("--target", default="ffn")
    options.add_argument("--method", default="asym")
    args = options.parse_args()
    if args.child:
        child(args)
        return
    print(f"python {sys.version.split()[0]}; Llama, hidden width {args.hidden}, 4 layers; keep half of "
          f"target={args.target!r}, method={args.method!r}; peak memory during the pruning (MiB) and wall time")
    srcs = sources(args.baseline_src, ROOT)
    runs: dict[str, list[dict]] = {name: [] for name in srcs}
    for tokens in args.tokens:
        for name, src in srcs.items():
            argv = ["--tokens", str(tokens), "--hidden", str(args.hidden), "--target", args.target,
                    "--method", args.method]
            runs[name].append(run_child(__file__, src, argv, f"{tokens} tokens"))
        here = [r[-1] for r in runs.values()]
        cells = "; ".join(f"{name} {r[-1]['mib']:.0f} MiB, {r[-1]['seconds']:.1f} s" for name, r in runs.items())
        check = "" if len(here) < 2 else (" (same kept units and errors)" if same_results(here)
                                          else " (DIFFERENT kept units or errors)")
        print(f"{tokens} tokens: {cells}{check}")
    print(f"the model's weights: {runs['this checkout'][0]['model_mib']:.0f} MiB")
    if len(args.tokens) >= 2:
        growth = {name: slope(args.tokens, [x["mib"] * 1024 for x in r]) for name, r in runs.items()}
        line = ", ".join(f"{name} {kib:.1f} KiB" for name, kib in growth.items())
        print(f"growth a token (least squares over {', '.join(map(str, args.tokens))} tokens): {line}")
        if "baseline" in runs:
            old, new = runs["baseline"][-1], runs["this checkout"][-1]
            print(f"baseline / this checkout: {growth['baseline'] / growth['this checkout']:.2f}x the growth a "
                  f"token, {old['mib'] / new['mib']:.2f}x the peak at {args.tokens[-1]} tokens, "
                  f"{old['seconds'] / new['seconds']:.2f}x the time")


if __name__ == "__main__":
    main()
