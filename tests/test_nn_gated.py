"""Gated units: a consumer that reads the elementwise product of two producers' outputs (the SwiGLU MLP
``down(silu(gate(x)) * up(x))``, WaveNet's ``o(tanh(f(x)) * sigmoid(g(x)))``), or of the two halves of one
producer's output (a GLU: ``a, b = fc1(x).chunk(2, -1); fc2(a * gelu(b))``, ``F.glu``, ``nn.GLU``).

Unit ``i`` is output row ``i`` of both producers (rows ``i`` and ``H + i`` of a chunked one). Oracles, independent
of the implementation: the unpruned network (keep everything), the original network with the removed units'
consumer columns zeroed (no refit), the original weights' rows and columns (physical shapes), numpy's lstsq on the
consumer's input captured here (the refit, also after an already pruned prefix for ``asym``), the least-squares
errors of every subset computed with numpy (brute force against the greedy path), scores computed here from the
weights, the captured activations and autograd (the baselines), and the parameters and multiply-adds of the built
networks (budgets and FLOPs).
"""

from __future__ import annotations

import copy
import itertools

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


class SwiGLU(nn.Module):
    """``head(relu(down(silu(gate(x)) * up(x))))``, the reproducer's gated MLP; with ``pre="gate"`` (or ``"up"``)
    that factor's producer reads ``h = relu(l0(x))`` instead of ``x`` (so it is also the consumer of the pair
    ``l0->gate`` or ``l0->up``, and the two factors read different tensors)."""

    def __init__(self, width: int = 12, pre: str | None = None, d_in: int = 6) -> None:
        super().__init__()
        self.pre = pre
        self.l0 = nn.Linear(d_in, 10) if pre else None
        self.gate = nn.Linear(10 if pre == "gate" else d_in, width)
        self.up = nn.Linear(10 if pre == "up" else d_in, width)
        self.down, self.head = nn.Linear(width, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l0(x)) if self.l0 is not None else x
        g, u = (h, x) if self.pre == "gate" else (x, h)
        return self.head(torch.relu(self.down(F.silu(self.gate(g)) * self.up(u))))


class WaveNet(nn.Module):
    """``o(tanh(f(x)) * sigmoid(bn(g(x))))`` with ``Conv1d`` (or ``ConvTranspose1d``) producers and a BatchNorm on
    the second factor's path; ``k`` is the consumer's kernel size."""

    def __init__(self, transposed: bool = False, k: int = 1) -> None:
        super().__init__()
        if transposed:
            self.f, self.g = nn.ConvTranspose1d(3, 8, 2, stride=2), nn.ConvTranspose1d(3, 8, 2, stride=2)
        else:
            self.f, self.g = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.o = nn.Conv1d(8, 4, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.f(x)) * torch.sigmoid(self.bn(self.g(x))))


class GatedHead(nn.Module):
    """Gated ``Conv2d`` channels, then pooling and a flatten into a ``Linear`` (``conv->linear`` after the
    product)."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(2, 6, 3, padding=1)
        self.bn_f = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn_f(self.f(x))) * torch.sigmoid(self.g(x))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class GLU(nn.Module):
    """A ``Linear`` (``conv=False``, timm's ``GluMlp``) or ``Conv2d`` producer of ``2H`` units, a BatchNorm on its
    output before the split, the two halves multiplied (``form``: ``h.chunk``, ``torch.chunk``, ``h.split`` with a
    size read from ``h``, ``F.glu`` or an ``nn.GLU`` module), and a consumer."""

    def __init__(self, form: str = "chunk", conv: bool = False, half: int = 6) -> None:
        super().__init__()
        self.form, self.conv = form, conv
        if conv:
            self.fc1, self.bn, self.fc2 = nn.Conv2d(2, 2 * half, 3, padding=1), nn.BatchNorm2d(2 * half), nn.Conv2d(
                half, 3, 3, padding=1)
        else:
            self.fc1, self.bn, self.fc2 = nn.Linear(5, 2 * half), nn.BatchNorm1d(2 * half), nn.Linear(half, 3)
        self.glu = nn.GLU(1 if conv else -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc1(x))
        d = 1 if self.conv else -1
        if self.form == "nn.GLU":
            return self.fc2(self.glu(h))
        if self.form == "F.glu":
            return self.fc2(F.glu(h, d))
        if self.form == "chunk":
            a, b = h.chunk(2, dim=d)
            return self.fc2(a * F.gelu(b))
        if self.form == "torch.chunk":
            a, b = torch.chunk(h, 2, d)
            return self.fc2(torch.sigmoid(b) * a)
        a, b = h.split(h.size(d) // 2, d)
        return self.fc2(a * torch.tanh(b))


def _x(net: nn.Module, n: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(net, WaveNet):
        return torch.randn(n, 3, 10, generator=g)
    if isinstance(net, GatedHead) or (isinstance(net, GLU) and net.conv):
        return torch.randn(n, 2, 6, 6, generator=g)
    if isinstance(net, GLU):
        return torch.randn(n, 5, generator=g)
    return torch.randn(n, 6, generator=g)


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = {"swiglu": lambda: SwiGLU(), "swiglu-pre": lambda: SwiGLU(pre="gate"),
           "swiglu-pre-up": lambda: SwiGLU(pre="up"), "wavenet": lambda: WaveNet(),
           "wavenet-k3": lambda: WaveNet(k=3), "wavenet-transposed": lambda: WaveNet(transposed=True),
           "gated-head": GatedHead, "glu-chunk": lambda: GLU("chunk"), "glu-torch.chunk": lambda: GLU("torch.chunk"),
           "glu-split": lambda: GLU("split"), "glu-F.glu": lambda: GLU("F.glu"), "glu-nn.GLU": lambda: GLU("nn.GLU"),
           "conv-glu": lambda: GLU("F.glu", conv=True), "conv-glu-chunk": lambda: GLU("chunk", conv=True)}[name]()
    return randomise_bn(net)


_ALL = ["swiglu", "swiglu-pre", "swiglu-pre-up", "wavenet", "wavenet-k3", "wavenet-transposed", "gated-head",
        "glu-chunk", "glu-torch.chunk", "glu-split", "glu-F.glu", "glu-nn.GLU", "conv-glu", "conv-glu-chunk"]


@pytest.mark.parametrize(("name", "expected"), [
    ("swiglu", [("gate->down", "linear->linear", 12, "up", False), ("down->head", "linear->linear", 7, None, False)]),
    ("swiglu-pre", [("l0->gate", "linear->linear", 10, None, False), ("gate->down", "linear->linear", 12, "up", False),
                    ("down->head", "linear->linear", 7, None, False)]),
    ("swiglu-pre-up", [("l0->up", "linear->linear", 10, None, False), ("gate->down", "linear->linear", 12, "up", False),
                       ("down->head", "linear->linear", 7, None, False)]),
    ("wavenet", [("f->o", "conv->conv", 8, "g", False)]),
    ("wavenet-transposed", [("f->o", "conv->conv", 8, "g", False)]),
    ("gated-head", [("f->fc", "conv->linear", 6, "g", False)]),
    ("glu-chunk", [("fc1->fc2", "linear->linear", 6, None, True)]),
    ("glu-split", [("fc1->fc2", "linear->linear", 6, None, True)]),
    ("glu-nn.GLU", [("fc1->fc2", "linear->linear", 6, None, True)]),
    ("conv-glu", [("fc1->fc2", "conv->conv", 6, None, True)]),
])
def test_gated_units_are_found_and_named_after_the_first_factor(name, expected):
    net = _net(name)
    pairs, skipped = nna.find_pairs(net, _x(net)[:2])
    assert [(p.name, p.kind, p.n_units, p.gated_with, p.chunked) for p in pairs] == expected
    reasons = dict(skipped)
    for p in pairs:
        if p.gated_with is not None:
            assert reasons[p.gated_with] == f"pruned with {p.producer!r} (gated units)"
            assert p.producers == (p.producer, p.gated_with)
    if name == "wavenet":  # the BatchNorm of the second factor's path goes with the units
        assert pairs[0].between == ("bn",)
    if name.startswith(("glu", "conv-glu")):  # the BatchNorm before the split holds the producer's 2H rows
        assert pairs[0].between == pairs[0].row_between == ("bn",)


def test_gated_producers_are_pruned_with_their_consumer_inputs():
    """The models of the brief's reproducer, in this file's sizes: SwiGLU's gate and up are pruned with down's
    inputs (before, only down->head was), WaveNet's f and g (before, no pair at all), and the GLU's fc1 in both
    halves with the BatchNorm before the split (before, no pair either)."""
    torch.manual_seed(0)
    gated, _ = nna.prune(SwiGLU(32, d_in=16), torch.randn(256, 16), keep=0.5, method="asym")
    assert (gated.gate.out_features, gated.up.out_features, gated.down.in_features) == (16, 16, 16)
    wavenet, _ = nna.prune(WaveNet(), torch.randn(64, 3, 20), keep=0.5, method="asym")
    assert (wavenet.f.out_channels, wavenet.g.out_channels, wavenet.bn.num_features, wavenet.o.in_channels) == (
        4, 4, 4, 4)
    glu, _ = nna.prune(GLU("chunk", half=32), torch.randn(256, 5), keep=0.5, method="asym")
    assert (glu.fc1.out_features, glu.bn.num_features, glu.fc2.in_features) == (32, 32, 16)


@pytest.mark.parametrize("method", ["layer", "asym", "seq", "weight_norm", "act_norm", "random"])
@pytest.mark.parametrize("name", _ALL)
def test_keeping_every_unit_reproduces_the_network(name, method):
    net = _net(name)
    x = _x(net)
    pruned, rep = nna.prune(net, x, keep=1.0, method=method)
    assert rep.params_after == sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _ALL)
def test_without_refit_the_pruned_network_is_the_original_with_the_removed_units_zeroed(name):
    """Physical shapes and values: each producer keeps the kept units' rows (both halves' of a chunked one) and
    the consumer the columns; the network computes what the original computes with the removed units' consumer
    columns zeroed. The caller's model is not modified."""
    net = _net(name)
    x = _x(net)
    before = copy.deepcopy(net.state_dict())
    pruned, rep = nna.prune(net, x, keep=0.5, method="random", reweight=False, seed=3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    pairs = {p.name: p for p in nna.find_pairs(net, x[:2])[0]}
    kept = {lr.pair: torch.tensor(lr.kept_units) for lr in rep.layers}
    cols_of = {p.consumer: kept[p.name] for p in pairs.values()}  # the kept inputs of every consumer
    for name_, p in pairs.items():
        k = kept[name_]
        rows = torch.cat([k, k + p.n_units]) if p.chunked else k
        for layer in (*p.producers, *p.row_between):
            old, new = net.get_submodule(layer).weight, pruned.get_submodule(layer).weight
            if isinstance(net.get_submodule(layer), nn.ConvTranspose1d):  # (in, out, k): the units are dim 1
                old, new = old.transpose(0, 1), new.transpose(0, 1)
            old = old[rows]
            if layer in cols_of:  # also a consumer: its kept input columns
                old = old[:, cols_of[layer]]
            torch.testing.assert_close(new, old, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, rep, x), rtol=1e-5, atol=1e-5)


def _lstsq_refit(A: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` of ``min ||Y - A M - b||`` by numpy's lstsq on ``[A, 1]``."""
    sol = np.linalg.lstsq(np.hstack([A, np.ones((A.shape[0], 1))]), Y, rcond=None)[0]
    return sol[:-1], sol[-1]


def _rows(x: torch.Tensor) -> np.ndarray:
    """A Linear consumer's input as rows, or a 1x1 ``Conv1d``'s ``(N, C, L)`` input as ``(N * L, C)`` rows."""
    x = x.to(torch.float64)
    return (x.transpose(1, 2).reshape(-1, x.shape[1]) if x.dim() == 3 else x).numpy()


@pytest.mark.parametrize("name", ["swiglu", "glu-chunk", "glu-nn.GLU", "wavenet"])
def test_refit_is_least_squares_on_the_captured_consumer_input(name):
    """LayerInChange with ridge 0: the consumer's new weights and bias solve ``min ||A W^T - A_S M - b||`` on its
    input ``A`` captured here (for WaveNet's 1x1 consumer, one row per sample and position)."""
    net = _net(name)
    x = _x(net, 160)
    gated = next(p.name for p in nna.find_pairs(net, x[:2])[0] if p.gated_with or p.chunked)
    pruned, rep = nna.prune(net, x, keep={gated: 0.5}, method="layer", ridge=0.0)  # the other pairs keep all
    (lr,) = [lr for lr in rep.layers if lr.pair == gated]
    cons_name = lr.pair.split("->")[1]
    cons = net.get_submodule(cons_name)
    A = _rows(captured_input(net, cons, x))
    W = cons.weight.detach().to(torch.float64).reshape(cons.weight.shape[0], -1).numpy()
    M, b = _lstsq_refit(A[:, lr.kept_units], A @ W.T)
    new = pruned.get_submodule(cons_name)
    np.testing.assert_allclose(new.weight.detach().double().reshape(W.shape[0], -1).numpy(), M.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.bias.detach().double().numpy(), cons.bias.detach().double().numpy() + b,
                               rtol=1e-5, atol=1e-6)


def test_asym_refits_on_the_input_of_the_pruned_prefix_through_both_pruned_producers():
    """``asym`` on ``l0 -> gate``, the gated ``(gate, up) -> down`` and ``down -> head``: each consumer is refitted
    on its input in the network pruned so far toward the original network's targets. The kept columns of that
    input are exactly the pruned network's input of the consumer (``gate`` and ``up`` pruned to the kept units
    before ``down`` reads them), so numpy's lstsq on the input captured from the pruned network, with targets from
    the original, gives ``down``'s and ``head``'s weights (``down``'s rows then cut by ``down -> head``). The
    refit shrinks toward zero, so that a unit kept though dead (a ReLU that never fires) gets lstsq's minimum-norm
    weight 0."""
    net = _net("swiglu-pre")
    x = _x(net, 200)
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym", ridge=0.0, refit_prior="zero")
    assert [lr.pair for lr in rep.layers] == ["l0->gate", "gate->down", "down->head"]
    kept_down = rep.layers[2].kept_units
    for cons_name, rows in (("down", kept_down), ("head", slice(None))):
        cons = net.get_submodule(cons_name)
        A = _rows(captured_input(pruned, pruned.get_submodule(cons_name), x))
        W = cons.weight.detach().double().numpy()
        Y = _rows(captured_input(net, cons, x)) @ W.T
        M, b = _lstsq_refit(A, Y)
        new = pruned.get_submodule(cons_name)
        np.testing.assert_allclose(new.weight.detach().double().numpy(), M.T[rows], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(new.bias.detach().double().numpy(), (cons.bias.detach().double().numpy() + b)[rows],
                                   rtol=1e-4, atol=1e-6)


def test_greedy_path_objective_against_brute_force_on_a_tiny_gated_layer():
    """Six gated units, three kept, ridge 0: the reported greedy path is the relative least-squares error of its
    prefixes computed here with numpy, the first pick is the best single unit, and no subset of three beats the
    optimum found by enumeration (which bounds the greedy error from below)."""
    torch.manual_seed(1)
    net = SwiGLU(width=6).eval()
    x = torch.randn(300, 6)
    _, rep = nna.prune(net, x, keep={"gate->down": 0.5, "down->head": 1.0}, method="layer", ridge=0.0)
    lr = rep.layers[0]
    A = _rows(captured_input(net, net.down, x))
    Y = A @ net.down.weight.detach().double().numpy().T
    Yc = Y - Y.mean(0)

    def rel_err(S: tuple[int, ...]) -> float:
        M, b = _lstsq_refit(A[:, list(S)], Y)
        return float(((Y - A[:, list(S)] @ M - b) ** 2).sum() / (Yc ** 2).sum())

    for j in range(1, 4):
        assert lr.error_curve[j] == pytest.approx(rel_err(tuple(lr.pick_order[:j])), rel=1e-6, abs=1e-9)
    singles = [rel_err((u,)) for u in range(6)]
    assert lr.pick_order[0] == int(np.argmin(singles))
    best = min(rel_err(S) for S in itertools.combinations(range(6), 3))
    assert best <= lr.error_curve[3] + 1e-12
    assert lr.relative_error == pytest.approx(rel_err(tuple(lr.kept_units)), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["swiglu-pre", "swiglu-pre-up", "wavenet", "glu-chunk", "conv-glu"])
def test_budgets_count_both_producers_rows_and_both_paths_entries(name):
    net = _net(name)
    assert any(p.gated_with or p.chunked for p in nna.find_pairs(net, _x(net)[:2])[0])
    check_budgets_against_built_networks(net, _x(net, 64), (1.5, 2.5))


def test_flops_count_the_pruned_producers():
    """FLOPs per sample of Linear-only networks: twice the multiply-adds of every Linear, counted here from the
    built networks' shapes."""
    for net in (_net("swiglu-pre"), _net("glu-split")):
        x = _x(net)
        pruned, rep = nna.prune(net, x, keep=0.5, method="layer")

        def flops(m: nn.Module) -> int:
            return sum(2 * lin.in_features * lin.out_features for lin in m.modules() if isinstance(lin, nn.Linear))

        assert (rep.flops_before, rep.flops_after) == (flops(net), flops(pruned))
        assert rep.flops_after < rep.flops_before


def test_weight_norm_scores_a_gated_unit_over_both_producers_rows():
    for name in ("swiglu", "glu-chunk", "wavenet"):
        net = _net(name)
        x = _x(net)
        _, rep = nna.prune(net, x, keep=0.5, method="weight_norm", reweight=False)
        p = nna.find_pairs(net, x[:2])[0][0]
        if p.chunked:
            w = net.get_submodule(p.producer).weight.detach().double()
            sq = w[:p.n_units].pow(2).flatten(1).sum(1) + w[p.n_units:].pow(2).flatten(1).sum(1)
        else:
            sq = sum(net.get_submodule(n).weight.detach().double().pow(2).flatten(1).sum(1) for n in p.producers)
        k = rep.layers[0].kept
        assert rep.layers[0].kept_units == sorted(torch.argsort(-(sq / 2).sqrt(), stable=True)[:k].tolist())


def test_act_norm_and_actgrad_read_the_gated_consumer_input():
    """``act_norm``: ``sum_i |W_ic| ||X_c||`` over the consumer's input columns; ``actgrad``: ``sum_n |a_nc
    dL_n/da_nc|`` with the gradient of the cross-entropy at the consumer's input, both computed here."""
    net = _net("swiglu")
    x = _x(net, 120)
    y = torch.randint(0, 3, (120,))
    A = captured_input(net, net.down, x).double()
    k = 6
    score = net.down.weight.detach().double().abs().sum(0) * A.norm(dim=0)
    _, rep = nna.prune(net, x, keep={"gate->down": 0.5, "down->head": 1.0}, method="act_norm", reweight=False)
    assert rep.layers[0].kept_units == sorted(torch.argsort(-score)[:k].tolist())

    a = captured_input(net, net.down, x).requires_grad_(True)
    out = net.head(torch.relu(net.down(a)))
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), a)
    taylor = (a.detach().double() * grad.double()).abs().sum(0)
    _, rep = nna.prune(net, (x, y), keep={"gate->down": 0.5, "down->head": 1.0}, method="actgrad", reweight=False)
    assert rep.layers[0].kept_units == sorted(torch.argsort(-taylor)[:k].tolist())


def test_verify_reports_on_the_gated_selection():
    net = _net("wavenet")
    _, rep = nna.prune(net, _x(net), keep=0.5, method="layer", verify=True)
    ver, lr = rep.layers[0].verification, rep.layers[0]
    assert ver["lambda_min"][1] == "proven lower bound"
    assert ver["rel_err_at_k"][0] == pytest.approx(lr.error_curve[lr.kept], rel=1e-6, abs=1e-12)
    assert ver["rel_err_at_k"][0] <= ver["bound_rel_err_at_k"][0] + 1e-12


@pytest.mark.parametrize("name", ["swiglu", "wavenet-transposed", "glu-nn.GLU", "conv-glu-chunk"])
def test_save_and_load_round_trip(name, tmp_path):
    net = _net(name)
    x = _x(net)
    pruned, _ = nna.prune(net, x, keep=0.5, method="asym")
    for p in nna.find_pairs(net, x[:2])[0]:  # the gated producers were pruned
        for name_ in p.producers:
            assert pruned.get_submodule(name_).weight.numel() < net.get_submodule(name_).weight.numel()
    assert_save_load_round_trip(pruned, _net(name), x, tmp_path / "net.pt")


class _GatedThen(nn.Module):
    """Gated units followed by what the walk supports after any producer: a GroupNorm (units become groups of both
    producers' channels), a concatenation with another branch, a squeeze-and-excitation gate, a ``Linear``'s
    reshape into channels."""

    def __init__(self, then: str) -> None:
        super().__init__()
        self.then = then
        if then == "linear-to-conv":
            self.a, self.b = nn.Linear(5, 24), nn.Linear(5, 24)
            self.un, self.o = nn.Unflatten(1, (6, 2, 2)), nn.ConvTranspose2d(6, 3, 2, stride=2)
            return
        if then == "cat":
            self.a, self.b, self.c, self.o = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(5, 4), nn.Linear(12, 3)
            return
        self.a, self.b = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.o = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.a(x)) * self.b(x)
        if self.then == "linear-to-conv":
            return self.o(self.un(h))
        if self.then == "cat":
            return self.o(torch.cat([h, torch.relu(self.c(x))], -1))
        if self.then == "group-norm":
            return self.o(F.relu(self.gn(h)))
        return self.o(h * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True))))))


@pytest.mark.parametrize(("then", "fields"), [
    ("group-norm", {"group_size": 2, "n_units": 4, "rows_per_unit": 2, "between": ("gn",)}),
    ("cat", {"offset": 0, "n_fixed": 4, "n_units": 8}),
    ("se", {"se": ("fc1", "fc2"), "n_units": 8}),
    ("linear-to-conv", {"kind": "linear->conv", "rows_per_unit": 4, "n_units": 6}),
])
def test_what_follows_the_product_works_as_after_any_producer(then, fields):
    torch.manual_seed(0)
    net = _GatedThen(then).eval()
    x = torch.randn(80, 5) if then in ("cat", "linear-to-conv") else torch.randn(48, 2, 6, 6)
    pairs = {p.producer: p for p in nna.find_pairs(net, x[:2])[0]}
    p = pairs["a"]
    assert p.gated_with == "b"
    assert {f: getattr(p, f) for f in fields} == fields
    for method in ("layer", "asym"):
        full, _ = nna.prune(net, x, keep=1.0, method=method)
        with torch.no_grad():
            torch.testing.assert_close(full(x), net(x), rtol=1e-5, atol=1e-5)
    pruned, rep = nna.prune(net, x, keep={p.name: 0.5}, method="random", reweight=False, seed=1)
    kept = torch.tensor(rep.layers[[lr.pair for lr in rep.layers].index(p.name)].kept_units)
    per_unit = {"group-norm": 2, "linear-to-conv": 4}.get(then, 1)  # a group's channels, a channel's 2 x 2 rows
    rows = (kept[:, None] * per_unit + torch.arange(per_unit)).flatten()
    for name in ("a", "b"):
        torch.testing.assert_close(pruned.get_submodule(name).weight, net.get_submodule(name).weight[rows])
    if then != "se":  # the SE gate's fc1 loses the removed channels' pooled inputs, which changes the kept gates
        offsets = {p.name: (0, 4)} if then == "cat" else None
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), zeroed_at_consumers(net, rep, x, offsets), rtol=1e-5, atol=1e-5)


class _Refused(nn.Module):
    """A product or a split that is not gated units the pruner can follow (``kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        conv = kind in ("chunk-positions", "kinds", "broadcast", "group-norm-before", "flatten-before")
        if kind == "kinds":
            self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.ConvTranspose1d(3, 8, 3, padding=1)
        elif conv:
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        else:
            self.a, self.b = nn.Linear(5, 9 if kind == "odd" else 12), nn.Linear(5, 12)
        self.c = nn.Linear(5, 12)
        self.gn = nn.GroupNorm(4, 8)
        self.o = {"chunk3": nn.Linear(4, 3), "odd": nn.Linear(9, 3), "literal-split": nn.Linear(6, 3),
                  "chunk-positions": nn.Conv2d(8, 3, 1), "kinds": nn.Conv1d(8, 3, 1), "broadcast": nn.Conv2d(8, 3, 1),
                  "group-norm-before": nn.Conv2d(8, 3, 1), "flatten-before": nn.Linear(8 * 36, 3)}.get(
                      kind, nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "chunk3":
            a, b, c = self.a(x).chunk(3, -1)
            return self.o(a * b * c)
        if k == "odd":
            a, b = self.a(x).chunk(2, -1)
            return self.o(torch.cat([a, b], -1))
        if k == "literal-split":
            a, b = self.a(x).split(6, -1)
            return self.o(a * torch.sigmoid(b))
        if k == "chunk-positions":
            a, b = self.a(x).chunk(2, 2)
            return self.o(a * b)
        if k == "kinds":
            return self.o(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))
        if k == "broadcast":
            return self.o(self.a(x) * torch.sigmoid(self.b(x.mean((2, 3), keepdim=True))))
        if k == "group-norm-before":
            return self.o(self.gn(self.a(x)) * self.b(x))
        if k == "flatten-before":
            return self.o(self.a(x).flatten(1) * self.b(x).flatten(1))
        if k == "shared-factor":
            u = self.b(x)
            return self.o(F.silu(self.a(x)) * u + u)
        if k == "three-factors":
            return self.o(self.a(x) * self.b(x) * self.c(x))
        return self.o(F.silu(self.a(x)) * x[:, :1])  # "not-a-producer"


def _refused_input(kind: str) -> torch.Tensor:
    if kind == "kinds":
        return torch.randn(2, 3, 10)
    if kind in ("chunk-positions", "broadcast", "group-norm-before", "flatten-before"):
        return torch.randn(2, 3, 6, 6)
    return torch.randn(2, 5)


@pytest.mark.parametrize(("kind", "reason"), [
    ("chunk3", "into 3 chunks; gated units need two halves"),
    ("odd", "has 9 units, which chunk cannot split into two halves of one size"),
    ("literal-split", "with the literal size 6, which does not follow the units once some are removed; write "
                      ".chunk(2, -1)"),
    ("chunk-positions", "along dim 2 of (2, 8, 6, 6), not along the producer's units (dim 1)"),
    ("kinds", "nor gated units with 'b': ConvTranspose1d 'b' is not a Conv1d like the other factor's producer"),
    ("broadcast", "nor gated units with 'b': the factors have shapes (2, 8, 6, 6) and (2, 8, 1, 1), not one shape"),
    ("group-norm-before", "is normalised by a GroupNorm (units of several channels) before the gated units of mul"),
    ("flatten-before", "nor gated units: the other factor is not another Linear's or convolution's output through "
                       "per-unit operations used only on the way to the product: unsupported method .flatten()"),
    # b's output is read twice: neither gated units nor a conditioning term (see tests/test_nn_conditioning.py)
    ("shared-factor", "and its output also feeds 1 other operation(s) (add): its rows can follow this path's channels "
                      "only when this path is its only reader"),
    ("three-factors", "is already gated before the gated units of mul_1"),
    # the reason lists every product the walk supports, not the squeeze-and-excitation gate alone
    ("not-a-producer", "its output feeds mul, a product with a gate (getitem) computed from another tensor; the "
                       "products supported are a squeeze-and-excitation gate computed from the producer's own "
                       "channels, gated units (another Linear's or convolution's output of the same shape) and a "
                       "per-channel conditioning term computed by a Linear from another input"),
])
def test_products_and_splits_that_are_not_followable_gated_units_are_refused_with_the_reason(kind, reason):
    pairs, skipped = nna.find_pairs(_Refused(kind).eval(), _refused_input(kind))
    assert "a" not in {p.producer for p in pairs}
    assert reason in dict(skipped)["a"]


def test_a_chunked_producer_reshaped_into_channels_is_refused():
    class ChunkToConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.un, self.o = nn.Linear(5, 48), nn.Unflatten(1, (6, 2, 2)), nn.Conv2d(6, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.fc(x).chunk(2, -1)
            return self.o(self.un(a * b))

    _, skipped = nna.find_pairs(ChunkToConv(), torch.randn(2, 5))
    assert "is reshaped into channels before 'o', which is not supported for a chunked producer" in dict(skipped)["fc"]


def test_declared_gated_pairs_are_refused_with_the_reason():
    """Gated pairs are found by tracing only: the declared pair's check sees the consumer's input change with the
    model's input while the producer's output is held (the other factor), and a GLU's producer has twice the
    consumer's inputs."""
    net = _net("swiglu")
    with pytest.raises(ValueError, match="gated units, which are found by tracing only"):
        nna.prune(net, _x(net), keep=0.5, method="layer", pairs=[("gate", "down")])
    net = _net("glu-chunk")
    with pytest.raises(ValueError, match=r"the product of its two halves \(a GLU: gated units\)"):
        nna.prune(net, _x(net), keep=0.5, method="layer", pairs=[("fc1", "fc2")])


def test_keep_accepts_the_second_producers_name_for_the_gated_pair():
    """keep={'up': f} names the gated pair 'gate->down' as keep={'gate': f} does (it was an unknown name); two
    different fractions for the same units are refused."""
    net = _net("swiglu")
    x = _x(net)
    _, by_partner = nna.prune(net, x, keep={"up": 0.5}, method="layer")
    _, by_producer = nna.prune(net, x, keep={"gate": 0.5}, method="layer")
    kept = {r.pair: r.kept_units for r in by_partner.layers}
    assert kept == {r.pair: r.kept_units for r in by_producer.layers}
    assert len(kept["gate->down"]) == 6 and len(kept["down->head"]) == 7  # the other pair keeps everything
    with pytest.raises(ValueError, match=r"keep gives different fractions \{.*'gate': 0.5, 'up': 0.25\} to the units "
                                         r"of pair gate->down"):
        nna.prune(net, x, keep={"gate": 0.5, "up": 0.25})
