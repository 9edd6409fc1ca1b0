"""Budgets: how many units each prunable layer keeps.

Three ways to say it:

* ``keep=0.5`` (or ``{pair name: fraction}``): a keep fraction per layer, ``k_l = max(1, round(f * n_l))``.
* ``compression=4.0`` with ``allocation="uniform"``: the largest common keep fraction whose pruned network has at
  most ``P / compression`` parameters (``P`` counts every parameter of the model, prunable or not; the pruned
  count includes the biases a refit adds to consumers that had none).
* ``compression=4.0`` with ``allocation="error-curve"``: a label-free non-uniform allocation. Each layer's nested greedy
  path (LayerInChange statistics of the original network) gives its relative reconstruction error
  ``e_l(k) = ||Y_l - A_S M||^2 / ||Y_l||^2`` for every size ``k`` at once. Starting from the full network, the
  allocation removes one unit at a time from the layer with the smallest error increase per parameter saved,
  ``(e_l(k_l - 1) - e_l(k_l)) / (P(k) - P(k - e_l))``, until the parameter budget is met; the last removal can
  overshoot by more than a unit of another layer costs, so units that still fit are then given back one at a
  time to the layer whose error drops most. A greedy (marginal analysis) heuristic for ``min sum_l e_l(k_l)``
  subject to ``P(k) <= P / compression``, with no optimality claim: the cost of a unit depends on the kept counts
  of the neighbouring layers (``P`` is bilinear in consecutive ``k_l``), and even with fixed costs the integer
  problem is a knapsack.

The parameter count ``P(k)`` of the pruned network is a closed form in the kept counts (``ParamModel``), so
budgets are met exactly, without building candidate networks. The per-unit layers on a pair's way (its
``between``: BatchNorm entries, the filters and biases of a depthwise convolution) count as many parameters per kept
unit as they hold per channel; so do the input columns of a squeeze-and-excitation gate's ``fc1`` and the output
rows and biases of its ``fc2``. Behind a ``GroupNorm(G, C)`` a unit is a group of ``C / G`` channels: it costs
``C / G`` producer rows, ``C / G`` channels' consumer columns and ``2 * C / G`` GroupNorm entries. When the producer's
output is concatenated with other tensors before the consumer, the consumer's columns of the other operands' channels
and their entries in a BatchNorm after the concatenation are fixed. A ``Linear`` whose output is a per-channel
conditioning term on a pair's way (``PrunablePair.conditioning``) has a row and a bias entry per kept channel in
each chunk of its output.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import _conv
from ._data import Inputs, batch_len, call, take
from ._modes import eval_mode
from .pairs import PrunablePair

__all__ = ["ParamModel", "UnreachableCompressionError", "keep_counts", "uniform_counts", "error_allocation",
           "count_flops"]


class ParamModel:
    """Exact parameter count of the network as a function of the kept units ``k`` of every pair.

    Parameters
    ----------
    model : nn.Module
        The unpruned network.
    pairs : list of PrunablePair
    adds_bias : bool, default False
        Whether consumers without a bias get one (the least-squares refit with intercept adds it).
    adds_se_bias : bool, default False
        Whether the ``fc1`` of a squeeze-and-excitation gate without a bias gets one (the bias correction of
        :func:`nn_adapters.shrink.keep_se` adds it).

    Notes
    -----
    A unit of a ``linear->conv`` pair costs ``P`` rows (and bias entries) of the ``Linear`` (``rows_per_unit``),
    and ``P`` entries of a ``BatchNorm1d`` on its output before the reshape into channels. A unit of a pair
    through a ``GroupNorm(G, C)`` costs ``C / G`` output channels of the producer (``rows_per_unit``), their
    consumer columns (``cols_per_unit``) and their ``2 * C / G`` GroupNorm entries (and those of any other layer in
    ``between``). The ``fc1`` of a
    pair's squeeze-and-excitation gate has an input column, and its ``fc2`` an output row (and a bias entry), per
    kept unit of the pair. A ``conditioning`` layer has ``chunks * group_size`` output rows (and bias entries) per
    kept unit (an ``nn.Embedding`` of ``E`` entries: ``E`` weights per kept channel, no bias); its input columns
    follow the pair it is the consumer of, if any. A gated unit costs its rows (and
    bias entries) in both producers, or both halves' rows of a chunked producer (``producer_rows_per_unit``), and
    its entries in the per-unit layers of both factors' paths.
    """

    def __init__(self, model: nn.Module, pairs: Sequence[PrunablePair], adds_bias: bool = False,
                 adds_se_bias: bool = False) -> None:
        self.n_units = np.array([p.n_units for p in pairs], dtype=np.int64)
        #: Parameters of the network as it is (the "before" of every compression ratio). With ``adds_bias`` the
        #: full-size count ``total()`` can exceed it: the refit adds a bias to consumers that have none.
        self.original = int(sum(p.numel() for p in model.parameters()))
        # layers whose output rows / input columns follow a pair's units: producers and SE fc2 / consumers and
        # SE fc1 (one column per unit)
        # (pair, output rows per unit): a linear->conv producer has P rows per channel
        prod = {p.producer: (i, p.producer_rows_per_unit) for i, p in enumerate(pairs)}
        prod |= {p.gated_with: (i, p.rows_per_unit) for i, p in enumerate(pairs) if p.gated_with is not None}
        prod |= {p.se[1]: (i, 1) for i, p in enumerate(pairs) if p.se}
        # a conditioning Linear has a row per kept channel in each chunk of its output
        prod |= {c: (i, m * p.group_size) for i, p in enumerate(pairs)
                 for c, m in zip(p.conditioning, p.conditioning_chunks, strict=True)}
        cons = {p.consumer: (i, p.cols_per_unit) for i, p in enumerate(pairs)}
        cons |= {p.se[0]: (i, 1) for i, p in enumerate(pairs) if p.se}
        gets_bias = ({p.consumer for p in pairs} if adds_bias else set()) | (
            {p.se[0] for p in pairs if p.se} if adds_se_bias else set())
        between = {b: i for i, p in enumerate(pairs) for b in p.between}  # BatchNorms and depthwise convolutions
        const = 0
        terms = []  # (coef, in_idx, in_mult, out_idx, out_mult); value = coef * kk[in]*in_mult * kk[out]*out_mult
        seen: set[int] = set()  # a parameter tied between modules counts once (no pair holds one: find_pairs)
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in own)
            direct = sum(p.numel() for p in own)
            if name in prod or name in cons:
                W = m.weight
                out_fixed = _conv.out_units(m)
                in_fixed = W.numel() // out_fixed  # weights per output unit
                o_idx, o_mult = prod[name] if name in prod else (-1, out_fixed)
                if name in cons:
                    i_idx, cpu = cons[name]
                    i_mult = cpu
                    fixed_cols = pairs[i_idx].n_fixed * pairs[i_idx].cols_per_channel  # a concatenation's others
                    if fixed_cols:
                        terms.append((1, -1, fixed_cols, o_idx, o_mult))
                else:
                    i_idx, i_mult = -1, in_fixed
                terms.append((1, i_idx, i_mult, o_idx, o_mult))
                bias = getattr(m, "bias", None)  # an nn.Embedding (a conditioning term's) has none
                if bias is not None or name in gets_bias:
                    terms.append((1, -1, 1, o_idx, o_mult))
                const += direct - W.numel() - (bias.numel() if bias is not None else 0)
            elif name in between:  # the weight and bias hold one entry or filter per channel; any other is kept
                i = between[name]
                per_channel = sum(t.numel() for t in (getattr(m, "weight", None), getattr(m, "bias", None))
                                  if t is not None)
                pr = pairs[i]
                if per_channel and name in pr.after_cat:  # behind a concatenation: its fixed channels stay
                    per = per_channel // (pr.n_units * pr.group_size + pr.n_fixed)
                    terms.append((per * pr.group_size, -1, 1, i, 1))
                    const += per * pr.n_fixed
                elif per_channel:
                    terms.append((per_channel // pr.n_units, -1, 1, i, 1))
                const += direct - per_channel
            else:
                const += direct
        self.const = int(const)
        t = np.array(terms, dtype=np.int64).reshape(-1, 5)
        self._coef, self._in, self._in_mult, self._out, self._out_mult = t.T

    def count(self, k: np.ndarray) -> np.ndarray:
        """Parameter count for kept counts ``k`` (shape ``(L,)`` or a batch ``(B, L)``)."""
        k = np.asarray(k, dtype=np.int64)
        kk = np.concatenate([k, np.ones(k.shape[:-1] + (1,), dtype=np.int64)], axis=-1)
        vals = self._coef * kk[..., self._in] * self._in_mult * kk[..., self._out] * self._out_mult
        return self.const + vals.sum(axis=-1)

    def total(self) -> int:
        """Parameter count when every unit is kept (including the biases a refit would add)."""
        return int(self.count(self.n_units))


def _check_compression(compression: object) -> float:
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real) or not math.isfinite(compression):
        raise ValueError(f"compression must be a number >= 1 (e.g. 4.0 for 4x fewer parameters); got {compression!r}.")
    if compression < 1:
        raise ValueError(f"compression must be >= 1 (the ratio of parameters before / after); got {compression}.")
    return float(compression)


class UnreachableCompressionError(ValueError):
    """A whole-network compression that keeping one unit in every prunable layer cannot reach; ``most`` is the
    largest reachable compression (rounded down to two decimals). A ``ValueError``, raised by
    :func:`nn_adapters.prune` before any statistics are collected.

    Examples
    --------
    >>> import torch
    >>> import nn_adapters as nna
    >>> from nn_adapters.budget import UnreachableCompressionError
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> try:
    ...     nna.prune(net, torch.randn(50, 4), compression=100.0)
    ... except UnreachableCompressionError as err:
    ...     print(err.most)  # one hidden unit kept: 4 + 1 + 2 + 2 = 9 of 58 parameters
    6.44
    """

    def __init__(self, message: str, most: float) -> None:
        super().__init__(message)
        self.most = most


def _unreachable(pm: ParamModel, compression: float) -> UnreachableCompressionError:
    floor = int(pm.count(np.ones_like(pm.n_units)))
    most = math.floor(pm.original / floor * 100) / 100  # rounded down: the printed value is reachable
    return UnreachableCompressionError(
        f"compression {compression:g}x is not reachable: keeping one unit in every prunable layer still leaves "
        f"{floor} of {pm.original} parameters (at most {most:.2f}x), because the layers that cannot be "
        "pruned (first input, outputs, residual branches) hold the rest. Ask for a lower compression or declare "
        "more prunable pairs.", most)


def keep_counts(pairs: Sequence[PrunablePair], keep: float | Mapping[str, float]) -> np.ndarray:
    """Kept counts from a keep fraction (or ``{pair name or producer: fraction}``; the second producer of gated
    units names their pair too), at least 1 per layer."""
    fr = []
    for p in pairs:
        if isinstance(keep, Mapping):
            given = {n: keep[n] for n in (p.name, *p.producers) if n in keep}
            if len({repr(v) for v in given.values()}) > 1:
                raise ValueError(f"keep gives different fractions {given} to the units of pair {p.name}; name the "
                                 "pair once.")
            f = next(iter(given.values()), 1.0)
        else:
            f = keep
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0 < f <= 1):
            raise ValueError(f"keep fractions must be in (0, 1]; got {f!r} for {p.name}.")
        fr.append(f)
    if isinstance(keep, Mapping):
        known = {p.name for p in pairs} | {n for p in pairs for n in p.producers}
        unknown = set(keep) - known
        if unknown:
            raise ValueError(f"keep names {sorted(unknown)} are not prunable pairs; known: {sorted(known)}.")
    return np.array([max(1, int(round(f * p.n_units))) for f, p in zip(fr, pairs, strict=True)], dtype=np.int64)


def uniform_counts(pm: ParamModel, compression: float) -> np.ndarray:
    """Largest common keep fraction meeting ``P(k) <= P / compression`` (bisection on the fraction)."""
    compression = _check_compression(compression)
    budget = pm.original / compression
    n = pm.n_units

    def ks(f: float) -> np.ndarray:
        return np.maximum(1, np.floor(f * n + 1e-9)).astype(np.int64)

    if pm.count(ks(0.0)) > budget:
        raise _unreachable(pm, compression)
    if pm.count(n) <= budget:
        return n.copy()
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if pm.count(ks(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return ks(lo)


def error_allocation(pm: ParamModel, curves: Sequence[np.ndarray], compression: float) -> np.ndarray:
    """Greedy marginal allocation of kept units from per-layer error curves (see the module docstring).

    Parameters
    ----------
    pm : ParamModel
    curves : list of arrays
        ``curves[l][k]`` = relative error of layer ``l`` keeping its first ``k`` greedy units (length ``n_l + 1``).
    compression : float
    """
    compression = _check_compression(compression)
    budget = pm.original / compression
    if pm.count(np.ones_like(pm.n_units)) > budget:
        raise _unreachable(pm, compression)
    k = pm.n_units.copy()
    L = k.size
    eye = np.eye(L, dtype=np.int64)
    curves = [np.asarray(c, dtype=np.float64) for c in curves]
    current = int(pm.count(k))
    while current > budget:
        cand = k[None, :] - eye  # row l: remove one unit from layer l
        saved = current - pm.count(cand)
        d_err = np.array([curves[i][k[i] - 1] - curves[i][k[i]] if k[i] > 1 else np.inf for i in range(L)])
        d_err = np.maximum(d_err, 0.0)
        score = np.where((k > 1) & (saved > 0), d_err / np.maximum(saved, 1), np.inf)
        i = int(np.argmin(score))
        if not np.isfinite(score[i]):
            raise _unreachable(pm, compression)
        k[i] -= 1
        current = int(pm.count(k))
    # The last removal can overshoot the budget by more than a unit of another layer costs: give such room back,
    # one unit at a time, to the layer whose error drops most.
    while True:
        cand = k[None, :] + eye
        fits = (k < pm.n_units) & (pm.count(cand) <= budget)
        if not fits.any():
            return k
        gain = np.array([curves[i][k[i]] - curves[i][k[i] + 1] if fits[i] else -np.inf for i in range(L)])
        k[int(np.argmax(gain))] += 1


def count_flops(model: nn.Module, example: Inputs) -> int:
    """Floating-point operations of one forward pass per sample, counting convolution (transposed or not) and Linear
    layers only (a multiply-add counts as 2; biases, activations, BatchNorm and pooling are not counted; a
    transposed convolution's multiply-adds are those of its input values, see ``nn_adapters._conv.flops``).
    ``example`` is a batch of inputs, a tensor (``model(example)``) or a dict of keyword inputs
    (``model(**example)``, the layers on every input counted: a time embedding's too)."""
    total = [0]
    handles = []

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        total[0] += _conv.flops(m, inp[0], out)

    try:
        for m in model.modules():
            if isinstance(m, _conv.LAYER_TYPES):
                handles.append(m.register_forward_hook(hook))
        batch = take(example, 2)  # two samples: a BatchNorm that uses batch statistics needs more than one
        with eval_mode(model), torch.no_grad():
            call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return int(total[0]) // batch_len(batch)
