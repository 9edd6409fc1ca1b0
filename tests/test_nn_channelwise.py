"""Channel-preserving operations between a convolution producer and its consumer: resampling (``nn.Upsample``,
``F.interpolate``) and padding (``nn.ZeroPad2d``, ``nn.ConstantPad1d/2d``, ``nn.ReflectionPad2d``,
``nn.ReplicationPad1d``, ``nn.CircularPad2d``, ``F.pad``), which act on each channel's positions on its own, and
instance normalisation
(``nn.InstanceNorm1d/2d``, with or without affine entries and running statistics), which normalises each channel
on its own. Removing channel ``c`` of the producer removes channel ``c`` after them (and its InstanceNorm
entries) and nothing else.

Oracles, independent of the implementation: the unpruned network (keep everything), the original network with the
removed channels zeroed at the consumer's input (no refit), numpy's lstsq on the consumer's unfolded input
captured here (the refit), and the original InstanceNorm tensors indexed by the kept channels.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import captured_input, check_budgets_against_built_networks, zeroed_at_consumers
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


class Padded(nn.Module):
    """conv -> ReLU -> F.pad (any mode, spatial dims only) -> conv."""

    def __init__(self, pad: tuple[int, ...], consumer_channels: int = 8, **kw: object) -> None:
        super().__init__()
        self.pad, self.kw = pad, kw
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(consumer_channels, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.pad(F.relu(self.c1(x)), self.pad, **self.kw))


def _seq(*between: nn.Module, conv: type[nn.Module] = nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), *between, conv(8, 5, 3))


def _randomised(norm: nn.Module) -> nn.Module:
    """Random affine entries and running statistics (fixed seed), so that dropping the wrong ones shows."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        if norm.affine:
            norm.weight.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=g))
        if norm.track_running_stats:
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=g))
            norm.running_var.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
    return norm


NETS = {
    "Upsample nearest": lambda: _seq(nn.Upsample(scale_factor=2)),
    "Upsample bilinear to a size": lambda: _seq(nn.Upsample(size=(9, 7), mode="bilinear")),
    "UpsamplingBilinear2d": lambda: _seq(nn.UpsamplingBilinear2d(scale_factor=2)),
    "UpsamplingNearest2d then pooling": lambda: _seq(nn.UpsamplingNearest2d(scale_factor=3), nn.MaxPool2d(2)),
    "interpolate nearest": lambda: Interpolated("nearest", scale_factor=2),
    "interpolate bilinear": lambda: Interpolated("bilinear", scale_factor=1.5, align_corners=True),
    "interpolate linear, 1-D": lambda: Interpolated("linear", nn.Conv1d, size=11),
    "InstanceNorm2d": lambda: _seq(nn.InstanceNorm2d(8)),
    "InstanceNorm2d affine": lambda: _seq(_randomised(nn.InstanceNorm2d(8, affine=True))),
    "InstanceNorm2d affine, running stats": lambda: _seq(
        _randomised(nn.InstanceNorm2d(8, affine=True, track_running_stats=True))),
    "InstanceNorm1d running stats, 1-D": lambda: _seq(_randomised(nn.InstanceNorm1d(8, track_running_stats=True)),
                                                      conv=nn.Conv1d),
    "InstanceNorm2d then Upsample": lambda: _seq(_randomised(nn.InstanceNorm2d(8, affine=True)),
                                                 nn.Upsample(scale_factor=2, mode="bilinear")),
    "ZeroPad2d, uneven": lambda: _seq(nn.ZeroPad2d((1, 2, 0, 1))),
    "ConstantPad2d 0.5": lambda: _seq(nn.ConstantPad2d(1, 0.5)),
    "ConstantPad1d of the width only, -1": lambda: _seq(nn.ConstantPad1d((0, 2), -1.0)),
    "ReflectionPad2d then ReLU": lambda: _seq(nn.ReflectionPad2d(1), nn.ReLU()),
    "ReplicationPad1d, 1-D": lambda: _seq(nn.ReplicationPad1d((2, 0)), conv=nn.Conv1d),
    "CircularPad2d": lambda: _seq(nn.CircularPad2d((1, 1, 2, 0))),
    "pad reflect": lambda: Padded((1, 1, 2, 0), mode="reflect"),
    "pad constant 2": lambda: Padded((0, 1), value=2.0),
}
#: the per-channel layers with entries that a pair records (InstanceNorms; resampling has none)
BETWEEN = {case: ("2",) for case in NETS if case.startswith("InstanceNorm")}


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
        (producer, _consumer(net)[0], "conv->conv", 8, BETWEEN.get(case, ()))]
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


@pytest.mark.parametrize("case", ["Upsample bilinear to a size", "interpolate linear, 1-D",
                                  "InstanceNorm2d affine, running stats", "InstanceNorm1d running stats, 1-D",
                                  "ConstantPad2d 0.5", "ReplicationPad1d, 1-D", "pad reflect"])
def test_refit_equals_lstsq_on_the_captured_consumer_input(case):
    net, x = _build(case)
    net, x = net.double(), x.double()
    name, cons = _consumer(net)
    h = captured_input(net, cons, x)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = np.asarray(report.layers[0].kept_units)
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


@pytest.mark.parametrize("case", sorted(BETWEEN))
def test_instance_norm_entries_follow_the_kept_channels_and_save_and_load(case, tmp_path):
    net, x = _build(case)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym")
    kept = report.layers[0].kept_units
    norm, orig = pruned[2], net[2]
    assert norm.num_features == 4
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(orig, name) is None:
            assert getattr(norm, name) is None
        else:
            assert torch.equal(getattr(norm, name), getattr(orig, name)[kept])
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / "m.pt"), base_model=NETS[case]())
    assert back[2].num_features == 4
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))


@pytest.mark.parametrize("case", sorted(BETWEEN))
def test_a_declared_pair_through_an_instance_norm_passes_its_check(case):
    """The declared-pair check adds an offset to some channels and looks for them at the consumer: an offset
    constant over a channel's positions is what an InstanceNorm removes, so the consumer seemed not to read them."""
    net, x = _build(case)
    declared, _ = nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("0", _consumer(net)[0], ("2",))])
    found, _ = nna.prune(net, x, keep=0.5, method="layer")
    for a, b in zip(declared.state_dict().values(), found.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("net", "x", "match"), [
    (nn.Sequential(nn.Linear(4, 8), nn.InstanceNorm1d(8), nn.Linear(8, 3)), torch.randn(2, 5, 4),
     r"InstanceNorm1d '1' after a Linear producer normalises across its units \(the last dim\)"),
    (nn.Sequential(nn.Conv1d(3, 8, 3), nn.InstanceNorm2d(8), nn.Conv1d(8, 3, 3)), torch.randn(2, 3, 9),
     r"InstanceNorm2d '1' reads a 3-D tensor \(2, 8, 7\) as \(N, C, H, W\).*across the producer's channels"),
])
@pytest.mark.filterwarnings("ignore:input's size at dim")  # what torch says about the mixing
def test_instance_norms_that_mix_units_are_refused_with_the_reason(net, x, match):
    pairs, skipped = nna.find_pairs(net, x)
    assert not pairs
    assert re.search(match, dict(skipped)["0"])


def test_parameter_budgets_count_the_instance_norm_entries():
    """The closed-form parameter count of nn_adapters.budget (affine InstanceNorm entries per kept channel) equals
    the parameters of the networks built at each compression."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _randomised(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
        nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(8, 6, 3), nn.InstanceNorm2d(6, affine=True), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 10 * 10, 3)).eval()
    check_budgets_against_built_networks(net, torch.randn(40, 3, 6, 6), (1.5, 2.0))


@pytest.mark.parametrize(("net", "x", "match"), [
    (nn.Sequential(nn.Linear(4, 8), nn.ConstantPad1d(1, 0.0), nn.Linear(10, 3)), torch.randn(2, 4),
     "padding '1' after a Linear producer pads its units"),
    (Padded((0, 0, 0, 0, 1, 1), consumer_channels=10), torch.randn(2, 3, 6, 6),
     r"changes the sample or channel dims \(2, 8\) -> \(2, 10\)"),
    (nn.Sequential(nn.Conv1d(3, 8, 3), nn.ZeroPad2d(1), nn.Conv1d(10, 2, 3)), torch.randn(2, 3, 7),
     r"changes the sample or channel dims \(2, 8\) -> \(2, 10\)"),
])
def test_padding_that_is_not_per_channel_is_refused_with_the_reason(net, x, match):
    pairs, skipped = nna.find_pairs(net.eval(), x)
    assert not pairs
    assert re.search(match, " ".join(why for _, why in skipped))
