"""Tests of Conv1d support in nn_adapters: pair discovery, statistics, refit, shrinking, budgets, baselines, save/load.

The oracles are independent of the implementation: the consumer's patches are built here by slicing the padded
activations (not with F.unfold), refits are compared with numpy's lstsq, pruning without refit with the original
network whose removed channels are masked to zero, FLOPs with the count written out from the layer sizes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import GlobalPoolNet, check_budgets_against_built_networks, randomise_bn, zeroed_at_consumers
from torch import nn

import nn_adapters as nna
from nn_adapters import zoo
from nn_adapters.budget import count_flops

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(zoo.mnist1d_cnn(channels=(6, 8, 8), length=16))


class FunctionalNet(nn.Module):
    """Conv1d -> F.relu -> F.dropout1d -> F.max_pool1d -> Conv1d -> F.avg_pool1d -> x.view(n, -1) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(2, 6, 3, padding=1), nn.Conv1d(6, 5, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(5 * 3, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool1d(F.dropout1d(F.relu(self.c1(x)), 0.1, self.training), 2)
        x = F.avg_pool1d(torch.tanh(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


HEADS = {
    "x.mean(-1)": lambda x: x.mean(-1),
    "x.amax(dim=2)": lambda x: x.amax(dim=2),
    "x.sum(-1) / x.shape[-1]": lambda x: x.sum(-1) / x.shape[-1],
    "adaptive avg pool + flatten": lambda x: F.adaptive_avg_pool1d(x, 1).flatten(1),
    "adaptive max pool + squeeze(-1)": lambda x: F.adaptive_max_pool1d(x, 1).squeeze(-1),
}

CASES = {
    "mnist1d_cnn": (_small_cnn, (120, 1, 16)),
    "functional": (FunctionalNet, (150, 2, 12)),
    "global mean": (lambda: GlobalPoolNet(HEADS["x.mean(-1)"], nn.Conv1d), (100, 1, 10)),
    "adaptive pools": (lambda: nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.AdaptiveMaxPool1d(6),
                                             nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding="valid"), nn.ReLU(),
                                             nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, 3)), (100, 2, 13)),
}


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_everything_reproduces_outputs(case, method):
    build, shape = CASES[case]
    net = randomise_bn(build())
    x = torch.randn(*shape)
    pruned, report = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    assert "conv->conv" in {r.kind for r in report.layers} and all(r.kept == r.n_units for r in report.layers)
    with torch.no_grad():
        ref, out = net(x), pruned.eval()(x)
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0), (out - ref).abs().max()


def test_pair_kinds_of_the_zoo_cnn_and_other_layouts():
    pairs, skipped = nna.find_pairs(zoo.mnist1d_cnn(), torch.zeros(2, 1, 40))
    # kernels 3 and 3 in the consumers; after two poolings by 2 the head reads 40 / 4 = 10 positions per channel
    assert [(p.producer, p.consumer, p.kind, p.n_units, p.cols_per_unit, p.between) for p in pairs] == [
        ("0", "3", "conv->conv", 32, 3, ("1",)), ("3", "7", "conv->conv", 64, 3, ("4",)),
        ("7", "12", "conv->linear", 64, 10, ("8",))]
    assert dict(skipped) == {"12": "its output is the network output"}
    pairs, _ = nna.find_pairs(FunctionalNet(), torch.zeros(2, 2, 12))
    assert [(p.name, p.kind, p.cols_per_unit) for p in pairs] == [
        ("c1->c2", "conv->conv", 3), ("c2->fc1", "conv->linear", 3), ("fc1->fc2", "linear->linear", 1)]
    for head in HEADS.values():
        pairs, _ = nna.find_pairs(GlobalPoolNet(head, nn.Conv1d), torch.zeros(2, 1, 10))
        assert [(p.name, p.kind, p.cols_per_unit) for p in pairs] == [("c1->c2", "conv->conv", 3),
                                                                      ("c2->fc", "conv->linear", 1)]
    with pytest.raises(ValueError, match="multiple of 4"):
        zoo.mnist1d_cnn(length=42)


def _patches(h: np.ndarray, k: int, stride: int, padding: int, dilation: int) -> np.ndarray:
    """Rows of a Conv1d consumer's design matrix built by slicing: one row per (sample, output position), the
    channels' taps channel-major (the layout of ``weight[o].reshape(-1)``)."""
    hp = np.pad(h, ((0, 0), (0, 0), (padding, padding)))
    span = dilation * (k - 1) + 1
    rows = []
    for n in range(hp.shape[0]):
        for start in range(0, hp.shape[2] - span + 1, stride):
            rows.append(hp[n, :, start:start + span:dilation].reshape(-1))
    return np.array(rows)


def _lstsq_with_intercept(A: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sol = np.linalg.lstsq(np.hstack([A, np.ones((len(A), 1))]), Y, rcond=None)[0]
    return sol[:-1], sol[-1]


@pytest.mark.parametrize(("k", "stride", "padding", "dilation"), [
    (3, 1, 1, 1), (2, 2, 1, 1), (3, 1, 2, 2), (3, 2, "valid", 1), (4, 3, 3, 1), (1, 1, 0, 1)])
def test_refit_equals_lstsq_on_patches_sliced_by_hand(k, stride, padding, dilation):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv1d(6, 4, k, stride=stride, padding=padding, dilation=dilation)).double().eval()
    x = torch.randn(40, 2, 11, dtype=torch.float64)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = report.layers[0].kept_units
    assert report.layers[0].kind == "conv->conv" and len(kept) == 3
    with torch.no_grad():
        h = torch.relu(net[0](x)).numpy()
        out = net[2](torch.relu(net[0](x)))
    A = _patches(h, k, stride, 0 if padding == "valid" else padding, dilation)
    W = net[2].weight.detach().numpy().reshape(4, -1)
    np.testing.assert_allclose(A @ W.T + net[2].bias.detach().numpy(),
                               out.transpose(1, 2).reshape(-1, 4).numpy(), atol=1e-10)  # the slicing is right
    cols = np.concatenate([np.arange(c * k, (c + 1) * k) for c in kept])
    M, b = _lstsq_with_intercept(A[:, cols], A @ W.T)
    np.testing.assert_allclose(pruned[2].weight.detach().numpy().reshape(4, -1), M.T, atol=1e-8)
    np.testing.assert_allclose(pruned[2].bias.detach().numpy(), net[2].bias.detach().numpy() + b, atol=1e-8)
    np.testing.assert_array_equal(pruned[0].weight.detach().numpy(), net[0].weight.detach().numpy()[kept])


def test_refit_conv_to_flatten_linear_equals_lstsq():
    torch.manual_seed(0)
    net = randomise_bn(nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.MaxPool1d(2),
                                      nn.Flatten(), nn.Linear(6 * 5, 4)).double())
    x = torch.randn(200, 1, 10, dtype=torch.float64)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", ridge=0.0)
    lr = report.layers[0]
    assert (lr.kind, lr.n_units, lr.kept) == ("conv->linear", 6, 3)
    with torch.no_grad():
        pooled = F.max_pool1d(F.relu(net[1](net[0](x))), 2).numpy()  # (N, 6, 5)
    A = pooled.reshape(200, -1)  # channel c owns columns 5c .. 5c + 4
    Y = A @ net[5].weight.detach().numpy().T
    M, b = _lstsq_with_intercept(pooled[:, lr.kept_units].reshape(200, -1), Y)
    np.testing.assert_allclose(pruned[5].weight.detach().numpy(), M.T, atol=1e-8)
    np.testing.assert_allclose(pruned[5].bias.detach().numpy(), net[5].bias.detach().numpy() + b, atol=1e-8)
    resid = ((Y - pooled[:, lr.kept_units].reshape(200, -1) @ M - b) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
    assert lr.relative_error == pytest.approx(resid, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("head", list(HEADS))
def test_global_pooling_heads_refit_on_pooled_features(head):
    torch.manual_seed(0)
    net = GlobalPoolNet(HEADS[head], nn.Conv1d).double().eval()
    x = torch.randn(120, 1, 10, dtype=torch.float64)
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    kept = report.layers[1].kept_units
    with torch.no_grad():
        A = HEADS[head](F.relu(net.c2(F.relu(net.c1(x))))).numpy()
    M, _ = _lstsq_with_intercept(A[:, kept], A @ net.fc.weight.detach().numpy().T)
    np.testing.assert_allclose(pruned.fc.weight.detach().numpy(), M.T, atol=1e-8)
    assert pruned.c2.out_channels == 4 and pruned(x).shape == (120, 3)


def test_removed_channels_vanish_from_producer_batchnorm_and_consumer():
    net = _small_cnn()
    for reweight in (False, True):
        pruned, report = nna.prune(net, torch.randn(80, 1, 16), keep=0.5, method="asym", reweight=reweight)
        k0, k3, k7 = (lr.kept_units for lr in report.layers)
        assert (pruned[0].out_channels, pruned[3].in_channels, pruned[3].out_channels, pruned[7].in_channels,
                pruned[7].out_channels, pruned[12].in_features) == (3, 3, 4, 4, 4, 4 * 4)
        for bn, kept in (("1", k0), ("4", k3), ("8", k7)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(pruned.get_submodule(bn), name), getattr(net.get_submodule(bn), name)[kept])
        # the first producer is no consumer: its kept filters are the original ones
        assert torch.equal(pruned[0].weight, net[0].weight[k0]) and torch.equal(pruned[0].bias, net[0].bias[k0])
        if not reweight:  # every layer: the kept output rows and the kept input channels of the original weights
            assert torch.equal(pruned[3].weight, net[3].weight[k3][:, k0])
            assert torch.equal(pruned[7].weight, net[7].weight[k7][:, k3])
            cols = (torch.tensor(k7)[:, None] * 4 + torch.arange(4)).reshape(-1)  # 4 positions per channel
            assert torch.equal(pruned[12].weight, net[12].weight[:, cols])
            assert torch.equal(pruned[3].bias, net[3].bias[k3]) and torch.equal(pruned[12].bias, net[12].bias)


@pytest.mark.parametrize("method", ["asym", "random", "weight_norm", "act_norm"])
def test_without_refit_pruning_equals_zeroing_the_removed_channels(method):
    net = _small_cnn()
    x = torch.randn(60, 1, 16)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False, seed=3)
    with torch.no_grad():
        out = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()
    assert not torch.allclose(out, net(x), atol=1e-3)  # something was removed


def test_weight_norm_and_act_norm_rank_channels_as_computed_here():
    net = _small_cnn()
    x = torch.randn(50, 1, 16)
    _, rep = nna.prune(net, x, keep=0.5, method="weight_norm", reweight=False)
    for lr in rep.layers:
        w = net.get_submodule(lr.pair.split("->")[0]).weight.detach()
        assert sorted(lr.kept_units) == sorted(torch.argsort(-w.flatten(1).norm(dim=1))[:lr.kept].tolist())
    # act_norm (Wanda-style): sum over a channel's columns of sum_o |W_o,col| * ||X_col||, on the original network
    _, rep = nna.prune(net, x, keep=0.5, method="act_norm", reweight=False, refit_from="layer")
    with torch.no_grad():
        h = F.relu(net[1](net[0](x))).double().numpy()  # input of consumer net[3] (kernel 3, padding 1)
    A = _patches(h, 3, 1, 1, 1)
    score = (np.abs(net[3].weight.detach().double().numpy().reshape(8, -1)).sum(0)
             * np.linalg.norm(A, axis=0)).reshape(6, 3).sum(1)
    assert sorted(rep.layers[0].kept_units) == sorted(np.argsort(-score)[:3].tolist())


def test_actgrad_sums_positions_per_sample_before_the_absolute_value():
    from nn_adapters.pruning import _actgrad_scores

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8, 3)).double().eval()
    x, y = torch.randn(12, 1, 8, dtype=torch.float64), torch.randint(0, 3, (12,))
    pairs, _ = nna.find_pairs(net, x[:2])
    want = np.zeros(5)
    for n in range(12):
        a = torch.relu(net[0](x[n:n + 1])).detach().requires_grad_(True)
        F.cross_entropy(net[5](net[4](net[3](net[2](a)))), y[n:n + 1]).backward()
        want += (a * a.grad).sum(dim=2).abs().squeeze(0).detach().numpy()
    got = _actgrad_scores(net, pairs, [(x[:5], y[:5]), (x[5:], y[5:])], None)["0->2"]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_budgets_params_and_flops():
    net = _small_cnn()
    x = torch.randn(100, 1, 16)
    check_budgets_against_built_networks(net, x, (2.0, 4.0, 8.0))
    # FLOPs per sample written out: conv5 1->6 and conv3 6->8 at length 16, conv3 8->8 at 8, Linear 8*4 -> 10
    assert count_flops(net, x) == 2 * (16 * 6 * 1 * 5 + 16 * 8 * 6 * 3 + 8 * 8 * 8 * 3 + 32 * 10)
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym")
    assert rep.flops_after == 2 * (16 * 3 * 1 * 5 + 16 * 4 * 3 * 3 + 8 * 4 * 4 * 3 + 16 * 10)


@pytest.mark.parametrize("method", nna.METHODS)
def test_caller_model_and_data_untouched_hooks_removed(method):
    net = _small_cnn().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(40, 1, 16), torch.randint(0, 10, (40,))
    x0, y0 = x.clone(), y.clone()
    pruned, report = nna.prune(net, [(x, y)], compression=2.0, method=method)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert net.training and pruned.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in [*net.modules(), *pruned.modules()])
    assert all(p.grad is None for p in net.parameters())
    assert report.compression >= 2.0 and [r.kind for r in report.layers] == ["conv->conv", "conv->conv",
                                                                              "conv->linear"]


def test_save_load_round_trip(tmp_path):
    net = _small_cnn()
    x = torch.randn(64, 1, 16)
    pruned, _ = nna.prune(net, x, compression=3.0, method="asym")
    path = nna.save_pruned(pruned, tmp_path / "m.pt")
    spec = nna.io.architecture_spec(pruned)
    assert spec["builder"]["name"] == "mnist1d_cnn" and spec["shapes"]["3"]["type"] == "Conv1d"
    back = nna.load_pruned(path)  # rebuilt from the zoo, no base model
    assert [tuple(p.shape) for p in back.parameters()] == [tuple(p.shape) for p in pruned.parameters()]
    assert isinstance(back[3], nn.Conv1d) and back[3].in_channels == pruned[3].in_channels
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))
    assert os.listdir(tmp_path) == ["m.pt"]

    class MyConv1d(nn.Conv1d):
        pass

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(MyConv1d(2, 8, 3, padding=1), nn.ReLU(), MyConv1d(8, 6, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(6 * 8, 3)).eval()

    xc = torch.randn(50, 2, 10)
    custom, _ = nna.prune(build(), xc, keep=0.5, method="seq")
    path = nna.save_pruned(custom, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="base_model"):
        nna.load_pruned(path)
    again = nna.load_pruned(path, base_model=build())
    with torch.no_grad():
        assert torch.equal(again(xc), custom(xc))
    wrong = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    with pytest.raises(ValueError, match="layer '0' is a Conv2d in the base architecture but a Conv1d in the file"):
        nna.load_pruned(path, base_model=wrong)


def test_declared_pairs_match_discovered_ones():
    net = _small_cnn()
    x = torch.randn(80, 1, 16)
    found, rf = nna.prune(net, x, keep=0.5, method="layer", ridge=1e-3)
    declared, rd = nna.prune(net, x, keep=0.5, method="layer", ridge=1e-3,
                             pairs=[nna.Pair("7", "12", ("8",)), nna.Pair("0", "3", ("1",)), ("3", "7", "4")])
    assert [(r.pair, r.kind, r.kept_units) for r in rd.layers] == [(r.pair, r.kind, r.kept_units) for r in rf.layers]
    with torch.no_grad():
        assert torch.equal(found(x), declared(x))
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' also receives.*between=\('1',\)"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("0", "3")])


def test_refusals_name_the_problem():
    x = torch.randn(20, 4, 12)

    def skipped(net, inp=x):
        pairs, why = nna.find_pairs(net.eval(), inp[:2])
        return [p.name for p in pairs], dict(why)

    grouped = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 8, 2))
    names, why = skipped(grouped)
    assert names == ["2->5"] and "grouped convolution (groups=2)" in why["0"]
    with pytest.raises(ValueError, match="grouped convolution"):
        nna.prune(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=4)), x, keep=0.5)
    for consumer, match in ((nn.Conv1d(8, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
                            (nn.Conv1d(8, 4, 3, padding="same"), "padding='same' is not supported")):
        names, why = skipped(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), consumer, nn.ReLU(), nn.Flatten(),
                                           nn.Linear(4 * 10, 2)))
        assert "0->2" not in names and match in why["0"]
    # a 2-D pooling of the (N, C, L) output reads it as one unbatched image and pools across channels
    names, why = skipped(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv1d(4, 4, 3)))
    assert re.search(r"2-D pooling 2 of a 3-D tensor .* pools across the producer's channels", why["0"])

    class Mixed(nn.Module):  # Conv2d -> mean over H -> Conv1d
        def __init__(self) -> None:
            super().__init__()
            self.c2, self.c1, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv1d(6, 4, 3), nn.Linear(4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.c1(F.relu(self.c2(x)).mean(2))).flatten(1))

    names, why = skipped(Mixed(), torch.randn(4, 1, 5, 6))
    assert "c2" in why and "mixed 1-D/2-D convolution path (Conv2d -> Conv1d)" in why["c2"]
    with pytest.raises(ValueError, match=r"mixed 1-D/2-D convolution path \(Conv2d -> Conv1d\)"):
        nna.prune(Mixed().eval(), torch.randn(30, 1, 5, 6), keep=0.5, method="layer", pairs=[nna.Pair("c2", "c1")])

    class StdConv1d(nn.Conv1d):  # weight standardisation: not the plain layer of .weight
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean((1, 2), keepdim=True)) / (self.weight.std((1, 2), keepdim=True) + 1e-5)
            return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    std = nn.Sequential(StdConv1d(4, 8, 3, padding=1), nn.ReLU(), StdConv1d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 12, 3)).eval()
    with pytest.raises(ValueError, match="StdConv1d overrides Conv1d.forward and computes something else"):
        nna.prune(std, x, keep=0.5)


def test_cli_prune_conv1d_user_model(tmp_path, monkeypatch, capsys):
    import argparse

    from nn_adapters import cli

    (tmp_path / "signals.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(60, 1, 16); y = torch.randint(0, 10, (60,))\n"
        "    return zoo.mnist1d_cnn(channels=(4, 8, 8), length=16).eval(), [(x, y)], [(x, y)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = argparse.ArgumentParser(prog="submod")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", "signals:build", "--compression", "2", "--out", "p.pt"])
    assert args.func(args) == 0
    assert "conv->linear" in capsys.readouterr().out
    assert isinstance(nna.load_pruned(tmp_path / "p.pt")[3], nn.Conv1d)


# Calibration batches of several lengths (global pooling): the statistics add up over batches, a convolution's
# rows being its (sample, position) patches and the head's one row per sample.
LENGTHS = (12, 16, 20)


def _mixed_length_batches(dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(30, 1, n, dtype=dtype), torch.randint(0, 3, (30,))) for n in LENGTHS]


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", nna.METHODS)
def test_mixed_lengths_keep_everything_reproduces_every_batch(method):
    torch.manual_seed(0)
    net = GlobalPoolNet(HEADS["x.mean(-1)"], nn.Conv1d).double().eval()
    batches = _mixed_length_batches()
    pruned, report = nna.prune(net, batches, keep=1.0, method=method, ridge=0.0)
    assert report.n_samples == 90 and [r.kind for r in report.layers] == ["conv->conv", "conv->linear"]
    assert report.flops_before == count_flops(net, batches[0][0])  # the first batch's length
    with torch.no_grad():
        for x, _ in batches:
            ref = net(x)
            assert torch.allclose(pruned(x), ref, atol=1e-9 * ref.abs().max().item(), rtol=0)


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")
def test_mixed_image_sizes_keep_everything_reproduces_every_batch():
    torch.manual_seed(0)
    net = GlobalPoolNet(lambda x: x.mean((2, 3)), nn.Conv2d).double().eval()
    batches = [torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randn(20, 1, 9, 7, dtype=torch.float64)]
    pruned, _ = nna.prune(net, batches, keep=1.0, method="asym", ridge=0.0)
    with torch.no_grad():
        for x in batches:
            assert torch.allclose(pruned(x), net(x), atol=1e-8, rtol=0)


def test_mixed_lengths_layer_refit_equals_lstsq_on_the_rows_of_all_batches():
    torch.manual_seed(0)
    net = GlobalPoolNet(HEADS["x.mean(-1)"], nn.Conv1d).double().eval()
    batches = _mixed_length_batches()
    pruned, report = nna.prune(net, batches, keep=0.5, method="layer", ridge=0.0)
    seen: dict[str, list[np.ndarray]] = {"c2": [], "fc": []}
    handles = [getattr(net, name).register_forward_pre_hook(
        lambda _m, inp, name=name: seen[name].append(inp[0].detach().numpy())) for name in seen]
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    for h in handles:
        h.remove()
    A = np.vstack([_patches(h, 3, 1, 1, 1) for h in seen["c2"]])  # rows of lengths 12, 16 and 20
    assert A.shape == (30 * sum(LENGTHS), 18)
    W = net.c2.weight.detach().numpy().reshape(8, -1)
    kept, kept2 = report.layers[0].kept_units, report.layers[1].kept_units  # c2's outputs are pruned as well
    M, b = _lstsq_with_intercept(A[:, np.concatenate([np.arange(3 * c, 3 * c + 3) for c in kept])], A @ W.T)
    np.testing.assert_allclose(pruned.c2.weight.detach().numpy().reshape(4, -1), M.T[kept2], atol=1e-8)
    np.testing.assert_allclose(pruned.c2.bias.detach().numpy(), (net.c2.bias.detach().numpy() + b)[kept2], atol=1e-8)
    P = np.vstack(seen["fc"])  # one pooled row per sample
    M, b = _lstsq_with_intercept(P[:, kept2], P @ net.fc.weight.detach().numpy().T)
    np.testing.assert_allclose(pruned.fc.weight.detach().numpy(), M.T, atol=1e-8)
    np.testing.assert_allclose(pruned.fc.bias.detach().numpy(), net.fc.bias.detach().numpy() + b, atol=1e-8)


@pytest.mark.parametrize("method", ["seq", "asym"])
def test_mixed_lengths_sequential_methods_give_a_model_for_every_length(method):
    torch.manual_seed(0)
    net = GlobalPoolNet(HEADS["x.amax(dim=2)"], nn.Conv1d).eval()
    batches = _mixed_length_batches(torch.float32)
    pruned, report = nna.prune(net, batches, keep=0.5, method=method)
    assert [(r.kept, r.n_units) for r in report.layers] == [(3, 6), (4, 8)] and report.n_samples == 90
    with torch.no_grad():
        for n in (*LENGTHS, 7):
            assert pruned(torch.randn(5, 1, n)).shape == (5, 3)


def test_mixed_lengths_refused_before_any_work_where_the_pairs_would_differ(monkeypatch):
    net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 3))
    batches = [torch.randn(10, 1, 12), torch.randn(10, 1, 12), torch.randn(10, 1, 16)]
    for method in ("layer", "asym"):
        with pytest.raises(ValueError, match=r"batch 2 has sample shape \(1, 16\) and batch 0 \(1, 12\), and the "
                                             r"model fails on \(1, 16\) \(RuntimeError"):
            nna.prune(net, batches, keep=0.5, method=method)
    with pytest.raises(ValueError, match=r"batch 2 has sample shape .* model fails"):
        nna.prune(net, batches, keep=0.5, method="layer", pairs=[("0", "3")])
    # a model that runs on both shapes but whose pairs would differ (cols_per_unit here) is refused as well
    net = GlobalPoolNet(HEADS["x.mean(-1)"], nn.Conv1d)
    real = nna.pruning.find_pairs

    def shape_dependent(model, x):
        found, skipped = real(model, x)
        if x.shape[-1] == 16:
            found = [dataclasses.replace(p, cols_per_unit=2) if p.kind == "conv->linear" else p for p in found]
        return found, skipped

    monkeypatch.setattr(nna.pruning, "find_pairs", shape_dependent)
    with pytest.raises(ValueError, match="the prunable pairs differ between the two shapes"):
        nna.prune(net, batches, keep=0.5)
