"""Compare every pruning method on a user's model: ``submod prune MODULE:FUNCTION --compare``.

What ``submod demo`` does for the digits CNN, for any model that :func:`nn_adapters.prune` handles: prune it at
each budget (whole-network parameter compressions or keep fractions) with the
submodular methods and the baselines, from the user's calibration batches and without fine-tuning; evaluate every
pruned model on the user's evaluation batches; and write a table, a plot of accuracy against the budget and a
Markdown report (all files written atomically).

Each pruned model is measured against the labels (accuracy) and against the unpruned model itself (agreement:
the share of predictions that stay the same; no labels needed), plus its parameters, FLOPs (MLP/CNN), the latency
of one forward pass over the first evaluation batch and the pruning time. All of them are single-run empirical
measurements on the user's data.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._data import _from_numpy, as_batches, batch_len, float_dtype, take
from ._modes import eval_mode
from .budget import UnreachableCompressionError, count_flops
from .demo import DEMO_METHODS, _plot_accuracy, _refuse_repeats, _render_table, _write_atomic, measure_latency
from .pruning import _is_transformer, prune
from .transformer import _cast_floats, _numpy_to_tensors, _stage_keep, _with_stage_keep

__all__ = ["TRANSFORMER_METHODS", "compare_methods", "format_comparison", "write_comparison"]

#: (label, method, reweight) for models with transformer blocks (the MLP/CNN set is ``demo.DEMO_METHODS``).
TRANSFORMER_METHODS: list[tuple[str, str, bool]] = [
    ("asym", "asym", True),
    ("seq", "seq", True),
    ("layer", "layer", True),
    ("random+refit", "random", True),
    ("magnitude+refit", "magnitude", True),
    ("magnitude (no refit)", "magnitude", False),
    ("wanda+refit", "wanda", True),
]


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _scores(out: Any) -> torch.Tensor:
    """The class scores in a model's output: the output itself, or its ``logits`` (Hugging Face heads)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"accuracy on the evaluation loader needs the model to return class scores (a tensor, or an "
                     f"output with .logits); it returned {type(out).__name__}. Wrap the model so that it returns "
                     "them, or drop the evaluation loader.")


def _eval_batches(loader: Iterable, dtype: torch.dtype | None) -> list[tuple[Any, torch.Tensor]]:
    """The evaluation loader as ``(inputs, labels)`` pairs, read once; numpy arrays as tensors, also inside dict
    or tuple inputs, as for the calibration batches; floating inputs cast to ``dtype``."""
    if not isinstance(loader, Iterable) or isinstance(loader, (torch.Tensor, Mapping, str, bytes)):
        raise ValueError(f"the evaluation data must be an iterable of (inputs, labels) batches, e.g. "
                         f"[(x, y)] or a DataLoader; got {type(loader).__name__}.")
    out = []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the evaluation loader must yield (inputs, labels) batches.")
        x, y = _numpy_to_tensors(batch[0]), torch.as_tensor(_from_numpy(batch[1]))
        if dtype is not None:
            x = _cast_floats(x, dtype)  # as the calibration data is
        out.append((x, y))
    if not out:
        raise ValueError("the evaluation loader is empty.")
    return out


@torch.no_grad()
def predictions(model: nn.Module, batches: list[tuple[Any, torch.Tensor]]) -> list[torch.Tensor]:
    """The argmax over the last dim of the model's class scores, per batch (the model's modes are kept)."""
    preds = []
    with eval_mode(model):
        for x, y in batches:
            try:
                out = _call(model, x)
            except Exception as exc:  # noqa: BLE001 - the user's model on the user's data: one clear line
                raise ValueError(f"the model failed on a batch of the evaluation loader ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); check that it yields the "
                                 "model's inputs.") from exc
            pred = _scores(out).argmax(dim=-1)
            if y.shape != pred.shape and y.shape == (*pred.shape, 1):  # labels as a column, (N, 1)
                y = y.squeeze(-1)
            if y.shape != pred.shape:  # comparing them would broadcast, e.g. (N,) against (N, 1) to (N, N)
                raise ValueError(f"the labels of the evaluation loader have shape {tuple(y.shape)} and the "
                                 f"predictions (the argmax over the model's last dim) {tuple(pred.shape)}; pass "
                                 "one class index per prediction.")
            preds.append(pred.cpu())
    return preds


def accuracy_of(preds: list[torch.Tensor], batches: list[tuple[Any, torch.Tensor]]) -> float:
    """Share of predictions equal to their labels (labels shaped ``(N, 1)`` are read as ``(N,)``)."""
    correct = total = 0
    for p, (_, y) in zip(preds, batches, strict=True):
        y = y.reshape(p.shape).to(p.device)
        correct += int((p == y).sum())
        total += p.numel()
    return correct / total


def _agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(int((p == q).sum()) for p, q in zip(a, b, strict=True)) / sum(p.numel() for p in a)


def _calibration_subsets(batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                         sizes: Sequence[int] | None) -> dict[int | None, list]:
    """``{n: the first n calibration samples as batches}`` for each size (``{None: batches}`` without sizes)."""
    if sizes is None:
        return {None: batches}
    total = sum(batch_len(x) for x, _ in batches)
    if not len(sizes):
        raise ValueError("give at least one calibration size, e.g. 50 100.")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= total:
            raise ValueError(f"calibration sizes must be integers from 1 to {total} (the calibration samples "
                             f"given); got {n!r}.")
    _refuse_repeats("calib_sizes", sizes)
    out = {}
    for n in sorted({int(v) for v in sizes}):
        left, subset = n, []
        for x, y in batches:
            if left == 0:
                break
            subset.append((take(x, left), None if y is None else y[:left]))
            left -= batch_len(subset[-1][0])
        out[n] = subset
    return out


def _check_budgets(budgets: Sequence[float], budget: str, transformer: bool) -> None:
    if budget not in ("compression", "keep"):
        raise ValueError(f"budget must be 'compression' or 'keep'; got {budget!r}.")
    if not len(budgets):
        raise ValueError("give at least one budget, e.g. --compression 2 4 8 16 or --keep 0.75 0.5.")
    for b in budgets:
        ok = (not isinstance(b, bool) and isinstance(b, numbers.Real) and math.isfinite(b)
              and ((b > 1 if transformer else b >= 1) if budget == "compression" else 0 < b <= 1))
        if not ok:
            want = ("fractions in (0, 1] (e.g. 0.5)" if budget == "keep" else "numbers > 1 (e.g. 1.25 1.5 2)"
                    if transformer else "numbers >= 1 (e.g. 2 4 8 16)")
            raise ValueError(f"{budget} values must be {want}; got {b!r}.")
    _refuse_repeats("budgets", budgets)


def compare_methods(model: nn.Module, calibration_data: object, eval_data: Iterable,
                    budgets: Sequence[float] = (2, 4, 8, 16), *, budget: str = "compression",
                    methods: Sequence[tuple[str, str, bool]] | None = None, seed: int = 0,
                    calib_sizes: Sequence[int] | None = None, target: str | None = None,
                    stage_keep: Mapping[str, float] | None = None, head_unit: str | None = None,
                    verbose: bool = True) -> dict:
    """Prune ``model`` with every method at every budget and measure each pruned model on ``eval_data``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model (never modified).
    calibration_data : tensor or iterable of batches
        As for :func:`nn_adapters.prune`; read once. Without labels the labelled baseline (ActGrad) is left out of
        the default methods.
    eval_data : iterable of (inputs, labels) batches
        Read once. Inputs are tensors (or dicts of tensors for Hugging Face models; numpy arrays are accepted
        wherever a tensor is, as in the calibration data); the model must return class
        scores (a tensor, or an output with ``.logits``) whose argmax over the last dim is compared with the labels.
    budgets : sequence of float
        Whole-network parameter compressions (``budget="compression"``; for transformers, each the largest fraction
        kept in every block that reaches it, a stage's slack filled, > 1) or keep fractions (``budget="keep"``).
    budget : {"compression", "keep"}
    methods : list of (label, method, reweight), optional
        Default: :data:`nn_adapters.demo.DEMO_METHODS` for an MLP/CNN (ActGrad only with labelled calibration
        batches), :data:`TRANSFORMER_METHODS` for a model with transformer blocks.
    seed : int
        Seed of the random baseline.
    calib_sizes : sequence of int, optional
        MLP/CNN only: also compare calibration set sizes, each run pruning from the first ``n`` calibration samples
        (in the order given: shuffle them beforehand for a random subset), as the demo does with 50, 100 and 500
        images. Default: all of them, in one run.
    target : str, optional
        Passed to :func:`nn_adapters.prune`: a transformer's ``"ffn"`` (its default), ``"heads"`` or ``"all"``, or
        ``"layers"``: the layer pairs found by tracing, for a hybrid such as MobileViT or SegFormer whose blocks the
        transformer adapter recognises but refuses (compared as an MLP/CNN: compressions, the demo's methods).
    stage_keep : dict of str to float, optional
        Transformers, ``budget="keep"``: fractions held fixed for the stages named (``{"heads": 0.75}``; the stages
        of :func:`nn_adapters.transformer.prune_transformer`'s per-stage ``keep``), while each budget is the
        fraction kept in the other stages ``target`` prunes (the FFN for ``target="all"`` here). Recorded in the
        result.
    head_unit : {"group", "query"}, optional
        Transformers: passed to :func:`nn_adapters.transformer.prune_transformer` (the attention unit under
        grouped-query attention; default there ``"group"``).
    verbose : bool
        Print progress and the table.

    Returns
    -------
    dict
        ``dense`` (unpruned accuracy, params, FLOPs, latency), ``rows`` (one dict per pruning: number of
        calibration samples ``n_calib``, budget, label, method, accuracy, agreement with the unpruned model's
        predictions, params, achieved compression, FLOPs, latency, pruning time, kept units per layer or block),
        ``budget``, ``stage_keep``, ``skipped`` (methods left out, why).

    Examples
    --------
    >>> import torch
    >>> from nn_adapters import zoo
    >>> from nn_adapters.compare import compare_methods
    >>> _ = torch.manual_seed(0)
    >>> net = zoo.mlp(10, [16, 16], 3).eval()
    >>> x, y = torch.randn(120, 10), torch.randint(0, 3, (120,))
    >>> res = compare_methods(net, [(x[:80], y[:80])], [(x[80:], y[80:])], budgets=[2.0],
    ...                       methods=[("asym", "asym", True), ("random+refit", "random", True)], verbose=False)
    >>> [(r["label"], r["compression"]) for r in res["rows"]]
    [('asym', 2.0), ('random+refit', 2.0)]
    >>> all(r["achieved"] >= 2.0 and 0.0 <= r["agreement"] <= 1.0 for r in res["rows"])
    True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    transformer = _is_transformer(model, target)
    budgets = [float(b) if isinstance(b, numbers.Real) and not isinstance(b, bool) else b for b in budgets]
    _check_budgets(budgets, budget, transformer)
    if head_unit is not None and not transformer:
        raise ValueError("head_unit chooses the attention unit of transformer blocks; this model is pruned by its "
                         "layer pairs: drop head_unit.")
    if stage_keep is not None:
        if not transformer or budget != "keep":
            raise ValueError("stage_keep fixes the fraction kept in stages of transformer blocks while the keep "
                             "fractions are swept over the others: it needs a model with transformer blocks and "
                             "budget='keep'; drop stage_keep.")
        stage_keep = {str(s): float(f) for s, f in stage_keep.items()}
        _stage_keep(_with_stage_keep(budgets[0], stage_keep, target), target or "ffn")  # refused before pruning
    dtype = float_dtype(model)
    if transformer:  # token batches (dicts) are passed on as they are; read a one-shot iterator once
        calib = list(calibration_data) if isinstance(calibration_data, Iterable) and not isinstance(
            calibration_data, (torch.Tensor, Mapping)) else calibration_data
        labelled = False
        if calib_sizes is not None:
            raise ValueError("calib_sizes applies to MLPs and CNNs; for a transformer pass the token batches to "
                             "use.")
        sets = {None: calib}
    else:
        calib = as_batches(calibration_data, dtype=dtype, model=model)
        labelled = bool(calib) and all(y is not None for _, y in calib)
        sets = _calibration_subsets(calib, calib_sizes)
    skipped = []
    if methods is None:
        methods = list(TRANSFORMER_METHODS if transformer else DEMO_METHODS)
        if not labelled and not transformer:
            methods = [m for m in methods if m[1] != "actgrad"]
            skipped.append(("actgrad", "the calibration batches have no labels"))
    evals = _eval_batches(eval_data, dtype)
    base = predictions(model, evals)
    probe = evals[0][0]
    flops = (lambda m: None) if transformer or not isinstance(probe, (torch.Tensor, Mapping)) else (
        lambda m: count_flops(m, probe))
    dense = {"accuracy": accuracy_of(base, evals), "params": sum(p.numel() for p in model.parameters()),
             "flops": flops(model), "latency_s": measure_latency(model, probe)}
    if verbose:
        print(f"unpruned: accuracy {100 * dense['accuracy']:.1f}%, {dense['params']} params")
    rows = []
    for n, batches in sets.items():
        for b in budgets:
            start = len(rows)
            for label, method, reweight in methods:
                kwargs = {"compression": b} if budget == "compression" else {
                    "keep": b if stage_keep is None else _with_stage_keep(b, stage_keep, target)}
                if target is not None:
                    kwargs["target"] = target
                if head_unit is not None:
                    kwargs["head_unit"] = head_unit
                t0 = time.perf_counter()
                try:
                    pruned, rep = prune(model, batches, method=method, reweight=reweight, seed=seed, **kwargs)
                except UnreachableCompressionError as exc:  # the other budgets still run; the report says why
                    skipped.append((f"{label} at {b:g}x", f"not reachable: at most {exc.most:.2f}x"))
                    continue
                took = time.perf_counter() - t0
                preds = predictions(pruned, evals)
                params = sum(p.numel() for p in pruned.parameters())
                kept = [lr.kept for lr in rep.layers] if hasattr(rep, "layers") else [u.n_kept for u in rep.units]
                rows.append({"n_calib": getattr(rep, "n_samples", None), budget: b, "label": label,
                             "method": method, "reweight": bool(reweight),
                             "labelled": bool(getattr(rep, "labelled", False)),
                             "accuracy": accuracy_of(preds, evals), "agreement": _agreement(preds, base),
                             "params": params, "achieved": dense["params"] / max(params, 1), "flops": flops(pruned),
                             "latency_s": measure_latency(pruned, probe), "prune_s": took, "kept": kept})
            if verbose and len(rows) > start:
                best = max(rows[start:], key=lambda r: r["accuracy"])
                where = "" if n is None else f"{n} samples, "
                print(f"  {where}{budget} {b:g}: best {best['label']} {100 * best['accuracy']:.1f}%")
    result = {"budget": budget, "stage_keep": stage_keep, "dense": dense, "rows": rows, "skipped": skipped,
              "n_calibration_batches": len(calib) if isinstance(calib, list) else None,
              "n_eval_predictions": sum(p.numel() for p in base)}
    if verbose:
        print(format_comparison(result))
    return result


def format_comparison(result: dict, markdown: bool = False) -> str:
    """The rows of :func:`compare_methods` as a fixed-width (or Markdown) table."""
    budget = result["budget"]
    head = "compression" if budget == "compression" else "keep"
    cols = [("calib", "n_calib", "{:d}"), (head, budget, "{:g}x" if budget == "compression" else "{:g}"),
            ("method", "label", "{}"),
            ("acc %", "accuracy", "{:.1f}"), ("agree %", "agreement", "{:.1f}"), ("params", "params", "{:d}"),
            ("achieved", "achieved", "{:.2f}x"), ("kFLOPs", "kflops", "{:.1f}"),
            ("latency ms", "latency_ms", "{:.2f}"), ("prune s", "prune_s", "{:.2f}")]
    shown = [dict(r, accuracy=100 * r["accuracy"], agreement=100 * r["agreement"],
                  kflops=None if r["flops"] is None else r["flops"] / 1e3, latency_ms=1e3 * r["latency_s"])
             for r in result["rows"]]
    return _render_table(cols, shown, markdown, left=2)


def _markdown(result: dict, title: str) -> str:
    d, budget = result["dense"], result["budget"]
    budgets = list(dict.fromkeys(r[budget] for r in result["rows"]))
    fmt = "{:g}x" if budget == "compression" else "keep {:g}"
    flops = "" if d["flops"] is None else f", {d['flops'] / 1e3:.1f} kFLOPs per sample"
    lines = [f"# {title}", "",
             "Pruned with a few calibration samples and **no fine-tuning** (El Halabi et al., NeurIPS 2022), with the "
             "submodular methods (asym, seq, layer) and the baselines. Accuracy is measured against the evaluation "
             "labels, agreement against the unpruned model's own predictions (no labels); both are single-run "
             f"empirical measurements on the {result['n_eval_predictions']} evaluation predictions. `[labels]` marks "
             "a method that uses labels.", "",
             f"Unpruned: accuracy {100 * d['accuracy']:.1f}%, {d['params']} parameters{flops}, latency "
             f"{1e3 * d['latency_s']:.2f} ms for the first evaluation batch.", "",
             *([f"Fixed per stage: {', '.join(f'{s} keeps {f:g}' for s, f in result['stage_keep'].items())}; "
                "each keep fraction below is that of the other stages pruned.", ""]
               if result.get("stage_keep") else []),
             "![accuracy vs budget](accuracy_vs_budget.png)", ""]
    for n in dict.fromkeys(r["n_calib"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["n_calib"] == n]
        where = "" if n is None else f", {n} calibration samples"
        lines += [f"## Accuracy % (agreement with the unpruned model %){where}", "",
                  "| method | " + " | ".join(fmt.format(b) for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for lab in dict.fromkeys(r["label"] for r in rows):
            by = {r[budget]: r for r in rows if r["label"] == lab}
            tag = " [labels]" if any(r["labelled"] for r in by.values()) and "[labels]" not in lab else ""
            lines.append(f"| {lab}{tag} | " + " | ".join(
                f"{100 * by[b]['accuracy']:.1f} ({100 * by[b]['agreement']:.1f})" if b in by else "-"
                for b in budgets) + " |")
        lines.append("")
    lines += [f"Left out: {m} ({why})." for m, why in result["skipped"]]
    lines += ["", "## All runs", "", format_comparison(result, markdown=True), ""]
    return "\n".join(lines)


def write_comparison(result: dict, out_dir: str | os.PathLike, title: str = "Pruning comparison") -> dict:
    """Write ``results.json``, ``accuracy_vs_budget.png`` and ``report.md`` for a :func:`compare_methods` result.

    Every file's content is made before any file is replaced, and each is replaced atomically, so a failure
    leaves the previous set intact. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "results.json"), "plot": str(out / "accuracy_vs_budget.png"),
             "report": str(out / "report.md")}
    text_json = json.dumps(dict(result, files=files), indent=2)
    text_md = _markdown(result, title)
    budget = result["budget"]
    xlabel = "parameter compression (x)" if budget == "compression" else "fraction of units kept"
    sizes = list(dict.fromkeys(r["n_calib"] for r in result["rows"]))
    panels = [(title, None)] if len(sizes) == 1 else [(f"{n} calibration samples", n) for n in sizes]
    _plot_accuracy(result["rows"], result["dense"]["accuracy"], panels, Path(files["plot"]), x_key=budget,
                   panel_key=None if len(sizes) == 1 else "n_calib", xlabel=xlabel, log2=budget == "compression",
                   ylabel="accuracy % (no fine-tuning)")
    _write_atomic(Path(files["json"]), text_json)
    _write_atomic(Path(files["report"]), text_md)
    return files
