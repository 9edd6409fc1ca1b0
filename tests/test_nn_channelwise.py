"""Channel-preserving operations between a convolution producer and its consumer: resampling (``nn.Upsample``,
``F.interpolate``), which acts on each channel's positions on its own, so removing channel ``c`` of the producer
removes channel ``c`` after it and nothing else.

Oracles, independent of the implementation: the unpruned network (keep everything), the original network with the
removed channels zeroed at the consumer's input (no refit), and numpy's lstsq on the consumer's unfolded input
captured here (the refit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import zeroed_at_consumers
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Interpolated(nn.Module):
    """conv -> ReLU -> F.interpolate -> conv, 1-D or 2-D."""

    def __init__(self, mode: str, conv: type[nn.Module] = nn.Conv2d, **kw: object) -> None:
        super().__init__()
        self.mode, self.kw = mode, kw
        self.c1, self.c2 = conv(3, 8, 3, padding=1), conv(8, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.interpolate(F.relu(self.c1(x)), mode=self.mode, **self.kw))


def _seq(*between: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), *between, nn.Conv2d(8, 5, 3))


NETS = {
    "Upsample nearest": lambda: _seq(nn.Upsample(scale_factor=2)),
    "Upsample bilinear to a size": lambda: _seq(nn.Upsample(size=(9, 7), mode="bilinear")),
    "UpsamplingBilinear2d": lambda: _seq(nn.UpsamplingBilinear2d(scale_factor=2)),
    "UpsamplingNearest2d then pooling": lambda: _seq(nn.UpsamplingNearest2d(scale_factor=3), nn.MaxPool2d(2)),
    "interpolate nearest": lambda: Interpolated("nearest", scale_factor=2),
    "interpolate bilinear": lambda: Interpolated("bilinear", scale_factor=1.5, align_corners=True),
    "interpolate linear, 1-D": lambda: Interpolated("linear", nn.Conv1d, size=11),
}


def _build(case: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = NETS[case]().eval()
    g = torch.Generator().manual_seed(1)
    shape = (40, 3, 8) if "1-D" in case else (40, 3, 6, 6)
    return net, torch.randn(*shape, generator=g)


def _consumer(net: nn.Module) -> tuple[str, nn.Module]:
    return list(net.named_children())[-1]


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("case", sorted(NETS))
def test_the_resampling_lies_inside_the_pair(case):
    net, x = _build(case)
    pairs, skipped = nna.find_pairs(net, x[:2])
    producer = next(iter(dict(net.named_children())))
    assert [(p.producer, p.consumer, p.kind, p.n_units, p.between) for p in pairs] == [
        (producer, _consumer(net)[0], "conv->conv", 8, ())]
    assert dict(skipped) == {_consumer(net)[0]: "its output is the network output"}


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", ["asym", "layer", "weight_norm"])
@pytest.mark.parametrize("case", sorted(NETS))
def test_keep_everything_reproduces_the_network(case, method):
    net, x = _build(case)
    pruned, report = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    assert [(r.kept, r.n_units) for r in report.layers] == [(8, 8)]
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.parametrize("case", sorted(NETS))
def test_without_refit_the_network_is_the_original_with_removed_channels_zeroed(case):
    net, x = _build(case)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    assert len(report.layers[0].kept_units) == 4 and _consumer(pruned)[1].in_channels == 4
    with torch.no_grad():
        assert _close(pruned(x), zeroed_at_consumers(net, report, x))
        assert not _close(pruned(x), net(x))


@pytest.mark.parametrize("case", ["Upsample bilinear to a size", "interpolate linear, 1-D"])
def test_refit_equals_lstsq_on_the_captured_consumer_input(case):
    net, x = _build(case)
    net, x = net.double(), x.double()
    name, cons = _consumer(net)
    seen = []
    handle = cons.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = np.asarray(report.layers[0].kept_units)
    h = seen[0]
    if h.dim() == 3:  # a 1-D convolution's patches: the 2-D unfold of an (N, C, 1, L) map
        h = h.unsqueeze(2)
    k = cons.kernel_size if len(cons.kernel_size) == 2 else (1, *cons.kernel_size)
    taps = k[0] * k[1]
    patches = F.unfold(h, k).transpose(1, 2).reshape(-1, 8 * taps).numpy()  # rows: positions; columns: channel-major
    W = cons.weight.detach().reshape(5, -1).numpy()
    Y = patches @ W.T
    cols = (kept[:, None] * taps + np.arange(taps)).ravel()
    A = np.hstack([patches[:, cols], np.ones((len(patches), 1))])
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    new = dict(pruned.named_children())[name]
    np.testing.assert_allclose(new.weight.detach().reshape(5, -1).numpy(), sol[:-1].T, atol=1e-8)
    np.testing.assert_allclose(new.bias.detach().numpy(), cons.bias.detach().numpy() + sol[-1], atol=1e-8)


def test_resampling_after_a_linear_producer_is_refused_with_the_reason():
    net = nn.Sequential(nn.Linear(4, 8), nn.Upsample(scale_factor=2), nn.Linear(16, 3))
    pairs, skipped = nna.find_pairs(net, torch.randn(2, 5, 4))
    assert not pairs
    assert "resampling '1' after a Linear producer interpolates across its units" in dict(skipped)["0"]
