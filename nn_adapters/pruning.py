"""Structured pruning of MLPs and CNNs from a few unlabeled samples: LayerInChange, SeqInChange, AsymInChange.

For each prunable pair (producer -> consumer) the kept producer units ``S`` and the consumer's new weights are
chosen so that the consumer's input changes as little as possible:

    min_{|S| <= k, M, b} || Y - A_S M - b ||^2,    Y = A_target W^T,

which is the weakly submodular least-squares objective ``submod.SparseRegression`` maximised by greedy forward
selection (El Halabi, Srinivas & Lacoste-Julien, "Data-Efficient Structured Pruning via Submodular
Optimization", NeurIPS 2022). The three methods differ only in where ``A`` and ``Y`` come from:

``layer`` (LayerInChange)
    ``A`` and ``Y`` from the original network; every pair independently (one forward pass with hooks).
``seq`` (SeqInChange)
    ``A`` from the network pruned so far, ``Y = A W^T`` (the unpruned consumer on that input).
``asym`` (AsymInChange)
    ``A`` from the network pruned so far, ``Y`` from the original network, so each refit also compensates the
    error of the earlier layers.

The sequential methods run the calibration set through the traced graph once, node by node, in lock step for
the pruned and (``asym``) the original network: when a consumer is reached its input (already computed with the
pruned prefix) feeds the statistics, the pair is pruned, and the cached input is sliced to the kept units. This is
O(L) layer evaluations in total (as SparseGPT-style calibration), at the cost of holding the activations of the
calibration set at the current frontier of the graph.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from submod._validation import rng_from_seed

from . import _conv
from . import budget as _budget
from ._data import as_batches, batch_len, call, float_dtype, n_samples, sample_folds, sample_shape, take
from ._executor import LAYER_ONLY, OrderedJobs, check_executor
from ._modes import TensorGuard, copy_modes, outside_inference_mode, own_tensors, shared_copy
from ._names import canonical_allocation, canonical_method
from ._sensitivity import OutputSensitivity, output_row_weights
from ._stats import CV_FOLDS, EXACT_PRIOR_RTOL, FoldStats, PairStats, capture_hooks, slice_units
from ._value_trace import GUARDS, SHAPE_REMEDY, metadata_read
from .pairs import Pair, PrunablePair, container_hooks, find_pairs, graph_arguments, resolve_pairs, second_inputs, trace
from .shrink import keep_producer_side, keep_se, set_inputs

__all__ = ["prune", "PruneReport", "LayerReport", "SUBMODULAR_METHODS", "BASELINE_METHODS", "METHODS"]

SUBMODULAR_METHODS = ("asym", "seq", "layer")
BASELINE_METHODS = ("random", "weight_norm", "act_norm", "actgrad")
METHODS = SUBMODULAR_METHODS + BASELINE_METHODS
LABELLED_METHODS = ("actgrad",)
#: The transformer path's baseline names, accepted here too (see :mod:`nn_adapters._names`).
_METHOD_NAMES = {"magnitude": "weight_norm", "wanda": "act_norm"}


@dataclass
class LayerReport:
    """What happened to one prunable pair.

    Attributes
    ----------
    pair : str
        The pair's name, ``"producer->consumer"`` (module names, as in ``model.named_modules()``).
    kind : str
        ``"linear->linear"``, ``"conv->conv"``, ``"conv->linear"`` or ``"linear->conv"`` (see
        :class:`PrunablePair`).
    n_units : int
        Output units of the producer before pruning.
    kept : int
        Units kept.
    kept_units : list of int
        The kept units (indices into the original producer's outputs) in increasing order, the order they have in
        the pruned modules.
    pick_order : list of int
        The same units in the order the method chose them: the greedy order for the submodular methods, by
        decreasing score for the baselines (the order drawn for ``"random"``).
    relative_error : float or None
        The empirical relative reconstruction error ``||Y - A_S M - b||^2 / ||Y - mean||^2`` of the least-squares
        refit on the calibration data. ``None`` with ``reweight=False``, where no refit is computed (the refit's
        error would bound the kept original weights' error from below, up to the ridge).
    time_s : float
        Seconds spent on this pair's selection, refit ridge, refit and verification and on shrinking its
        modules; the collection of its statistics and a baseline's scores are not included (they are in
        ``PruneReport.time_s``).
    ridge : float or None
        The relative ridge of the refit. ``None`` without a refit, and with ``ridge="cv"`` when the trained weights
        already reproduce the targets up to rounding and are kept, as ``ridge_choice`` then says.
    ridge_choice : str or None
        How ``ridge`` was chosen: ``"5-fold cv"``, ``"fixed"`` (the number passed as ``ridge``), a fixed fallback
        with too few samples to cross-validate, or the trained weights kept (the string says which); ``None``
        without a refit.
    cv_relative_error : float or None
        The cross-validated (held-out) relative error of the refit at that ridge, an empirical estimate of the
        error on new samples (``None`` unless ``ridge="cv"`` and the ridge was cross-validated).
    error_curve : list of float or None
        ``error_curve[j]`` is the in-sample relative objective of the nested greedy path after ``j`` picks,
        ``j = 0..kept``: the residual plus the selection ridge's penalty, over the centred target energy (exact on
        the calibration data; it is the relative error itself when that ridge is 0; the refit's own error is
        ``relative_error``). For a producer concatenated with other tensors before its consumer the fixed channels
        of the other operands are in every prefix, so ``error_curve[0]`` is what they leave. Submodular methods
        only, else ``None``.
    verification : dict or None
        With ``verify=True``, maps a name to ``(value, kind)`` where kind is ``"exact"``, ``"proven lower
        bound"``, ``"proven upper bound"`` or ``"estimate"``, or ``"n/a"`` for text that is not a number about
        the objective (``"preconditions"``, the degenerate units and data found; ``"skipped"``, why a layer was
        not verified); see :func:`prune`. ``None`` otherwise, and for the baselines.
    selection_ridge : float or None
        The relative ridge of the greedy selection, the objective ``error_curve`` and ``verification`` are about
        (it can differ from the refit's ``ridge``; absolute ridge = ``selection_ridge`` times the mean centred
        diagonal of ``A^T A``, see ``nn_adapters._stats.FoldStats.objective``). ``None`` for the baselines.
    fixed_channels : int
        The consumer's input channels (for a ``Linear`` consumer, its column blocks of one channel or feature) that
        come from the other operands of a concatenation with the producer's output (``PrunablePair.n_fixed``):
        kept whole, with their columns in the refit, besides the ``kept`` units. 0 without a concatenation.
    """

    pair: str
    kind: str
    n_units: int
    kept: int
    kept_units: list[int]
    pick_order: list[int]
    relative_error: float | None
    time_s: float
    ridge: float | None = None
    ridge_choice: str | None = None
    cv_relative_error: float | None = None
    error_curve: list[float] | None = None
    verification: dict[str, tuple] | None = None
    selection_ridge: float | None = None
    fixed_channels: int = 0


@dataclass
class PruneReport:
    """Summary of a pruning run (all error figures are empirical, measured on the calibration data; FLOPs are per
    sample of the first calibration batch's shape).

    Attributes
    ----------
    method : str
        The method, by its canonical name (``"asym"``, ``"seq"``, ``"layer"``, ``"random"``, ``"weight_norm"``,
        ``"act_norm"`` or ``"actgrad"``) whatever spelling was passed.
    reweight : bool
        Whether the consumers were refitted by least squares on the kept units.
    labelled : bool
        Whether the method read the calibration labels (``"actgrad"``).
    statistics : str
        Which statistics the selection and refit read: the submodular method's own, or ``refit_from`` for a
        baseline: ``"layer"`` (inputs and targets of the original network), ``"seq"`` (inputs from the network
        pruned so far, targets ``A W^T``) or ``"asym"`` (inputs from the network pruned so far, targets from the
        original network).
    allocation : str
        How the budget was split between layers: ``"uniform"`` or ``"error-curve"`` (with ``compression=``), or
        ``"keep"`` (keep fractions given with ``keep=``).
    n_samples : int
        Calibration samples, over all batches.
    params_before, params_after : int
        Parameters of the model and of the pruned model (every parameter, prunable or not).
    flops_before, flops_after : int
        Floating-point operations of one forward pass per sample, before and after (convolution and ``Linear``
        layers only, a multiply-add counting 2; see ``nn_adapters.budget.count_flops``).
    layers : list of LayerReport
        One report per prunable pair (a pair may keep all its units).
    skipped : list of (str, str)
        ``(module name, reason)`` for each ``Linear`` or convolution (``Conv1d``, ``Conv2d``, ``ConvTranspose1d``,
        ``ConvTranspose2d``) that is not a prunable producer (see :func:`find_pairs`), or that ``pairs=`` did not
        declare as one.
    time_s : float
        Wall time of the whole call, in seconds.
    weighting : str
        How the rows of the least-squares problems were weighted: ``"none"``, or ``"output"`` (by the model
        output's sensitivity, see ``weighting`` in :func:`prune`; the layers' relative errors are then in that
        weighted metric).
    """

    method: str
    reweight: bool
    labelled: bool
    statistics: str
    allocation: str
    n_samples: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    time_s: float = 0.0
    weighting: str = "none"

    @property
    def compression(self) -> float:
        """Achieved parameter compression (params before / after; exact count)."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict:
        """The report as plain Python data (JSON-serialisable): every field, layers included, plus
        ``compression``.

        Returns
        -------
        dict
        """
        d = asdict(self)
        d["compression"] = self.compression
        return d

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [f"method={self.method} reweight={self.reweight} statistics={self.statistics} "
                 f"allocation={self.allocation} samples={self.n_samples}"
                 + (f" weighting={self.weighting}" if self.weighting != "none" else "")
                 + (" [uses labels]" if self.labelled else ""),
                 f"params {self.params_before} -> {self.params_after} ({self.compression:.2f}x), "
                 f"FLOPs/sample {self.flops_before} -> {self.flops_after}, time {self.time_s:.2f}s"]
        for r in self.layers:
            err = "n/a" if r.relative_error is None else f"{r.relative_error:.4f}"
            line = f"  {r.pair:<28} {r.kind:<15} kept {r.kept:>4}/{r.n_units:<4} rel.err {err}"
            if r.fixed_channels:
                line += f" (+{r.fixed_channels} fixed channels of the concatenation)"
            if r.cv_relative_error is not None:
                line += f" (held-out est. {r.cv_relative_error:.4f}, ridge {r.ridge:.0e} by {r.ridge_choice})"
            lines.append(line)
            if r.error_curve:
                pts = sorted({int(round(q * r.kept)) for q in (0.25, 0.5, 0.75, 1.0)} - {0})
                sel = "" if r.selection_ridge is None else f", selection ridge {r.selection_ridge:.0e}"
                lines.append(f"    greedy-path rel. objective (in-sample, with ridge penalty{sel}) " + ", ".join(
                    f"k={j}: {r.error_curve[j]:.3f}" for j in pts))
            for name, (val, kind) in (r.verification or {}).items():
                lines.append(f"    {name} = {val if isinstance(val, str) else f'{val:.4g}'} [{kind}]")
        for name, why in self.skipped:
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


def _is_transformer(model: nn.Module, target: str | None = None) -> bool:
    """Whether :func:`prune` hands ``model`` to the transformer adapter: always for ``target`` ``"ffn"``,
    ``"heads"`` or ``"all"``, never for ``"layers"``, and without a ``target`` when the model holds a block the
    adapter recognises (a Hugging Face encoder or decoder layer, a ``torch.nn.TransformerEncoderLayer``)."""
    if target is not None:
        return target != "layers"
    from ._transformer_blocks import find_blocks

    return bool(find_blocks(model))


def _check_args(method: str, compression: object, keep: object, allocation: str, ridge: float | str,
                refit_from: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if (compression is None) == (keep is None):
        raise ValueError("pass exactly one of compression= (whole-network parameter ratio, e.g. 4.0) or keep= "
                         "(fraction of units kept in every prunable layer, e.g. 0.5).")
    if keep is not None and allocation != "uniform":
        raise ValueError("allocation= applies to compression=; with keep= every layer keeps that fraction.")
    if isinstance(ridge, str):
        if ridge != "cv":
            raise ValueError(f"ridge must be 'cv' (chosen per layer by cross-validation on the calibration data) or "
                             f"a finite number >= 0 (relative to the mean activation variance); got {ridge!r}.")
    elif isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be 'cv' (chosen per layer by cross-validation on the calibration data) or a "
                         f"finite number >= 0 (relative to the mean activation variance); got {ridge!r}.")
    if refit_from not in SUBMODULAR_METHODS:
        raise ValueError(f"refit_from must be one of {SUBMODULAR_METHODS}; got {refit_from!r}.")


@outside_inference_mode
def prune(model: nn.Module, calibration_data: object, compression: float | None = None,
          keep: float | Mapping[str, float] | None = None, method: str = "asym", reweight: bool = True,
          seed: int = 0, target: str | None = None, *, allocation: str = "uniform",
          pairs: Sequence[Pair | tuple] | None = None, ridge: float | str = "cv", refit_from: str = "asym",
          refit_prior: str = "original", weighting: str | None = None, loss_fn: Callable | None = None,
          progress: bool = False, verify: bool = False, se_bias_correction: bool = True,
          executor: Executor | None = None, stats_memory: int | None = None,
          **kwargs: object) -> tuple[nn.Module, PruneReport]:
    """Prune a PyTorch model from a few unlabeled samples; return a new, physically smaller model and a report.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network. It is never modified: its modules are copied, its tensors read, never written (nor
        their ``.grad``); the pruned model holds tensors of its own.
    calibration_data : tensor or iterable of batches
        Inputs, an ``(inputs, labels)`` pair of tensors, or an iterable of batches (tensors or ``(inputs, labels)``;
        numpy arrays are accepted wherever a tensor is;
        labels are ignored except by ``method="actgrad"``). A tuple of two tensors of the same shape is refused as
        ambiguous (pass ``[x1, x2]`` for two batches, ``[(inputs, targets)]`` for one labelled batch). Floating
        inputs are cast to the dtype of the model's parameters (``torch.from_numpy`` gives float64); integer
        inputs are passed as they are. Batches may have different sample shapes (audio clips of several lengths,
        images of several sizes before a global pooling): the statistics add up over batches, a convolution's rows
        being its (sample, position) patches. Before any statistics, every distinct shape is run through the model
        and must give the same pairs with the same columns per unit, or a ``ValueError`` says which batch differs
        (a conv -> flatten -> linear model runs on one shape only). The report's FLOPs are those of the first
        batch's sample shape. A tensor batch is passed as ``model(inputs)``. A model with several inputs (a
        diffusion U-Net's ``forward(x, t)``, a class-conditional ``forward(x, y)``) takes batches that are dicts
        of keyword inputs, passed as ``model(**batch)`` (one dict for all the data, split as a tensor is, or
        ``(dict, labels)`` pairs for ``actgrad``): tensors whose dim 0 counts the samples, split alike wherever
        samples are split or counted, and constants passed as they are; the keys are ``forward()``'s inputs, all
        those without a default, the same in every batch (see "Models with several inputs" in
        :doc:`nn_adapters`). Tensor batches for such a model are refused with a ``ValueError`` that says so.
    compression : float, optional
        Whole-network parameter compression (params before / after >= compression), e.g. 2.0 ... 32.0. For
        transformers, the largest fraction kept in every block that reaches it, a coarse stage's slack filled by
        the others (see ``compression`` of
        :func:`nn_adapters.transformer.prune_transformer`).
    keep : float or dict, optional
        Fraction of units kept in every prunable layer (or per pair name / producer name, either producer of
        gated units, layers not named keeping every unit; for transformers per block name or index, see
        :func:`nn_adapters.transformer.prune_transformer`). Exactly one of ``compression`` and ``keep``.
    method : str, default "asym"
        ``"asym"``, ``"seq"``, ``"layer"`` (greedy on the submodular-style objective), or a baseline:
        ``"random"``, ``"weight_norm"`` (L2 norm of the producer's filters; a depthwise filter between the
        layers is not part of the score; for gated units the root mean square over the two factors' rows, see
        :mod:`nn_adapters.pairs`), ``"act_norm"`` (Wanda-like
        ``sum |W| * ||X||``) and ``"actgrad"`` (``|activation * gradient|``; uses LABELS). The transformer
        path's names ``"magnitude"`` and ``"wanda"``, the paper's class names (``"AsymInChange"``, ...) and any
        letter case are accepted too; the report records the name above.
    reweight : bool, default True
        Refit the consumer's weights and bias by least squares on the kept units; ``False`` keeps the original
        weights of the kept columns (plain structured pruning).
    seed : int, default 0
        Seed of the random baseline (the other methods are deterministic).
    target : str, optional
        Transformer target (``"ffn"``, ``"heads"``, ``"all"``, ``"experts"``: whole experts of mixtures of
        experts); given, or for models that hold a transformer block the transformer adapter recognises
        (BERT-style, ViT, ``nn.TransformerEncoderLayer``...), the call is delegated to
        :func:`nn_adapters.transformer.prune_transformer`. ``"layers"`` keeps the call here: the layer pairs found
        by tracing are pruned whatever blocks the model holds (a hybrid such as MobileViT, whose transformer blocks
        the transformer adapter refuses: its convolutions and the MLPs of its transformer blocks are pairs here).
    allocation : {"uniform", "error-curve"}
        How ``compression`` is split between layers (see :mod:`nn_adapters.budget`); ``"error"`` is accepted for
        ``"error-curve"`` (its earlier spelling here). For transformers it is passed on, as are ``ridge`` and
        ``refit_prior``.
    pairs : list of Pair, optional
        Declare the prunable pairs yourself (for models that cannot be traced, or to restrict pruning). Each is
        checked on up to 16 calibration samples: the consumer's input columns must follow the producer's units one to
        one (only per-unit operations between them), or a ``ValueError`` says what is wrong.
    ridge : "cv" or float, default "cv"
        Ridge of the least-squares selection and refit, relative to the mean activation variance (times the number
        of rows). ``"cv"`` chooses it per layer, label-free, by 5-fold cross-validation over the calibration
        samples (held-out reconstruction error computed in closed form from per-fold sufficient statistics;
        grid ``1e-6 ... 10``): for the greedy selection, on a first greedy selection of the kept size (the path is
        then recomputed with that ridge), and for the refit, on the finally kept units (except where the trained
        weights of the kept units already reproduce the targets up to rounding, e.g. a fully kept layer whose
        inputs are unchanged: those weights are kept, the bias corrected from the means, and the report's ridge
        is ``None``, as no ridge can do better and the cross-validation would rank rounding noise). This matters when a
        consumer has more input columns than calibration samples (e.g. conv -> flatten -> linear), where an almost
        unregularised refit interpolates the calibration set. With fewer than 5 samples it falls back to
        ``1e-3``. A number fixes it for every layer; ``0`` gives plain least squares (when the fit is not
        unique, the solution closest to the ``refit_prior``: minimum-norm for ``"zero"``, nearest the trained
        weights for ``"original"``; a ``UserWarning`` names each layer whose refit has no more calibration rows
        than unknowns).
    refit_from : {"asym", "seq", "layer"}
        Statistics the baselines use for their refit (their selection ignores them except ``act_norm``).
    refit_prior : {"original", "zero"}, default "original"
        What the refit's ridge shrinks toward: ``"original"``, the consumer's trained weights of the kept units
        (``min ||Y - A_S M - b||^2 + lam ||M - W_S^T||^2``, a Gaussian prior centred on the trained network: the
        ridge then damps only the compensation for the removed units, which is what is estimated from few
        samples), or ``"zero"`` (ordinary ridge). Both tend to plain least squares as the ridge goes to 0; with
        ``ridge="cv"`` the ridge is cross-validated for the chosen prior. The selection is not affected.
    weighting : {"none", "output"}, optional
        How the design rows of each pair's least-squares problem are weighted (default ``"none"``; transformers:
        see :func:`nn_adapters.transformer.prune_transformer`, default ``"layernorm"``). ``"output"``: by the
        sensitivity of the model's output to the consumer's output at that row, ``||J_r||_F^2`` (the Gauss-Newton
        model of the output's squared change, label-free; see :ref:`output-weighting`), scaled to be of
        order 1. The selection, its ridge and the refit then minimise the consumer's output change as seen from
        the model's output: rows (samples, positions, time steps of a diffusion model) whose errors the rest of the
        network amplifies count more. Costs one forward pass of the model with gradients per batch and one
        backward pass per output entry (at most 16; Rademacher probes above) per batch. Applies to every method
        (a baseline's refit, and ``act_norm``'s activation norms, read the weighted statistics).
    loss_fn : callable, optional
        Loss for ``actgrad`` (default cross-entropy): ``loss_fn(outputs, labels)`` returning the *mean* over the
        batch (it is multiplied by the batch size, so that the scores are per-sample sums whatever the batching).
    progress : bool
        Show a progress bar (tqdm if installed).
    verify : bool, default False
        Also run :func:`verification.error_decay` on each layer's selection objective (submodular methods; layers
        whose objective has at most 4,096 columns: seconds a layer; larger ones get ``{"skipped": ...}``) and
        store in ``LayerReport.verification``: ``lambda_min`` (proven lower bound on every submodularity ratio
        toward the full set), ``bound_rel_err_at_k`` (proven upper bound on the greedy selection's in-sample
        relative objective, per-step path-ratio bound), ``rel_err_at_k`` (that objective, exact: residual plus the
        selection ridge's penalty, as ``error_curve``) and ``contraction`` (fitted per-unit error contraction, an
        estimate). Needs ``verification``.
    se_bias_correction : bool, default True
        For a pair through a squeeze-and-excitation gate (``h * sigmoid(fc2(act(fc1(pool(h)))))``, see
        :mod:`nn_adapters.pairs`): removing channel ``j`` removes ``fc2``'s row ``j`` and ``fc1``'s column ``j``,
        whose contribution to the kept channels' gates is folded into ``fc1``'s bias at the calibration mean of
        the pooled channel (:func:`nn_adapters.shrink.keep_se`; the mean is read on the network the statistics
        come from: the original for ``layer``, the network pruned so far for ``seq`` and ``asym``). ``False``
        drops the column (the removed pooled values become zero), for comparison.
    executor : concurrent.futures.Executor, optional
        Runs the layers' numerical work in parallel, for LayerInChange statistics (``method="layer"``, or a
        baseline with ``refit_from="layer"``): a ``ThreadPoolExecutor``, a ``ProcessPoolExecutor`` or Dask's
        ``distributed.Client(...).get_executor()``. The statistics are gathered as without it (one forward pass,
        here); then every layer's selection (greedy path, cross-validated selection ridge, path again), refit
        ridge and refit are submitted at once (with ``allocation="error-curve"``, every layer's full greedy path first;
        with ``verify=True``, the verification too), and the modules are shrunk here, layer by layer in order, as
        without an executor. The result is the same: the same units and report, and weights from the same
        arithmetic (equal up to the rounding of BLAS calls run on another number of threads). The random baseline
        draws every layer's units here, in layer order. Threads share the statistics; a process or Dask worker
        receives a layer's statistics pickled, as numpy on the host (also those of a model on a GPU): with
        ``ridge="cv"`` the 5 folds and their merge, each ``d x d + d x m`` float64 (``d`` the consumer's input
        columns, ``m`` its outputs), and all layers' jobs are submitted at once. ``asym`` and ``seq`` statistics
        come from the network pruned so far, one layer after another: an executor is refused there
        (``ValueError``). A job that fails raises a ``RuntimeError`` naming its layer, with the worker's error as
        its cause. Every job runs with one BLAS thread. On the CPU prefer processes to threads, which share one
        BLAS; see :ref:`parallel-layers` for what it costs and when it pays off.
    stats_memory : int, optional
        Most bytes of float64 statistics that layer-wise statistics hold at once (``method="layer"``, baselines with
        ``refit_from="layer"``, and the error-curve allocation's, whatever the method): a layer's take
        ``(folds + 1) * (d * d + d * m) * 8`` bytes (``d`` the consumer's input columns, ``m`` its outputs, ``folds``
        5 with ``ridge="cv"``, else 0). The layers are then gathered in groups that fit, in layer order, one
        forward pass over the calibration data per group, each group's statistics dropped once its layers are
        decided (a layer larger than the limit forms a group of its own). The result is the same as in one pass.
        ``None`` (default): every layer in one pass. ``seq`` and ``asym`` hold one layer's at a time anyway.

    Returns
    -------
    pruned : torch.nn.Module
        A new model with fewer units (real smaller tensors, not masks), in the same train/eval mode as ``model``.
    report : PruneReport

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> import nn_adapters as nna
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> pruned, report = nna.prune(net, torch.randn(200, 10), keep=0.5, method="asym")
    >>> [m.out_features for m in pruned if isinstance(m, nn.Linear)]
    [16, 16, 3]
    >>> net[0].out_features  # the input model is untouched
    32

    With LayerInChange statistics the layers' selection and refit can run on an executor, with the same result:

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> x = torch.randn(200, 10)
    >>> serial, rep = nna.prune(net, x, keep=0.5, method="layer")
    >>> with ThreadPoolExecutor(2) as pool:
    ...     parallel, rep_pool = nna.prune(net, x, keep=0.5, method="layer", executor=pool)
    >>> [r.kept_units for r in rep_pool.layers] == [r.kept_units for r in rep.layers]
    True
    >>> all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(serial.parameters(), parallel.parameters()))
    True

    ``stats_memory`` bounds what those statistics hold at once (here one layer's: two passes over the data), with
    the same result:

    >>> bounded, rep_bounded = nna.prune(net, x, keep=0.5, method="layer", stats_memory=1)
    >>> [r.kept_units for r in rep_bounded.layers] == [r.kept_units for r in rep.layers]
    True
    """
    allocation = canonical_allocation(allocation)
    rng_from_seed(seed)  # refused now, not by numpy after the statistics, in a message that names no argument
    if _is_transformer(model, target):
        from . import transformer

        unsupported = [name for name, value, default in (("pairs", pairs, None), ("loss_fn", loss_fn, None),
                                                           ("progress", progress, False), ("verify", verify, False),
                                                           ("se_bias_correction", se_bias_correction, True),
                                                           ("stats_memory", stats_memory, None))
                       if value is not default]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} apply to MLP/CNN pruning only; transformer pruning "
                             "(nn_adapters.transformer.prune_transformer) does not take them.")
        if refit_from != "asym":  # the baselines' statistics: prune_transformer calls it propagation
            if kwargs.setdefault("propagation", refit_from) != refit_from:
                raise ValueError(f"refit_from={refit_from!r} and propagation={kwargs['propagation']!r} disagree; "
                                 "pass one of them.")
        if keep is not None:
            kwargs["keep"] = keep  # else prune_transformer's default (half of the units)
        if compression is not None:
            kwargs["compression"] = compression  # the fractions kept that reach it, the same in every block
        if weighting is not None:
            kwargs["weighting"] = weighting
        try:
            return transformer.prune_transformer(model, calibration_data, target=target or "ffn", method=method,
                                                 reweight=reweight, seed=seed, ridge=ridge, refit_prior=refit_prior,
                                                 allocation=allocation, executor=executor, **kwargs)
        except ValueError as exc:
            if target is not None or isinstance(exc, _budget.UnreachableCompressionError):  # not the detection's
                raise
            raise ValueError(f"{exc} (The model was taken for a transformer because it holds blocks of a layout the "
                             "transformer adapter knows; to prune the layer pairs found by tracing instead, its "
                             "convolutions and MLPs, pass target='layers'.)") from exc
    if kwargs:
        raise TypeError(f"prune() got unexpected keyword arguments {sorted(kwargs)}.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    method = canonical_method(method, _METHOD_NAMES)
    _check_args(method, compression, keep, allocation, ridge, refit_from)
    if refit_prior not in ("original", "zero"):
        raise ValueError(f"refit_prior must be 'original' (shrink the refit toward the trained weights) or 'zero' "
                         f"(ordinary ridge); got {refit_prior!r}.")
    prior = refit_prior == "original"
    if weighting not in (None, "none", "output"):
        raise ValueError(f"weighting must be 'none' (unweighted rows) or 'output' (rows weighted by the model "
                         f"output's sensitivity to them) for MLP/CNN pruning; got {weighting!r}.")
    if not isinstance(se_bias_correction, bool):
        raise ValueError(f"se_bias_correction must be True or False; got {se_bias_correction!r}.")
    if stats_memory is not None and (isinstance(stats_memory, bool) or not isinstance(stats_memory, numbers.Real)
                                     or not stats_memory > 0 or not math.isfinite(stats_memory)):
        raise ValueError(f"stats_memory must be a number of bytes > 0 (e.g. 4 * 2**30 for 4 GiB), or None for every "
                         f"layer's statistics in one pass; got {stats_memory!r}.")
    check_executor(executor)
    stats_mode = method if method in SUBMODULAR_METHODS else refit_from
    if executor is not None and stats_mode != "layer":
        raise ValueError(f"with {stats_mode!r} statistics {LAYER_ONLY}: pass method='layer' (refit_from='layer' "
                         "for a baseline), or no executor.")
    t_start = time.perf_counter()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = as_batches(calibration_data, device=device, dtype=float_dtype(model), model=model)
    # the unpruned network and the model being pruned read the caller's tensors (no copy of the weights): the
    # shrinking gives the pruned modules tensors of their own, the rest is copied at the end (own_tensors)
    orig, work = shared_copy(model), shared_copy(model)
    guard = TensorGuard(model)
    x0 = batches[0][0]
    keywords = list(x0) if isinstance(x0, Mapping) else None  # dict batches: model(**batch) with these keys

    gm, trace_error = None, None
    try:
        gm = trace(work, keywords, x0)
    except ValueError as exc:
        trace_error = exc
    if gm is not None and keywords is None and (why := second_inputs(gm, model)) is not None:
        raise ValueError(why)
    if pairs is None:
        if gm is None:
            raise trace_error
        found, skipped = find_pairs(work, take(x0, 2))
    else:
        found = resolve_pairs(work, list(pairs), x0, gm)
        declared = {p.producer for p in found}
        skipped = [(n, "not declared in pairs=") for n, m in work.named_modules()
                   if isinstance(m, _conv.LAYER_TYPES) and n not in declared]
    if not found:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped) or ("the model has no Linear, Conv1d, Conv2d, "
                                                                      "ConvTranspose1d or ConvTranspose2d layer")
        raise ValueError(f"no prunable layer pair found in {type(model).__name__} ({reasons}). Supported: "
                         "Linear->Linear, Conv->Conv of one rank (Conv1d, Conv2d and their transposed kinds), "
                         "Conv->Flatten->Linear and Linear->Unflatten->Conv through BatchNorm, GroupNorm (whole "
                         "groups), activations, pooling, resampling and dropout, and gated units (the product of two "
                         "producers' outputs, or of a GLU's halves); "
                         "declare pairs with "
                         "pairs=[nn_adapters.Pair(...)] for other layouts.")
    if stats_mode != "layer":
        hooked = container_hooks(work) + [p.consumer for p in found
                                          if work.get_submodule(p.consumer)._forward_pre_hooks]
        if hooked:
            raise ValueError(f"statistics {stats_mode!r} run the traced graph node by node, where these forward "
                             f"hooks would be skipped or run after the consumer's input is recorded: "
                             f"{', '.join(hooked)}. Use method='layer' (with refit_from='layer' for baselines; "
                             "--method layer in submod prune), which runs the model itself, or remove the hooks "
                             "while pruning.")
    if stats_mode != "layer" and gm is None:
        raise ValueError(f"method {method!r} with statistics {stats_mode!r} needs a model traceable by torch.fx "
                         f"({trace_error}); use method='layer' (or refit_from='layer' for baselines).")
    if stats_mode != "layer":
        for p in found:
            if p.consumer_node is None:
                raise ValueError(f"consumer {p.consumer!r} of pair {p.name} is not called in the traced graph.")
    _check_sample_shapes(work, batches, found, lambda x: find_pairs(work, take(x, 2))[0] if pairs is None
                         else resolve_pairs(work, list(pairs), x, gm))

    folds = CV_FOLDS if ridge == "cv" else 1
    notes: list[str] = []  # warnings, raised once the model is built (so that they point at the caller)
    consumers = {p.name: p.consumer for p in found}

    def sensitivity(names: Iterable[str] | None = None) -> OutputSensitivity | None:
        """A fresh source of the output-sensitivity row weights (``weighting="output"``) of the pairs ``names``
        (default all), else ``None``."""
        if weighting != "output":
            return None
        return OutputSensitivity(orig, consumers if names is None else {n: consumers[n] for n in names}, seed)

    passes = _stat_passes(found, work, folds, stats_memory)

    def gather(group: list[int]) -> dict[str, PairStats]:
        """LayerInChange statistics of the pairs ``group`` (indices into ``found``), in one forward pass."""
        chosen = [found[i] for i in group]
        return _layer_stats(orig, chosen, batches, progress, folds, sensitivity(p.name for p in chosen), notes)
    pm = _budget.ParamModel(work, found, adds_bias=reweight, adds_se_bias=se_bias_correction)
    layer_stats: dict[str, PairStats] | None = None
    full_paths: dict[str, _Path] = {}
    if keep is not None:
        ks = _budget.keep_counts(found, keep)
    elif allocation == "uniform":
        ks = _budget.uniform_counts(pm, compression)
    else:
        sel_ridge = FALLBACK_RIDGE if ridge == "cv" else float(ridge)
        for group in passes:
            layer_stats = None  # the previous group's go before the next group's are gathered
            layer_stats = gather(group)
            with OrderedJobs(executor) as jobs:
                for i in group:
                    p = found[i]
                    jobs.add(f"the greedy path of pair {p.name}", _greedy,
                             (_shipped(layer_stats[p.name], executor, merged=True), sel_ridge, p.n_units),
                             partial(full_paths.__setitem__, p.name))
                jobs.finish()
        ks = _budget.error_allocation(pm, [np.asarray(full_paths[p.name].relative_errors, dtype=np.float64)
                                           for p in found], compression)
        if stats_mode != "layer" or len(passes) > 1:
            layer_stats = None  # seq and asym gather their own, one layer at a time; layer mode, group by group

    scores = _actgrad_scores(orig, found, batches, loss_fn) if method == "actgrad" else None
    rng = np.random.default_rng(seed)
    reports: list[LayerReport] = []
    bar = _progress_bar(len(found), f"prune[{method}]", progress)

    def job_args(i: int, pair: PrunablePair, st: PairStats, shipped: FoldStats) -> tuple:
        """The arguments of :func:`_pair_job` for pair ``i`` with statistics ``st`` (``shipped``: what the job
        reads of them); a baseline's units are chosen here, in the order of the calls (pair order in layer mode)."""
        k = int(ks[i])
        order = None if method in SUBMODULAR_METHODS else _baseline_order(method, pair, st, orig, k, rng, scores)
        start = full_paths.get(pair.name) if method == "layer" else None
        return shipped, k, ridge, prior, bool(reweight), bool(verify), order, start

    def apply(i: int, pair: PrunablePair, st: PairStats, out: _Outcome) -> torch.Tensor:
        """Shrink the modules of pair ``i`` to its job's outcome and report it."""
        t0 = time.perf_counter()
        k = int(ks[i])
        kept = np.sort(out.order)
        idx = torch.as_tensor(kept, dtype=torch.long, device=device)
        weight = bias = None
        rel = cv_err = lam = how = None
        if reweight:
            (lam, cv_err), how = out.ridge
            cols = kept.size * pair.cols_per_unit + pair.n_fixed * pair.cols_per_channel
            if lam == 0.0 and st.count <= cols + 1:
                notes.append(f"pair {pair.name}: the refit with ridge=0 has {st.count} calibration rows for {cols} "
                             "kept columns and a bias, so it interpolates the calibration data (the interpolant "
                             "closest to the refit prior) and is unlikely to generalise; use ridge='cv' (the "
                             "default) or more calibration samples.")
            M, b, rel = out.refit
            cons = work.get_submodule(pair.consumer)
            weight = torch.as_tensor(np.ascontiguousarray(M.T), dtype=torch.float64)
            base_bias = cons.bias.detach().to(torch.float64).cpu() if cons.bias is not None else 0.0
            bias = base_bias + torch.as_tensor(b, dtype=torch.float64)
        keep_producer_side(work, pair, idx)
        if pair.se:
            keep_se(work.get_submodule(pair.se[0]), work.get_submodule(pair.se[1]), idx,
                    st.se_input_mean() if se_bias_correction else None)
        # the consumer keeps the units' input channels (a unit's group_size of them behind a GroupNorm; with the
        # fixed channels of a concatenation's other operands), for a Linear consumer their blocks of columns
        set_inputs(work.get_submodule(pair.consumer), pair.consumer_channels(idx), pair.cols_per_channel, weight, bias)
        curve = None if out.path is None else [float(e) for e in out.path.relative_errors[:k + 1]]
        reports.append(LayerReport(pair.name, pair.kind, pair.n_units, k, kept.tolist(), out.order.tolist(), rel,
                                   out.time_s + time.perf_counter() - t0,
                                   ridge=lam if lam is None or np.isfinite(lam) else None, ridge_choice=how,
                                   cv_relative_error=cv_err, error_curve=curve, verification=out.verification,
                                   selection_ridge=None if out.path is None else float(out.path.ridge),
                                   fixed_channels=pair.n_fixed))
        bar.update(1)
        return idx

    def decide(i: int, pair: PrunablePair, st: PairStats) -> torch.Tensor:
        return apply(i, pair, st, _pair_job(*job_args(i, pair, st, st)))

    try:
        if stats_mode == "layer":
            for group in passes:
                if layer_stats is None:
                    layer_stats = gather(group)
                with OrderedJobs(executor) as jobs:
                    for i in group:
                        p = found[i]
                        st = layer_stats[p.name]
                        jobs.add(f"the selection and refit of pair {p.name}", _pair_job,
                                 job_args(i, p, st, _shipped(st, executor)), partial(apply, i, p, st))
                    jobs.finish()
                layer_stats = st = None  # decided: the next group's statistics take their place
        else:
            groups = _graph_groups(gm, work, keywords, batches, found)
            row_weights = None
            if weighting == "output":  # in the order the staged run reads the batches
                row_weights, weight_notes = output_row_weights(orig, consumers, [b for _, g in groups for b in g],
                                                               seed)
                notes += weight_notes
            _run_staged(groups, orig, work, found, stats_mode, decide, folds, row_weights)
    finally:
        bar.close()
    for note in dict.fromkeys(notes):  # once each (the error-curve allocation's statistics say it too)
        warnings.warn(note, UserWarning, stacklevel=3)  # the caller of prune, past outside_inference_mode
    copy_modes(model, work)
    own_tensors(work, model)
    guard.check()
    report = PruneReport(
        method=method, reweight=bool(reweight), labelled=method in LABELLED_METHODS, statistics=stats_mode,
        allocation="keep" if keep is not None else allocation, n_samples=n_samples(batches),
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in work.parameters()),
        flops_before=_budget.count_flops(orig, x0), flops_after=_budget.count_flops(work, x0),
        layers=reports, skipped=list(skipped), time_s=time.perf_counter() - t_start, weighting=weighting or "none")
    return work, report


def _check_sample_shapes(model: nn.Module, batches: list, found: list[PrunablePair],
                         discover: Callable[[torch.Tensor], list[PrunablePair]]) -> None:
    """Refuse calibration batches whose sample shape differs from the first batch's unless the (unpruned) model
    runs on it and ``discover`` finds the same pairs there, with the same columns per unit: then each batch's
    design rows are rows of the same statistics (a convolution's patches, or one row per sample after a global
    pooling) and they add up over batches."""
    def layout(ps: list[PrunablePair]) -> list[tuple]:
        return [(p.name, p.kind, p.n_units, p.cols_per_unit, p.between, p.se, p.offset, p.n_fixed, p.gated_with,
                 p.chunked, p.conditioning) for p in ps]

    first = sample_shape(batches[0][0])
    want = layout(found)
    seen = {first}
    for i, (x, _) in enumerate(batches):
        shape = sample_shape(x)
        if shape in seen:
            continue
        seen.add(shape)
        where = f"calibration batch {i} has sample shape {_shape_words(shape)} and batch 0 {_shape_words(first)}"
        try:
            with torch.no_grad():
                call(model, take(x, 2))
        except Exception as exc:
            raise ValueError(f"{where}, and the model fails on {shape} ({type(exc).__name__}: {exc}). Batches may "
                             "differ in shape only where the model runs on each (e.g. a global pooling before the "
                             "classifier, not a flatten into a Linear); pass batches of one shape.") from exc
        got = layout(discover(x))
        if got != want:
            raise ValueError(f"{where}, and the prunable pairs differ between the two shapes ({got} vs {want}), so "
                             "their statistics cannot be added up; pass batches of one shape.")


def _shape_words(shape: tuple) -> str:
    """A :func:`nn_adapters._data.sample_shape` for messages: a tensor's sample shape, or a dict's per key."""
    return str(dict(shape)) if shape and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)
                                             for e in shape) else str(shape)


#: Largest number of columns (of the selection objective: a unit's columns times the units) for which
#: ``verify=True`` runs :func:`verification.error_decay` on a layer: its spectral bound is one eigendecomposition
#: of the columns' correlation matrix and its path bounds follow the greedy path, seconds for thousands of columns
#: (5 s for 2,048 single columns and 1,024 picks on 2 cores).
VERIFY_MAX_COLUMNS = 4096


def _verify(f: object, k: int, energy: float | None = None) -> dict[str, tuple]:
    """What :func:`verification.error_decay` says about one layer's greedy selection (each number with its kind);
    the errors are relative to ``energy`` when given (the centred target energy of a pair whose objective is the
    gain over fixed columns, so that they are the same relative errors as ``error_curve``), else to the
    objective's ``y_norm2``."""
    if f.n_features > VERIFY_MAX_COLUMNS or k < 1:
        why = f"{f.n_features} columns > {VERIFY_MAX_COLUMNS}" if k >= 1 else "no unit kept"
        return {"skipped": (why, "n/a")}
    import verification as vf  # optional dependency of the report, imported lazily

    dec = vf.error_decay(f, k_max=k, comparators=None, per_step_spectral=False)
    y2 = energy if energy is not None else dec.y_norm2
    y2 = y2 if y2 > 0 else 1.0
    out = {"lambda_min": (float(dec.lambda_min), "proven lower bound"),
           "rel_err_at_k": (float(dec.errors[-1] / y2), "exact"),
           "bound_rel_err_at_k": (float(dec.bound("per-step path ratio").values[-1] / y2), "proven upper bound"),
           "contraction": (float(dec.contraction), "estimate")}
    if dec.preconditions:
        out["preconditions"] = ("; ".join(dec.preconditions), "n/a")
    return out


def _stat_passes(pairs: list[PrunablePair], model: nn.Module, folds: int, limit: float | None) -> list[list[int]]:
    """The pairs (indices, in order) whose LayerInChange statistics are gathered together, in one forward pass:
    all of them without ``limit``, else consecutive groups whose statistics (``folds`` accumulators and their merge,
    each ``d x d + d x m`` float64) take at most ``limit`` bytes, a pair larger than that alone."""
    if limit is None:
        return [list(range(len(pairs)))]
    groups: list[list[int]] = []
    used = math.inf
    for i, p in enumerate(pairs):
        m, d = _conv.weight_matrix(model.get_submodule(p.consumer)).shape
        size = (folds + (folds > 1)) * (d * d + d * m) * 8
        if used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def _layer_stats(orig: nn.Module, pairs: list[PrunablePair], batches: list, progress: bool,
                 folds: int = 1, sensitivity: OutputSensitivity | None = None,
                 notes: list[str] | None = None) -> dict[str, PairStats]:
    """LayerInChange statistics of every pair in one forward pass of the original network, through hooks.

    With ``sensitivity`` (``weighting="output"``) each batch's row weights are computed just before its statistics
    and consumed by them, so that memory stays independent of the number of samples; its notes go to ``notes``.
    """
    plan = sample_folds(batches, folds) if folds > 1 else None
    stats = {p.name: PairStats(p, orig.get_submodule(p.consumer), folds, plan,
                               None if sensitivity is None else []) for p in pairs}
    bar = _progress_bar(len(batches), "calibration", progress)
    try:
        for x, _ in batches:
            if sensitivity is not None:  # before the hooks: its forward pass feeds no statistics
                for name, ws in sensitivity.batch(x).items():
                    stats[name].add_row_weights(ws)
            with capture_hooks(orig, pairs, stats), torch.no_grad():
                call(orig, x)
            bar.update(1)
    finally:
        bar.close()
    if sensitivity is not None and notes is not None:
        notes += sensitivity.notes
    return stats


#: Relative ridge used when ``ridge="cv"`` cannot cross-validate (fewer calibration samples than folds).
FALLBACK_RIDGE = 1e-3


@dataclass(frozen=True)
class _Path:
    """What pruning reads of a nested greedy path (:meth:`submod.SparseRegression.greedy_path`), without its
    objective: small to send between processes."""

    selected: np.ndarray
    relative_errors: np.ndarray
    ridge: float  # the relative selection ridge it was computed with


def _greedy(st: FoldStats, ridge: float, k: int) -> _Path:
    """The nested greedy path of ``k`` picks on ``st`` at relative ridge ``ridge``."""
    path = st.objective(ridge).greedy_path(k)
    return _Path(path.selected, path.relative_errors if st.fixed.size == 0 else st.path_errors(path.errors), ridge)


def _select(st: FoldStats, ridge: float | str, k: int, start: _Path | None = None) -> _Path:
    """The nested greedy path of ``k`` picks (``start``: an existing path to reuse when it is long enough).

    With ``ridge="cv"`` the selection's ridge is cross-validated at the size that is kept: a first path at
    :data:`FALLBACK_RIDGE` gives a set ``S0`` of ``k`` units, the ridge is chosen by cross-validation on ``S0``,
    and the path is recomputed with it (a ridge cross-validated on all units does not transfer: with more
    columns than samples the minimum-norm fit of all units needs less shrinkage than a ``k``-unit fit).
    """
    path = start
    if path is None or len(path.selected) < k:
        path = _greedy(st, FALLBACK_RIDGE if ridge == "cv" else float(ridge), k)
    if ridge == "cv" and k > 0 and st.can_cross_validate():
        path = _greedy(st, st.cv_ridge(path.selected[:k])[0], k)
    return path


def _refit_ridge(st: FoldStats, ridge: float | str, kept: np.ndarray,
                 prior: bool) -> tuple[tuple[float, float | None], str]:
    """``((relative ridge, held-out relative error or None), how it was chosen)`` for the refit on ``kept``.

    With ``ridge="cv"``, when the refit shrinks toward the trained weights and those already reproduce the
    targets up to rounding (every unit kept with unchanged inputs, or only constant units removed), no ridge can
    do better and a cross-validation would only rank rounding noise: the ridge is ``inf`` (the trained weights,
    the bias refitted from the means).
    """
    if ridge != "cv":
        return (float(ridge), None), "fixed"
    if prior and st.prior_error(kept) <= EXACT_PRIOR_RTOL:
        return (np.inf, None), "none: the trained weights reproduce the targets"
    if not st.can_cross_validate():
        return (FALLBACK_RIDGE, None), f"fixed {FALLBACK_RIDGE:g} (too few samples to cross-validate)"
    lam, errs = st.cv_ridge(kept, prior=prior)
    return (lam, float(errs.min())), f"{st.n_folds}-fold cv"


@dataclass(frozen=True)
class _Outcome:
    """What :func:`_pair_job` computed for one pair."""

    order: np.ndarray                                   # the kept units in pick order
    path: _Path | None                                  # the greedy path (submodular methods)
    ridge: tuple[tuple[float, float | None], str] | None  # the refit's ridge (see _refit_ridge), with reweight
    refit: tuple[np.ndarray, np.ndarray, float] | None  # (M, b, relative error) of the refit, with reweight
    verification: dict[str, tuple] | None
    time_s: float


def _pair_job(st: FoldStats, k: int, ridge: float | str, prior: bool, reweight: bool, verify: bool,
              order: np.ndarray | None, start: _Path | None) -> _Outcome:
    """The numerical work of one pair: the greedy selection of ``k`` units (unless a baseline's ``order`` is
    given), the refit's ridge and the refit, and the verification.

    A module-level function of picklable arguments (numbers, numpy arrays and :class:`FoldStats`), so that it can
    run on any executor (see :mod:`nn_adapters._executor`).
    """
    t0 = time.perf_counter()
    path = None
    if order is None:
        path = _select(st, ridge, k, start)
        order = np.asarray(path.selected[:k], dtype=np.int64)
    kept = np.sort(order)
    lam = fit = None
    if reweight:
        lam = _refit_ridge(st, ridge, kept, prior)
        fit = st.refit(kept, lam[0][0], prior=prior)
    ver = None
    if verify and path is not None:
        ver = _verify(st.objective(path.ridge), k, st.target_energy() if st.fixed.size else None)
    return _Outcome(order, path, lam, fit, ver, time.perf_counter() - t0)


def _shipped(st: PairStats, executor: Executor | None, merged: bool = False) -> FoldStats:
    """The statistics a job reads: ``st`` itself when it runs here, else its module-free part (only the folds'
    merge with ``merged``: all that a path at a fixed ridge reads)."""
    return st if executor is None else st.fold_stats(merged=merged)


def _baseline_order(method: str, pair: PrunablePair, st: PairStats, orig: nn.Module, k: int,
                    rng: np.random.Generator, scores: dict[str, np.ndarray] | None) -> np.ndarray:
    n = pair.n_units
    if method == "random":
        return rng.choice(n, size=k, replace=False).astype(np.int64)
    if method == "weight_norm":
        score = _weight_norm_scores(pair, orig)
    elif method == "act_norm":
        W = st.W.abs().sum(dim=0).cpu().numpy()  # sum_i |W_ic| per input column
        score = (W * st.unit_input_norms())[st.unit_columns()].sum(axis=1)  # the producer's columns only
    else:
        score = scores[pair.name]
    return np.argsort(-score, kind="stable")[:k].astype(np.int64)


def _weight_norm_scores(pair: PrunablePair, model: nn.Module) -> np.ndarray:
    """The weight-norm score of every unit: the L2 norm of its rows in the producer (a unit's rows together:
    ``P`` rows of a ``linear->conv`` pair, a group's channels behind a GroupNorm). A gated unit has rows in two
    factors (the two producers, or the two halves of a chunked producer): its score is the root mean square over
    the factors of their rows' norms, ``sqrt((||w_1||^2 + ||w_2||^2) / 2)``, which ranks units as the transformer
    adapter's magnitude score ranks a gated FFN unit, restricted to the producers as here (the mean over the
    coupled layers of the unit's squared norm)."""
    n = pair.n_units
    rows = pair.producer_rows(torch.arange(n))  # unit-major within each half
    halves = 2 if pair.chunked else 1
    total = torch.zeros(n, dtype=torch.float64)
    for name in pair.producers:
        W = _conv.weight_matrix(model.get_submodule(name)).detach().to(torch.float64).cpu()
        total += W.pow(2).sum(dim=1)[rows].reshape(halves, n, -1).sum(dim=(0, 2))
    factors = halves * len(pair.producers)
    return (total / factors).sqrt().numpy()


def _actgrad_scores(model: nn.Module, pairs: list[PrunablePair], batches: list,
                    loss_fn: Callable | None) -> dict[str, np.ndarray]:
    """ActGrad (first-order Taylor) importance ``sum_samples |sum_positions a * dL/da|`` of every unit, computed
    on the original network with LABELS (Molchanov et al., "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR 2017)."""
    if any(y is None for _, y in batches):
        if isinstance(batches[0][0], Mapping):
            raise ValueError("method='actgrad' is the labelled baseline, and a dict batch holds the model's keyword "
                             "inputs only: pass calibration batches as (dict, labels) pairs, e.g. "
                             f"[({{{', '.join(f'{k!r}: ...' for k in batches[0][0])}}}, labels), ...].")
        raise ValueError("method='actgrad' is the labelled baseline: pass calibration batches as (inputs, labels).")
    loss_fn = loss_fn or F.cross_entropy
    acc = {p.name: torch.zeros(p.n_units, dtype=torch.float64) for p in pairs}
    handles = []
    watched: list[torch.Tensor] = []  # this batch's consumer inputs: the loss is differentiated for them only

    def make_hook(p: PrunablePair) -> Callable:
        def pre(_m: nn.Module, inp: tuple) -> tuple | None:
            x = inp[0]
            xd = x.detach()
            # Nothing upstream needs a gradient (frozen layers, integer inputs converted in forward()): make the
            # activation a leaf that does, so that the loss's gradient reaches it (and every later consumer).
            swapped = not x.requires_grad
            if swapped:
                x = xd.clone().requires_grad_(True)

            def grad_hook(g: torch.Tensor) -> None:
                ag = (xd.to(torch.float64) * g.to(torch.float64))
                n = ag.shape[0]
                # the producer's channels (or column blocks) at the consumer: after a concatenation, from its offset
                lo, hi = p.offset, p.offset + p.n_units * p.group_size
                if p.conv_consumer:  # sum over the positions of a sample, (2,) or (2, 3), and a unit's channels
                    s = ag.sum(dim=tuple(range(2, ag.dim())))[:, lo:hi].reshape(n, p.n_units, -1).sum(dim=2)
                    s = s.abs().sum(dim=0)
                elif p.kind == "conv->linear":
                    c = p.cols_per_channel
                    s = ag.reshape(n, -1)[:, lo * c:hi * c].reshape(n, p.n_units, p.cols_per_unit).sum(dim=2)
                    s = s.abs().sum(dim=0)
                else:  # (N, ..., units): the positions of a sample are summed before the absolute value
                    s = ag.reshape(n, -1, ag.shape[-1])[..., lo:hi].sum(dim=1).abs().sum(dim=0)
                acc[p.name] += s.cpu()

            x.register_hook(grad_hook)
            watched.append(x)
            return (x, *inp[1:]) if swapped else None
        return pre

    try:
        for p in pairs:
            handles.append(model.get_submodule(p.consumer).register_forward_pre_hook(make_hook(p)))
        with torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                watched.clear()
                out = call(model, x)
                try:
                    loss = loss_fn(out, y)
                except Exception as exc:  # noqa: BLE001 - the loss on the user's labels: say what it was given
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(
                        f"method='actgrad': loss_fn failed on calibration batch {i} (model outputs {shape}, labels "
                        f"{tuple(y.shape)} of {y.dtype}): {type(exc).__name__}: {str(exc).strip()}. The default "
                        "loss_fn is cross-entropy, which takes one class index per sample (an integer tensor of "
                        "shape (N,)); pass loss_fn= for other labels.") from exc
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"method='actgrad': loss_fn must return the batch mean, a single number; it "
                                     f"returned {tuple(loss.shape) if isinstance(loss, torch.Tensor) else loss!r} "
                                     "(a loss with reduction='none'?).")
                # loss_fn returns the batch mean (as F.cross_entropy does): times the batch size, each sample's
                # gradient counts once whatever the batching. Differentiated for the consumers' inputs only (their
                # hooks read the gradient): no parameter's .grad is written, and ``model`` shares the caller's.
                if not loss.requires_grad:
                    raise ValueError("method='actgrad': the loss does not depend on the prunable layers' inputs "
                                     "through autograd (is the model's output detached, or computed under "
                                     "torch.no_grad() in its forward?); ActGrad needs the loss's gradient at them.")
                torch.autograd.grad(loss.reshape(()) * batch_len(x), watched, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {k: v.numpy() for k, v in acc.items()}


def _graph_groups(gm: fx.GraphModule, work: nn.Module, keywords: list[str] | None, batches: list,
                  pairs: list[PrunablePair]) -> list[tuple[fx.GraphModule, list]]:
    """The traced graph and the batches it runs, for the staged run: ``[(gm, batches)]``, or, when ``gm`` fixed
    decisions on the first batch's shapes (guard nodes of :mod:`nn_adapters._value_trace`) and the batches differ in
    size (a DataLoader's smaller last batch), one graph per batch size, each traced on a batch of that size (the
    first batch's group first, with ``gm``): a decision on the batch size (diffusers' ``Upsample2D`` tests
    ``shape[0] >= 64``) then holds in every graph for its own batches."""
    sizes = [batch_len(x) for x, _ in batches]
    guarded = any(n.op == "call_function" and n.target in GUARDS for n in gm.graph.nodes)
    if not guarded or len(set(sizes)) == 1:
        return [(gm, batches)]
    by_size: dict[int, list] = {}
    for n, b in zip(sizes, batches, strict=True):
        by_size.setdefault(n, []).append(b)
    return [(gm if n == sizes[0] else trace(work, keywords, bs[0][0]), bs) for n, bs in by_size.items()]


def _run_staged(groups: list[tuple[fx.GraphModule, list]], orig: nn.Module, work: nn.Module,
                pairs: list[PrunablePair], mode: str, decide: Callable[[int, PrunablePair, PairStats], torch.Tensor],
                folds: int = 1, row_weights: Mapping[str, list[torch.Tensor | None]] | None = None) -> None:
    """Run the calibration set through the traced graph once, node by node, pruning each pair at its consumer.

    ``groups``: ``(traced graph, its batches)``, one group per graph: one for most models; a model whose traced
    graph fixes decisions on the batch size (guards, see :mod:`nn_adapters._value_trace`) has one graph per batch
    size, traced on a batch of that size. The groups advance in lock step from consumer to consumer: each pair's
    statistics read every group's batches (in group order, the order of ``sample_folds`` and ``row_weights``)
    before it is pruned. ``work`` is pruned in place; ``orig`` (only evaluated for ``mode="asym"``) gives the
    targets.
    """
    stats: dict[str, PairStats] = {}
    batches = [b for _, bs in groups for b in bs]
    plan = sample_folds(batches, folds) if folds > 1 else None

    def stats_of(p: PrunablePair) -> PairStats:
        if p.name not in stats:
            stats[p.name] = PairStats(p, orig.get_submodule(p.consumer), folds, plan, (row_weights or {}).get(p.name))
        return stats[p.name]

    need_orig = mode == "asym"
    # the generators run only inside next() and send(), here, with gradients off (a no_grad block inside each
    # generator would be left in the order the generators finish, not in the order they were entered)
    with torch.no_grad():
        steps = [_staged_steps(gm, orig, work, bs, pairs, need_orig, stats_of, primary=g == 0)
                 for g, (gm, bs) in enumerate(groups)]
        at = [next(step, None) for step in steps]
        while at[0] is not None:
            i, p = at[0][0], at[0][1]
            if any(a is None or a[0] != i for a in at):
                raise ValueError(f"the graphs traced for batches of different sizes reach the consumers in "
                                 f"different orders (pair {p.name}). {SHAPE_REMEDY}")
            st = stats_of(p)
            for _, _, inputs, targets in at:
                for b, x in enumerate(inputs):
                    st.update(x, targets[b] if need_orig else None)
            idx = decide(i, p, st)
            del stats[p.name], st  # decided: its statistics (float64 Gram matrices, per fold) are not read again
            at = [_send(step, idx) for step in steps]
    if any(a is not None for a in at):
        raise ValueError(f"the graphs traced for batches of different sizes reach different consumers. {SHAPE_REMEDY}")


def _send(step: Generator, value: object) -> object:
    """``step.send(value)``, or ``None`` once the generator is exhausted."""
    try:
        return step.send(value)
    except StopIteration:
        return None


def _staged_steps(gm: fx.GraphModule, orig: nn.Module, work: nn.Module, batches: list, pairs: list[PrunablePair],
                  need_orig: bool, stats_of: Callable[[PrunablePair], PairStats], primary: bool = True) -> Generator:
    """The node-by-node run of ``batches`` through ``gm`` (see :func:`_run_staged`), as a generator: at each
    consumer it yields ``(pair index, pair, the consumer's inputs per batch in the pruned network, in the original
    network or None)`` and is sent the kept units, with which it slices (or, through a squeeze-and-excitation gate,
    recomputes) the consumer's input before going on. The consumer nodes are the pairs' ``consumer_node`` in the
    ``primary`` graph (the one the pairs were found in), the calls of the consumer modules in the others."""
    nodes = list(gm.graph.nodes)
    if primary:
        by_node = {p.consumer_node: (i, p) for i, p in enumerate(pairs)}
    else:
        by_target = {p.consumer: (i, p) for i, p in enumerate(pairs)}
        by_node = {n.name: by_target[n.target] for n in nodes if n.op == "call_module" and n.target in by_target}
    last_use: dict[fx.Node, int] = {}
    for t, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = t
    se_fc1 = {p.se[0]: p for p in pairs if p.se}
    consumer_names = {p.name: name for name, (_, p) in by_node.items()}
    segments = _se_segments(nodes, pairs, last_use, consumer_names)
    free_at: dict[int, list[fx.Node]] = {}
    for a, t in last_use.items():
        free_at.setdefault(t, []).append(a)
    nb = len(batches)
    env_w: dict[fx.Node, list] = {}
    env_o: dict[fx.Node, list] = {}
    # every input of the graph per batch: a tensor batch's tensor, a dict batch's values by name, or the defaults
    inputs = [graph_arguments(gm, orig, x) for x, _ in batches]
    n_inputs = 0
    for t, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            vals = [a[n_inputs] for a in inputs]
            n_inputs += 1
            env_w[node] = vals
            if need_orig:
                env_o[node] = list(vals)
            continue
        if node.name in by_node:
            i, p = by_node[node.name]
            src = node.args[0]
            if not isinstance(src, fx.Node) or sum(not metadata_read(u) for u in src.users) != 1:
                raise ValueError(f"the input of consumer {p.consumer!r} is used elsewhere in the graph; pair "
                                 f"{p.name} cannot be pruned sequentially (use method='layer').")
            idx = yield i, p, env_w[src], env_o[src] if need_orig else None
            if p.name in segments:
                # recompute the consumer's input through the pruned (bias-corrected) gate, from the gated tensor
                h, seg = segments[p.name]
                local = dict(env_w)
                local[h] = [x[:, idx] for x in env_w[h]]
                for n in seg:
                    local[n] = _execute(n, work, local, nb)
                env_w[src] = local[src]
            else:
                env_w[src] = [slice_units(x, p, idx) for x in env_w[src]]
        if node.op == "call_module" and node.target in se_fc1:  # the pooled input of an SE gate's fc1
            st = stats_of(se_fc1[node.target])
            for x in env_w[node.args[0]]:
                st.update_se_input(x)
        env_w[node] = _execute(node, work, env_w, nb)
        if need_orig:
            env_o[node] = _execute(node, orig, env_o, nb)
        for a in free_at.get(t, ()):
            env_w.pop(a, None)
            env_o.pop(a, None)


def _se_segments(nodes: list[fx.Node], pairs: list[PrunablePair], last_use: dict[fx.Node, int],
                 consumer_names: Mapping[str, str] | None = None) -> dict[str, tuple[fx.Node, list[fx.Node]]]:
    """For each pair through a squeeze-and-excitation gate: the gated tensor's node and the nodes, in order, from
    it to the consumer's input (the pooling, fc1, fc2, the product ...), which the sequential run recomputes with
    the pruned gate. The values they read are kept (``last_use``) until the consumer is reached.
    ``consumer_names``: pair name -> the consumer's node in ``nodes`` (default ``consumer_node``); the gated
    tensor's node is found by its name in the graph the pairs were found in (a graph traced for another batch
    size names it alike, its nodes being named by operation and count)."""
    by_name = {n.name: n for n in nodes}
    pos = {n: t for t, n in enumerate(nodes)}
    out = {}
    for p in pairs:
        if not p.se:
            continue
        cons_name = (consumer_names or {}).get(p.name, p.consumer_node)
        if p.se_input_node not in by_name or cons_name not in by_name:
            raise ValueError(f"pair {p.name}: the tensor its squeeze-and-excitation gate multiplies was not found in "
                             "the traced graph; use method='layer'.")
        h, cons = by_name[p.se_input_node], by_name[cons_name]
        if pos[h] >= pos[cons]:
            raise ValueError(f"pair {p.name}: the tensor its squeeze-and-excitation gate multiplies was not found "
                             "before its consumer in the graph traced for another batch size; use method='layer'.")
        src = cons.args[0]
        desc = {h}
        for n in nodes[pos[h] + 1:pos[cons]]:
            if any(a in desc for a in n.all_input_nodes):
                desc.add(n)
        anc, todo = set(), [src]
        while todo:
            a = todo.pop()
            if a in desc and a not in anc:
                anc.add(a)
                todo.extend(a.all_input_nodes)
        seg = [n for n in nodes[pos[h] + 1:pos[cons]] if n in anc]
        for n in (h, *seg):
            for a in (n, *n.all_input_nodes):
                last_use[a] = max(last_use.get(a, 0), pos[cons])
        out[p.name] = (h, seg)
    return out


def _execute(node: fx.Node, model: nn.Module, env: dict, nb: int) -> list:
    """Run ``node`` of the traced graph on each of the ``nb`` batches' values in ``env``, with the layers of
    ``model`` (the pruned working copy or the original). A parameter or buffer is read from ``model``; a constant
    that tracing made of a tensor computed in ``forward()`` without the inputs (``torch.arange(16)`` in a sinusoidal
    embedding: ``_tensor_constant0``) is set on the traced module and its graph's module only, not on the copy of
    the original that gives the asym targets."""
    if node.op == "get_attr":
        owners = (model, node.graph.owning_module)
        for obj in owners:
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            if obj is not None:
                return [obj] * nb
        raise ValueError(f"the traced graph reads {node.target!r}, which neither the model nor the traced graph "
                         "holds; use method='layer'.")
    out = []
    for b in range(nb):
        args = fx.node.map_arg(node.args, lambda n, b=b: env[n][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n, b=b: env[n][b])
        if node.op == "call_module":
            out.append(model.get_submodule(node.target)(*args, **kwargs))
        elif node.op == "call_function":
            out.append(node.target(*args, **kwargs))
        elif node.op == "call_method":
            out.append(getattr(args[0], node.target)(*args[1:], **kwargs))
        else:
            raise ValueError(f"unsupported graph node {node.op}")
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool) -> object:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        import sys

        class _Plain(_NoBar):
            def __init__(self) -> None:
                self.done = 0

            def update(self, n: int = 1) -> None:
                self.done += n
                print(f"\r{desc}: {self.done}/{total}", end="", file=sys.stderr, flush=True)

            def close(self) -> None:
                print(file=sys.stderr)

        return _Plain()
    return tqdm(total=total, desc=desc, leave=False)
