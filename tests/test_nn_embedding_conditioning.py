"""Conditioning terms looked up in an ``nn.Embedding``: conditional instance normalisation (Dumoulin, Shlens &
Kudlur, "A Learned Representation for Artistic Style", ICLR 2017: one scale and shift per style and channel,
``IN(h) * gamma(style) + beta(style)``) and a class embedding added to a Linear's features.

Channel ``c`` of the term is column ``c`` of the embedding's weight, so removing the channel removes that column
(the embedding dim shrinks). Oracles: the unpruned network (keep everything), the original network with the removed
channels zeroed at the consumer's input (no refit), the original columns of the kept channels, the parameters of the
built networks, and a save/load round trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nn_adapters as nna
from nn_adapters.budget import ParamModel

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C, STYLES, SIDE = 12, 5, 6


class ConditionalInstanceNorm(nn.Module):
    """``conv2(relu(IN(conv1(x)) * gamma(style) + beta(style)))`` with a scale and a shift per style and channel."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, C, 3, padding=1), nn.InstanceNorm2d(C)
        self.gamma = nn.Embedding(STYLES, C, max_norm=max_norm)
        self.beta = nn.Embedding(STYLES, C)
        self.conv2 = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv1(x)) * self.gamma(style)[:, :, None, None] + self.beta(style)[:, :, None, None]
        return self.conv2(torch.relu(h))


class ClassEmbedding(nn.Module):
    """``out(relu(fc2(relu(fc1(x) + emb(y)))))``: a class embedding added to ``fc1``'s features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.emb = nn.Linear(8, C), nn.Embedding(STYLES, C)
        self.fc2, self.out = nn.Linear(C, C), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x) + self.emb(y)))))


CASES = {
    "conditional-instance-norm": (ConditionalInstanceNorm, (3, SIDE, SIDE), "conv1->conv2", ("gamma", "beta")),
    "class-embedding": (ClassEmbedding, (8,), "fc1->fc2", ("emb",)),
}


def _case(name: str) -> tuple[nn.Module, list[dict], str, tuple[str, ...]]:
    cls, shape, pair, embeddings = CASES[name]
    torch.manual_seed(0)
    net = cls().eval()
    key = "style" if name == "conditional-instance-norm" else "y"
    batches = [{"x": torch.randn(32, *shape), key: torch.randint(0, STYLES, (32,))} for _ in range(4)]
    return net, batches, pair, embeddings


def _outputs(net: nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(**b) for b in batches])


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_embeddings_are_recorded_as_conditioning_layers_of_the_pair(name):
    net, batches, pair, embeddings = _case(name)
    pairs, skipped = nna.find_pairs(net, batches[0])
    found = {p.name: p for p in pairs}
    assert found[pair].conditioning == embeddings
    assert not set(embeddings) & {n for n, _ in skipped}


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_keeping_every_channel_reproduces_the_network(name, method):
    net, batches, _, _ = _case(name)
    pruned, _ = nna.prune(net, batches, keep=1.0, method=method)
    torch.testing.assert_close(_outputs(pruned, batches), _outputs(net, batches), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["asym", "random"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_without_refit_the_embeddings_keep_the_columns_of_the_kept_channels(name, method, tmp_path):
    net, batches, pair, embeddings = _case(name)
    pruned, report = nna.prune(net, batches, keep=0.5, method=method, reweight=False, seed=2)
    layer = next(r for r in report.layers if r.pair == pair)
    kept = torch.tensor(layer.kept_units)
    for e in embeddings:
        assert pruned.get_submodule(e).embedding_dim == C // 2
        torch.testing.assert_close(pruned.get_submodule(e).weight, net.get_submodule(e).weight[:, kept])
    # the original network with the removed channels zeroed at every consumer's input
    handles = []
    for r in report.layers:
        mask = torch.zeros(r.n_units)
        mask[r.kept_units] = 1.0
        consumer = net.get_submodule(r.pair.split("->")[1])
        mask = mask.view(-1, 1, 1) if isinstance(consumer, nn.Conv2d) else mask
        handles.append(consumer.register_forward_pre_hook(lambda _m, inp, m=mask: (inp[0] * m,)))
    try:
        zeroed = _outputs(net, batches)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_outputs(pruned, batches), zeroed, rtol=1e-5, atol=1e-6)
    # the parameters counted in closed form are those of the built network
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    found, _ = nna.find_pairs(net, batches[0])
    ks = [r.kept for r in report.layers]
    assert ParamModel(net, found).count(ks) == report.params_after
    assert ParamModel(net, found).total() == sum(p.numel() for p in net.parameters())
    # save and load onto a fresh base model: the same shapes and outputs
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / name), base_model=_case(name)[0])
    assert [p.shape for p in back.parameters()] == [p.shape for p in pruned.parameters()]
    torch.testing.assert_close(_outputs(back, batches), _outputs(pruned, batches), rtol=0, atol=0)


def test_an_embedding_that_renormalises_its_rows_is_refused_with_the_reason():
    """max_norm rescales each looked-up row by its norm over all channels, which removing channels changes."""
    torch.manual_seed(0)
    net = ConditionalInstanceNorm(max_norm=1.0).eval()
    batch = {"x": torch.randn(4, 3, SIDE, SIDE), "style": torch.randint(0, STYLES, (4,))}
    pairs, skipped = nna.find_pairs(net, batch)
    assert "conv1->conv2" not in {p.name for p in pairs}
    reason = dict(skipped)["conv1"]
    assert "conditioning term computed by Embedding 'gamma'" in reason
    assert "renormalises each row it looks up to max_norm=1.0 over all its 12 channels" in reason

