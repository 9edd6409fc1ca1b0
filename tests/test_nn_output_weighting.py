"""``weighting="output"``: design rows weighted by the model output's sensitivity to the consumer's output.

Oracles: the Jacobian of the rest of the network computed with ``torch.func.jacrev`` (exact path), a closed form
for an elementwise output (where Rademacher probes are exact), the first-order optimality of the weighted least
squares written with the modules' own forward passes (no design rows), and a constructed selection that the
weighting must flip.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import nn_adapters as nna
from nn_adapters._sensitivity import EXACT_MAX, output_row_weights


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


def _weights(net: nn.Module, consumer: str, x: torch.Tensor, batches: int = 1) -> torch.Tensor:
    """The row weights of ``consumer`` on ``x`` in ``batches`` batches, rescaled to mean 1 over all rows (the
    library scales them by the first batch's mean, a constant that changes nothing downstream)."""
    xs = x.chunk(batches)
    w, notes = output_row_weights(net, {"p": consumer}, [(b, None) for b in xs])
    assert notes == []
    assert abs(float(w["p"][0].mean()) - 1.0) < 1e-12  # of order 1: mean 1 on the first batch
    w = torch.cat(w["p"])
    return w / w.mean()


def test_exact_weights_are_the_jacobian_norms():
    net = _mlp()
    x = torch.randn(30, 4, dtype=torch.float64)
    got = _weights(net, "2", x, batches=3)
    # oracle: J_n = d net[3:](y_n) / d y_n for the consumer's output y_n, per sample
    y = net[:3](x)
    J = torch.func.vmap(torch.func.jacrev(lambda v: net[3:](v)))(y)  # (30, 3, 8)
    s = J.pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(got, s / s.mean(), rtol=1e-10, atol=1e-12)


def test_probe_weights_exact_for_an_elementwise_output():
    # output tanh(conv2(...)): each output entry reads one entry of the consumer's output, so Rademacher probes
    # (v_i^2 = 1) give ||J_r||_F^2 = sum_c (1 - tanh^2)^2 exactly
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Tanh()).double()
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64)
    assert 6 * 5 * 5 > EXACT_MAX
    got = _weights(net, "2", x)
    y = net[:3](x)
    s = (1 - torch.tanh(y) ** 2).pow(2).sum(dim=1).reshape(-1)  # (sample, position) rows, row-major positions
    torch.testing.assert_close(got, s / s.mean(), rtol=1e-10, atol=1e-12)


def _weighted_refit_gradient(net: nn.Module, pruned: nn.Module, consumer: str, x: torch.Tensor,
                             kept_in: torch.Tensor, s: torch.Tensor) -> float:
    """Gradient norm, relative to the weights', of ``sum_r s_r ||y_r - y'_r||^2`` with respect to the pruned
    consumer's weight and bias: the original consumer's output ``y`` against the pruned one's ``y'`` on the same
    (original) inputs, its kept channels only, written with the modules' forward passes."""
    idx = list(net).index(net.get_submodule(consumer))
    a = net[:idx](x).detach()
    y = net[idx](a).detach()
    cons = copy.deepcopy(pruned.get_submodule(consumer)).requires_grad_(True)
    yp = cons(a[:, kept_in])
    r = (y - yp).pow(2).sum(dim=1)
    loss = (r.reshape(-1) * s).sum()
    gw, gb = torch.autograd.grad(loss, [cons.weight, cons.bias])
    return float(torch.cat([gw.reshape(-1), gb]).norm() / (y.pow(2).sum() + 1e-30).sqrt())


@pytest.mark.filterwarnings("ignore:.*interpolates the calibration data")  # the Flatten -> Linear pair
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_transpose"])
def test_weighted_refit_is_the_weighted_least_squares(kind):
    torch.manual_seed(2)
    if kind == "linear":
        net = _mlp()
        x = torch.randn(200, 4, dtype=torch.float64)
    elif kind == "conv":
        net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.Tanh(),
                            nn.Flatten(), nn.Linear(5 * 3 * 3, 4)).double().eval()
        x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 5, 3, stride=2), nn.Tanh(),
                            nn.Flatten(), nn.Linear(5 * 9 * 9, 4)).double().eval()
        x = torch.randn(60, 1, 6, 6, dtype=torch.float64)
    net[2].weight.data.mul_(4)  # the Tanh saturates on some rows: uneven sensitivities
    pruned, rep = nna.prune(net, x, keep={"0": 0.5}, method="layer", ridge=0.0, weighting="output")
    layer = next(r for r in rep.layers if r.pair.startswith("0->"))
    kept = torch.as_tensor(layer.kept_units)
    # oracle weights: ||J_r||_F^2 of the rest of the network, per sample and output position of the consumer
    y = net[:3](x).detach()
    J = torch.func.vmap(torch.func.jacrev(lambda v: net[3:](v[None])[0]))(y)  # (N, out, *consumer output)
    s = J.detach().pow(2).sum(dim=(1, 2)).reshape(-1)
    s = s / s.mean()
    assert float(s.std()) > 0.1  # the weighting is not trivial here
    assert _weighted_refit_gradient(net, pruned, "2", x, kept, s) < 1e-8
    # and it is not the unweighted least squares (the test can fail)
    assert _weighted_refit_gradient(net, pruned, "2", x, kept, torch.ones_like(s)) > 1e-4


class _GatedOut(nn.Module):
    """``c(relu(p(x[:, :2]))) * x[:, 2:]``: the consumer's output reaches the model's output scaled by ``x_2``."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(2, 2, bias=False)
        self.c = nn.Linear(2, 1)
        with torch.no_grad():
            self.p.weight.copy_(torch.eye(2))
            self.c.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.p(x[:, :2]))) * x[:, 2:]


def test_weighting_follows_what_reaches_the_output():
    # half the samples: unit 0 active, output gate 1; the other half: unit 1 active with 10x the energy, gate 0.01.
    # Unweighted, unit 1 explains more of the consumer's output; weighted, unit 0 explains more of the model's.
    g = torch.Generator().manual_seed(3)
    n = 100
    a = torch.zeros(2 * n, 3, dtype=torch.float64)
    a[:n, 0] = torch.rand(n, generator=g, dtype=torch.float64)
    a[:n, 2] = 1.0
    a[n:, 1] = 10 * torch.rand(n, generator=g, dtype=torch.float64)
    a[n:, 2] = 0.01
    net = _GatedOut().double().eval()
    _, plain = nna.prune(net, a, keep=0.5, method="layer", ridge=1e-6)
    _, weighted = nna.prune(net, a, keep=0.5, method="layer", ridge=1e-6, weighting="output")
    assert (plain.weighting, weighted.weighting) == ("none", "output")
    assert "weighting=output" in weighted.summary() and "weighting" not in plain.summary()
    assert plain.layers[0].kept_units == [1]
    assert weighted.layers[0].kept_units == [0]
    with torch.no_grad():
        ref = net(a)
        err = [float((p(a) - ref).pow(2).sum()) for p in (nna.prune(net, a, keep=0.5, method="layer", ridge=1e-6)[0],
                                                             nna.prune(net, a, keep=0.5, method="layer", ridge=1e-6,
                                                                       weighting="output")[0])]
    assert err[1] < 0.1 * err[0]


@pytest.mark.parametrize("method", ["asym", "seq", "layer", "act_norm"])
def test_keep_all_is_exact_and_the_model_untouched(method):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    before = copy.deepcopy(net.state_dict())
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.randn(40, 1, 6, 6)
    pruned, _ = nna.prune(net, x, keep=1.0, method=method, weighting="output")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(not m._forward_hooks for m in net.modules())


def test_sequential_modes_take_the_weights_per_batch():
    # the same data as one batch or as three: the same weighted statistics, hence the same units and weights
    net = _mlp()
    x = torch.randn(90, 4, dtype=torch.float64)
    one, r1 = nna.prune(net, x, keep=0.5, method="asym", weighting="output", ridge=1e-3)
    three, r3 = nna.prune(net, list(x.chunk(3)), keep=0.5, method="asym", weighting="output", ridge=1e-3)
    assert [r.kept_units for r in r1.layers] == [r.kept_units for r in r3.layers]
    for p, q in zip(one.parameters(), three.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_consumer_that_does_not_reach_the_output_is_left_unweighted():
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 4), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x) + 0.0 * self.b(torch.relu(self.a(x))).sum(dim=1, keepdim=True)

    torch.manual_seed(5)
    net = Dead().eval()
    x = torch.randn(50, 3)
    with pytest.warns(UserWarning, match="does not reach the model's output"):
        _, rep = nna.prune(net, x, keep=0.5, method="layer", weighting="output")
    _, rep0 = nna.prune(net, x, keep=0.5, method="layer")
    assert [r.kept_units for r in rep.layers] == [r.kept_units for r in rep0.layers]


def test_bad_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting must be 'none'.*'output'"):
        nna.prune(_mlp(), torch.randn(20, 4, dtype=torch.float64), keep=0.5, weighting="layernorm")


def test_output_without_tensors_is_refused():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> dict:
            return {"classes": self.b(torch.relu(self.a(x))).argmax(dim=1)}

    with pytest.raises(ValueError, match="floating-point tensors"):
        nna.prune(Dict(), torch.randn(20, 3), keep=0.5, method="layer", weighting="output")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_equals_cpu():
    net = _mlp()
    x = torch.randn(60, 4, dtype=torch.float64)
    host, rh = nna.prune(net, x, keep=0.5, method="asym", weighting="output")
    gpu, rg = nna.prune(copy.deepcopy(net).cuda(), x.cuda(), keep=0.5, method="asym", weighting="output")
    assert [r.kept_units for r in rh.layers] == [r.kept_units for r in rg.layers]
    for a, b in zip(host.state_dict().values(), gpu.state_dict().values(), strict=True):
        np.testing.assert_allclose(a.numpy(), b.cpu().numpy(), rtol=1e-8, atol=1e-10)


def test_layer_mode_streams_the_weights_batch_by_batch():
    # the statistics of layer mode (weights computed per batch, just before that batch's statistics, none held
    # beyond it) equal those built from every batch's weights computed first
    from nn_adapters._data import as_batches
    from nn_adapters._sensitivity import OutputSensitivity
    from nn_adapters._stats import PairStats, capture_hooks
    from nn_adapters.pairs import find_pairs
    from nn_adapters.pruning import _layer_stats

    net = _mlp()
    batches = as_batches(list(torch.randn(90, 4, dtype=torch.float64).chunk(3)), device=torch.device("cpu"),
                         dtype=torch.float64, model=net)
    found, _ = find_pairs(net, batches[0][0][:2])
    consumers = {p.name: p.consumer for p in found}
    streamed = _layer_stats(net, found, batches, False, 1, OutputSensitivity(net, consumers))
    assert all(len(st._row_weights) == 0 for st in streamed.values())  # every queued weight was consumed
    weights, _ = output_row_weights(net, consumers, batches)
    held = {p.name: PairStats(p, net.get_submodule(p.consumer), 1, None, weights[p.name]) for p in found}
    with capture_hooks(net, found, held), torch.no_grad():
        for x, _ in batches:
            net(x)
    unweighted = _layer_stats(net, found, batches, False, 1)
    for p in found:
        a, b = streamed[p.name].acc, held[p.name].acc
        np.testing.assert_allclose(a.gram(centered=True), b.gram(centered=True), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.cross(centered=True), b.cross(centered=True), rtol=1e-12, atol=1e-12)
    # weighted, the first pair's statistics differ from the unweighted ones (its consumer's output passes a Tanh);
    # the last consumer's output is the model's output, where every row weighs the same
    first, last = (p.name for p in found)
    for name, differs in ((first, True), (last, False)):
        a, u = streamed[name].acc, unweighted[name].acc
        same = np.allclose(a.gram(centered=True) / a.weight_sum, u.gram(centered=True) / u.weight_sum, rtol=1e-9)
        assert same != differs


def test_large_batches_are_split_for_the_gradient_passes(monkeypatch):
    # the exact weights do not depend on how a batch is split into chunks (samples do not interact in eval mode)
    import nn_adapters._sensitivity as sens

    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(23, 1, 5, 5, dtype=torch.float64)
    whole, _ = output_row_weights(net, {"p": "2"}, [(x, None)])
    monkeypatch.setattr(sens, "CHUNK", 5)
    split, _ = output_row_weights(net, {"p": "2"}, [(x, None)])
    assert whole["p"][0].shape == (23 * 25,)
    torch.testing.assert_close(split["p"][0], whole["p"][0], rtol=1e-12, atol=1e-14)


class _SeqFirst(nn.Module):
    """A consumer's output through an elementwise tanh, returned sequence-first ``(T, N, C)`` (``seq_first``) or
    batch-first: the same Jacobian norms per row."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.b(torch.relu(self.a(x))))
        return y.transpose(0, 1) if self.seq_first else y


def test_a_sequence_first_output_is_not_read_as_samples():
    # 4 samples of 2 tokens: dim 0 of the (2, 4, 3) output is not the samples, so its 12 entries per "row of dim 0"
    # are not one sample's; the weights must be those of the batch-first output (exact there)
    torch.manual_seed(7)
    first = _SeqFirst(False).double().eval()
    seq = _SeqFirst(True).double().eval()
    seq.load_state_dict(first.state_dict())
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    a, _ = output_row_weights(first, {"p": "b"}, [(x, None)])
    b, _ = output_row_weights(seq, {"p": "b"}, [(x, None)])
    torch.testing.assert_close(b["p"][0], a["p"][0], rtol=1e-10, atol=1e-12)


def test_layer_mode_on_an_executor_equals_the_serial_run():
    from concurrent.futures import ThreadPoolExecutor

    net = _mlp()
    x = torch.randn(80, 4, dtype=torch.float64)
    serial, rs = nna.prune(net, x, keep=0.5, method="layer", weighting="output")
    with ThreadPoolExecutor(2) as pool:
        parallel, rp = nna.prune(net, x, keep=0.5, method="layer", weighting="output", executor=pool)
    assert [r.kept_units for r in rs.layers] == [r.kept_units for r in rp.layers]
    for p, q in zip(serial.parameters(), parallel.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
