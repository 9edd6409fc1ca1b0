"""Training and caching of the small transformers the digits benchmarks prune (run from ``benchmarks/`` or the
repository root)."""

from __future__ import annotations

import argparse
import os
import sys
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


def prune_over_seeds(model: nn.Module, data: tuple[torch.Tensor, ...], seeds: int, n_calib: int,
                     runs: dict[str, dict]) -> tuple[dict[str, list[float]], dict[str, list[float]], list]:
    """Prune ``model`` with each of ``runs`` (label -> keyword arguments of
    :func:`nn_adapters.transformer.prune_transformer`) from ``n_calib`` training images drawn by each seed
    (batches of 50; the seed is passed on too), and measure the test accuracy. ``data``: the digits split
    ``(X_train, y_train, X_test, y_test)``. Returns the accuracies and the pruning seconds per label (one per seed)
    and every report."""
    from nn_adapters.digits import accuracy
    from nn_adapters.transformer import prune_transformer

    Xtr, _, Xte, yte = data
    acc: dict[str, list[float]] = {label: [] for label in runs}
    secs: dict[str, list[float]] = {label: [] for label in runs}
    reports = []
    for seed in range(seeds):
        idx = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(seed))[:n_calib]
        calib = [Xtr[idx[i:i + 50]] for i in range(0, len(idx), 50)]
        for label, options in runs.items():
            t0 = time.perf_counter()
            pruned, report = prune_transformer(model, calib, seed=seed, **options)
            secs[label].append(time.perf_counter() - t0)
            acc[label].append(accuracy(pruned, Xte, yte))
            reports.append(report)
    return acc, secs, reports


def digits_setup(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> tuple[argparse.Namespace, tuple[torch.Tensor, ...]]:
    """The command line of a digits pruning benchmark (``--seeds``, ``--calib``, ``--retrain`` and those
    ``add_arguments`` adds), torch's threads (at most 2), the digits split ``(X_train, y_train, X_test, y_test)``,
    and the header line saying so."""
    from nn_adapters.digits import load_digits_split

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--retrain", action="store_true")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = load_digits_split()
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}; digits "
          f"{len(data[0])} training / {len(data[2])} test images; {args.calib} calibration images; {args.seeds} "
          "seeds; no fine-tuning")
    return args, data
