"""Tied weights (one parameter held by several modules): pruning must neither untie them nor count them twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nn_adapters as nna
from nn_adapters.budget import ParamModel

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class TiedTail(nn.Module):
    """a -> b -> h -> e -> f, where e and f hold the same weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 6)
        self.e, self.f = nn.Linear(6, 6), nn.Linear(6, 6)
        self.f.weight = self.e.weight

    def forward(self, x):
        return self.f(F.relu(self.e(F.relu(self.h(F.relu(self.b(F.relu(self.a(x)))))))))


def test_layers_with_tied_weights_are_skipped_and_stay_tied():
    torch.manual_seed(0)
    net, x = TiedTail().eval(), torch.randn(60, 8)
    pairs, skipped = nna.find_pairs(net, x[:2])
    assert [p.name for p in pairs] == ["a->b", "b->h"]
    assert dict(skipped)["h"].startswith("'e' shares a parameter with 'f' (tied weights)")
    assert dict(skipped)["e"].startswith("'e' shares a parameter with 'f'")
    pruned, report = nna.prune(net, x, keep=0.5)
    assert pruned.f.weight is pruned.e.weight
    assert [r.pair for r in report.layers] == ["a->b", "b->h"]
    with pytest.raises(ValueError, match=r"declared pair Pair\(producer='h', consumer='e'.*'e' shares a parameter"):
        nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair("h", "e")])


def test_parameter_count_counts_a_tied_parameter_once():
    net = TiedTail()
    pairs, _ = nna.find_pairs(net, torch.randn(2, 8))
    unique = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())  # 36 fewer than per module
    pm = ParamModel(net, pairs)
    assert pm.original == unique
    assert pm.total() == unique
    pruned, report = nna.prune(net, torch.randn(60, 8), compression=1.5, reweight=False)
    assert report.params_after == int(pm.count([p.out_features for p in (pruned.a, pruned.b)]))
