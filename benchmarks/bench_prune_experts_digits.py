"""Whole experts removed from a trained mixture of experts without fine-tuning: a small Mixtral on digits.

A small Mixtral (``transformers``' ``MixtralModel``: an image's 8 rows of 8 pixels as 8 tokens, a linear embedding
of width 32, 2 layers of 4 heads, each with a mixture of 8 SwiGLU experts of 32 neurons, top-2 routing; the states
mean-pooled into a linear classifier) is trained on scikit-learn's digits (the demo's fixed 80/20 split, nothing
downloaded; AdamW at 3e-3, weight decay 0.05, one-cycle schedule, 60 epochs of mini-batches of 64, float32, seed 0,
with Mixtral's load-balancing loss at 0.02 so that every expert is used; cached in ``$SUBMOD_CACHE_DIR`` as a state
dict). Each mixture then keeps 6, 4 or 2 of its 8 experts (``target="experts"``, keep 0.75 / 0.5 / 0.25), chosen
from ``--calib`` unlabeled calibration images drawn from the training split by each seed: the greedy methods
(asym, layer: the kept set of least routed-output error on the calibration tokens, every kept set tried) and the
baselines (weight magnitude; routed output mass, ``method="wanda"``; random), each with the kept experts' down
projections refitted (the default) and some without (``reweight=False``); asym also with the kept experts split
between the two mixtures by their error curves (``allocation="error-curve"``). Accuracy on the 360 test images,
which nothing is tuned on: mean +- std over seeds, and asym's accuracy as a RATIO to each baseline measured in the
same run; also how often each expert is routed to. Empirical estimates on one trained network.

Run:  python benchmarks/bench_prune_experts_digits.py [--seeds 5] [--calib 100]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tables import print_method_rows  # noqa: E402
from _train import digits_setup, prune_over_seeds, train, trained  # noqa: E402

from nn_adapters.digits import accuracy  # noqa: E402

# label -> (method, reweight[, allocation])
METHODS = {"asym + refit": ("asym", True), "asym + refit, curve": ("asym", True, "error-curve"),
           "layer + refit": ("layer", True), "magnitude + refit": ("magnitude", True),
           "wanda + refit": ("wanda", True), "random + refit": ("random", True), "asym, no refit": ("asym", False),
           "magnitude, no refit": ("magnitude", False), "wanda, no refit": ("wanda", False),
           "random, no refit": ("random", False)}
BASELINES = ["magnitude + refit", "wanda + refit", "random + refit", "magnitude, no refit", "wanda, no refit"]
KEEPS = (0.75, 0.5, 0.25)
EXPERTS, TOP_K = 8, 2


class MixtralDigits(nn.Module):
    """A small ``MixtralModel`` on the 8 pixel rows of a digit image as tokens, mean-pooled into 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.MixtralConfig(vocab_size=2, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, num_local_experts=EXPERTS,
                                         num_experts_per_tok=TOP_K, max_position_embeddings=8, router_jitter_noise=0.0,
                                         output_router_logits=True)
        self.embed = nn.Linear(8, 32)
        self.net = transformers.MixtralModel(cfg)
        self.head = nn.Linear(32, 10)
        self.router_logits: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(inputs_embeds=self.embed(x.reshape(x.shape[0], 8, 8)))
        self.router_logits = out.router_logits or ()  # read by the load-balancing loss in training
        return self.head(out.last_hidden_state.mean(1))


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Mixtral's load-balancing loss (Switch Transformer's) on the last forward's router logits, times 0.02."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return 0.02 * load_balancing_loss_func(model.router_logits, EXPERTS, TOP_K)


def routing_shares(model: nn.Module, X: torch.Tensor) -> list[np.ndarray]:
    """Per mixture, the share of the (token, slot) routings each expert receives on the images ``X``."""
    with torch.no_grad():
        model(X)
    return [np.bincount(torch.topk(r, TOP_K, dim=-1).indices.reshape(-1).numpy(), minlength=EXPERTS)
            / (r.shape[0] * TOP_K) for r in model.router_logits]


def main() -> None:
    args, (Xtr, ytr, Xte, yte) = digits_setup(__doc__.splitlines()[0])
    torch.manual_seed(0)
    model, how = trained(MixtralDigits(), "digits_mixtral-e8k2-h32-adamw60-seed0.pt",
                         lambda m: train(m, Xtr, ytr, lr=3e-3, extra_loss=balance_loss), args.retrain)
    base = accuracy(model, Xte, yte)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nMixtral, {EXPERTS} experts, top-{TOP_K}: {n_params} parameters ({how}); unpruned test accuracy "
          f"{100 * base:.2f}%")
    for i, share in enumerate(routing_shares(model, Xte)):
        print(f"  layer {i}: share of routings per expert on the test images: "
              + " ".join(f"{s:.2f}" for s in share))
    for keep in KEEPS:
        runs = {label: {"keep": keep, "target": "experts", "method": run[0], "reweight": run[1],
                        "allocation": run[2] if len(run) > 2 else "uniform"} for label, run in METHODS.items()}
        acc, secs, reports = prune_over_seeds(model, (Xtr, ytr, Xte, yte), args.seeds, args.calib, runs)
        search = sorted({u.search for r in reports for u in r.units if u.search})
        params = reports[-1].params_after
        print(f"\n  keep {round(keep * EXPERTS)} of {EXPERTS} experts per mixture: {params} parameters "
              f"({n_params / params:.2f}x fewer; search: {', '.join(search)}); test accuracy %, mean +- std over "
              "seeds")
        print_method_rows(acc, secs, "asym + refit", BASELINES, 20)
        curve = list(METHODS).index("asym + refit, curve")
        splits = sorted({tuple(u.n_kept for u in r.units) for r in reports[curve::len(METHODS)]})
        print("    experts kept per mixture by the error-curve allocation (over seeds): "
              + ", ".join(" + ".join(map(str, split)) for split in splits))

if __name__ == "__main__":
    main()
