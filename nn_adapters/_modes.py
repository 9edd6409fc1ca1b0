"""Train/eval modes, module by module: ``model.train(flag)`` sets one flag on every layer, which loses a user's
per-module choices (a BatchNorm frozen in eval mode inside a model in train mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "copy_modes"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then give every module back its own mode."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


def copy_modes(src: nn.Module, dst: nn.Module) -> None:
    """Give each module of ``dst`` the mode of the module of ``src`` with the same name (else ``src``'s own)."""
    flags = {name: m.training for name, m in src.named_modules()}
    for name, m in dst.named_modules():
        m.training = flags.get(name, src.training)
