"""A per-channel conditioning term on the way from a producer to its consumer.

The residual block of a diffusion U-Net (DDPM, diffusers' ``ResnetBlock2D``, Improved DDPM / ADM) adds a projection
of the time embedding to the channels of its first convolution, ``h = conv1(x) + temb_proj(temb)[:, :, None, None]``,
or modulates them, FiLM-style, ``h * (1 + scale) + shift`` with ``scale, shift = temb_proj(temb).chunk(2, dim=1)``.
Channel ``c`` of the result depends on channel ``c`` of ``h`` and on the projection's rows of channel ``c`` only, so
removing a channel of ``conv1`` removes those rows too. The same holds for a class embedding added to a Linear's
features.

Oracles, independent of the implementation: the unpruned network (keep everything), the original network with the
removed channels zeroed at the consumer's input (no refit; with the refit, also the consumer's refitted weights put
in place), the original rows of the kept channels, numpy's lstsq on the consumer's unfolded input captured here,
FLOPs and parameter counts computed from the built modules' shapes, and a save/load round trip.
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
    zeroed_at_consumers,
)
from torch import nn

import nn_adapters as nna

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C, T, G = 16, 8, 4  # channels of the block, width of the time embedding, GroupNorm groups (4 channels each)
SIDE = 6


def _time_embedding(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """A stand-in for a timestep's sinusoidal embedding (no Linear), read from the images, so that the models take
    one input."""
    m = x.mean((1, 2, 3))[:, None]
    return torch.cat([torch.sin(m * freqs), torch.cos(m * freqs)], dim=1)


def _default(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return h + b.temb_proj(e)[:, :, None, None]


def _first(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return b.temb_proj(e)[:, :, None, None] + h


def _inplace(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    h += b.temb_proj(e).unsqueeze(-1).unsqueeze(-1)
    return h


def _method(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return h.add(b.dropout(b.temb_proj(e))[..., None, None])


def _view(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    n, c = h.shape[:2]
    return torch.add(h, b.temb_proj(e).view(n, c, 1, 1))


def _scale_shift(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    scale, shift = torch.chunk(b.temb_proj(e)[:, :, None, None], 2, dim=1)
    return h * (1 + scale) + shift


def _two_linears(b: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return h * b.temb_proj(e)[:, :, None, None] + b.shift_proj(e)[:, :, None, None]


#: How a block writes its conditioning, and whether the term comes after norm2 (diffusers' scale_shift) or before.
FORMS = {"default": (_default, False), "first": (_first, False), "inplace": (_inplace, False),
         "method": (_method, False), "view": (_view, False), "scale_shift": (_scale_shift, True),
         "two_linears": (_two_linears, True)}


class CondBlock(nn.Module):
    """A diffusion U-Net residual block: ``x + conv2(dropout(silu(norm2(conv1(silu(norm1(x)))) (+) temb)))``, the
    time embedding projected by ``temb_proj`` (and ``shift_proj``) joined as ``FORMS[form]`` says."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.after_norm = FORMS[form]
        self.norm1, self.conv1 = nn.GroupNorm(G, C), nn.Conv2d(C, C, 3, padding=1)
        self.temb_proj = nn.Linear(T, 2 * C if form == "scale_shift" else C)
        if form == "two_linears":
            self.shift_proj = nn.Linear(T, C)
        self.norm2, self.dropout, self.conv2 = nn.GroupNorm(G, C), nn.Dropout(0.1), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = F.silu(temb)
        h = self.form(self, self.norm2(h), e) if self.after_norm else self.norm2(self.form(self, h, e))
        return x + self.conv2(self.dropout(F.silu(h)))


class CondNet(nn.Module):
    """stem -> CondBlock -> output convolution; the time embedding read from the images."""

    def __init__(self, form: str = "default") -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])
        self.stem, self.block, self.out = nn.Conv2d(3, C, 3, padding=1), CondBlock(form), nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.stem(x), _time_embedding(x, self.freqs)))


def _build(form: str = "default", n: int = 96) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = CondNet(form).eval()
    g = torch.Generator().manual_seed(2)
    for m in net.modules():  # random affine entries: keeping the wrong ones is observable
        if isinstance(m, nn.GroupNorm):
            m.weight.data.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(C, generator=g) * 0.3)
    for m in (net.block.temb_proj, getattr(net.block, "shift_proj", None)):
        if m is not None:  # a term as large as the channels it conditions, so that a wrong row is observable
            m.weight.data.mul_(3.0)
    return net, torch.randn(n, 3, SIDE, SIDE)


def _kept_channels(report: nna.PruneReport) -> list[int]:
    """The producer's channels of the kept groups (GroupNorm(4, 16): 4 channels per unit)."""
    return [g * (C // G) + i for g in report.layers[0].kept_units for i in range(C // G)]


def _conditioning_layers(form: str) -> tuple[str, ...]:
    return ("block.temb_proj", "block.shift_proj") if form == "two_linears" else ("block.temb_proj",)


@pytest.mark.parametrize("form", list(FORMS))
def test_the_conditioning_layers_are_recorded_with_the_pair(form):
    net, x = _build(form)
    (pair,), skipped = nna.find_pairs(net, x[:2])
    assert (pair.name, pair.n_units, pair.group_size, pair.between) == ("block.conv1->block.conv2", G, C // G,
                                                                        ("block.norm2",))
    assert pair.conditioning == _conditioning_layers(form)
    assert pair.conditioning_chunks == ((2,) if form == "scale_shift" else (1,) * len(pair.conditioning))
    assert sum("conditioning (block.temb_proj)" in op for op in pair.ops) == (2 if form == "scale_shift" else 1)
    assert set(dict(skipped)) == {"stem", "block.conv2", "out"}  # the conditioning Linear is pruned with the pair


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("form", list(FORMS))
def test_keep_all_reproduces_the_network(form, method):
    net, x = _build(form)
    pruned, report = nna.prune(net, x, keep=1.0, method=method)
    assert report.layers[0].kept_units == list(range(G))
    with torch.no_grad():
        want, got = net(x), pruned(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("method", ["layer", "seq", "asym", "random", "weight_norm", "act_norm", "actgrad"])
@pytest.mark.parametrize("form", ["default", "scale_shift", "two_linears"])
def test_without_refit_it_is_the_network_with_the_removed_channels_zeroed(form, method):
    """The pruned conditioning layers hold the original rows of the kept channels (each chunk's, for FiLM), and the
    network is the original one with the removed channels zeroed at the consumer's input."""
    net, x = _build(form)
    data = [(x, torch.randn(x.shape[0], 3, SIDE, SIDE))] if method == "actgrad" else x
    pruned, report = nna.prune(net, data, keep=0.5, method=method, reweight=False, loss_fn=F.mse_loss
                               if method == "actgrad" else None)
    kept = _kept_channels(report)
    assert len(kept) == C // 2
    b, orig = pruned.block, net.block
    rows = kept + [C + c for c in kept] if form == "scale_shift" else kept
    assert torch.equal(b.temb_proj.weight, orig.temb_proj.weight[rows])
    assert torch.equal(b.temb_proj.bias, orig.temb_proj.bias[rows])
    if form == "two_linears":
        assert torch.equal(b.shift_proj.weight, orig.shift_proj.weight[kept])
    assert (b.conv1.out_channels, b.norm2.num_channels, b.conv2.in_channels) == (C // 2, C // 2, C // 2)
    with torch.no_grad():
        got = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("form", ["default", "scale_shift", "two_linears"])
def test_refit_equals_lstsq_on_the_captured_consumer_input(form, method):
    """With one pair the network pruned so far is the original one, so every method refits conv2 by least squares on
    its original input's kept channels (conditioning included); the pruned network is then the original one with
    the removed channels zeroed at conv2's input and conv2's refitted weights put in place."""
    net, x = _build(form, n=64)
    net, x = net.double(), x.double()
    captured = captured_input(net, net.block.conv2, x)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, ridge=0.0)
    kept = np.asarray(_kept_channels(report))
    patches = F.unfold(captured, 3, padding=1).transpose(1, 2).reshape(-1, C * 9).numpy()
    W = net.block.conv2.weight.detach().reshape(C, -1).numpy()
    cols = (kept[:, None] * 9 + np.arange(9)).ravel()
    A = np.hstack([patches[:, cols], np.ones((len(patches), 1))])
    sol = np.linalg.lstsq(A, patches @ W.T, rcond=None)[0]
    got_w = pruned.block.conv2.weight.detach()
    np.testing.assert_allclose(got_w.reshape(C, -1).numpy(), sol[:-1].T, atol=1e-7)
    np.testing.assert_allclose(pruned.block.conv2.bias.detach().numpy(), net.block.conv2.bias.detach().numpy()
                               + sol[-1], atol=1e-7)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref.block.conv2.weight.zero_()
        ref.block.conv2.weight[:, torch.as_tensor(kept)] = got_w
        ref.block.conv2.bias.copy_(pruned.block.conv2.bias)
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(ref, report, x), rtol=1e-9, atol=1e-9)


def _flops_from_shapes(net: nn.Module) -> int:
    """Convolutions (3x3, padding 1, stride 1 on SIDE x SIDE) and Linear layers, 2 per multiply-add."""
    total = 0
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            total += 2 * m.in_channels * m.out_channels * 9 * SIDE * SIDE
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total


@pytest.mark.parametrize("form", ["default", "scale_shift", "two_linears"])
def test_budgets_flops_verification_and_save_load(form, tmp_path):
    net, x = _build(form, n=64)
    check_budgets_against_built_networks(net, x, (1.1, 1.3))
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", verify=True)
    assert (report.flops_before, report.flops_after) == (_flops_from_shapes(net), _flops_from_shapes(pruned))
    rows = (2 if form == "scale_shift" else 1) * C // 2
    assert pruned.block.temb_proj.out_features == rows
    kinds = {k: kind for k, (_, kind) in report.layers[0].verification.items()}
    assert kinds["lambda_min"] == "proven lower bound" and kinds["rel_err_at_k"] == "exact"
    assert_save_load_round_trip(pruned, CondNet(form), x, tmp_path / "net.pt")


def test_the_callers_model_is_unchanged():
    net, x = _build("scale_shift", n=48)
    before = copy.deepcopy(net.state_dict())
    nna.prune(net, x, keep=0.5, method="asym")
    assert net.block.temb_proj.out_features == 2 * C and net.block.conv1.out_channels == C
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Reproducer(nn.Module):
    """The reproducer of the task: the time embedding comes from a Linear ``t`` (a pair whose consumer is the
    conditioning Linear ``temb_proj``), the block's GroupNorm(8, 32) follows the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.t = nn.Conv2d(3, 32, 3, padding=1), nn.Linear(1, 16)
        self.norm1, self.conv1, self.temb_proj = nn.GroupNorm(8, 32), nn.Conv2d(32, 32, 3, padding=1), nn.Linear(16, 32)
        self.norm2, self.conv2 = nn.GroupNorm(8, 32), nn.Conv2d(32, 32, 3, padding=1)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = self.t(x.mean((1, 2, 3))[:, None])
        h0 = self.inp(x)
        h = self.conv1(F.silu(self.norm1(h0)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        return self.out(h0 + self.conv2(F.silu(self.norm2(h))))


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_a_conditioning_linear_that_is_also_a_consumer_loses_columns_and_rows(method):
    """temb_proj is the consumer of the pair t->temb_proj (its input columns follow t's units) and the conditioning
    layer of conv1->conv2 (its rows follow conv1's channels): both are removed, in either method's order."""
    torch.manual_seed(0)
    net, x = Reproducer().eval(), torch.randn(64, 3, 8, 8)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    assert [r.pair for r in report.layers] == ["t->temb_proj", "conv1->conv2"]
    assert (pruned.temb_proj.in_features, pruned.temb_proj.out_features, pruned.conv1.out_channels) == (8, 16, 16)
    assert "conv1" not in dict(report.skipped) and "temb_proj" not in dict(report.skipped)
    with torch.no_grad():
        got = pruned(x)
    want = zeroed_at_consumers(net, report, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert report.params_after == sum(p.numel() for p in pruned.parameters())


class TwoBlocks(nn.Module):
    """A time MLP shared by two blocks, each with its own projection: only each projection's output must be the
    block's own."""

    def __init__(self, share_projection: bool = False) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])
        self.stem, self.time_mlp = nn.Conv2d(3, C, 3, padding=1), nn.Linear(T, T)
        self.b1, self.b2 = CondBlock("default"), CondBlock("default")
        if share_projection:
            self.b2.temb_proj = self.b1.temb_proj
        self.out = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(_time_embedding(x, self.freqs))
        return self.out(self.b2(self.b1(self.stem(x), temb), temb))


def test_a_time_mlp_shared_by_blocks_is_fine_a_shared_projection_is_refused():
    x = torch.randn(2, 3, SIDE, SIDE)
    pairs, _ = nna.find_pairs(TwoBlocks(), x)
    assert [(p.name, p.conditioning) for p in pairs] == [("b1.conv1->b1.conv2", ("b1.temb_proj",)),
                                                         ("b2.conv1->b2.conv2", ("b2.temb_proj",))]
    pairs, skipped = nna.find_pairs(TwoBlocks(share_projection=True), x)
    assert pairs == []
    assert "conditioning term computed by Linear 'b1.temb_proj', which is called 2 times" in dict(skipped)["b1.conv1"]


class LinearCond(nn.Module):
    """An MLP with a class-like embedding added to its hidden features: ``fc2(relu(fc1(x) + emb(c)))`` on ``(N, F)``,
    or on tokens ``(N, L, F)`` with ``emb(c)`` of shape ``(N, 1, F)``."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.fc1, self.emb, self.fc2 = nn.Linear(6, 12), nn.Linear(3, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            h = self.fc1(x) + self.emb(torch.tanh(x[:, :, :3].mean(1))).unsqueeze(1)
        else:
            h = self.fc1(x) + self.emb(torch.tanh(x[:, :3]))
        return self.fc2(F.relu(h))


@pytest.mark.parametrize("tokens", [False, True])
def test_a_term_added_to_a_linear_producer_loses_its_rows(tokens):
    """On ``(N, F)`` the sum of two Linear layers' outputs is one pair (the first layer run is the producer, the
    other's rows follow), on tokens the ``(N, 1, F)`` term is broadcast over them."""
    torch.manual_seed(0)
    net = LinearCond(tokens)
    x = torch.randn(200, 5, 6) if tokens else torch.randn(200, 6)
    (pair,), skipped = nna.find_pairs(net, x[:2])
    assert (pair.name, pair.conditioning) == ("fc1->fc2", ("emb",))
    assert dict(skipped) == {"fc2": "its output is the network output"}
    full, _ = nna.prune(net, x, keep=1.0, method="asym")
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    kept = report.layers[0].kept_units
    assert torch.equal(pruned.emb.weight, net.emb.weight[kept])
    with torch.no_grad():
        torch.testing.assert_close(full(x), net(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x), rtol=1e-5, atol=1e-5)


class Refused(nn.Module):
    """conv1 -> (a term that cannot be pruned with it) -> GroupNorm -> conv2, one ``case`` at a time."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        out = {"one_channel": 1, "spatial": C * SIDE * SIDE, "after_cat": 2 * C}.get(case, C)
        self.conv1, self.proj = nn.Conv2d(3, C, 3, padding=1), nn.Linear(T, 2 * C if case == "half_chunk" else out)
        self.skip, self.bias = nn.Conv2d(3, C, 3, padding=1), nn.Parameter(torch.zeros(1, C, 1, 1))
        self.norm, self.conv2 = nn.GroupNorm(G, 2 * C if case == "after_cat" else C), nn.Conv2d(C, 3, 3, padding=1)
        self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])
        if case == "after_cat":
            self.conv2 = nn.Conv2d(2 * C, 3, 3, padding=1)
            self.norm = nn.BatchNorm2d(2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, t = self.conv1(x), _time_embedding(x, self.freqs)
        case = self.case
        if case == "one_channel":
            h = h + self.proj(t)[:, :, None, None]
        elif case == "spatial":
            h = h + self.proj(t).view(x.shape[0], -1, SIDE, SIDE)
        elif case == "literal_view":
            h = h + self.proj(t).view(-1, 16, 1, 1)
        elif case == "used_elsewhere":
            e = self.proj(t)
            return self.conv2(self.norm(h + e[:, :, None, None])) + e.mean()
        elif case == "half_chunk":
            scale, _ = self.proj(t)[:, :, None, None].chunk(2, dim=1)
            h = h * scale
        elif case == "branch":
            h = h + self.skip(x)
        elif case == "parameter":
            h = h + self.bias
        elif case == "after_cat":
            h = torch.cat([h, self.skip(x)], 1) + self.proj(t)[:, :, None, None]
        return self.conv2(self.norm(h))


@pytest.mark.parametrize(("case", "reason"), [
    ("one_channel", "with 1 channel, not the producer's 16: only a term with one value per channel is supported"),
    ("literal_view", "hard-codes a size, which changes when channels are removed"),
    ("used_elsewhere", "its output also feeds 1 other operation(s)"),
    ("half_chunk", "chunks [0] of the 2 chunks of the output of Linear 'proj'"),
    ("branch", "feeds add (a residual sum)"),
    ("parameter", "with the parameter 'bias' (a learned bias written in forward()), which pruning does not slice"),
])
def test_a_term_that_cannot_follow_the_channels_is_refused_with_the_reason(case, reason):
    pairs, skipped = nna.find_pairs(Refused(case), torch.randn(2, 3, SIDE, SIDE))
    assert "conv1" not in {p.producer for p in pairs}
    assert reason in dict(skipped)["conv1"]


def test_a_term_that_varies_over_the_positions_is_refused():
    """A Linear's output reshaped into a map of the positions is not a per-channel term (nor a residual sum)."""
    _, skipped = nna.find_pairs(Refused("spatial"), torch.randn(2, 3, SIDE, SIDE))
    assert dict(skipped)["conv1"] == (
        "its output feeds add with a conditioning term computed by Linear 'proj' of shape (2, 16, 6, 6), which varies "
        "over the positions of the (2, 16, 6, 6) tensor it adds to: not supported (a term is one value per sample and "
        "channel, broadcast over the positions)")


class GatedCond(nn.Module):
    """conv1 -> + temb -> squeeze-and-excitation gate -> conv2: a term and a gate on one path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.proj, self.conv2 = nn.Conv2d(3, C, 3, padding=1), nn.Linear(T, C), nn.Conv2d(C, 3, 3)
        self.fc1, self.fc2 = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)
        self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x) + self.proj(_time_embedding(x, self.freqs))[:, :, None, None])
        return self.conv2(h * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True))))))


def test_a_term_and_a_squeeze_and_excitation_gate_on_one_path_are_refused():
    _, skipped = nna.find_pairs(GatedCond(), torch.randn(2, 3, SIDE, SIDE))
    assert "conditioned by a term and multiplied by a squeeze-and-excitation gate" in dict(skipped)["conv1"]


def test_a_term_after_a_concatenation_is_refused():
    _, skipped = nna.find_pairs(Refused("after_cat"), torch.randn(2, 3, SIDE, SIDE))
    assert "after the concatenation" in dict(skipped)["conv1"]


def test_a_term_before_a_concatenation_follows_the_producer_channels():
    """``cat([conv1(x) + temb, skip(x)]) -> conv2``: the term is on the producer's own channels."""

    class CatAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.skip, self.proj = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Linear(T, C)
            self.conv2 = nn.Conv2d(C + 4, 3, 3, padding=1)
            self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.conv1(x) + self.proj(_time_embedding(x, self.freqs))[:, :, None, None])
            return self.conv2(torch.cat([h, self.skip(x)], 1))

    torch.manual_seed(0)
    net, x = CatAfter(), torch.randn(64, 3, SIDE, SIDE)
    (pair,), _ = nna.find_pairs(net, x[:2])
    assert (pair.name, pair.conditioning, pair.offset, pair.n_fixed) == ("conv1->conv2", ("proj",), 0, 4)
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    assert torch.equal(pruned.proj.weight, net.proj.weight[report.layers[0].kept_units])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, report, x, {"conv1->conv2": (0, 4)}),
                                   rtol=1e-5, atol=1e-5)


class TwoInputNet(nn.Module):
    """A denoiser that takes the images and their timesteps, ``forward(x, t)``, as diffusion U-Nets do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1.0, T // 2 + 1)[None])
        self.stem, self.block = nn.Conv2d(3, C, 3, padding=1), CondBlock("default")
        self.out = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([torch.sin(t[:, None] * self.freqs), torch.cos(t[:, None] * self.freqs)], dim=1)
        return self.out(self.block(self.stem(x), emb))


class PackedInputs(nn.Module):
    """The packing wrapper, the docs' alternative to dict batches: one tensor, the flattened images and the timestep."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return self.net(xt[:, :-1].view(-1, 3, SIDE, SIDE), xt[:, -1])


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_a_model_with_a_second_input_given_tensor_batches_is_refused_with_dict_batches_to_pass(method):
    """A batch's second element is its label, so a second input cannot be passed in a tensor batch: the error says
    so and to pass dicts of keyword inputs (it used to be a bare StopIteration from the shape propagation; then it
    said to write a wrapper, which still works, see tests/test_nn_multi_input.py for the dict batches)."""
    torch.manual_seed(0)
    net, x, t = TwoInputNet().eval(), torch.randn(48, 3, SIDE, SIDE), torch.rand(48)
    with pytest.raises(ValueError, match=r"TwoInputNet.forward\(\) takes 2 inputs \(x, t\); .* Pass each batch as "
                       r"a dict of keyword inputs, called as model\(\*\*batch\): \[\{'x': x, 't': t\}, \.\.\.\]"):
        nna.prune(net, x, keep=0.5, method=method)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        nna.find_pairs(net, x[:2])
    packed = torch.cat([x.flatten(1), t[:, None]], 1)
    wrapper = PackedInputs(net)
    pruned, report = nna.prune(wrapper, packed, keep=0.5, method=method, reweight=False)
    assert [(r.pair, r.kept) for r in report.layers] == [("net.block.conv1->net.block.conv2", G // 2)]
    with torch.no_grad():
        got = pruned.net(x, t)
    torch.testing.assert_close(got, zeroed_at_consumers(wrapper, report, packed), rtol=1e-5, atol=1e-5)
