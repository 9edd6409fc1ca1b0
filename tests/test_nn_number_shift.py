"""A number added to or subtracted from the path between a producer and its consumer (``h + 1``, ``1 - h``,
``h.add(0.5)``) acts on each unit on its own, like a scale by a number: the pair is prunable. Such sums were refused
as residual sums. A sum with a tensor stays a residual sum.

Oracles: the unpruned network (keep everything), and the original network with the removed units zeroed at the
consumer's input (no refit).
"""

from __future__ import annotations

import pytest
import torch
from _torch_helpers import zeroed_at_consumers
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHIFTS = {
    "h + 1": lambda h: h + 1,
    "1 + h": lambda h: 1 + h,
    "h - 0.5": lambda h: h - 0.5,
    "1 - h": lambda h: 1 - h,
    "h.add(1)": lambda h: h.add(1),
    "torch.sub(h, 2.0)": lambda h: torch.sub(h, 2.0),
}
SIZE_SHIFT = "h + h.shape[-1]"  # a convolution's width, fixed; a Linear's units, which pruning changes
SHIFTS[SIZE_SHIFT] = lambda h: h + h.shape[-1]


class Shifted(nn.Module):
    def __init__(self, shift: str, conv: bool) -> None:
        super().__init__()
        self.shift = SHIFTS[shift]
        if conv:
            self.a, self.b = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        else:
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.shift(torch.relu(self.a(x))))


def _data(conv: bool) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(64, 2, 5, 5) if conv else torch.randn(64, 4)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_a_number_added_on_the_way_keeps_the_pair_prunable(shift, conv):
    torch.manual_seed(0)
    net, x = Shifted(shift, conv).eval(), _data(conv)
    pairs, skipped = nna.find_pairs(net, x[:2])
    if shift == SIZE_SHIFT and not conv:  # adds the number of units, which pruning changes: not one unit alone
        assert pairs == [] and dict(skipped)["a"] == "its output, after relu, feeds add (a residual sum)"
        return
    assert [p.name for p in pairs] == ["a->b"]
    for method in ("layer", "asym"):
        kept_all, _ = nna.prune(net, x, keep=1.0, method=method)
        with torch.no_grad():
            torch.testing.assert_close(kept_all(x), net(x), rtol=1e-5, atol=1e-5)
    pruned, report = nna.prune(net, x, keep=0.5, reweight=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x), rtol=1e-5, atol=1e-5)


def test_a_tensor_added_on_the_way_is_still_a_residual_sum():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) + x)

    _, skipped = nna.find_pairs(Residual(), torch.randn(2, 8))
    assert dict(skipped)["a"] == "its output, after relu, feeds add (a residual sum)"


def test_torch_sub_with_the_path_second_is_a_residual_sum():
    """torch.sub was missing from the sums the walk knows: torch.sub(x, h) was reported as 'operation sub does not
    take the producer's output as its first argument' instead of as the residual sum it is."""
    class Difference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.sub(x, torch.relu(self.a(x))))

    _, skipped = nna.find_pairs(Difference(), torch.randn(2, 8))
    assert dict(skipped)["a"] == "its output, after relu, feeds sub (a residual sum) as its second term"
