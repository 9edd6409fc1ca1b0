"""Helpers shared by the PyTorch pruning tests (imported by the test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm (1-D and 2-D) random running statistics and affine parameters (fixed seed), so that
    removing a channel's BatchNorm entries is observable; returns the model in eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class GlobalPoolNet(nn.Module):
    """Two convolutions (``nn.Conv1d`` or ``nn.Conv2d``, 1 -> 6 -> 8 channels) and a Linear(8, 3) behind a global
    pooling ``head`` written in ``forward()`` (as in many timm-style models)."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], conv: type[nn.Module] = nn.Conv2d) -> None:
        super().__init__()
        self.head = head
        self.c1, self.c2, self.fc = conv(1, 6, 3, padding=1), conv(6, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(F.relu(self.c2(F.relu(self.c1(x))))))
