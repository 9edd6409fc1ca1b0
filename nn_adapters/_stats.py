"""Streaming float64 statistics of a consumer's input, and the forward hooks that feed them.

For a pair (producer -> consumer) the rows of the design matrix ``A`` are the consumer's input vectors:
one row per sample for a ``Linear`` consumer, one row per sample and output position for a convolution consumer
(``F.unfold`` with the consumer's kernel, stride, padding and dilation, of the zero-stuffed input for a transposed
convolution, see ``nn_adapters._conv``; the columns of a producer channel are the ``k`` or ``kh * kw`` taps of
that channel). The targets are ``Y = A_target W^T`` (the consumer's output
without its bias), where ``A_target`` is the same input in the original network (``asym``, ``layer``) or in the
network pruned so far (``seq``). Only ``d x d`` and ``d x m`` float64 sums are kept (``submod.GramAccumulator``),
so the statistics' memory does not grow with the number of samples (the sequential modes' cached activations,
held by :mod:`nn_adapters.pruning`, do).

Where the statistics live (:func:`stats_device`): for a model on a GPU the accumulators keep float64 tensors on
that device and are fed tensors there (fold assignment and checks included, one host synchronisation per chunk),
so that activations are never copied to the host row by row; for a CPU model they keep numpy arrays on the host,
where numpy's symmetric BLAS product is faster than torch's. The selection and the refit read numpy from the
accumulators in both cases.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import numpy as np
import torch
from scipy.linalg import lapack
from torch import nn

from submod._sr_threads import one_blas_thread
from submod.sparse_regression import DEFAULT_TOL, GramAccumulator, SparseRegression

from . import _conv
from .pairs import PrunablePair

_CHUNK_ELEMS = 4_000_000  # float64 elements of A per chunk (32 MB)


def design_rows(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the consumer's design matrix for an input batch ``x`` (float64, ``(rows, d)``)."""
    if _conv.is_conv(consumer):
        cols = _conv.unfold(consumer, x.to(torch.float64))  # (N, C * taps, positions)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.to(torch.float64).reshape(-1, consumer.in_features)


def design_blocks(consumer: nn.Module, x: torch.Tensor,
                  phases: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of :func:`design_rows` split by the polyphase structure of a strided transposed consumer
    (``phases`` from :func:`nn_adapters._conv.polyphase`): one ``(columns, rows)`` pair per phase, ``rows``
    ``(N * positions of the phase, C * taps of the phase)`` float64, sample by sample, and ``columns`` the
    channels' columns of the phase's taps; every other entry of those rows is zero. The rows are gathered from
    ``x`` itself (the phase's ``source`` indices), never from the zero-stuffed input, so a chunk costs the blocks'
    memory only."""
    n, c = x.shape[:2]
    flat = torch.cat([x.new_zeros(n, c, 1), x.reshape(n, c, -1)], dim=2).to(torch.float64)  # index 0: a zero
    taps_all = _conv.kernel_numel(consumer)
    channel_base = torch.arange(c, device=x.device)[:, None] * taps_all
    out = []
    for tap, pos, source in phases:
        rows = flat[:, :, source.to(x.device)]  # (N, C, taps of the phase, positions of the phase)
        out.append(((channel_base + tap.to(x.device)).reshape(-1),
                    rows.permute(0, 3, 1, 2).reshape(n * pos.numel(), -1)))
    return out


def weight_matrix(consumer: nn.Module) -> torch.Tensor:
    """The consumer's weights as an ``(out, d)`` float64 matrix whose columns match :func:`design_rows`."""
    return _conv.weight_matrix(consumer).detach().to(torch.float64)


#: Private hook for tests and benchmarks: ``False`` streams a strided transposed consumer's rows in full instead of
#: by polyphase blocks (the same statistics up to rounding, at up to ``prod(stride)**2`` times the product cost).
_POLYPHASE = True

#: Private test hook: ``True`` sends the statistics of CPU models through the device path too (torch storage on the
#: CPU), so that the path a GPU model takes can be tested on a machine without a GPU.
_DEVICE_PATH_ON_CPU = False

F64 = torch.float64


def stats_device(param_device: torch.device) -> torch.device | None:
    """Where the accumulators of a layer whose parameters are on ``param_device`` keep their statistics.

    That device for a model on a GPU (torch storage: the activations stay there), ``None`` for a CPU model (numpy
    storage on the host: numpy's ``A^T A`` is a symmetric BLAS product, faster than torch's general one; see
    ``benchmarks/bench_gram_device.py``).

    Examples
    --------
    >>> stats_device(torch.device("cpu")) is None
    True
    >>> stats_device(torch.device("cuda", 0))
    device(type='cuda', index=0)
    """
    if param_device.type == "cpu" and not _DEVICE_PATH_ON_CPU:
        return None
    return param_device


def update_folds(accs: list[GramAccumulator], a: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
                 fold: torch.Tensor, nonfinite: str | None = None) -> None:
    """Add rows to accumulators with torch storage on one device: row ``t`` goes to ``accs[fold[t]]``.

    The rows (``a`` (n, d), ``y`` (n, m), optional weights ``w`` (n,)) and the fold of each row are moved to the
    accumulators' device if needed and split there; the checks cost one host synchronisation in all (the sums that
    prove the rows finite and the rows and weight of every fold, fetched together). A non-finite row raises
    ``ValueError(nonfinite)`` if given, else the error of the first fold's check, as per-fold
    :meth:`~submod.GramAccumulator.update` calls would.

    Examples
    --------
    >>> accs = [GramAccumulator(2, 1, device="cpu") for _ in range(2)]
    >>> a = torch.arange(8.0).reshape(4, 2)
    >>> update_folds(accs, a, a[:, :1], None, torch.tensor([0, 1, 0, 1]))
    >>> [acc.count for acc in accs], accs[1].mean_a.tolist()
    ([2, 2], [4.0, 5.0])
    """
    dev, k = accs[0].device, len(accs)
    a = a.detach().to(device=dev, dtype=F64)
    y = y.detach().to(device=dev, dtype=F64)
    w = None if w is None else w.detach().to(device=dev, dtype=F64)
    fold = fold.to(device=dev, dtype=torch.int64)
    onehot = (fold[None, :] == torch.arange(k, device=dev)[:, None]).to(F64)  # (k, n): deterministic sums
    sums = [a.sum(), y.sum()] if w is None else [a.sum(), y.sum(), w.sum()]  # finite sums: finite entries
    scalars = torch.stack(sums + ([] if w is None else [w.min()]))
    host = torch.cat([scalars, onehot.sum(dim=1)] + ([] if w is None else [onehot @ w])).tolist()  # one sync
    counts = [int(c) for c in host[len(scalars):len(scalars) + k]]
    wsums = [float(c) for c in counts] if w is None else host[-k:]
    if not all(np.isfinite(host[:len(sums)])) or (w is not None and host[len(sums)] < 0):
        # an error (or a sum that overflowed, which passes): the per-fold checks, as the numpy path runs them
        if nonfinite is not None and not (torch.isfinite(a).all() and torch.isfinite(y).all()):
            raise ValueError(nonfinite)
        for h, acc in enumerate(accs):
            sel = fold == h
            acc._check_batch(a[sel], y[sel], None if w is None else w[sel])
    order = torch.argsort(fold, stable=True)
    lo = 0
    for h, acc in enumerate(accs):
        if counts[h]:
            idx = order[lo:lo + counts[h]]
            acc._add_rows(a.index_select(0, idx), y.index_select(0, idx),
                          None if w is None else w.index_select(0, idx), counts[h], wsums[h])
        lo += counts[h]


#: Relative ridges tried by the cross-validated choice (``ridge="cv"``): half-decades from 1e-6 to 10.
CV_GRID = np.logspace(-6.0, 1.0, 15)
#: Folds of the cross-validated ridge (samples are dealt round-robin, so every row of a sample is in one fold).
CV_FOLDS = 5


class FoldStats:
    """Float64 statistics of one pair's least-squares problem, kept per cross-validation fold, and the numerical
    work done on them: the selection objective, the cross-validated ridge and the refit.

    It holds no torch module, only the accumulators (numpy or torch storage, see :func:`stats_device`), the unit
    layout and the consumer's weights as a numpy array, so it can be sent to another thread, process or machine:
    pickling turns accumulators with torch storage into numpy ones on the host (see
    :class:`submod.GramAccumulator`), so a worker needs neither the model's device nor torch storage, and reads the
    same numbers. :class:`PairStats` is the same object with the forward-pass side (hooks feed it batches).

    Parameters
    ----------
    name : str
        The pair's name (for messages).
    fold_accs : list of GramAccumulator
        One accumulator per cross-validation fold (the consumer's input columns, its output targets).
    n_units, cols_per_unit : int
        Units of the pair and input columns per unit (unit ``j`` is columns ``o + j * c ... o + (j + 1) * c - 1``,
        ``o = unit_offset``).
    weights : ndarray (m, d)
        The consumer's original weights (float64), the prior of :meth:`refit` and :meth:`cv_ridge`.
    total : GramAccumulator, optional
        The folds merged (default: merged on first use).
    unit_offset : int, default 0
        The first column of the units. The columns outside the units' block (``d > n_units * cols_per_unit``: the
        consumer also reads the other operands of a concatenation, see :attr:`PrunablePair.offset`) are *fixed*:
        always kept, in every refit, and the selection maximises the gain over them (:meth:`objective`).
    """

    def __init__(self, name: str, fold_accs: list[GramAccumulator], n_units: int, cols_per_unit: int,
                 weights: np.ndarray, total: GramAccumulator | None = None, unit_offset: int = 0) -> None:
        self.name = name
        self.fold_accs = fold_accs
        self.n_folds = len(fold_accs)
        self.n_units = n_units
        self.cols_per_unit = cols_per_unit
        self.weights = weights
        self._total = total
        self.unit_offset = int(unit_offset)
        d = fold_accs[0].n_features
        end = self.unit_offset + n_units * cols_per_unit
        if self.unit_offset < 0 or end > d:
            raise ValueError(f"pair {name}: {n_units} units of {cols_per_unit} columns from column "
                             f"{self.unit_offset} do not fit in the consumer's {d} input columns.")
        #: The fixed columns (in column order): those of the other operands of a concatenation; empty otherwise.
        self.fixed = np.concatenate([np.arange(self.unit_offset), np.arange(end, d)]).astype(np.int64)

    @property
    def acc(self) -> GramAccumulator:
        """The statistics of all samples (the folds merged)."""
        if self._total is None:
            if self.n_folds == 1:
                self._total = self.fold_accs[0]
            else:
                first = self.fold_accs[0]
                tot = GramAccumulator(first.n_features, first.n_targets, device=first.device)
                for a in self.fold_accs:
                    tot.merge(a)
                self._total = tot
        return self._total

    @property
    def count(self) -> int:
        return int(self.acc.count)

    def groups(self) -> list[np.ndarray]:
        """Column indices of each unit (contiguous blocks of ``cols_per_unit``, from ``unit_offset``)."""
        c, o = self.cols_per_unit, self.unit_offset
        return [np.arange(o + j * c, o + (j + 1) * c) for j in range(self.n_units)]

    def unit_columns(self) -> np.ndarray:
        """The columns of every unit as an ``(n_units, cols_per_unit)`` array (row ``j``: unit ``j``'s)."""
        c, o = self.cols_per_unit, self.unit_offset
        return o + np.arange(self.n_units * c, dtype=np.int64).reshape(self.n_units, c)

    def target_energy(self) -> float:
        """``||Y - mean(Y)||^2``, the centred target energy every relative error of the pair is measured against."""
        return self.acc.y_norm2(centered=True)

    def path_errors(self, errors: np.ndarray) -> np.ndarray:
        """The relative errors of a greedy path on :meth:`objective`, from its absolute ``errors``: over the
        centred target energy (for a pair with fixed columns the objective's own energy is what the fixed columns
        leave, so its ``relative_errors`` would be over that)."""
        energy = self.target_energy()
        return np.asarray(errors, dtype=np.float64) / energy if energy > 0 else np.zeros(len(errors))

    def ridge_scale(self) -> float:
        """``mean_j`` of the centred Gram diagonal (``count x`` the mean input variance); ``1`` if it is zero."""
        return ridge_scale(self.acc)

    def objective(self, ridge: float) -> SparseRegression:
        """The ``SparseRegression`` over units (column groups), with intercept and a scale-free ridge.

        The absolute ridge is ``ridge * mean_j Var(A_j) * count`` (``ridge`` relative to the average centred
        diagonal of the Gram matrix), so ``ridge`` means the same for every layer and input scale.

        With fixed columns ``F`` (the other operands of a concatenation) it is the gain of the units ``S`` over
        them, ``F(S) = ||P_{F u S} Y||^2 - ||P_F Y||^2`` (with the intercept and the ridge), an ordinary
        :meth:`submod.SparseRegression.from_gram` over the units on the Schur complement of the fixed block
        (:func:`schur_objective`); its ``y_norm2`` is the energy the fixed columns leave, and its ridge is inside
        its Gram (its own ``ridge`` is 0).
        """
        lam = ridge * self.ridge_scale() if ridge > 0 else 0.0
        if self.fixed.size == 0:
            return self.acc.to_objective(ridge=lam, groups=self.groups(), fit_intercept=True)
        return schur_objective(self.acc, self.fixed, self.unit_columns(), lam)

    def unit_input_norms(self) -> np.ndarray:
        """``||X_c||_2`` of every input column (uncentred), used by the activation-weighted norm baseline."""
        return np.sqrt(np.maximum(np.diag(self.acc.gram()), 0.0))

    def can_cross_validate(self) -> bool:
        """Whether every fold holds at least one sample (and there are at least two folds)."""
        return self.n_folds >= 2 and all(a.weight_sum > 0 for a in self.fold_accs)

    def _columns(self, units: np.ndarray | None) -> np.ndarray:
        """The columns a refit on ``units`` reads: theirs (in unit order), or with fixed columns those and theirs
        in column order (the consumer's order of its kept inputs, for sorted ``units``)."""
        if units is None:
            return np.arange(self.fold_accs[0].n_features)
        cols = columns_of_units(self.groups(), units)
        return cols if self.fixed.size == 0 else np.sort(np.concatenate([self.fixed, cols]))

    def cv_ridge(self, units: np.ndarray | None = None, grid: np.ndarray = CV_GRID, *,
                 prior: bool = False) -> tuple[float, np.ndarray]:
        """Relative ridge of the refit on ``units`` (default: all) chosen by K-fold cross-validation.

        See :func:`cv_ridge`; ``prior=True`` cross-validates the refit that shrinks toward the consumer's original
        weights (:meth:`refit`).
        """
        if not self.can_cross_validate():
            raise ValueError("cross-validation needs at least two folds with one sample each; pass more "
                             "calibration samples or a fixed ridge.")
        cols = self._columns(units)
        return cv_ridge(self.fold_accs, cols, grid, self._prior(cols) if prior else None)

    def prior_error(self, units: np.ndarray) -> float:
        """In-sample relative error of the consumer's trained weights on ``units`` (:func:`prior_relative_error`)."""
        cols = self._columns(np.asarray(units))
        return prior_relative_error(self.acc, cols, self._prior(cols))

    def refit(self, units: np.ndarray, ridge: float, *, prior: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """Ridge refit with intercept on the columns of ``units``: ``(M (c, m), b (m,), relative error)``.

        See :func:`ridge_refit`; ``prior=True`` shrinks toward ``W_S^T``, the consumer's original weights of the
        kept columns. With fixed columns the refit reads them too (``M``'s rows are the fixed and the units'
        columns in column order) and their prior is their trained weights.
        """
        cols = self._columns(np.asarray(units))
        return ridge_refit(self.acc, cols, ridge, self._prior(cols) if prior else None)

    def _prior(self, cols: np.ndarray) -> np.ndarray:
        """``W_S^T`` (c, m), the transpose of a C-ordered copy of the columns (the BLAS calls that read it then see
        the same memory layout, hence round the same way, whatever made the weights)."""
        return self.weights.take(cols, axis=1).T


class PairStats(FoldStats):
    """Float64 sufficient statistics of one pair, fed batch by batch, kept per cross-validation fold.

    Parameters
    ----------
    pair : PrunablePair
    consumer : nn.Module
        The consumer with its original weights (defines the targets ``Y = A_target W^T``).
    folds : int, default 1
        Number of folds the samples are dealt into (round-robin by sample, so the rows of one sample, e.g. all
        patch positions of an image, stay in one fold). ``folds >= 2`` enables :meth:`cv_ridge`; memory is
        ``folds`` accumulators of ``O(d^2 + d m)`` each, still independent of the number of samples.
    plan : list of arrays, optional
        The fold of every sample, per batch (:func:`nn_adapters._data.sample_folds`).
    row_weights : list, optional
        Weighted rows (``weighting="output"``): the weights of the design rows of each consumer call, in call
        order (a float tensor of one weight per row, or ``None`` for an unweighted call), consumed one per
        :meth:`update`; more can be queued with :meth:`add_row_weights`. ``None``: no weighting.
    """

    def __init__(self, pair: PrunablePair, consumer: nn.Module, folds: int = 1,
                 plan: list[np.ndarray] | None = None,
                 row_weights: list[torch.Tensor | None] | None = None) -> None:
        self.pair = pair
        self.consumer = consumer
        self.W = weight_matrix(consumer)
        d = self.W.shape[1]
        cols_per_slot = pair.cols_per_unit // pair.group_size  # a channel's (or feature's) columns
        if d != pair.n_units * pair.cols_per_unit + pair.n_fixed * cols_per_slot:
            fixed = f" and {pair.n_fixed} fixed channels" if pair.n_fixed else ""
            raise ValueError(f"pair {pair.name}: consumer has {d} input columns, expected "
                             f"{pair.n_units} units x {pair.cols_per_unit} columns{fixed}.")
        self.device = stats_device(self.W.device)  # None: numpy statistics on the host (a CPU model)
        accs = [GramAccumulator(d, self.W.shape[0], device=self.device) for _ in range(max(1, int(folds)))]
        super().__init__(pair.name, accs, pair.n_units, pair.cols_per_unit, self.W.cpu().numpy(),
                         unit_offset=pair.offset * cols_per_slot)
        self._seen = 0          # samples seen (for the round-robin fold assignment)
        self._plan = plan       # the fold of every sample, per batch (nn_adapters._data.sample_folds), or None
        self._batch = 0         # batches seen (the next entry of the plan)
        # the weights of the design rows of the consumer calls still to come, in call order (an entry None: that
        # call's rows unweighted); None: no weighting
        self._row_weights = None if row_weights is None else deque(row_weights)
        # a squeeze-and-excitation gate on the way: sums of its pooled channels (fc1's input), float64
        self._phase_cache: dict[tuple[int, ...], list | None] = {}  # a strided transposed consumer's phases
        self._se_sum = torch.zeros(pair.n_units, dtype=torch.float64)
        self._se_count = 0

    def add_row_weights(self, weights: list[torch.Tensor | None]) -> None:
        """Queue the row weights of the next consumer calls (see ``row_weights``), for statistics that stream
        them batch by batch."""
        if self._row_weights is None:
            raise ValueError(f"pair {self.pair.name}: these statistics were built without row weights.")
        self._row_weights.extend(weights)

    def fold_stats(self, merged: bool = False) -> FoldStats:
        """The statistics without the forward-pass side: no module, the folds merged now, where they are (their
        merge only, as one fold, with ``merged``)."""
        accs = [self.acc] if merged else self.fold_accs
        return FoldStats(self.name, accs, self.n_units, self.cols_per_unit, self.weights, self.acc, self.unit_offset)

    def update_se_input(self, x: torch.Tensor) -> None:
        """Add a batch of the SE gate's pooled input (``fc1``'s input, ``(N, C)`` or ``(N, C, 1, 1)``)."""
        x = x.detach().to(torch.float64).reshape(x.shape[0], self.pair.n_units, -1)
        self._se_sum += x.sum(dim=(0, 2)).cpu()
        self._se_count += x.shape[0] * x.shape[2]

    def se_input_mean(self) -> torch.Tensor:
        """Calibration mean of each pooled channel at the SE gate's ``fc1`` (float64, ``(C,)``)."""
        if self._se_count == 0:
            raise ValueError(f"pair {self.pair.name}: the squeeze-and-excitation layer {self.pair.se[0]!r} was not "
                             "called during calibration.")
        return self._se_sum / self._se_count

    def update(self, x: torch.Tensor, x_target: torch.Tensor | None = None) -> None:
        """Add a batch: ``x`` is the consumer's input in the network being pruned, ``x_target`` in the network
        that defines the targets (default ``x``)."""
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError(f"the input of consumer {self.pair.consumer!r} (pair {self.pair.name}) contains NaN or "
                             "infinite activations; check the model's weights and the calibration data.")
        xt = x if x_target is None else x_target.detach()
        n = x.shape[0]
        K = self.n_folds
        if self._plan is not None and K > 1:  # the folds of this batch's samples (copies share a fold)
            planned = np.asarray(self._plan[self._batch], dtype=np.int64) % K
            if planned.size and n != planned.size and n % planned.size == 0:
                # positions moved into the batch dim (x.reshape(B * T, C) before an MLP, MobileViT's patches):
                # each sample's rows, in sample-major order, go to its fold
                planned = np.repeat(planned, n // planned.size)
            elif planned.size != n:
                raise ValueError(f"pair {self.pair.name}: the consumer's input holds {n} rows in dim 0 for the "
                                 f"{planned.size} samples of batch {self._batch}, not a multiple of them, so its rows "
                                 "cannot be assigned to the samples' cross-validation folds; pass a fixed ridge= "
                                 "(no cross-validation).")
            self._batch += 1
        else:
            planned = (self._seen + np.arange(n)) % K
        w_all = None
        if self._row_weights is not None:
            if not self._row_weights:
                raise ValueError(f"pair {self.pair.name}: the consumer was called more often during the statistics "
                                 "than when its row weights were computed (a forward pass that differs between "
                                 "two runs on the same batch?).")
            w_all = self._row_weights.popleft()
        # the polyphase blocks of a strided transposed consumer hold the rows phase by phase: weighted rows are
        # added as full rows, in the order of the consumer's output positions
        phases = self._phases(tuple(x.shape[2:])) if _POLYPHASE and w_all is None else None
        if phases is not None:  # a chunk holds the phases' rows only
            per_sample = 0  # unused: the phases' rows are dealt into folds by _update_blocks
            step = max(1, _CHUNK_ELEMS // max(1, sum(t.numel() * p.numel() for t, p, _ in phases) * x.shape[1]))
        else:
            per_sample = max(1, design_rows(self.consumer, x[:1]).shape[0])
            step = max(1, _CHUNK_ELEMS // max(1, per_sample * self.W.shape[1]))
            if w_all is not None and w_all.numel() != n * per_sample:
                raise ValueError(f"pair {self.pair.name}: {w_all.numel()} row weights for the {n * per_sample} "
                                 "design rows of the consumer's input; the consumer's output positions do not "
                                 "match its design rows, so weighting='output' cannot be used for this model.")
        for s in range(0, n, step):
            if phases is not None:
                ns = min(step, n - s)
                self._update_blocks(x[s:s + step], None if x_target is None else xt[s:s + step], phases,
                                    planned[s:s + ns])
                self._seen += ns
                continue
            A = design_rows(self.consumer, x[s:s + step])
            At = A if x_target is None else design_rows(self.consumer, xt[s:s + step])
            Y = At @ self.W.T
            ns = A.shape[0] // per_sample
            w = None if w_all is None else w_all[s * per_sample:(s + ns) * per_sample].to(A.device, torch.float64)
            if self.device is None:  # numpy storage (a CPU model): the rows go to the host
                A, Y = A.cpu().numpy(), Y.cpu().numpy()
                w = None if w is None else w.cpu().numpy()
            if K == 1:
                self.fold_accs[0].update(A, Y, w)
            elif self.device is not None:  # torch storage: the rows are dealt into folds on the model's device
                fold = torch.as_tensor(planned[s:s + ns], device=A.device)
                update_folds(self.fold_accs, A, Y, w, fold.repeat_interleave(per_sample))
            else:
                rows = np.repeat(planned[s:s + ns], per_sample)
                for h in range(K):
                    sel = rows == h
                    if sel.any():
                        self.fold_accs[h].update(A[sel], Y[sel], None if w is None else w[sel])
            self._seen += ns
        self._total = None


    def _phases(self, spatial: tuple[int, ...]) -> list[tuple[torch.Tensor, ...]] | None:
        """:func:`nn_adapters._conv.polyphase` of the consumer for inputs of spatial size ``spatial``, computed
        once per size."""
        if spatial not in self._phase_cache:
            self._phase_cache[spatial] = _conv.polyphase(self.consumer, spatial)
        return self._phase_cache[spatial]

    def _update_blocks(self, x: torch.Tensor, xt: torch.Tensor | None,
                       phases: list[tuple[torch.Tensor, ...]], folds: np.ndarray) -> None:
        """Add the samples ``x`` (targets from ``xt``, default ``x``) of a strided transposed consumer phase by
        phase (:meth:`submod.GramAccumulator.update_blocks`): each phase's rows only touch its taps' columns, so
        its products cost ``1 / prod(stride)^2`` of the full rows' (see :func:`design_blocks`); ``folds``: the
        fold of each sample."""
        blocks = design_blocks(self.consumer, x, phases)
        targets = blocks if xt is None else design_blocks(self.consumer, xt, phases)
        W = self.W.to(blocks[0][1].device)
        parts = [(c, a, at @ W[:, c].T) for (c, a), (_, at) in zip(blocks, targets, strict=True)]
        if self.device is None:  # numpy storage (a CPU model): the rows go to the host
            parts = [(c.cpu().numpy(), a.cpu().numpy(), y.cpu().numpy()) for c, a, y in parts]
        if self.n_folds == 1:
            self.fold_accs[0].update_blocks(parts)
            return
        per_phase = [np.repeat(folds, pos.numel()) for _, pos, _ in phases]  # the fold of every row of each phase
        for h, acc in enumerate(self.fold_accs):
            sel = [f == h for f in per_phase]
            if self.device is not None:
                sel = [torch.as_tensor(m, device=a.device) for m, (_, a, _) in zip(sel, parts, strict=True)]
            acc.update_blocks([(c, a[m], y[m]) for (c, a, y), m in zip(parts, sel, strict=True)])


def columns_of_units(groups: list[np.ndarray], units: np.ndarray) -> np.ndarray:
    """The input columns of ``units`` (in unit order), from the column groups of every unit."""
    units = np.asarray(units)
    if units.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([groups[int(u)] for u in units])


def schur_objective(acc: GramAccumulator, fixed: np.ndarray, unit_cols: np.ndarray, lam: float) -> SparseRegression:
    """The gain of units over fixed columns as a :class:`submod.SparseRegression` over the units.

    With the centred statistics ``G``, ``B``, ``y2`` of ``acc`` (intercept) and the ridge ``lam`` added to the whole
    Gram first (``G + lam I``), and ``F`` the ``fixed`` columns, ``U`` the units' columns (``unit_cols``, one row
    per unit):

        G_s = G_UU - G_UF G_FF^-1 G_FU,   B_s = B_U - G_UF G_FF^-1 B_F,   y2_s = y2 - tr(B_F^T G_FF^-1 B_F),

    the statistics of the units' columns and of the targets after their (ridge) least-squares fit on ``F`` is
    taken out, so that ``F_s(S) = tr(B_S^T G_S^-1 B_S) = ||P_{F u S} Y||^2 - ||P_F Y||^2`` (the ridge penalty
    included in both). Without a ridge a singular ``G_FF`` (dead or duplicate fixed channels, fewer rows than
    columns) is inverted on its range (the eigenvalues above :data:`PINV_RTOL` of the largest): a fixed column in
    the span of the others adds nothing to ``P_F``. A unit column whose Schur diagonal is below the objective's
    degeneracy tolerance of its own diagonal lies in the span of the fixed columns up to rounding and is set to
    zero (its gain is 0, as it is exactly), and a cross term that rounding pushes above the Cauchy-Schwarz bound
    ``||B_s,j||^2 <= G_s,jj y2_s`` of a true Gram is scaled back onto it, so that the statistics are those of a
    real design.
    """
    unit_cols = np.asarray(unit_cols, dtype=np.int64)
    U = unit_cols.reshape(-1)
    G = acc.gram(centered=True)
    B = acc.cross(centered=True)
    y2 = acc.y_norm2(centered=True)
    if lam > 0:
        G = G + lam * np.eye(G.shape[0])
    G_FF, G_FU, B_F = G[np.ix_(fixed, fixed)], G[np.ix_(fixed, U)], B[fixed]
    w, V = np.linalg.eigh(G_FF)
    keep = w > PINV_RTOL * max(float(w[-1]), 0.0) if w.size else np.zeros(0, dtype=bool)
    Vk = V[:, keep] / np.sqrt(w[keep])                       # G_FF^+ = Vk Vk^T
    R_U, R_B = Vk.T @ G_FU, Vk.T @ B_F                       # G_UF G_FF^+ G_FU = R_U^T R_U, ...
    G_s = G[np.ix_(U, U)] - R_U.T @ R_U
    G_s = 0.5 * (G_s + G_s.T)
    B_s = B[U] - R_U.T @ R_B
    y2_s = max(y2 - float(np.vdot(R_B, R_B)), 0.0)
    diag = np.diag(G)[U]
    dead = np.diag(G_s) <= DEFAULT_TOL * np.maximum(diag, 0.0)
    G_s[dead, :] = 0.0
    G_s[:, dead] = 0.0
    B_s[dead] = 0.0
    lhs = np.einsum("ij,ij->i", B_s, B_s)
    bound = np.maximum(np.diag(G_s), 0.0) * y2_s
    over = lhs > bound
    B_s[over] *= np.sqrt(bound[over] / lhs[over])[:, None]
    c = unit_cols.shape[1]
    groups = [np.arange(j * c, (j + 1) * c) for j in range(unit_cols.shape[0])]
    return SparseRegression.from_gram(G_s, B_s, y2_s, ridge=0.0, groups=groups)


def _stats_of(acc: GramAccumulator, cols: np.ndarray, intercept: bool) -> tuple:
    """``(weight, mean_a, mean_y, G, B, yy)`` of ``acc`` on ``cols``: centred with intercept, raw (zero means)
    without."""
    G = acc.gram(centered=intercept, columns=cols)
    B = acc.cross(centered=intercept, columns=cols)
    if intercept:
        return acc.weight_sum, acc.mean_a[cols], acc.mean_y, G, B, acc.y_norm2(centered=True)
    return acc.weight_sum, np.zeros(cols.size), np.zeros(acc.n_targets), G, B, acc.y_norm2()


def ridge_scale(acc: GramAccumulator, intercept: bool = True) -> float:
    """Mean of the (centred) Gram diagonal over all columns: the unit of the relative ridges; ``1`` if zero."""
    scale = float(np.mean(acc.gram_diagonal(centered=intercept)))
    return scale if scale > 0 else 1.0


def _shift_by_prior(part: tuple, M0: np.ndarray) -> tuple:
    """Statistics of the residual target ``Y - A M0`` from those of ``Y`` (exact: the map is linear per row)."""
    n, ma, my, G, B, yy = part
    GM = G @ M0
    return (n, ma, my - ma @ M0, G, B - GM, max(yy - 2.0 * float(np.vdot(M0, B)) + float(np.vdot(M0, GM)), 0.0))


#: :func:`cv_ridge` works in the range of the training Gram when the calibration rows are at most this fraction of
#: the columns (below it the factored path is the cheaper one; ``0`` always decomposes the full Gram).
LOW_RANK_ROWS = 0.5

#: Relative eigenvalue cut-off of the plain (ridge 0) least-squares refit: directions of ``G`` below it are null.
PINV_RTOL = 1e-10

#: A prior whose in-sample relative error is at most this reproduces the targets up to rounding (see
#: :func:`prior_relative_error`): no refit can improve on it, so none is cross-validated.
EXACT_PRIOR_RTOL = 1e-10


def prior_relative_error(acc: GramAccumulator, cols: np.ndarray, prior: np.ndarray, *,
                         intercept: bool = True) -> float:
    """In-sample relative error ``||Y - A_S M0 - b0||^2 / ||Y - mean(Y)||^2`` of the prior ``M0`` itself, with
    the bias ``b0`` refitted from the means (``0`` when the targets have no spread).

    ``0`` up to rounding when the trained weights of the kept columns already give the targets: every unit kept
    and the consumer's inputs unchanged (LayerInChange statistics, or the first pair of the network), or only
    units with constant activations removed (their contribution is a constant, absorbed by the bias).
    """
    n, ma, my, G, B, yy = _stats_of(acc, cols, intercept)
    if yy <= 0:
        return 0.0
    return _shift_by_prior((n, ma, my, G, B, yy), np.asarray(prior, dtype=np.float64))[5] / yy


def ridge_refit(acc: GramAccumulator, cols: np.ndarray, ridge: float, prior: np.ndarray | None = None, *,
                intercept: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge least-squares refit of ``Y`` on the columns ``cols``: ``(M (c, m), b (m,), relative error)``.

    Minimises ``||Y - A_S M - 1 b^T||^2 + lam ||M - M0||^2`` (rows weighted as in ``acc``), with
    ``lam = ridge * ridge_scale(acc)`` and ``M0 = prior`` (``0`` when ``None``: ordinary ridge). A prior equal to
    the consumer's original weights of the kept columns is a Gaussian prior centred on the trained network: a
    strong ridge then keeps the kept units' own weights and damps only the compensation for the removed units,
    which is the part estimated from few samples. Both tend to plain least squares as ``lam -> 0``. Without
    ``intercept`` the bias is ``0`` and raw statistics are used. The relative error is the in-sample
    ``||Y - A_S M - b||^2 / ||Y - mean(Y)||^2``. ``ridge=numpy.inf`` (with a prior) is the limit of a growing
    ridge: ``M = M0``, the bias refitted from the means.
    """
    n, ma, my, G, B, yy = _stats_of(acc, cols, intercept)
    if ridge == np.inf and prior is None:
        raise ValueError("an infinite ridge keeps the prior; it needs prior=.")
    lam = float(ridge) * ridge_scale(acc, intercept) if ridge > 0 else 0.0
    M0 = np.zeros_like(B) if prior is None else np.asarray(prior, dtype=np.float64)
    rhs = B - G @ M0
    if cols.size == 0:
        delta = rhs
    elif lam == np.inf:  # the limit of a growing ridge: the prior itself, with the bias refitted from the means
        delta = np.zeros_like(rhs)
    elif lam > 0:
        delta = np.linalg.solve(G + lam * np.eye(cols.size), rhs)
    else:
        # Plain least squares: the minimum-norm solution, from the eigenvalues of G above a relative cut-off.
        # (np.linalg.solve raises only on an exactly zero pivot; a G that is singular in floating point, e.g.
        # fewer samples than columns, or dead or duplicate units, would give an arbitrary huge interpolant.)
        w, V = np.linalg.eigh(G)
        keep = w > PINV_RTOL * max(float(w[-1]), 0.0)
        delta = V[:, keep] @ ((V[:, keep].T @ rhs) / w[keep, None])
    M = M0 + delta
    b = my - ma @ M
    err = max(yy - 2.0 * float(np.vdot(M, B)) + float(np.vdot(M, G @ M)), 0.0)
    return M, b, (err / yy if yy > 0 else 0.0)


def cv_ridge(fold_accs: list[GramAccumulator], cols: np.ndarray, grid: np.ndarray = CV_GRID,
             prior: np.ndarray | None = None, *, intercept: bool = True) -> tuple[float, np.ndarray]:
    """The relative ridge of :func:`ridge_refit` on ``cols`` chosen by K-fold cross-validation over the folds.

    For every fold ``h`` the ridge regression (with intercept) is fitted on the other folds' statistics and its
    squared error on fold ``h``'s held-out rows is computed in closed form from fold ``h``'s statistics:
    ``||Y_h - A_h M - b||^2 = ||Y_h^c||^2 - 2 tr(M^T B_h) + tr(M^T G_h M) + n_h ||dy - M^T da||^2`` (centred
    statistics of fold ``h``; ``da``, ``dy`` the differences of its means from the training means). One
    eigendecomposition of the training Gram per fold serves the whole grid. With a ``prior`` ``M0`` the refit is
    the ordinary ridge regression of the residual target ``Y - A_S M0``, so the same closed form applies to the
    statistics shifted by ``M0``. Label-free: only the calibration inputs and the targets ``Y`` are used.

    With fewer calibration rows than columns (at most half as many: few samples for a wide layer, such as the
    512-channel 3x3 convolutions of VGG-11, ``c = 4608`` columns, with a few dozen images), the training Gram has
    rank below its size, and only its range matters: the training cross term (and its shift by the prior) lies in
    that range, so the null space contributes nothing to the fit or to the held-out error. Each fold's Gram is then
    factored once by pivoted Cholesky (``G_f = L_f L_f^T``, ``L_f`` with as many columns as the fold's rank, cost
    ``O(c^2 rank)``), and the eigenpairs of the training Gram come from a thin SVD of the stacked factors (with the
    folds' mean differences as extra columns, as in the merge of centred statistics): ``O(c r^2)`` per fold instead
    of the ``O(c^3)`` eigendecomposition and ``V^T G_h V``. The result is the same up to rounding (tested against
    the brute-force K-fold on the raw rows).

    Returns
    -------
    ridge : float
        The grid value (relative, as in :func:`ridge_refit`) with the smallest held-out error.
    cv_errors : ndarray
        Held-out relative error ``sum_h err_h / sum_h ||Y_h - mean_train(Y)||^2`` for every grid value (an
        empirical estimate of the refit's error on new samples).
    """
    with one_blas_thread():  # small eigenproblems: one thread is faster, and far faster on shared cores
        grid = np.asarray(grid, dtype=np.float64)
        parts = [_stats_of(a, cols, intercept) for a in fold_accs]
        # the energy of the plain targets normalises the errors (the same meaning with and without the prior)
        wts = np.array([q[0] for q in parts], dtype=np.float64)
        sums_y = np.array([q[0] * q[2] for q in parts])
        energy = 0.0
        for h, q in enumerate(parts):
            my_train = (sums_y.sum(0) - sums_y[h]) / (wts.sum() - wts[h])
            energy += q[5] + q[0] * float(np.sum((q[2] - my_train) ** 2))
        if prior is not None:
            M0 = np.asarray(prior, dtype=np.float64)
            parts = [_shift_by_prior(q, M0) for q in parts]
        diags = [(a.weight_sum, a.mean_a if intercept else np.zeros(a.n_features), a.gram_diagonal(intercept))
                 for a in fold_accs]
        low_rank = 0 < sum(a.count for a in fold_accs) <= LOW_RANK_ROWS * cols.size
        factors = [_psd_factor(q[3]) for q in parts] if low_rank else None
        err = np.zeros(grid.size)
        for h in range(len(parts)):
            train = [q for i, q in enumerate(parts) if i != h]
            _, mat, myt, Gt, Bt, _ = _combine(train, gram=not low_rank)
            scale = _ridge_scale([q for i, q in enumerate(diags) if i != h])
            nh, mah, myh, Gh, Bh, yyh = parts[h]
            if factors is None:
                D, V = np.linalg.eigh(Gt)
                D = np.maximum(D, 0.0)
                Ghe = V.T @ Gh @ V
            else:  # the range of the training Gram only (see the docstring)
                Lt = np.hstack([f for i, f in enumerate(factors) if i != h]
                               + [np.sqrt(q[0]) * (q[1] - mat)[:, None] for q in train])
                V, sv, _ = np.linalg.svd(Lt, full_matrices=False)
                D = sv ** 2
                Lh = V.T @ factors[h]
                Ghe = Lh @ Lh.T
            P = V.T @ Bt                                   # (r, m): training cross term in the eigenbasis
            Bhe = V.T @ Bh
            H = Ghe * (P @ P.T)                            # tr(M^T G_h M) = w^T H w, M = V diag(w) P
            r = np.einsum("im,im->i", P, Bhe)              # tr(M^T B_h) = w^T r
            u = V.T @ (mah - mat)
            dy = myh - myt
            W = 1.0 / (D[None, :] + (grid * scale)[:, None])  # (g, c)
            q = (W * u[None, :]) @ P                       # (g, m): M^T da
            err += (yyh - 2.0 * (W @ r) + np.sum((W @ H) * W, axis=1)
                    + nh * np.sum((dy[None, :] - q) ** 2, axis=1))
        rel = np.maximum(err, 0.0) / max(energy, 1e-300)
        return float(grid[int(np.argmin(rel))]), rel


def _ridge_scale(parts: list[tuple]) -> float:
    """:func:`ridge_scale` of the union of row sets ``(weight, mean_a, centred Gram diagonal)``."""
    n = sum(p[0] for p in parts)
    ma = sum(p[0] * p[1] for p in parts) / n
    diag = sum(p[2] + p[0] * (p[1] - ma) ** 2 for p in parts)
    scale = float(np.mean(diag))
    return scale if scale > 0 else 1.0


def _combine(parts: list[tuple], gram: bool = True) -> tuple:
    """Merge centred statistics ``(weight, mean_a, mean_y, C_aa, C_ay, C_yy)`` of disjoint row sets (exact);
    ``gram=False`` leaves ``C_aa`` out (``None``)."""
    n = sum(p[0] for p in parts)
    ma = sum(p[0] * p[1] for p in parts) / n
    my = sum(p[0] * p[2] for p in parts) / n
    G = sum(p[3] for p in parts).copy() if gram else None
    B = sum(p[4] for p in parts).copy()
    yy = sum(p[5] for p in parts)
    for p in parts:
        da, dy = p[1] - ma, p[2] - my
        if gram:
            G += p[0] * np.outer(da, da)
        B += p[0] * np.outer(da, dy)
        yy += p[0] * float(dy @ dy)
    return n, ma, my, G, B, yy


def _psd_factor(G: np.ndarray) -> np.ndarray:
    """``L`` (``c x rank``) with ``L L^T = G`` up to rounding, for a positive semidefinite ``G``: pivoted Cholesky
    (LAPACK ``dpstrf``) of the equilibrated ``diag(G)^(-1/2) G diag(G)^(-1/2)``, stopped at its numerical rank
    (pivots below ``c * eps``, i.e. a column is dropped when its part outside the pivoted columns is below
    ``c * eps`` of its own norm, not of the largest column's), ``O(c^2 rank)``."""
    c = G.shape[0]
    d = np.diag(G)
    if c == 0 or not np.any(d > 0):
        return np.zeros((c, 0))
    # equilibrate first (G = S C S, unit diagonal C): the pivot cut-off is then relative to each column's own
    # scale, so columns many orders of magnitude smaller than the largest one are not dropped as rounding noise
    s = np.sqrt(np.where(d > 0, d, 1.0))
    L, piv, rank, info = lapack.dpstrf(G / s[:, None] / s[None, :], lower=1, tol=-1.0)
    if info < 0:
        raise RuntimeError(f"dpstrf rejected its argument {-info}")
    out = np.zeros((c, rank))
    out[piv[:c] - 1] = np.tril(L)[:, :rank]
    return s[:, None] * out


@contextmanager
def capture_hooks(model: nn.Module, pairs: list[PrunablePair], stats: dict[str, PairStats]):
    """Forward pre-hooks on every consumer of ``model`` that stream its input into ``stats[pair.name]`` (and on the
    ``fc1`` of a squeeze-and-excitation gate on the way, its pooled input).

    The hooks are removed when the context exits, also on error. A consumer call that its input alone does not
    describe (``nn_adapters._conv.call_reason``: a transposed convolution given ``output_size=``) raises a
    ``ValueError``.
    """
    def feed(st: PairStats):
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if (why := _conv.call_reason(m, len(args), kwargs)) is not None:
                raise ValueError(f"pair {st.name}: consumer {st.pair.consumer!r}: {why}.")
            st.update(args[0])
        return hook

    handles = []
    try:
        for p in pairs:
            st = stats[p.name]
            handles.append(model.get_submodule(p.consumer).register_forward_pre_hook(feed(st), with_kwargs=True))
            if p.se:
                handles.append(model.get_submodule(p.se[0]).register_forward_pre_hook(
                    lambda _m, inp, st=st: st.update_se_input(inp[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def slice_units(x: torch.Tensor, pair: PrunablePair, idx: torch.Tensor) -> torch.Tensor:
    """Keep the units ``idx`` of a consumer input ``x``: its input channels of those units
    (:meth:`PrunablePair.consumer_channels`: a unit's channels, a group's behind a GroupNorm, and the fixed channels
    of a concatenation's other operands), as channels of a convolution consumer, blocks of a channel's columns of a
    ``Linear`` after a flatten, or features of a ``Linear``."""
    keep = pair.consumer_channels(idx)
    if pair.conv_consumer:
        return x[:, keep]
    if pair.kind == "conv->linear":
        n = x.shape[0]
        return x.reshape(n, -1, pair.cols_per_channel)[:, keep].reshape(n, -1)
    return x[..., keep]
