"""Whole-expert pruning of mixtures: peak memory and time against the number of calibration tokens.

A randomly initialised Qwen3-MoE (``transformers``, nothing downloaded; hidden width 1024 (``--hidden``), 2 layers,
64 experts of 256 neurons, top-8 routing renormalised over each token's experts) keeps half of its experts
(``target="experts"``, AsymInChange, with the refit) from ``--tokens`` calibration tokens (sequences of 256 random
tokens). Each run is a fresh process, so that its peak resident memory (``ru_maxrss``) is its own; the figure
printed is the peak during the pruning minus the peak before it (model, data).

Compared in the same run: the code of this checkout with its cache of the experts' outputs held to
``--cache-mib`` (default: the library's :data:`nn_adapters._experts.OUTPUT_CACHE_BYTES`) and with no cache at all
(0: every output recomputed when needed), and, with ``--baseline-src DIR`` (a checkout of an earlier commit, e.g.
``git worktree add /tmp/old 387dbdf``), that code, which cached every output it computed and held per-token
tensors of the experts' outputs (tokens x top-k x hidden, float64) for the target and the refit. Checks that every
run keeps the same experts with the same errors (up to float32 rounding of the experts' outputs).

Run:  python benchmarks/bench_expert_memory.py [--tokens 4096 16384] [--hidden 1024] [--experts 64]
          [--cache-mib MIB] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _memory import measure_pruning, parser, run_child, same_results

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One pruning run in this process; prints a JSON line (peak memory in MiB, seconds, kept experts, errors)."""
    import torch
    import transformers

    import nn_adapters._experts as experts

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.cache_mib is not None:
        if not hasattr(experts, "OUTPUT_CACHE_BYTES"):
            raise SystemExit("this code has no OUTPUT_CACHE_BYTES: run it without --cache-mib")
        experts.OUTPUT_CACHE_BYTES = int(args.cache_mib * 2**20)
    cfg = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=512,
                                      moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=64, num_experts=args.experts,
                                      num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeModel(cfg).eval()
    print(json.dumps(measure_pruning(model, args.tokens[0], target="experts", method="asym")))


def run(src: Path, args: argparse.Namespace, tokens: int, cache_mib: float | None) -> dict:
    argv = ["--tokens", str(tokens), "--hidden", str(args.hidden), "--experts", str(args.experts)]
    if cache_mib is not None:
        argv += ["--cache-mib", str(cache_mib)]
    return run_child(__file__, src, argv, f"cache {cache_mib} MiB")


def main() -> None:
    options = parser(__doc__, [4096, 16384])
    options.add_argument("--experts", type=int, default=64)
    options.add_argument("--cache-mib", type=float, default=None,
                         help="the cache's bound in MiB (default: the library's)")
    args = options.parse_args()
    if args.child:
        child(args)
        return
    print(f"python {sys.version.split()[0]}; hidden width {args.hidden}, {args.experts} experts, top-8, 2 layers, "
          "keep half (asym, refit); peak memory during the pruning (MiB) and wall time")
    for tokens in args.tokens:
        runs = {}
        if args.baseline_src is not None:
            runs["baseline"] = run(args.baseline_src.resolve(), args, tokens, None)
        runs["bounded cache"] = run(ROOT, args, tokens, args.cache_mib)
        runs["no cache"] = run(ROOT, args, tokens, 0)
        ref = runs["bounded cache"]
        same = same_results([ref, *runs.values()])
        cells = "; ".join(f"{name} {r['mib']:.0f} MiB, {r['seconds']:.1f} s" for name, r in runs.items())
        ratios = ", ".join(f"{name} {r['mib'] / max(ref['mib'], 1):.2f}x memory, "
                           f"{r['seconds'] / ref['seconds']:.2f}x time"
                           for name, r in runs.items() if name != "bounded cache")
        print(f"{tokens} tokens: {cells}; against the bounded cache: {ratios} "
              f"({'same kept experts and errors' if same else 'DIFFERENT kept experts or errors'})")


if __name__ == "__main__":
    main()
