"""Tests of depthwise convolutions between a producer and its consumer (MobileNetV2 inverted-residual blocks).

The hidden channels of ``expand 1x1 -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project 1x1`` are the units. The
oracles are independent of the implementation: the original network with the removed channels zeroed at the
project's input (a pre-hook written here), numpy's lstsq on the project's input captured here, the original
tensors indexed by the kept channels, and parameter and FLOP counts written out from the layer sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import captured_input, randomise_bn, zeroed_at_consumers
from torch import nn

import nn_adapters as nna
from nn_adapters import zoo
from nn_adapters.budget import ParamModel

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _block(rank: int = 2, hidden: int = 12, dw_bias: bool = True, **dw: object) -> nn.Sequential:
    """One non-residual inverted-residual block: expand '0', BN '1', depthwise '3', BN '4', project '6'."""
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if rank == 1 else nn.BatchNorm2d
    torch.manual_seed(0)
    kw = {"kernel_size": 3, "padding": 1, **dw}
    return randomise_bn(nn.Sequential(
        conv(3, hidden, 1, bias=False), bn(hidden), nn.ReLU6(),
        conv(hidden, hidden, groups=hidden, bias=dw_bias, **kw), bn(hidden), nn.ReLU6(),
        conv(hidden, 5, 1)))


#: depthwise layouts: any kernel, stride, padding, dilation and padding mode filters each channel on its own
BLOCKS = {
    "3x3": lambda: _block(),
    "stride 2, no bias": lambda: _block(stride=2, dw_bias=False),
    "5x5 dilated reflect": lambda: _block(kernel_size=5, padding=4, dilation=2, padding_mode="reflect"),
    "same circular": lambda: _block(padding="same", padding_mode="circular"),
    "conv1d": lambda: _block(rank=1, kernel_size=5, padding=2, stride=2),
}


def _input(net: nn.Module, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 9, generator=g) if isinstance(net[0], nn.Conv1d) else torch.randn(n, 3, 7, 7, generator=g)


def _small_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(zoo.mobilenetv2_cifar(width_mult=0.25, stages=((16, 1, 1), (24, 2, 2), (32, 2, 2)),
                                               head=64))


def _mobilenet_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_discovery_puts_the_depthwise_conv_between_and_does_not_skip_it():
    pairs, skipped = nna.find_pairs(_block(), torch.zeros(2, 3, 7, 7))
    assert [(p.producer, p.consumer, p.kind, p.n_units, p.cols_per_unit, p.between) for p in pairs] == [
        ("0", "6", "conv->conv", 12, 1, ("1", "3", "4"))]
    assert dict(skipped) == {"6": "its output is the network output"}
    pairs, skipped = nna.find_pairs(_small_mobilenet(), torch.zeros(2, 3, 16, 16))
    hidden = {p.producer: p for p in pairs if p.producer.endswith("expand")}
    assert sorted(hidden) == [f"blocks.{i}.expand" for i in range(5)]  # every block's hidden channels
    for name, p in hidden.items():
        blk = name.rsplit(".", 1)[0]
        assert p.consumer == f"{blk}.project" and p.between == (f"{blk}.bn1", f"{blk}.depthwise", f"{blk}.bn2")
    # blocks 2 and 4 are residual: their project's output feeds the sum, and blocks 1 and 3's feeds the sum too
    # (their output is the next block's input and skip connection); block 0's feeds block 1's expand only
    reasons = dict(skipped)
    assert {f"blocks.{i}.project" for i in range(1, 5)} <= set(reasons)
    assert ("blocks.0.project", "blocks.1.expand", ("blocks.0.bn3",)) in {(p.producer, p.consumer, p.between)
                                                                           for p in pairs}
    assert not any("depthwise" in name for name in reasons)


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", nna.METHODS)
@pytest.mark.parametrize("case", sorted(BLOCKS))
def test_keep_everything_reproduces_a_block(case, method):
    net = BLOCKS[case]()
    x = _input(net)
    data = [(x, torch.randn(len(x), 5, *net(x).shape[2:]))] if method == "actgrad" else x
    pruned, report = nna.prune(net, data, keep=1.0, method=method, ridge=0.0, loss_fn=nn.functional.mse_loss)
    assert [(r.kept, r.n_units) for r in report.layers] == [(12, 12)]
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")
@pytest.mark.parametrize("method", nna.METHODS)
def test_keep_everything_reproduces_the_zoo_model(method):
    net = _small_mobilenet()
    x, y = _mobilenet_data()
    pruned, report = nna.prune(net, [(x, y)] if method == "actgrad" else x, keep=1.0, method=method, ridge=0.0)
    assert all(r.kept == r.n_units for r in report.layers)
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.parametrize("method", ["asym", "weight_norm"])
@pytest.mark.parametrize("case", sorted(BLOCKS))
def test_without_refit_the_block_is_the_original_with_removed_channels_zeroed(case, method):
    net = BLOCKS[case]()
    x = _input(net)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    assert len(report.layers) == 1 and report.layers[0].pair.endswith("->6") and len(report.layers[0].kept_units) == 6
    with torch.no_grad():
        assert _close(pruned(x), zeroed_at_consumers(net, report, x))


def test_without_refit_the_zoo_model_is_the_original_with_removed_channels_zeroed():
    net = _small_mobilenet()
    x, _ = _mobilenet_data()
    pruned, report = nna.prune(net, x, keep=0.5, method="seq", reweight=False)
    with torch.no_grad():
        assert _close(pruned(x), zeroed_at_consumers(net, report, x))


@pytest.mark.parametrize("case", ["3x3", "5x5 dilated reflect", "conv1d"])
def test_refit_equals_lstsq_on_the_captured_project_input(case):
    net = BLOCKS[case]().double()
    x = _input(net, 60).double()
    captured = captured_input(net, net[6], x)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = report.layers[0].kept_units
    h = captured.numpy()  # (N, 12, *positions); a 1x1 consumer reads each position's channels as one row
    A = np.moveaxis(h, 1, -1).reshape(-1, 12)
    W = net[6].weight.detach().numpy().reshape(5, 12)
    Y = A @ W.T
    sol = np.linalg.lstsq(np.hstack([A[:, kept], np.ones((len(A), 1))]), Y, rcond=None)[0]
    np.testing.assert_allclose(pruned[6].weight.detach().numpy().reshape(5, 6), sol[:-1].T, atol=1e-8)
    np.testing.assert_allclose(pruned[6].bias.detach().numpy(), net[6].bias.detach().numpy() + sol[-1], atol=1e-8)
    resid = ((Y - np.hstack([A[:, kept], np.ones((len(A), 1))]) @ sol) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
    assert report.layers[0].relative_error == pytest.approx(resid, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("reweight", [False, True])
def test_batchnorms_and_depthwise_filters_follow_the_kept_channels(reweight):
    net = _block()
    pruned, report = nna.prune(net, _input(net), keep=0.5, method="asym", reweight=reweight)
    kept = report.layers[0].kept_units
    dw, orig_dw = pruned[3], net[3]
    assert (dw.in_channels, dw.out_channels, dw.groups, tuple(dw.weight.shape)) == (6, 6, 6, (6, 1, 3, 3))
    assert torch.equal(dw.weight, orig_dw.weight[kept]) and torch.equal(dw.bias, orig_dw.bias[kept])
    for bn in ("1", "4"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(pruned.get_submodule(bn), name), getattr(net.get_submodule(bn), name)[kept])
        assert pruned.get_submodule(bn).num_features == 6
    assert torch.equal(pruned[0].weight, net[0].weight[kept]) and pruned[6].in_channels == 6
    if not reweight:
        assert torch.equal(pruned[6].weight, net[6].weight[:, kept])


def test_save_and_load_round_trip(tmp_path):
    net = _small_mobilenet()
    x, _ = _mobilenet_data()
    pruned, _ = nna.prune(net, x, keep=0.5, method="asym")
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / "m.pt"))  # rebuilt from the zoo
    assert back.blocks[1].depthwise.groups == pruned.blocks[1].depthwise.groups < net.blocks[1].depthwise.groups
    state = pruned.state_dict()
    assert state.keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))
    block = _block(stride=2)
    small, _ = nna.prune(block, _input(block), keep=0.25, method="layer")
    again = nna.load_pruned(nna.save_pruned(small, tmp_path / "b.pt"), base_model=_block(stride=2))
    assert (again[3].groups, again[3].stride) == (3, (2, 2))
    with torch.no_grad():
        assert torch.equal(again(_input(block)), small(_input(block)))


def test_files_without_groups_load_grouped_convs_with_the_base_models_groups(tmp_path):
    # files written before the spec recorded groups hold unpruned grouped convolutions only
    net = _block()
    path = nna.save_pruned(net, tmp_path / "old.pt")
    data = torch.load(path, weights_only=True)
    spec = json.loads(data["spec"])
    for shape in spec["shapes"].values():
        shape.pop("groups", None)
    torch.save({"spec": json.dumps(spec), "state_dict": data["state_dict"]}, path)
    back = nna.load_pruned(path, base_model=_block())
    assert back[3].groups == 12
    with torch.no_grad():
        assert torch.equal(back(_input(net)), net(_input(net)))


def test_declared_pairs_with_the_depthwise_conv():
    net = _block()
    x = _input(net)
    found, _ = nna.prune(net, x, keep=0.5, method="layer")
    declared, _ = nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("0", "6", ("1", "3", "4"))])
    assert all(torch.equal(v, declared.state_dict()[k]) for k, v in found.state_dict().items())
    with pytest.raises(ValueError, match=r"Conv2d '3' also receives the producer's units.*between=\('1', '3'\)"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("0", "6", ("1",))])
    wide = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.ReLU(),
                         nn.Conv2d(24, 5, 1)).eval()
    with pytest.raises(ValueError, match="channel multiplier 2"):
        nna.prune(wide, x, keep=0.5, method="layer", pairs=[nna.Pair("0", "4", ("2",))])
    with pytest.raises(ValueError, match=r"depthwise convolution \(groups=12\) is not supported as a consumer"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("0", "3", ("1",))])
    with pytest.raises(ValueError, match=r"depthwise convolution \(groups=12\) is not supported as a producer"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("3", "6", ("4",))])


@pytest.mark.parametrize("method", nna.METHODS)
def test_caller_model_untouched_hooks_removed_and_budgets_met(method):
    net = _small_mobilenet()
    x, y = _mobilenet_data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, report = nna.prune(net, [(x, y)] if method == "actgrad" else x, compression=1.25, method=method)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert report.compression >= 1.25
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(x).shape == (len(x), 10)


def test_param_model_and_flops_match_the_built_networks():
    net = _small_mobilenet()
    x, _ = _mobilenet_data()
    pairs, _ = nna.find_pairs(net, x)
    pm = ParamModel(net, pairs, adds_bias=True)
    assert ParamModel(net, pairs).total() == sum(p.numel() for p in net.parameters())
    for c, alloc in ((1.2, "uniform"), (1.4, "error")):
        pruned, rep = nna.prune(net, x, compression=c, method="layer", allocation=alloc)
        ks = np.array([r.kept for r in rep.layers])
        assert rep.compression >= c and pm.count(ks) == rep.params_after == sum(p.numel() for p in pruned.parameters())
    # one block, FLOPs written out from the layer sizes: 7x7 -> stride 2 -> 4x4, 2 per multiply-add
    block = _block(stride=2)
    pruned, rep = nna.prune(block, _input(block), keep=0.25, method="layer")
    flops = {k: 2 * (49 * 3 * k + 16 * 9 * k + 16 * k * 5) for k in (12, 3)}
    assert (rep.flops_before, rep.flops_after) == (flops[12], flops[3])
    # per hidden channel: an expand row (3), two BatchNorm entries (2 + 2), a 3x3 filter and its bias (9 + 1), a
    # project column (5); plus the project's bias
    assert (rep.params_before, rep.params_after) == (22 * 12 + 5, 22 * 3 + 5)


def test_grouped_and_multiplier_two_depthwise_convs_are_refused_with_the_reason():
    def reasons(between: nn.Module) -> dict[str, str]:
        net = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), between, nn.ReLU(), nn.Conv2d(between.out_channels, 5, 1))
        return dict(nna.find_pairs(net.eval(), torch.zeros(2, 3, 7, 7))[1])

    assert "channel multiplier 2 (12 -> 24 channels) is not supported" in reasons(
        nn.Conv2d(12, 24, 3, padding=1, groups=12))["0"]
    assert "grouped convolution (groups=2, in_channels=12) mixes the channels" in reasons(
        nn.Conv2d(12, 12, 3, padding=1, groups=2))["0"]
    class Reduced(nn.Module):  # (N, 2) read by a Conv1d as one unbatched (C=N, L=2) signal: samples, not channels
        def __init__(self):
            super().__init__()
            self.c, self.dw, self.fc = nn.Conv1d(3, 2, 3), nn.Conv1d(2, 2, 1, groups=2), nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(self.dw(self.c(x).mean(-1)))

    assert "reads a 2-D tensor (2, 2), not (N, C, L)" in dict(nna.find_pairs(Reduced(), torch.zeros(2, 3, 5))[1])["c"]
    dw_first = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.ReLU(), nn.Conv2d(3, 8, 1), nn.ReLU(),
                             nn.Conv2d(8, 2, 1)).eval()
    pairs, skipped = nna.find_pairs(dw_first, torch.zeros(2, 3, 7, 7))
    assert [p.name for p in pairs] == ["2->4"]
    assert "depthwise convolution (groups=3) is not supported as a producer" in dict(skipped)["0"]


class _SideReader(nn.Module):
    """``expand -> ReLU6 -> depthwise -> project`` whose depthwise output (or, for ``reader="producer"``, the
    producer's) is also read by a function, not a layer: a channel sum added to the network output."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reader = reader
        self.expand, self.project = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.expand(x))
        d = self.dw(h)
        if self.reader == "none":  # a random term that reads the input only: no second reader
            return self.project(d) + F.dropout(x[:, :1], 0.5, training=True)
        return self.project(d) + (d if self.reader == "depthwise" else h).sum(1, keepdim=True)


@pytest.mark.parametrize("reader", ["depthwise", "producer"])
def test_declared_pair_whose_units_a_function_also_reads_is_refused(reader):
    # removing channels would change what the second reader computes: the pruned network would silently differ from
    # the original with the removed channels zeroed at the project's input
    net = _SideReader(reader).eval()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="something besides the consumer reads them"):
        nna.prune(net, x, keep=0.5, method="layer", reweight=False, pairs=[nna.Pair("expand", "project", ("dw",))])
    random = _SideReader("none").eval()
    nna.prune(random, x, keep=0.5, method="layer", reweight=False, pairs=[nna.Pair("expand", "project", ("dw",))])


class _ScaledDepthwise(nn.Conv2d):
    """A depthwise convolution with one more parameter, a scalar gain (1, so it computes the plain layer)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


def test_param_model_keeps_the_parameters_of_a_layer_in_between_that_are_not_per_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), _ScaledDepthwise(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(20, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    pairs, _ = nna.find_pairs(net, x[:2])
    assert pairs[0].between == ("2",)
    pm = ParamModel(net, pairs)
    assert pm.total() == sum(p.numel() for p in net.parameters())
    pruned, _ = nna.prune(net, x, keep=0.5, reweight=False)
    # expand 4x3 + 4, depthwise 4x9 + 4 and the gain, project 4x4 + 4
    assert int(pm.count(np.array([4]))) == sum(p.numel() for p in pruned.parameters()) == 16 + 41 + 20


class _GatedBlock(nn.Module):
    """An EfficientNet-style block: the depthwise output is multiplied by a squeeze-and-excitation gate computed
    from itself (its squeeze a mean, or with ``max_pool`` a maximum, which is not a squeeze-and-excitation), and
    the project output by a learned per-channel scale."""

    def __init__(self, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.expand, self.dw = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project, self.fc = nn.Conv2d(16, 4, 1), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.dw(F.silu(self.expand(x))))
        pooled = h.amax((2, 3), keepdim=True) if self.max_pool else h.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.excite(F.silu(self.squeeze(pooled))))
        return self.fc((self.project(h * gate) * self.scale).mean((2, 3)))


def test_skip_reasons_name_the_branching_tensor_and_a_product():
    """The squeeze-and-excitation gate is pruned with the hidden channels (tests/test_nn_se.py); a gate that is not
    one is named at the tensor it branches from, after the depthwise convolution, not at the expand convolution's
    own output; a product with a learned scale is not called a residual sum."""
    pairs, skipped = nna.find_pairs(_GatedBlock(), torch.zeros(2, 4, 6, 6))
    assert ("expand", "project", ("squeeze", "excite")) in {(p.producer, p.consumer, p.se) for p in pairs}
    assert dict(skipped)["project"] == "its output feeds mul (a product with a tensor)"
    reasons = dict(nna.find_pairs(_GatedBlock(max_pool=True), torch.zeros(2, 4, 6, 6))[1])
    assert reasons["expand"].startswith("its output, after silu -> Conv2d -> silu, is multiplied by a gate computed "
                                        "from it that is not a squeeze-and-excitation")


@pytest.mark.parametrize("kwargs", [{"width_mult": 0.0}, {"width_mult": -1.0}, {"expand_ratio": 0},
                                    {"stages": []}, {"stages": [(16, 0, 1)]}, {"stages": [(16, 1)]}])
def test_mobilenet_builder_refuses_impossible_sizes(kwargs):
    with pytest.raises(ValueError, match="must be"):
        zoo.mobilenetv2_cifar(**kwargs)
