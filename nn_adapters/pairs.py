"""Discovery of prunable (producer, consumer) layer pairs in a PyTorch model.

A *pair* is a producer layer whose output units (neurons of a ``Linear``, channels of a convolution: ``Conv1d``,
``Conv2d``, ``ConvTranspose1d`` or ``ConvTranspose2d``)
feed exactly one consumer layer through channel-wise operations only (BatchNorm, element-wise activations, pooling,
dropout, flatten). Removing a producer unit then removes its row/channel from the producer, its entries from every
BatchNorm on the way, and its input columns from the consumer, and nothing else in the network changes. This is
the setting of El Halabi, Srinivas & Lacoste-Julien, "Data-Efficient Structured Pruning via Submodular
Optimization" (NeurIPS 2022).

Supported pair kinds
--------------------
``linear->linear``
    one unit = one input column of the consumer.
``conv->conv``
    ``Conv1d->Conv1d`` or ``Conv2d->Conv2d``, and with transposed convolutions of the same rank
    (``Conv->ConvTranspose``, ``ConvTranspose->Conv``, ``ConvTranspose->ConvTranspose``): one unit = a channel =
    ``k`` (1-D) or ``kh * kw`` (2-D) columns of the consumer's unfolded input (for a transposed consumer, of its
    zero-stuffed input, see ``nn_adapters._conv``).
``conv->linear``
    a convolution (transposed or not) followed (after pooling) by a flatten and a ``Linear``: one channel = ``L``
    (1-D) or ``H * W``
    (2-D) columns of the consumer's input (grouped by position); after a global pooling written as a reduction
    over the positions (``x.mean((2, 3))``, ``x.mean(-1)``, ``x.amax(...)``, ``x.sum(...)``,
    ``x.squeeze((2, 3))``), one column.
``linear->conv``
    the mirror of ``conv->linear``, the first layers of a decoder or a GAN generator: a ``Linear`` with ``C * P``
    outputs reshaped into ``(N, C, *spatial)`` (``P = prod(spatial)``, 1-D or 2-D) by an ``nn.Unflatten(1, (C,
    *spatial))``, ``x.unflatten(1, (-1, *spatial))`` or ``x.view(x.size(0), -1, *spatial)``, then channel-wise
    operations, then a convolution (transposed or not) of that rank. One unit = a channel ``c`` of the consumer's
    input, produced by the ``Linear``'s output rows ``c * P ... (c + 1) * P - 1`` (PyTorch's row-major reshape);
    on the consumer's side it is exactly the ``conv->conv`` case (``prod(kernel_size)`` columns of its unfolded
    input). Removing channel ``c`` removes those ``P`` rows and bias entries of the ``Linear``, their entries in a
    ``BatchNorm1d`` on the ``Linear``'s ``(N, C * P)`` output (recorded in ``row_between``), channel ``c`` of a
    BatchNorm or InstanceNorm after the reshape, and input channel ``c`` of the consumer; the ``nn.Unflatten``'s
    ``unflattened_size`` becomes ``(kept, *spatial)``. A ``view`` / ``reshape`` / ``unflatten`` written in
    ``forward()`` with a literal channel count (``x.view(-1, 64, 4, 4)``) cannot follow the pruning and is refused
    with the reason: write ``-1`` (or a size read from the tensor) for the channels.

Tokens laid out as an image between two ``Linear`` layers (``linear->linear``): the Mix-FFN of SegFormer (Xie et al.
2021) and the convolutional FFN of PVTv2 (Wang et al. 2022) move the first ``Linear``'s ``(N, T, C)`` output to
channels first (``x.transpose(1, 2)`` or ``x.permute(0, 2, 1)``), view it as an image ``(N, C, H, W)`` (the channel
count read from the tensor, not written as a number), filter it with a depthwise convolution (channel multiplier 1,
recorded in ``between``), maybe a BatchNorm and activations, flatten the positions back (``x.flatten(2)``) and
transpose back to ``(N, T, C)`` before the second ``Linear``: unit ``c`` stays channel ``c`` of every tensor on the
way, so it is one input column of the consumer, as for any ``linear->linear`` pair. Anything on the channels-first
tensor that would mix channels (a full or grouped convolution, a reshape of the channel dim) is refused with the
reason.

Otherwise a ``Linear`` never feeds a convolution's input channels. Transposed convolutions are supported with
``groups=1`` only (a grouped one is refused as producer, consumer or on the way), and as consumers only when called
without ``output_size=`` (which sets the output padding per call). A 1-D and a 2-D convolution are never paired with
each other, and pooling must have the convolution's rank
(``MaxPool1d`` after a ``Conv1d``, ``MaxPool2d`` after a ``Conv2d``). Resampling (``nn.Upsample``,
``F.interpolate``, any mode) of a convolution's output acts on each channel's positions, so it may lie on the way
too; after a ``Linear`` producer it would interpolate across the units and is refused. Padding of the positions
(``nn.ZeroPad2d``, ``nn.ConstantPad1d``, ``nn.ReflectionPad2d``, ``nn.ReplicationPad1d``, ``nn.CircularPad2d`` and
their other ranks, ``F.pad`` of the spatial dims only) also extends each channel on its own and may lie on the way;
after a ``Linear`` producer it would add units, and a pad of the channel or sample dim is refused. So does an
``InstanceNorm1d`` / ``InstanceNorm2d`` of the convolution's rank (affine or not, with running statistics or not):
it normalises each channel on its own, is recorded in ``between`` and loses the removed channels' entries.

Group normalisation
-------------------
``nn.GroupNorm(G, C)`` normalises each group of ``C / G`` consecutive channels of each sample on its own, so
removing one channel would change the statistics of the rest of its group, while removing a whole group leaves every
other group's output unchanged. Between a convolution producer and its consumer (``conv->conv`` or ``conv->linear``,
1-D or 2-D: the ResBlock of a diffusion U-Net, ``conv1 -> GroupNorm(32, C) -> SiLU -> dropout -> conv2``, a ResNet
with GroupNorm, a detection head) the pair's units are therefore the ``G`` groups (``group_size = C / G`` channels
each): unit ``g`` is the producer's output channels ``g * C/G ... (g + 1) * C/G - 1`` (``rows_per_unit = C / G``),
the same channels of every BatchNorm, InstanceNorm or depthwise convolution on the way, and the consumer's input
columns of those channels (``cols_per_unit`` is ``C/G`` times the kernel taps, the positions after a flatten, or 1
after a global pooling). The GroupNorm may also normalise the ``(N, C)`` vector of a global pooling (``conv -> ReLU
-> AdaptiveAvgPool2d(1) -> Flatten -> GroupNorm(G, C) -> Linear``, or after ``x.mean((2, 3))``): its groups are
still groups of ``C / G`` channels, one value each, so the units are the same groups and the ``Linear``'s columns
follow (within a group the normalised values and the intercept are linearly dependent, so without a ridge the refit
weights are one least-squares solution of several; the fit is unique). The GroupNorm becomes ``GroupNorm(G_kept,
C_kept)`` with the kept channels' affine entries (same ``eps`` and ``affine``) and is recorded in ``between``.
``GroupNorm(C, C)`` is per channel (a unit is one channel). Refused with the reason: ``GroupNorm(1, C)`` (one group:
nothing can be removed without removing everything), GroupNorms of different group sizes on one path, a GroupNorm
after a ``Linear`` producer (reshaped into channels or not), one on a tensor that is neither the producer's ``(N, C,
*spatial)`` output of its rank nor its ``(N, C)`` global pooling (e.g. after a flatten of the positions, ``(N,
C*H*W)``), and a squeeze-and-excitation gate on the same path (its rows follow single channels). Such pairs are
found by tracing only; a declared pair through a GroupNorm is refused. So is group normalisation written in
``forward()`` (``F.group_norm(x, G, weight, bias)``, ``torch.group_norm``): the pruned network runs the same code,
which would split the kept channels into ``G`` groups again, and its weight and bias are tensors, not a layer the
pruner rebuilds; the reason says to write it as an ``nn.GroupNorm`` module.

Depthwise convolutions
----------------------
A depthwise convolution with channel multiplier 1 (``groups == in_channels == out_channels``, the 3x3 convolution
of a MobileNetV2/EfficientNet inverted-residual block) filters each channel on its own, so between a convolution
producer and its consumer it is a per-unit operation like BatchNorm: ``expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 ->
BN -> ReLU6 -> project 1x1`` is a ``conv->conv`` pair whose units are the hidden channels. It is recorded in the
pair's ``between`` with the BatchNorms, and removing channel ``c`` also removes its filter and bias. Any kernel,
stride, padding, dilation and padding mode is fine (padding, even reflect or circular, never mixes channels). A
depthwise convolution with a channel multiplier above 1 (``out_channels = m * in_channels``), any other grouped
convolution, and a depthwise convolution as producer or consumer (its input channels are its output channels) are
refused.

Squeeze-and-excitation
----------------------
A squeeze-and-excitation gate (Hu et al. 2018; the SE of EfficientNet and MobileNetV3 blocks) multiplies the path
tensor ``h`` by a per-channel gate computed from ``h`` alone: ``h * sigmoid(fc2(act(fc1(mean(h, spatial dims)))))``
(``fc1``/``fc2`` 1x1 convolutions on the pooled ``(N, C, 1, 1)`` map, or ``Linear`` layers on the pooled
``(N, C)``; ``hardsigmoid`` also). Channel ``c`` of the product depends on all channels of ``h`` through the gate,
so it is not a per-unit operation, but removing channel ``c`` everywhere is well defined: the consumer loses input
channel ``c`` (its refit reads the gated activations), ``fc2`` loses output row ``c`` (and its bias entry) and
``fc1`` loses input column ``c``, whose contribution to ``fc1``'s pre-activation is folded into ``fc1``'s bias with
the calibration mean of the pooled channel (:func:`nn_adapters.shrink.keep_se`). Such a gate is recorded in the
pair's ``se`` as ``(fc1, fc2)``. Any other product with a tensor on the way (a gate computed from another tensor, a
spatial attention map without global pooling, a gate whose ``fc2`` does not output one factor per channel, a
learned per-channel scale) is refused with the reason.

Concatenations
--------------
A producer whose output (after per-channel operations) is concatenated with other tensors before its consumer, the
U-Net decoder ``d1(torch.cat([skip, up(b)], dim=1))``, an Inception-style join, a two-branch MLP
``fc(torch.cat([relu(a(x)), relu(b(x))], 1))``, is prunable when ``torch.cat`` (``torch.concat``,
``torch.concatenate``) joins along the channel dim (dim 1 of a convolution's ``(N, C, *spatial)`` output, or of
its ``(N, C * P)`` flatten when the other operands are whole channels of ``P`` positions; the last dim of a
``Linear``'s output). The producer's ``C`` channels are then the consumer's input channels ``offset ... offset +
C - 1`` (``offset``: the channels of the operands before its tensor, read from the traced shapes; for a ``Linear``
consumer, blocks of a channel's columns) and the other operands' ``n_fixed`` channels are *fixed*: always kept, and
their columns are in every refit (their prior is their trained weights). The selection maximises the gain of the
producer's units over the fixed columns, ``F(S) = ||P_{Fix u S} Y||^2 - ||P_Fix Y||^2``, a least-squares objective
on the Schur complement of the fixed block (``nn_adapters._stats.schur_objective``), and the reported relative
errors are those of the refit over the fixed and the kept columns, as for any pair. Per-channel operations may
follow the concatenation (activations, pooling, a flatten, and a BatchNorm, InstanceNorm or depthwise convolution
over the joined channels, recorded in ``after_cat``: it keeps the fixed channels and ``offset`` plus the kept ones,
as the consumer does). One operand per concatenation is pruned: when several are prunable the first is kept as the
pair and the others are skipped with the reason ("another operand of the concatenation feeding ... is pruned").
Refused with the reason: ``torch.stack`` and other operations on lists of tensors, a concatenation along the
samples or positions, the producer's tensor twice in one concatenation, a second concatenation on the way, a
concatenation whose result feeds several operations (DenseNet's growing concatenations), a GroupNorm before or after
it, and a concatenation after a squeeze-and-excitation gate or after a ``Linear``'s reshape into channels. Such pairs
are found by tracing only; a declared pair whose consumer reads a concatenation is refused (its channel count does
not match the producer's).

Conditioning terms
------------------
A per-channel term computed from another input may be added to the path tensor or multiply it: the time embedding of
a diffusion U-Net's residual block, ``conv1(...) + temb_proj(silu(temb))[:, :, None, None]`` (DDPM, diffusers'
``ResnetBlock2D``), FiLM's ``h * (1 + scale) + shift`` with ``scale, shift = temb_proj(emb).chunk(2, dim=1)``
(Improved DDPM's ``use_scale_shift_norm``, diffusers' ``time_embedding_norm="scale_shift"``) or with two ``Linear``
layers, a class embedding added to a ``Linear``'s features. The term must be computed without the producer's output by
a ``Linear`` or an ``nn.Embedding`` E called once (an embedding's columns are its output features; one with
``max_norm`` is refused), then only element-wise operations without parameters, arithmetic with numbers, reshapes
that follow the channel count and at most one ``torch.chunk`` along the channels, with E's output read by this path
alone; and it must hold one value per sample and channel, broadcast over the positions (``(N, C, 1, ...)`` on a
convolution's output, ``(N, C)`` on its global pooling or a ``Linear``'s ``(N, F)``, ``(N, 1, F)`` on ``(N, T,
F)``). Channel ``c`` of the sum or product then depends on channel ``c`` of the path and on E's rows of channel
``c`` only (row ``c`` of each chunk: ``c`` and ``C + c`` for ``chunk(2)``), which are removed with it
(:meth:`nn_adapters.PrunablePair.conditioning_rows`). The pair records E in ``conditioning`` and its chunk count in
``conditioning_chunks``, and the terms in ``ops``; GroupNorms before or after a term are fine (E keeps the kept
groups' channels). When the term's ``Linear`` is itself a producer (``a(x) + b(y)`` between two ``Linear`` layers)
the layer that runs first is the pair's producer. Refused with the reason: E called several times or its output read
elsewhere, a term with another channel count or that varies over the positions, a chunk that does not condition this
path, a reshape with a literal channel count, a term after a concatenation, on a ``Linear``'s output reshaped into
channels or on a path with a squeeze-and-excitation gate, and a learned bias written in ``forward()`` (``h +
self.b``, a parameter the pruner does not slice). Such pairs are found by tracing only.

Gated units
-----------
A consumer may read the elementwise product of two factors whose unit ``i`` comes from output row (channel) ``i``
of two producers: ``consumer(act1(P1(x)) * act2(P2(x')))``, the SwiGLU/GeGLU MLP ``down(silu(gate(x)) * up(x))``,
WaveNet's and PixelCNN's gated activation ``o(tanh(f(x)) * sigmoid(g(x)))``. ``P1`` and ``P2`` are two ``Linear``
layers with as many outputs, or two convolutions of one rank and kind (both transposed or neither) with as many
output channels; ``x`` and ``x'`` may differ. Either factor may pass through the per-unit operations of a pair's way
before the product (activations, dropout, clamping, scaling by a number, a BatchNorm, InstanceNorm or depthwise
convolution on its producer's channels, and for convolutions pooling, resampling or padding of the positions), and
the walk goes on after it as from any producer (pooling, a flatten into a ``Linear``, a GroupNorm, a concatenation,
a squeeze-and-excitation gate, a ``Linear``'s reshape into channels). Removing unit ``i`` removes row ``i`` of both
producers, entry ``i`` of the per-unit layers on both factors' paths (all in ``between``) and the consumer's
columns of unit ``i``. The pair is named after the producer of the product's *first* factor (its first argument:
``gate`` in ``silu(gate(x)) * up(x)``) and records the other in ``gated_with``; that one is listed in ``skipped``
as "pruned with 'gate' (gated units)". Each factor's tensors must be used only on the way to the product, and the
two factors must have one shape (no broadcasting).

One producer split in two halves along its units (a GLU) gives gated units too: ``a, b = P(x).chunk(2, dim)`` (or
``torch.chunk``, ``.split(x.size(dim) // 2, dim)``) then ``a * act(b)`` (per-unit operations on either half, the
product in either order), and ``F.glu(P(x), dim)`` / ``nn.GLU(dim)``, which are ``a * sigmoid(b)``; ``dim`` is the
units' dim (the last of a ``Linear``'s output, 1 of a convolution's). ``P`` has ``2H`` rows and the pair ``H``
units (``chunked``): unit ``i`` is rows ``i`` and ``H + i`` of ``P`` (and of the layers before the split, in
``row_between``) and entry ``i`` of the per-unit layers after it.

Refused with the reason: a split into other than two pieces, along another dim or of an odd number of units; a
split size written as a literal (``.split(32, -1)``, which would not follow the pruning: write ``.chunk(2, -1)``); a
factor's tensor used elsewhere; producers of different kinds, ranks or unit counts; factors of different shapes; a
second gated product on the way; a flatten or reduction, a reshape into channels, a GroupNorm, a
squeeze-and-excitation gate or a concatenation before the product (after it they are fine), and a chunked producer
reshaped into channels. A product with anything else keeps the reasons above (a squeeze-and-excitation gate is
recognised as such). Gated pairs are found by tracing only: a declared pair whose consumer reads a product is
refused by its check (the consumer's input changes with the model's input while the producer's output is held).

Units whose outputs feed a residual sum, several consumers or the network output are not prunable by this scheme
and are listed in ``skipped`` with the reason (in a ResNet BasicBlock only ``conv1`` is prunable, as in the paper).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import operator
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from . import _conv
from ._data import Inputs, call, per_sample, shape_text, take
from ._modes import FORWARD_HOOK_DICTS, eval_mode, wrapper_hint
from ._value_trace import ValueTracer, answering_is_tensor, metadata_read, starred_input
from .shrink import unit_rows

__all__ = ["Pair", "PrunablePair", "find_pairs", "resolve_pairs", "trace"]

# Modules that act on each channel (or neuron) separately, so that dropping a channel before them is the same as
# dropping it after them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.AlphaDropout,
)
# Pooling modules and functions with their number of spatial dims: they act on each channel separately only on
# (N, C, ...) with that many spatial dims, i.e. after a convolution of the same rank.
_POOL_RANK: dict[object, int] = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
}
_POOL_MODULES = tuple(t for t in _POOL_RANK if isinstance(t, type))
_POOL_FUNCTIONS = {f for f in _POOL_RANK if not isinstance(f, type)}
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Instance normalisation normalises each channel of each sample over its positions, with per-channel affine
# entries and running statistics if it has them: per channel on (N, C, *spatial) of its own rank. Even without
# entries it is recorded in a pair's ``between``, so that its num_features follows the kept channels (PyTorch warns
# about a mismatch).
_INSTANCE_NORM_RANK: dict[type[nn.Module], int] = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2}
_INSTANCE_NORMS = tuple(_INSTANCE_NORM_RANK)
#: Normalisation layers whose entries (affine parameters, running statistics) follow the producer's channels.
_NORM_MODULES = (*_BN_MODULES, *_INSTANCE_NORMS)
# Resampling (any mode: nearest, linear, bilinear, bicubic, area) interpolates the positions of each channel on its
# own, on (N, C, *spatial) with the convolution's rank; a Linear's units (the last dim) it would interpolate across.
# nn.UpsamplingNearest2d and nn.UpsamplingBilinear2d are subclasses of nn.Upsample.
_RESAMPLE_MODULES = (nn.Upsample,)
_RESAMPLE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
# Padding of the positions (zeros, a constant, reflection, replication, circular) extends each channel on its own, on
# (N, C, *spatial) with the path's rank, as long as it pads no channel or sample dim; after a Linear it would add
# units. nn.ZeroPad1d and the circular modules are absent from older torch releases.
_PAD_MODULES = tuple(getattr(nn, f"{kind}Pad{r}d") for kind in ("Zero", "Constant", "Reflection", "Replication",
                                                                   "Circular")
                     for r in (1, 2) if hasattr(nn, f"{kind}Pad{r}d"))
_PAD_FUNCTIONS = {F.pad}
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, *_POOL_FUNCTIONS,
}
# Casts (ADM's emb_layers(emb).type(h.dtype)) act element by element too.
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "relu_", "clone", "to", "type", "float", "double",
                        "half", "bfloat16"}
# Clamping to number bounds acts unit by unit (tensor bounds may not: they are refused).
_CLAMP_FUNCTIONS = {torch.clamp, torch.clip}
_CLAMP_METHODS = {"clamp", "clip", "clamp_", "clip_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
# Reductions over positions (spatial dims of a conv's output, token dims of a Linear's): a global pooling head
# written in forward(), e.g. x.mean((2, 3)) or x.amax(dim=(-2, -1)); they act on each unit separately.
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.squeeze}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "squeeze"}
# Multiplication or division by a number (x / (H * W) after a spatial sum) acts on each unit separately.
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
# Sums and differences: with a tensor a residual connection, whichever term the producer's output is (x + h,
# torch.add(x, h), x.add(h)); with a number an element-wise shift (h + 1); with a per-channel term a conditioning.
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_RESIDUAL_FUNCTIONS = _SUM_FUNCTIONS | {torch.cat, torch.stack, operator.mul}
# Group normalisation written in forward(): its group count is fixed in the code (see _functional_group_norm_reason).
_GROUP_NORM_FUNCTIONS = {F.group_norm, torch.group_norm}


@dataclass(frozen=True, repr=False)
class Pair:
    """A pair declared by the user: ``producer`` feeds ``consumer`` through channel-wise ops only.

    Parameters
    ----------
    producer, consumer : str
        Qualified module names (as in ``model.named_modules()``).
    between : tuple of str
        Names of the per-unit layers with parameters on the way (BatchNorm, depthwise convolutions with channel
        multiplier 1), whose entries (channels, filters) are removed with the producer's units.
    se : tuple of str
        ``(fc1, fc2)`` of a squeeze-and-excitation gate on the way (see the module docstring), or ``()``.

    Examples
    --------
    >>> import torch.nn as nn
    >>> from nn_adapters import Pair
    >>> Pair("0", "2")
    Pair(producer='0', consumer='2', between=())
    """

    producer: str
    consumer: str
    between: tuple[str, ...] = ()
    se: tuple[str, ...] = ()

    def __repr__(self) -> str:
        se = f", se={self.se!r}" if self.se else ""
        return f"Pair(producer={self.producer!r}, consumer={self.consumer!r}, between={self.between!r}{se})"


@dataclass
class PrunablePair:
    """A resolved prunable pair.

    Attributes
    ----------
    producer, consumer : str
        Module names.
    between : tuple of str
        BatchNorm modules and depthwise convolutions between them (their entries and filters follow the producer's
        units).
    kind : str
        ``"linear->linear"``, ``"conv->conv"``, ``"conv->linear"`` or ``"linear->conv"`` (for ``Conv1d``,
        ``Conv2d`` and their transposed kinds alike).
    n_units : int
        Output units of the producer (the ground-set size of the selection problem).
    cols_per_unit : int
        Consumer input columns per unit: 1, the kernel taps (``k`` or ``kh * kw``) or the positions (``L`` or
        ``H * W``).
    consumer_node : str or None
        Name of the consumer's node in the traced graph (``None`` for untraceable models).
    ops : list of str
        The operations found between producer and consumer in the traced graph, in order (module class names such
        as ``"BatchNorm2d"`` or ``"ReLU"``, function and method names such as ``"relu"`` or ``"flatten"``): what
        the pair was checked to pass through unit by unit. Empty for untraceable models and declared pairs.
    se : tuple of str
        ``(fc1, fc2)`` of a squeeze-and-excitation gate on the way, or ``()``: ``fc1``'s input columns and
        ``fc2``'s output rows follow the producer's units.
    se_input_node : str or None
        Name of the graph node whose output the gate multiplies (and pools), when ``se`` is set and the model was
        traced; the sequential methods recompute the gated consumer input from it after pruning.
    rows_per_unit : int
        Output rows of the producer per unit (in each half of a ``chunked`` producer): ``P = prod(spatial)`` for
        ``"linear->conv"`` (unit ``c`` is rows ``c * P ... (c + 1) * P - 1``), ``group_size`` behind a GroupNorm, 1
        for the other pairs.
    row_between : tuple of str
        The layers of ``between`` that lie before the reshape of a ``"linear->conv"`` pair (a ``BatchNorm1d`` on
        the ``Linear``'s output), or before the split of a ``chunked`` producer: their entries are the producer's
        rows (:meth:`producer_rows`).
    unflatten : str or None
        Name of the ``nn.Unflatten`` module of a ``"linear->conv"`` pair, whose channel count in
        ``unflattened_size`` follows the kept units; ``None`` for a reshape written in ``forward()`` (with ``-1``
        or a size read from the tensor for the channels, so it follows by itself) and for the other kinds.
    group_size : int
        Channels per unit, ``C / G``, when a ``GroupNorm(G, C)`` lies on the way of a convolution producer: unit
        ``g`` is channels ``g * s ... (g + 1) * s - 1`` (``s = group_size``) of the producer's output (its
        ``rows_per_unit`` is ``s``), of every layer in ``between`` and of the consumer's input (its
        ``cols_per_unit`` covers ``s`` channels). 1 for the other pairs.
    offset : int
        When the producer's output is concatenated with other tensors before the consumer (``torch.cat`` along the
        channel dim, see the module docstring): the consumer's input channels (for a ``Linear`` consumer, its
        blocks of ``cols_per_unit / group_size`` input columns: a channel's positions, or one feature) that come
        before the producer's, from the operands before its tensor. 0 for the other pairs.
    n_fixed : int
        The consumer's input channels (or column blocks, as for ``offset``) from the other operands of a
        concatenation, before and after the producer's: always kept, with their columns in every refit. 0 for the
        other pairs.
    after_cat : tuple of str
        The layers of ``between`` that lie after the concatenation (a BatchNorm over the concatenated channels):
        their entries are the consumer's input channels (:meth:`consumer_channels`), not the producer's.
    conditioning : tuple of str
        The ``Linear`` (or ``nn.Embedding``) layers whose output, a per-channel conditioning term computed from
        another input (a diffusion U-Net's time embedding projection, FiLM's scale and shift, a class embedding, see
        the module docstring), is added to or multiplies the producer's channels on the way: their output rows (an
        embedding's columns) follow the producer's channels (:meth:`conditioning_rows`). ``()`` for the other
        pairs.
    conditioning_chunks : tuple of int
        For each layer of ``conditioning``, the number of chunks its output is split into along the channels
        (``scale, shift = E(c).chunk(2, dim=1)``: 2; 1 without a chunk).
    gated_with : str or None
        The second producer of gated units (see the module docstring): the consumer reads the elementwise product
        ``act1(producer(x)) * act2(gated_with(x'))`` (through per-unit operations), and unit ``i`` is output
        row ``i`` (:meth:`producer_rows`) of both producers. The per-unit layers on the second factor's path are in
        ``between`` with the others. ``None`` for the other pairs.
    chunked : bool
        Whether the producer's output is split into two halves along its units that are multiplied with each other
        (a GLU: ``a, b = producer(x).chunk(2, dim)`` then ``a * act(b)``, or ``F.glu``): ``n_units`` counts the
        units of one half, and unit ``i`` is the producer's rows ``i`` and ``H + i`` (``H`` the rows of one half,
        :meth:`producer_rows`). The layers of ``between`` before the split are in ``row_between`` (their entries
        are the producer's rows). ``False`` for the other pairs.
    """

    producer: str
    consumer: str
    between: tuple[str, ...]
    kind: str
    n_units: int
    cols_per_unit: int
    consumer_node: str | None = None
    ops: list[str] = field(default_factory=list)
    se: tuple[str, ...] = ()
    se_input_node: str | None = None
    rows_per_unit: int = 1
    row_between: tuple[str, ...] = ()
    unflatten: str | None = None
    group_size: int = 1
    offset: int = 0
    n_fixed: int = 0
    after_cat: tuple[str, ...] = ()
    conditioning: tuple[str, ...] = ()
    conditioning_chunks: tuple[int, ...] = ()
    gated_with: str | None = None
    chunked: bool = False

    def channels(self, idx: torch.Tensor) -> torch.Tensor:
        """The channels of the units ``idx`` (sorted) on the way (before a concatenation) and at a convolution
        consumer's input: ``idx`` itself, or each kept group's ``group_size`` channels in order (see
        ``group_size``)."""
        return unit_rows(idx, self.group_size)

    def consumer_channels(self, idx: torch.Tensor) -> torch.Tensor:
        """The consumer's input channels (for a ``Linear`` consumer, its column blocks of one channel, see
        ``offset``) kept with the units ``idx`` (sorted): :meth:`channels` after a concatenation's ``offset``, with
        the fixed channels of its other operands, in order. :meth:`channels` itself without a concatenation.

        Examples
        --------
        The decoder convolution ``d1(torch.cat([skip, up(b)], 1))`` with a 3-channel skip before the 4 channels of
        ``up``: keeping ``up``'s channels 1 and 3 keeps ``d1``'s inputs 0-2 (the skip), 4 and 6.

        >>> p = PrunablePair("up", "d1", (), "conv->conv", n_units=4, cols_per_unit=9, offset=3, n_fixed=3)
        >>> p.consumer_channels(torch.tensor([1, 3])).tolist()
        [0, 1, 2, 4, 6]
        """
        mine = self.channels(idx)
        if not self.n_fixed:
            return mine
        end = self.offset + self.n_units * self.group_size
        total = self.n_fixed + self.n_units * self.group_size
        return torch.cat([torch.arange(self.offset, device=idx.device), mine + self.offset,
                          torch.arange(end, total, device=idx.device)])

    def conditioning_rows(self, idx: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """The output rows of a ``conditioning`` layer split into ``chunks`` chunks that are kept with the units
        ``idx`` (sorted): in each chunk, the rows of the kept channels (:meth:`channels`), chunk after chunk.

        Examples
        --------
        FiLM's ``scale, shift = E(c).chunk(2, dim=1)`` on a producer of 4 channels: keeping channels 1 and 3 keeps
        E's rows 1 and 3 (scale) and 5 and 7 (shift).

        >>> p = PrunablePair("conv1", "conv2", (), "conv->conv", n_units=4, cols_per_unit=9, conditioning=("E",),
        ...                  conditioning_chunks=(2,))
        >>> p.conditioning_rows(torch.tensor([1, 3]), 2).tolist()
        [1, 3, 5, 7]
        """
        mine = self.channels(idx)
        width = self.n_units * self.group_size
        return torch.cat([mine + j * width for j in range(chunks)])

    def producer_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The output rows of the producer (and of ``gated_with``) of the units ``idx`` (sorted), in order: each
        unit's ``rows_per_unit`` consecutive rows, and for a ``chunked`` producer the same rows of its second half
        after those of its first.

        Examples
        --------
        A GLU ``fc2(a * sigmoid(b))`` with ``a, b = fc1(x).chunk(2, -1)`` and 4 units (``fc1`` has 8 rows): keeping
        units 1 and 3 keeps ``fc1``'s rows 1, 3 (of ``a``) and 5, 7 (of ``b``).

        >>> p = PrunablePair("fc1", "fc2", (), "linear->linear", n_units=4, cols_per_unit=1, chunked=True)
        >>> p.producer_rows(torch.tensor([1, 3])).tolist()
        [1, 3, 5, 7]
        """
        rows = unit_rows(idx, self.rows_per_unit)
        if not self.chunked:
            return rows
        return torch.cat([rows, rows + self.n_units * self.rows_per_unit])

    @property
    def producers(self) -> tuple[str, ...]:
        """The layers whose output rows are the units: ``(producer,)``, or ``(producer, gated_with)``."""
        return (self.producer,) if self.gated_with is None else (self.producer, self.gated_with)

    @property
    def producer_rows_per_unit(self) -> int:
        """Output rows of each producer per unit: ``rows_per_unit``, twice that for a ``chunked`` producer."""
        return self.rows_per_unit * (2 if self.chunked else 1)

    @property
    def cols_per_channel(self) -> int:
        """Consumer input columns per channel: ``cols_per_unit / group_size``."""
        return self.cols_per_unit // self.group_size

    @property
    def conv_consumer(self) -> bool:
        """Whether the units are the input channels of a convolution consumer (``"conv->conv"`` and
        ``"linear->conv"``): its input is ``(N, C, *spatial)`` and a unit is one channel of it."""
        return self.kind in ("conv->conv", "linear->conv")

    @property
    def name(self) -> str:
        """``"producer->consumer"``, the pair's name in reports and in ``keep={name: fraction}``."""
        return f"{self.producer}->{self.consumer}"


class _LeafTracer(fx.Tracer):
    """Keeps user subclasses of the supported layers (e.g. a custom ``nn.Linear``) as leaf modules; ``*args`` and
    ``**kwargs`` of ``forward()`` are traced as empty (see :func:`nn_adapters._value_trace.starred_input`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_conv.LAYER_TYPES, *_BN_MODULES)) or super().is_leaf_module(m, module_qualified_name)

    def create_proxy(self, kind: str, target: object, *args: object, **kwargs: object) -> object:
        empty = starred_input(kind, target)
        return empty if empty is not None else super().create_proxy(kind, target, *args, **kwargs)


def container_hooks(model: nn.Module) -> list[str]:
    """Names of the modules other than the leaf layers whose forward (pre-)hooks are not in a traced graph: the
    model itself (its pre-hooks) and container submodules (all their hooks)."""
    tracer = _LeafTracer()
    out = ["(the model)"] if model._forward_pre_hooks else []
    for name, m in model.named_modules():
        if name and not tracer.is_leaf_module(m, name) and (m._forward_hooks or m._forward_pre_hooks):
            out.append(name)
    return out


def _defaulted_arguments(model: nn.Module, given: Sequence[str] | None = None) -> dict[str, object] | None:
    """``forward``'s parameters that have defaults (e.g. ``return_features=False``) and are not passed: after the
    input when pruning calls ``model(x)`` (``given=None``), not among ``given`` when it calls ``model(**batch)``
    with those keys. They are traced as the constants they are instead of as symbolic inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    passed = params[1:] if given is None else [p for p in params if p.name not in given]
    fixed = {p.name: p.default for p in passed if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return fixed or None


def trace(model: nn.Module, given: Sequence[str] | None = None, example: Inputs | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` with :mod:`torch.fx` (raises a clear ``ValueError`` when it cannot).

    ``given``: the names of the inputs the model is called with, ``model(**batch)`` for dict batches with these
    keys; ``None`` for ``model(x)``, one input. The other inputs of ``forward()`` that have defaults are traced as
    those constants. Hooks of container submodules are detached while tracing (fx would run them on proxies: a
    hook that stores its output would hold proxies and add graph uses); see :func:`container_hooks`.

    ``example``: a batch of inputs. When plain fx tracing fails (``len()`` of a shape, an ``if`` on ``x.ndim`` or
    on a dtype), the model is traced again while running on the shapes of this batch
    (:class:`nn_adapters._value_trace.ValueTracer`): decisions on shapes and types are taken as on this batch and
    guarded in the graph, decisions on tensor values are refused. If that fails too and ``forward()`` is wrapped
    by decorators, its undecorated function (``__wrapped__``) is traced the same way, and kept only if the graph
    computes what the model computes on ``example``.

    With ``example``, a graph that plain fx traced without an error is run on its first samples and must compute
    what the model computes there (fx answers some questions about its proxies otherwise than a real run:
    ``isinstance(x, torch.Tensor)`` is ``False``); if it does not, the model is traced on ``example`` as above, and
    a graph that still differs is refused with a ``ValueError``. A graph traced on ``example`` is checked on the
    whole of it (its guards may read the batch size). Not checked: a model with a module in train mode,
    one that fails on the example or gives non-finite values there, and one that does not reproduce its own output
    (random numbers in ``forward()``); see :func:`_graph_differs`.

    Batch keys that only ``**kwargs`` would take are refused; ``*args`` and ``**kwargs`` are traced empty. The
    modules' public attributes are restored afterwards (a cache that ``forward()`` fills would hold traced values),
    also after the checks' real runs.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from nn_adapters.pairs import trace
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         if len(x.shape) == 1:  # one sample: plain torch.fx cannot decide this
    ...             x = x[None]
    ...         return self.fc(x)
    >>> gm = trace(Net(), example=torch.zeros(8, 4))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['fc']
    >>> gm(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    """
    if (extra := _keyword_extras(model, given)) is not None:
        raise ValueError(extra)
    try:
        gm = _trace_with(_LeafTracer(), model, given)
    except Exception as exc:  # fx raises many exception types for data-dependent control flow
        hint = wrapper_hint(model)
        if hint:  # torch.compile / DataParallel: fx cannot see through them, and nothing else needs changing
            raise ValueError(f"could not trace {type(model).__name__} with torch.fx.{hint}") from exc
        failure = f"{type(exc).__name__}: {exc}"
        if example is not None:
            try:
                traced = _trace_with(ValueTracer(_LeafTracer(), example), model, given)
            except Exception as second:  # noqa: BLE001 - reported with the first failure
                failure += (f"; traced again on the first batch, it stopped at {type(second).__name__}: "
                            f"{second}")
                exc = second
            else:
                if _graph_differs(traced, model, example):  # on the whole batch: its guards may read its size
                    raise ValueError(_differs_message(model, "; traced on the first batch, the graph differs"))
                return traced
            decorated = inspect.unwrap(type(model).forward)
            if decorated is not type(model).forward:
                with _forward_replaced(model, decorated):
                    try:
                        gm = _trace_with(ValueTracer(_LeafTracer(), example), model, given)
                    except Exception as third:  # noqa: BLE001 - reported with the others
                        failure += f"; without the decorators of forward(), at {type(third).__name__}: {third}"
                        exc = third
                        gm = None
                if gm is not None and (why := _same_results(gm, model, example)) is None:
                    return gm
                if gm is not None:
                    failure += f"; without the decorators of forward(), {why}"
        raise ValueError(
            f"could not trace {type(model).__name__} with torch.fx ({failure}). Automatic pair "
            "discovery and the sequential methods ('seq', 'asym') need a traceable model: remove data-dependent "
            "control flow from forward(), or declare the pairs yourself with pairs=[nn_adapters.Pair(...)] and use "
            "method='layer'.") from exc
    if example is None or not _graph_differs(gm, model, take(example, CHECK_SAMPLES)):
        return gm
    # plain fx answered a question about its proxies otherwise than the model does on real tensors (an
    # isinstance(x, torch.Tensor), an if on a shape fx treated as a constant...): trace on the first batch instead
    try:
        again = _trace_with(ValueTracer(_LeafTracer(), example), model, given)
    except Exception as exc:  # noqa: BLE001 - reported with the first failure
        again, detail = None, f"; traced again on the first batch, it stopped at {type(exc).__name__}: {exc}"
    else:
        detail = "; traced again on the first batch, the graph still differs"
        if not _graph_differs(again, model, example):  # its guards hold for this batch
            return again
    raise ValueError(_differs_message(model, detail))


def _differs_message(model: nn.Module, detail: str) -> str:
    return (f"the graph torch.fx traced for {type(model).__name__} does not compute what the model computes on the "
            f"first calibration samples{detail}: forward() takes a decision that tracing answers otherwise than a "
            "real run (isinstance(x, torch.Tensor) is False for a traced tensor: write torch.is_tensor(x)), so the "
            "graph's pairs and activations would be wrong. Declare the pairs yourself with "
            "pairs=[nn_adapters.Pair(...)] and use method='layer', which runs the model itself.")


def _keyword_extras(model: nn.Module, given: Sequence[str] | None) -> str | None:
    """Why the batches' keys cannot be traced: keys that no named input of ``forward()`` takes would go to its
    ``**kwargs``, which tracing passes empty (the graph would compute without them); or ``None``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    extra = [k for k in given or () if k not in named]
    if not extra:
        return None
    return (f"the batches' inputs {extra} are not named inputs of {type(model).__name__}.forward() and would go to "
            "its **kwargs, which the traced graph does not take (it would compute without them); wrap the model in "
            "a module whose forward() names them, or leave them out of the batches.")


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, forward: Callable) -> Iterator[None]:
    """``model`` as an instance of a subclass whose ``forward`` is ``forward``, for the duration. fx traces the
    function of ``type(model).forward``: under a decorator that takes ``(self, *args, **kwargs)`` (Hugging Face's
    ``can_return_tuple``) it would see no named input; the undecorated function has them."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    try:
        yield
    finally:
        model.__class__ = cls


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model's result in order: a tensor, the values of a mapping (a ``ModelOutput``), or the items
    of a tuple or list, nested."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for item in out for t in _tensors(item)]
    return []


def _largest(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() and t.is_floating_point() else 0.0


def _same_results(gm: fx.GraphModule, model: nn.Module, example: Inputs) -> str | None:
    """Why the traced ``gm`` does not compute what ``model`` computes on ``example`` (its tensors, in order), or
    ``None``: the check of a graph traced without the decorators of ``forward()``."""
    with torch.no_grad():
        want = _tensors(call(model, example))
        got = _tensors(gm(*graph_arguments(gm, model, example)))
    if not _same_outputs(got, want):
        return "the traced graph does not compute what the model computes on the first batch"
    return None


def _graph_differs(gm: fx.GraphModule, model: nn.Module, example: Inputs) -> bool:
    """Whether the traced ``gm`` computes something else than ``model`` on ``example``: the check of every graph
    :func:`trace` makes with an example. ``model`` runs as traced: its own ``forward()`` (not its hooks) with the
    hooks of the modules fx inlines detached; what it writes to its modules' public attributes is forgotten.

    Not checked (``False``): a model with a module in train mode (the run would update BatchNorm statistics, and
    fx has read ``self.training``), one that fails on ``example`` or gives non-finite values (said later, with the
    batch named), and one that does not reproduce its own output (random numbers in ``forward()``)."""
    if any(m.training for m in model.modules()) or gm.code in _CHECKED.get(model, ()):
        return False
    with torch.no_grad(), _public_state_kept(model), _inlined_hooks_detached(_LeafTracer(), model):
        try:
            want = _tensors(_call_forward(model, example))
        except Exception:  # noqa: BLE001 - the model does not run on this batch: reported where it is called
            return False
        if not all(bool(torch.isfinite(w).all()) for w in want if w.is_floating_point()):
            return False
        try:
            got = _tensors(gm(*graph_arguments(gm, model, example)))
        except Exception:  # noqa: BLE001 - a graph that fails where the model runs computes something else
            got = None
        if got is not None and _same_outputs(got, want):
            _CHECKED.setdefault(model, set()).add(gm.code)  # the same graph traced again is not run again
            return False
        return _same_outputs(_tensors(_call_forward(model, example)), want)  # else random: not checked


#: Per model, the code of the graphs :func:`_graph_differs` found to compute what the model computes.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_forward(model: nn.Module, x: Inputs) -> object:
    """``model.forward`` on the inputs ``x`` (``**x`` for a dict), without the model's own hooks."""
    return model.forward(**x) if isinstance(x, Mapping) else model.forward(x)


@contextlib.contextmanager
def _inlined_hooks_detached(tracer: fx.Tracer, model: nn.Module) -> Iterator[None]:
    """Detach, for the block, the forward hooks of the submodules that ``tracer`` inlines (not leaves): fx would
    run them on proxies (see :func:`container_hooks`)."""
    saved = []
    for name, m in model.named_modules():
        if name and not tracer.is_leaf_module(m, name):
            for attr in FORWARD_HOOK_DICTS:
                d = getattr(m, attr, None)
                if d:
                    saved.append((d, dict(d)))
                    d.clear()
    try:
        yield
    finally:
        for d, content in saved:
            d.update(content)


def _trace_with(tracer: fx.Tracer, model: nn.Module, given: Sequence[str] | None) -> fx.GraphModule:
    # what forward() writes while traced (a cache of LeViT's attention biases) holds proxies
    with _inlined_hooks_detached(tracer, model), answering_is_tensor(tracer), _public_state_kept(model):
        graph = tracer.trace(model, concrete_args=_defaulted_arguments(model, given))
    return fx.GraphModule(model, graph)


@contextlib.contextmanager
def _public_state_kept(model: nn.Module) -> Iterator[None]:
    """Give every module its public attributes back after the block (see :func:`_public_state`): what a
    ``forward()`` run or traced inside it wrote there is forgotten."""
    state = [(m, _public_state(m)) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in state:
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                object.__setattr__(m, k, v)


def _public_state(m: nn.Module) -> dict[str, object]:
    """A module's public attributes (not its parameters, buffers or submodules), with dicts, lists and sets copied:
    what a ``forward()`` may write to while it is traced."""
    return {k: (copy.copy(v) if isinstance(v, dict | list | set) else v) for k, v in vars(m).items()
            if not k.startswith("_")}


def _unit_count(mod: nn.Module) -> int:
    return _conv.out_units(mod)


def _plain_forward(mod: nn.Module, in_shape: tuple[int, ...] | None = None) -> str | None:
    """Why a subclass's own ``forward`` is not the plain layer of its ``.weight`` (e.g. a weight-standardised
    convolution), checked on a random probe of the input shape the model gives it (``in_shape``, read when tracing;
    else ``(2, F)`` then ``(2, 3, F)`` for a Linear), or ``None`` (no override, or one that computes the same)."""
    base = _conv.base_class(mod)
    if type(mod).forward is base.forward:
        return None
    w = mod.weight
    g = torch.Generator().manual_seed(0)
    if in_shape is not None and len(in_shape) >= 2:
        probes = [torch.randn(min(2, in_shape[0]) or 1, *in_shape[1:], generator=g)]
    elif base is nn.Linear:  # (N, F) first; an override may need the (N, T, F) of a sequence model
        probes = [torch.randn(2, mod.in_features, generator=g), torch.randn(2, 3, mod.in_features, generator=g)]
    else:
        side = [(k - 1) * d + 1 + 2 for k, d in zip(mod.kernel_size, mod.dilation, strict=True)]
        probes = [torch.randn(1, mod.in_channels, *side, generator=g)]
    failure = None
    with torch.no_grad():
        for x in probes:
            x = x.to(w)
            want = base.forward(mod, x)  # the plain layer, with the module's own padding mode
            try:
                got = type(mod).forward(mod, x)
                break
            except Exception as exc:  # noqa: BLE001 - the override cannot be checked: do not prune it blindly
                failure = failure or (x, exc)
        else:
            x, exc = failure
            tried = " and ".join(str(tuple(p.shape)) for p in probes)
            return (f"{type(mod).__name__} overrides {base.__name__}.forward, which failed on probe inputs of "
                    f"shape {tried} ({type(exc).__name__}: {exc}), so it cannot be checked to compute the "
                    "plain layer of its .weight that pruning shrinks and refits")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(
            got, want, rtol=1e-4, atol=1e-5 * (1.0 + float(want.abs().max()))):
        return (f"{type(mod).__name__} overrides {base.__name__}.forward and computes something else than the "
                "plain layer of its .weight (e.g. a weight-standardised convolution), which pruning would shrink and "
                "refit as if it were")
    return None


def _weight_ok(mod: nn.Module, in_shape: tuple[int, ...] | None = None) -> str | None:
    """Why the ``.weight`` of a Linear or a convolution cannot be sliced and refitted as the layer's weight, or
    ``None``: a parametrized weight, or a subclass whose ``forward`` computes something else."""
    if parametrize.is_parametrized(mod) or hasattr(mod, "weight_g"):
        return ("its weight is parametrized (weight_norm / spectral_norm), which is not supported; remove the "
                "parametrization before pruning (torch.nn.utils.parametrize.remove_parametrizations)")
    return _plain_forward(mod, in_shape)


#: Why a grouped transposed convolution is refused everywhere (producer, consumer, between them).
_GROUPED_TRANSPOSED = ("grouped transposed convolution (groups={groups}) is not supported: a transposed convolution "
                       "is pruned with groups=1 only")


def _is_depthwise(conv: nn.Module) -> bool:
    """Whether a convolution is depthwise (one group per input channel, any channel multiplier)."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def _channelwise_conv(producer: nn.Module, conv: nn.Module, n_units: int,
                      in_shape: tuple[int, ...] | None = None) -> str | None:
    """Why a grouped convolution between ``producer`` and its consumer does not filter each of the producer's
    ``n_units`` channels on its own into the same channel, or ``None`` (a depthwise convolution with channel
    multiplier 1 of the producer's rank, which can lose channels like a BatchNorm)."""
    if _conv.is_transposed(conv):
        return _GROUPED_TRANSPOSED.format(groups=conv.groups)
    if not _is_depthwise(conv):
        return (f"grouped convolution (groups={conv.groups}, in_channels={conv.in_channels}) mixes the channels of "
                "each group; only a depthwise convolution (groups = in_channels = out_channels) can lie between a "
                "producer and its consumer")
    if conv.out_channels != conv.in_channels:
        return (f"depthwise convolution with channel multiplier {conv.out_channels // conv.in_channels} "
                f"({conv.in_channels} -> {conv.out_channels} channels) is not supported: each input channel feeds "
                "several output channels; only multiplier 1 (out_channels = in_channels) is")
    if not _conv.is_conv(producer):
        return (f"a depthwise {_conv.base_class(conv).__name__} after a {type(producer).__name__} producer (reshaped "
                "into channels or not) is not supported: a depthwise convolution may lie only between a convolution "
                "producer and its consumer")
    if _conv.rank(producer) != _conv.rank(conv):
        return (f"a depthwise {_conv.base_class(conv).__name__} after a {_conv.base_class(producer).__name__} "
                "producer is not supported; it must have the producer convolution's rank")
    if conv.in_channels != n_units:
        return f"depthwise convolution has {conv.in_channels} channels, expected the producer's {n_units}"
    return _weight_ok(conv, in_shape)


def _layer_ok(mod: nn.Module, consumer: bool = True, in_shape: tuple[int, ...] | None = None) -> str | None:
    """Why a Linear or a convolution (transposed or not) cannot be a producer (``consumer=False``) or a consumer,
    or ``None``.

    A producer only loses output units, so its padding does not matter; a consumer's input is unfolded with
    explicit zero padding, and neither may be grouped (a depthwise convolution can only lie between them, see
    :func:`_channelwise_conv`; a transposed convolution needs ``groups=1`` everywhere) or have a parametrized
    (weight-normalised) weight.
    """
    if (why := _weight_ok(mod, in_shape)) is not None:
        return why
    if not _conv.is_conv(mod):
        return None
    if _conv.is_transposed(mod) and mod.groups != 1:
        return _GROUPED_TRANSPOSED.format(groups=mod.groups)
    if _is_depthwise(mod):
        return (f"a depthwise convolution (groups={mod.groups}) is not supported as a "
                f"{'consumer' if consumer else 'producer'}: its input channels are its output channels. Its channels "
                "are pruned with those of the convolution that feeds it, when that one is a prunable producer")
    if mod.groups != 1:
        return f"grouped convolution (groups={mod.groups}) is not supported"
    if not consumer:
        return None
    if mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(mod.padding, str) and mod.padding != "valid":  # "valid" is padding 0
        return f"padding={mod.padding!r} is not supported; pass explicit integer padding"
    return None


def find_pairs(model: nn.Module, example_input: Inputs) -> tuple[list[PrunablePair], list[tuple[str, str]]]:
    """Find the prunable pairs of a traceable model.

    Parameters
    ----------
    model : torch.nn.Module
        The network (not modified; a traced copy is used).
    example_input : torch.Tensor or dict
        A small batch of inputs, used to read activation shapes: a tensor, for ``model(example_input)``, or a dict
        of keyword inputs for ``model(**example_input)`` (a model with several inputs, a diffusion U-Net's
        ``forward(x, t)``). The graph's inputs are matched to the dict's keys by name; an input not given keeps its
        default, and one without a default is a ``ValueError`` that names it.

    Returns
    -------
    pairs : list of PrunablePair
        In the order their consumers run.
    skipped : list of (str, str)
        ``(module name, reason)`` for every Linear or convolution (transposed or not) that is not a prunable
        producer (a depthwise convolution pruned with the producer that feeds it is not listed).

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from nn_adapters import find_pairs
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> pairs, skipped = find_pairs(net, torch.zeros(2, 4))
    >>> [(p.name, p.kind, p.n_units) for p in pairs]
    [('0->2', 'linear->linear', 8)]
    >>> skipped
    [('2', 'its output is the network output')]
    """
    gm = trace(model, list(example_input) if isinstance(example_input, Mapping) else None, example_input)
    args = graph_arguments(gm, model, example_input)
    try:
        # ShapeProp prints its own traceback before raising; the error below says it in one line
        with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise _input_error(example_input, exc) from exc
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    pairs: list[PrunablePair] = []
    skipped: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if not isinstance(mod, _conv.LAYER_TYPES):
            continue
        result = _follow(node, mod, modules, calls)
        if isinstance(result, str):
            if (node.target, result) not in skipped:  # a shared module's calls all give the same reason
                skipped.append((node.target, result))
        else:
            pairs.append(result)
    owners = _parameter_owners(model)
    for p in list(pairs):
        if (why := _tied(owners, modules, (*p.producers, p.consumer, *p.between, *p.se, *p.conditioning))) is not None:
            pairs.remove(p)
            skipped.append((p.producer, why))
    # a layer's rows follow one pair's units: a conditioning Linear that is a pair's producer itself (the other term
    # of P(x) + E(c) between two Linear layers) goes with the pair whose producer runs first
    owner: dict[str, str] = {}
    for p in list(pairs):
        clash = next((nm for nm in (*p.producers, *p.conditioning) if nm in owner), None)
        if clash is not None:
            pairs.remove(p)
            skipped.append((p.producer, f"the output rows of {clash!r} already follow the units of pair "
                            f"{owner[clash]} (a conditioning term of its way)"))
            continue
        owner.update(dict.fromkeys((*p.producers, *p.conditioning), p.name))
    # one pruned operand per concatenation: the others' channels are the fixed columns of the first one's refit
    first: dict[str, PrunablePair] = {}
    for p in sorted(pairs, key=lambda p: p.offset):
        if p.consumer in first:
            pairs.remove(p)
            skipped.append((p.producer, f"another operand of the concatenation feeding {p.consumer!r} is pruned "
                            f"({first[p.consumer].producer!r}, whose units are selected with this one's channels "
                            "fixed); one operand per concatenation is pruned"))
        else:
            first[p.consumer] = p
    # a depthwise convolution pruned with its producer, an SE's fc2 (its rows follow the gated channels) and a
    # conditioning Linear (its rows follow the conditioned channels)
    pruned_between = {b for p in pairs for b in (*p.between, *p.se[1:], *p.conditioning)}
    skipped = [(name, why) for name, why in skipped if name not in pruned_between]
    # the second producer of gated units is pruned with the first (the pair is named after the first factor's)
    partners = {p.gated_with: p.producer for p in pairs if p.gated_with is not None}
    skipped = [(name, f"pruned with {partners[name]!r} (gated units)" if name in partners else why)
               for name, why in skipped]
    pairs.sort(key=lambda p: order[next(n for n in gm.graph.nodes if n.name == p.consumer_node)])
    return pairs, skipped


def second_inputs(gm: fx.GraphModule, model: nn.Module) -> str | None:
    """Why a traced model cannot be pruned from one tensor per calibration batch, or ``None``: its ``forward()``
    takes inputs besides the first that have no default (a diffusion U-Net's ``(x, t)``). Pruning calls
    ``model(inputs)`` for a tensor batch, and a batch's second element is its label, so the message says to pass
    dicts of keyword inputs."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    if len(names) < 2:
        return None
    example = ", ".join(f"{n!r}: {n}" for n in names)
    return (f"{type(model).__name__}.forward() takes {len(names)} inputs ({', '.join(names)}); a tensor batch is "
            "passed as model(inputs), one input (a batch's second element is its label, read by method='actgrad' "
            "only). Pass each batch as a dict of keyword inputs, called as model(**batch): "
            f"[{{{example}}}, ...], or ({{...}}, labels) pairs for method='actgrad' (see 'Models with several "
            "inputs' in the docs).")


def graph_arguments(gm: fx.GraphModule, model: nn.Module, inputs: Inputs) -> list:
    """The value of every input (placeholder) of the traced ``gm`` for one batch, in order: for a tensor batch the
    tensor, then the defaults of the inputs traced as constants; for a dict batch the value of each input by name,
    or its default. An input without either is a ``ValueError`` that names it."""
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if isinstance(inputs, Mapping) and node.target in inputs:
            out.append(inputs[node.target])
        elif not isinstance(inputs, Mapping) and i == 0:
            out.append(inputs)
        elif node.args:
            out.append(node.args[0])
        elif isinstance(inputs, Mapping):
            raise ValueError(f"{type(model).__name__}.forward() takes the input {node.target!r}, which the "
                             f"calibration batches (keys {list(inputs)}) do not give and has no default; add it to "
                             "every batch.")
        else:
            raise ValueError(second_inputs(gm, model))
    return out


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """The modules that hold each parameter directly (several for tied weights), by the parameter's ``id``."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for prm in m.parameters(recurse=False):
            owners.setdefault(id(prm), []).append(name)
    return owners


def _tied(owners: dict[int, list[str]], modules: dict[str, nn.Module], names: Sequence[str]) -> str | None:
    """Why a pair whose modules are ``names`` cannot be pruned because one of them shares a parameter with another
    module (tied weights: pruning replaces the parameter in one module only), or ``None``."""
    for nm in names:
        for prm in modules[nm].parameters(recurse=False):
            others = [o for o in owners.get(id(prm), []) if o != nm]
            if others:
                return (f"{nm!r} shares a parameter with {others[0]!r} (tied weights), which pruning would untie; "
                        "leave the tie out of pruning, or tie the layers again after pruning")
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _input_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a module call's first input, as seen when tracing."""
    arg = node.args[0] if node.args else None
    return _shape(arg) if isinstance(arg, fx.Node) else None


_SHAPE_OF_METHODS = {"reshape_as", "view_as"}


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the tensor's values (metadata reads such as ``x.size(0)`` or ``x.ndim`` do not, nor
    does ``y.reshape_as(x)``, which reads only the shape of ``x``)."""
    return [u for u in node.users if not metadata_read(u) and not _shape_source(u, node)]


def _shape_source(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node`` only as the shape of a reshape: ``y.reshape_as(node)``."""
    return (user.op == "call_method" and user.target in _SHAPE_OF_METHODS and len(user.args) == 2
            and user.args[0] is not node and user.args[1] is node and not user.kwargs)


def _merges_leading_dims(cur: fx.Node, node: fx.Node, n_units: int, path: set[fx.Node]) -> bool:
    """Whether ``node`` reshapes a Linear's output ``(..., C)`` only in its leading dims, the units staying the
    last dim: ``x.flatten(0, 1)`` to ``(N * T, C)`` around a ``BatchNorm1d`` (LeViT's MLP layers), and back with
    ``x.reshape_as(h)`` of a tensor ``h`` on the way, ``x.view(n, t, -1)`` or ``x.reshape(-1, x.size(-1))`` (the
    size of the last dim not written as a number, which pruning changes)."""
    s_in, s_out = _shape(cur), _shape(node)
    if s_in is None or s_out is None or len(s_out) < 2 or s_in[-1] != n_units or s_out[-1] != n_units:
        return False
    if node.op == "call_method" and node.target in _SHAPE_OF_METHODS:
        return _shape_source(node, node.args[1]) and node.args[1] in path
    if node.op == "call_method" and node.target in ("view", "reshape"):
        last = _reshape_target(node)[-1] if len(_reshape_target(node)) else None
        return not (isinstance(last, int) and last != -1)
    if (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten):
        dims = [*node.args[1:], *(node.kwargs[k] for k in ("start_dim", "end_dim") if k in node.kwargs)]
        end = dims[1] if len(dims) > 1 else -1
        return isinstance(end, int) and end % len(s_in) < len(s_in) - 1
    return False


def _follow(node: fx.Node, producer: nn.Module, modules: dict[str, nn.Module],
            calls: dict[str, int]) -> PrunablePair | str:
    """Walk from a producer node to its consumer; return the pair or the reason it is not prunable."""
    if calls[node.target] > 1:
        return f"module is called {calls[node.target]} times (shared weights)"
    is_conv = _conv.is_conv(producer)
    if (why := _layer_ok(producer, consumer=False, in_shape=_input_shape(node))) is not None:
        return why
    n_units = _unit_count(producer)
    between: list[str] = []
    ops: list[str] = []
    flattened_hw: int | None = None
    se: tuple[str, ...] = ()
    se_input: str | None = None
    # the spatial rank of the path tensor (N, C, *spatial): the convolution producer's, or that of a Linear's
    # output once it is reshaped into channels (a linear->conv pair; see _channels_reshape)
    path_rank = _conv.rank(producer) if is_conv else None
    shaped: tuple[int, tuple[str, ...], str | None] | None = None  # (rows per unit, row_between, Unflatten module)
    group_size = 1  # channels per unit: C / G of the GroupNorms on the way (see _group_norm_reason)
    # after a concatenation (see _concat): (the producer's offset in it, the producer's channels, how many layers of
    # `between` lie before it); n_units is then the concatenation's channel count
    cat: tuple[int, int, int] | None = None
    terms: list[_Term] = []  # per-channel conditioning terms added to or multiplying the path (see _conditioning)
    gating: tuple[_GateStep, tuple[str, ...]] | None = None  # gated units (see _gate_step), with `between` before them
    path = {node}
    cur = node
    while True:
        path.add(cur)
        users = _value_users(cur)
        if not users:
            return "its output is not used"
        where = "its output" if cur is node else f"its output, after {' -> '.join(ops) or cur.name},"
        if len(users) > 1:
            if cat is not None:  # DenseNet's growing concatenation, a gate on joined channels, a branch
                return f"{where} feeds {len(users)} operations (a branch, a residual connection or a gate)"
            gate = _se_gate(cur, users, modules, calls, producer, n_units) if _conv.is_conv(producer) else None
            if gate is None:
                return f"{where} feeds {len(users)} operations (a branch, a residual connection or a gate)"
            if isinstance(gate, str):
                return f"{where} is multiplied by a gate computed from it that is not a squeeze-and-excitation: {gate}"
            if se:
                return f"{where} is multiplied by a second squeeze-and-excitation gate; one per pair is supported"
            if group_size > 1:
                return (f"{where} is multiplied by a squeeze-and-excitation gate after a GroupNorm: the gate's rows "
                        "follow single channels and the units are groups of channels, which is not supported")
            cur, se, se_input = gate[0], gate[1:], cur.name
            ops.append("squeeze-excitation")
            continue
        (u,) = users
        if u.op == "output":
            return "its output is the network output"
        if any(isinstance(a, (list, tuple)) and any(v is cur for v in a) for a in (*u.args, *u.kwargs.values())):
            if cat is not None:
                return (f"{where} is concatenated a second time ({u.name}); one concatenation between a producer "
                        "and its consumer is supported")
            if shaped is not None or se or group_size > 1:
                what = ("reshaped into channels" if shaped is not None else "gated by a squeeze-and-excitation"
                        if se else "normalised by a GroupNorm (units of several channels)")
                return (f"{where} is {what} and then concatenated with other tensors by {u.name}, which is not "
                        "supported (a concatenation is supported after a convolution or a Linear producer through "
                        "per-channel operations)")
            joined = _concat(cur, u, is_conv, flattened_hw, n_units)
            if isinstance(joined, str):
                return f"{where} {joined}"
            cat = (joined[0], n_units, len(between))
            n_units = joined[1]
            ops.append(getattr(u.target, "__name__", str(u.target)))
            cur = u
            continue
        # a product with another producer's output of the same shape is gated units (see _gate_step); a sum or a
        # product with anything else may hold a conditioning term (see _conditioning)
        gates = _multiplies_a_producer(cur, u, modules, calls, producer, n_units)
        term = None if gates else _conditioning(cur, u, node, path, modules, calls, n_units, is_conv,
                                                (cat is not None, shaped is not None, bool(se)))
        gated = None if term is not None else _gate_step(where, cur, u, modules, calls, producer, n_units, path)
        if isinstance(term, str):
            return f"{where} {term}"
        if term is not None:
            terms.append(term)
            ops.append(f"{term.op} conditioning ({term.layer})")
            cur = u
            continue
        if isinstance(gated, str):
            return gated
        if gated is not None:
            if (why := _gate_state_reason(u, gating is not None, flattened_hw is not None, shaped is not None,
                                          group_size, bool(se), cat is not None)) is not None:
                return f"{where} {why}"
            gating = (gated, tuple(between))
            between += gated.layers
            ops += gated.ops
            n_units = gated.n_units
            path |= gated.nodes
            cur = gated.out
            continue
        is_sum = _term_op(u) == "add"
        name = getattr(u.target, "__name__", str(u.target)) if u.op == "call_function" else f".{u.target}()"
        if _shifted_by_number(u, cur, is_conv):  # h + 1, 1 - h: element by element
            ops.append(name)
            cur = u
            continue
        if is_sum and len(u.args) > 1 and u.args[0] is not cur and any(a is cur for a in u.args[1:]):
            # x + h, x.add(h): the producer's output is the second term of a residual sum (the first, h + x, is
            # found below)
            return f"{where} feeds {name} (a residual sum) as its second term"
        if (is_sum and u.op == "call_method" and u.args[0] is cur
                and any(isinstance(a, fx.Node) for a in (*u.args[1:], *u.kwargs.values()))):
            return f"{where} feeds {name} (a residual sum)"  # h.add(x) (h.add(1.0) is a shift, above)
        if not u.args or (u.args[0] is not cur and not (u.op == "call_function" and u.target in _SCALE_FUNCTIONS
                                                          and _scaled_by_number(u, cur, is_conv))):
            return f"operation {u.name} does not take the producer's output as its first argument"
        if u.op == "call_module":
            m = modules[u.target]
            stateless = next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None
            if calls[u.target] > 1 and not stateless:  # a reused pooling or activation module is fine
                return f"module {u.target!r} on the way is called several times (shared weights)"
            if isinstance(m, _conv.LAYER_TYPES) and not (_conv.is_conv(m) and m.groups > 1):
                return _with_conditioning(_make_pair(node, producer, u, m, between, ops, flattened_hw, n_units, se,
                                                     se_input, shaped, group_size, cat, gating), terms)
            if isinstance(m, _conv.LAYER_TYPES):
                if (why := _channelwise_conv(producer, m, n_units, _input_shape(u))) is not None:
                    return f"{type(m).__name__} {u.target!r} between producer and consumer: {why}"
                if (shape := _shape(cur)) is not None and len(shape) != _conv.rank(m) + 2:
                    return (f"depthwise {type(m).__name__} {u.target!r} reads a {len(shape)}-D tensor {shape}, not "
                            f"{_conv.layout(m)}: it does not filter the producer's channels one by one")
                between.append(u.target)
            elif isinstance(m, _BN_MODULES):
                if m.num_features != n_units:
                    return f"BatchNorm {u.target!r} has {m.num_features} features, expected {n_units}"
                shape = _shape(cur)
                if not is_conv and shape is not None and len(shape) != 2:
                    # BatchNorm normalises dim 1; a Linear's units are the last dim of (N, T, F)
                    return (f"BatchNorm {u.target!r} normalises dim 1 of a {len(shape)}-D tensor {shape}, not the "
                            f"producer's units (its last dim)")
                between.append(u.target)
            elif isinstance(m, _INSTANCE_NORMS):
                if (why := _instance_norm_reason(cur, u.target, m, path_rank, n_units)) is not None:
                    return why
                between.append(u.target)
            elif isinstance(m, nn.GroupNorm) and cat is not None:
                return (f"GroupNorm({m.num_groups}, {m.num_channels}) {u.target!r} after the concatenation "
                        f"normalises groups of the joined channels, which removing some of the producer's channels "
                        "would change: not supported (a GroupNorm before the concatenation, on the producer's own "
                        "channels, is)")
            elif isinstance(m, nn.GroupNorm):
                if (why := _group_norm_reason(cur, u.target, m, path_rank, shaped is not None, n_units, group_size,
                                              bool(se), flattened_hw == 1)) is not None:
                    return why
                group_size = m.num_channels // m.num_groups
                between.append(u.target)
            elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
                return (f"per-channel PReLU {u.target!r} (num_parameters={m.num_parameters}) between producer and "
                        "consumer is not supported; use nn.PReLU() with one shared parameter, or another activation")
            elif is_conv and isinstance(m, _POOL_MODULES) and (why := _pool_rank_mismatch(cur, u.target, m)):
                return why
            elif isinstance(m, _RESAMPLE_MODULES):
                if (why := _resample_reason(cur, repr(u.target), path_rank)) is not None:
                    return why
            elif isinstance(m, _PAD_MODULES):
                if (why := _pad_reason(cur, u, repr(u.target), path_rank)) is not None:
                    return why
            elif isinstance(m, _ELEMENTWISE_MODULES) or (is_conv and isinstance(m, _POOL_MODULES)):
                pass
            elif isinstance(m, nn.Flatten):
                flat = _flatten_hw(cur, u, n_units)
                if isinstance(flat, str):
                    return flat
                flattened_hw = _after_flatten(flattened_hw, flat)
            elif isinstance(m, nn.Unflatten) and not is_conv:
                reshaped = _channels_reshape(cur, u, n_units, path, m, calls[u.target])
                if isinstance(reshaped, str):
                    return reshaped
                shaped, n_units = (n_units // reshaped, tuple(between), u.target), reshaped
                is_conv, path_rank, flattened_hw = True, len(_shape(u)) - 2, None
            else:
                return f"unsupported module {type(m).__name__} ({u.target!r}) between producer and consumer"
            ops.append(type(m).__name__)
        elif u.op in ("call_function", "call_method"):
            is_function = u.op == "call_function"
            name = getattr(u.target, "__name__", str(u.target)) if is_function else u.target
            if is_function and u.target in _SCALE_FUNCTIONS and _scaled_by_number(u, cur, is_conv):
                ops.append(name)  # x * c, c * x, x / c with a number c: unit by unit
                cur = u
                continue
            if u.target in (_CLAMP_FUNCTIONS if is_function else _CLAMP_METHODS):
                if u.args[0] is not cur or any(isinstance(a, fx.Node) for a in (*u.args[1:], *u.kwargs.values())):
                    return (f"{name} with tensor bounds after the producer: only number bounds (e.g. "
                            "x.clamp(0, 6)) act on each unit separately")
                ops.append(name)
                cur = u
                continue
            if is_function and u.target in _RESIDUAL_FUNCTIONS:
                if u.target is operator.mul:
                    return _product_reason(u, cur, name)
                return f"{where} feeds {name} (a residual sum)"
            if u.target in (_REDUCE_FUNCTIONS if is_function else _REDUCE_METHODS):
                reduced = _position_reduction(cur, u, is_conv, n_units, name)
                if isinstance(reduced, str):
                    return reduced
                if reduced and flattened_hw is None:  # (N, C, ...) reduced to (N, C): a channel is one column
                    flattened_hw = 1
            elif (not is_conv and shaped is None and flattened_hw is None and cat is None and not se
                  and _merges_leading_dims(cur, u, n_units, path)):
                pass  # the units stay the last dim: tokens merged into (or split from) the batch dim
            elif (not is_conv and shaped is None and flattened_hw is None and cat is None and gating is None
                  and group_size == 1 and _swaps_last_two(cur, u)):
                segment = _channels_first_segment(cur, u, modules, calls, n_units)
                if isinstance(segment, str):
                    return f"{where} {segment}"
                cur, more, names, visited = segment
                between += more
                ops += names
                path |= visited
                continue
            elif not is_conv and _is_unflatten(cur, u):
                reshaped = _channels_reshape(cur, u, n_units, path)
                if isinstance(reshaped, str):
                    return reshaped
                shaped, n_units = (n_units // reshaped, tuple(between), None), reshaped
                is_conv, path_rank, flattened_hw = True, len(_shape(u)) - 2, None
            elif u.target in (_FLATTEN_FUNCTIONS if is_function else _FLATTEN_METHODS):
                if not is_function and u.target in ("view", "reshape") and (why := _fixed_size_reshape(u)):
                    return why
                flat = _flatten_hw(cur, u, n_units)
                if isinstance(flat, str):
                    return flat
                flattened_hw = _after_flatten(flattened_hw, flat)
            elif is_function and u.target in _RESAMPLE_FUNCTIONS:
                if (why := _resample_reason(cur, name, path_rank)) is not None:
                    return why
            elif is_function and u.target in _PAD_FUNCTIONS:
                if (why := _pad_reason(cur, u, name, path_rank)) is not None:
                    return why
            elif is_function and u.target in _GROUP_NORM_FUNCTIONS:
                return _functional_group_norm_reason(u, name)
            elif u.target not in (_ELEMENTWISE_FUNCTIONS if is_function else _ELEMENTWISE_METHODS):
                what = f"operation {name}" if is_function else f"method .{name}()"
                return f"unsupported {what} after the producer"
            elif is_function and u.target in _POOL_FUNCTIONS and not is_conv:
                # a Linear's units are the last dim, which pooling of an (N, T, F) tensor mixes
                return f"pooling {name} after a Linear producer pools across its units"
            elif is_function and u.target in _POOL_FUNCTIONS and (why := _pool_rank_mismatch(cur, name, u.target)):
                return why
            ops.append(name)
        else:
            return f"unsupported graph node {u.op} after the producer"
        cur = u


_SWAP_METHODS = {"transpose", "permute", "swapaxes"}
_SWAP_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes}


def _swaps_last_two(cur: fx.Node, node: fx.Node) -> bool:
    """Whether ``node`` swaps the last two dims of the 3-D path tensor ``cur`` and nothing else: ``x.transpose(1,
    2)``, ``x.transpose(-1, -2)``, ``x.permute(0, 2, 1)``, ``torch.transpose(x, 1, 2)``..."""
    if not ((node.op == "call_method" and node.target in _SWAP_METHODS)
            or (node.op == "call_function" and node.target in _SWAP_FUNCTIONS)):
        return False
    if not node.args or node.args[0] is not cur or node.kwargs:
        return False
    shape = _shape(cur)
    if shape is None or len(shape) != 3:
        return False
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return False
    dims = tuple(d % 3 for d in dims)
    target = node.target if node.op == "call_method" else node.target.__name__
    if target == "permute":
        return dims == (0, 2, 1)
    return len(dims) == 2 and set(dims) == {1, 2}


def _channels_first_segment(cur: fx.Node, swap: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                            n_units: int) -> tuple[fx.Node, list[str], list[str], set[fx.Node]] | str:
    """A Linear producer's units moved to dim 1 and back: ``(N, T, C)`` transposed to ``(N, C, T)``, maybe viewed as
    an image ``(N, C, *spatial)`` and filtered channel by channel (a depthwise convolution, a BatchNorm,
    activations), flattened back to ``(N, C, T')`` and transposed to ``(N, T', C)``: the Mix-FFN of SegFormer and
    the convolutional FFN of PVTv2, ``fc2(act(dwconv(fc1(x).transpose(1, 2).view(B, C, H, W)).flatten(2)
    .transpose(1, 2)))``. Returns the transpose back (where the walk goes on with the units last again), the layers
    to prune with the units, the operations' names and the nodes visited, or why the segment does not keep each
    unit in its own channel."""
    node, between, ops, seen = swap, [], ["transpose"], {swap}
    while True:
        users = _value_users(node)
        if len(users) != 1:
            return (f"its output, moved to channels first by {swap.name}, feeds {len(users)} operations; a single "
                    "chain back to the units last is supported")
        (u,) = users
        seen.add(u)
        shape, before = _shape(u), _shape(node)
        label = f"{u.target}" if u.op != "call_module" else f"{type(modules[u.target]).__name__} {u.target!r}"
        if not u.args or u.args[0] is not node:
            return f"operation {u.name} does not take the channels-first tensor as its first argument"
        if _swaps_last_two(node, u):
            return u, between, ops + ["transpose"], seen
        if u.op != "call_module" and (shape is None or before is None or shape[:2] != before[:2]):
            return (f"{label} ({u.name}) changes the batch or channel dim of the channels-first tensor {before}; "
                    "only the positions may be reshaped")
        if u.op == "call_method" and u.target in ("view", "reshape", "flatten"):
            if u.target != "flatten":
                target = _reshape_target(u)
                if len(target) < 2 or isinstance(target[1], int) and target[1] != -1:
                    return (f"x.{u.target}{tuple(target)} hard-codes the channel count, which changes when units "
                            f"are removed; read it from the tensor (x.{u.target}(B, x.size(1), H, W))")
            elif (u.args[1:] or [u.kwargs.get("start_dim", 0)])[0] not in (2, -1 if len(before) == 3 else 2):
                return f"x.flatten{tuple(u.args[1:])} merges the channel dim with others"
            ops.append(u.target)
        elif u.op == "call_function" and u.target in (torch.flatten, torch.reshape):
            return f"{u.target.__name__} on the channels-first tensor: write it as a method (x.flatten(2))"
        elif u.op == "call_module":
            m = modules[u.target]
            if calls[u.target] > 1 and (next(iter(m.parameters()), None) is not None):
                return f"module {u.target!r} on the way is called several times (shared weights)"
            if _conv.is_conv(m):
                if _conv.is_transposed(m) or not _is_depthwise(m) or m.out_channels != m.in_channels:
                    return (f"{type(m).__name__} {u.target!r} on the channels-first tensor is not a depthwise "
                            "convolution with channel multiplier 1: it mixes the units' channels")
                if before is None or m.in_channels != n_units or _conv.rank(m) != len(before) - 2:
                    return (f"depthwise {type(m).__name__} {u.target!r} reads {before}, not the producer's "
                            f"{n_units} channels at its own rank")
                if (why := _weight_ok(m, before)) is not None:
                    return why
                between.append(u.target)
            elif isinstance(m, _BN_MODULES) and m.num_features == n_units:
                between.append(u.target)
            elif not isinstance(m, _ELEMENTWISE_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters > 1):
                return f"unsupported module {label} on the channels-first tensor"
            ops.append(type(m).__name__)
        elif u.op == "call_function" and u.target in _ELEMENTWISE_FUNCTIONS and _numbers_only(u):
            ops.append(u.target.__name__)
        elif u.op == "call_method" and u.target in _ELEMENTWISE_METHODS and _numbers_only(u):
            ops.append(u.target)
        else:
            return f"unsupported operation {label} ({u.name}) on the channels-first tensor"
        node = u


_PRODUCT_FUNCTIONS = {operator.mul, torch.mul}
_SIGMOID_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_SIGMOID_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}
_GATE_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_ADAPTIVE_AVG_POOLS = {1: (nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d),
                       2: (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)}


def _is_product(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS)
            or (node.op == "call_method" and node.target == "mul")) and len(node.args) == 2 and not node.kwargs


def _ancestors(node: fx.Node, limit: int = 500) -> set[fx.Node]:
    """The nodes ``node`` is computed from (up to ``limit`` of them)."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo and len(seen) < limit:
        a = todo.pop()
        if a not in seen:
            seen.add(a)
            todo.extend(a.all_input_nodes)
    return seen


def _product_reason(mul: fx.Node, cur: fx.Node, name: str) -> str:
    """Why a product of the path tensor ``cur`` with another tensor is not prunable, naming the other factor."""
    other = mul.args[1] if mul.args[0] is cur else mul.args[0]
    if not isinstance(other, fx.Node) or other.op == "get_attr":
        return f"its output feeds {name} (a product with a tensor)"
    if other in _ancestors(cur):  # cur is itself a gate: an SE's fc2, whose rows go with the channels it gates
        return (f"its output feeds {name} (a product with a tensor): it is the gate that multiplies {other.name}, "
                "not a path to a consumer")
    return (f"its output feeds {name}, a product with a gate ({other.name}) computed from another tensor; the "
            "products supported are a squeeze-and-excitation gate computed from the producer's own channels, gated "
            "units (another Linear's or convolution's output of the same shape) and a per-channel conditioning term "
            "computed by a Linear from another input")


# Gated units (see the module docstring): the consumer reads the elementwise product of two factors whose unit i
# comes from output row i of two producers, or from rows i and H + i of one producer split in two halves (a GLU).
_SPLIT_METHODS = {"chunk", "split"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split}
_GLU_FUNCTIONS = {F.glu}


@dataclass(frozen=True)
class _GateStep:
    """A gated product recognised on a pair's path: the walk goes on from ``out`` (the product) with ``n_units``
    units; ``layers`` are the per-unit layers on the factors' paths (they join ``between``), ``ops`` their names
    and the product's, ``nodes`` the nodes visited; ``partner`` is the second producer, or ``chunked`` is set."""

    out: fx.Node
    n_units: int
    layers: tuple[str, ...]
    ops: tuple[str, ...]
    nodes: frozenset
    partner: str | None = None
    chunked: bool = False


def _node_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "call_method":
        return f".{node.target}() ({node.name})"
    return f"{getattr(node.target, '__name__', node.target)} ({node.name})"


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The name of an operation in a pair's ``ops``: a module's class name, a function's or method's name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _numbers_only(node: fx.Node) -> bool:
    return not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values()))


def _unit_op(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
             producer: nn.Module, n_units: int) -> tuple[str | None, str] | str:
    """Check that ``node`` acts on each of the ``n_units`` units of the factor tensor ``prev`` on its own (one of
    the per-unit operations of a pair's way: an activation, dropout, clamping to numbers, scaling by a number, a
    BatchNorm, InstanceNorm or depthwise convolution, pooling, resampling or padding of a convolution's
    positions), for a factor of a gated product. Returns ``(the layer to prune with the units or None, the
    operation's name)``, or the reason it does not."""
    is_conv = _conv.is_conv(producer)
    rank = _conv.rank(producer) if is_conv else None
    label = _node_label(node, modules)
    if node.op == "call_function" and node.target in _SCALE_FUNCTIONS and _scaled_by_number(node, prev, is_conv):
        return None, _op_name(node, modules)
    if not node.args or node.args[0] is not prev:
        return f"{label} does not take the factor's tensor as its first argument"
    if node.op == "call_module":
        m = modules[node.target]
        stateless = next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None
        if calls[node.target] > 1 and not stateless:
            return f"module {node.target!r} is called several times (shared weights)"
        why, layer = None, None
        if isinstance(m, _conv.LAYER_TYPES):  # a depthwise convolution (a plain layer is the factor's producer)
            why = _channelwise_conv(producer, m, n_units, _input_shape(node))
            if why is None and (shape := _shape(prev)) is not None and len(shape) != _conv.rank(m) + 2:
                why = f"it reads a {len(shape)}-D tensor {shape}, not {_conv.layout(m)}"
            why, layer = (f"{label}: {why}" if why else None), node.target
        elif isinstance(m, _BN_MODULES):
            shape = _shape(prev)
            if m.num_features != n_units:
                why = f"BatchNorm {node.target!r} has {m.num_features} features, expected {n_units}"
            elif not is_conv and shape is not None and len(shape) != 2:
                why = f"BatchNorm {node.target!r} normalises dim 1 of a {len(shape)}-D tensor {shape}, not the units"
            layer = node.target
        elif isinstance(m, _INSTANCE_NORMS):
            why, layer = _instance_norm_reason(prev, node.target, m, rank, n_units), node.target
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            why = f"per-channel PReLU {node.target!r} (num_parameters={m.num_parameters}) is not supported"
        elif isinstance(m, _POOL_MODULES):
            why = (f"pooling {node.target!r} after a Linear producer pools across its units" if not is_conv
                   else _pool_rank_mismatch(prev, node.target, m))
        elif isinstance(m, _RESAMPLE_MODULES):
            why = _resample_reason(prev, repr(node.target), rank)
        elif isinstance(m, _PAD_MODULES):
            why = _pad_reason(prev, node, repr(node.target), rank)
        elif not isinstance(m, _ELEMENTWISE_MODULES):
            why = f"unsupported module {type(m).__name__} ({node.target!r})"
        return why if why is not None else (layer, type(m).__name__)
    name = _op_name(node, modules)
    if node.op == "call_function":
        t = node.target
        if t in _CLAMP_FUNCTIONS:
            why = None if _numbers_only(node) else f"{name} with tensor bounds"
        elif t in _POOL_FUNCTIONS:
            why = (f"pooling {name} after a Linear producer pools across its units" if not is_conv
                   else _pool_rank_mismatch(prev, name, t))
        elif t in _RESAMPLE_FUNCTIONS:
            why = _resample_reason(prev, name, rank)
        elif t in _PAD_FUNCTIONS:
            why = _pad_reason(prev, node, name, rank)
        else:
            why = None if t in _ELEMENTWISE_FUNCTIONS else f"unsupported operation {label}"
    elif node.op == "call_method":
        if node.target in _CLAMP_METHODS:
            why = None if _numbers_only(node) else f"{label} with tensor bounds"
        else:
            why = None if node.target in _ELEMENTWISE_METHODS else f"unsupported method {label}"
    else:
        why = f"unsupported graph node {node.op} ({node.name})"
    return why if why is not None else (None, name)


def _factor_input(node: fx.Node, is_conv: bool) -> fx.Node | None:
    """The tensor a per-unit operation reads: its first argument, or the tensor of a product with a number."""
    if node.op == "call_function" and node.target in _SCALE_FUNCTIONS and len(node.args) == 2:
        a, b = node.args
        if isinstance(b, fx.Node) and not isinstance(a, fx.Node) or (
                isinstance(a, fx.Node) and isinstance(b, fx.Node) and _is_number(a, is_conv)):
            return b
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _factor_producer(factor: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], producer: nn.Module,
                     n_units: int) -> tuple[fx.Node, tuple[str, ...], tuple[str, ...], frozenset] | str:
    """Walk back from the factor tensor ``factor`` of a product, through per-unit operations used only on the way
    (:func:`_unit_op`), to the ``Linear`` or convolution that produces it. Returns ``(its node, the per-unit layers,
    the operations' names, the nodes of the path)`` in forward order, or the reason it is not such a path."""
    is_conv = _conv.is_conv(producer)
    node, layers, ops, nodes = factor, [], [], set()
    while True:
        users = _value_users(node)
        if len(users) != 1:
            return (f"{node.name} on its path also feeds {len(users) - 1} other operation(s); a factor of gated units "
                    "must be used only on its way to the product")
        nodes.add(node)
        if node.op == "call_module" and isinstance(modules[node.target], _conv.LAYER_TYPES) and not (
                _conv.is_conv(modules[node.target]) and modules[node.target].groups > 1):
            return node, tuple(reversed(layers)), tuple(reversed(ops)), frozenset(nodes)
        prev = _factor_input(node, is_conv)
        if prev is None or node.op not in ("call_module", "call_function", "call_method"):
            return f"it is {_node_label(node, modules) if node.op != 'placeholder' else 'the input ' + node.name}"
        step = _unit_op(node, prev, modules, calls, producer, n_units)
        if isinstance(step, str):
            return step
        if step[0] is not None:
            layers.append(step[0])
        ops.append(step[1])
        node = prev


def _partner_reason(node: fx.Node, partner: nn.Module, calls: dict[str, int], producer: nn.Module,
                    n_units: int, product: fx.Node) -> str | None:
    """Why the layer ``partner`` (node ``node``) cannot give the other factor of gated units with ``producer``'s
    ``n_units`` units in the product ``product``, or ``None``."""
    what = f"{type(partner).__name__} {node.target!r}"
    if calls[node.target] > 1:
        return f"{what} is called {calls[node.target]} times (shared weights)"
    if (why := _layer_ok(partner, consumer=False, in_shape=_input_shape(node))) is not None:
        return f"{what}: {why}"
    if _conv.base_class(partner) is not _conv.base_class(producer):
        return (f"{what} is not a {_conv.base_class(producer).__name__} like the other factor's producer (gated units "
                "need two Linear layers, or two convolutions of one rank and kind)")
    if _unit_count(partner) != n_units:
        return f"{what} has {_unit_count(partner)} output units, not {n_units}"
    shapes = [_shape(a) for a in product.args] + [_shape(product)]
    if None in shapes or len(set(shapes)) != 1:
        return (f"the factors have shapes {shapes[0]} and {shapes[1]}, not one shape (a product that broadcasts "
                "does not multiply unit i by unit i alone)")
    return None


def _product_gate(where: str, cur: fx.Node, mul: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                  producer: nn.Module, n_units: int) -> _GateStep | str | None:
    """A product of the path tensor ``cur`` with the output of another producer (gated units), the reason it is
    refused, or ``None`` where the walk's other rules apply (a product with a number, a learned tensor, or a gate
    computed from the path itself; and on the second factor's side, a product that is not gated units).

    The pair is named after the producer of the first factor (``mul``'s first argument): walking from it, the
    product is a gated step; walking from the second factor's producer, the reason says whose pair it is."""
    other = mul.args[1] if mul.args[0] is cur else mul.args[0]
    if (not isinstance(other, fx.Node) or other.op == "get_attr" or other is cur or other in _ancestors(cur)
            or _is_number(other, _conv.is_conv(producer))):
        return None
    found = _factor_producer(other, modules, calls, producer, n_units)
    why = found if isinstance(found, str) else _partner_reason(found[0], modules[found[0].target], calls, producer,
                                                                 n_units, mul)
    if mul.args[0] is not cur:
        if why is not None:
            return None
        return (f"{where} is the second factor of the gated product {mul.name} with the output of "
                f"{found[0].target!r}: gated units are pruned as the pair of the first factor's producer")
    name = _op_name(mul, modules)
    if isinstance(found, str):
        return (f"{_product_reason(mul, cur, name)} (nor gated units: the other factor is not another Linear's or "
                f"convolution's output through per-unit operations used only on the way to the product: {why})")
    pnode, layers, ops, nodes = found
    if why is not None:
        return f"{_product_reason(mul, cur, name)} (nor gated units with {pnode.target!r}: {why})"
    through = f" through {' -> '.join(ops)}" if ops else ""
    return _GateStep(mul, n_units, layers, (f"{name} (gated with {pnode.target!r}{through})",), nodes, pnode.target)


def _split_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"glu"``, ``"chunk"`` or ``"split"`` for a GLU or a split of a tensor into pieces, else ``None``."""
    if (node.op == "call_module" and isinstance(modules[node.target], nn.GLU)) or (
            node.op == "call_function" and node.target in _GLU_FUNCTIONS):
        return "glu"
    if (node.op == "call_method" and node.target in _SPLIT_METHODS) or (
            node.op == "call_function" and node.target in _SPLIT_FUNCTIONS):
        return node.target if node.op == "call_method" else node.target.__name__
    return None


def _chunk_gate(where: str, cur: fx.Node, u: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                producer: nn.Module, n_units: int, path: set[fx.Node]) -> _GateStep | str | None:
    """A split of the path tensor ``cur`` (``n_units`` units) into two halves along its units whose product, after
    per-unit operations on either half, the walk goes on from (``a, b = h.chunk(2, dim)`` then ``a * act(b)``;
    ``F.glu``, ``nn.GLU``), the reason it is refused, or ``None`` when ``u`` is no split."""
    kind = _split_kind(u, modules)
    if kind is None:
        return None
    is_conv = _conv.is_conv(producer)
    s = _shape(cur)
    if not u.args or u.args[0] is not cur or s is None:
        return f"{where} is split by {u.name} in a way not known when tracing"
    if kind == "glu":
        dim = modules[u.target].dim if u.op == "call_module" else _arg(u, 1, "dim")
        dim = -1 if dim is None else dim
    else:
        dim = _arg(u, 2, "dim")
        dim = 0 if dim is None else dim
    ndim, unit_dim = len(s), 1 if is_conv else len(s) - 1
    if not isinstance(dim, int) or not -ndim <= dim < ndim or dim % ndim != unit_dim:
        return (f"{where} is split by {u.name} along dim {dim} of {s}, not along the producer's units (dim "
                f"{unit_dim}), so its halves do not pair unit i with unit H + i")
    if n_units % 2:
        return f"{where} has {n_units} units, which {u.name} cannot split into two halves of one size"
    half = n_units // 2
    if kind == "glu":
        return _GateStep(u, half, (), (_op_name(u, modules),), frozenset({u}), chunked=True)
    size = _arg(u, 1, "chunks" if kind == "chunk" else "split_size")
    if kind == "split" and size is None:
        size = u.kwargs.get("split_size_or_sections")
    if kind == "chunk" and size != 2:
        return (f"{where} is split by {u.name} into {size} chunks; gated units need two halves (chunk(2, dim)) "
                "multiplied with each other")
    if kind == "split" and not isinstance(size, fx.Node):
        return (f"{where} is split by {u.name} with the literal size {size!r}, which does not follow the units "
                f"once some are removed; write .chunk(2, {dim}) or .split(x.size({dim}) // 2, {dim})")
    if kind == "split" and not (_is_shape_value(size) and all(t in path for t in _sizes_read(size))):
        return (f"{where} is split by {u.name} with a size computed from {size.name}, not from the tensor it "
                f"splits; write .chunk(2, {dim})")
    pieces = _value_users(u)
    index = [p.args[1] if p.op == "call_function" and p.target is operator.getitem else None for p in pieces]
    if sorted(i for i in index if isinstance(i, int)) != [0, 1] or len(index) != 2:
        return (f"{where} is split by {u.name} into pieces used as {index}, not two halves (0 and 1) used once "
                "each")
    halves = [pieces[index.index(0)], pieces[index.index(1)]]
    if any((sh := _shape(h)) is None or sh[unit_dim] != half for h in halves):
        return f"{where} is split by {u.name} into pieces of {[_shape(h) for h in halves]}, not two halves of {half}"
    layers, ops, nodes, ends = [], [kind], {u, *halves}, []
    for h in halves:
        prev = h
        while True:
            users = _value_users(prev)
            if len(users) != 1:
                return (f"{where} is split by {u.name}, and {prev.name} on the way of a half feeds {len(users)} "
                        "operations; each half must be used only on its way to their product")
            v = users[0]
            if _is_product(v):
                break
            step = _unit_op(v, prev, modules, calls, producer, half)
            if isinstance(step, str):
                return f"{where} is split by {u.name}, and on the way of a half: {step}"
            if step[0] is not None:
                layers.append(step[0])
            ops.append(step[1])
            nodes.add(v)
            prev = v
        ends.append((prev, v))
    (a, mul), (b, mul_b) = ends
    if mul is not mul_b or {id(x) for x in mul.args} != {id(a), id(b)} or a is b:
        return (f"{where} is split by {u.name} into two halves that are not multiplied with each other (gated units "
                "are a * act(b) of the two halves)")
    if _shape(a) != _shape(b) or _shape(mul) != _shape(a):
        return f"{where} is split by {u.name} into halves of shapes {_shape(a)} and {_shape(b)}, not one shape"
    ops.append(_op_name(mul, modules))
    return _GateStep(mul, half, tuple(layers), tuple(ops), frozenset(nodes | {mul}), chunked=True)


def _gate_step(where: str, cur: fx.Node, u: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
               producer: nn.Module, n_units: int, path: set[fx.Node]) -> _GateStep | str | None:
    """Gated units at the path tensor ``cur``'s reader ``u``: a product with another producer's output
    (:func:`_product_gate`) or a split into two multiplied halves (:func:`_chunk_gate`); the reason one is refused,
    or ``None`` when ``u`` is neither."""
    if _is_product(u) and cur in u.args:
        return _product_gate(where, cur, u, modules, calls, producer, n_units)
    return _chunk_gate(where, cur, u, modules, calls, producer, n_units, path)


def _multiplies_a_producer(cur: fx.Node, u: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                           producer: nn.Module, n_units: int) -> bool:
    """Whether ``u`` multiplies the path tensor ``cur`` by a tensor of its shape that another Linear or convolution
    produces through per-unit operations (:func:`_factor_producer`): gated units, not a conditioning term."""
    if not (_is_product(u) and cur in u.args):
        return False
    other = u.args[1] if u.args[0] is cur else u.args[0]
    return (isinstance(other, fx.Node) and other is not cur and _shape(other) == _shape(cur)
            and not isinstance(_factor_producer(other, modules, calls, producer, n_units), str))


def _gate_state_reason(u: fx.Node, gated: bool, flattened: bool, shaped: bool, group_size: int, se: bool,
                       cat: bool) -> str | None:
    """Why the path cannot become gated units at ``u`` after what it went through, or ``None``: a second gate, a
    flatten or reduction, a reshape into channels, a GroupNorm, a squeeze-and-excitation or a concatenation
    before it (the other factor's units would not be the same)."""
    what = ("is already gated" if gated else "is flattened or reduced over its positions" if flattened
            else "is reshaped into channels" if shaped else "is normalised by a GroupNorm (units of several channels)"
            if group_size > 1 else "is gated by a squeeze-and-excitation" if se else "is concatenated" if cat
            else None)
    if what is None:
        return None
    return (f"{what} before the gated units of {u.name}, which is not supported (gated units are supported on a "
            "producer's output through per-unit operations; the operations after the product may flatten, reshape, "
            "normalise groups or concatenate)")


def _is_shape_value(a: object, depth: int = 0) -> bool:
    """A number computed when tracing from tensor sizes (``b, c, _, _ = x.size()``; ``x.shape[0]``), or a
    literal: the target shape of a reshape in a gate, which follows the kept channel count."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if not isinstance(a, fx.Node) or depth > 8:
        return False
    if a.op == "call_method" and a.target in ("size", "dim"):
        return True
    if a.op == "call_function" and a.target is getattr:
        return len(a.args) > 1 and a.args[1] == "shape"
    return (a.op == "call_function" and a.target in _SHAPE_ARITHMETIC
            and all(_is_shape_value(x, depth + 1) for x in a.all_input_nodes))


def _is_type_read(a: object) -> bool:
    """``x.dtype`` or ``x.device``: what a cast reads (``e.type(h.dtype)``, ``e.to(h.device)``), not sizes."""
    return (isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr and len(a.args) > 1
            and a.args[1] in ("dtype", "device"))


def _sizes_read(a: object, depth: int = 0) -> list[fx.Node]:
    """The tensors whose non-batch sizes the shape value ``a`` reads (``x.size(1)``, ``x.shape[1]``, ``c`` of
    ``b, c, _, _ = x.size()``, a whole ``x.size()``); a batch size (``x.size(0)``, ``x.shape[0]``) is any tensor's."""
    if not isinstance(a, fx.Node) or depth > 8:
        return []
    if a.op == "call_method" and a.target == "size":
        dim = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
        return [] if dim == 0 else [a.args[0]]
    if a.op == "call_function" and a.target is getattr and len(a.args) > 1 and a.args[1] == "shape":
        return [a.args[0]]
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        seq, idx = a.args
        if (idx == 0 and seq.op == "call_function" and seq.target is operator.getitem
                and isinstance(seq.args[0], fx.Node) and isinstance(seq.args[1], slice)
                and seq.args[1].start in (None, 0) and seq.args[1].step is None):
            seq = seq.args[0]  # b of b, c = x.shape[:2]
        whole = (seq.op == "call_method" and seq.target == "size" and len(seq.args) == 1 and not seq.kwargs) or (
            seq.op == "call_function" and seq.target is getattr and seq.args[1:] == ("shape",))
        if idx == 0 and whole:  # x.shape[0], x.size()[0], b of b, c, h, w = x.size()
            return []
    return [t for x in a.all_input_nodes for t in _sizes_read(x, depth + 1)]


def _gate_reshape(node: fx.Node, prev: fx.Node) -> bool | str:
    """Whether ``node`` only reshapes the gate tensor ``prev`` (a view, flatten, squeeze of given dims, unsqueeze,
    ``g[:, :, None, None]``), or the reason it would break once channels are removed."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is prev:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    is_method = node.op == "call_method" and node.target in _GATE_RESHAPE_METHODS
    if not (is_method or (node.op == "call_function" and node.target in _GATE_RESHAPE_FUNCTIONS)):
        return False
    name = node.target if is_method else node.target.__name__
    if name == "squeeze" and len(node.args) < 2 and "dim" not in node.kwargs:
        return "x.squeeze() without dims in the gate drops the channel dim once one channel is kept"
    if name in ("view", "reshape"):
        shape = _reshape_target(node)
        if any(isinstance(d, int) and d not in (1, -1) for d in shape):
            return (f"x.{name}{tuple(shape)} in the gate hard-codes a size, which changes when channels are removed; "
                    f"write e.g. x.{name}(b, c, 1, 1) with b, c = x.shape[:2]")
    return True


def _is_global_avg_pool(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> bool:
    """Whether ``node`` averages its input over all ``rank`` spatial dims (``x.mean((2, 3), keepdim=True)``,
    ``F.adaptive_avg_pool2d(x, 1)``, ``nn.AdaptiveAvgPool2d(1)``)."""
    pool_module, pool_function = _ADAPTIVE_AVG_POOLS.get(rank, (None, None))
    size = None
    if node.op == "call_module" and pool_module is not None and isinstance(modules[node.target], pool_module):
        size = modules[node.target].output_size
    elif node.op == "call_function" and node.target is pool_function:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    elif (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return False
        return sorted(d % (rank + 2) for d in dims) == list(range(2, rank + 2))
    else:
        return False
    size = (size,) * rank if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    return len(size) == rank and all(v == 1 for v in size)


def _se_layer(m: nn.Module, name: str, role: str, n_units: int, rank: int, calls: dict[str, int],
              in_shape: tuple[int, ...] | None) -> str | None:
    """Why ``m`` cannot be the ``fc1`` (``role``) or ``fc2`` of a squeeze-and-excitation gate on ``n_units``
    channels, or ``None``."""
    what = f"its {role} {type(m).__name__} {name!r}"
    if calls[name] > 1:
        return f"{what} is called {calls[name]} times (shared weights)"
    if (why := _weight_ok(m, in_shape)) is not None:
        return f"{what}: {why}"
    if _conv.is_conv(m) and (_conv.is_transposed(m) or _conv.rank(m) != rank or m.groups != 1
                             or _conv.kernel_numel(m) != 1):
        return f"{what} is not a 1x1 convolution of the producer's rank without groups"
    if role == "fc1":
        n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if n_in != n_units:
            return f"{what} reads {n_in} channels, not the {n_units} channels it gates"
    elif _unit_count(m) != n_units:
        return (f"{what} outputs {_unit_count(m)} channels, not the {n_units} channels it gates (not one factor per "
                "channel)")
    return None


def _se_gate(cur: fx.Node, users: list[fx.Node], modules: dict[str, nn.Module], calls: dict[str, int],
             producer: nn.Module, n_units: int) -> tuple[fx.Node, str, str] | str | None:
    """Recognise a squeeze-and-excitation gate on the path tensor ``cur`` (a conv's ``(N, C, ...)`` output whose
    two readers are a product and the start of the gate).

    Returns ``(product node, fc1, fc2)`` for ``cur * sigmoid(fc2(act(fc1(pool(cur)))))`` (global average pooling;
    1x1 convolutions or Linear layers with reshapes between; any element-wise activations between fc1 and fc2;
    sigmoid or hardsigmoid), the reason a gate computed from ``cur`` is not one, or ``None`` when the two readers
    are not a product and a gate that leads to it (a plain branch).
    """
    rank = _conv.rank(producer)
    shape = _shape(cur)
    products = [u for u in users if _is_product(u) and cur in u.args]
    if len(users) != 2 or len(products) != 1 or shape is None or len(shape) != rank + 2:
        return None
    mul = products[0]
    gate_out = mul.args[1] if mul.args[0] is cur else mul.args[0]
    (node,) = [u for u in users if u is not mul]
    if not isinstance(gate_out, fx.Node) or node not in (_ancestors(gate_out) | {gate_out}):
        return None
    prev, stage, fcs = cur, "pool", []
    own = {cur}  # tensors whose sizes follow the kept channels: the gated one and the gate's own
    while node is not mul:
        label = f"{node.op} {getattr(node.target, '__name__', node.target)}"
        if node.op == "call_module":
            label = f"{type(modules[node.target]).__name__} {node.target!r}"
        others = [a for a in node.all_input_nodes if a is not prev and not _is_shape_value(a)]
        if others:
            return f"its {label} also reads {others[0].name} (a gate computed from another tensor)"
        foreign = [t for a in node.all_input_nodes if a is not prev for t in _sizes_read(a) if t not in own]
        if foreign:
            return (f"its {label} takes a size of {foreign[0].name}, not of the tensor it gates, which does not follow "
                    f"the kept channel count; read the sizes from the gated tensor (b, c = {cur.name}.shape[:2])")
        own.add(node)
        reshape = False if stage == "pool" else _gate_reshape(node, prev)
        if isinstance(reshape, str):
            return reshape
        if stage == "pool":
            if not _is_global_avg_pool(node, modules, rank):
                return (f"it starts with {label}, not a global average pooling over the positions (a spatial "
                        "attention map or another gate)")
            stage = "fc1"
        elif reshape:
            pass
        elif node.op == "call_module" and isinstance(modules[node.target], _conv.LAYER_TYPES) and stage in (
                "fc1", "act"):
            role = "fc1" if stage == "fc1" else "fc2"
            if (why := _se_layer(modules[node.target], node.target, role, n_units, rank, calls,
                                 _input_shape(node))) is not None:
                return why
            if fcs and _conv.is_conv(modules[node.target]) != _conv.is_conv(modules[fcs[0]]):
                return f"its fc1 {fcs[0]!r} and fc2 {node.target!r} are not both 1x1 convolutions or both Linear"
            fcs.append(node.target)
            stage = "act" if role == "fc1" else "sigmoid"
        elif stage == "act" and (
                (node.op == "call_module" and isinstance(modules[node.target], _ELEMENTWISE_MODULES)
                 and next(iter(modules[node.target].parameters()), None) is None)
                or (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS - _POOL_FUNCTIONS)
                or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)):
            pass
        elif stage == "sigmoid" and (
                (node.op == "call_module" and isinstance(modules[node.target], _SIGMOID_MODULES))
                or (node.op == "call_function" and node.target in _SIGMOID_FUNCTIONS)
                or (node.op == "call_method" and node.target == "sigmoid")):
            stage = "gate"
        else:
            after = {"fc1": "the pooling", "act": f"fc1 {fcs[0]!r}" if fcs else "fc1",
                     "sigmoid": f"fc2 {fcs[-1]!r}" if fcs else "fc2", "gate": "the sigmoid"}[stage]
            return (f"its {label} after {after} is not part of a squeeze-and-excitation (global average pooling -> "
                    "fc1 -> activation -> fc2 -> sigmoid or hardsigmoid)")
        s = _shape(node)
        if stage in ("fc1", "sigmoid", "gate") and (
                s is None or len(s) < 2 or s[0] != shape[0] or s[1] != n_units or math.prod(s[2:]) != 1):
            return (f"its {label} gives a tensor of shape {s}, not one value per sample and channel "
                    f"({shape[0]}, {n_units})")
        nxt = _value_users(node)
        if len(nxt) != 1:
            return f"its {label} feeds {len(nxt)} operations"
        prev, node = node, nxt[0]
    if stage != "gate":
        return "it does not end with fc1 -> activation -> fc2 -> sigmoid or hardsigmoid"
    if (s := _shape(prev)) is None or len(s) != len(shape):
        return f"the gate of shape {s} does not broadcast over the positions of {shape} channel by channel"
    return mul, fcs[0], fcs[1]


# Products of the path tensor with a per-channel conditioning term (see _conditioning; its sums are _SUM_FUNCTIONS).
_TERM_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_TERM_PRODUCT_METHODS = {"mul", "mul_"}
# Arithmetic with a number on a conditioning term's way (FiLM's ``1 + scale``): element by element.
_NUMBER_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                      torch.div}


@dataclass(frozen=True)
class _Term:
    """A per-channel conditioning term found on a pair's way (see :func:`_conditioning`)."""

    layer: str   # the Linear whose output rows follow the producer's channels
    chunks: int  # its output is split into this many chunks along the channels (FiLM's scale and shift: 2)
    piece: int   # the chunk this term is
    op: str      # "add" (a sum with the path) or "mul" (a product)


def _term_op(node: fx.Node) -> str | None:
    """``"add"`` for a sum or difference (``_SUM_FUNCTIONS``, ``_SUM_METHODS``), ``"mul"`` for a product, else
    ``None``."""
    if node.op == "call_function":
        return "add" if node.target in _SUM_FUNCTIONS else "mul" if node.target in _TERM_PRODUCTS else None
    if node.op == "call_method":
        return "add" if node.target in _SUM_METHODS else "mul" if node.target in _TERM_PRODUCT_METHODS else None
    return None


def _is_chunk(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.chunk) or (
        node.op == "call_method" and node.target == "chunk")


def _is_plain_number(a: object) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _term_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor that ``node``, on a conditioning term's way, reads when it acts element by element or only
    reshapes (an activation or dropout without parameters, arithmetic with a number, a view, unsqueeze or ``[:, :,
    None, None]``, ``torch.chunk`` and the pick of one chunk), else ``None``. Reshapes are checked later
    (:func:`_gate_reshape`)."""
    args = node.args
    first = args[0] if args and isinstance(args[0], fx.Node) else None
    if node.op == "call_module":
        m = modules[node.target]
        parameterless = next(iter(m.parameters()), None) is None
        return first if isinstance(m, _ELEMENTWISE_MODULES) and parameterless else None
    if node.op == "call_function" and node.target is operator.getitem and first is not None:
        if _is_chunk(first):
            return first if isinstance(args[1], int) else None
        return first if _gate_reshape(node, first) is True else None
    if _is_chunk(node) or (node.op == "call_function" and node.target in (
            (_ELEMENTWISE_FUNCTIONS - _POOL_FUNCTIONS) | _GATE_RESHAPE_FUNCTIONS)) or (
            node.op == "call_method" and node.target in (_ELEMENTWISE_METHODS | _GATE_RESHAPE_METHODS)):
        return first
    if node.op == "call_function" and node.target in _NUMBER_ARITHMETIC and len(args) == 2 and not node.kwargs:
        a, b = args
        if isinstance(a, fx.Node) and _is_plain_number(b):
            return a
        if isinstance(b, fx.Node) and _is_plain_number(a):
            return b
    return None


def _term_way(other: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """The nodes from the call of a ``Linear`` or an ``nn.Embedding`` to ``other``, in order, when ``other`` is
    computed from that layer's output by the operations of :func:`_term_input` only; else ``None``."""
    way = [other]
    while not (way[-1].op == "call_module" and isinstance(modules[way[-1].target], (nn.Linear, nn.Embedding))):
        prev = _term_input(way[-1], modules)
        if prev is None or len(way) > 64:
            return None
        way.append(prev)
    return way[::-1]


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    """Whether the values of ``node`` are computed from ``source`` (a full search of its ancestors; a size read
    from a tensor, ``x.shape[1]``, is not its values)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        a = todo.pop()
        if a is source:
            return True
        if a not in seen and not metadata_read(a):
            seen.add(a)
            todo.extend(a.all_input_nodes)
    return False


def _conditioning(cur: fx.Node, u: fx.Node, producer: fx.Node, path: set[fx.Node], modules: dict[str, nn.Module],
                  calls: dict[str, int], n_units: int, is_conv: bool,
                  state: tuple[bool, bool, bool]) -> _Term | str | None:
    """Recognise ``u`` as a sum or product of the path tensor ``cur`` with a per-channel conditioning term.

    The term is computed without the producer's output, from a ``Linear`` E (the time embedding of a diffusion
    U-Net's residual block, a class embedding, FiLM), through element-wise operations without parameters,
    arithmetic with numbers (``1 + scale``), reshapes that follow the channel count (``[:, :, None, None]``,
    ``unsqueeze``, a view with sizes read from the term or the path) and at most one ``torch.chunk`` along the
    channels (FiLM's ``scale, shift = E(c).chunk(2, dim=1)``), and it holds one value per sample and channel,
    broadcast over the positions: ``(N, C, 1, ...)`` on a convolution's ``(N, C, *spatial)``, ``(N, C)`` on a
    pooled ``(N, C)`` or a Linear's ``(N, F)``, ``(N, 1, F)`` on a Linear's ``(N, T, F)``. Channel ``c`` of the
    result then depends on channel ``c`` of the path and E's output rows of channel ``c`` only, so both are removed
    together. ``state`` says whether a concatenation, a Linear's reshape into channels or a squeeze-and-excitation
    gate lies before ``u`` on the way (not supported with a term).

    Returns the term, the reason (told after "its output ...") it cannot be pruned, or ``None`` when ``u`` is not a
    sum or product of ``cur`` with a Linear's output computed without the producer (the caller's reasons apply: a
    residual sum, a product with a tensor).
    """
    op = _term_op(u)
    if op is None or len(u.args) != 2 or u.kwargs or sum(a is cur for a in u.args) != 1:
        return None
    other = u.args[1] if u.args[0] is cur else u.args[0]
    name = getattr(u.target, "__name__", str(u.target)) if u.op == "call_function" else f".{u.target}()"
    if not isinstance(other, fx.Node):
        return None
    if other.op == "get_attr" and op == "add":
        return (f"feeds {name} with the parameter {other.target!r} (a learned bias written in forward()), which "
                "pruning does not slice: not supported; hold the bias in a layer on the way (the producer's bias, or "
                "an affine BatchNorm, InstanceNorm or GroupNorm), whose entries follow the kept channels")
    way = _term_way(other, modules)
    if way is None or _depends_on(other, producer) or other in _ancestors(cur):
        return None
    layer = way[0].target
    lin = modules[layer]
    what = f"feeds {name} with a conditioning term computed by {type(lin).__name__} {layer!r}"
    after_cat, reshaped, gated = state
    if after_cat or reshaped or gated:
        where = ("after the concatenation, whose other operands' channels it would also condition" if after_cat else
                 "on a Linear's output reshaped into channels" if reshaped else
                 "after a squeeze-and-excitation gate")
        return f"{what} {where}, which is not supported"
    if calls[layer] > 1:
        return f"{what}, which is called {calls[layer]} times (shared weights)"
    if (why := _embedding_reason(lin) if isinstance(lin, nn.Embedding) else _weight_ok(lin, _input_shape(way[0]))
            ) is not None:
        return f"{what}: {why}"
    s_path, s_term = _shape(cur), _shape(other)
    if s_path is None or s_term is None:
        return f"{what}, around which the activation shapes could not be read"
    unit_dim = 1 if is_conv else len(s_path) - 1
    adds = "adds to" if op == "add" else "multiplies"
    if s_path[unit_dim] != n_units:
        return (f"{what} on a tensor of shape {s_path}, which is not the producer's (N, C, *positions), (N, C) or "
                "(N, ..., F) units: a term is supported before any flatten of the positions")
    if len(s_term) != len(s_path) or s_term[0] != s_path[0]:
        return (f"{what} of shape {s_term}, not one value per sample and channel of the {s_path} tensor it {adds}")
    if s_term[unit_dim] != n_units:
        return (f"{what} of shape {s_term}, with {s_term[unit_dim]} channel{'s' * (s_term[unit_dim] != 1)}, not the "
                f"producer's {n_units}: only a term with one value per channel is supported")
    if any(v != 1 for d, v in enumerate(s_term) if d not in (0, unit_dim)):
        return (f"{what} of shape {s_term}, which varies over the positions of the {s_path} tensor it {adds}: not "
                "supported (a term is one value per sample and channel, broadcast over the positions)")
    return _term_of_way(way, u, path, modules, n_units, what)


def _term_of_way(way: list[fx.Node], u: fx.Node, path: set[fx.Node], modules: dict[str, nn.Module], n_units: int,
                 what: str) -> _Term | str:
    """Check the way of a conditioning term from its Linear's call ``way[0]`` to its use in ``u`` (see
    :func:`_conditioning`): only this path reads it, it keeps one vector per sample, its reshapes follow the channel
    count and a chunk splits it into pieces of ``n_units`` channels. Returns the term or the reason."""
    lin = modules[way[0].target]
    chunk, piece = None, 0
    own = set(path) | set(way)  # tensors whose sizes follow the kept channels
    n_samples = _shape(way[0])[0] if _shape(way[0]) else None
    for i, n in enumerate(way):
        nxt = way[i + 1] if i + 1 < len(way) else u
        users = _value_users(n)
        if _is_chunk(n):
            if chunk is not None:
                return f"{what}, which is split by two chunks: not supported"
            chunk = n
            if not all(v.op == "call_function" and v.target is operator.getitem and isinstance(v.args[1], int)
                       for v in users):
                return f"{what}, whose chunks {n.name} are also read as a whole: not supported"
            continue
        if users != [nxt]:
            of = "its output" if i == 0 else f"its {n.name}"
            return (f"{what}, and {of} also feeds {len(users) - 1} other operation(s) "
                    f"({', '.join(v.name for v in users if v is not nxt)}): its rows can follow this path's channels "
                    "only when this path is its only reader")
        if i and way[i - 1] is chunk:
            piece = n.args[1]
            continue
        s = _shape(n)
        if s is None or s[0] != n_samples or sum(v != 1 for v in s[1:]) > 1:
            return (f"{what}, whose {n.name} of shape {s} is not one vector per sample (it varies over the positions "
                    "or mixes the samples): not supported")
        if i == 0:
            continue
        prev = way[i - 1]
        reshape = _gate_reshape(n, prev)
        if isinstance(reshape, str):
            return f"{what}: {reshape.replace('in the gate', 'in the conditioning term')}"
        others = [a for a in n.all_input_nodes if a is not prev and not _is_shape_value(a) and not _is_type_read(a)]
        foreign = [t for a in n.all_input_nodes if a is not prev for t in _sizes_read(a) if t not in own]
        if others or foreign:
            bad = (others or foreign)[0].name
            return (f"{what}, whose {n.name} reads {bad}, which does not follow the kept channels; read sizes from the "
                    "term itself or from the tensor it conditions")
    chunks = 1
    if chunk is not None:
        chunks, dim = _arg(chunk, 1, "chunks"), _arg(chunk, 2, "dim")
        s_in = _shape(chunk.args[0])
        dim = 0 if dim is None else dim
        if not (isinstance(chunks, int) and isinstance(dim, int) and s_in is not None and -len(s_in) <= dim < len(s_in)
                and dim % len(s_in) != 0 and s_in[dim] == math.prod(s_in[1:]) == chunks * n_units):
            return (f"{what}, split by {chunk.name} (chunks={chunks}, dim={dim}) of a tensor of shape {s_in} into "
                    f"pieces that are not the producer's {n_units} channels")
    width = _conv.out_units(lin)
    if width != chunks * n_units:
        return (f"{what}, which outputs {width} features, not "
                f"{f'{chunks} x ' if chunks > 1 else ''}the producer's {n_units} channels")
    return _Term(way[0].target, chunks, piece, _term_op(u) or "add")


def _embedding_reason(emb: nn.Embedding) -> str | None:
    """Why the columns of an ``nn.Embedding`` (one per channel of a conditioning term, see :func:`_conditioning`)
    cannot follow a producer's channels, or ``None``."""
    if type(emb).forward is not nn.Embedding.forward:
        return f"{type(emb).__name__} computes its own forward(), which pruning cannot follow"
    if parametrize.is_parametrized(emb):
        return ("its weight is parametrized, which is not supported; remove the parametrization before pruning "
                "(torch.nn.utils.parametrize.remove_parametrizations)")
    if emb.max_norm is not None:
        return (f"it renormalises each row it looks up to max_norm={emb.max_norm} over all its {emb.embedding_dim} "
                "channels, which removing channels would change; pass max_norm=None")
    return None


def _with_conditioning(pair: PrunablePair | str, terms: list[_Term]) -> PrunablePair | str:
    """The pair with the conditioning terms found on its way (see :func:`_conditioning`) recorded, or the reason
    (the pair's own, a term beside a squeeze-and-excitation gate or a Linear's reshape into channels, a chunk of a
    term's Linear that this path does not read)."""
    if isinstance(pair, str) or not terms:
        return pair
    if pair.se:
        return ("its output is conditioned by a term and multiplied by a squeeze-and-excitation gate: both on one "
                "path are not supported")
    if pair.kind == "linear->conv":
        return ("its output, reshaped into channels, is conditioned by a term: not supported (a term is supported on "
                "a convolution's channels or a Linear's features)")
    pieces: dict[str, list[int]] = {}
    for t in terms:
        pieces.setdefault(t.layer, []).append(t.piece)
    chunks = {t.layer: t.chunks for t in terms}
    for layer, got in pieces.items():
        if sorted(got) != list(range(chunks[layer])):
            return (f"its output is conditioned by chunks {sorted(got)} of the {chunks[layer]} chunks of the output "
                    f"of Linear {layer!r}: each chunk must condition this path once, so that the Linear's rows "
                    "follow its channels")
    pair.conditioning = tuple(pieces)
    pair.conditioning_chunks = tuple(chunks[layer] for layer in pieces)
    return pair


def _reshape_target(node: fx.Node) -> tuple:
    """The target shape of ``x.view(...)`` / ``x.reshape(...)``, given as separate sizes or as one tuple."""
    shape = tuple(node.args[1:])
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def _fixed_size_reshape(node: fx.Node) -> str | None:
    """Why ``x.view(...)`` / ``x.reshape(...)`` would break once units are removed: a constant feature size such as
    ``x.view(-1, 16 * 5 * 5)`` (the pruned layer no longer has that many inputs). ``x.view(x.size(0), -1)`` is fine."""
    shape = _reshape_target(node)
    before = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if before is not None and len(shape) > len(before):  # an unflatten, e.g. a Linear's units into (C, H, W)
        return (f"x.{node.target}{tuple(shape)} splits the units of a {len(before)}-D tensor {before} into more "
                "dims, so each unit is not one column of the consumer's input (a Linear's outputs reshaped into "
                "channels and positions): not supported")
    if len(shape) >= 2 and isinstance(shape[-1], int) and shape[-1] != -1:
        return (f"x.{node.target}{tuple(shape)} hard-codes the feature size, which changes when units are removed; "
                f"write x.flatten(1) or x.{node.target}(x.size(0), -1) in forward()")
    return None


_UNFLATTEN_METHODS = {"view", "reshape", "unflatten"}
_UNFLATTEN_FUNCTIONS = {torch.reshape, torch.unflatten}


def _is_unflatten(cur: fx.Node, node: fx.Node) -> bool:
    """Whether ``node`` reshapes the path tensor ``cur`` into more dims (``x.view``, ``x.reshape``,
    ``x.unflatten``, ``torch.reshape``, ``torch.unflatten``)."""
    if not ((node.op == "call_method" and node.target in _UNFLATTEN_METHODS)
            or (node.op == "call_function" and node.target in _UNFLATTEN_FUNCTIONS)):
        return False
    s_in, s_out = _shape(cur), _shape(node)
    return s_in is not None and s_out is not None and len(s_out) > len(s_in)


def _arg(node: fx.Node, i: int, name: str) -> object:
    """Argument ``i`` (positional) or ``name`` (keyword) of a call node."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _channels_reshape(cur: fx.Node, node: fx.Node, n_units: int, path: set[fx.Node],
                      module: nn.Module | None = None, n_calls: int = 1) -> int | str:
    """Check that ``node`` reshapes a Linear producer's ``(N, C * P)`` output ``cur`` into ``(N, C, *spatial)``
    (1 or 2 spatial dims) in a way that follows the pruning, and return ``C``; else the reason.

    An ``nn.Unflatten`` (``module``) called once is rewritten by the pruner, so any sizes are fine; a reshape
    written in ``forward()`` (and a shared ``nn.Unflatten``) must give the channels as ``-1`` or as a size read
    when tracing from the path's tensors (``x.size(1) // 16``), not as a literal such as ``x.view(-1, 64, 4, 4)``.
    """
    s_in, s_out = _shape(cur), _shape(node)
    if module is not None:
        what, dim, sizes = (f"nn.Unflatten {node.target!r} (dim={module.dim}, "
                            f"unflattened_size={tuple(module.unflattened_size)})"), module.dim, module.unflattened_size
    elif node.target in (torch.unflatten, "unflatten"):
        dim, sizes = _arg(node, 1, "dim"), _arg(node, 2, "sizes")
        what = f"{'x.unflatten' if node.op == 'call_method' else 'torch.unflatten'}({dim}, {sizes})"
    else:
        sizes = _reshape_target(node) if node.op == "call_method" else tuple(_arg(node, 1, "shape") or ())
        what, dim = f"{'x.' + node.target if node.op == 'call_method' else 'torch.reshape'}{tuple(sizes)}", None
        sizes = tuple(sizes)[1:]  # the sizes after the batch dim
    if s_in is None or s_out is None:
        return f"could not read activation shapes around {what}"
    if len(s_in) != 2 or s_in[1] != n_units:
        return (f"{what} reshapes a {len(s_in)}-D tensor {s_in}, not the Linear producer's (N, {n_units}) output, "
                "into more dims; only (N, C * P) reshaped into (N, C, *spatial) channels is supported")
    if len(s_out) not in (3, 4) or s_out[0] != s_in[0] or dim not in (None, 1, -1) or not sizes:
        return (f"{what} reshapes the Linear's {s_in} output into {s_out}, not into (N, C, L) or (N, C, H, W) "
                "channels, so its units do not map onto a convolution's input channels")
    channels = sizes[0]
    if module is not None and n_calls == 1:
        return s_out[1]  # the pruner sets its channel count
    if isinstance(channels, int) and channels != -1:
        spatial = ", ".join(str(v) for v in s_out[2:])
        where = (f"nn.Unflatten {node.target!r} is called {n_calls} times and " if module is not None else
                 f"{what} ")
        return (f"{where}hard-codes the channel count {channels} of the Linear's outputs reshaped into channels, "
                "which changes when channels are removed; write -1 (or a size read from the tensor) for the "
                f"channels, e.g. x.view(x.size(0), -1, {spatial}), or use one nn.Unflatten(1, ({channels}, "
                f"{spatial})) module, whose size the pruner updates")
    if isinstance(channels, fx.Node) and not (
            _is_shape_value(channels) and all(t in path for t in _sizes_read(channels))):
        return (f"{what} computes the channel count from {channels.name}, not from the sizes of the tensor it "
                "reshapes, so it would not follow the kept channels; write -1 for the channels")
    if not isinstance(channels, (int, fx.Node)):
        return f"{what}: the channel count {channels!r} is not a size known when tracing; write -1 for it"
    return s_out[1]


_SHAPE_ARITHMETIC = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv,
                     operator.truediv, operator.pow}


def _is_number(a: object, is_conv: bool, depth: int = 0) -> bool:
    """A Python number, or one computed when tracing from the sizes of dims that pruning does not change
    (``x.shape[2] * x.shape[3]``; not the units' dim, whose size pruning changes, nor ``numel()``)."""
    if isinstance(a, bool):
        return False
    if isinstance(a, (int, float)):
        return True
    if not isinstance(a, fx.Node) or depth > 8 or a.op not in ("call_method", "call_function"):
        return False
    if a.op == "call_method":
        if a.target == "dim":
            return True
        return a.target == "size" and len(a.args) == 2 and _fixed_dim(a.args[0], a.args[1], is_conv)
    if a.target is operator.getitem and isinstance(a.args[0], fx.Node) and a.args[0].target is getattr:
        shape_of = a.args[0]
        return (len(shape_of.args) > 1 and shape_of.args[1] == "shape"
                and _fixed_dim(shape_of.args[0], a.args[1], is_conv))
    return a.target in _SHAPE_ARITHMETIC and all(_is_number(x, is_conv, depth + 1) for x in a.args)


def _fixed_dim(tensor: object, dim: object, is_conv: bool) -> bool:
    """Whether ``dim`` of ``tensor`` keeps its size when units are removed (not dim 1 of a conv activation, not the
    last dim of a Linear's)."""
    shape = _shape(tensor) if isinstance(tensor, fx.Node) else None
    if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return False
    return dim % len(shape) != (1 if is_conv else len(shape) - 1)


def _scaled_by_number(node: fx.Node, cur: fx.Node, is_conv: bool) -> bool:
    """Whether ``node`` multiplies ``cur`` by a number (either side) or divides it by one."""
    if len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    if node.target in (operator.truediv, torch.div):
        return a is cur and _is_number(b, is_conv)
    other = b if a is cur else a if b is cur else None
    return other is not None and _is_number(other, is_conv)


def _shifted_by_number(node: fx.Node, cur: fx.Node, is_conv: bool) -> bool:
    """Whether the sum or difference ``node`` adds a number to ``cur`` or subtracts one side from the other (``h +
    1``, ``1 + h``, ``h - 0.5``, ``1 - h``, ``h.add(1)``, ``torch.sub(h, 2)``): each unit on its own. A size read
    from the units' dim is not such a number (pruning changes it)."""
    if _term_op(node) != "add" or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    other = b if a is cur else a if b is cur else None
    return other is not None and other is not cur and _is_number(other, is_conv)


def _pool_rank_mismatch(cur: fx.Node, name: object, pool: object) -> str | None:
    """k-D pooling of a conv's output is per channel only on (N, C, *k spatial dims); on a tensor with fewer dims
    (left by a partial reduction, or the output of a 1-D convolution under 2-D pooling) it pools across channels
    (PyTorch reads (C, H, W) as one unbatched image)."""
    shape = _shape(cur)
    rank = (next(r for t, r in _POOL_RANK.items() if isinstance(t, type) and isinstance(pool, t))
            if isinstance(pool, nn.Module) else _POOL_RANK[pool])
    if shape is not None and len(shape) != rank + 2:
        return f"{rank}-D pooling {name} of a {len(shape)}-D tensor {shape} pools across the producer's channels"
    return None


def _instance_norm_reason(cur: fx.Node, name: str, norm: nn.Module, path_rank: int | None, n_units: int
                          ) -> str | None:
    """Why an ``nn.InstanceNorm1d/2d`` on the path tensor ``cur`` would not normalise the units one by one, or
    ``None``; ``path_rank`` is the spatial rank of the path's ``(N, C, *spatial)`` tensor (``None`` for a Linear's
    output not reshaped into channels)."""
    kind = type(norm).__name__
    if path_rank is None:
        return f"{kind} {name!r} after a Linear producer normalises across its units (the last dim)"
    rank = next(r for t, r in _INSTANCE_NORM_RANK.items() if isinstance(norm, t))
    shape = _shape(cur)
    if rank != path_rank or (shape is not None and len(shape) != rank + 2):
        got = f"a {len(shape)}-D tensor {shape}" if shape is not None else f"a {path_rank}-D path"
        return (f"{kind} {name!r} reads {got} as {'(N, C, L)' if rank == 1 else '(N, C, H, W)'} batches or one "
                "unbatched sample: it normalises across the producer's channels")
    if (norm.affine or norm.track_running_stats) and norm.num_features != n_units:
        return f"{kind} {name!r} has {norm.num_features} features, expected {n_units}"
    return None


def _group_norm_reason(cur: fx.Node, name: str, norm: nn.GroupNorm, path_rank: int | None, reshaped: bool,
                       n_channels: int, group_size: int, gated: bool, pooled: bool = False) -> str | None:
    """Why an ``nn.GroupNorm(G, C)`` on the path tensor ``cur`` cannot have its groups pruned whole, or ``None``.

    It normalises each group of ``C / G`` consecutive channels of each sample on its own, so removing a whole
    group leaves the other groups' outputs unchanged (a single channel would change its group's statistics): the
    units of the pair become groups. That needs the producer's ``n_channels`` convolution channels as dim 1 of an
    ``(N, C, *spatial)`` tensor of the path's rank (``path_rank``; ``None`` for a ``Linear``'s output, and
    ``reshaped`` for one reshaped into channels), or of its ``(N, C)`` global pooling (``pooled``: one value per
    channel, e.g. ``AdaptiveAvgPool2d(1) -> Flatten`` or ``x.mean((2, 3))``, whose groups are groups of channels
    too), more than one group, the group size ``group_size`` of any earlier GroupNorm on the path (1: none yet), and
    no squeeze-and-excitation gate before it (``gated``).
    """
    what = f"GroupNorm({norm.num_groups}, {norm.num_channels}) {name!r}"
    if path_rank is None or reshaped:
        return (f"{what} after a Linear producer normalises groups of its units together; GroupNorm is supported "
                "between a convolution producer and its consumer")
    shape = _shape(cur)
    layout = "(N, C, L)" if path_rank == 1 else "(N, C, H, W)"
    if shape is not None and len(shape) != path_rank + 2 and not (pooled and len(shape) == 2):
        return (f"{what} reads a {len(shape)}-D tensor {shape}, not the {layout} output of the producer or its "
                "(N, C) global pooling, so its groups are not groups of the producer's channels")
    if norm.num_channels != n_channels:
        return f"{what} has {norm.num_channels} channels, expected the producer's {n_channels}"
    if norm.num_groups == 1:
        return (f"{what} normalises all {n_channels} channels as one group, so removing any channel changes every "
                "other channel's output: the whole layer is one unit and it is not prunable (GroupNorm(G, C) with "
                "G > 1 is pruned group by group)")
    size = norm.num_channels // norm.num_groups
    if group_size > 1 and size != group_size:
        return (f"{what} has groups of {size} channels, but an earlier GroupNorm on the way has groups of "
                f"{group_size}: no set of whole groups of both can be removed alone, so the path is not prunable")
    if gated and size > 1:
        return (f"{what} after a squeeze-and-excitation gate: the gate's rows follow single channels and the units "
                "would be groups of channels, which is not supported")
    return None


def _functional_group_norm_reason(node: fx.Node, name: str) -> str:
    """Why ``F.group_norm(x, G, weight, bias)`` (or ``torch.group_norm``) written in ``forward()`` on the path
    cannot be pruned: the pruned network runs the same code, so it would split the kept channels into ``G`` groups
    again (groups of other channels, or an error when ``G`` does not divide them), and ``weight`` and ``bias``, when
    passed, are tensors (the model's parameters), not a layer the pruner rebuilds with the kept channels' entries."""
    groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
    affine = [a for a in (*node.args[2:4], node.kwargs.get("weight"), node.kwargs.get("bias")) if a is not None]
    if isinstance(groups, int):
        why = (f"{name}(x, {groups}, ...) in forward() after the producer fixes its number of groups in the code: the "
               f"pruned network would split the kept channels into {groups} groups again instead of keeping whole "
               "groups")
    else:
        why = (f"{name} in forward() after the producer normalises groups of its channels in a function call, which "
               "the pruner does not rebuild")
    if affine:
        why += ", and its weight and bias are tensors passed in forward(), which the pruner does not shrink"
    return (f"{why}; write it as an nn.GroupNorm(G, C) module, which is pruned group by group (it becomes "
            "GroupNorm(G_kept, C_kept) with the kept channels' entries)")


def _resample_reason(cur: fx.Node, name: str, path_rank: int | None) -> str | None:
    """Why resampling ``cur`` (``nn.Upsample``, ``F.interpolate``) would mix the producer's units, or ``None``: it
    is per channel on an ``(N, C, *spatial)`` tensor of the path's rank only (a convolution's output, or a
    Linear's reshaped into channels; ``path_rank`` is ``None`` for a Linear's output not reshaped)."""
    if path_rank is None:
        return f"resampling {name} after a Linear producer interpolates across its units (the last dim)"
    shape = _shape(cur)
    if shape is not None and len(shape) != path_rank + 2:
        layout = "(N, C, L)" if path_rank == 1 else "(N, C, H, W)"
        return (f"resampling {name} of a {len(shape)}-D tensor {shape}, not the {layout} output "
                "of the producer, interpolates across its channels")
    return None


def _pad_reason(cur: fx.Node, node: fx.Node, name: str, path_rank: int | None) -> str | None:
    """Why padding ``cur`` (an ``nn.*Pad1d/2d`` module or ``F.pad``) would not act on each channel separately, or
    ``None``: it must pad positions of an ``(N, C, *spatial)`` tensor of the path's rank, keeping its sample and
    channel dims (``path_rank`` is ``None`` for a Linear's output not reshaped into channels, whose last dim, the
    units, padding would extend)."""
    if path_rank is None:
        return f"padding {name} after a Linear producer pads its units (the last dim), adding inputs to the consumer"
    s_in, s_out = _shape(cur), _shape(node)
    if s_in is None or s_out is None:
        return f"could not read activation shapes around padding {name}"
    layout = "(N, C, L)" if path_rank == 1 else "(N, C, H, W)"
    if len(s_in) != path_rank + 2:
        return f"padding {name} of a {len(s_in)}-D tensor {s_in}, not the {layout} path of the producer's channels"
    if len(s_out) != len(s_in) or tuple(s_out[:2]) != tuple(s_in[:2]):
        return (f"padding {name} changes the sample or channel dims {tuple(s_in[:2])} -> {tuple(s_out[:2])} of the "
                f"{layout} path: only the positions of each channel may be padded")
    return None


def _position_reduction(before: fx.Node, node: fx.Node, is_conv: bool, n_units: int, name: str) -> bool | str:
    """Check that ``x.mean(dims)`` (or sum/amax/amin/squeeze) reduces positions only, never units or samples.

    Returns whether a conv's ``(N, C, ...)`` output became ``(N, C)`` (a channel is then one consumer column), or
    the reason the reduction is not channel-wise.
    """
    s_in, s_out = _shape(before), _shape(node)
    if s_in is None or s_out is None:
        return f"could not read activation shapes around .{name}()"
    unit_dim = 1 if is_conv else len(s_in) - 1
    if name == "squeeze" and len(node.args) < 2 and "dim" not in node.kwargs:
        return ("x.squeeze() without dims also drops the batch or unit dim when it has size 1 (a layer pruned to "
                "one unit); write x.flatten(1) or x.squeeze((2, 3)) in forward()")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    if dims is None:
        return f".{name}() over all dims mixes the producer's units"
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return f".{name}() over dims {dims} not known when tracing; write constant dims such as (-2, -1)"
    ndim = len(s_in)
    norm = {d % ndim for d in dims if -ndim <= d < ndim}
    if len(norm) != len(dims):
        return f".{name}() over dims {dims} of a {ndim}-D tensor"
    if 0 in norm or unit_dim in norm:
        what = "samples (dim 0)" if 0 in norm else f"the producer's units (dim {unit_dim})"
        return f".{name}() over dims {dims} of a {ndim}-D tensor {s_in} reduces {what}"
    if is_conv and (len(s_out) < 2 or s_out[1] != n_units):
        return f".{name}() turns the conv's output {s_in} into {s_out}, not (N, C, ...)"
    return is_conv and len(s_out) == 2


def _after_flatten(flattened_hw: int | None, flat: int) -> int | None:
    """Columns per unit after a reshape: ``flat`` positions from a flatten, unchanged by a no-op reshape (1, which
    makes a Linear's 2-D input one column per unit) or by a regrouping of positions (0)."""
    if flat == 0:
        return flattened_hw
    if flat == 1:
        return 1 if flattened_hw is None else flattened_hw
    return flat


def _flatten_hw(before: fx.Node, flat_node: fx.Node, n_units: int) -> int | str:
    s_in, s_out = _shape(before), _shape(flat_node)
    if s_in is None or s_out is None:
        return "could not read activation shapes around a flatten"
    if s_out == s_in:  # a no-op reshape
        return 1 if len(s_in) == 2 else "reshape keeps a spatial layout"
    if (len(s_in) >= 3 and len(s_out) >= 3 and s_out[:2] == s_in[:2] and s_in[1] == n_units
            and math.prod(s_out[2:]) == math.prod(s_in[2:])):
        return 0  # positions regrouped, channels untouched: x.flatten(2), x.view(n, c, -1)
    positions = math.prod(s_in[2:])
    if len(s_in) >= 3 and len(s_out) == 2 and s_in[1] == n_units and s_out[1] == n_units * positions:
        return positions
    return f"reshape from {s_in} to {s_out} is not a flatten of (N, C, H, W) to (N, C*H*W)"


def _conv_pairing(producer: nn.Module, consumer: nn.Module) -> str | None:
    """Why a convolution consumer cannot take ``producer``'s units as its input channels, or ``None``."""
    if not _conv.is_conv(producer):
        return (f"a {type(producer).__name__} producer cannot feed the input channels of a convolution (only "
                "through a reshape of its (N, C * P) output into channels, found by tracing as a linear->conv pair; "
                "such a pair cannot be declared)")
    if _conv.rank(producer) != _conv.rank(consumer):
        return (f"mixed 1-D/2-D convolution path ({_conv.base_class(producer).__name__} -> "
                f"{_conv.base_class(consumer).__name__}) is not supported")
    return None


def _make_pair(node: fx.Node, producer: nn.Module, cnode: fx.Node, consumer: nn.Module, between: list[str],
               ops: list[str], flattened_hw: int | None, n_units: int, se: tuple[str, ...] = (),
               se_input: str | None = None,
               shaped: tuple[int, tuple[str, ...], str | None] | None = None,
               group_size: int = 1, cat: tuple[int, int, int] | None = None,
               gate: tuple[_GateStep, tuple[str, ...]] | None = None) -> PrunablePair | str:
    """The pair of ``producer`` and the consumer ``cnode``, or why it is not prunable; ``shaped`` is ``(rows per
    unit, row_between, Unflatten module name)`` when a Linear producer's output was reshaped into channels, and
    ``group_size`` the channels per group of the GroupNorms on the way (``n_units`` counts channels; a unit is then
    a group: its channels' rows at the producer and columns at the consumer). After a concatenation ``cat`` is
    ``(offset, the producer's channels, the number of layers of between before it)`` and ``n_units`` the
    concatenation's channels, which the consumer reads. With gated units ``gate`` is ``(the gated step, the
    layers of between before it)``; ``n_units`` then counts the units after the product."""
    p_conv = _conv.is_conv(producer)
    if gate is not None and gate[0].chunked and shaped is not None:
        return (f"its output, split into two halves ({' -> '.join(ops)}), is reshaped into channels before "
                f"{cnode.target!r}, which is not supported for a chunked producer (its two halves' rows would not "
                "be whole channels of the reshape)")
    if (why := _layer_ok(consumer, in_shape=_input_shape(cnode))) is not None:
        return f"consumer {cnode.target!r}: {why}"
    if shaped is not None and not _conv.is_conv(consumer):
        return (f"its output, reshaped into channels {' -> '.join(ops)}, feeds Linear {cnode.target!r}, not a "
                "convolution (a Linear whose outputs are reshaped into channels is pruned channel by channel for a "
                "Conv1d, Conv2d, ConvTranspose1d or ConvTranspose2d consumer)")
    if _conv.is_conv(consumer):
        kind_name = type(consumer).__name__
        if (why := _conv.call_reason(consumer, len(cnode.args), cnode.kwargs)) is not None:
            return f"consumer {cnode.target!r}: {why}"
        if shaped is None and (why := _conv_pairing(producer, consumer)) is not None:
            return f"consumer {kind_name} {cnode.target!r}: {why}"
        if flattened_hw is not None:
            return f"unsupported path from {type(producer).__name__} to {kind_name} {cnode.target!r}"
        if consumer.in_channels != n_units:
            return f"consumer {cnode.target!r} expects {consumer.in_channels} channels, producer gives {n_units}"
        if (shape := _shape(cnode.args[0])) is not None and len(shape) != _conv.rank(consumer) + 2:
            return f"{kind_name} {cnode.target!r} reads a {len(shape)}-D tensor {shape}, not {_conv.layout(consumer)}"
        kind, cpu = "conv->conv" if shaped is None else "linear->conv", _conv.kernel_numel(consumer)
    elif p_conv:
        if flattened_hw is None:
            return (f"{type(producer).__name__} feeds Linear {cnode.target!r} without a flatten of "
                    f"{_conv.layout(producer)}")
        kind, cpu = "conv->linear", flattened_hw
        if consumer.in_features != n_units * cpu:
            return f"consumer {cnode.target!r} expects {consumer.in_features} inputs, got {n_units} x {cpu}"
    else:
        kind, cpu = "linear->linear", 1
        if consumer.in_features != n_units:
            return f"consumer {cnode.target!r} expects {consumer.in_features} inputs, producer gives {n_units}"
    rows, row_between, unflatten = shaped if shaped is not None else (group_size, (), None)
    own, offset, n_fixed, after = n_units, 0, 0, ()
    if cat is not None:
        offset, own = cat[0], cat[1]
        n_fixed, after = n_units - own, tuple(between[cat[2]:])
    partner, chunked = (gate[0].partner, gate[0].chunked) if gate is not None else (None, False)
    if chunked:
        row_between = gate[1]
    return PrunablePair(node.target, cnode.target, tuple(between), kind, own // group_size, cpu * group_size,
                        cnode.name, ops, se, se_input, rows, row_between, unflatten, group_size, offset, n_fixed,
                        after, gated_with=partner, chunked=chunked)


_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def _concat(cur: fx.Node, node: fx.Node, is_conv: bool, flattened_hw: int | None, n_units: int
            ) -> tuple[int, int] | str:
    """Where the path tensor ``cur`` (``n_units`` channels, or a Linear's ``n_units`` features) lies in the
    concatenation ``node`` that joins it with other tensors: ``(offset, total)`` in channels (after a flatten, in
    blocks of a channel's ``flattened_hw`` positions), or the reason (told after "its output ... ") it is not a
    concatenation of channels that the pruner can follow.

    The producer's channels are then the concatenation's channels ``offset ... offset + n_units - 1`` (read from
    the traced shapes of the operands before it); the other operands' channels are fixed.
    """
    name = getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else str(node.target)
    if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return (f"is one of several tensors that {node.name} ({name}) combines (a stack, or another operation on a "
                "list of tensors), so the consumer's input columns do not follow this producer's units alone (only "
                "torch.cat along the channel dim is followed)")
    tensors = _arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return f"is concatenated by {node.name} with values that are not tensors of the traced graph"
    if sum(t is cur for t in tensors) != 1:
        return (f"appears {sum(t is cur for t in tensors)} times in the concatenation {node.name}, so each unit "
                "would be several of the consumer's channels")
    dim = _arg(node, 1, "dim")
    dim = 0 if dim is None else dim
    shapes = [_shape(t) for t in tensors]
    s = _shape(cur)
    if s is None or any(t is None for t in shapes) or not isinstance(dim, int):
        return f"is concatenated by {node.name} along a dim or with shapes not known when tracing"
    ndim = len(s)
    if not -ndim <= dim < ndim:
        return f"is concatenated by {node.name} along dim {dim} of a {ndim}-D tensor"
    unit_dim = 1 if is_conv else ndim - 1
    if dim % ndim != unit_dim:
        what = "the samples" if dim % ndim == 0 else "positions"
        return (f"is concatenated by {node.name} along dim {dim} of {s} ({what}), not along the producer's units "
                f"(dim {unit_dim}), so the consumer's columns do not follow them")
    per = flattened_hw if is_conv and flattened_hw is not None and ndim == 2 else 1
    sizes = [t[unit_dim] for t in shapes]
    i = next(j for j, t in enumerate(tensors) if t is cur)
    before, other = sum(sizes[:i]), sum(sizes) - sizes[i]
    if sizes[i] != n_units * per:
        return f"is concatenated by {node.name} with {sizes[i]} entries along dim {dim}, not its {n_units} units"
    if before % per or other % per:
        return (f"is concatenated by {node.name} after a flatten with operands of {sizes} features, which are not "
                f"whole blocks of a channel's {per} positions; concatenate before the flatten")
    return before // per, sum(sizes) // per


def _input_error(example_input: Inputs, exc: BaseException) -> ValueError:
    """The error for a model that fails on the calibration data: the samples' shape and the root cause in one line
    (fx's ShapeProp wraps the model's own error in a dump of the graph node)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    why = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    hint = ""
    if not isinstance(example_input, Mapping) and not (example_input.is_floating_point()
                                                       or example_input.is_complex()) and "type" in text:
        hint = (f" The samples are {example_input.dtype}, and integer inputs reach the model as they are (only "
                "floating inputs are cast to the model's dtype): pass images as floats, scaled as the model was "
                "trained (e.g. x.float() / 255).")
    return ValueError(f"the model fails on the calibration data, {shape_text(example_input)} "
                      f"(dim 0 of a batch counts the samples): {why}. Check that the calibration data matches the "
                      f"model's input.{hint}")


#: What a count mismatch of a declared pair may mean, and what to do.
_DECLARED_CAT = (" If the consumer reads the producer's output concatenated with other tensors (the other operands' "
                 "channels are fixed) or the product of its two halves (a GLU: gated units), such a pair is found by "
                 "tracing only: call prune without pairs= on a model torch.fx can trace.")


def resolve_pairs(model: nn.Module, declared: list[Pair] | list[tuple], example_input: Inputs,
                  graph: fx.GraphModule | None = None) -> list[PrunablePair]:
    """Check user-declared pairs and turn them into :class:`PrunablePair` objects.

    ``declared`` items are :class:`Pair` objects or ``(producer, consumer[, between[, se]])`` tuples. Conv->Linear
    pairs read the positions per channel (``L`` or ``H * W``) as ``consumer.in_features // producer.out_channels``.
    """
    modules = dict(model.named_modules())
    owners = _parameter_owners(model)
    out = []
    for item in declared:
        if not isinstance(item, Pair) and not 2 <= len(item) <= 4:
            raise ValueError(f"declared pair {item!r}: a tuple is (producer, consumer[, between[, se]]); pass "
                             "nn_adapters.Pair(producer, consumer, between=..., se=...) to be explicit.")
        p = item if isinstance(item, Pair) else Pair(*item)
        if isinstance(p.se, str):  # one name is not the gate's two layers (and not its letters)
            raise ValueError(f"declared pair {p.producer}->{p.consumer}: se={p.se!r} must name the gate's two "
                             "layers, se=(fc1, fc2).")
        if isinstance(p.between, str):  # one name, not its letters
            p = Pair(p.producer, p.consumer, (p.between,), p.se)
        p = Pair(p.producer, p.consumer, tuple(p.between), tuple(p.se))
        if p.se and len(p.se) != 2:
            raise ValueError(f"declared pair {p}: se= takes the names of the gate's two layers, (fc1, fc2).")
        for nm in (p.producer, p.consumer, *p.between, *p.se):
            if nm not in modules:
                raise ValueError(f"declared pair {p}: no module named {nm!r}; use names from model.named_modules().")
        prod, cons = modules[p.producer], modules[p.consumer]
        if not isinstance(prod, _conv.LAYER_TYPES) or not isinstance(cons, _conv.LAYER_TYPES):
            raise ValueError(f"declared pair {p}: producer and consumer must be nn.Linear, nn.Conv1d, nn.Conv2d, "
                             f"nn.ConvTranspose1d or nn.ConvTranspose2d; got {type(prod).__name__} and "
                             f"{type(cons).__name__}.")
        for m, as_consumer in ((prod, False), (cons, True)):
            if (why := _layer_ok(m, consumer=as_consumer)) is not None:
                raise ValueError(f"declared pair {p}: {why}.")
        n = _unit_count(prod)
        for b in p.between:
            m = modules[b]
            if isinstance(m, nn.GroupNorm):
                raise ValueError(f"declared pair {p}: GroupNorm {b!r} in between: a pair through a GroupNorm is found "
                                 "by tracing only (its units are groups of channels); call prune without pairs= on a "
                                 "model torch.fx can trace.")
            if _conv.is_conv(m):
                if (why := _channelwise_conv(prod, m, n)) is not None:
                    raise ValueError(f"declared pair {p}: {type(m).__name__} {b!r} in between: {why}.")
            elif not (isinstance(m, _NORM_MODULES) and (m.num_features == n or (
                    isinstance(m, _INSTANCE_NORMS) and not (m.affine or m.track_running_stats)))):
                raise ValueError(f"declared pair {p}: {b!r} must be a BatchNorm or InstanceNorm with {n} features "
                                 f"or a depthwise convolution with {n} channels (groups = in_channels = out_channels "
                                 f"= {n}).")
        if p.se:
            _check_declared_se(p, prod, [modules[nm] for nm in p.se], n)
        if (why := _tied(owners, modules, (p.producer, p.consumer, *p.between, *p.se))) is not None:
            raise ValueError(f"declared pair {p}: {why}.")
        if _conv.is_conv(cons):
            if (why := _conv_pairing(prod, cons)) is not None:
                raise ValueError(f"declared pair {p}: {why}; declare a producer of the consumer's kind.")
            if cons.in_channels != n:
                raise ValueError(f"declared pair {p}: {type(cons).__name__} consumer needs a producer with "
                                 f"{cons.in_channels} channels, got {n}.{_DECLARED_CAT}")
            kind, cpu = "conv->conv", _conv.kernel_numel(cons)
        elif _conv.is_conv(prod):
            if cons.in_features % n:
                raise ValueError(f"declared pair {p}: Linear in_features {cons.in_features} is not a multiple of "
                                 f"the producer's {n} channels.{_DECLARED_CAT}")
            kind, cpu = "conv->linear", cons.in_features // n
        else:
            if cons.in_features != n:
                raise ValueError(f"declared pair {p}: consumer has {cons.in_features} inputs, producer {n} outputs."
                                 f"{_DECLARED_CAT}")
            kind, cpu = "linear->linear", 1
        node = None
        if graph is not None:
            cnode = next((nd for nd in graph.graph.nodes if nd.op == "call_module" and nd.target == p.consumer), None)
            if cnode is not None and (why := _conv.call_reason(cons, len(cnode.args), cnode.kwargs)) is not None:
                raise ValueError(f"declared pair {p}: consumer {p.consumer!r}: {why}.")
            node = None if cnode is None else cnode.name
        se_input = _se_input_node(graph, p.se[0]) if graph is not None and p.se else None
        out.append(PrunablePair(p.producer, p.consumer, tuple(p.between), kind, n, cpu, node, se=p.se,
                                se_input_node=se_input))
    names = [p.producer for p in out]
    if len(set(names)) != len(names):
        raise ValueError("a producer appears in two declared pairs; declare each producer once.")
    try:  # the data's fault before any pair's: the checks below run the model many times
        with eval_mode(model), torch.no_grad():
            call(model, take(example_input, CHECK_SAMPLES))
    except Exception as exc:
        raise _input_error(example_input, exc) from exc
    for pair in out:
        _check_unit_map(model, pair, example_input)
    # In the order the producers run (a consumer must be refitted before its own outputs are pruned as the next
    # pair's producer), whatever the order of the declaration; a pair whose consumer is an SE's fc2 comes before
    # the SE's own pair (it refits all of fc2's rows, before the SE pair removes some).
    order = _call_order(model, [p.producer for p in out], example_input)
    fc2_of = {p.se[1]: p.producer for p in out if p.se}
    return sorted(out, key=lambda p: (order.get(fc2_of.get(p.consumer, p.producer), len(order)),
                                      p.consumer not in fc2_of))


def _check_declared_se(p: Pair, prod: nn.Module, layers: list[nn.Module], n: int) -> None:
    """Refuse a declared ``se=(fc1, fc2)`` that cannot be a squeeze-and-excitation of ``prod``'s ``n`` channels."""
    if not _conv.is_conv(prod):
        raise ValueError(f"declared pair {p}: a squeeze-and-excitation gate gates a convolution's channels; the "
                         f"producer is a {type(prod).__name__}.")
    kinds = {_conv.is_conv(m) for m in layers}
    if not all(isinstance(m, _conv.LAYER_TYPES) for m in layers) or len(kinds) != 1:
        raise ValueError(f"declared pair {p}: se= names the gate's fc1 and fc2, both 1x1 convolutions or both "
                         f"Linear; got {type(layers[0]).__name__} and {type(layers[1]).__name__}.")
    calls = dict.fromkeys(p.se, 1)
    for name, m, role in zip(p.se, layers, ("fc1", "fc2"), strict=True):
        if (why := _se_layer(m, name, role, n, _conv.rank(prod), calls, None)) is not None:
            raise ValueError(f"declared pair {p}: {why.removeprefix('its ')}.")


def _se_input_node(graph: fx.GraphModule, fc1: str) -> str | None:
    """The node whose output a declared SE gate pools and multiplies: walking back from ``fc1``'s input, the
    first tensor with more than one reader."""
    node = next((nd for nd in graph.graph.nodes if nd.op == "call_module" and nd.target == fc1), None)
    for _ in range(16):
        if node is None or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
        if len(_value_users(node)) > 1:
            return node.name
    return None


def _consumer_columns(pair: PrunablePair, x: torch.Tensor) -> torch.Tensor:
    """A consumer input as ``(rows, n_units, cols_per_unit)``: the column blocks the pruner assigns to each unit."""
    if pair.conv_consumer:
        return x.transpose(0, 1).reshape(x.shape[1], -1).T.reshape(-1, pair.n_units, 1)
    return x.reshape(-1, pair.n_units, pair.cols_per_unit)


#: Calibration samples the declared-pair check runs on (more samples: fewer units that stay dead by chance).
CHECK_SAMPLES = 16


def _changed_units(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Which units (first dim) of an activation changed between two runs, beyond rounding."""
    tol = 1e-5 * (1.0 + float(base.abs().amax()))
    return (new - base).abs().reshape(base.shape[0], -1).amax(dim=1) > tol


def _check_unit_map(model: nn.Module, pair: PrunablePair, example_input: Inputs) -> None:
    """Check on up to ``CHECK_SAMPLES`` calibration samples that the consumer's column block ``j`` depends on
    producer unit ``j`` only.

    The pruner removes producer unit ``j`` together with the consumer's ``j``-th column block (a channel, or the
    ``H * W`` flattened positions of channel ``j``), which is right only if the operations between them act on
    each unit separately. For a declared pair nothing else says so, so this adds a large offset (of each sign in
    turn) to a random half of the producer's units and requires that the consumer's input changes, and changes
    only in the column blocks of those units. A permute or transpose before a flatten, a LayerNorm or any layer
    that mixes units, or a consumer that does not read this producer fails with an error that says so. The same
    runs find a BatchNorm or depthwise convolution on the way that is missing from ``between`` (its input changes
    unit by unit too), and a fourth run, with the model's input changed (:func:`_moved_inputs`: every input of a
    dict batch, integer ones too) and the producer's output held fixed, finds a consumer that also reads another
    tensor (a residual sum, a conditioning term from a second input). A fifth run changes the producer's units with the
    consumer's input held at its first-run value: the network's output must not change, else something besides the
    consumer reads the units (a branch or a sum off the producer or a layer in ``between``, written as a function,
    not a layer); a control run with nothing changed tells such a reader from a network whose output is random
    (dropout left on). Every layer declared in ``between`` must see its input change in the first runs, and only in
    the channels of the changed units, else it is not on the way (another branch's BatchNorm, an unused module, a
    BatchNorm after the consumer) and is refused before anything is pruned.

    With a squeeze-and-excitation gate declared (``se=(fc1, fc2)``) the gate mixes the units, so the offset runs
    replay ``fc2``'s output from the first run (the gate held fixed: the product then changes unit by unit), and
    ``fc1``'s input must change in exactly the units whose consumer columns change (it pools this path's units).
    The run with the producer held still lets the gate follow the model's input, so a gate computed from another
    tensor is refused as a second input of the consumer.
    """
    prod, cons = model.get_submodule(pair.producer), model.get_submodule(pair.consumer)
    unit_dim = 1 if _conv.is_conv(prod) else -1
    gen = torch.Generator().manual_seed(0)
    n = pair.n_units
    hit = torch.zeros(n, dtype=torch.bool)
    hit[torch.randperm(n, generator=gen)[:max(1, n // 2)]] = True
    # The runs: "base" (recorded), "plus" / "minus" (the offset added to the hit units), "held" (the model's input
    # changed, the producer's output replayed from "base"), "bypass" (the offset added, the consumer's input
    # replayed from "base") and "control" (nothing changed but the consumer's input replayed).
    mode = ["base"]
    seen: list[torch.Tensor] = []
    base_out: list[torch.Tensor] = []
    base_in: list[torch.Tensor] = []
    replayed = [0]
    base_gate: list[torch.Tensor] = []
    gate_at = [0]

    def hold_gate(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        if mode[0] == "base":
            base_gate.append(out.detach().clone())
        if mode[0] in ("plus", "minus") and gate_at[0] < len(base_gate):
            gate_at[0] += 1
            return base_gate[gate_at[0] - 1].clone()
        return out

    def perturb(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        if mode[0] == "base":
            base_out.append(out.detach().clone())  # a copy: an in-place activation next overwrites `out`
        if mode[0] in ("base", "control"):
            return out
        if mode[0] == "held":
            return base_out.pop(0).clone() if base_out else out
        shape = [1] * out.dim()
        shape[unit_dim] = n
        offset = (4.0 * out.detach().abs().amax().clamp(min=1.0)) * hit.to(out.device, out.dtype).reshape(shape)
        if unit_dim == 1 and out.dim() >= 3:
            # varying over the positions (between 0.5 and 1.5 times): an InstanceNorm on the way would remove an
            # offset that is the same at every position of a channel, and the channel would look unread
            pos = torch.arange(out.shape[-1], device=out.device, dtype=out.dtype)
            offset = offset * (1.0 + 0.5 * torch.cos(pos))
        return out - offset if mode[0] == "minus" else out + offset

    def capture(_m: nn.Module, inp: tuple) -> tuple | None:
        if mode[0] in ("bypass", "control"):
            replayed[0] += 1
            return (base_in[replayed[0] - 1], *inp[1:]) if replayed[0] <= len(base_in) else None
        if mode[0] == "base":
            base_in.append(inp[0].detach().clone())
        seen.append(inp[0].detach().to(torch.float64))
        return None

    # Other layers that also receive the producer's units one by one: an undeclared BatchNorm on the way, or a
    # second reader (a residual sum, a branch); their inputs are recorded too.
    others = {name: m for name, m in model.named_modules()
              if isinstance(m, (*_conv.LAYER_TYPES, *_NORM_MODULES)) and m is not prod and m is not cons
              and name not in pair.between and name not in pair.se}
    other_in: dict[str, list[torch.Tensor]] = {name: [] for name in others}

    def capture_other(name: str) -> Callable:
        def hook(_m: nn.Module, inp: tuple) -> None:
            if inp and isinstance(inp[0], torch.Tensor):
                other_in[name].append(inp[0].detach().to(torch.float64))
        return hook

    # Each layer declared in between= (and a declared gate's fc1) must lie on the way: its input changes with the
    # producer's units.
    on_path = {name: model.get_submodule(name) for name in (*pair.between, *pair.se[:1])}
    others.update(on_path)
    other_in.update({name: [] for name in on_path})
    handles = [prod.register_forward_hook(perturb), cons.register_forward_pre_hook(capture)]
    if pair.se:
        handles.append(model.get_submodule(pair.se[1]).register_forward_hook(hold_gate))
    handles += [m.register_forward_pre_hook(capture_other(name)) for name, m in others.items()]
    runs, other_runs, outputs, second_reader = [], [], [], False
    x0 = take(example_input, CHECK_SAMPLES)
    try:
        with eval_mode(model), torch.no_grad():
            for m in ("base", "plus", "minus"):
                mode[0], seen[:], gate_at[0] = m, [], 0
                for v in other_in.values():
                    v.clear()
                outputs.append(_output_tensors(call(model, x0)))
                runs.append([_consumer_columns(pair, x) for x in seen])
                other_runs.append({k: list(v) for k, v in other_in.items()})
            mode[0], replayed[0] = "bypass", 0
            bypass = _output_tensors(call(model, x0))
            if not _same_outputs(outputs[0], bypass):
                mode[0], replayed[0] = "control", 0  # unless the network is random (e.g. dropout left on)
                if _same_outputs(outputs[0], _output_tensors(call(model, x0))):
                    second_reader = True
            held = None
            moved = _moved_inputs(x0, gen)
            if moved is not None:  # does the consumer read anything besides the producer's output?
                mode[0], seen[:] = "held", []
                call(model, moved)
                held = [_consumer_columns(pair, x) for x in seen]
    finally:
        for h in handles:
            h.remove()
    if not runs[0]:
        raise ValueError(f"declared pair {pair.name}: the consumer {pair.consumer!r} is not called in a forward "
                         "pass; declare layers that the model uses.")
    changed = torch.zeros(n, dtype=torch.bool)
    for run in runs[1:]:
        for base, new in zip(runs[0], run, strict=True):
            diff = _changed_units(base.transpose(0, 1), new.transpose(0, 1))
            if (diff & ~hit).any():
                bad = torch.nonzero(diff & ~hit).flatten()[:3].tolist()
                raise ValueError(
                    f"declared pair {pair.name}: changing some units of {pair.producer!r} changed the consumer's "
                    f"input columns of other units (e.g. the blocks of units {bad}), so the consumer's columns are "
                    "not the producer's units in order. Only per-unit operations may lie between them (BatchNorm, "
                    "depthwise convolutions, element-wise activations, pooling, dropout, a channel-major flatten); a "
                    "permute/transpose before the flatten, a LayerNorm or any layer that mixes units is not (a "
                    "squeeze-and-excitation gate on the way is declared with se=(fc1, fc2)). Remove this pair from "
                    "pairs= or restructure the model.")
            changed |= diff
    if not changed.any():
        raise ValueError(f"declared pair {pair.name}: the consumer's input does not change with the producer's "
                         f"output; {pair.consumer!r} does not read {pair.producer!r}. Declare a producer whose "
                         "output units feed the consumer.")
    for name, m in others.items():
        dim = -1 if isinstance(m, nn.Linear) else 1
        other_changed = torch.zeros(n, dtype=torch.bool)
        for run in other_runs[1:]:
            for base, new in zip(other_runs[0][name], run[name], strict=False):
                if base.shape == new.shape and base.dim() >= 2 and base.shape[dim] == n:
                    other_changed |= _changed_units(base.movedim(dim, 0), new.movedim(dim, 0))
        if pair.se and name == pair.se[0]:
            if not bool((other_changed == changed).all()):
                raise ValueError(f"declared pair {pair.name}: the input of {type(m).__name__} {name!r} (the gate's "
                                 f"fc1 in se=) does not change with exactly the units of {pair.producer!r} that the "
                                 "consumer reads, so it does not pool this path's channels one by one. Declare the "
                                 "fc1 and fc2 of the gate that multiplies this path.")
            continue
        if name in on_path:
            if not other_changed.any():
                where = ("is not called in a forward pass" if not other_runs[0][name] else
                         f"does not receive the units of {pair.producer!r} (its input does not change with them)")
                raise ValueError(f"declared pair {pair.name}: {type(m).__name__} {name!r} in between= {where}, "
                                 f"so it is not on the way from {pair.producer!r} to {pair.consumer!r} and its "
                                 "channels are not the producer's units. Remove it from between=.")
            if (other_changed & ~hit).any():  # reached through a layer that mixes units: past the consumer
                bad = torch.nonzero(other_changed & ~hit).flatten()[:3].tolist()
                raise ValueError(f"declared pair {pair.name}: {type(m).__name__} {name!r} in between= sees its "
                                 f"channels {bad} change when only other units of {pair.producer!r} change, so it "
                                 "reads them through a layer that mixes units (it lies after the consumer "
                                 f"{pair.consumer!r}, or behind another layer) and its channels are not the "
                                 "producer's units. Remove it from between=.")
            continue
        # a reader of the producer's units sees exactly the units the consumer sees change (a later layer whose
        # inputs change only in some units, e.g. behind dead ReLUs, is not taken for one)
        if int(other_changed.sum()) > 1 and bool((other_changed == changed).all()):
            per_unit = isinstance(m, _NORM_MODULES) or (_conv.is_conv(m) and _channelwise_conv(prod, m, n) is None)
            fix = (f"add it to the pair's between={(*pair.between, name)!r}"
                   if per_unit else
                   "its units cannot be removed for one reader only (a residual sum or a branch); remove this pair "
                   "from pairs=")
            raise ValueError(f"declared pair {pair.name}: {type(m).__name__} {name!r} also receives the producer's "
                             f"units one by one; {fix}.")
    if second_reader:
        raise ValueError(f"declared pair {pair.name}: the network's output changes with the units of "
                         f"{pair.producer!r} even when the input of {pair.consumer!r} is held fixed, so something "
                         "besides the consumer reads them (a branch or a sum that reads the producer or a layer in "
                         "between=); its units cannot be removed for one reader only. Remove this pair from pairs=.")
    if held is not None and len(held) == len(runs[0]):
        for base, new in zip(runs[0], held, strict=True):
            if not _same_outputs([base], [new]):
                raise ValueError(f"declared pair {pair.name}: the consumer's input changes with the model's input "
                                 f"even when {pair.producer!r}'s output is held fixed, so it also reads another "
                                 "tensor (a residual sum, a concatenation with a skip connection, or a product with "
                                 "another layer's output: gated units, which are found by tracing only); the "
                                 "producer's units cannot be removed there. Remove this pair from pairs=.")


def _moved_inputs(x: Inputs, gen: torch.Generator) -> Inputs | None:
    """The inputs changed: noise added to a floating tensor; for a dict, to each floating per-sample tensor, and the
    samples of every other per-sample tensor (class labels, timesteps as integers) rolled by one, so that the values
    stay valid; where rolling changes nothing (every sample of the same class), each value moves to its neighbour
    (``c - 1``, or ``1`` for ``0``; a boolean is negated). ``None`` for a tensor that is not floating."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            rolled = t.roll(1, 0)
            if not torch.equal(rolled, t):
                return rolled
            return ~t if t.dtype == torch.bool else torch.where(t > 0, t - 1, t + 1)
        return t + (0.5 * t.std().clamp(min=1e-3)) * torch.randn(t.shape, generator=gen).to(t)

    if not isinstance(x, Mapping):
        return moved(x) if x.is_floating_point() else None
    return {k: moved(v) if per_sample(v) else v for k, v in x.items()}


def _same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two runs' tensors (outputs, or a layer's inputs) agree up to rounding."""
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(y.to(torch.float64), x.to(torch.float64), rtol=1e-5,
                                              atol=1e-5 * (1.0 + _largest(x)))
        for x, y in zip(a, b, strict=True))


def _output_tensors(out: object) -> list[torch.Tensor]:
    """Copies of the floating-point tensors of a model's output (:func:`_tensors` of them)."""
    return [t.detach().clone() for t in _tensors(out) if t.is_floating_point()]


def _call_order(model: nn.Module, names: list[str], example_input: Inputs) -> dict[str, int]:
    """Position of each named module in the order of its first call in one forward pass (eval mode, no grad)."""
    seen: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple) -> None:  # returns None: the input is left as it is
            seen.setdefault(name, len(seen))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            call(model, take(example_input, 2))
    finally:
        for h in handles:
            h.remove()
    return seen
