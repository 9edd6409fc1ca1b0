"""Training and caching of the small transformers the digits benchmarks prune (run from ``benchmarks/`` or the
repository root)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from torch import nn

from nn_adapters.digits import cache_dir


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int = 60, lr: float = 2e-3,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> nn.Module:
    """Cross-entropy training in place (AdamW, weight decay 0.05, one-cycle schedule, batches of 64 shuffled with
    seed 0), plus ``extra_loss(model)`` after each forward if given (a mixture's load-balancing loss); the model is
    returned in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = (len(X) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def trained(model: nn.Module, name: str, fit: Callable[[nn.Module], nn.Module], retrain: bool
            ) -> tuple[nn.Module, str]:
    """``model`` with its trained weights: from the cache (``$SUBMOD_CACHE_DIR/name``, a state dict loaded with
    ``weights_only``), or trained now by ``fit(model)`` and cached atomically; and how it was obtained."""
    path = cache_dir() / name
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), "cached"
    t0 = time.perf_counter()
    fit(model)
    took = time.perf_counter() - t0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: run without it
        print(f"could not cache the model at {path}: {exc}")
    return model.eval(), f"trained in {took:.0f}s"
