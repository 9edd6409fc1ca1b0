"""Tests of ``linear->conv`` pairs: a ``Linear`` whose outputs are reshaped into channels ``(N, C, *spatial)``
(``nn.Unflatten``, ``x.view(x.size(0), -1, ...)``) and read by a convolution, the first layers of decoders and GAN
generators.

The oracles are independent of the implementation: the unpruned network for a pruning that keeps every unit; the
original network with the removed channels' ``Linear`` rows zeroed (or, with a BatchNorm on the way, the removed
channels zeroed at the consumer's input) for pruning without a refit; numpy's lstsq on a design matrix built here
from the ``Linear``'s weights (row ``c * P + p`` is channel ``c`` at position ``p``, PyTorch's row-major reshape),
the BatchNorm's formula and the convolution's definition; closed-form FLOPs and the parameters of the built
networks; and the saved model read back.
"""

from __future__ import annotations

import copy
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_save_load_round_trip,
    check_budgets_against_built_networks,
    randomise_bn,
    zeroed_at_consumers,
)
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _generator() -> nn.Module:
    """A GAN generator's first layers: Linear -> ReLU -> Linear(12, 8*4*4) -> BN1d -> Unflatten -> BN2d -> ReLU ->
    ConvT2d -> BN2d -> ReLU -> Conv2d: a linear->linear pair, a linear->conv pair through BatchNorms on both sides of
    the reshape, and a conv->conv pair."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(),
        nn.Linear(12, 8 * 4 * 4), nn.BatchNorm1d(8 * 4 * 4), nn.Unflatten(1, (8, 4, 4)), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 5, 4, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),       # 4x4 -> 8x8
        nn.Conv2d(5, 1, 3, padding=1))
    return randomise_bn(net).double()


def _plain() -> nn.Module:
    """Linear -> Unflatten -> ReLU -> Conv2d, nothing with parameters on the way (a non-square 3x2 map)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6 * 3 * 2), nn.Unflatten(1, (6, 3, 2)), nn.ReLU(),
                         nn.Conv2d(6, 2, (2, 2), padding=1)).double().eval()


class Decoder1d(nn.Module):
    """1-D: Linear(5, 7*6) -> tanh -> x.view(x.size(0), -1, 6) -> InstanceNorm1d -> upsample -> ConvT1d -> Conv1d;
    the channel count of the view is -1, which follows the pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7 * 6)
        self.norm = nn.InstanceNorm1d(7, affine=True)
        self.up = nn.Upsample(scale_factor=2)
        self.t = nn.ConvTranspose1d(7, 4, 3, stride=2)
        self.c = nn.Conv1d(4, 2, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(z)).view(z.size(0), -1, 6)
        return self.c(F.relu(self.t(self.up(self.norm(h)))))


def _decoder_1d() -> nn.Module:
    torch.manual_seed(2)
    net = Decoder1d()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.normal_()
    return net.double().eval()


def _data(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MODELS = {  # builder, calibration shape, the pairs pruned (kind of each)
    "generator": (_generator, (200, 6), {"0->2": "linear->linear", "2->7": "linear->conv", "7->10": "conv->conv"}),
    "plain": (_plain, (150, 5), {"0->3": "linear->conv"}),
    "1-D decoder": (_decoder_1d, (150, 5), {"fc->t": "linear->conv", "t->c": "conv->conv"}),
}


def test_pairs_and_their_rows_per_unit() -> None:
    for name, (build, shape, kinds) in MODELS.items():
        pairs, _ = nna.find_pairs(build(), _data(shape)[:2])
        assert {p.name: p.kind for p in pairs} == kinds, name
    (_, lc, _), _ = nna.find_pairs(_generator(), _data((2, 6)))
    assert (lc.n_units, lc.rows_per_unit, lc.cols_per_unit) == (8, 16, 16)
    assert (lc.between, lc.row_between, lc.unflatten) == (("3", "5"), ("3",), "4")
    (lc, _), _ = nna.find_pairs(_decoder_1d(), _data((2, 5)))
    assert (lc.n_units, lc.rows_per_unit, lc.cols_per_unit, lc.between, lc.unflatten) == (7, 6, 3, ("norm",), None)


def test_a_channel_is_the_linears_consecutive_rows() -> None:
    # PyTorch's row-major reshape: output row r of the Linear is channel r // P at position r % P
    lin, unflat = nn.Linear(3, 4 * 2 * 3), nn.Unflatten(1, (4, 2, 3))
    z = torch.randn(5, 3)
    out = unflat(lin(z))
    for r in range(24):
        c, p = divmod(r, 6)
        torch.testing.assert_close(out[:, c, p // 3, p % 3], lin(z)[:, r])
    # pruning keeps exactly the rows of the kept channels, in order
    net, x = _plain(), _data((150, 5))
    pruned, rep = nna.prune(net, x, keep=0.5, method="layer", reweight=False)
    (lr,) = rep.layers
    rows = [c * 6 + p for c in lr.kept_units for p in range(6)]
    torch.testing.assert_close(pruned[0].weight, net[0].weight[rows], rtol=0, atol=0)
    torch.testing.assert_close(pruned[0].bias, net[0].bias[rows], rtol=0, atol=0)
    assert pruned[1].unflattened_size == (lr.kept, 3, 2)


def test_weight_norm_ranks_a_channel_by_its_rows_of_the_linear() -> None:
    net, x = _generator(), _data((60, 6))
    _, rep = nna.prune(net, x, keep=0.5, method="weight_norm", reweight=False)
    w = net[2].weight.detach()  # (8 * 16, 12): channel c is rows c * 16 ... c * 16 + 15
    norms = torch.stack([w[c * 16:(c + 1) * 16].norm() for c in range(8)])
    (lr,) = [r for r in rep.layers if r.pair == "2->7"]
    assert sorted(lr.kept_units) == sorted(torch.argsort(norms, descending=True)[:lr.kept].tolist())


# ---- keeping every unit --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keeping_every_unit_reproduces_the_network(name: str, method: str) -> None:
    build, shape, kinds = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    assert {r.pair: r.kind for r in rep.layers} == kinds
    assert all(r.kept == r.n_units for r in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-9, atol=1e-9)


# ---- pruning without refit: the masked network ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["layer", "seq"])
def test_pruning_without_refit_is_the_network_with_the_rows_zeroed(method: str) -> None:
    # nothing between the Linear and the consumer maps 0 to anything else: zeroing a channel's P rows (and bias
    # entries) of the Linear is removing the channel
    net, x = _plain(), _data((150, 5))
    pruned, rep = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    (lr,) = rep.layers
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for c in set(range(lr.n_units)) - set(lr.kept_units):
            masked[0].weight[c * 6:(c + 1) * 6] = 0.0
            masked[0].bias[c * 6:(c + 1) * 6] = 0.0
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["layer", "seq"])
@pytest.mark.parametrize("name", ["generator", "1-D decoder"])
def test_pruning_without_refit_is_the_masked_network(name: str, method: str) -> None:
    # with BatchNorm / InstanceNorm on the way a removed channel is zero at the consumer's input
    build, shape, kinds = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    assert {r.pair: r.kind for r in rep.layers} == kinds
    assert all(r.kept < r.n_units for r in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, rep, x), rtol=1e-10, atol=1e-10)


# ---- the refit against lstsq on activations built here -------------------------------------------------------------

def _conv_design(a: np.ndarray, k: tuple[int, int], pad: int) -> np.ndarray:
    """Rows (sample, output position) x columns (channel, tap) of a stride-1 ``Conv2d`` with kernel ``k`` and zero
    padding ``pad`` on ``a`` ``(N, C, H, W)``: output ``(y, x)`` reads ``a[c, y + i - pad, x + j - pad]``."""
    n, c, h, w = a.shape
    oh, ow = h + 2 * pad - k[0] + 1, w + 2 * pad - k[1] + 1
    A = np.zeros((n, oh, ow, c, *k))
    for y, xx, i, j in itertools.product(range(oh), range(ow), range(k[0]), range(k[1])):
        yi, xj = y + i - pad, xx + j - pad
        if 0 <= yi < h and 0 <= xj < w:
            A[:, y, xx, :, i, j] = a[:, :, yi, xj]
    return A.reshape(n * oh * ow, c * k[0] * k[1])


@pytest.mark.parametrize("with_bn", [False, True])
def test_refit_is_lstsq_on_the_channels_of_the_linear(with_bn: bool) -> None:
    torch.manual_seed(3)
    layers = [nn.Linear(4, 5 * 3 * 3), nn.Unflatten(1, (5, 3, 3))]
    layers += [nn.BatchNorm2d(5)] if with_bn else []
    net = randomise_bn(nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(5, 3, 2, padding=1))).double()
    x = _data((120, 4))
    pruned, rep = nna.prune(net, x, keep=0.6, method="layer", ridge=0.0)
    (lr,) = rep.layers
    # the consumer's input, built from the Linear's rows: channel c at position (i, j) is row c * 9 + i * 3 + j
    W, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    z = x.numpy() @ W.T + b
    a = np.zeros((120, 5, 3, 3))
    for c, i, j in itertools.product(range(5), range(3), range(3)):
        v = z[:, c * 9 + i * 3 + j]
        if with_bn:
            bn = net[2]
            v = ((v - bn.running_mean[c].item()) / math.sqrt(bn.running_var[c].item() + bn.eps)
                 * bn.weight[c].item() + bn.bias[c].item())
        a[:, c, i, j] = np.maximum(v, 0.0)
    cons = net[-1]
    A = _conv_design(a, (2, 2), 1)
    Wc = cons.weight.detach().numpy().reshape(3, -1)
    Y = A @ Wc.T + cons.bias.detach().numpy()
    cols = np.concatenate([np.arange(c * 4, (c + 1) * 4) for c in lr.kept_units])
    sol, *_ = np.linalg.lstsq(np.hstack([A[:, cols], np.ones((A.shape[0], 1))]), Y, rcond=None)
    new = pruned[-1]
    assert new.in_channels == lr.kept == len(lr.kept_units)
    np.testing.assert_allclose(new.weight.detach().numpy().reshape(3, -1), sol[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(new.bias.detach().numpy(), sol[-1], rtol=1e-6, atol=1e-8)


# ---- parameters, FLOPs, save/load ----------------------------------------------------------------------------------

def test_parameter_budgets_are_met_exactly() -> None:
    check_budgets_against_built_networks(_generator(), _data((100, 6)), (2.0, 3.0))
    check_budgets_against_built_networks(_decoder_1d(), _data((100, 5)), (1.5,))


def test_params_and_flops_of_the_pruned_generator() -> None:
    net, x = _generator(), _data((100, 6))
    pruned, rep = nna.prune(net, x, keep=0.5, method="layer")
    k = {r.pair: r.kept for r in rep.layers}
    h, c, t = k["0->2"], k["2->7"], k["7->10"]
    P = 16
    # Linear(6, h), Linear(h, c*P), BN1d(c*P), BN2d(c), ConvT2d(c, t, 4), BN2d(t), Conv2d(t, 1, 3)
    want_params = ((6 * h + h) + (h * c * P + c * P) + 2 * c * P + 2 * c + (c * t * 16 + t) + 2 * t
                   + (t * 9 + 1))
    assert rep.params_after == want_params == sum(p.numel() for p in pruned.parameters())
    # per sample: 2 * in * out for a Linear; a transposed conv's input values times its C_out * taps; a conv's
    # output values times its C_in * taps
    want_flops = 2 * (6 * h + h * c * P + (c * 16) * t * 16 + 64 * t * 9)
    assert rep.flops_after == want_flops


@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_load_round_trip(name: str, tmp_path: os.PathLike) -> None:
    build, shape, kinds = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym")
    assert {r.pair: r.kind for r in rep.layers} == kinds
    assert_save_load_round_trip(pruned, build(), x, tmp_path / "net.pt")


# ---- reshapes that cannot follow the pruning -----------------------------------------------------------------------

class Reshaped(nn.Module):
    """Linear(5, 8*4*4) reshaped into (N, 8, 4, 4) by ``reshape`` and read by a Conv2d."""

    def __init__(self, reshape) -> None:
        super().__init__()
        self.reshape = reshape
        self.fc, self.conv = nn.Linear(5, 8 * 4 * 4), nn.Conv2d(8, 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.reshape(self.fc(z))))


@pytest.mark.parametrize(("reshape", "text"), [
    (lambda h: h.view(-1, 8, 4, 4), "x.view(-1, 8, 4, 4) hard-codes the channel count 8"),
    (lambda h: h.reshape(h.shape[0], 8, 4, 4), "hard-codes the channel count 8"),
    (lambda h: h.unflatten(1, (8, 4, 4)), "x.unflatten(1, (8, 4, 4)) hard-codes the channel count 8"),
    (lambda h: torch.reshape(h, (-1, 8, 4, 4)), "torch.reshape(-1, 8, 4, 4) hard-codes the channel count 8"),
])
def test_a_literal_channel_count_in_forward_is_refused_with_the_reason(reshape, text: str) -> None:
    net = Reshaped(reshape).eval()
    pairs, skipped = nna.find_pairs(net, torch.randn(2, 5))
    assert pairs == []
    why = dict(skipped)["fc"]
    assert text in why
    assert "write -1" in why and "nn.Unflatten" in why


def test_a_shared_unflatten_with_a_literal_size_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.un = nn.Unflatten(1, (4, 2, 2))
            self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(3, 16)
            self.c1, self.c2 = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.c1(self.un(self.fc1(z))) + self.c2(self.un(self.fc2(z)))

    _, skipped = nna.find_pairs(Twice().eval(), torch.randn(2, 3))
    assert "nn.Unflatten 'un' is called 2 times and hard-codes the channel count 4" in dict(skipped)["fc1"]


@pytest.mark.parametrize("reshape", [
    lambda h: h.view(h.size(0), -1, 4, 4),
    lambda h: h.view(h.shape[0], h.shape[1] // 16, 4, 4),  # read from the tensor: follows the kept channels
    lambda h: h.unflatten(1, (-1, 4, 4)),
    nn.Unflatten(1, (-1, 4, 4)),
])
def test_a_channel_count_that_follows_the_tensor_is_pruned(reshape) -> None:
    torch.manual_seed(4)
    net = Reshaped(reshape).double().eval()
    x = _data((80, 5))
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym")
    (lr,) = rep.layers
    assert (lr.kind, lr.kept) == ("linear->conv", 4)
    assert pruned.fc.out_features == 4 * 16 and pruned.conv.in_channels == 4
    assert pruned(x).shape == (80, 3, 2, 2)


def test_reshapes_that_do_not_give_channels_are_refused() -> None:
    # the channels must feed a convolution; a reshape of a 3-D Linear output is not into channels
    net = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (3, 4)), nn.Flatten(), nn.Linear(12, 2))
    assert "feeds Linear '3', not a convolution" in dict(nna.find_pairs(net, torch.randn(2, 5))[1])["0"]

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.conv = nn.Linear(5, 12), nn.Conv1d(3, 2, 1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (N, T, 5)
            return self.conv(self.fc(z).view(z.size(0), -1, 3, 4).sum(1))

    why = dict(nna.find_pairs(Seq(), torch.randn(2, 6, 5))[1])["fc"]
    assert "not the Linear producer's (N, 12) output" in why


def test_a_depthwise_convolution_after_the_reshape_is_refused_with_the_reason() -> None:
    # a depthwise convolution lies only between two convolutions; the reason must not ask for a "producer
    # convolution's rank" when the producer is a Linear
    class Depthwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.un = nn.Linear(5, 6 * 4 * 4), nn.Unflatten(1, (6, 4, 4))
            self.dw, self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 3, 3)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.conv(F.relu(self.dw(self.un(self.fc(z)))))

    why = dict(nna.find_pairs(Depthwise().eval(), torch.randn(2, 5))[1])["fc"]
    assert "a depthwise Conv2d after a Linear producer (reshaped into channels or not) is not supported" in why
    assert "convolution's rank" not in why


# ---- the caller's model ---------------------------------------------------------------------------------------------

def test_the_callers_model_is_not_modified() -> None:
    net, x = _generator(), _data((80, 6))
    before = copy.deepcopy(net.state_dict())
    x0 = x.clone()
    for method in ("layer", "asym"):
        _, rep = nna.prune(net, x, keep=0.5, method=method)
        assert [r.kind for r in rep.layers] == ["linear->linear", "linear->conv", "conv->conv"]
    assert x.equal(x0)
    assert net[4].unflattened_size == (8, 4, 4) and net[2].out_features == 128 and net[3].num_features == 128
    for k, v in net.state_dict().items():
        assert v.equal(before[k]), k
