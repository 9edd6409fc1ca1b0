"""Streaming float64 statistics of a consumer's input, and the forward hooks that feed them.

For a pair (producer -> consumer) the rows of the design matrix ``A`` are the consumer's input vectors:
one row per sample for a ``Linear`` consumer, one row per sample and output position for a ``Conv2d`` consumer
(``F.unfold`` with the consumer's kernel, stride, padding and dilation; the columns of a producer channel are the
``kh * kw`` taps of that channel). The targets are ``Y = A_target W^T`` (the consumer's output without its
bias), where ``A_target`` is the same input in the original network (``asym``, ``layer``) or in the network
pruned so far (``seq``). Only ``d x d`` and ``d x m`` float64 sums are kept (``submod.GramAccumulator``), so
memory does not grow with the number of samples.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from submod.sparse_regression import GramAccumulator, SparseRegression

from .pairs import PrunablePair

_CHUNK_ELEMS = 4_000_000  # float64 elements of A per chunk (32 MB)


def design_rows(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the consumer's design matrix for an input batch ``x`` (float64, ``(rows, d)``)."""
    if isinstance(consumer, nn.Conv2d):
        cols = F.unfold(x.to(torch.float64), consumer.kernel_size, dilation=consumer.dilation,
                        padding=consumer.padding, stride=consumer.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.to(torch.float64).reshape(-1, consumer.in_features)


def weight_matrix(consumer: nn.Module) -> torch.Tensor:
    """The consumer's weights as an ``(out, d)`` float64 matrix whose columns match :func:`design_rows`."""
    W = consumer.weight.detach().to(torch.float64)
    return W.reshape(W.shape[0], -1)


def unit_groups(pair: PrunablePair) -> list[np.ndarray]:
    """Column indices of each unit (contiguous blocks of ``cols_per_unit``)."""
    c = pair.cols_per_unit
    return [np.arange(j * c, (j + 1) * c) for j in range(pair.n_units)]


class PairStats:
    """Float64 sufficient statistics of one pair, fed batch by batch.

    Parameters
    ----------
    pair : PrunablePair
    consumer : nn.Module
        The consumer with its original weights (defines the targets ``Y = A_target W^T``).
    """

    def __init__(self, pair: PrunablePair, consumer: nn.Module) -> None:
        self.pair = pair
        self.consumer = consumer
        self.W = weight_matrix(consumer)
        d = self.W.shape[1]
        if d != pair.n_units * pair.cols_per_unit:
            raise ValueError(f"pair {pair.name}: consumer has {d} input columns, expected "
                             f"{pair.n_units} units x {pair.cols_per_unit} columns.")
        self.acc = GramAccumulator(d, self.W.shape[0])

    def update(self, x: torch.Tensor, x_target: torch.Tensor | None = None) -> None:
        """Add a batch: ``x`` is the consumer's input in the network being pruned, ``x_target`` in the network
        that defines the targets (default ``x``)."""
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError(f"the input of consumer {self.pair.consumer!r} (pair {self.pair.name}) contains NaN or "
                             "infinite activations; check the model's weights and the calibration data.")
        xt = x if x_target is None else x_target.detach()
        n = x.shape[0]
        per_sample = max(1, design_rows(self.consumer, x[:1]).numel())
        step = max(1, _CHUNK_ELEMS // per_sample)
        for s in range(0, n, step):
            A = design_rows(self.consumer, x[s:s + step])
            At = A if x_target is None else design_rows(self.consumer, xt[s:s + step])
            Y = At @ self.W.T
            self.acc.update(A.cpu().numpy(), Y.cpu().numpy())

    @property
    def count(self) -> int:
        return int(self.acc.count)

    def objective(self, ridge: float) -> SparseRegression:
        """The ``SparseRegression`` over units (column groups), with intercept and a scale-free ridge.

        The absolute ridge is ``ridge * mean_j Var(A_j) * count`` (``ridge`` relative to the average centred
        diagonal of the Gram matrix), so ``ridge`` means the same for every layer and input scale.
        """
        lam = 0.0
        if ridge > 0:
            scale = float(np.mean(np.diag(self.acc.gram(centered=True))))
            lam = ridge * (scale if scale > 0 else 1.0)
        return self.acc.to_objective(ridge=lam, groups=unit_groups(self.pair), fit_intercept=True)

    def unit_input_norms(self) -> np.ndarray:
        """``||X_c||_2`` of every input column (uncentred), used by the activation-weighted norm baseline."""
        return np.sqrt(np.maximum(np.diag(self.acc.gram()), 0.0))


@contextmanager
def capture_hooks(model: nn.Module, pairs: list[PrunablePair], stats: dict[str, PairStats]):
    """Forward pre-hooks on every consumer of ``model`` that stream its input into ``stats[pair.name]``.

    The hooks are removed when the context exits, also on error.
    """
    handles = []
    try:
        for p in pairs:
            st = stats[p.name]
            handles.append(model.get_submodule(p.consumer).register_forward_pre_hook(
                lambda _m, inp, st=st: st.update(inp[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def slice_units(x: torch.Tensor, pair: PrunablePair, idx: torch.Tensor) -> torch.Tensor:
    """Keep the units ``idx`` of a consumer input ``x`` (channels, flattened channel blocks or neurons)."""
    if pair.kind == "conv->conv":
        return x[:, idx]
    if pair.kind == "conv->linear":
        n = x.shape[0]
        return x.reshape(n, pair.n_units, pair.cols_per_unit)[:, idx].reshape(n, -1)
    return x[..., idx]
