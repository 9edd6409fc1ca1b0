"""Tests of squeeze-and-excitation gates between a producer and its consumer (EfficientNet / MobileNetV3 blocks).

The hidden channels of ``expand -> BN -> SiLU -> depthwise -> BN -> SiLU -> h * sigmoid(fc2(silu(fc1(mean(h)))))
-> project`` are the units. Removing channel ``j`` removes the consumer's input channel ``j``, ``fc2``'s row ``j`` and
``fc1``'s column ``j``, whose contribution is folded into ``fc1``'s bias at the calibration mean of the pooled
channel. The oracles are written from that statement, independently of the implementation: the ORIGINAL network
with hooks (the removed channels zeroed at every consumer's input and their pooled values replaced by calibration
means, computed here, at ``fc1``'s input), numpy's lstsq on the consumer's input captured here, and parameter
counts written out from the layer sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import captured_input, check_budgets_against_built_networks, randomise_bn, zeroed_at_consumers
from torch import nn

import nn_adapters as nna
from nn_adapters import zoo

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SE_PAIR = "expand->project"


def _block(linear: bool = False) -> nn.Module:
    """One non-residual MBConv block (4 -> 12 hidden -> 5 channels, gate reduced to 2) with random BatchNorms."""
    torch.manual_seed(0)
    return randomise_bn(zoo.MBConv(4, 5, stride=1, expand_ratio=3, kernel=3, se_ratio=0.5, se_linear=linear))


def _small_net(linear: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(zoo.efficientnet_cifar(width_mult=0.25, stages=((1, 16, 1, 1, 3), (6, 24, 2, 2, 3),
                                                                        (6, 32, 1, 2, 5)), head=64, se_linear=linear))


def _x(n: int = 40, c: int = 4, side: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def _gates(net: nn.Module) -> dict[str, tuple[str, str]]:
    """``{consumer: (fc1, fc2)}`` of every SqueezeExcite module, read from the module structure."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, zoo.MBConv):
            pre = f"{name}." if name else ""
            out[f"{pre}project"] = (f"{pre}se.fc1", f"{pre}se.fc2")
    return out


def _pooled_means(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Calibration mean of every pooled channel at each gate's fc1 input, in the ORIGINAL network."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for fc1, _ in _gates(net).values():
        def hook(_m, inp, fc1=fc1):
            sums[fc1] = inp[0].detach().to(torch.float64).reshape(len(inp[0]), -1).mean(0)
        handles.append(net.get_submodule(fc1).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return sums


def _oracle(net: nn.Module, report: nna.PruneReport, x_calib: torch.Tensor, x: torch.Tensor,
            correction: bool = True) -> torch.Tensor:
    """The original network on ``x`` with, for every pruned SE pair, the removed channels' pooled values at fc1's
    input replaced by their calibration means (zero without the correction), and the removed units zeroed at
    every consumer's input."""
    means = _pooled_means(net, x_calib)
    gates = _gates(net)
    handles = []
    for lr in report.layers:
        consumer = lr.pair.split("->")[1]
        if consumer not in gates:
            continue
        fc1 = gates[consumer][0]
        removed = torch.tensor(sorted(set(range(lr.n_units)) - set(lr.kept_units)), dtype=torch.long)
        fill = means[fc1] if correction else torch.zeros(lr.n_units, dtype=torch.float64)

        def hook(_m, inp, removed=removed, fill=fill):
            p = inp[0].clone()
            p[:, removed] = fill[removed].to(p).reshape(-1, *[1] * (p.dim() - 2))
            return (p,)
        handles.append(net.get_submodule(fc1).register_forward_pre_hook(hook))
    try:
        return zeroed_at_consumers(net, report, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("linear", [False, True])
def test_discovery_records_the_gate_of_an_mbconv_block(linear):
    pairs, skipped = nna.find_pairs(_block(linear), _x(2))
    found = {p.name: p for p in pairs}
    p = found[SE_PAIR]
    assert (p.kind, p.n_units, p.cols_per_unit, p.between, p.se) == (
        "conv->conv", 12, 1, ("bn1", "depthwise", "bn2"), ("se.fc1", "se.fc2"))
    assert p.se_input_node is not None
    # the gate's hidden units are a pair of their own; fc2's rows go with the SE pair, so it is not listed as skipped
    assert found["se.fc1->se.fc2"].n_units == 2
    assert dict(skipped) == {"project": "its output is the network output"}


@pytest.mark.parametrize("linear", [False, True])
def test_discovery_on_the_zoo_network(linear):
    net = _small_net(linear)
    pairs, skipped = nna.find_pairs(net, torch.zeros(2, 3, 16, 16))
    with_se = {p.consumer: p.se for p in pairs if p.se}
    assert with_se == _gates(net)  # every block's gate, the stem's channels through block 0 (expand ratio 1)
    assert {p.producer for p in pairs if p.se} == {"stem", "blocks.1.expand", "blocks.2.expand", "blocks.3.expand"}
    assert not any(name.endswith("fc2") for name, _ in skipped)


class _Gated(nn.Module):
    """``expand -> SiLU -> h * gate -> project`` with a gate of the given ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.expand, self.side, self.project = nn.Conv2d(4, 12, 1), nn.Conv2d(4, 12, 1), nn.Conv2d(12, 5, 1)
        self.fc1 = nn.Conv2d(12, 3, 1)
        self.fc2 = nn.Conv2d(3, 1 if kind == "one factor" else 12, 1)
        self.spatial = nn.Conv2d(12, 1, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 12, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.expand(x))
        if self.kind == "scale":
            return self.project(h * self.scale)
        if self.kind == "spatial":
            return self.project(h * torch.sigmoid(self.spatial(h)))
        src = self.side(x) if self.kind == "other tensor" else h
        pooled = src.mean((2, 3), keepdim=True)
        if self.kind == "mixed":
            pooled = pooled + self.side(x).mean((2, 3), keepdim=True)
        return self.project(h * torch.sigmoid(self.fc2(F.silu(self.fc1(pooled)))))


@pytest.mark.parametrize(("kind", "reason"), [
    ("se", None),
    ("other tensor", "its output feeds mul, a product with a gate (sigmoid) computed from another tensor"),
    ("mixed", "is multiplied by a gate computed from it that is not a squeeze-and-excitation: its call_function add "
              "also reads mean_1 (a gate computed from another tensor)"),
    ("spatial", "is multiplied by a gate computed from it that is not a squeeze-and-excitation: it starts with "
                "Conv2d 'spatial', not a global average pooling"),
    ("one factor", "is multiplied by a gate computed from it that is not a squeeze-and-excitation: its fc2 Conv2d "
                   "'fc2' outputs 1 channels, not the 12 channels it gates"),
])  # a learned per-channel scale stays refused: test_nn_depthwise.py::test_skip_reasons_name_the_branching_tensor...
def test_other_gates_are_refused_with_a_reason_that_names_the_gate(kind, reason):
    pairs, skipped = nna.find_pairs(_Gated(kind).eval(), _x(2))
    if reason is None:
        assert [(p.name, p.se) for p in pairs if p.producer == "expand"] == [("expand->project", ("fc1", "fc2"))]
    else:
        assert "expand" not in {p.producer for p in pairs}
        assert reason in dict(skipped)["expand"]


class _SizedGate(nn.Module):
    """A Linear gate reshaped back to ``(N, C, 1, 1)`` with sizes read from the block's input ``x`` (``own=False``:
    12 channels, as many as the gated tensor, by coincidence) or from the gated tensor ``h`` itself."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.own = own
        self.expand, self.project = nn.Conv2d(12, 12, 1), nn.Conv2d(12, 5, 1)
        self.fc1, self.fc2 = nn.Linear(12, 3), nn.Linear(3, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.expand(x))
        b, c = (h if self.own else x).shape[:2]
        return self.project(h * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3)))))).view(b, c, 1, 1))


@pytest.mark.parametrize("method", ["layer", "seq"])
def test_a_gate_reshaped_with_the_sizes_of_another_tensor_is_refused(method):
    # c = x.shape[1] does not follow the kept channels: the gate was accepted, and pruning failed with a raw
    # RuntimeError in view() ("shape '[2, 12, 1, 1]' is invalid for input of size 12").
    x = torch.randn(30, 12, 5, 5, generator=torch.Generator().manual_seed(1))
    _, skipped = nna.find_pairs(_SizedGate(own=False).eval(), x[:2])
    assert "its call_method view takes a size of x, not of the tensor it gates" in dict(skipped)["expand"]
    pruned, report = nna.prune(_SizedGate(own=False).eval(), x, keep=0.5, method=method)
    assert "expand->project" not in {lr.pair for lr in report.layers}
    assert pruned(x).shape == (30, 5, 5, 5)
    # the same gate with the sizes of the gated tensor is an SE gate (b, the batch size, may come from anywhere)
    pruned, report = nna.prune(_SizedGate(own=True).eval(), x, keep=0.5, method=method)
    assert {lr.pair: lr.kept for lr in report.layers}["expand->project"] == 6
    assert pruned(x).shape == (30, 5, 5, 5)


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", nna.METHODS)
@pytest.mark.parametrize("linear", [False, True])
def test_keep_everything_reproduces_the_block(linear, method):
    net = _block(linear)
    x = _x()
    data = [(x, torch.randn(len(x), 5, 7, 7))] if method == "actgrad" else x
    pruned, report = nna.prune(net, data, keep=1.0, method=method, ridge=0.0, loss_fn=F.mse_loss)
    assert all(r.kept == r.n_units for r in report.layers)
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")
@pytest.mark.parametrize("method", ["asym", "seq", "layer"])
def test_keep_everything_reproduces_the_zoo_network(method):
    net = _small_net()
    x = _x(24, 3, 16, 3)
    pruned, _ = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("method", ["asym", "seq", "layer", "weight_norm", "random"])
@pytest.mark.parametrize("linear", [False, True])
def test_without_refit_the_block_is_the_original_with_removed_channels_zeroed_and_pooled_at_their_mean(
        linear, method, correction):
    net = _block(linear)
    x, x_new = _x(), _x(seed=5)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False, se_bias_correction=correction)
    assert {r.pair: r.kept for r in report.layers} == {SE_PAIR: 6, "se.fc1->se.fc2": 1}
    with torch.no_grad():
        # on new inputs too: the correction is a constant, the calibration mean
        for inp in (x, x_new):
            assert _close(pruned(inp), _oracle(net, report, x, inp, correction))
        if correction:  # the oracle is not vacuous: the zero fill gives another network
            assert not _close(pruned(x), _oracle(net, report, x, x, correction=False))


@pytest.mark.parametrize(("method", "refit_from"), [("layer", "layer"), ("weight_norm", "layer")])
def test_without_refit_the_zoo_network_is_the_original_with_removed_channels_zeroed_and_pooled_at_their_mean(
        method, refit_from):
    # layer statistics: every gate's means are those of the original network
    net = _small_net()
    x = _x(24, 3, 16, 3)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False, refit_from=refit_from)
    assert sum(1 for r in report.layers if r.pair.split("->")[1] in _gates(net)) == 4
    with torch.no_grad():
        assert _close(pruned(x), _oracle(net, report, x, x))


@pytest.mark.parametrize("linear", [False, True])
def test_refit_equals_lstsq_on_the_captured_gated_input(linear):
    net = _block(linear).double()
    x = _x(60).double()
    captured = captured_input(net, net.project, x)
    pruned, report = nna.prune(net, x, keep={SE_PAIR: 0.5}, method="layer", ridge=0.0)
    (lr,) = [r for r in report.layers if r.pair == SE_PAIR]
    kept = lr.kept_units
    A = np.moveaxis(captured.numpy(), 1, -1).reshape(-1, 12)  # the gated activations h * s, one row per position
    W = net.project.weight.detach().numpy().reshape(5, 12)
    Y = A @ W.T
    design = np.hstack([A[:, kept], np.ones((len(A), 1))])
    sol = np.linalg.lstsq(design, Y, rcond=None)[0]
    np.testing.assert_allclose(pruned.project.weight.detach().numpy().reshape(5, 6), sol[:-1].T, atol=1e-8)
    np.testing.assert_allclose(pruned.project.bias.detach().numpy(), sol[-1], atol=1e-8)  # project had no bias
    resid = ((Y - design @ sol) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
    assert lr.relative_error == pytest.approx(resid, rel=1e-6, abs=1e-10)


def test_the_gate_layers_follow_the_kept_channels_and_fc1_bias_absorbs_the_removed_ones():
    net = _block()
    x = _x()
    pruned, report = nna.prune(net, x, keep={SE_PAIR: 0.5}, method="asym", reweight=False)
    kept = report.layers[[r.pair for r in report.layers].index(SE_PAIR)].kept_units
    removed = sorted(set(range(12)) - set(kept))
    fc1, fc2 = pruned.se.fc1, pruned.se.fc2
    assert (fc1.in_channels, fc2.out_channels, tuple(fc1.weight.shape), tuple(fc2.weight.shape)) == (
        6, 6, (2, 6, 1, 1), (6, 2, 1, 1))
    assert torch.equal(fc1.weight, net.se.fc1.weight[:, kept]) and torch.equal(fc2.weight, net.se.fc2.weight[kept])
    assert torch.equal(fc2.bias, net.se.fc2.bias[kept])
    mean = _pooled_means(net, x)["se.fc1"]
    want = net.se.fc1.bias.double() + net.se.fc1.weight.double()[:, removed, 0, 0] @ mean[removed]
    torch.testing.assert_close(fc1.bias.double(), want.detach(), atol=1e-6, rtol=0)


def test_param_counts_written_out_from_the_layer_sizes():
    net = _block()
    pruned, rep = nna.prune(net, _x(), keep={SE_PAIR: 0.5}, method="layer")
    # per hidden channel: an expand row (4), two BatchNorm entries (2 + 2), a 3x3 filter (9), an fc1 column (2),
    # an fc2 row and bias (2 + 1), a project column (5); fixed: fc1's bias (2), bn3 (10), project's bias added by
    # the refit (5)
    assert (rep.params_before, rep.params_after) == (27 * 12 + 2 + 10, 27 * 6 + 2 + 10 + 5)
    # FLOPs per sample (2 per multiply-add): expand, depthwise and project on 7x7, fc1 and fc2 on 1x1
    flops = {k: 2 * (49 * 4 * k + 49 * 9 * k + 49 * k * 5 + k * 2 + 2 * k) for k in (12, 6)}
    assert (rep.flops_before, rep.flops_after) == (flops[12], flops[6])


def test_budgets_match_the_built_networks():
    net = _small_net()
    check_budgets_against_built_networks(net, _x(24, 3, 16, 3), (1.3, 1.8))
    # a gate whose fc1 has no bias gets one from the correction: counted too
    block = _block()
    block.se.fc1.bias = None
    x = _x()
    pairs, _ = nna.find_pairs(block, x[:2])
    for correction in (True, False):
        pruned, rep = nna.prune(block, x, compression=1.5, method="seq", se_bias_correction=correction)
        assert (pruned.se.fc1.bias is not None) == correction
        ks = np.array([r.kept for r in rep.layers])
        pm = nna.budget.ParamModel(block, pairs, adds_bias=True, adds_se_bias=correction)
        assert pm.count(ks) == rep.params_after == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("method", nna.METHODS)
def test_caller_model_untouched_hooks_removed_and_every_method_runs(method):
    net = _small_net(linear=True)
    x = _x(24, 3, 16, 3)
    y = torch.randint(0, 10, (24,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, report = nna.prune(net, [(x, y)] if method == "actgrad" else x, compression=1.5, method=method)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert report.compression >= 1.5 and report.params_after == sum(p.numel() for p in pruned.parameters())
    assert pruned.blocks[1].se.fc2.out_features < net.blocks[1].se.fc2.out_features
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all() and pruned(x).shape == (24, 10)


@pytest.mark.parametrize("linear", [False, True])
def test_save_and_load_round_trip(tmp_path, linear):
    net = _small_net(linear)
    x = _x(24, 3, 16, 3)
    pruned, _ = nna.prune(net, x, keep=0.5, method="asym")
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / "m.pt"))  # rebuilt from the zoo
    assert back.state_dict().keys() == pruned.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in pruned.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))
    block = _block(linear)
    block.se.fc1.bias = None  # the correction adds one: the file says so
    small, _ = nna.prune(block, _x(), keep=0.25, method="layer")
    again = nna.load_pruned(nna.save_pruned(small, tmp_path / "b.pt"), base_model=block)
    assert again.se.fc1.bias is not None
    with torch.no_grad():
        assert torch.equal(again(_x()), small(_x()))


def test_declared_pairs_with_the_gate():
    net = _block()
    x = _x()
    between = ("bn1", "depthwise", "bn2")
    found, _ = nna.prune(net, x, keep={SE_PAIR: 0.5}, method="layer")
    declared, _ = nna.prune(net, x, keep=0.5, method="layer",
                            pairs=[nna.Pair("expand", "project", between, se=("se.fc1", "se.fc2"))])
    assert found.state_dict().keys() == declared.state_dict().keys()
    assert all(torch.equal(v, declared.state_dict()[k]) for k, v in found.state_dict().items())
    # with the gate's own pair, declared in any order, in a sequential mode too
    both = [nna.Pair("expand", "project", between, se=("se.fc1", "se.fc2")), nna.Pair("se.fc1", "se.fc2")]
    for order in (both, both[::-1]):
        for method in ("layer", "asym"):
            a, _ = nna.prune(net, x, keep=0.5, method=method)
            b, _ = nna.prune(net, x, keep=0.5, method=method, pairs=order)
            assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match=r"squeeze-and-excitation gate on the way is declared with se=\(fc1, fc2\)"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("expand", "project", between)])
    with pytest.raises(ValueError, match="reads 2 channels, not the 12 channels it gates"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("expand", "project", between,
                                                                    se=("se.fc2", "se.fc1"))])
    # a gate computed from another tensor, declared as if it gated this path: fc1 does not pool these units
    other = _Gated("other tensor").eval()
    with pytest.raises(ValueError, match="does not change with exactly the units"):
        nna.prune(other, x, keep=0.5, method="layer", pairs=[nna.Pair("expand", "project", se=("fc1", "fc2"))])
    # declaring the gate for the path it really gates passes the probe
    nna.prune(_Gated("se").eval(), x, keep=0.5, method="layer", pairs=[nna.Pair("expand", "project",
                                                                                se=("fc1", "fc2"))])
    assert "se=" in repr(both[0]) and "se=" not in repr(both[1])


def test_declared_pairs_as_tuples_carry_the_gate():
    # A 4-tuple's se element used to be dropped (the pair was then refused as mixing units), and se="fc1" was
    # taken letter by letter.
    net = _block()
    x = _x()
    between = ("bn1", "depthwise", "bn2")
    a, _ = nna.prune(net, x, keep=0.5, method="layer",
                     pairs=[nna.Pair("expand", "project", between, se=("se.fc1", "se.fc2"))])
    b, _ = nna.prune(net, x, keep=0.5, method="layer", pairs=[("expand", "project", between, ("se.fc1", "se.fc2"))])
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match=r"se='se.fc1' must name the gate's two layers, se=\(fc1, fc2\)"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("expand", "project", between, se="se.fc1")])
    with pytest.raises(ValueError, match=r"a tuple is \(producer, consumer\[, between\[, se\]\]\)"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[("expand", "project", between, (), "extra")])


def test_bias_correction_option_is_validated():
    with pytest.raises(ValueError, match="se_bias_correction must be True or False"):
        nna.prune(_block(), _x(), keep=0.5, se_bias_correction="yes")


@pytest.mark.parametrize("kwargs", [{"width_mult": 0.0}, {"se_ratio": 0.0}, {"se_ratio": 1.5}, {"stages": []},
                                    {"stages": [(6, 16, 1, 1)]}, {"stages": [(6, 16, 1, 1, 4)]},
                                    {"stages": [(0, 16, 1, 1, 3)]}])
def test_efficientnet_builder_refuses_impossible_sizes(kwargs):
    with pytest.raises(ValueError, match="must be"):
        zoo.efficientnet_cifar(**kwargs)


class _BatchSizeSE(nn.Module):
    """An MBConv block (expansion -> depthwise -> SE gate -> projection) behind a decision on the batch size that
    changes the result, so that a batch computed through the other size's branch would show."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 32:
            x = 2 * x
        return self.block(x)


def test_an_se_pair_with_batches_of_several_sizes():
    """One traced graph per batch size (the staged run recomputes the gate in each): for the block's only pair, asym
    reads the unpruned network's activations, as layer mode does (which runs the model itself), so both keep the
    same units with the same refit of the projection."""
    torch.manual_seed(0)
    net = _BatchSizeSE().eval()
    x = _x(48)
    batches = [x[:32], x[32:]]
    keep = {"block.expand": 0.5}  # the gate's own fc1 -> fc2 pair keeps its units (and its trained weights)
    got, rep = nna.prune(net, batches, keep=keep, method="asym", ridge=1e-3)
    ref, rep_layer = nna.prune(net, batches, keep=keep, method="layer", ridge=1e-3)
    (a,), (b,) = ([r for r in r_.layers if r.pair == "block.expand->block.project"] for r_ in (rep, rep_layer))
    assert a.kept == 6 and a.kept_units == b.kept_units
    consumer = "block.project"
    torch.testing.assert_close(got.get_submodule(consumer).weight, ref.get_submodule(consumer).weight,
                               rtol=1e-6, atol=1e-8)
    pruned, _ = nna.prune(net, batches, keep=1.0, method="asym")
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(pruned(b), net(b), rtol=1e-5, atol=1e-6)
