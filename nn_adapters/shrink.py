"""Physically shrink modules in place: keep some output units of a producer, the matching channels of the per-unit
layers on the way (BatchNorm and InstanceNorm entries, depthwise filters) and of a squeeze-and-excitation gate
(``fc1``'s input columns, ``fc2``'s output rows), and the matching input columns of a consumer (optionally with new,
refitted weights and bias). For a ``linear->conv`` pair (a ``Linear`` reshaped into channels) a unit is ``P``
consecutive output rows of the ``Linear`` (:func:`unit_rows`), and the ``nn.Unflatten`` that reshapes them keeps
the new channel count (:func:`keep_unflatten`). With a ``GroupNorm(G, C)`` on the way a unit is a group of ``C / G``
consecutive channels, and the GroupNorm keeps whole groups (:func:`keep_group_norm`). :func:`keep_producer_side`
does a pair's whole producer side (both producers of gated units, both halves of a chunked one).

Parameters are replaced by new ``nn.Parameter`` objects of the smaller shape and the size attributes
(``out_features``, ``in_channels``, ``num_features`` ...) are updated, so the module objects stay the same and a
traced graph that references them keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _conv

__all__ = ["keep_outputs", "keep_bn", "keep_group_norm", "keep_depthwise", "keep_between", "keep_se", "set_inputs",
           "unit_rows", "keep_unflatten", "keep_producer_side"]


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().to(dtype=like.dtype, device=like.device).clone(), requires_grad=like.requires_grad)


def keep_outputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep the output units ``idx`` (sorted int tensor) of a ``Linear`` or a convolution (transposed or not), or
    the output features (columns of the weight) of an ``nn.Embedding``."""
    if isinstance(module, nn.Embedding):
        module.weight = _param(module.weight.index_select(1, idx), module.weight)
        module.embedding_dim = int(idx.numel())
        return
    out_dim, _ = _conv.unit_dims(module)
    module.weight = _param(module.weight.index_select(out_dim, idx), module.weight)
    if module.bias is not None:
        module.bias = _param(module.bias[idx], module.bias)
    if isinstance(module, nn.Linear):
        module.out_features = int(idx.numel())
    else:
        module.out_channels = int(idx.numel())


def keep_bn(bn: nn.Module, idx: torch.Tensor) -> None:
    """Keep the channels ``idx`` of a BatchNorm or InstanceNorm (affine parameters and running statistics, where
    it has them)."""
    if bn.weight is not None:
        bn.weight = _param(bn.weight[idx], bn.weight)
        bn.bias = _param(bn.bias[idx], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[idx].clone()
        bn.running_var = bn.running_var[idx].clone()
    bn.num_features = int(idx.numel())


def keep_group_norm(gn: nn.GroupNorm, idx: torch.Tensor) -> None:
    """Keep the channels ``idx`` (sorted, whole groups: each kept group's ``C / G`` channels) of a ``GroupNorm(G,
    C)``: their affine entries, if it has them; it becomes ``GroupNorm(len(idx) / (C / G), len(idx))`` with the
    same ``eps`` and ``affine``, and normalises each kept group as before.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from nn_adapters.shrink import keep_group_norm, unit_rows
    >>> gn = nn.GroupNorm(4, 8)                      # groups of 2 channels
    >>> x = torch.randn(3, 8, 5)
    >>> kept = unit_rows(torch.tensor([0, 3]), 2)    # groups 0 and 3: channels 0, 1, 6, 7
    >>> ref = gn(x)[:, kept]
    >>> keep_group_norm(gn, kept)
    >>> gn.num_groups, gn.num_channels, tuple(gn.weight.shape)
    (2, 4, (4,))
    >>> torch.allclose(gn(x[:, kept]), ref)
    True
    """
    size = gn.num_channels // gn.num_groups
    if idx.numel() % size or not torch.equal(idx, unit_rows(idx[::size] // size, size)):
        raise ValueError(f"GroupNorm({gn.num_groups}, {gn.num_channels}) can only keep whole groups of {size} "
                         f"consecutive channels (g * {size} ... (g + 1) * {size} - 1); got channels "
                         f"{idx.tolist()}. Pass the channels of the kept groups (unit_rows(groups, {size})).")
    if gn.weight is not None:
        gn.weight = _param(gn.weight[idx], gn.weight)
        gn.bias = _param(gn.bias[idx], gn.bias)
    gn.num_channels = int(idx.numel())
    gn.num_groups = int(idx.numel()) // size


def keep_depthwise(conv: nn.Module, idx: torch.Tensor) -> None:
    """Keep the channels ``idx`` of a depthwise convolution with channel multiplier 1 (``groups == in_channels ==
    out_channels``): their filters and bias; its input channels and groups are the same channels."""
    keep_outputs(conv, idx)
    conv.in_channels = conv.groups = int(idx.numel())


def keep_between(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep the channels ``idx`` of a per-unit layer between a producer and its consumer (a pair's ``between``):
    a BatchNorm, an InstanceNorm, a GroupNorm (whole groups) or a depthwise convolution."""
    if _conv.is_conv(module):
        keep_depthwise(module, idx)
    elif isinstance(module, nn.GroupNorm):
        keep_group_norm(module, idx)
    else:
        keep_bn(module, idx)


def unit_rows(idx: torch.Tensor, rows_per_unit: int) -> torch.Tensor:
    """The producer's output rows of the units ``idx``: ``c * P ... (c + 1) * P - 1`` for each kept unit ``c``
    (``P = rows_per_unit``), in order; ``idx`` itself when ``P`` is 1.

    Examples
    --------
    >>> import torch
    >>> from nn_adapters.shrink import unit_rows
    >>> unit_rows(torch.tensor([0, 2]), 3).tolist()
    [0, 1, 2, 6, 7, 8]
    """
    if rows_per_unit == 1:
        return idx
    return (idx[:, None] * rows_per_unit + torch.arange(rows_per_unit, device=idx.device)).reshape(-1)


def keep_unflatten(module: nn.Unflatten, n_kept: int) -> None:
    """Give an ``nn.Unflatten`` that reshapes a ``Linear``'s outputs into ``(C, *spatial)`` the channel count
    ``n_kept`` (a ``-1`` there is left as it is: it follows by itself).

    Examples
    --------
    >>> from torch import nn
    >>> from nn_adapters.shrink import keep_unflatten
    >>> u = nn.Unflatten(1, (16, 4, 4))
    >>> keep_unflatten(u, 10)
    >>> u.unflattened_size
    (10, 4, 4)
    """
    sizes = tuple(module.unflattened_size)
    if sizes[0] != -1:
        module.unflattened_size = (int(n_kept), *sizes[1:])


def keep_producer_side(model: nn.Module, pair: object, idx: torch.Tensor) -> None:
    """Keep the units ``idx`` (sorted) on the producer's side of ``pair`` (a :class:`nn_adapters.PrunablePair`) in
    ``model``: the producer's output rows (``pair.producer_rows``: both halves' of a chunked producer) and those of
    the second producer of gated units, the entries of the layers in ``between`` (its rows for the
    ``row_between`` layers before a reshape into channels or the split of a chunked producer, else its channels: a
    unit's ``group_size`` channels with a GroupNorm on the way; for the ``after_cat`` layers behind a
    concatenation, the concatenation's channels that the consumer keeps), an ``nn.Unflatten``'s channel count and
    the output rows of the ``conditioning`` layers (per-channel terms added to or multiplying the channels on the
    way: each kept channel's row in every chunk, see ``PrunablePair.conditioning_rows``). A squeeze-and-excitation
    gate and the consumer are left to :func:`keep_se` and :func:`set_inputs`."""
    rows = pair.producer_rows(idx)
    for name in pair.producers:
        keep_outputs(model.get_submodule(name), rows)
    channels = unit_rows(idx, pair.group_size)
    joined = pair.consumer_channels(idx) if pair.after_cat else None
    for name in pair.between:
        kept = rows if name in pair.row_between else joined if name in pair.after_cat else channels
        keep_between(model.get_submodule(name), kept)
    if pair.unflatten is not None:
        keep_unflatten(model.get_submodule(pair.unflatten), int(idx.numel()))
    for name, chunks in zip(pair.conditioning, pair.conditioning_chunks, strict=True):
        keep_outputs(model.get_submodule(name), pair.conditioning_rows(idx, chunks))


def keep_se(fc1: nn.Module, fc2: nn.Module, idx: torch.Tensor, pooled_mean: torch.Tensor | None = None) -> None:
    """Keep the channels ``idx`` of a squeeze-and-excitation gate ``sigmoid(fc2(act(fc1(pool(h)))))`` on ``C``
    channels: ``fc2``'s output rows (and bias entries) ``idx`` and ``fc1``'s input columns ``idx``.

    Removing column ``j`` of ``fc1`` would change the gates of the kept channels (``fc1`` mixes all pooled
    channels). With ``pooled_mean`` (the calibration mean of the pooled channels, ``(C,)``) the removed channels'
    contribution is folded into ``fc1``'s bias at its mean, ``b1 += W1[:, removed] @ pooled_mean[removed]``: the
    pruned gate equals the original gate with the removed pooled values replaced by their means (exactly, on
    every sample): the constant that changes ``fc1``'s pre-activation least in mean square, and exact for removed
    channels whose pooled value is constant (dead or saturated channels). ``fc1`` gains a bias if it had none. Without
    ``pooled_mean`` the removed pooled values are replaced by zero.
    """
    if pooled_mean is not None:
        W1 = _conv.weight_matrix(fc1).detach().to(torch.float64).cpu()
        removed = torch.ones(W1.shape[1], dtype=torch.bool)
        removed[idx.cpu()] = False
        b1 = fc1.bias.detach().to(torch.float64).cpu() if fc1.bias is not None else torch.zeros(W1.shape[0],
                                                                                               dtype=torch.float64)
        bias = b1 + W1[:, removed] @ pooled_mean.to(torch.float64).cpu()[removed]
        set_inputs(fc1, idx, 1, bias=bias)
    else:
        set_inputs(fc1, idx, 1)
    keep_outputs(fc2, idx)


def set_inputs(module: nn.Module, idx: torch.Tensor, cols_per_unit: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> None:
    """Keep the input units ``idx`` of a consumer, optionally replacing its weights and bias.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d or nn.ConvTranspose2d
    idx : torch.Tensor
        Kept units (sorted).
    cols_per_unit : int
        Input columns per unit (1, ``L`` or ``H*W`` for conv->linear; for a convolution consumer a unit is an input
        channel).
    weight : torch.Tensor, optional
        New weights as a matrix ``(out, len(idx) * cols_per_unit)`` in the order of the kept columns (for a
        convolution, the layout of ``nn_adapters._conv.weight_matrix``). ``None`` keeps the original weights of
        the kept columns.
    bias : torch.Tensor, optional
        New bias ``(out,)``; added as a parameter if the module had none. ``None`` leaves the bias as it is.
    """
    W = module.weight
    out = _conv.out_units(module)
    if _conv.is_conv(module):
        new = W.index_select(_conv.unit_dims(module)[1], idx) if weight is None else _conv.weight_from_matrix(
            module, weight.reshape(out, -1))
        module.in_channels = int(idx.numel())
    else:
        if weight is None:
            cols = (idx[:, None] * cols_per_unit + torch.arange(cols_per_unit, device=idx.device)).reshape(-1)
            new = W[:, cols]
        else:
            new = weight
        module.in_features = int(idx.numel()) * cols_per_unit
    module.weight = _param(new, W)
    if bias is not None:
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(out, dtype=W.dtype, device=W.device), requires_grad=W.requires_grad)
        module.bias = _param(bias, module.bias)
