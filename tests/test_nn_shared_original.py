"""MLP/CNN pruning (``nna.prune`` on layer pairs) reads the caller's own tensors: the unpruned network and the model
being pruned are :func:`nn_adapters._modes.shared_copy` copies (modules copied, tensors shared); the shrinking gives
the pruned layers tensors of their own, :func:`nn_adapters._modes.own_tensors` copies the rest at the end, and
:class:`nn_adapters._modes.TensorGuard` checks after every pruning that no tensor of the caller's was written.
ActGrad differentiates the loss for the consumers' inputs only, so that the caller's ``.grad`` stay as they were.

Oracles: storage pointers and object identity; torch's version counter; the caller's ``.grad`` set beforehand;
the kept units and weights of the same pruning on private deep copies (the earlier way)."""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import weakref

import pytest
import torch
from _torch_helpers import spy_shared_copies
from torch import nn

import nn_adapters as nna
import nn_adapters.pruning as pruning
from nn_adapters import zoo


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    net = zoo.digits_cnn()
    for m in net.modules():  # running statistics that are not the defaults: a BatchNorm copied or shrunk wrongly shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)) for _ in range(2)]


class StatsTracker:
    """Counts the layer statistics (``PairStats``) alive, by weak references after a garbage collection: at each
    layer's selection (``at_selection``) and whenever :meth:`alive` is called."""

    def __init__(self, monkeypatch) -> None:
        self.refs: list[weakref.ref] = []
        self.at_selection: list[int] = []
        refs = self.refs

        class Tracked(pruning.PairStats):
            def __init__(inner, *args, **kwargs) -> None:  # noqa: N805 - the tracker's self is the outer one
                super().__init__(*args, **kwargs)
                refs.append(weakref.ref(inner))

        pair_job = pruning._pair_job

        def counting(*args, **kwargs):
            self.at_selection.append(self.alive())
            return pair_job(*args, **kwargs)

        monkeypatch.setattr(pruning, "PairStats", Tracked)
        monkeypatch.setattr(pruning, "_pair_job", counting)

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


def private_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


@pytest.mark.parametrize("method", nna.METHODS)
def test_pruning_reads_the_callers_tensors_and_gives_what_private_copies_give(monkeypatch, method: str) -> None:
    net = cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():  # the caller's own gradients (a training step in progress): kept
        p.grad = grads[n].clone()
    copies = spy_shared_copies(monkeypatch, pruning)
    pruned, report = nna.prune(net, data(), compression=3.0, method=method, seed=0)
    assert len(copies) == 2  # the unpruned network and the model being pruned: no deep copy of the weights
    assert all(p is q for p, q in zip(net.parameters(), copies[0].parameters(), strict=True))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in net.named_parameters())
    assert not storages(pruned) & storages(net)  # the result holds its own tensors, the unpruned layers' too
    assert all(p.grad is None for p in pruned.parameters())

    monkeypatch.setattr(pruning, "shared_copy", private_copy)  # the earlier way: deep copies of the weights
    alone, report_alone = nna.prune(net, data(), compression=3.0, method=method, seed=0)
    assert [r.kept_units for r in report.layers] == [r.kept_units for r in report_alone.layers]
    for (k, v), (k2, w) in zip(pruned.state_dict().items(), alone.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w)


def test_tied_weights_stay_tied_and_are_not_the_callers() -> None:
    """A weight shared by two layers that are not pruned (the first and the last Linear of a square MLP): one copy in
    the result, tied as in the caller's model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                        nn.Linear(6, 6))
    net[6].weight = net[0].weight
    frozen = net[0].weight
    pruned, report = nna.prune(net, torch.randn(64, 6), keep=0.5, method="asym", pairs=[nna.Pair("2", "4")])
    assert [len(r.kept_units) for r in report.layers] == [6]
    assert pruned[6].weight is pruned[0].weight and pruned[0].weight is not frozen
    assert torch.equal(pruned[0].weight, frozen) and not storages(pruned) & storages(net)


def test_a_write_into_the_callers_weights_during_pruning_is_reported(monkeypatch) -> None:
    """Mutation check of the guard in place: a (simulated) shrink that writes the producer's weight in place before
    it replaces it."""
    keep_producer_side = pruning.keep_producer_side

    def writing(model: nn.Module, pair, idx: torch.Tensor) -> None:
        with torch.no_grad():
            model.get_submodule(pair.producer).weight.mul_(1.0)  # the same values, written
        keep_producer_side(model, pair, idx)

    monkeypatch.setattr(pruning, "keep_producer_side", writing)
    with pytest.raises(RuntimeError, match=r"internal error: pruning changed the caller's tensor '\w+\.weight'"):
        nna.prune(cnn(), data(), keep=0.5, method="layer")


def test_actgrad_refuses_a_loss_that_autograd_cannot_reach() -> None:
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).detach()

    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    with pytest.raises(ValueError, match="actgrad': the loss does not depend on the prunable layers' inputs"):
        nna.prune(Detached(), batches, keep=0.5, method="actgrad")


@pytest.mark.parametrize("method", ["asym", "seq"])
@pytest.mark.parametrize("budget", [{"keep": 0.5}, {"compression": 1.6, "allocation": "error-curve"}])
def test_sequential_modes_hold_one_layers_statistics_at_a_time(monkeypatch, method: str, budget: dict) -> None:
    """The statistics of a pruned layer are dropped before the next layer's are gathered: at each layer's selection
    only its own statistics are alive (weak references, after a garbage collection); the error-curve allocation's
    layer statistics (every layer's, from the original network) are dropped once the budgets are set."""
    tracker = StatsTracker(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 2))
    _, report = nna.prune(net, torch.randn(64, 5), method=method, **budget)
    assert len(report.layers) == 3 and len(tracker.refs) == (6 if "allocation" in budget else 3)
    assert tracker.at_selection == [1, 1, 1]


def stats_bytes(net: nn.Module, consumers: list[str], folds: int = 5) -> list[int]:
    """What each pair's statistics take, by the formula of ``stats_memory``'s documentation (``folds`` 0 without
    cross-validation)."""
    out = []
    for name in consumers:
        w = net.get_submodule(name).weight
        m, d = w.shape[0], w[0].numel()
        out.append((folds + 1) * (d * d + d * m) * 8)
    return out


@pytest.mark.parametrize("options", [
    {"method": "layer", "keep": 0.5},
    {"method": "layer", "compression": 2.5, "allocation": "error-curve"},
    {"method": "asym", "compression": 2.5, "allocation": "error-curve"},
    {"method": "act_norm", "keep": 0.5, "refit_from": "layer"},
    {"method": "layer", "keep": 0.5, "weighting": "output"},
    {"method": "layer", "keep": 0.5, "ridge": 1e-3},
])
def test_layer_statistics_in_passes_give_what_one_pass_gives(monkeypatch, options: dict) -> None:
    """The digits CNN's three pairs (consumers conv2, fc1, fc2) under a limit that fits two of them: two forward
    passes over the calibration data, never more than one group's statistics alive, the same pruned model."""
    net, batches = cnn(), data()
    one, report_one = nna.prune(net, batches, seed=0, **options)
    consumers = [p.consumer for p in nna.find_pairs(net, batches[0][0][:2])[0]]
    sizes = stats_bytes(net, consumers, 0 if "ridge" in options else 5)  # a fixed ridge: one accumulator
    assert len(sizes) == 3
    limit = max(sizes[0] + sizes[1], sizes[1] + sizes[2])
    assert sum(sizes) > limit  # consecutive groups, in layer order: the first two, then the third

    calls, before_pass = [], []
    tracker = StatsTracker(monkeypatch)
    forward = pruning._layer_stats

    def counting_stats(orig, pairs, *args, **kwargs):
        before_pass.append(tracker.alive())
        calls.append([p.consumer for p in pairs])
        return forward(orig, pairs, *args, **kwargs)

    monkeypatch.setattr(pruning, "_layer_stats", counting_stats)
    parts, report_parts = nna.prune(net, batches, seed=0, stats_memory=limit, **options)
    groups = [consumers[:2], consumers[2:]]
    layerwise = options["method"] == "layer" or options.get("refit_from") == "layer"
    curve = options.get("allocation") == "error-curve"
    assert calls == groups * (curve + layerwise)  # a pass per group for the allocation, again for the decisions
    assert set(before_pass) == {0}  # a group's statistics are gone before the next group's are gathered
    assert max(tracker.at_selection) <= 2
    assert [r.kept_units for r in report_parts.layers] == [r.kept_units for r in report_one.layers]
    for (k, v), (k2, w) in zip(one.state_dict().items(), parts.state_dict().items(), strict=True):
        assert k == k2 and torch.allclose(v, w, rtol=1e-5, atol=1e-6), k


def test_stats_memory_in_passes_on_an_executor() -> None:
    from concurrent.futures import ThreadPoolExecutor

    net, batches = cnn(), data()
    one, report_one = nna.prune(net, batches, keep=0.5, method="layer")
    with ThreadPoolExecutor(2) as pool:
        parts, report = nna.prune(net, batches, keep=0.5, method="layer", executor=pool, stats_memory=1)
    assert [r.kept_units for r in report.layers] == [r.kept_units for r in report_one.layers]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(one.parameters(), parts.parameters(),
                                                                            strict=True))


@pytest.mark.parametrize("bad", [0, -1, True, "4GB", float("inf"), float("nan")])
def test_stats_memory_refusals(bad) -> None:
    with pytest.raises(ValueError, match="stats_memory must be a number of bytes > 0"):
        nna.prune(cnn(), data(), keep=0.5, method="layer", stats_memory=bad)


def test_cli_stats_memory(tmp_path, monkeypatch) -> None:
    """``submod prune --stats-memory-gib`` passes the limit on in bytes (the same model as without it, a pass per
    layer at a limit below every layer's statistics); refused for --compare, for a transformer and when not > 0."""
    from nn_adapters.cli import register

    (tmp_path / "memmodels.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return zoo.mlp(12, [24, 16], 4), [torch.randn(200, 12)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    prune = nna.prune

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stats_memory"))
        return prune(*args, **kwargs)

    monkeypatch.setattr(nna, "prune", spy)

    def main(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="submod")
        register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv)
        return args.func(args)

    for extra, out in (([], "one.pt"), (["--stats-memory-gib", "1e-9"], "passes.pt")):
        assert main(["prune", "memmodels:build", "--keep", "0.5", "--method", "layer", "--out", out, *extra]) == 0
    assert seen == [None, 1]  # 1e-9 GiB: about one byte, every layer alone
    base = sys.modules["memmodels"].build()[0]
    one, passes = (nna.load_pruned(tmp_path / f, base_model=base) for f in ("one.pt", "passes.pt"))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(one.parameters(), passes.parameters(),
                                                                            strict=True))
    with pytest.raises(ValueError, match="must be a number of GiB > 0"):
        main(["prune", "memmodels:build", "--method", "layer", "--stats-memory-gib", "0"])
    with pytest.raises(ValueError, match="drop --workers, --progress, --allocation, --weighting, --stats-memory-gib"):
        main(["prune", "memmodels:build", "--compare", "--stats-memory-gib", "1"])


def test_stats_memory_is_for_layer_pairs_only() -> None:
    transformers = pytest.importorskip("transformers")
    from _torch_helpers import ragged_token_batches

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    model = transformers.LlamaModel(cfg).eval()
    with pytest.raises(ValueError, match="stats_memory apply to MLP/CNN pruning only"):
        nna.prune(model, ragged_token_batches(40, 2), keep=0.5, stats_memory=2**30)


def test_a_forward_that_updates_a_buffer_in_place_updates_the_copys() -> None:
    """A model whose forward counts its calls in a buffer, in place: pruned as on deep copies (every method), the
    caller's counter untouched."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.body(x)

    torch.manual_seed(0)
    model = Counting().eval()
    batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    for method in ("asym", "layer", "actgrad"):
        pruned, _ = nna.prune(model, batches, keep=0.5, method=method)
        assert int(model.calls) == 0 and pruned.body[0].out_features == 4


def test_loading_from_a_base_model_copies_no_weight_of_it(monkeypatch, tmp_path) -> None:
    """``nna.load_pruned(path, base_model=...)`` resizes a copy of ``base_model`` whose parameters are shapes only and
    gives it the saved tensors: the loaded model computes what the pruned one did (a tied pair of layers tied again,
    BatchNorm statistics loaded), holds no tensor of the caller's and none on the meta device; the base model is as
    it was."""
    import nn_adapters.io as nio

    net = cnn()
    pruned, _ = nna.prune(net, data(), keep=0.5, method="asym")
    nna.save_pruned(pruned, tmp_path / "cnn.pt")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    resize = nio._resize

    def spy(model: nn.Module, name: str, shape: dict) -> None:
        seen.append(all(p.is_meta for p in model.parameters()))
        resize(model, name, shape)

    monkeypatch.setattr(nio, "_resize", spy)
    loaded = nna.load_pruned(tmp_path / "cnn.pt", base_model=net)
    assert seen and all(seen)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert not storages(loaded) & storages(net)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    x = data()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)

    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                         nn.Linear(6, 6))
    tied[6].weight = tied[0].weight
    small, _ = nna.prune(tied, torch.randn(64, 6), keep=0.5, method="asym", pairs=[nna.Pair("2", "4")])
    nna.save_pruned(small, tmp_path / "tied.pt")
    back = nna.load_pruned(tmp_path / "tied.pt", base_model=tied)
    assert back[6].weight is back[0].weight and not back[0].weight.is_meta
    assert torch.equal(back[0].weight, small[0].weight) and back[2].out_features == 6
