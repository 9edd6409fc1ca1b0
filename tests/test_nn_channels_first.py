"""A Linear producer's units moved to channels first and back: the Mix-FFN of SegFormer (Xie et al. 2021) and the
convolutional FFN of PVTv2 (Wang et al. 2022), ``fc2(act(dwconv(fc1(x).transpose(1, 2).view(B, C, H, W))
.flatten(2).transpose(1, 2)))``. A unit is one of ``fc1``'s outputs, one channel of the depthwise convolution and one
input column of ``fc2``.

Oracles: the unpruned network (keep everything); the original network with the removed units zeroed at the
consumer's input (no refit); the refit against least squares on the consumer's captured input; refusals where a
unit would not stay in its own channel.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import captured_input, zeroed_at_consumers
from torch import nn

import nn_adapters as nna


class MixFFN(nn.Module):
    """A token MLP with a depthwise convolution over the tokens laid out as an ``h x w`` image."""

    def __init__(self, dim: int = 8, hidden: int = 16, h: int = 4, w: int = 4, dw: nn.Module | None = None,
                 fixed_channels: bool = False, layout: str = "transpose") -> None:
        super().__init__()
        self.h, self.w, self.fixed, self.layout = h, w, fixed_channels, layout
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = dw if dw is not None else nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        if self.layout == "permute":
            x = x.permute(0, 2, 1).reshape(b, -1, self.h, self.w)
        else:
            x = x.transpose(1, 2).view(b, 16 if self.fixed else c, self.h, self.w)
        x = self.dw(x)
        x = x.flatten(2).transpose(-1, -2)
        return self.fc2(self.act(x))


def _tokens(n: int = 60) -> torch.Tensor:
    return torch.randn(n, 16, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["transpose", "permute"])
def test_the_mix_ffn_is_one_pair_through_its_depthwise_convolution(layout):
    torch.manual_seed(0)
    net, x = MixFFN(layout=layout).eval(), _tokens()
    (pair,), _ = nna.find_pairs(net, x[:2])
    assert (pair.producer, pair.consumer, pair.between, pair.cols_per_unit) == ("fc1", "fc2", ("dw",), 1)
    pruned, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    assert (pruned.fc1.out_features, pruned.dw.in_channels, pruned.dw.groups, pruned.fc2.in_features) == (8, 8, 8, 8)
    kept = torch.as_tensor(report.layers[0].kept_units)
    torch.testing.assert_close(pruned.dw.weight, net.dw.weight[kept])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x), rtol=1e-5, atol=1e-6)


def test_the_refit_is_least_squares_on_the_tokens():
    torch.manual_seed(1)
    net, x = MixFFN().double().eval(), _tokens().double()
    pruned, report = nna.prune(net, x, keep=0.5, method="layer", ridge=0.0)
    a = captured_input(net, net.fc2, x).reshape(-1, 16)
    kept = report.layers[0].kept_units
    y = a @ net.fc2.weight.detach().T
    design = torch.cat([a[:, kept], torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    sol = np.linalg.lstsq(design.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(pruned.fc2.weight.detach().numpy(), sol[:-1].T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(pruned.fc2.bias.detach().numpy(), net.fc2.bias.detach().numpy() + sol[-1],
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("dw", "fixed", "match"), [
    (nn.Conv2d(16, 16, 3, padding=1), False, "not a depthwise convolution"),
    (nn.Conv2d(16, 32, 3, padding=1, groups=16), False, "not a depthwise convolution with channel multiplier 1"),
    (None, True, "hard-codes the channel count"),
])
def test_what_would_mix_the_units_is_refused_with_the_reason(dw, fixed, match):
    net = MixFFN(dw=dw, fixed_channels=fixed).eval()
    if dw is not None and dw.out_channels != 16:
        net.fc2 = nn.Linear(32, 8)
    pairs, skipped = nna.find_pairs(net, _tokens(2))
    assert pairs == []
    assert match in dict(skipped)["fc1"]


def _segformer() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                           patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                           mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5)
        return transformers.SegformerForImageClassification(cfg).eval()


def test_segformer_mix_ffns_are_pruned_with_target_layers():
    """transformers' SegFormer (the layer names differ between releases: dense1/dense2 or fc1/fc2): every block's
    Mix-FFN is a pair, with its depthwise convolution between."""
    net = _segformer()
    x = {"pixel_values": torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    mlps = {name: [n for n, m in mod.named_children() if isinstance(m, nn.Linear)]
            for name, mod in net.named_modules() if type(mod).__name__ in ("SegformerMixFFN", "SegformerMixMLP")}
    assert len(mlps) == 2
    expected = {f"{name}.{first}->{name}.{second}" for name, (first, second) in mlps.items()}
    pruned, report = nna.prune(net, x, keep=1.0, method="asym", target="layers")
    assert expected <= {r.pair for r in report.layers}
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, net(**x).logits, rtol=1e-4, atol=1e-5)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", target="layers", reweight=False)
    for pair in expected:
        producer = pair.split("->")[0]
        dw = next(m for n, m in pruned.named_modules() if n.startswith(producer.rsplit(".", 1)[0])
                  and isinstance(m, nn.Conv2d) and m.groups > 1)
        assert dw.in_channels == dw.groups == pruned.get_submodule(producer).out_features
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, zeroed_at_consumers(net, report, x).logits,
                                   rtol=1e-4, atol=1e-5)


class TokenBatchNorm(nn.Module):
    """LeViT's MLP layer: a BatchNorm1d over the tokens merged into the batch dim, ``bn(h.flatten(0, 1))
    .reshape_as(h)``, or written with ``view``/``reshape`` (``literal``: the channel count as a number)."""

    def __init__(self, how: str = "reshape_as") -> None:
        super().__init__()
        self.how = how
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.how == "reshape_as":
            h = self.bn(h.flatten(0, 1)).reshape_as(h)
        elif self.how == "view":
            n, t = h.shape[:2]
            h = self.bn(h.reshape(-1, h.size(-1))).view(n, t, -1)
        else:  # literal
            h = self.bn(h.reshape(-1, 16)).view(x.shape[0], x.shape[1], 16)
        return self.fc2(torch.nn.functional.hardswish(h))


@pytest.mark.parametrize("how", ["reshape_as", "view"])
def test_tokens_merged_into_the_batch_dim_keep_the_units_last(how):
    torch.manual_seed(3)
    net = TokenBatchNorm(how).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    x = _tokens()
    (pair,), _ = nna.find_pairs(net, x[:2])
    assert (pair.name, pair.between) == ("fc1->fc2", ("bn",))
    pruned, _ = nna.prune(net, x, keep=1.0, method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    assert pruned.bn.num_features == pruned.fc1.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x), rtol=1e-5, atol=1e-6)


def test_a_literal_channel_count_in_the_token_reshape_is_refused():
    pairs, skipped = nna.find_pairs(TokenBatchNorm("literal").eval(), _tokens(2))
    assert pairs == [] and "fc1" in dict(skipped)
