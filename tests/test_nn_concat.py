"""A producer whose output is concatenated with other tensors before its consumer: the U-Net decoder
(``h = torch.cat([skip, up(b)], 1); d1(h)``), a two-branch MLP, an input skip, a conv -> cat -> flatten -> Linear head.

The producer's units are the consumer's input channels ``offset ... offset + C - 1``; the other operands' channels
are fixed (always kept, in every refit), and the selection maximises the gain over them,
``||P_{Fix u S} Y||^2 - ||P_Fix Y||^2``.

Oracles, independent of the implementation: the unpruned network (keep everything), the original network with the
removed channels zeroed at the consumer's input (no refit), numpy's lstsq on the consumer's input captured here
over the fixed and kept columns (the refit), the projection norms computed with numpy from that design (the
objective), scores computed here from the weights and captured activations (the baselines), and the parameters of
the built networks (the budgets).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_save_load_round_trip,
    captured_input,
    check_budgets_against_built_networks,
    check_gpu_equals_cpu,
    randomise_bn,
    zeroed_at_consumers,
)
from torch import nn

import nn_adapters as nna
from nn_adapters import _stats
from nn_adapters._stats import PairStats

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class UNet(nn.Module):
    """The reproducer's U-Net, small: the skip ``a`` (6 channels) is concatenated before the transposed
    convolution's 5 channels, optionally followed by a BatchNorm over the 11 joined channels; 1-D or 2-D."""

    def __init__(self, rank: int = 2, bn: bool = False) -> None:
        super().__init__()
        conv, convt = (nn.Conv1d, nn.ConvTranspose1d) if rank == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        self.e1, self.e2 = conv(1, 4, 3, padding=1), conv(4, 6, 3, padding=1)
        self.pool = nn.MaxPool1d(2) if rank == 1 else nn.MaxPool2d(2)
        self.b1 = conv(6, 8, 3, padding=1)
        self.up = convt(8, 5, 2, stride=2)
        self.bn = (nn.BatchNorm1d(11) if rank == 1 else nn.BatchNorm2d(11)) if bn else None
        self.d1, self.out = conv(11, 4, 3, padding=1), conv(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.e2(torch.relu(self.e1(x))))
        b = torch.relu(self.b1(self.pool(a)))
        h = torch.cat([a, self.up(b)], dim=1)
        if self.bn is not None:
            h = self.bn(h)
        return self.out(torch.relu(self.d1(torch.relu(h))))


class TwoBranch(nn.Module):
    """``c(cat([relu(a(x)), relu(b(x))]))``: two prunable operands; the first is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 7), nn.Linear(5, 6), nn.Linear(13, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


class InputSkip(nn.Module):
    """``c(cat([x, relu(b(x))], -1))``: the input's 5 features are fixed, ``b``'s 6 units come after them."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.c = nn.Linear(5, 6), nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([x, torch.relu(self.b(x))], -1))


class ConvHead(nn.Module):
    """conv -> cat with its input -> BatchNorm over the 7 joined channels -> pooling -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        h = self.bn(torch.cat([a, torch.relu(self.c2(a))], 1))
        return self.fc(torch.flatten(F.max_pool2d(h, 2), 1))


#: case -> (builder, sample shape, the pair: (producer, consumer, kind, units, offset, fixed channels, after_cat))
CASES = {
    "unet2d": (lambda: UNet(2), (1, 8, 8), ("up", "d1", "conv->conv", 5, 6, 6, ())),
    "unet2d bn": (lambda: UNet(2, bn=True), (1, 8, 8), ("up", "d1", "conv->conv", 5, 6, 6, ("bn",))),
    "unet1d": (lambda: UNet(1), (1, 16), ("up", "d1", "conv->conv", 5, 6, 6, ())),
    "unet1d bn": (lambda: UNet(1, bn=True), (1, 16), ("up", "d1", "conv->conv", 5, 6, 6, ("bn",))),
    "mlp two branches": (TwoBranch, (5,), ("a", "c", "linear->linear", 7, 0, 6, ())),
    "mlp input skip": (InputSkip, (5,), ("b", "c", "linear->linear", 6, 5, 5, ())),
    "conv head": (ConvHead, (1, 8, 8), ("c2", "fc", "conv->linear", 4, 3, 3, ("bn",))),
}


def _build(case: str, n: int = 40) -> tuple[nn.Module, torch.Tensor]:
    builder, shape, _ = CASES[case]
    torch.manual_seed(0)
    net = randomise_bn(builder())
    return net, torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def _expected(case: str) -> tuple:
    return CASES[case][2]


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def _the_pair(net: nn.Module, x: torch.Tensor, case: str) -> nna.PrunablePair:
    pairs, _ = nna.find_pairs(net, x[:2])
    producer = _expected(case)[0]
    return next(p for p in pairs if p.producer == producer)


def _design(net: nn.Module, consumer: str, x: torch.Tensor, channels: int) -> tuple[np.ndarray, int]:
    """The consumer's input on ``x`` captured here, as design rows (a convolution's unfolded patches, channel-major
    columns), and the columns per input channel (of the ``channels`` a Linear consumer's input was joined from)."""
    cons = net.get_submodule(consumer)
    h = captured_input(net, cons, x).double()
    if isinstance(cons, nn.Linear):  # the columns of a channel: its positions after a flatten, or one feature
        return h.reshape(-1, cons.in_features).numpy(), cons.in_features // channels
    if h.dim() == 3:  # a 1-D convolution's patches: the 2-D unfold of an (N, C, 1, L) map
        h = h.unsqueeze(2)
        k, pad = (1, *cons.kernel_size), (0, *cons.padding)
    else:
        k, pad = cons.kernel_size, cons.padding
    taps = k[0] * k[1]
    patches = F.unfold(h, k, padding=pad).transpose(1, 2).reshape(-1, cons.in_channels * taps)
    return patches.numpy(), taps


def _weights(cons: nn.Module) -> np.ndarray:
    return cons.weight.detach().double().reshape(cons.weight.shape[0], -1).numpy()


def _columns(slots: np.ndarray, per: int) -> np.ndarray:
    return (np.asarray(slots)[:, None] * per + np.arange(per)).ravel()


def _kept_slots(case: str, kept: list[int], per_unit: int = 1) -> np.ndarray:
    """The consumer's kept input channels (or blocks): the fixed ones and ``offset + kept``, in order."""
    _, _, _, n, offset, fixed, _ = _expected(case)
    return np.concatenate([np.arange(offset), offset + np.asarray(kept, dtype=np.int64),
                           np.arange(offset + n, n + fixed)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_pair_is_found_with_the_offset_of_the_producer_in_the_concatenation(case):
    net, x = _build(case)
    p = _the_pair(net, x, case)
    assert (p.producer, p.consumer, p.kind, p.n_units, p.offset, p.n_fixed, p.after_cat) == _expected(case)
    assert "cat" in p.ops


def test_of_two_prunable_operands_the_first_is_pruned_and_the_other_skipped_with_the_reason():
    net, x = _build("mlp two branches")
    pairs, skipped = nna.find_pairs(net, x[:2])
    assert [p.name for p in pairs] == ["a->c"]
    assert "another operand of the concatenation feeding 'c' is pruned" in dict(skipped)["b"]


@pytest.mark.filterwarnings("ignore:pair .* the refit with ridge=0")  # exactness checks interpolate on purpose
@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_everything_reproduces_the_network(case, method):
    net, x = _build(case)
    pruned, report = nna.prune(net, x, keep=1.0, method=method, ridge=0.0)
    name = "->".join(_expected(case)[:2])
    assert name in [r.pair for r in report.layers]
    with torch.no_grad():
        assert _close(pruned(x), net(x))


@pytest.mark.parametrize("method", ["asym", "seq", "layer", "act_norm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_without_refit_the_network_is_the_original_with_removed_channels_zeroed(case, method):
    net, x = _build(case)
    pruned, report = nna.prune(net, x, keep=0.5, method=method, reweight=False)
    producer, consumer, _, n, offset, fixed, after = _expected(case)
    lr = next(r for r in report.layers if r.pair == f"{producer}->{consumer}")
    assert lr.kept == round(n / 2)
    cons = pruned.get_submodule(consumer)
    width = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
    full = net.get_submodule(consumer)
    full_width = full.in_features if isinstance(full, nn.Linear) else full.in_channels
    assert width == full_width // (n + fixed) * (lr.kept + fixed)
    for b in after:  # a BatchNorm after the concatenation keeps the fixed channels and offset + kept
        slots = _kept_slots(case, lr.kept_units)
        bn, orig = pruned.get_submodule(b), net.get_submodule(b)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn, attr), getattr(orig, attr)[torch.as_tensor(slots)])
    with torch.no_grad():
        want = zeroed_at_consumers(net, report, x, {lr.pair: (offset, fixed)})
        assert _close(pruned(x), want)
        assert not _close(pruned(x), net(x))


@pytest.mark.parametrize(("case", "ridge", "prior"), [
    *[(case, 0.0, "original") for case in sorted(CASES)],
    ("unet2d bn", 0.3, "zero"), ("mlp input skip", 0.3, "zero"), ("conv head", 0.3, "original")])
def test_refit_equals_lstsq_on_the_captured_consumer_input_over_the_fixed_and_kept_columns(case, ridge, prior):
    net, x = _build(case, n=200 if case == "conv head" else 60)  # more rows than the head's 112 columns
    net, x = net.double(), x.double()
    producer, consumer, *_ = _expected(case)
    A, per = _design(net, consumer, x, _expected(case)[3] + _expected(case)[5])
    W = _weights(net.get_submodule(consumer))
    Y = A @ W.T
    name = f"{producer}->{consumer}"  # only this pair is pruned: the consumer keeps its outputs
    pruned, report = nna.prune(net, x, keep={name: 0.5}, method="layer", ridge=ridge, refit_prior=prior)
    lr = next(r for r in report.layers if r.pair == name)
    cols = _columns(_kept_slots(case, lr.kept_units), per)
    As = A[:, cols]
    # ridge least squares with intercept: centred data, the ridge relative to the mean centred Gram diagonal of all
    # the consumer's columns, shrinking toward the trained weights ("original") or zero
    Ac, Yc = As - As.mean(0), Y - Y.mean(0)
    lam = ridge * float(np.mean(((A - A.mean(0)) ** 2).sum(0)))
    M0 = W[:, cols].T if prior == "original" else np.zeros((cols.size, W.shape[0]))
    M = M0 + np.linalg.solve(Ac.T @ Ac + lam * np.eye(cols.size), Ac.T @ (Yc - Ac @ M0)) if lam > 0 else \
        np.linalg.lstsq(np.hstack([As, np.ones((len(As), 1))]), Y, rcond=None)[0][:-1]
    b = Y.mean(0) - As.mean(0) @ M
    new = pruned.get_submodule(consumer)
    np.testing.assert_allclose(_weights(new), M.T, atol=1e-8)
    np.testing.assert_allclose(new.bias.detach().numpy(), net.get_submodule(consumer).bias.detach().numpy() + b,
                               atol=1e-8)
    err = np.sum((Y - As @ M - b) ** 2) / np.sum((Y - Y.mean(0)) ** 2)
    assert lr.relative_error == pytest.approx(err, rel=1e-6, abs=1e-12)


def _projected(A: np.ndarray, Y: np.ndarray, cols: np.ndarray) -> float:
    """``||P Y||^2`` on the span of the columns ``cols`` of ``A``: ``||Y||^2`` less the least-squares residual."""
    if cols.size == 0:
        return 0.0
    M = np.linalg.lstsq(A[:, cols], Y, rcond=None)[0]
    return float(np.sum(Y ** 2) - np.sum((Y - A[:, cols] @ M) ** 2))


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("case", ["unet2d bn", "mlp input skip", "conv head"])
def test_the_selection_objective_is_the_gain_over_the_fixed_columns(case, ridge):
    """F(S) = ||P_{Fix u S} Y||^2 - ||P_Fix Y||^2 on the centred design (with the ridge: of the design augmented
    with sqrt(lam) I and zero targets), for every subset of the producer's units, computed here with numpy."""
    net, x = _build(case, n=30)
    net, x = net.double(), x.double()
    pair = _the_pair(net, x, case)
    A, per = _design(net, pair.consumer, x, pair.n_units + pair.n_fixed)
    W = _weights(net.get_submodule(pair.consumer))
    Y = A @ W.T
    Ac, Yc = A - A.mean(0), Y - Y.mean(0)
    lam = ridge * float(np.mean((Ac ** 2).sum(0)))
    d = A.shape[1]
    Aa = np.vstack([Ac, np.sqrt(lam) * np.eye(d)])
    Ya = np.vstack([Yc, np.zeros((d, Y.shape[1]))])
    st = PairStats(pair, net.get_submodule(pair.consumer))
    with torch.no_grad():
        seen = []
        h = net.get_submodule(pair.consumer).register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        net(x)
        h.remove()
    st.update(seen[0])
    f = st.objective(ridge)
    offset, n = _expected(case)[4], _expected(case)[3]
    fixed = _columns(np.setdiff1d(np.arange(n + _expected(case)[5]), offset + np.arange(n)), per)
    base = _projected(Aa, Ya, fixed)
    for k in range(n + 1):
        for S in itertools.combinations(range(n), k):
            cols = np.sort(np.concatenate([fixed, _columns(offset + np.asarray(S, dtype=np.int64), per)]))
            assert f.value(list(S)) == pytest.approx(_projected(Aa, Ya, cols) - base, rel=1e-7,
                                                     abs=1e-9 * np.sum(Ya ** 2))
    # the greedy path's errors are relative to the whole centred energy, as for the other pairs
    path = nna.pruning._greedy(st, ridge, n)
    for k in range(n + 1):
        cols = np.sort(np.concatenate([fixed, _columns(offset + path.selected[:k], per)]))
        resid = np.sum(Ya ** 2) - _projected(Aa, Ya, cols)
        assert path.relative_errors[k] == pytest.approx(resid / np.sum(Yc ** 2), rel=1e-6, abs=1e-12)


def test_units_that_the_fixed_channels_already_span_have_no_gain():
    """Without a ridge, a unit that copies a fixed channel adds nothing beyond it: its gain is 0 (exactly, not
    rounding noise of the Schur complement), and the objective is still built when every unit is such a copy."""
    class Copy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b, self.c = nn.Linear(4, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([x, self.b(x)], 1))

    net = Copy().double()
    with torch.no_grad():
        net.b.weight.copy_(torch.eye(4))
        net.b.bias.zero_()
    x = torch.randn(30, 4, dtype=torch.float64)
    (pair,), _ = nna.find_pairs(net, x[:2])
    st = PairStats(pair, net.c)
    st.update(torch.cat([x, x], 1))
    f = st.objective(0.0)
    assert [f.value([j]) for j in range(4)] == [0.0] * 4
    assert f.value(list(range(4))) == 0.0


@pytest.mark.parametrize("case", ["unet2d bn", "mlp input skip", "conv head"])
def test_parameter_budgets_count_the_fixed_columns_and_are_met(case):
    net, x = _build(case)
    assert _the_pair(net, x, case).n_fixed == _expected(case)[5]
    check_budgets_against_built_networks(net, x, (1.2, 1.5))


@pytest.mark.parametrize("case", ["unet2d bn", "unet1d", "conv head", "mlp input skip"])
def test_save_and_load_round_trip(case, tmp_path):
    net, x = _build(case)
    pruned, rep = nna.prune(net, x, keep=0.5, method="asym")
    assert "->".join(_expected(case)[:2]) in [r.pair for r in rep.layers]
    assert_save_load_round_trip(pruned, CASES[case][0](), x, tmp_path / "m.pt")


def _top(score: np.ndarray, k: int) -> list[int]:
    return sorted(np.argsort(-score, kind="stable")[:k].tolist())


@pytest.mark.parametrize("case", ["unet2d bn", "mlp input skip", "conv head", "unet1d"])
def test_the_baselines_score_the_producers_slice_of_the_consumer(case):
    net, x = _build(case)
    producer, consumer, _, n, offset, fixed, _ = _expected(case)
    name = f"{producer}->{consumer}"
    k = 2
    keep = {name: k / n}

    def kept(method: str, **kw: object) -> list[int]:
        _, rep = nna.prune(net, x, keep=keep, method=method, **kw)
        return next(r for r in rep.layers if r.pair == name).kept_units

    # weight norm: the producer's filters (its output rows)
    prod = net.get_submodule(producer)
    w = prod.weight.detach().double()
    rows = w.transpose(0, 1) if isinstance(prod, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else w
    assert kept("weight_norm") == _top(rows.reshape(n, -1).norm(dim=1).numpy(), k)
    # Wanda-like: sum_i |W_ic| ||X_c|| over the producer's columns at the consumer, offset by the other operands
    A, per = _design(net, consumer, x, n + fixed)
    W = _weights(net.get_submodule(consumer))
    col_score = np.abs(W).sum(0) * np.sqrt((A ** 2).sum(0))
    unit_cols = _columns(offset + np.arange(n), per).reshape(n, per)
    assert kept("act_norm", refit_from="layer") == _top(col_score[unit_cols].sum(1), k)
    # ActGrad: sum over samples of |sum over positions of activation * gradient| of the producer's channels
    y = torch.randint(0, 2, (x.shape[0],))
    seen = []

    def grab(_m: nn.Module, inp: tuple) -> tuple:
        h = inp[0].detach().clone().requires_grad_(True)
        seen.append(h)
        return (h,)

    hook = net.get_submodule(consumer).register_forward_pre_hook(grab)
    out = net(x)
    hook.remove()
    out = out.flatten(2).mean(2) if out.dim() > 2 else out
    (F.cross_entropy(out, y) * x.shape[0]).backward()
    h = seen[0]
    ag = (h * h.grad).detach().double()
    # per sample and input channel of the consumer (a Linear's blocks of `per` columns): summed over positions
    ag = ag.reshape(h.shape[0], -1, per) if h.dim() == 2 else ag.reshape(h.shape[0], h.shape[1], -1)
    score = ag.sum(2)[:, offset:offset + n].abs().sum(0).numpy()
    net.zero_grad()

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o.flatten(2).mean(2) if o.dim() > 2 else o, t)

    _, rep = nna.prune(net, (x, y), keep=keep, method="actgrad", loss_fn=loss, refit_from="layer")
    assert next(r for r in rep.layers if r.pair == name).kept_units == _top(score, k)


def test_the_callers_model_is_unchanged():
    net, x = _build("unet2d bn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("asym", "seq", "layer"):
        pruned, _ = nna.prune(net, x, keep=0.5, method=method)
        assert pruned.d1.in_channels == 6 + 2 and pruned.bn.num_features == 6 + 2
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert net.d1.in_channels == 11 and net.up.out_channels == 5 and net.bn.num_features == 11


@pytest.mark.parametrize("method", ["asym", "layer"])
def test_the_device_statistics_path_gives_the_same_pruning(method, monkeypatch):
    net, x = _build("unet2d bn")
    host, rep_host = nna.prune(net, x, keep=0.5, method=method)
    monkeypatch.setattr(_stats, "_DEVICE_PATH_ON_CPU", True)
    dev, rep_dev = nna.prune(net, x, keep=0.5, method=method)
    assert "up->d1" in [r.pair for r in rep_dev.layers]
    assert [r.kept_units for r in rep_dev.layers] == [r.kept_units for r in rep_host.layers]
    for a, b in zip(host.state_dict().values(), dev.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["asym", "seq", "layer"])
def test_pruning_on_a_gpu_equals_pruning_on_the_cpu(method):
    """The U-Net with a BatchNorm after the concatenation, in float64, on the GPU (statistics kept there): the same
    units as on the CPU, weights and outputs equal to rounding."""
    net, x = _build("unet2d bn")
    layers = check_gpu_equals_cpu(net, x, method)
    assert "up->d1" in [r.pair for r in layers]


def test_verify_and_the_error_curve_measure_the_same_relative_errors():
    net, x = _build("unet2d bn")
    _, rep = nna.prune(net, x, keep={"up->d1": 0.6}, method="layer", verify=True, ridge=1e-3)
    lr = next(r for r in rep.layers if r.pair == "up->d1")
    assert lr.kept == 3
    value, kind = lr.verification["rel_err_at_k"]
    assert kind == "exact" and value == pytest.approx(lr.error_curve[3], rel=1e-9)
    bound, kind = lr.verification["bound_rel_err_at_k"]
    assert kind == "proven upper bound" and bound >= value * (1 - 1e-9)
    assert lr.error_curve == sorted(lr.error_curve, reverse=True)


@pytest.mark.parametrize("case", ["unet2d bn", "mlp input skip", "conv head"])
def test_the_report_says_how_many_channels_the_concatenation_fixes(case):
    """The other operands' channel count (written in CASES from the models' layers) is in the pair's report, its
    dict and its summary line; a pair without a concatenation reports none."""
    net, x = _build(case)
    _, rep = nna.prune(net, x, keep=0.5)
    producer, consumer, _, _, _, n_fixed, _ = _expected(case)
    name = f"{producer}->{consumer}"
    fixed = {r.pair: r.fixed_channels for r in rep.layers}
    assert fixed.pop(name) == n_fixed > 0
    assert set(fixed.values()) <= {0}
    line = next(ln for ln in rep.summary().splitlines() if ln.strip().startswith(name))
    assert f"(+{n_fixed} fixed channels of the concatenation)" in line
    layers = rep.to_dict()["layers"]
    assert next(d for d in layers if d["pair"] == name)["fixed_channels"] == n_fixed


def test_keep_by_pair_name_and_the_summary():
    net, x = _build("unet2d")
    _, rep = nna.prune(net, x, keep={"up->d1": 0.4}, method="asym")
    assert {r.pair: r.kept for r in rep.layers}["up->d1"] == 2
    assert {r.pair: r.kept for r in rep.layers}["e1->e2"] == 4  # the others keep everything
    assert "skipped up" not in rep.summary()


class Joined(nn.Module):
    """A convolution ``a`` joined with another one's output ``b`` in ways the pruner cannot follow."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d({"stack": 4, "spatial": 4, "twice": 12}.get(how, 8), 2, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.a(x)), self.b(x)
        if self.how == "stack":
            return self.c(torch.stack([a, b], 1).sum(1))
        if self.how == "spatial":
            return self.c(torch.cat([b, a], dim=-1))
        if self.how == "gn":
            return self.c(self.gn(torch.cat([b, a], 1)))
        if self.how == "dense":
            h = torch.cat([b, a], 1)
            return self.c(h) + self.d(h)
        if self.how == "twice":
            return self.c(torch.cat([b, torch.cat([b, a], 1)], 1))
        return self.c(torch.cat([b, a], 1))


@pytest.mark.parametrize(("how", "match"), [
    ("stack", r"one of several tensors that stack .* combines \(a stack"),
    ("spatial", r"concatenated by cat along dim -1 of \(2, 4, 6, 6\) \(positions\), not along the producer's units"),
    ("gn", r"GroupNorm\(2, 8\) 'gn' after the concatenation normalises groups of the joined channels"),
    ("dense", r"its output, after relu -> cat, feeds 2 operations"),
    ("twice", r"is concatenated a second time \(cat_1\); one concatenation between a producer and its consumer"),
])
def test_concatenations_that_cannot_be_followed_are_skipped_with_the_reason(how, match):
    net = Joined(how).eval()
    pairs, skipped = nna.find_pairs(net, torch.randn(2, 1, 6, 6))
    assert "a" not in [p.producer for p in pairs]
    assert re.search(match, dict(skipped)["a"]), dict(skipped)["a"]


def test_a_producer_concatenated_with_itself_is_skipped():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.c(torch.cat([h, h], 1))

    _, skipped = nna.find_pairs(Twice(), torch.randn(2, 3))
    assert "appears 2 times in the concatenation" in dict(skipped)["a"]


def test_a_declared_pair_through_a_concatenation_is_refused_with_what_to_do():
    for case in ("unet2d", "mlp input skip"):
        net, x = _build(case)
        producer, consumer = _expected(case)[:2]
        with pytest.raises(ValueError, match=rf"declared pair .*producer='{producer}', consumer='{consumer}'.*"
                                             r"concatenated with other tensors.*call prune without pairs="):
            nna.prune(net, x, keep=0.5, method="layer", pairs=[nna.Pair(producer, consumer)])
