"""Helpers shared by the PyTorch pruning tests (imported by the test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
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
