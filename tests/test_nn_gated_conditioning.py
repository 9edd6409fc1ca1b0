"""Gated units and conditioning terms on one path, and which of the two a product is.

A product of the path with another producer's output of the same shape is gated units (``silu(gate(x)) * up(x)``:
both producers lose the unit's row); a product or sum with a term computed by a ``Linear`` from another input and
broadcast over the positions is a conditioning term (FiLM's ``h * (1 + scale) + shift``, a time embedding added to
a convolution's channels). A model may hold both: a SwiGLU whose gated units receive a class embedding, or a
``Linear``'s features modulated FiLM-style (the scale then has the features' shape, like a gate, but it comes from a
chunk of another Linear's output, not from a producer's).

Oracles: the unpruned network (keep everything), the original network with the removed units zeroed at the
consumer's input (no refit), the physical sizes of every layer whose rows follow the units, and a save/load round
trip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_save_load_round_trip,
    check_budgets_against_built_networks,
    check_gpu_equals_cpu,
    zeroed_at_consumers,
)
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")

H = 12  # units of every pair below


class LinearFiLM(nn.Module):
    """``fc2(relu(fc1(x) * (1 + scale) + shift))`` with ``scale, shift = film(x[:, :4]).chunk(2, -1)``: the scale
    has the features' shape, so the product looks like a gate, but its factor is a chunk of another Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.film, self.fc2 = nn.Linear(8, H), nn.Linear(4, 2 * H), nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(x[:, :4]).chunk(2, dim=-1)
        return self.fc2(F.relu(self.fc1(x) * (1 + scale) + shift))


class GatedWithEmbedding(nn.Module):
    """A SwiGLU MLP whose gated units receive a class-embedding-like term: ``down(silu(gate(x)) * up(x) +
    emb(x[:, :4]))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.emb = nn.Linear(8, H), nn.Linear(8, H), nn.Linear(4, H)
        self.down = nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x) + self.emb(x[:, :4]))


class GatedConvScaleShift(nn.Module):
    """WaveNet's gated activation followed by FiLM after a GroupNorm (diffusers' "scale_shift"): units are the
    GroupNorm's groups of 3 channels, which both gated producers and both chunks of ``film`` lose together."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Conv1d(3, H, 3, padding=1), nn.Conv1d(3, H, 3, padding=1)
        self.norm, self.film = nn.GroupNorm(4, H), nn.Linear(3, 2 * H)
        self.out = nn.Conv1d(H, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(x.mean(2))[:, :, None].chunk(2, dim=1)
        h = self.norm(torch.tanh(self.f(x)) * torch.sigmoid(self.g(x)))
        return self.out(F.silu(h * (1 + scale) + shift))


CASES = {
    "linear-film": (LinearFiLM, (8,), {"producer": "fc1", "gated_with": None, "conditioning": ("film",)},
                    {"fc1": ("weight", 0, 1), "film": ("weight", 0, 2), "fc2": ("weight", 1, 1)}),
    "gated-embedding": (GatedWithEmbedding, (8,), {"producer": "gate", "gated_with": "up", "conditioning": ("emb",)},
                        {"gate": ("weight", 0, 1), "up": ("weight", 0, 1), "emb": ("weight", 0, 1),
                         "down": ("weight", 1, 1)}),
    "gated-conv-scale-shift": (GatedConvScaleShift, (3, 10),
                               {"producer": "f", "gated_with": "g", "conditioning": ("film",)},
                               {"f": ("weight", 0, 3), "g": ("weight", 0, 3), "film": ("weight", 0, 6),
                                "norm": ("weight", 0, 3), "out": ("weight", 1, 3)}),
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, dict, dict]:
    cls, shape, fields, sizes = CASES[name]
    torch.manual_seed(0)
    net = cls().eval()
    return net, torch.randn(96, *shape), fields, sizes


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_pair_records_its_gated_partner_and_its_conditioning_layer(name):
    net, x, fields, _ = _case(name)
    pairs, skipped = nna.find_pairs(net, x[:2])
    (pair,) = pairs
    assert (pair.producer, pair.gated_with, pair.conditioning) == (
        fields["producer"], fields["gated_with"], fields["conditioning"])
    names = dict(skipped)
    assert fields["conditioning"][0] not in names  # pruned with the pair, not skipped
    if fields["gated_with"] is not None:
        assert names[fields["gated_with"]] == f"pruned with {fields['producer']!r} (gated units)"


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_keeping_every_unit_reproduces_the_network(name, method):
    net, x, _, _ = _case(name)
    pruned, _ = nna.prune(net, x, keep=1.0, method=method)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["asym", "random", "weight_norm"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_without_refit_the_pruned_network_is_the_original_with_the_removed_units_zeroed(name, method, tmp_path):
    net, x, _, sizes = _case(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False, seed=1)
    (layer,) = report.layers
    assert layer.kept == H // 2 // (3 if name == "gated-conv-scale-shift" else 1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x), rtol=1e-5, atol=1e-5)
    # every layer whose rows (or, for the consumer, columns) follow the units lost the removed units' share
    for module, (param, dim, per_unit) in sizes.items():
        got = getattr(pruned.get_submodule(module), param).shape[dim]
        assert got == getattr(net.get_submodule(module), param).shape[dim] // 2, (module, per_unit)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    assert_save_load_round_trip(pruned, _case(name)[0], x, tmp_path / name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_parameter_budget_counts_every_layer_that_follows_the_units(name):
    net, x, _, _ = _case(name)
    check_budgets_against_built_networks(net, x, (1.5,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruning_on_a_gpu_equals_pruning_on_the_cpu(name, method):
    """In float64, on the GPU (the partner producer and the conditioning layer moved there with the model): the same
    units as on the CPU, weights and outputs equal to rounding."""
    net, x, _, _ = _case(name)
    check_gpu_equals_cpu(net, x, method)
