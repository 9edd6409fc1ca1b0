"""Whole-expert pruning of wide mixtures: the backward-elimination search's time, local against full evaluation.

A randomly initialised Qwen3-MoE (``transformers``, nothing downloaded; hidden width 256 (``--hidden``), 2 layers,
experts of 128 neurons, top-8 routing renormalised over each token's experts) with 64 and 128 experts per layer
keeps half of them
(``target="experts"``, layer mode, no refit: the search alone, ``EXHAUSTIVE_LIMIT`` far exceeded) from 16
sequences of 128 random tokens (2048 tokens). The search evaluates each candidate removal by re-routing only the
tokens routed to the removed expert (the default, checked at every step against routing every token) or, as the
baseline measured in the same run, by routing every token for every candidate (``LOCAL_SEARCH = False``). Prints
the wall time of each and the ratio, and checks that both keep the same experts with the same error.

Run:  python benchmarks/bench_expert_search.py [--experts 64 128] [--hidden 256]
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


def model_with(n_experts: int, hidden: int) -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=512,
                                      moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64, num_experts=n_experts, num_experts_per_tok=8,
                                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    return transformers.Qwen3MoeModel(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (8, 128), generator=g)} for _ in range(2)]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"hidden width {args.hidden}, 2048 calibration tokens, keep half of the experts of 2 layers")
    for n in args.experts:
        model = model_with(n, args.hidden)
        times, kept = {}, {}
        for local in (False, True):
            experts.LOCAL_SEARCH = local
            t0 = time.perf_counter()
            _, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer",
                                          reweight=False)
            times[local] = time.perf_counter() - t0
            kept[local] = [(u.kept, round(u.relative_error, 9)) for u in report.units]
        experts.LOCAL_SEARCH = True
        same = "same kept experts and errors" if kept[True] == kept[False] else "DIFFERENT kept experts"
        print(f"{n} experts: full evaluation {times[False]:.1f} s, local {times[True]:.1f} s: "
              f"{times[False] / times[True]:.1f}x faster ({same})")


if __name__ == "__main__":
    main()
