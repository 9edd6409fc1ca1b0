"""Tests of transposed convolutions (``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``) in nn_adapters: as producers
and consumers, in pair discovery, statistics, selection, refit, shrinking, parameter and FLOP counts and save/load.

The oracles are independent of the implementation: ``F.conv_transpose1d/2d`` for the zero-stuffed unfolding, a
design matrix written here from the transposed convolution's definition (input position ``i`` and tap ``j`` reach
output position ``i * stride - padding + j * dilation``) for the refit, compared with numpy's lstsq, the original
network with the removed channels masked to zero for pruning without refit, the unpruned network for a pruning
that keeps every unit, and parameter counts of the built networks.
"""

from __future__ import annotations

import copy
import itertools
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
from nn_adapters import _conv
from nn_adapters.budget import count_flops

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _autoencoder() -> nn.Module:
    """Conv -> Conv -> ConvT -> ConvT -> Conv on 8x8 images: the pairs Conv->Conv, Conv->ConvT, ConvT->ConvT (through
    a BatchNorm) and ConvT->Conv; a non-square kernel, output padding, dilation and a padding above the kernel's
    reach."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),                          # 8x8 -> 4x4
        nn.ConvTranspose2d(8, 7, 3, stride=2, padding=1, output_padding=1),           # 4x4 -> 8x8
        nn.BatchNorm2d(7), nn.ReLU(),
        nn.ConvTranspose2d(7, 5, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 2)), nn.Tanh(),  # 8x8 -> 8x17
        nn.Conv2d(5, 1, 3, padding=1))
    return randomise_bn(net).double()


def _autoencoder_1d() -> nn.Module:
    """Conv1d -> ConvT1d -> ConvT1d -> Conv1d: ConvT1d's padding 3 crops more than its kernel adds."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, stride=2), nn.ReLU(),
        nn.ConvTranspose1d(6, 7, 4, stride=3, padding=1, output_padding=2), nn.ReLU(),
        nn.ConvTranspose1d(7, 5, 3, stride=2, padding=3, dilation=2), nn.ReLU(),
        nn.Conv1d(5, 2, 3)).double().eval()


class DecoderHead(nn.Module):
    """ConvT -> pool -> flatten -> Linear (a conv->linear pair with a transposed producer)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.t = nn.Conv2d(1, 5, 3), nn.ConvTranspose2d(5, 6, 2, stride=2)
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(F.relu(self.t(F.relu(self.c(x)))), 2).flatten(1))


def _data(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MODELS = {  # builder, calibration shape, the pairs pruned
    "2-D autoencoder": (_autoencoder, (160, 1, 8, 8), ["0->2", "2->4", "4->7", "7->9"]),
    "1-D autoencoder": (_autoencoder_1d, (120, 2, 11), ["0->2", "2->4", "4->6"]),
    "ConvT->Linear": (lambda: DecoderHead().double().eval(), (240, 1, 8, 8), ["c->t", "t->fc"]),
}


# ---- the zero-stuffed unfolding ------------------------------------------------------------------------------------

GRID = [  # kernel, stride, padding, dilation, output_padding
    (3, 1, 0, 1, 0), (3, 2, 1, 1, 1), (2, 2, 0, 1, 0), (4, 3, 2, 2, 1), (3, 2, 3, 1, 0), (3, 3, 0, 2, 2),
    ((2, 3), (1, 2), (0, 1), (2, 1), (0, 1)), ((3, 1), (2, 3), (1, 0), (1, 1), (1, 2)),
]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("k", "s", "p", "d", "op"), GRID)
def test_zero_stuffed_unfolding_reproduces_conv_transpose(rank: int, k, s, p, d, op) -> None:
    if rank == 1 and isinstance(k, tuple):
        k, s, p, d, op = k[0], s[0], p[0], d[0], op[0]
    cls = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose2d
    conv = cls(3, 4, k, stride=s, padding=p, dilation=d, output_padding=op).double()
    x = _data((2, 3, *([5, 6][:rank])))
    want = (F.conv_transpose1d if rank == 1 else F.conv_transpose2d)(
        x, conv.weight, None, stride=s, padding=p, output_padding=op, dilation=d)
    cols = _conv.unfold(conv, x)
    # the equivalent regular convolution's kernel: flipped in space, channel axes swapped (written here)
    w = conv.weight.detach().flip(tuple(range(2, 2 + rank))).transpose(0, 1).reshape(4, -1)
    got = (w @ cols).reshape(want.shape)
    assert cols.shape[1] == 3 * _conv.kernel_numel(conv)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(_conv.weight_matrix(conv), w, rtol=0, atol=0)
    assert torch.equal(_conv.weight_from_matrix(conv, w), conv.weight.detach())


# ---- pairs ---------------------------------------------------------------------------------------------------------

def test_pairs_of_the_autoencoder() -> None:
    net = _autoencoder()
    pairs, skipped = nna.find_pairs(net, _data((2, 1, 8, 8)))
    assert [(p.producer, p.consumer, p.between, p.kind, p.n_units, p.cols_per_unit) for p in pairs] == [
        ("0", "2", (), "conv->conv", 6, 9), ("2", "4", (), "conv->conv", 8, 9),
        ("4", "7", ("5",), "conv->conv", 7, 6), ("7", "9", (), "conv->conv", 5, 9)]
    assert skipped == [("9", "its output is the network output")]
    pairs, _ = nna.find_pairs(DecoderHead(), torch.zeros(2, 1, 8, 8))
    assert [(p.producer, p.consumer, p.kind, p.cols_per_unit) for p in pairs] == [
        ("c", "t", "conv->conv", 4), ("t", "fc", "conv->linear", 36)]


# ---- keeping every unit --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keeping_every_unit_reproduces_the_network(name: str, method: str) -> None:
    build, shape, names = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    assert [r.pair for r in rep.layers] == names
    assert all(r.kept == r.n_units for r in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-9, atol=1e-9)


# ---- the refit against lstsq on a design matrix written from the definition ----------------------------------------

def _transposed_design(x: np.ndarray, conv: nn.Module, out_sp: tuple[int, ...]) -> np.ndarray:
    """Rows (sample, output position) x columns (channel, tap) of a transposed convolution's input ``x``
    ``(N, C, *spatial)``: entry ``(c, j)`` of output position ``y`` is ``x[c, i]`` for the input position ``i`` with
    ``i * stride - padding + j * dilation = y`` (per dim), so that ``rows @ weight[c, o, j]`` is the output."""
    n, c = x.shape[:2]
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    A = np.zeros((n, *out_sp, c, *k))
    for i in itertools.product(*(range(m) for m in x.shape[2:])):
        for j in itertools.product(*(range(m) for m in k)):
            y = tuple(ii * ss - pp + jj * dd for ii, jj, ss, pp, dd in zip(i, j, s, p, d, strict=True))
            if all(0 <= yy < m for yy, m in zip(y, out_sp, strict=True)):
                A[(slice(None), *y, slice(None), *j)] += x[(slice(None), slice(None), *i)]
    return A.reshape(n * int(np.prod(out_sp)), c * int(np.prod(k)))


@pytest.mark.parametrize(("name", "consumer"), [("2-D autoencoder", "4"), ("2-D autoencoder", "7"),
                                                ("1-D autoencoder", "2"), ("1-D autoencoder", "4")])
def test_refit_of_a_transposed_consumer_is_lstsq(name: str, consumer: str) -> None:
    build, shape, names = MODELS[name]
    net, x = build(), _data(shape)
    seen = {}
    cons = net.get_submodule(consumer)
    h = cons.register_forward_hook(lambda _m, inp, out: seen.update(a=inp[0].detach(), y=out.detach()))
    with torch.no_grad():
        net(x)
    h.remove()
    pruned, rep = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    (lr,) = [r for r in rep.layers if r.pair.endswith(f"->{consumer}")]
    kept = lr.kept_units
    A = _transposed_design(seen["a"].numpy(), cons, tuple(seen["y"].shape[2:]))
    taps = _conv.kernel_numel(cons)
    cols = np.concatenate([np.arange(c * taps, (c + 1) * taps) for c in kept])
    Y = seen["y"].numpy().swapaxes(0, 1).reshape(seen["y"].shape[1], -1).T  # (rows, out) with the bias
    sol, *_ = np.linalg.lstsq(np.hstack([A[:, cols], np.ones((A.shape[0], 1))]), Y, rcond=None)
    new = pruned.get_submodule(consumer)
    assert new.in_channels == len(kept)
    # the consumer's own output channels are the next pair's units: it keeps the refit of those
    outs = next((r.kept_units for r in rep.layers if r.pair.startswith(f"{consumer}->")), range(cons.out_channels))
    sol = sol[:, sorted(outs)]
    # weight[c, o, j] of the kept channels, in the design's (channel, tap) column order
    got = new.weight.detach().numpy().transpose(0, 2, *range(3, new.weight.dim()), 1).reshape(-1, new.out_channels)
    np.testing.assert_allclose(got, sol[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(new.bias.detach().numpy(), sol[-1], rtol=1e-6, atol=1e-8)


# ---- shrinking without refit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["layer", "seq"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruning_without_refit_is_the_masked_network(name: str, method: str) -> None:
    build, shape, names = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    assert [r.pair for r in rep.layers] == names
    assert all(r.kept < r.n_units for r in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, rep, x), rtol=1e-10, atol=1e-10)


def test_weight_norm_ranks_a_transposed_producer_by_its_output_filters() -> None:
    net, x = _autoencoder(), _data((40, 1, 8, 8))
    _, rep = nna.prune(net, x, keep=0.5, method="weight_norm", reweight=False)
    w = net[4].weight.detach()  # (C_in, C_out, kh, kw): output channel o is w[:, o]
    norms = torch.stack([w[:, o].norm() for o in range(w.shape[1])])
    (lr,) = [r for r in rep.layers if r.pair == "4->7"]
    assert sorted(lr.kept_units) == sorted(torch.argsort(norms, descending=True)[:lr.kept].tolist())


# ---- parameters, FLOPs, save/load ----------------------------------------------------------------------------------

def test_parameter_budgets_are_met_exactly() -> None:
    check_budgets_against_built_networks(_autoencoder(), _data((100, 1, 8, 8)), (2.0, 4.0))


def test_flops_of_a_transposed_convolution() -> None:
    # each of the 3 * 5 * 6 input values is multiplied by the 4 * (2 * 3) weights of its channel: 2 FLOPs each
    conv = nn.ConvTranspose2d(3, 4, (2, 3), stride=2, padding=1)
    assert count_flops(conv, torch.zeros(2, 3, 5, 6)) == 2 * (3 * 5 * 6) * (4 * 6)
    net, x = _autoencoder(), _data((60, 1, 8, 8))
    pruned, rep = nna.prune(net, x, keep=0.5, method="layer")
    k = {r.pair: r.kept for r in rep.layers}
    c1, c2, t1, t2 = k["0->2"], k["2->4"], k["4->7"], k["7->9"]
    want = 2 * (64 * 1 * c1 * 9 + 16 * c1 * c2 * 9 + (16 * c2) * t1 * 9 + (64 * t1) * t2 * 6 + 8 * 17 * t2 * 9)
    assert rep.flops_after == want


@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_load_round_trip(name: str, tmp_path: os.PathLike) -> None:
    build, shape, names = MODELS[name]
    net, x = build(), _data(shape)
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym")
    assert [r.pair for r in rep.layers] == names
    assert_save_load_round_trip(pruned, build(), x, tmp_path / "net.pt")


# ---- refusals, and the caller's model ------------------------------------------------------------------------------

def test_grouped_transposed_convolutions_are_refused_with_the_reason() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(),
                        nn.ConvTranspose2d(6, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    pairs, skipped = nna.find_pairs(net, torch.zeros(2, 1, 8, 8))
    reasons = dict(skipped)
    assert "grouped transposed convolution (groups=2) is not supported" in reasons["0"]  # as the consumer
    assert "grouped transposed convolution (groups=2) is not supported" in reasons["2"]  # as the producer
    assert [p.name for p in pairs] == ["4->6"]
    with pytest.raises(ValueError, match=r"grouped transposed convolution \(groups=2\)"):
        nna.prune(net, torch.rand(20, 1, 8, 8), keep=0.5, method="layer", pairs=[("0", "2")])
    # a depthwise transposed convolution does not lie between a producer and its consumer as a depthwise Conv does
    dw = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    _, skipped = nna.find_pairs(dw, torch.zeros(2, 1, 8, 8))
    assert "grouped transposed convolution (groups=4)" in dict(skipped)["0"]


class OutputSizeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.head = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(3, 1, 1)
        self.t = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.t(torch.relu(self.c(x)), output_size=x.shape[2:])))


def test_a_transposed_consumer_called_with_output_size_is_refused() -> None:
    net, x = OutputSizeNet().eval(), torch.rand(30, 1, 8, 8)
    _, skipped = nna.find_pairs(net, x[:2])
    assert "output_size=" in dict(skipped)["c"]
    for method in ("layer", "asym"):
        with pytest.raises(ValueError, match="output_size="):
            nna.prune(net, x, keep=0.5, method=method, pairs=[("c", "t")])


def test_mixed_ranks_and_linear_producers_are_refused() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.t, self.fc = nn.Conv2d(1, 4, 3), nn.ConvTranspose1d(4, 3, 3), nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.t(self.c(x).mean(2)).sum(-1) + self.fc(x.flatten(1)[:, :4]).mean(-1, keepdim=True)

    _, skipped = nna.find_pairs(Mixed(), torch.zeros(2, 1, 6, 6))
    assert "mixed 1-D/2-D convolution path (Conv2d -> ConvTranspose1d)" in dict(skipped)["c"]
    lin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.ConvTranspose1d(6, 2, 3))
    with pytest.raises(ValueError, match="Linear producer cannot feed the input channels"):
        nna.prune(lin, torch.rand(20, 4), keep=0.5, method="layer", pairs=[("0", "2")])


def test_the_callers_model_is_not_modified() -> None:
    net, x = _autoencoder(), _data((80, 1, 8, 8))
    before = copy.deepcopy(net.state_dict())
    shapes = [(m.in_channels, m.out_channels) for m in net if _conv.is_conv(m)]
    x0 = x.clone()
    for method in ("layer", "asym"):
        _, rep = nna.prune(net, x, keep=0.5, method=method)
        assert [r.pair for r in rep.layers] == MODELS["2-D autoencoder"][2]
    assert x.equal(x0)
    assert [(m.in_channels, m.out_channels) for m in net if _conv.is_conv(m)] == shapes
    for k, v in net.state_dict().items():
        assert v.equal(before[k]), k


def test_declared_pairs_are_the_discovered_ones() -> None:
    net, x = _autoencoder(), _data((100, 1, 8, 8))
    declared = [("0", "2"), ("2", "4"), nna.Pair("4", "7", between=("5",)), ("7", "9")]
    _, found = nna.prune(net, x, keep=0.5, method="layer")
    _, given = nna.prune(net, x, keep=0.5, method="layer", pairs=declared)
    assert [(r.pair, r.kept_units) for r in given.layers] == [(r.pair, r.kept_units) for r in found.layers]
    with pytest.raises(ValueError, match="BatchNorm2d '5' also receives the producer's units"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[("4", "7")])
