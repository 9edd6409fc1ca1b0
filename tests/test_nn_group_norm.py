"""GroupNorm between a convolution producer and its consumer: the units are whole groups.

``GroupNorm(G, C)`` normalises each group of ``C / G`` consecutive channels of each sample on its own, so removing
a whole group leaves every other group's output unchanged, while removing one channel would change the statistics
of the rest of its group. Such a pair has ``G`` units of ``C / G`` channels: the producer loses a group's rows, the
GroupNorm becomes ``GroupNorm(G_kept, C_kept)`` with the kept channels' affine entries, and the consumer loses the
group's input columns. The same holds for a GroupNorm on the ``(N, C)`` vector of a global pooling before a
``Linear``. ``F.group_norm`` written in ``forward()`` cannot follow the pruning and is refused.

Oracles, independent of the implementation: the unpruned network (keep everything), the original network with the
removed groups' channels zeroed at the consumer's input (no refit), the original GroupNorm applied to a tensor that
holds the kept channels (its output restricted to them), numpy's lstsq on the consumer's unfolded input captured
here (the refit), parameter counts of the built networks, and a save/load round trip.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_save_load_round_trip,
    captured_input,
    check_budgets_against_built_networks,
    randomise_bn,
    zeroed_at_consumers,
)
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C = 16  # the producer's channels
SIDE = {("conv", 2): 6, ("conv", 1): 10, ("linear", 2): 3, ("linear", 1): 6}  # positions per spatial dim


def randomise_gn(model: nn.Module) -> nn.Module:
    """Random affine entries for every GroupNorm (fixed seed), so that keeping the wrong entries is observable."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and m.affine:
            m.weight.data.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_channels, generator=g) * 0.3)
    return randomise_bn(model)


class GroupNormNet(nn.Module):
    """conv(3 -> 16) -> [BatchNorm] -> GroupNorm(groups, 16) -> SiLU -> conv(16 -> 5, 3) or flatten -> Linear(., 5),
    1-D or 2-D."""

    def __init__(self, groups: int, rank: int = 2, head: str = "conv", bn: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d if rank == 2 else nn.Conv1d
        self.c1 = conv(3, C, 3, padding=1)
        self.bn = (nn.BatchNorm2d if rank == 2 else nn.BatchNorm1d)(C) if bn else nn.Identity()
        self.gn = nn.GroupNorm(groups, C)
        self.c2 = conv(C, 5, 3) if head == "conv" else nn.Linear(C * SIDE[head, rank] ** rank, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gn(self.bn(self.c1(x))))
        return self.c2(h if isinstance(self.c2, nn.Conv1d | nn.Conv2d) else h.flatten(1))


def _build(groups: int, rank: int = 2, head: str = "conv", bn: bool = False, n: int = 256):
    torch.manual_seed(0)
    net = randomise_gn(GroupNormNet(groups, rank, head, bn))
    x = torch.randn(n, 3, *(SIDE[head, rank],) * rank)
    return net, x


CASES = [(g, rank, head) for g in (4, 16) for rank in (1, 2) for head in ("conv", "linear")]


@pytest.mark.parametrize(("groups", "rank", "head"), CASES)
def test_the_units_are_the_groups(groups, rank, head):
    net, x = _build(groups, rank, head)
    (pair,), skipped = nna.find_pairs(net, x[:2])
    size = C // groups
    positions = 3 ** rank if head == "conv" else SIDE[head, rank] ** rank  # kernel taps or flattened positions
    assert (pair.producer, pair.consumer, pair.between) == ("c1", "c2", ("gn",))
    assert (pair.n_units, pair.group_size, pair.rows_per_unit) == (groups, size, size)
    assert pair.cols_per_unit == size * positions
    assert pair.kind == ("conv->conv" if head == "conv" else "conv->linear")
    assert dict(skipped) == {"c2": "its output is the network output"}


@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize(("groups", "rank", "head"), CASES)
def test_keep_all_reproduces_the_network(groups, rank, head, method):
    net, x = _build(groups, rank, head, bn=True)
    pruned, report = nna.prune(net, x, keep=1.0, method=method)
    assert report.layers[0].kept_units == list(range(groups))
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (groups, C)
    with torch.no_grad():
        want, got = net(x), pruned(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize(("groups", "rank", "head"), CASES)
def test_without_refit_it_is_the_network_with_the_removed_groups_zeroed(groups, rank, head, method):
    net, x = _build(groups, rank, head, bn=True)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    kept = report.layers[0].kept_units
    assert len(kept) == groups // 2 and report.layers[0].n_units == groups
    channels = [g * (C // groups) + i for g in kept for i in range(C // groups)]
    assert pruned.c1.out_channels == len(channels) == C // 2
    assert torch.equal(pruned.c1.weight, net.c1.weight[channels])
    assert torch.equal(pruned.bn.running_mean, net.bn.running_mean[channels])
    with torch.no_grad():
        got = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(("groups", "rank"), [(4, 2), (16, 2), (4, 1), (8, 1)])
def test_the_pruned_group_norm_is_the_original_on_the_kept_channels(groups, rank):
    net, x = _build(groups, rank)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer")
    gn, orig = pruned.gn, net.gn
    kept = report.layers[0].kept_units
    size = C // groups
    channels = torch.tensor([g * size + i for g in kept for i in range(size)])
    assert (gn.num_groups, gn.num_channels, gn.eps, gn.affine) == (len(kept), len(channels), orig.eps, orig.affine)
    g = torch.Generator().manual_seed(5)
    full = torch.randn(7, C, *(5,) * rank, generator=g) * 3 + 1
    with torch.no_grad():
        want = orig(full)[:, channels]
        got = gn(full[:, channels])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_group_norm_without_affine_entries_is_pruned_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(64, 3, 7, 7)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", reweight=False)
    assert (pruned[1].num_groups, pruned[1].num_channels, pruned[1].weight) == (2, 4, None)
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, zeroed_at_consumers(net, report, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2])
def test_refit_equals_lstsq_on_the_captured_consumer_input(rank):
    net, x = _build(4, rank, n=128)
    net, x = net.double(), x.double()
    captured = captured_input(net, net.c2, x)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = np.asarray(report.layers[0].kept_units)
    h = captured if rank == 2 else captured.unsqueeze(2)  # a 1-D convolution's patches: the 2-D unfold of (N, C, 1, L)
    k = (3, 3) if rank == 2 else (1, 3)
    taps = k[0] * k[1]
    patches = F.unfold(h, k).transpose(1, 2).reshape(-1, C * taps).numpy()  # rows: positions; columns: channel-major
    W = net.c2.weight.detach().reshape(5, -1).numpy()
    Y = patches @ W.T
    channels = (kept[:, None] * 4 + np.arange(4)).ravel()  # groups of 4 channels
    cols = (channels[:, None] * taps + np.arange(taps)).ravel()
    A = np.hstack([patches[:, cols], np.ones((len(patches), 1))])
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    np.testing.assert_allclose(pruned.c2.weight.detach().reshape(5, -1).numpy(), sol[:-1].T, atol=1e-8)
    np.testing.assert_allclose(pruned.c2.bias.detach().numpy(), net.c2.bias.detach().numpy() + sol[-1], atol=1e-8)


@pytest.mark.parametrize(("groups", "head"), [(4, "conv"), (16, "conv"), (4, "linear")])
def test_a_compression_budget_is_met(groups, head):
    net, x = _build(groups, 2, head, bn=True, n=64)
    check_budgets_against_built_networks(net, x, (1.5, 3.0))


@pytest.mark.parametrize(("groups", "rank", "head"), [(4, 2, "conv"), (8, 1, "linear")])
def test_save_and_load_restore_the_group_norm(groups, rank, head, tmp_path):
    net, x = _build(groups, rank, head, n=64)
    pruned, _ = nna.prune(net, x, keep=0.5, method="asym")
    assert_save_load_round_trip(pruned, GroupNormNet(groups, rank, head), x, tmp_path / "net.pt")
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / "again.pt"), base_model=GroupNormNet(groups, rank, head))
    assert (back.gn.num_groups, back.gn.num_channels) == (groups // 2, C // 2)


def test_the_callers_model_is_unchanged():
    net, x = _build(4, 2, bn=True, n=64)
    before = copy.deepcopy(net.state_dict())
    nna.prune(net, x, keep=0.5, method="asym")
    assert (net.gn.num_groups, net.gn.num_channels, net.c1.out_channels, net.c2.in_channels) == (4, C, C, C)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class ResBlock(nn.Module):
    """A diffusion-model (DDPM / Stable Diffusion U-Net) residual block: ``x + conv2(dropout(silu(norm2(conv1(
    silu(norm1(x)))))))`` with ``GroupNorm(groups, c)``."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.dropout, self.conv2 = nn.GroupNorm(groups, c), nn.Dropout(0.1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class TinyDenoiser(nn.Module):
    """stem conv -> ResBlock -> GroupNorm -> SiLU -> output conv."""

    def __init__(self, c: int = 32, groups: int = 8) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, c, 3, padding=1), ResBlock(c, groups)
        self.norm_out, self.out = nn.GroupNorm(groups, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.norm_out(self.block(self.stem(x)))))


def test_a_diffusion_res_block_prunes_conv1_group_by_group(tmp_path):
    torch.manual_seed(0)
    net = randomise_gn(TinyDenoiser()).eval()
    x = torch.randn(48, 3, 8, 8)
    (pair,), skipped = nna.find_pairs(net, x[:2])
    assert (pair.name, pair.between, pair.n_units, pair.group_size) == ("block.conv1->block.conv2",
                                                                        ("block.norm2",), 8, 4)
    assert "block.conv2" in dict(skipped)  # its output feeds the residual sum x + h
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    b = pruned.block
    assert (b.conv1.out_channels, b.norm2.num_groups, b.norm2.num_channels, b.conv2.in_channels) == (16, 4, 16, 16)
    assert (b.conv2.out_channels, b.norm1.num_channels, pruned.norm_out.num_channels) == (32, 32, 32)
    with torch.no_grad():
        got = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    refit, _ = nna.prune(net, x, compression=1.3, method="asym")
    assert sum(p.numel() for p in refit.parameters()) <= sum(p.numel() for p in net.parameters()) / 1.3
    assert_save_load_round_trip(refit, TinyDenoiser(), x, tmp_path / "denoiser.pt")


class TwoNorms(nn.Module):
    """conv -> GroupNorm(g1, 16) -> ReLU -> GroupNorm(g2, 16) -> conv."""

    def __init__(self, g1: int, g2: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, C, 3), nn.Conv2d(C, 4, 3)
        self.n1, self.n2 = nn.GroupNorm(g1, C), nn.GroupNorm(g2, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.n2(F.relu(self.n1(self.c1(x)))))


def test_two_group_norms_with_one_group_size_agree_and_two_sizes_are_refused():
    x = torch.randn(2, 3, 7, 7)
    (pair,), _ = nna.find_pairs(TwoNorms(4, 4), x)
    assert (pair.between, pair.n_units) == (("n1", "n2"), 4)
    pairs, skipped = nna.find_pairs(TwoNorms(4, 8), x)
    assert not pairs
    why = dict(skipped)["c1"]
    assert "GroupNorm(8, 16) 'n2' has groups of 2 channels, but an earlier GroupNorm on the way has groups of 4" in why


def test_a_single_group_is_not_prunable():
    net = nn.Sequential(nn.Conv2d(3, C, 3), nn.GroupNorm(1, C), nn.SiLU(), nn.Conv2d(C, 4, 3))
    pairs, skipped = nna.find_pairs(net, torch.randn(2, 3, 7, 7))
    assert not pairs
    why = dict(skipped)["0"]
    assert "GroupNorm(1, 16) '1' normalises all 16 channels as one group" in why
    assert "not prunable" in why


class LinearThenGroupNorm(nn.Module):
    def __init__(self, reshape: bool) -> None:
        super().__init__()
        self.reshape = reshape
        self.fc = nn.Linear(4, C * 9 if reshape else C)
        self.gn = nn.GroupNorm(4, C)
        self.out = nn.Conv2d(C, 3, 3) if reshape else nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.reshape:
            h = h.view(h.size(0), -1, 3, 3)
        return self.out(F.relu(self.gn(h)))


@pytest.mark.parametrize("reshape", [False, True])
def test_a_group_norm_after_a_linear_producer_is_refused(reshape):
    pairs, skipped = nna.find_pairs(LinearThenGroupNorm(reshape), torch.randn(2, 4))
    assert not pairs
    assert "GroupNorm(4, 16) 'gn' after a Linear producer normalises groups of its units" in dict(skipped)["fc"]


class PooledGroupNorm(nn.Module):
    """conv(3 -> 16) -> ReLU -> global average pooling -> GroupNorm(groups, 16) on the pooled (N, 16) vector ->
    Linear(16, 5), 1-D or 2-D; the pooling is AdaptiveAvgPool(1) -> Flatten (``head="pool"``) or ``x.mean(spatial
    dims)`` written in forward() (``head="mean"``)."""

    def __init__(self, groups: int, rank: int = 2, head: str = "pool") -> None:
        super().__init__()
        self.head, self.rank = head, rank
        self.c1 = (nn.Conv2d if rank == 2 else nn.Conv1d)(3, C, 3, padding=1)
        self.pool = nn.Sequential((nn.AdaptiveAvgPool2d if rank == 2 else nn.AdaptiveAvgPool1d)(1), nn.Flatten())
        self.gn, self.fc = nn.GroupNorm(groups, C), nn.Linear(C, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        h = self.pool(h) if self.head == "pool" else h.mean(tuple(range(2, 2 + self.rank)))
        return self.fc(self.gn(h))


def _pooled(groups: int, rank: int = 2, head: str = "pool", n: int = 128):
    torch.manual_seed(0)
    net = randomise_gn(PooledGroupNorm(groups, rank, head)).eval()
    return net, torch.randn(n, 3, *(6,) * rank)


POOLED = [(4, 2, "pool"), (8, 2, "mean"), (4, 1, "pool"), (2, 1, "mean")]


@pytest.mark.parametrize(("groups", "rank", "head"), POOLED)
def test_a_group_norm_on_the_pooled_vector_has_groups_as_units(groups, rank, head):
    net, x = _pooled(groups, rank, head)
    (pair,), _ = nna.find_pairs(net, x[:2])
    size = C // groups
    assert (pair.producer, pair.consumer, pair.between, pair.kind) == ("c1", "fc", ("gn",), "conv->linear")
    # a group is `size` producer channels, each one pooled value: one column of the Linear per channel
    assert (pair.n_units, pair.group_size, pair.rows_per_unit, pair.cols_per_unit) == (groups, size, size, size)
    full, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(full(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", reweight=False)
    kept = report.layers[0].kept_units
    channels = [g * size + i for g in kept for i in range(size)]
    assert (pruned.c1.out_channels, pruned.gn.num_groups, pruned.gn.num_channels, pruned.fc.in_features) == (
        C // 2, groups // 2, C // 2, C // 2)
    assert torch.equal(pruned.gn.weight, net.gn.weight[channels]) and torch.equal(pruned.gn.bias, net.gn.bias[channels])
    with torch.no_grad():
        got = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_refit_behind_a_pooled_group_norm_equals_lstsq_on_the_captured_linear_input():
    net, x = _pooled(4)
    net, x = net.double(), x.double()
    captured = captured_input(net, net.fc, x)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = np.asarray(report.layers[0].kept_units)
    A_full = captured.numpy()  # (N, 16): the normalised pooled channels
    Y = A_full @ net.fc.weight.detach().numpy().T
    channels = (kept[:, None] * 4 + np.arange(4)).ravel()
    A = np.hstack([A_full[:, channels], np.ones((len(A_full), 1))])
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    # The weights are not unique: a group's normalised values satisfy sum_j (z_j - bias_j) / weight_j = 0 for every
    # sample, so its columns and the intercept are linearly dependent. The least-squares fit itself is unique.
    assert np.linalg.matrix_rank(A) < A.shape[1]
    fit = A_full[:, channels] @ pruned.fc.weight.detach().numpy().T + (pruned.fc.bias - net.fc.bias).detach().numpy()
    np.testing.assert_allclose(fit, A @ sol, atol=1e-8 * np.abs(Y).max())


@pytest.mark.parametrize("head", ["pool", "mean"])
def test_a_compression_budget_is_met_behind_a_pooled_group_norm(head, tmp_path):
    net, x = _pooled(8, head=head, n=64)
    check_budgets_against_built_networks(net, x, (1.3, 2.0))
    pruned, _ = nna.prune(net, x, keep=0.5, method="asym")
    assert_save_load_round_trip(pruned, PooledGroupNorm(8, head=head), x, tmp_path / "net.pt")


class PartlyPooledGroupNorm(nn.Module):
    """conv -> AdaptiveAvgPool2d(2) -> flatten -> GroupNorm(4, 64): groups of the (N, C * 4) positions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.pool = nn.Conv2d(3, C, 3), nn.AdaptiveAvgPool2d(2)
        self.gn, self.fc = nn.GroupNorm(4, 4 * C), nn.Linear(4 * C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gn(self.pool(self.c1(x)).flatten(1)))


def test_a_group_norm_on_flattened_positions_is_still_refused():
    pairs, skipped = nna.find_pairs(PartlyPooledGroupNorm(), torch.randn(2, 3, 7, 7))
    assert not pairs
    assert ("GroupNorm(4, 64) 'gn' reads a 2-D tensor (2, 64), not the (N, C, H, W) output of the producer or its "
            "(N, C) global pooling") in dict(skipped)["c1"]


class FlatGroupNorm(nn.Module):
    """conv2d -> x.flatten(2) -> GroupNorm: a 3-D tensor on a 2-D path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn, self.fc = nn.Conv2d(3, C, 3), nn.GroupNorm(4, C), nn.Linear(C * 25, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gn(self.c1(x).flatten(2)).flatten(1))


def test_a_group_norm_of_the_wrong_rank_is_refused():
    pairs, skipped = nna.find_pairs(FlatGroupNorm(), torch.randn(2, 3, 7, 7))
    assert not pairs
    assert "GroupNorm(4, 16) 'gn' reads a 3-D tensor (2, 16, 25), not the (N, C, H, W) output" in dict(skipped)["c1"]


class FunctionalGroupNorm(nn.Module):
    """conv(3 -> 16) -> F.group_norm(h, 4, ...) written in forward() -> ReLU -> conv(16 -> 4); the affine entries,
    when passed, are the model's parameters."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.c1, self.c2 = nn.Conv2d(3, C, 3), nn.Conv2d(C, 4, 3)
        self.weight, self.bias = nn.Parameter(torch.rand(C) + 0.5), nn.Parameter(torch.randn(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        if self.form == "affine":
            h = F.group_norm(h, 4, self.weight, self.bias)
        elif self.form == "plain":
            h = F.group_norm(h, 4)
        elif self.form == "keywords":
            h = F.group_norm(h, num_groups=4, weight=self.weight, bias=self.bias, eps=1e-6)
        elif self.form == "torch":
            h = torch.group_norm(h, 4, self.weight)
        else:  # the group count computed from the tensor
            h = F.group_norm(h, h.size(1) // 4)
        return self.c2(F.relu(h))


@pytest.mark.parametrize("form", ["affine", "plain", "keywords", "torch", "computed"])
def test_a_functional_group_norm_is_refused_with_the_advice_to_use_the_module(form):
    pairs, skipped = nna.find_pairs(FunctionalGroupNorm(form), torch.randn(2, 3, 7, 7))
    assert not pairs
    why = dict(skipped)["c1"]
    assert "group_norm" in why and "in forward() after the producer" in why
    assert "write it as an nn.GroupNorm(G, C) module, which is pruned group by group" in why
    if form != "computed":  # a literal count: the pruned forward() would make 4 groups of the kept channels
        assert "would split the kept channels into 4 groups again" in why
    assert ("its weight and bias are tensors passed in forward()" in why) == (form in ("affine", "keywords", "torch"))


def test_why_a_functional_group_norm_cannot_follow_the_pruning():
    # The pruned network runs the same forward(): F.group_norm(h_kept, 4) on the 8 channels of 2 kept groups makes
    # 4 groups of 2 channels, which is not the original normalisation restricted to the kept channels.
    h = torch.randn(5, C, 4, 4, generator=torch.Generator().manual_seed(3)) * torch.arange(1.0, C + 1)[:, None, None]
    kept = torch.arange(8)  # groups 0 and 1 of GroupNorm(4, 16)
    assert not torch.allclose(F.group_norm(h[:, kept], 4), F.group_norm(h, 4)[:, kept], atol=1e-3)
    torch.testing.assert_close(F.group_norm(h[:, kept], 2), F.group_norm(h, 4)[:, kept])  # what nn.GroupNorm becomes


def test_a_declared_pair_through_a_group_norm_is_refused_with_the_reason():
    net, x = _build(4, n=32)
    with pytest.raises(ValueError, match="GroupNorm 'gn' in between: a pair through a GroupNorm is found by tracing"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("c1", "c2", between=("gn",))])


def test_the_baselines_score_whole_groups():
    net, x = _build(4, n=64)
    y = torch.randint(0, 5, (64,))
    # weight_norm: the norm of a group's producer rows; actgrad: sum over samples of |sum over the group's
    # channels and positions of a * dL/da| at the consumer's input (the loss summed over the batch)
    rows = net.c1.weight.detach().reshape(4, -1).norm(dim=1)
    h = F.silu(net.gn(net.c1(x))).detach().requires_grad_(True)
    out = net.c2(h).mean((2, 3))
    (F.cross_entropy(out, y) * len(x)).backward()
    act = (h * h.grad).detach().reshape(64, 4, -1).sum(2).abs().sum(0)

    class Pooled(nn.Module):  # the loss needs (N, classes): average the consumer's output map
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z).mean((2, 3))

    for method, score in (("weight_norm", rows), ("actgrad", act)):
        _, report = nna.prune(Pooled(), [(x, y)], keep=0.5, method=method, reweight=False)
        assert sorted(report.layers[0].kept_units) == sorted(torch.argsort(-score)[:2].tolist()), method
