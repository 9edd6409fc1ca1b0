"""What the pruner needs to know about the layer kinds it prunes, in one place.

The producers and consumers are ``nn.Linear`` and the convolutions ``nn.Conv1d`` / ``nn.Conv2d``. The two
convolutions differ only in their number of spatial dims (their *rank*): a channel is ``prod(kernel_size)`` columns
of the consumer's unfolded input, and a 1-D input ``(N, C, L)`` is unfolded as the 2-D input ``(N, C, 1, L)`` with a
``(1, k)`` kernel, so every other module handles both convolutions with one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: The convolutions that can be producers and consumers.
CONV_TYPES = (nn.Conv1d, nn.Conv2d)
#: Every prunable layer kind (producers and consumers).
LAYER_TYPES = (nn.Linear, *CONV_TYPES)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a supported convolution (or a subclass of one)."""
    return isinstance(module, CONV_TYPES)


def base_class(module: nn.Module) -> type[nn.Module]:
    """The torch layer class that ``module`` is an instance of (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``)."""
    return next(t for t in LAYER_TYPES if isinstance(module, t))


def rank(conv: nn.Module) -> int:
    """Number of spatial dims of a convolution (1 for ``Conv1d``, 2 for ``Conv2d``)."""
    return len(conv.kernel_size)


def kernel_numel(conv: nn.Module) -> int:
    """Kernel taps per input channel: the consumer columns of one channel."""
    return math.prod(conv.kernel_size)


def layout(conv: nn.Module) -> str:
    """The input layout of a convolution, for messages: ``"(N, C, L)"`` or ``"(N, C, H, W)"``."""
    return "(N, C, L)" if rank(conv) == 1 else "(N, C, H, W)"


def unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches ``conv`` reads from ``x`` (``(N, C, *spatial)``) as ``(N, C * kernel_numel, positions)``, with the
    consumer's kernel, stride, explicit zero padding (``"valid"`` is 0) and dilation; the columns of channel ``c``
    are its taps ``c * kernel_numel ... (c + 1) * kernel_numel - 1``, the layout of ``conv.weight[:, c]``."""
    lead = 2 - rank(conv)  # a 1-D conv reads (N, C, L) as the image (N, C, 1, L) with a (1, k) kernel
    padding = (0,) * rank(conv) if conv.padding == "valid" else conv.padding
    return F.unfold(x.reshape(*x.shape[:2], *(1,) * lead, *x.shape[2:]), (1,) * lead + tuple(conv.kernel_size),
                    dilation=(1,) * lead + tuple(conv.dilation), padding=(0,) * lead + tuple(padding),
                    stride=(1,) * lead + tuple(conv.stride))
