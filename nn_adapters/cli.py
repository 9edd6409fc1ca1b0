"""Subcommands ``submod demo`` and ``submod prune`` (registered into the ``submod`` command by submod.cli)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` and ``prune`` subcommands to ``subparsers``."""
    demo = subparsers.add_parser(
        "demo", help="prune a digits CNN with every method from a few unlabeled images; table, plot, report",
        description="Train (or load from the cache) a small CNN on scikit-learn's digits, prune it at 2x-16x "
        "parameter compression from 50/100/500 unlabeled images with every method and no fine-tuning, and write "
        "a table, a plot and a Markdown report.")
    demo.add_argument("--out", default="submod_demo_out", help="output directory (default ./submod_demo_out)")
    demo.add_argument("--compressions", type=float, nargs="+", default=[2, 4, 8, 16])
    demo.add_argument("--calib", type=int, nargs="+", default=[50, 100, 500], help="calibration set sizes")
    demo.add_argument("--retrain", action="store_true", help="ignore the cached model and train again")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch/BLAS threads (default 1: fastest for this small model on a shared machine)")
    demo.set_defaults(func=_run_demo)

    pr = subparsers.add_parser(
        "prune", help="prune your model: module:function returning (model, calibration loader[, eval loader])",
        description="Import MODULE:FUNCTION (from the current directory or PYTHONPATH); it must return "
        "(model, calibration_loader) or (model, calibration_loader, eval_loader). Prune the model, print the "
        "report (and the accuracy before/after on the eval loader of (inputs, labels) batches), save the pruned "
        "model with nn_adapters.save_pruned.")
    pr.add_argument("spec", help="module:function, e.g. mymodels:build")
    grp = pr.add_mutually_exclusive_group()
    grp.add_argument("--compression", type=float,
                     help="whole-network parameter compression of an MLP/CNN, e.g. 4 (the default when --keep is "
                          "not given)")
    grp.add_argument("--keep", type=float, help="fraction of units kept in every prunable layer, e.g. 0.5 (for "
                                                "transformers: of the FFN neurons of every block; required there)")
    pr.add_argument("--method", default="asym",
                    choices=("asym", "seq", "layer", "random", "weight_norm", "act_norm", "actgrad", "magnitude",
                             "wanda"),
                    help="greedy selection (asym, seq, layer) or a baseline; magnitude and wanda are the transformer "
                         "path's names of weight_norm and act_norm, accepted on both paths; actgrad uses labels")
    pr.add_argument("--no-reweight", action="store_true", help="keep the original weights (no least-squares refit)")
    pr.add_argument("--allocation", choices=("uniform", "error-curve", "error"), default="uniform",
                    help="how the budget is split between layers or blocks (error: the earlier name of error-curve)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default="pruned_model.pt", help="where to save the pruned model (default pruned_model.pt)")
    pr.add_argument("--progress", action="store_true", help="show a progress bar")
    pr.add_argument("--workers", type=int, default=1,
                    help="with --method layer: worker processes for the layers' selection and refit (default 1: "
                    "all in this process; the executor= of nn_adapters.prune)")
    pr.set_defaults(func=_run_prune)


def _set_threads(n: int) -> object:
    import torch

    if n < 1:
        raise ValueError(f"--threads must be >= 1; got {n}.")
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: BLAS keeps its own default
        return None
    return threadpool_limits(n)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    limits = _set_threads(args.threads)
    try:
        run_demo(args.out, compressions=args.compressions, calib_sizes=args.calib, retrain=args.retrain)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    return 0


def _load_user(spec: str) -> tuple:
    if ":" not in spec:
        raise ValueError(f"expected module:function, got {spec!r} (e.g. mymodels:build).")
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} ({exc}); run from its directory or set "
                         "PYTHONPATH.") from exc
    except Exception as exc:  # the user's module failed while importing: say so in one line
        raise ValueError(f"importing {mod_name!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no callable {fn_name!r}.")
    try:
        out = fn()
    except Exception as exc:
        raise ValueError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ValueError(f"{spec} must return (model, calibration_loader) or (model, calibration_loader, "
                         f"eval_loader); got {type(out).__name__}.")
    import torch

    if not isinstance(out[0], torch.nn.Module):
        raise ValueError(f"{spec} must return a torch.nn.Module first; got {type(out[0]).__name__}.")
    if len(out) == 3:  # read a one-shot eval loader (a generator) once, before and after pruning alike
        out = (out[0], out[1], list(out[2]))
    return out


def _eval_accuracy(model: object, loader: object) -> float:
    import torch

    from ._data import float_dtype
    from ._modes import eval_mode

    correct = total = 0
    dtype = float_dtype(model)
    with eval_mode(model), torch.no_grad():  # the user's model keeps its train/eval modes
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("the evaluation loader must yield (inputs, labels) batches.")
            x, y = batch[0], batch[1]
            if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.to(dtype)  # as the calibration data is
            try:
                logits = model(x)
            except Exception as exc:  # noqa: BLE001 - the user's model on the user's data: report it in one line
                raise ValueError(f"the model failed on a batch of the evaluation loader ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); check that it yields the "
                                 "model's inputs.") from exc
            if not isinstance(logits, torch.Tensor):
                raise ValueError(f"accuracy needs the model to return a tensor of class scores; it returned "
                                 f"{type(logits).__name__}. Drop the evaluation loader to prune without it.")
            pred = logits.argmax(dim=-1)
            y = torch.as_tensor(y, device=pred.device)
            if y.shape != pred.shape and y.shape == (*pred.shape, 1):  # labels as a column, (N, 1)
                y = y.squeeze(-1)
            if y.shape != pred.shape:  # comparing them would broadcast, e.g. (N,) against (N, 1) to (N, N)
                raise ValueError(f"the labels of the evaluation loader have shape {tuple(y.shape)} and the "
                                 f"predictions (the argmax over the model's last dim) {tuple(pred.shape)}; pass "
                                 "one class index per prediction.")
            correct += int((pred == y).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("the evaluation loader is empty.")
    return correct / total


def _run_prune(args: argparse.Namespace) -> int:
    from submod._atomic import check_file_path

    from . import prune, save_pruned
    from .pruning import _is_transformer

    compression = 4.0 if args.compression is None and args.keep is None else args.compression
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}.")
    if args.workers > 1 and args.method != "layer":
        raise ValueError(f"--workers {args.workers} needs --method layer: with --method {args.method} every layer's "
                         "statistics come from the network pruned before it, so the layers are pruned one after "
                         "another.")
    check_file_path(args.out, "--out")  # found now, not after the pruning
    model, calib, *rest = _load_user(args.spec)
    if args.keep is None and _is_transformer(model):  # before the default --compression 4 is blamed on the user
        raise ValueError(f"{type(model).__name__} holds transformer blocks, which are pruned per block: pass --keep "
                         "(e.g. --keep 0.5, the fraction of FFN neurons kept in every block); --compression (a "
                         "whole-network parameter ratio) applies to MLPs and CNNs.")
    before = _eval_accuracy(model, rest[0]) if rest else None
    with contextlib.ExitStack() as stack:
        # processes: the layers' jobs pickle (numpy statistics), and each worker has its own interpreter and BLAS
        pool = stack.enter_context(ProcessPoolExecutor(args.workers)) if args.workers > 1 else None
        pruned, report = prune(model, calib, compression=compression, keep=args.keep, method=args.method,
                               reweight=not args.no_reweight, seed=args.seed, allocation=args.allocation,
                               progress=args.progress, executor=pool)
    print(report.summary())
    if rest:
        after = _eval_accuracy(pruned, rest[0])
        print(f"accuracy on the evaluation loader: {100 * before:.2f}% -> {100 * after:.2f}% (no fine-tuning)")
    path = save_pruned(pruned, Path(args.out))
    print(f"saved the pruned model to {path} (load with nn_adapters.load_pruned(path, base_model=...))")
    return 0
