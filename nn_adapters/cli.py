"""Subcommands ``submod demo`` and ``submod prune`` (registered into the ``submod`` command by submod.cli)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from submod.cli import seed_arg

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` and ``prune`` subcommands to ``subparsers``."""
    demo = subparsers.add_parser(
        "demo", help="prune a digits CNN with every method from a few unlabeled images; table, plot, report",
        description="Train (or load from the cache) a small CNN on scikit-learn's digits, prune it at 2x-16x "
        "parameter compression from 50/100/500 unlabeled images with every method and no fine-tuning, and write "
        "a table, a plot and a Markdown report.")
    demo.add_argument("--out", default="submod_demo_out", help="output directory (default ./submod_demo_out)")
    demo.add_argument("--compressions", type=float, nargs="+", default=[2, 4, 8, 16],
                      help="whole-network parameter compressions (default 2 4 8 16)")
    demo.add_argument("--calib", type=int, nargs="+", default=[50, 100, 500],
                      help="calibration set sizes (default 50 100 500)")
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
    grp.add_argument("--compression", type=float, nargs="+", metavar="C",
                     help="whole-network parameter compression, e.g. 4 (the default for an MLP/CNN when --keep is "
                          "not given; for transformers the largest fraction kept in every block that reaches it); "
                          "several values with --compare (MLP/CNN; default there 2 4 8 16)")
    grp.add_argument("--keep", type=float, nargs="+", metavar="F",
                     help="fraction of units kept in every prunable layer, e.g. 0.5 (for transformers: of the FFN "
                          "neurons of every block; required there); several values with --compare")
    pr.add_argument("--keep-stage", nargs="+", metavar="STAGE=F", default=None,
                    help="transformers: the fraction kept of a stage, replacing --keep for it, e.g. --target all "
                         "--keep 0.5 --keep-stage heads=0.75 (half of the FFN neurons, three quarters of the heads); "
                         "stages heads, ffn, experts, cross (cross-attention heads, default: as heads) and shared "
                         "(shared experts, default: as ffn); with --compare, fixed while --keep is swept over "
                         "the other stages")
    pr.add_argument("--compare", action="store_true",
                    help="what submod demo does, for your model: prune with every method (or --methods) at every "
                         "budget, evaluate each pruned model on the eval loader (required), print the table and "
                         "write report.md, accuracy_vs_budget.png and results.json to --report-dir; no model is "
                         "saved")
    pr.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="with --compare: only these methods (e.g. asym weight_norm; default: all, ActGrad only "
                         "with labelled calibration batches)")
    pr.add_argument("--calib", type=int, nargs="+", metavar="N",
                    help="with --compare, MLP/CNN: also compare calibration sizes, pruning from the first N "
                         "calibration samples (e.g. 50 100 500, as the demo does; default: all of them)")
    pr.add_argument("--report-dir", default="submod_prune_report",
                    help="with --compare: output directory (default ./submod_prune_report)")
    pr.add_argument("--threads", type=int, default=None,
                    help="torch/BLAS threads (default: torch's own); 1 gives steadier latencies on a shared machine")
    # default None (asym): told apart from an explicit --method, which --compare refuses rather than ignores
    pr.add_argument("--method", default=None,
                    choices=("asym", "seq", "layer", "random", "weight_norm", "act_norm", "actgrad", "magnitude",
                             "wanda"),
                    help="greedy selection (asym, seq, layer; default asym) or a baseline; magnitude and wanda are the "
                         "transformer path's names of weight_norm and act_norm, accepted on both paths; actgrad uses "
                         "labels")
    pr.add_argument("--target", choices=("ffn", "heads", "all", "experts", "layers"), default=None,
                    help="what to prune: a transformer's FFN neurons, attention heads or both (default for models "
                         "with transformer blocks: ffn), whole experts of its mixtures of experts (experts), or "
                         "layers: the layer pairs found by tracing, whatever "
                         "blocks the model holds (a hybrid such as MobileViT; the default for MLPs and CNNs); also "
                         "with --compare")
    pr.add_argument("--head-unit", choices=("group", "query"), default=None,
                    help="transformers with grouped-query attention, with --target heads or all: remove whole "
                         "key/value groups (group, the default) or query heads, as many in every group (query); "
                         "also with --compare")
    pr.add_argument("--no-reweight", action="store_true", help="keep the original weights (no least-squares refit)")
    pr.add_argument("--weighting", choices=("none", "output", "layernorm"), default=None,
                    help="how each layer's least-squares rows are weighted (nn_adapters.prune weighting=): MLP/CNN "
                         "none (default) or output (by the model output's sensitivity to them); transformers "
                         "layernorm (default) or none")
    pr.add_argument("--allocation", choices=("uniform", "error-curve", "error"), default="uniform",
                    help="how the budget is split between layers or blocks (default uniform; error: the earlier name "
                         "of error-curve)")
    pr.add_argument("--seed", type=seed_arg, default=0,
                    help="seed of --method random (the other methods are deterministic; default 0)")
    pr.add_argument("--out", default=None,
                    help="where to save the pruned model: a file (default pruned_model.pt), or, for a transformer "
                         "whose heads or experts are pruned (--target heads, all or experts, or a mixture of "
                         "experts), a new directory (default pruned_model) written by "
                         "nn_adapters.transformer.save_pruned")
    pr.add_argument("--export-pretrained", action="store_true",
                    help="a Hugging Face transformer pruned uniformly (--keep): save --out as a standard checkpoint "
                         "(config.json with the pruned sizes) that from_pretrained loads, checked by loading it "
                         "(nn_adapters.transformer.export_pretrained); refused with the reason where the config "
                         "cannot express the pruned sizes")
    pr.add_argument("--progress", action="store_true", help="show a progress bar")
    pr.add_argument("--workers", type=int, default=1,
                    help="with --method layer: worker processes for the layers' selection and refit (default 1: "
                    "all in this process; the executor= of nn_adapters.prune)")
    pr.add_argument("--stats-memory-gib", type=float, default=None,
                    help="MLP/CNN, layer-wise statistics (--method layer, the error-curve allocation): the most GiB "
                         "of statistics held at once, the layers gathered in groups that fit, one pass over the "
                         "calibration data each (the stats_memory= of nn_adapters.prune; default: all in one pass)")
    pr.set_defaults(func=_run_prune)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch and BLAS threads (``None``: leave them as they are); restored afterwards."""
    if n is None:
        yield
        return
    import torch

    if n < 1:
        raise ValueError(f"--threads must be >= 1; got {n}.")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: BLAS keeps its own default
            yield
        else:
            with threadpool_limits(n):
                yield
    finally:
        torch.set_num_threads(before)


def _distinct(command: str, flag: str, values: list | None) -> list | None:
    """``values`` without repeats, in the order given; a repeat would be run, and tabulated, twice, so it is
    dropped and a note on standard error says so."""
    if values is None:
        return None
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = [v for v in unique if values.count(v) > 1]
        print(f"submod {command}: note: {flag} lists {' '.join(f'{v:g}' for v in repeated)} more than once; each "
              f"value runs once ({flag} {' '.join(f'{v:g}' for v in unique)}).", file=sys.stderr)
    return unique


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    compressions = _distinct("demo", "--compressions", args.compressions)
    calib = _distinct("demo", "--calib", args.calib)
    with _threads(args.threads):
        run_demo(args.out, compressions=compressions, calib_sizes=calib, retrain=args.retrain)
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


def _eval_accuracy(model: object, loader: list) -> float:
    from ._data import float_dtype
    from .compare import _eval_batches, accuracy_of, predictions

    batches = _eval_batches(loader, float_dtype(model))
    return accuracy_of(predictions(model, batches), batches)


def _run_prune(args: argparse.Namespace) -> int:
    with _threads(args.threads):
        return _run_compare(args) if args.compare else _prune_once(args)


def _prune_once(args: argparse.Namespace) -> int:
    from submod._atomic import check_dir_path, check_file_path

    from . import prune, save_pruned
    from .pruning import _is_transformer

    for flag, values in (("--compression", args.compression), ("--keep", args.keep), ("--methods", args.methods),
                         ("--calib", args.calib)):
        if values is not None and (flag in ("--methods", "--calib") or len(values) > 1):
            raise ValueError(f"{flag} {' '.join(map(str, values))}: several budgets, methods or calibration sizes "
                             "are for --compare "
                             "(prune with each and compare them); without it give one budget and --method.")
    keep = None if args.keep is None else args.keep[0]
    stage_keep = _stage_keep_arg(args.keep_stage)
    compression = 4.0 if args.compression is None and keep is None and not stage_keep else (
        None if args.compression is None else args.compression[0])
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}.")
    method = "asym" if args.method is None else args.method
    if args.workers > 1 and method != "layer":
        raise ValueError(f"--workers {args.workers} needs --method layer: with --method {method} every layer's "
                         "statistics come from the network pruned before it, so the layers are pruned one after "
                         "another.")
    model, calib, *rest = _load_user(args.spec)
    transformer = _is_transformer(model, args.target)
    stats_memory = None
    if args.stats_memory_gib is not None:
        if transformer:
            raise ValueError("--stats-memory-gib bounds the layer-wise statistics of MLP/CNN pruning; a transformer is "
                             "pruned block by block, one block's statistics at a time: drop --stats-memory-gib.")
        if not (args.stats_memory_gib > 0 and math.isfinite(args.stats_memory_gib)):
            raise ValueError(f"--stats-memory-gib must be a number of GiB > 0; got {args.stats_memory_gib}.")
        stats_memory = max(1, int(args.stats_memory_gib * 2**30))
    if args.export_pretrained and not (transformer and hasattr(model, "save_pretrained")
                                       and hasattr(model, "config")):
        raise ValueError("--export-pretrained writes a Hugging Face checkpoint; this model is not a transformers "
                         "model with transformer blocks: drop --export-pretrained.")
    as_directory = transformer and (args.export_pretrained or _saved_as_directory(model, args.target))
    out = args.out if args.out is not None else "pruned_model" if as_directory else "pruned_model.pt"
    # found now, not after the pruning (a transformer whose heads or experts go is saved as a directory)
    (check_dir_path if as_directory else check_file_path)(out, "--out")
    if stage_keep:
        if not transformer:
            raise ValueError("--keep-stage names stages of transformer blocks (heads, ffn, ...); this model is pruned "
                             "by its layer pairs: pass --keep or --compression.")
        if args.compression is not None:
            raise ValueError("--keep-stage fixes the fraction kept of a stage; --compression finds the fractions of "
                             "every stage: pass one of them.")
        from .transformer import _with_stage_keep

        keep = _with_stage_keep(keep, stage_keep, args.target)  # the stages not named keep --keep's fraction
    if keep is None and transformer and args.compression is None:  # the MLP/CNN default --compression 4 is not
        raise ValueError(f"{type(model).__name__} holds transformer blocks, which are pruned per block: pass --keep "
                         "(e.g. --keep 0.5, the fraction of FFN neurons kept in every block) or --compression (e.g. "
                         "--compression 1.5, the whole model's parameters before / after).")
    if keep is not None and args.allocation != "uniform" and not transformer:
        raise ValueError(f"--allocation {args.allocation} splits a --compression budget between the layers of an "
                         "MLP/CNN; with --keep every layer keeps that fraction. Pass --compression, or drop "
                         "--allocation.")
    before = _eval_accuracy(model, rest[0]) if rest else None
    with contextlib.ExitStack() as stack:
        # processes: the layers' jobs pickle (numpy statistics), and each worker has its own interpreter and BLAS.
        # Started fresh ("spawn"), not forked: this process already runs torch's threads, and a fork of a threaded
        # process can deadlock (Python >= 3.12 warns about it); a spawned worker imports the user's module from
        # the sys.path it is given, which includes the working directory added above.
        pool = (stack.enter_context(ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")))
                if args.workers > 1 else None)
        pruned, report = prune(model, calib, compression=compression, keep=keep, method=method,
                               reweight=not args.no_reweight, seed=args.seed, target=args.target,
                               allocation=args.allocation, progress=args.progress, executor=pool,
                               weighting=args.weighting, **_head_unit_arg(args, transformer),
                               **({} if stats_memory is None else {"stats_memory": stats_memory}))
    print(report.summary())
    if rest:
        after = _eval_accuracy(pruned, rest[0])
        print(f"accuracy on the evaluation loader: {100 * before:.2f}% -> {100 * after:.2f}% (no fine-tuning)")
    if args.export_pretrained:
        from .transformer import export_pretrained

        path = export_pretrained(pruned, Path(out))
        print(f"saved the pruned model to {path} as a standard checkpoint (load with {type(model).__name__}"
              ".from_pretrained(path), checked)")
    elif as_directory:
        from .transformer import save_pruned as save_directory

        path = save_directory(pruned, Path(out))
        print(f"saved the pruned model to {path} (load with nn_adapters.transformer.load_pruned(path, model), model "
              "an unpruned instance; a Hugging Face model is built from its config.json without one)")
    else:
        path = save_pruned(pruned, Path(out))
        print(f"saved the pruned model to {path} (load with nn_adapters.load_pruned(path, base_model=...))")
    return 0


_STAGES = ("heads", "ffn", "experts", "cross", "shared")


def _saved_as_directory(model: Any, target: str | None) -> bool:
    """Whether the pruned transformer is saved by nn_adapters.transformer.save_pruned (a directory): its heads or
    experts are pruned, or it holds a mixture of experts, whose sizes the single-file format does not record."""
    from ._transformer_blocks import find_blocks

    return target in ("heads", "all", "experts") or any(b.moe for b in find_blocks(model))


def _head_unit_arg(args: argparse.Namespace, transformer: bool) -> dict[str, str]:
    """``--head-unit`` as the ``head_unit`` keyword of the transformer path (none when not given)."""
    if args.head_unit is None:
        return {}
    if not transformer:
        raise ValueError("--head-unit chooses the attention unit of transformer blocks; this model is pruned by its "
                         "layer pairs: drop --head-unit.")
    return {"head_unit": args.head_unit}


def _stage_keep_arg(values: list[str] | None) -> dict[str, float]:
    """``--keep-stage heads=0.75 ffn=0.5`` as ``{"heads": 0.75, "ffn": 0.5}`` (checked by prune_transformer)."""
    out: dict[str, float] = {}
    for item in values or []:
        stage, sep, frac = item.partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = None
        if not sep or value is None or stage in out or stage not in _STAGES:
            raise ValueError(f"--keep-stage {item}: give each stage once as STAGE=FRACTION, the stage one of "
                             f"{', '.join(_STAGES)}, e.g. heads=0.75")
        out[stage] = value
    return out


def _run_compare(args: argparse.Namespace) -> int:
    from ._names import canonical_method
    from .compare import TRANSFORMER_METHODS, compare_methods, write_comparison
    from .demo import DEMO_METHODS
    from .pruning import _METHOD_NAMES, _is_transformer

    if args.method is not None:  # it would be ignored: every method (or those of --methods) runs
        raise ValueError(f"--method {args.method} names the one method of a plain prune; --compare prunes with every "
                         f"method, or with those of --methods (e.g. --methods {args.method}).")
    if (args.workers != 1 or args.progress or args.allocation != "uniform" or args.no_reweight
            or args.weighting is not None or args.stats_memory_gib is not None or args.export_pretrained):
        raise ValueError("--compare prunes with every method's own settings (each with and without refit as the "
                         "demo does, uniform allocation, default weighting, one process) and saves no model; drop "
                         "--workers, --progress, --allocation, --weighting, --stats-memory-gib, --export-pretrained "
                         "and --no-reweight, or prune once without --compare.")
    args.keep = _distinct("prune", "--keep", args.keep)
    args.compression = _distinct("prune", "--compression", args.compression)
    args.calib = _distinct("prune", "--calib", args.calib)
    model, calib, *rest = _load_user(args.spec)
    if not rest:
        raise ValueError(f"--compare evaluates every pruned model: {args.spec} must return (model, "
                         "calibration_loader, eval_loader) with (inputs, labels) evaluation batches.")
    transformer = _is_transformer(model, args.target)
    if args.keep is not None:
        budget, budgets = "keep", args.keep
    elif transformer and args.compression is None:
        raise ValueError(f"{type(model).__name__} holds transformer blocks, which are pruned per block: pass --keep "
                         "with the fractions to compare (e.g. --keep 0.75 0.5 0.25), or --compression with the "
                         "whole model's parameter ratios (e.g. --compression 1.25 1.5 2).")
    else:
        budget, budgets = "compression", args.compression or [2.0, 4.0, 8.0, 16.0]
    methods = None
    if args.methods:
        table = TRANSFORMER_METHODS if transformer else DEMO_METHODS
        wanted = [canonical_method(m, {} if transformer else _METHOD_NAMES) for m in args.methods]
        unknown = sorted(set(wanted) - {m for _, m, _ in table})
        if unknown:
            raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(dict.fromkeys(m for _, m, _ in table))}.")
        methods = [row for row in table if row[1] in wanted]
    stage_keep = _stage_keep_arg(args.keep_stage)
    if stage_keep and budget != "keep":
        raise ValueError("--keep-stage fixes the fraction kept in a stage of transformer blocks while --compare "
                         "sweeps --keep over the others; this model is compared by --compression: drop "
                         "--keep-stage.")
    result = compare_methods(model, calib, rest[0], budgets, budget=budget, methods=methods, seed=args.seed,
                             calib_sizes=args.calib, target=args.target, stage_keep=stage_keep or None,
                             **_head_unit_arg(args, transformer))
    files = write_comparison(result, args.report_dir, title=f"Pruning comparison: {args.spec}")
    print(f"wrote {files['report']}, {files['plot']}, {files['json']}")
    return 0
