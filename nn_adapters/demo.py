"""``submod demo``: prune a digits CNN with every method, without fine-tuning, and report.

Trains (or loads from the cache) the LeNet-style CNN of :func:`nn_adapters.zoo.digits_cnn` on scikit-learn's
digits, prunes it at several whole-network parameter compressions with several numbers of unlabeled
calibration images, with the submodular methods (AsymInChange, SeqInChange, LayerInChange) and the baselines,
evaluates each pruned model on the held-out split, and writes a table, a plot of accuracy against compression
and a Markdown report. All files are written atomically.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from submod._atomic import atomic_path

from ._modes import eval_mode
from .budget import UnreachableCompressionError, count_flops
from .digits import accuracy, load_digits_split, pretrained_digits_cnn
from .pruning import prune

__all__ = ["DEMO_METHODS", "run_demo", "measure_latency", "format_table"]

#: (label, method, reweight) for MLPs and CNNs: the methods of ``submod demo`` and the default of
#: :func:`nn_adapters.compare.compare_methods` (the set for transformer blocks is ``TRANSFORMER_METHODS``).
DEMO_METHODS: list[tuple[str, str, bool]] = [
    ("asym", "asym", True),
    ("seq", "seq", True),
    ("layer", "layer", True),
    ("random+refit", "random", True),
    ("weight_norm+refit", "weight_norm", True),
    ("magnitude (no refit)", "weight_norm", False),
    ("act_norm+refit", "act_norm", True),
    ("actgrad+refit [labels]", "actgrad", True),
]


def measure_latency(model: nn.Module, x: Any, repeats: int = 5) -> float:
    """Median wall time (seconds) of one no-grad forward pass of the batch ``x`` (after one warm-up run), in eval
    mode (the model's modes are restored). ``x`` is a tensor, or a dict of keyword inputs (token batches)."""
    times = []
    with eval_mode(model), torch.no_grad():
        call = (lambda: model(**x)) if isinstance(x, Mapping) else (lambda: model(x))
        call()
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _render_table(cols: Sequence[tuple[str, str, str]], rows: Sequence[dict], markdown: bool, left: int) -> str:
    """``rows`` as a fixed-width (or Markdown) table: ``cols`` are ``(header, key, format)``, a ``None`` value shows
    as ``-``, and column ``left`` (the method labels) is left-aligned in the fixed-width form."""
    cells = [[h for h, _, _ in cols]]
    cells += [["-" if r[k] is None else fmt.format(r[k]) for _, k, fmt in cols] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cols)]
                         + ["| " + " | ".join(c) + " |" for c in cells[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The results as a fixed-width (or Markdown) table."""
    cols = [("calib", "n_calib", "{:d}"), ("target", "compression", "{:g}x"), ("method", "label", "{}"),
            ("acc %", "accuracy", "{:.1f}"), ("params", "params", "{:d}"), ("achieved", "achieved", "{:.2f}x"),
            ("kFLOPs", "kflops", "{:.1f}"), ("latency ms", "latency_ms", "{:.2f}"), ("prune s", "prune_s", "{:.2f}")]
    shown = [dict(r, accuracy=100 * r["accuracy"], kflops=r["flops"] / 1e3, latency_ms=1e3 * r["latency_s"])
             for r in rows]
    return _render_table(cols, shown, markdown, left=2)


def _plot_accuracy(rows: list[dict], dense_acc: float, panels: Sequence[tuple[str, Any]], path: Path, *,
                   x_key: str = "compression", panel_key: str | None = None, xlabel: str = "parameter compression (x)",
                   log2: bool = True, ylabel: str = "test accuracy % (no fine-tuning)") -> None:
    """Accuracy against the budget ``x_key``, one line per method label, one panel per ``(title, value)`` of
    ``panels`` (the rows whose ``panel_key`` equals ``value``; all rows when ``panel_key`` is ``None``); the
    unpruned accuracy as a dotted line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for ax, (title, value) in zip(axes[0], panels, strict=True):
        for lab in labels:
            pts = sorted((r[x_key], 100 * r["accuracy"]) for r in rows
                         if r["label"] == lab and (panel_key is None or r[panel_key] == value))
            if pts:
                style = "-o" if lab in ("asym", "seq", "layer") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=lab, ms=4)
        ax.axhline(100 * dense_acc, color="k", lw=0.8, ls=":", label="unpruned")
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _refuse_repeats(what: str, values: Sequence[float]) -> None:
    """Refuse a value given twice: it would be pruned, tabulated and plotted twice (the command line drops
    repeats with a note before it calls here)."""
    repeated = [v for i, v in enumerate(values) if v in list(values[:i])]
    if repeated:
        raise ValueError(f"{what} lists {', '.join(f'{float(v):g}' for v in dict.fromkeys(repeated))} more than "
                         "once; each value is pruned and tabulated once, so pass each once.")


def _check_demo_args(compressions: Sequence[float], calib_sizes: Sequence[int], n_train: int) -> None:
    """Refuse bad sizes before any work (and before the output directory is created)."""
    if not len(compressions) or not len(calib_sizes):
        raise ValueError("give at least one compression and one calibration size.")
    for c in compressions:
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) or c < 1:
            raise ValueError(f"compressions must be numbers >= 1 (e.g. 2 4 8 16); got {c!r}.")
    for n in calib_sizes:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_train:
            raise ValueError(f"calibration sizes must be integers from 1 to {n_train} (the training images); "
                             f"got {n!r}.")
    _refuse_repeats("compressions", compressions)
    _refuse_repeats("calib_sizes", calib_sizes)


def run_demo(out_dir: str | os.PathLike = "submod_demo_out", compressions: Sequence[float] = (2, 4, 8, 16),
             calib_sizes: Sequence[int] = (50, 100, 500), methods: Sequence[tuple[str, str, bool]] | None = None,
             seed: int = 0, retrain: bool = False, verbose: bool = True) -> dict:
    """Run the demo and write ``results.json``, ``accuracy_vs_compression.png`` and ``report.md`` to ``out_dir``.

    Returns
    -------
    dict
        ``dense`` (unpruned accuracy, params, FLOPs, latency), ``rows`` (one dict per run) and ``files``.
    """
    methods = DEMO_METHODS if methods is None else list(methods)
    Xtr, ytr, Xte, yte = load_digits_split()
    _check_demo_args(compressions, calib_sizes, len(Xtr))
    out = Path(out_dir)
    above = out  # a file on the way made mkdir fail with '[Errno 17] File exists' or '[Errno 20] Not a directory'
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise ValueError(f"the output directory {str(out)!r} " + ("is a file" if above == out else
                         f"lies under {str(above)!r}, which is a file") + "; pass a directory path (e.g. --out "
                         "submod_demo_out), created if needed.")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model, info = pretrained_digits_cnn(retrain=retrain)
    if verbose:
        how = "loaded from cache" if info["cached"] else f"trained in {info['train_time_s']:.1f}s"
        print(f"digits CNN {how} ({info['path']})")
    dense = {"accuracy": accuracy(model, Xte, yte), "params": sum(p.numel() for p in model.parameters()),
             "flops": count_flops(model, Xte), "latency_s": measure_latency(model, Xte)}
    if verbose:
        print(f"unpruned: accuracy {100 * dense['accuracy']:.1f}%, {dense['params']} params")
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(seed))
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for n in calib_sizes:
        idx = perm[:n]
        calib = list(zip(torch.split(Xtr[idx], 128), torch.split(ytr[idx], 128), strict=True))
        for c in compressions:
            for label, method, reweight in methods:
                t0 = time.perf_counter()
                try:
                    pruned, rep = prune(model, calib, compression=float(c), method=method, reweight=reweight,
                                        seed=seed)
                except UnreachableCompressionError as exc:  # the other compressions still run; said below
                    skipped.append((f"{label} at {c:g}x", f"not reachable: at most {exc.most:.2f}x"))
                    continue
                took = time.perf_counter() - t0
                rows.append({"n_calib": int(n), "compression": float(c), "label": label, "method": method,
                             "reweight": reweight, "labelled": rep.labelled, "accuracy": accuracy(pruned, Xte, yte),
                             "params": rep.params_after, "achieved": rep.compression, "flops": rep.flops_after,
                             "latency_s": measure_latency(pruned, Xte), "prune_s": took,
                             "kept": [lr.kept for lr in rep.layers],
                             "layers": [asdict(lr) for lr in rep.layers] if label == "asym" else None})
            here = [r for r in rows if r["n_calib"] == n and r["compression"] == c]
            if verbose and here:
                best = max(here, key=lambda r: r["accuracy"])
                print(f"  {n:>4} images, {c:>4g}x: best {best['label']} {100 * best['accuracy']:.1f}%")
            elif verbose:
                print(f"  {n:>4} images, {c:>4g}x: not reachable on this network")
    if not rows:
        raise ValueError(f"no compression of {list(compressions)} is reachable on the demo's CNN "
                         f"({skipped[0][1]}); pass smaller --compressions.")
    verified = None
    done = [r["compression"] for r in rows if r["method"] == "asym"]
    if done:
        # what verification says about one AsymInChange pruning (the largest compression reached, the middle image
        # count)
        n_v, c_v = sorted(calib_sizes)[len(calib_sizes) // 2], max(done)
        idx = perm[:n_v]
        try:
            _, rep = prune(model, [(Xtr[idx], ytr[idx])], compression=float(c_v), method="asym", verify=True)
            verified = {"n_calib": int(n_v), "compression": float(c_v),
                        "layers": [{"pair": lr.pair, "kept": lr.kept, "n_units": lr.n_units,
                                    "verification": lr.verification, "selection_ridge": lr.selection_ridge}
                                   for lr in rep.layers]}
        except ImportError:  # verification is optional
            verified = None
    table = format_table(rows)
    if verbose:
        print(table)
    plot_path = out / "accuracy_vs_compression.png"
    total = time.perf_counter() - t_all
    result = {"dense": dense, "rows": rows, "verified": verified, "skipped": skipped, "total_time_s": total,
              "model_cache": info["path"],
              "files": {"json": str(out / "results.json"), "plot": str(plot_path), "report": str(out / "report.md")}}
    # every file's content is made before any file is replaced, so a failure leaves the previous run's set intact
    text_json, text_md = json.dumps(result, indent=2), _markdown(result, compressions, calib_sizes)
    _plot_accuracy(rows, dense["accuracy"], [(f"{n} calibration images", int(n)) for n in calib_sizes], plot_path,
                   panel_key="n_calib")
    _write_atomic(out / "results.json", text_json)
    _write_atomic(out / "report.md", text_md)
    if verbose:
        print(f"wrote {out / 'report.md'}, {plot_path}, {out / 'results.json'} in {total:.1f}s")
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _layer_sections(result: dict, compressions: Sequence[float], calib_sizes: Sequence[int]) -> list[str]:
    """Per-layer error curves of the asym runs and what verification says (each number labelled with its kind)."""
    n = sorted(calib_sizes)[len(calib_sizes) // 2]
    asym = [r for r in result["rows"] if r["label"] == "asym" and r["n_calib"] == n and r.get("layers")]
    if not asym:
        return []
    lines = [f"## Per-layer reconstruction error, asym, {n} calibration images", "",
             "`in-sample` is the relative error `||Y - A_S M - b||^2 / ||Y - mean||^2` of the refit on the calibration "
             "images (exact on those images); `held-out` its 5-fold cross-validated estimate on calibration images "
             "left out of the fit (an empirical estimate of the error on new images); `ridge` the relative ridge "
             "chosen by that cross-validation. `greedy path` is the in-sample relative objective (residual plus "
             "the selection ridge's penalty) after the first 1/4, 1/2, 3/4 and all kept units of the nested greedy "
             "selection (exact on the calibration images).", "",
             "| compression | pair | kept | in-sample | held-out (estimate) | ridge | greedy path |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(asym, key=lambda r: r["compression"]):
        for lr in r["layers"]:
            curve = lr.get("error_curve") or []
            k = len(curve) - 1
            pts = sorted({int(round(q * k)) for q in (0.25, 0.5, 0.75, 1.0)} - {0}) if k > 0 else []
            path = ", ".join(f"{j}: {curve[j]:.3f}" for j in pts)
            ridge = "-" if lr.get("ridge") is None else f"{lr['ridge']:.0e}"
            lines.append(f"| {r['compression']:g}x | {lr['pair']} | {lr['kept']}/{lr['n_units']} | "
                         f"{_fmt(lr['relative_error'])} | {_fmt(lr.get('cv_relative_error'))} | {ridge} | {path} |")
    lines.append("")
    ver = result.get("verified")
    if ver:
        lines += [f"## What verification says (asym, {ver['compression']:g}x, {ver['n_calib']} images)", "",
                  "From `verification.error_decay` on each layer's selection objective (calibration data, at the "
                  "selection's ridge): `rel_err_at_k` and its bound are about the greedy selection, not the refit "
                  "whose in-sample error the table above reports (the refit uses its own, cross-validated ridge). "
                  "Each number is labelled: proven lower bound, proven upper bound, exact, or estimate.", ""]
        for lr in ver["layers"]:
            items = "; ".join(f"{name} = {v if isinstance(v, str) else f'{v:.4g}'} ({kind})"
                              for name, (v, kind) in (lr["verification"] or {}).items())
            sel = lr.get("selection_ridge")
            at = "" if sel is None else f", selection ridge {sel:.0e}"
            lines.append(f"- {lr['pair']} (kept {lr['kept']}/{lr['n_units']}{at}): {items}")
        lines.append("")
    return lines


def _markdown(result: dict, compressions: Sequence[float], calib_sizes: Sequence[int]) -> str:
    d = result["dense"]
    rows = result["rows"]
    lines = ["# submod demo: data-efficient structured pruning of a digits CNN", "",
             "LeNet-style CNN trained on scikit-learn's digits (1437 train / 360 test images), pruned with a few "
             "unlabeled calibration images and **no fine-tuning** (El Halabi et al., NeurIPS 2022). Accuracies are "
             "measured on the 360 held-out test images (single run, empirical). `[labels]` marks the one baseline "
             "that uses labels (ActGrad).", "",
             f"Unpruned: accuracy {100 * d['accuracy']:.1f}%, {d['params']} parameters, {d['flops'] / 1e3:.1f} "
             f"kFLOPs per image, latency {1e3 * d['latency_s']:.2f} ms for the 360 test images.", "",
             "![accuracy vs compression](accuracy_vs_compression.png)", ""]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for n in calib_sizes:
        lines += [f"## Test accuracy (%), {n} calibration images", "",
                  "| method | " + " | ".join(f"{c:g}x" for c in compressions) + " |",
                  "|---|" + "---|" * len(compressions)]
        for lab in labels:
            acc = {r["compression"]: r["accuracy"] for r in rows if r["label"] == lab and r["n_calib"] == n}
            lines.append(f"| {lab} | " + " | ".join(f"{100 * acc[float(c)]:.1f}" if float(c) in acc else "-"
                                                     for c in compressions) + " |")
        lines.append("")
    lines += [f"Left out: {what} ({why})." for what, why in result.get("skipped", [])]
    lines += [""] if result.get("skipped") else []
    lines += _layer_sections(result, compressions, calib_sizes)
    lines += ["## All runs", "", format_table(rows, markdown=True), "",
              f"Total demo time: {result['total_time_s']:.1f}s (includes training when the model was not cached)."]
    return "\n".join(lines) + "\n"
