"""What the pruner needs to know about the layer kinds it prunes, in one place.

The producers and consumers are ``nn.Linear``, the convolutions ``nn.Conv1d`` / ``nn.Conv2d`` and the transposed
convolutions ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``. The convolutions differ only in their number of
spatial dims (their *rank*): a channel is ``prod(kernel_size)`` columns of the consumer's unfolded input, and a 1-D
input ``(N, C, L)`` is unfolded as the 2-D input ``(N, C, 1, L)`` with a ``(1, k)`` kernel, so every other module
handles both ranks with one code path.

A transposed convolution (``groups == 1``) with weight ``(C_in, C_out, *k)``, stride ``s``, padding ``p``,
dilation ``d`` and output padding ``op`` is the regular convolution, with stride 1 and dilation ``d``, of its input
with ``s - 1`` zeros inserted between neighbouring positions and padded by ``d * (k - 1) - p`` zeros before and
``d * (k - 1) - p + op`` after (a negative padding crops), whose kernel is the transposed one flipped in space with
the channel axes swapped: ``weight'[o, c] = flip(weight[c, o])``. So as a consumer its input channel ``c`` is the
``prod(k)`` columns of that zero-stuffed input's unfolding (:func:`unfold`), and its weights as a matrix are
``weight'`` (:func:`weight_matrix`, :func:`weight_from_matrix`); as a producer its output channel ``o`` is
``weight[:, o]`` and ``bias[o]`` (:func:`unit_dims`). The rest of the package goes through these helpers and never
reads a weight's layout itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: The transposed convolutions (weight ``(C_in, C_out / groups, *k)``).
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d)
#: The convolutions that can be producers and consumers.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, *TRANSPOSED_TYPES)
#: Every prunable layer kind (producers and consumers).
LAYER_TYPES = (nn.Linear, *CONV_TYPES)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a supported convolution, transposed or not (or a subclass of one)."""
    return isinstance(module, CONV_TYPES)


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is a transposed convolution (``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``)."""
    return isinstance(module, TRANSPOSED_TYPES)


def base_class(module: nn.Module) -> type[nn.Module]:
    """The torch layer class that ``module`` is an instance of (``nn.Linear``, ``nn.Conv2d``,
    ``nn.ConvTranspose1d`` ...)."""
    return next(t for t in LAYER_TYPES if isinstance(module, t))


def rank(conv: nn.Module) -> int:
    """Number of spatial dims of a convolution (1 for ``Conv1d`` / ``ConvTranspose1d``, 2 for the 2-D ones)."""
    return len(conv.kernel_size)


def kernel_numel(conv: nn.Module) -> int:
    """Kernel taps per input channel: the consumer columns of one channel."""
    return math.prod(conv.kernel_size)


def layout(conv: nn.Module) -> str:
    """The input layout of a convolution, for messages: ``"(N, C, L)"`` or ``"(N, C, H, W)"``."""
    return "(N, C, L)" if rank(conv) == 1 else "(N, C, H, W)"


def out_units(layer: nn.Module) -> int:
    """Output units of a layer: neurons of a ``Linear``, output channels of a convolution, the embedding dim
    (columns of the weight) of an ``nn.Embedding``."""
    if isinstance(layer, nn.Embedding):
        return layer.embedding_dim
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def unit_dims(layer: nn.Module) -> tuple[int, int]:
    """``(output dim, input dim)`` of the layer's ``weight``: ``(1, 0)`` for a transposed convolution, whose
    weight is ``(C_in, C_out / groups, *k)``, ``(0, 1)`` for the others."""
    return (1, 0) if is_transposed(layer) else (0, 1)


def weight_shape(layer: nn.Module, n_in: int, n_out: int, groups: int = 1) -> tuple[int, ...]:
    """The shape of ``layer``'s weight with ``n_in`` inputs (features or channels) and ``n_out`` outputs."""
    if isinstance(layer, nn.Linear):
        return (n_out, n_in)
    if is_transposed(layer):
        return (n_in, n_out // groups, *layer.kernel_size)
    return (n_out, n_in // groups, *layer.kernel_size)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weights as an ``(out, d)`` matrix whose columns match the layer's design rows (the input
    features of a ``Linear``, the columns of :func:`unfold` for a convolution without groups); row ``o`` holds
    every weight of output unit ``o``. A view of (or, for a transposed convolution, a copy of) ``layer.weight``."""
    W = layer.weight
    if is_transposed(layer):
        W = W.flip(tuple(range(2, W.dim()))).transpose(0, 1)
    return W.reshape(W.shape[0], -1)


def weight_from_matrix(layer: nn.Module, M: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`weight_matrix`: a weight in ``layer``'s layout from an ``(out, n_in * taps)`` matrix
    (``(out, in_features)`` for a ``Linear``), for ``n_in`` input channels in the matrix's column order."""
    if isinstance(layer, nn.Linear):
        return M
    W = M.reshape(M.shape[0], -1, *layer.kernel_size)
    if is_transposed(layer):
        W = W.transpose(0, 1).flip(tuple(range(2, W.dim())))
    return W


def flops(layer: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Floating-point operations of one call (a multiply-add counts as 2, the bias is not counted).

    A transposed convolution multiplies every input value by ``C_out / groups * taps`` weights (the zeros of the
    equivalent zero-stuffed convolution cost nothing); a convolution computes every output value from
    ``C_in / groups * taps`` products; a ``Linear`` every output value from ``in_features``.
    """
    if is_transposed(layer):
        return 2 * inp.numel() * (layer.out_channels // layer.groups) * kernel_numel(layer)
    if is_conv(layer):
        return 2 * out.numel() * (layer.in_channels // layer.groups) * kernel_numel(layer)
    return 2 * out.numel() * layer.in_features


def call_reason(layer: nn.Module, n_args: int, kwargs: dict) -> str | None:
    """Why a call of a consumer with ``n_args`` positional arguments and ``kwargs`` cannot be unfolded from its
    input alone, or ``None``: a transposed convolution called with ``output_size`` chooses its output padding per
    call, which :func:`unfold` (the module's ``output_padding``) would not see."""
    if is_transposed(layer) and (n_args > 1 or kwargs.get("output_size") is not None):
        return (f"{type(layer).__name__} is called with output_size=, which sets its output padding per call; as a "
                "consumer it is supported without it (set output_padding on the module instead)")
    return None


def _zero_stuffed(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the regular convolution a transposed ``conv`` equals (see the module docstring):
    ``stride - 1`` zeros between positions, ``d * (k - 1) - p`` zeros before and ``d * (k - 1) - p + op`` after."""
    n_sp = rank(conv)
    sp = x.shape[2:]
    stuffed = x.new_zeros(*x.shape[:2], *((n - 1) * s + 1 for n, s in zip(sp, conv.stride, strict=True)))
    stuffed[(slice(None), slice(None), *(slice(None, None, s) for s in conv.stride))] = x
    pads: list[int] = []
    for i in reversed(range(n_sp)):  # F.pad lists the last dim first
        before = conv.dilation[i] * (conv.kernel_size[i] - 1) - conv.padding[i]
        pads += [before, before + conv.output_padding[i]]
    return F.pad(stuffed, pads)


def unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches ``conv`` reads from ``x`` (``(N, C, *spatial)``) as ``(N, C * kernel_numel, positions)``, one
    column per output position; the columns of channel ``c`` are its taps ``c * kernel_numel ... (c + 1) *
    kernel_numel - 1``, the layout of the columns of :func:`weight_matrix`.

    A convolution reads ``x`` with its kernel, stride, explicit zero padding (``"valid"`` is 0) and dilation; a
    transposed convolution reads the zero-stuffed ``x`` (module docstring) with its kernel and dilation, stride 1
    and no further padding, so ``weight_matrix(conv) @ unfold(conv, x)`` is its output without the bias.
    """
    lead = 2 - rank(conv)  # a 1-D conv reads (N, C, L) as the image (N, C, 1, L) with a (1, k) kernel
    if is_transposed(conv):
        x = _zero_stuffed(conv, x)
        padding, stride = (0,) * rank(conv), (1,) * rank(conv)
    else:
        padding = (0,) * rank(conv) if conv.padding == "valid" else conv.padding
        stride = conv.stride
    return F.unfold(x.reshape(*x.shape[:2], *(1,) * lead, *x.shape[2:]), (1,) * lead + tuple(conv.kernel_size),
                    dilation=(1,) * lead + tuple(conv.dilation), padding=(0,) * lead + tuple(padding),
                    stride=(1,) * lead + tuple(stride))


def polyphase(conv: nn.Module, in_spatial: tuple[int, ...]) -> list[tuple[torch.Tensor, ...]] | None:
    """The polyphase structure of a strided transposed convolution's unfolded input, or ``None`` (a regular
    convolution, or a transposed one with stride 1: one phase, nothing to split).

    Output position ``o`` of a transposed convolution reads tap ``t`` only if ``o + p - t * d`` is a multiple of
    ``s`` (per spatial dim), so the positions fall into ``prod(stride)`` phases (``o mod s`` in each dim) and the
    rows of one phase in :func:`unfold` are zero outside one set of taps, disjoint from the other phases' sets.
    Returned: one ``(taps, positions, source)`` triple of index tensors per phase with positions: the taps (into
    ``kernel_numel``) that any position of the phase reads, the positions (into :func:`unfold`'s last dim) of the
    phase, and ``source`` ``(taps, positions)``, the flat index (over ``in_spatial``) plus one of the input entry
    that each tap reads at each position, ``0`` where it reads a zero (the stuffing or the padding). All three are
    found by unfolding a probe that numbers the input's positions; a phase may read no tap at all (dilation).

    Examples
    --------
    >>> conv = nn.ConvTranspose1d(3, 2, kernel_size=4, stride=2, padding=1)
    >>> [(t.tolist(), p.tolist()) for t, p, _ in polyphase(conv, (3,))]
    [([0, 2], [0, 2, 4]), ([1, 3], [1, 3, 5])]
    >>> polyphase(conv, (3,))[0][2].tolist()   # input positions 1..3 (0: a zero) read by taps 0 and 2
    [[0, 1, 2], [1, 2, 3]]
    >>> polyphase(nn.Conv1d(3, 2, 4, stride=2), (9,)) is None
    True
    """
    if not is_transposed(conv) or all(s == 1 for s in conv.stride):
        return None
    numbered = torch.arange(1, math.prod(in_spatial) + 1, dtype=torch.float64).reshape(1, 1, *in_spatial)
    source = unfold(conv, numbered)[0].round().to(torch.int64)  # (taps, positions): exact integers below 2^53
    out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
           zip(in_spatial, conv.stride, conv.padding, conv.dilation, conv.kernel_size, conv.output_padding,
               strict=True)]
    grid = torch.meshgrid(*(torch.arange(n) % s for n, s in zip(out, conv.stride, strict=True)), indexing="ij")
    phase = torch.zeros(out, dtype=torch.int64)
    for g, s in zip(grid, conv.stride, strict=True):
        phase = phase * s + g
    phase = phase.reshape(-1)
    if phase.numel() != source.shape[1]:
        raise RuntimeError(f"{type(conv).__name__}: {source.shape[1]} unfolded positions but an output of {out}.")
    blocks = []
    for r in range(math.prod(conv.stride)):
        pos = torch.nonzero(phase == r).reshape(-1)
        if pos.numel():
            taps = torch.nonzero((source[:, pos] != 0).any(dim=1)).reshape(-1)
            blocks.append((taps, pos, source[taps][:, pos]))
    return blocks
