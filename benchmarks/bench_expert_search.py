"""Whole-expert pruning of mixtures: the search's time, batched against calling the router per candidate.

A randomly initialised Qwen3-MoE (``transformers``, nothing downloaded; hidden width 256 (``--hidden``), 2 layers,
experts of 128 neurons, top-8 routing (``--top-k``) renormalised over each token's experts) with 64 and 128 experts
per layer keeps half of them (``target="experts"``, layer mode, no refit: the search alone) from 16 sequences of
128 random tokens (2048 tokens). Backward elimination (``EXHAUSTIVE_LIMIT`` far exceeded) evaluates a step's
candidate removals all at once from one routing of every token among one more expert (``SEARCH = "batched"``, the
default), or, the baselines measured in the same run, by calling the router for each candidate on the tokens
routed to the removed expert (``"local"``) or on every token (``"full"``). With ``--enumerate`` (few experts, e.g.
``--experts 8 10 --top-k 2``: every kept set tried), the enumeration routes every kept set at once from each
token's ranking of the experts (``BATCHED_ENUMERATION``, the default) against calling the router on each kept set.
Prints the wall time of each, the ratios, and checks that all keep the same experts with the same error (up to
the float32 rounding of the experts' outputs).

Run:  python benchmarks/bench_expert_search.py [--experts 64 128] [--hidden 256] [--top-k 8]
          [--searches full local batched] [--enumerate]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nn_adapters._experts as experts  # noqa: E402
from nn_adapters.transformer import prune_transformer  # noqa: E402


def model_with(n_experts: int, hidden: int, top_k: int = 8) -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=512,
                                      moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64, num_experts=n_experts,
                                      num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=True)
    torch.manual_seed(0)
    return transformers.Qwen3MoeModel(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    parser.add_argument("--searches", nargs="+", default=["full", "local", "batched"],
                        choices=["full", "local", "batched"], help="searches timed; ratios against the last one")
    parser.add_argument("--enumerate", action="store_true",
                        help="time the enumeration of every kept set (per set against batched) instead")
    args = parser.parse_args()
    if args.enumerate:
        args.searches = ["per set", "batched"]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (8, 128), generator=g)} for _ in range(2)]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"hidden width {args.hidden}, top-{args.top_k}, 2048 calibration tokens, keep half of the experts of "
          f"2 layers{' (every kept set tried)' if args.enumerate else ''}")
    for n in args.experts:
        model = model_with(n, args.hidden, args.top_k)
        times, kept = {}, {}
        for search in args.searches:
            if args.enumerate:
                experts.BATCHED_ENUMERATION = search == "batched"
            else:
                experts.SEARCH = search
            t0 = time.perf_counter()
            _, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer",
                                          reweight=False)
            times[search] = time.perf_counter() - t0
            kept[search] = [(u.kept, u.relative_error) for u in report.units]
        experts.SEARCH, experts.BATCHED_ENUMERATION = "batched", True
        searches = {u.search for u in report.units}
        if searches != {"exhaustive" if args.enumerate else "greedy"}:
            raise SystemExit(f"{n} experts: the search was {searches}; pass --enumerate only with few experts")
        ref = kept[args.searches[-1]]
        same = all([k for k, _ in got] == [k for k, _ in ref] and all(
            abs(e - f) <= 1e-6 * abs(f) for (_, e), (_, f) in zip(got, ref)) for got in kept.values())
        cells = ", ".join(f"{s} {times[s]:.1f} s" for s in args.searches)
        base = args.searches[-1]
        ratios = ", ".join(f"{s} {times[s] / times[base]:.1f}x" for s in args.searches[:-1])
        print(f"{n} experts: {cells}; {base} faster than {ratios} "
              f"({'same kept experts and errors' if same else 'DIFFERENT kept experts or errors'})")


if __name__ == "__main__":
    main()
