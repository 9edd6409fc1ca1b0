"""The polyphase statistics of strided transposed consumers (``nn_adapters._conv.polyphase``, ``PairStats``).

A strided transposed convolution's unfolded input is zero outside one set of taps per phase of the output
positions, so its statistics are streamed phase by phase (``GramAccumulator.update_blocks``). Oracles: the full
unfolding of random inputs (every entry outside a phase's taps is zero; each position in one phase; each tap in at
most one phase's set, from the congruence ``o + p - t * d = 0 mod s``, written here independently), and the
statistics of the same samples streamed as full rows (the private switch ``_POLYPHASE = False``, the path of the
previous release, whose own tests compare it with ``F.conv_transpose``).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import nn_adapters as nna
from nn_adapters import _conv, _stats
from nn_adapters.pairs import find_pairs

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CONVS = [
    (nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (5, 4)),
    (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (4, 5)),
    (nn.ConvTranspose2d(3, 2, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), (3, 4)),
    (nn.ConvTranspose2d(3, 2, 2, stride=(3, 1)), (4, 3)),
    (nn.ConvTranspose2d(3, 2, 1, stride=2), (3, 3)),  # a 1x1 kernel: three of the four phases read nothing
    (nn.ConvTranspose1d(3, 2, 5, stride=3, padding=2, dilation=3, output_padding=1), (6,)),
    (nn.ConvTranspose1d(3, 2, 4, stride=2, padding=3), (7,)),  # padding above the kernel's reach crops
]


@pytest.mark.parametrize(("conv", "spatial"), CONVS, ids=lambda c: str(c))
def test_phases_partition_the_positions_and_hold_every_nonzero(conv, spatial):
    phases = _conv.polyphase(conv, spatial)
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    full = _conv.unfold(conv, x).reshape(2, 3, _conv.kernel_numel(conv), -1)  # (N, C, taps, positions)
    positions = torch.cat([p for _, p, _ in phases])
    assert sorted(positions.tolist()) == list(range(full.shape[-1]))  # each position in exactly one phase
    taps = [set(t.tolist()) for t, _, _ in phases]
    assert all(not (a & b) for a, b in itertools.combinations(taps, 2))  # disjoint tap sets
    flat = torch.cat([torch.zeros(2, 3, 1, dtype=x.dtype), x.reshape(2, 3, -1)], dim=2)  # index 0: a zero
    for tap, pos, source in phases:
        outside = torch.ones(full.shape[2], dtype=torch.bool)
        outside[tap] = False
        assert not full[:, :, outside][..., pos].any()
        # the source indices gather exactly the unfolded entries of the phase's taps and positions
        assert torch.equal(flat[:, :, source], full[:, :, tap][..., pos])
    # the taps of a phase satisfy the congruence of the transposed convolution's definition, per spatial dim
    out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
           zip(spatial, conv.stride, conv.padding, conv.dilation, conv.kernel_size, conv.output_padding)]
    coords = list(itertools.product(*(range(n) for n in out)))
    for tap, pos, _ in phases:
        for t in tap.tolist():
            tap_coords = np.unravel_index(t, conv.kernel_size)
            o = coords[int(pos[0])]
            for dim in range(len(out)):
                # the flipped kernel: unfold column t reads original tap k - 1 - t
                orig = conv.kernel_size[dim] - 1 - int(tap_coords[dim])
                assert (o[dim] + conv.padding[dim] - orig * conv.dilation[dim]) % conv.stride[dim] == 0


def test_regular_and_unstrided_convolutions_have_no_phases():
    assert _conv.polyphase(nn.Conv2d(3, 2, 3, stride=2), (8, 8)) is None
    assert _conv.polyphase(nn.ConvTranspose2d(3, 2, 3), (8, 8)) is None


def _net(convt: nn.Module, rank: int) -> nn.Module:
    conv = nn.Conv2d if rank == 2 else nn.Conv1d
    torch.manual_seed(0)
    return nn.Sequential(conv(2, convt.in_channels, 3, padding=1), nn.ReLU(), convt, nn.ReLU(),
                         conv(convt.out_channels, 2, 1)).double().eval()


def _stats_of(net: nn.Module, x: torch.Tensor, folds: int, polyphase: bool, monkeypatch) -> _stats.PairStats:
    monkeypatch.setattr(_stats, "_POLYPHASE", polyphase)
    pair = next(p for p in find_pairs(net, x[:2])[0] if p.consumer == "2")
    st = _stats.PairStats(pair, net[2], folds=folds)
    h = net[1].register_forward_hook(lambda m, i, o: st.update(o))
    try:
        for lo in range(0, len(x), 7):  # uneven batches
            net(x[lo:lo + 7])
    finally:
        h.remove()
    return st


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("folds", [1, 5])
@pytest.mark.parametrize(("conv", "spatial"), CONVS, ids=lambda c: str(c))
def test_phase_statistics_equal_the_full_rows(conv, spatial, folds, device_path, monkeypatch):
    monkeypatch.setattr(_stats, "_DEVICE_PATH_ON_CPU", device_path)
    net = _net(conv, len(spatial))
    x = torch.randn(23, 2, *spatial, dtype=torch.float64)
    got = _stats_of(net, x, folds, True, monkeypatch)
    ref = _stats_of(net, x, folds, False, monkeypatch)
    for a, b in zip(got.fold_accs, ref.fold_accs, strict=True):
        assert a.count == b.count
        scale = float(np.abs(b.gram()).max())
        for centered in (False, True):
            np.testing.assert_allclose(a.gram(centered), b.gram(centered), atol=1e-11 * scale)
            np.testing.assert_allclose(a.cross(centered), b.cross(centered), atol=1e-11 * scale)
            assert a.y_norm2(centered) == pytest.approx(b.y_norm2(centered), rel=1e-11)


@pytest.mark.parametrize("method", ["layer", "asym", "seq"])
def test_pruning_through_phases_equals_pruning_through_full_rows(method, monkeypatch):
    """The same units and (up to rounding) the same weights, end to end, on a decoder of two strided transposed
    consumers."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                        nn.Conv2d(4, 1, 1)).double().eval()
    x = torch.randn(48, 2, 5, 5, dtype=torch.float64)
    out = {}
    for poly in (True, False):
        monkeypatch.setattr(_stats, "_POLYPHASE", poly)
        out[poly] = nna.prune(net, x, keep=0.5, method=method, seed=0)
    (p1, r1), (p0, r0) = out[True], out[False]
    assert [u.kept_units for u in r1.layers] == [u.kept_units for u in r0.layers]
    for (k, a), b in zip(p1.state_dict().items(), p0.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("folds", [1, 5])
def test_phase_statistics_on_a_gpu_equal_the_full_rows_on_the_host(folds, monkeypatch):
    """A model on the GPU: the phases are gathered and accumulated there (torch storage), and give the statistics
    of the full rows streamed by the numpy path of the same model on the CPU."""
    conv, spatial = CONVS[1]
    net = _net(copy.deepcopy(conv), 2)
    x = torch.randn(23, 2, *spatial, dtype=torch.float64)
    ref = _stats_of(net, x, folds, False, monkeypatch)
    got = _stats_of(copy.deepcopy(net).cuda(), x.cuda(), folds, True, monkeypatch)
    for a, b in zip(got.fold_accs, ref.fold_accs, strict=True):
        assert a.device.type == "cuda" and a.count == b.count
        scale = float(np.abs(b.gram()).max())
        np.testing.assert_allclose(a.gram(True), b.gram(True), atol=1e-11 * scale)
        np.testing.assert_allclose(a.cross(True), b.cross(True), atol=1e-11 * scale)
