"""Models with several inputs, pruned from calibration batches that are dicts of keyword inputs, ``model(**batch)``.

A diffusion U-Net's ``forward(x, t)`` or a class-conditional network's ``forward(x, y)`` used to be refused (a tensor
batch's second element is its label); the documented alternative was a wrapper that takes one packed tensor and
splits it. That wrapper is the oracle here: on the same samples, dict batches must keep the same units and give the
same pruned outputs, report and FLOPs as the wrapper does, for every method. Other oracles: the unpruned network
(keep everything), numpy's lstsq on the consumer's input captured here, and :class:`FoldDealer` on the packed rows
(cross-validation folds that split the dict's tensors consistently).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nn_adapters as nna
from nn_adapters._data import FoldDealer, as_batches, sample_folds
from nn_adapters.budget import count_flops
from nn_adapters.compare import compare_methods

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIDE, C, G = 6, 16, 4  # image side, channels of conv1, GroupNorm groups
FEATURES, HIDDEN, CLASSES = 6, 12, 3


class Denoiser(nn.Module):
    """A diffusion model's residual block in miniature: ``forward(x, t)``, the timestep's embedding added to the
    channels of ``conv1`` (a conditioning term), then a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.temb = nn.Conv2d(3, C, 3, padding=1), nn.Linear(2, C)
        self.norm, self.conv2 = nn.GroupNorm(G, C), nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = torch.stack([torch.sin(3 * t), torch.cos(3 * t)], dim=1)
        h = self.conv1(x) + self.temb(e)[:, :, None, None]
        return self.conv2(torch.relu(self.norm(h)))


class PackedDenoiser(nn.Module):
    """The wrapper the docs used to prescribe: one tensor, the flattened images then the timestep."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return self.net(xt[:, :-1].view(-1, 3, SIDE, SIDE), xt[:, -1])


def pack(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.flatten(1), t[:, None]], 1)


class ClassConditional(nn.Module):
    """A class-conditional MLP, ``forward(x, y)`` with ``y`` integer classes: their embedding, projected by a Linear,
    is added to ``fc1``'s features (a conditioning term); ``scale`` has a default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.emb, self.proj = nn.Linear(FEATURES, HIDDEN), nn.Embedding(CLASSES, 4), nn.Linear(4, HIDDEN)
        self.fc2, self.out = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.fc1(x) + self.proj(self.emb(y)))
        return self.out(torch.relu(self.fc2(h))) * scale


class PackedClassConditional(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.net(xy[:, :-1], xy[:, -1].long())


class EmbeddingAdded(nn.Module):
    """A class embedding added directly to ``fc1``'s features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.emb, self.fc2 = nn.Linear(FEATURES, HIDDEN), nn.Embedding(CLASSES, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) + self.emb(y)))


def denoiser_data(n: int = 64, seed: int = 0) -> tuple[Denoiser, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return Denoiser().eval(), torch.randn(n, 3, SIDE, SIDE), torch.rand(n)


def class_data(n: int = 60, seed: int = 0) -> tuple[ClassConditional, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return ClassConditional().eval(), torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,))


def dict_batches(x: torch.Tensor, t: torch.Tensor, key: str = "t", size: int = 16) -> list[dict]:
    return [{"x": x[i:i + size], key: t[i:i + size]} for i in range(0, x.shape[0], size)]


def packed_batches(xt: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    return [xt[i:i + size] for i in range(0, xt.shape[0], size)]


def assert_same_pruning(rep_dict: nna.PruneReport, rep_packed: nna.PruneReport, prefix: str = "net.") -> None:
    """The two reports prune the same units of the same pairs, with the same errors and ridges."""
    assert [r.pair for r in rep_packed.layers] == [prefix + r.pair.replace("->", "->" + prefix)
                                                   for r in rep_dict.layers]
    for a, b in zip(rep_dict.layers, rep_packed.layers, strict=True):
        assert a.kept_units == b.kept_units and a.pick_order == b.pick_order
        for attr in ("relative_error", "ridge", "cv_relative_error"):
            va, vb = getattr(a, attr), getattr(b, attr)
            assert (va is None) == (vb is None), attr
            if va is not None:
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-12), attr
        assert a.ridge_choice == b.ridge_choice
    assert rep_dict.n_samples == rep_packed.n_samples
    assert rep_dict.params_after == rep_packed.params_after


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_denoiser_from_dict_batches_is_pruned_as_the_packed_wrapper(method):
    """The reproducer: Denoiser(x, t) pruned from [{'x': ..., 't': ...}] keeps the same GroupNorm groups of conv1
    (and the time embedding's rows) as the packed wrapper, with the same refitted outputs."""
    net, x, t = denoiser_data()
    pruned, rep = nna.prune(net, dict_batches(x, t), keep=0.5, method=method)
    wrapped, rep_w = nna.prune(PackedDenoiser(net), packed_batches(pack(x, t)), keep=0.5, method=method)
    assert [(r.pair, r.kept) for r in rep.layers] == [("conv1->conv2", G // 2)]
    assert_same_pruning(rep, rep_w)
    assert pruned.conv1.out_channels == pruned.temb.out_features == C // 2 == pruned.conv2.in_channels
    assert rep.flops_before == rep_w.flops_before and rep.flops_after == rep_w.flops_after
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, t), wrapped.net(x, t), rtol=1e-5, atol=1e-6)
    assert net.conv1.out_channels == C  # the input model is untouched


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_class_conditional_mlp_with_integer_labels_as_input_is_pruned_as_the_packed_wrapper(method):
    """forward(x, y) with y integer classes through an Embedding then a Linear: y stays an integer tensor (only
    floating inputs are cast), fc1 and fc2 are pruned (proj's rows with fc1's units) as through the wrapper, and the
    default of scale is kept."""
    net, x, y = class_data()
    batches = dict_batches(x, y, key="y", size=20)
    pruned, rep = nna.prune(net, batches, keep=0.5, method=method)
    wrapped, rep_w = nna.prune(PackedClassConditional(net), packed_batches(torch.cat([x, y[:, None].float()], 1), 20),
                               keep=0.5, method=method)
    assert [r.pair for r in rep.layers] == ["fc1->fc2", "fc2->out"]
    assert_same_pruning(rep, rep_w)
    assert pruned.proj.out_features == HIDDEN // 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, y), wrapped.net(x, y), rtol=1e-5, atol=1e-6)
    assert batches[0]["y"].dtype == torch.int64 and batches[0]["x"].dtype == torch.float32  # not modified


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_keeping_everything_reproduces_the_network_with_dict_batches(method):
    """keep=1.0: the pruned network is the network, for both models (an oracle that needs no wrapper)."""
    net, x, t = denoiser_data(48)
    pruned, rep = nna.prune(net, dict_batches(x, t), keep=1.0, method=method)
    assert [r.kept for r in rep.layers] == [G]
    cnet, cx, cy = class_data()
    cpruned, crep = nna.prune(cnet, dict_batches(cx, cy, key="y", size=20), keep=1.0, method=method)
    assert [r.kept for r in crep.layers] == [HIDDEN, HIDDEN]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, t), net(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpruned(cx, cy), cnet(cx, cy), rtol=1e-5, atol=1e-5)


def test_refit_is_least_squares_on_the_consumer_input_of_the_dict_batches():
    """LayerInChange with ridge=0: fc2's refitted weights and bias are numpy's lstsq of the original fc2 output on
    the kept columns of fc2's input (plus a constant), captured here from model(x, y) (one dict, one batch)."""
    net, x, y = class_data(80)
    pruned, rep = nna.prune(net, {"x": x, "y": y}, keep=0.5, method="layer", ridge=0.0)
    kept = rep.layers[0].kept_units
    seen = []
    handle = net.fc2.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        net(x, y)
    handle.remove()
    A = seen[0].double().numpy()
    Y = A @ net.fc2.weight.detach().double().numpy().T
    design = np.hstack([A[:, kept], np.ones((A.shape[0], 1))])
    sol = np.linalg.lstsq(design, Y, rcond=None)[0]
    rows = rep.layers[1].kept_units  # fc2 is the next pair's producer too: its kept output rows
    np.testing.assert_allclose(pruned.fc2.weight.detach().double().numpy(), sol[:-1].T[rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pruned.fc2.bias.detach().double().numpy(),
                               (sol[-1] + net.fc2.bias.detach().double().numpy())[rows], rtol=1e-4, atol=1e-5)


def test_cross_validation_folds_split_every_input_of_a_dict_batch_alike():
    """A sample is all of its inputs: the same image at two timesteps is two samples, the same (image, timestep) one
    sample. The folds are those FoldDealer gives the packed rows, and ridge='cv' then chooses what the wrapper
    chooses."""
    net, x, t = denoiser_data(60)
    x = torch.cat([x[:30], x[:30]])  # every image twice, at different timesteps ...
    t = torch.cat([t[:30], t[30:60]])
    x, t = torch.cat([x, x[:10]]), torch.cat([t, t[:10]])  # ... and ten (image, timestep) samples twice
    batches = as_batches(dict_batches(x, t, size=16))
    dealer = FoldDealer(5)
    want = [np.array([dealer.fold(r) for r in pack(b["x"], b["t"])]) for b, _ in batches]
    got = sample_folds(batches, 5)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({f for fs in got for f in fs}) == 5
    for method in ("layer", "asym"):
        pruned, rep = nna.prune(net, dict_batches(x, t), keep=0.5, method=method, ridge="cv")
        wrapped, rep_w = nna.prune(PackedDenoiser(net), packed_batches(pack(x, t)), keep=0.5, method=method,
                                   ridge="cv")
        assert rep.layers[0].ridge_choice == "5-fold cv"
        assert_same_pruning(rep, rep_w)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x, t), wrapped.net(x, t), rtol=1e-5, atol=1e-6)


def test_one_dict_or_a_labelled_dict_is_split_into_batches_consistently():
    """A single dict (or a (dict, labels) tuple) is split like a tensor, every tensor at the same samples; numpy
    arrays are accepted and copied; a constant (a number, None) goes to every batch as it is."""
    x, t = np.random.default_rng(0).normal(size=(10, 3, 2, 2)), np.arange(10)
    data = {"x": x, "t": t, "scale": 2.0, "mask": None}
    batches = as_batches(data, batch_size=4, dtype=torch.float32)
    assert [b["t"].tolist() for b, _ in batches] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # ceil(10 / 4) even parts
    for b, y in batches:
        assert y is None and b["scale"] == 2.0 and b["mask"] is None
        assert b["x"].dtype == torch.float32 and b["t"].dtype == torch.int64  # integers are not cast
        np.testing.assert_allclose(b["x"].numpy(), x[b["t"].numpy()].astype(np.float32))
    labelled = as_batches(({"x": x, "t": t}, torch.arange(10) % 2), batch_size=4)
    assert [(b["t"].tolist(), y.tolist()) for b, y in labelled][2] == ([7, 8, 9], [1, 0, 1])
    assert isinstance(data["x"], np.ndarray)  # the caller's dict is not modified


def test_actgrad_takes_dict_and_labels_pairs_and_refuses_a_dict_without_labels():
    net, x, y = class_data()
    labels = (x[:, 0] > 0).long() + (y == 2).long()
    with pytest.raises(ValueError, match=r"method='actgrad' .* pass calibration batches as \(dict, labels\) pairs, "
                       r"e\.g\. \[\(\{'x': \.\.\., 'y': \.\.\.\}, labels\), \.\.\.\]"):
        nna.prune(net, dict_batches(x, y, key="y", size=20), keep=0.5, method="actgrad")
    pairs = [({"x": x[i:i + 20], "y": y[i:i + 20]}, labels[i:i + 20]) for i in range(0, 60, 20)]
    pruned, rep = nna.prune(net, pairs, keep=0.5, method="actgrad")
    packed = torch.cat([x, y[:, None].float()], 1)
    wrapped, rep_w = nna.prune(PackedClassConditional(net), [(packed[i:i + 20], labels[i:i + 20])
                                                             for i in range(0, 60, 20)], keep=0.5, method="actgrad")
    assert rep.labelled
    assert_same_pruning(rep, rep_w)


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_dict_batches_with_a_missing_or_unknown_input_are_refused_by_name(method):
    net, x, t = denoiser_data(32)
    with pytest.raises(ValueError, match=r"batch 0 of calibration_data gives no 't' \(keys \['x'\]\), an input of "
                       r"Denoiser.forward\(x, t\) without a default; add it to every batch"):
        nna.prune(net, [{"x": x}], keep=0.5, method=method)
    with pytest.raises(ValueError, match=r"takes no input named 'time'"):
        nna.prune(net, [{"x": x, "time": t}], keep=0.5, method=method)
    with pytest.raises(ValueError, match=r"batch 1 of calibration_data holds tensors of different numbers of samples "
                       r"\(\{'x': 16, 't': 15\}"):
        nna.prune(net, [{"x": x[:16], "t": t[:16]}, {"x": x[16:], "t": t[17:]}], keep=0.5, method=method)
    with pytest.raises(ValueError, match=r"batch 1 of calibration_data has the keys \['t', 'x'\] and batch 0 "
                       r"\['x', 't'\]"):
        nna.prune(net, [{"x": x[:16], "t": t[:16]}, {"t": t[16:], "x": x[16:]}], keep=0.5, method=method)
    with pytest.raises(ValueError, match="batch 1 of calibration_data is a tensor and batch 0 a dict"):
        nna.prune(net, [{"x": x[:16], "t": t[:16]}, x[16:]], keep=0.5, method=method)
    with pytest.raises(ValueError, match=r"input 't' is a list; .* Pass it as a tensor"):
        nna.prune(net, [{"x": x, "t": t.tolist()}], keep=0.5, method=method)


def test_a_tensor_batch_for_a_two_input_model_points_to_dict_batches():
    net, x, t = denoiser_data(32)
    for call in (lambda: nna.prune(net, x, keep=0.5), lambda: nna.find_pairs(net, x[:2])):
        with pytest.raises(ValueError, match=r"Denoiser.forward\(\) takes 2 inputs \(x, t\); .* Pass each batch as a "
                           r"dict of keyword inputs, called as model\(\*\*batch\): \[\{'x': x, 't': t\}, \.\.\.\]"):
            call()


def test_find_pairs_takes_a_dict_example_and_names_a_missing_input():
    """Placeholders are matched by name; a defaulted input not given keeps its default (scale), a given one is
    traced as an input; a required one not given is named."""
    net, x, y = class_data(8)
    pairs, skipped = nna.find_pairs(net, {"x": x[:2], "y": y[:2]})
    assert [(p.name, p.conditioning) for p in pairs] == [("fc1->fc2", ("proj",)), ("fc2->out", ())]
    with_scale, _ = nna.find_pairs(net, {"x": x[:2], "y": y[:2], "scale": 0.5})
    assert [p.name for p in with_scale] == [p.name for p in pairs]
    with pytest.raises(ValueError, match=r"ClassConditional.forward\(\) takes the input 'y', which the calibration "
                       r"batches \(keys \['x'\]\) do not give and has no default"):
        nna.find_pairs(net, {"x": x[:2]})


@pytest.mark.parametrize("method", ["layer", "asym"])
def test_a_given_defaulted_input_is_passed_to_every_stage(method):
    """scale=0.5 given in every dict reaches the model (its output is halved) in layer and staged runs alike."""
    net, x, y = class_data()
    batches = [dict(b, scale=0.5) for b in dict_batches(x, y, key="y", size=20)]
    pruned, _ = nna.prune(net, batches, keep=1.0, method=method)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, y, scale=0.5), net(x, y) * 0.5, rtol=1e-5, atol=1e-5)


def test_an_embedding_added_to_a_linear_is_a_conditioning_term():
    """An nn.Embedding's output added to fc1's features is a conditioning term (its columns follow fc1's units; see
    tests/test_nn_embedding_conditioning.py): found from a dict example, pruned from dict batches, and keeping
    every unit reproduces the network."""
    torch.manual_seed(0)
    net, x, y = EmbeddingAdded().eval(), torch.randn(40, FEATURES), torch.randint(0, CLASSES, (40,))
    pairs, _ = nna.find_pairs(net, {"x": x[:2], "y": y[:2]})
    assert [(p.name, p.conditioning) for p in pairs] == [("fc1->fc2", ("emb",))]
    kept_all, _ = nna.prune(net, {"x": x, "y": y}, keep=1.0)
    with torch.no_grad():
        torch.testing.assert_close(kept_all(x, y), net(x, y), rtol=1e-5, atol=1e-5)
    pruned, _ = nna.prune(net, {"x": x, "y": y}, keep=0.5)
    assert pruned.emb.embedding_dim == pruned.fc1.out_features == HIDDEN // 2


def test_flops_and_compare_methods_read_dict_batches():
    """count_flops on a dict counts every Linear and convolution of model(**batch) (the time embedding's too, as
    the wrapper's); compare_methods evaluates (dict, labels) batches and splits calibration subsets like the
    wrapper's."""
    net, x, t = denoiser_data(8)
    assert count_flops(net, {"x": x, "t": t}) == count_flops(PackedDenoiser(net), pack(x, t))
    expected = 2 * (3 * C * 9 * SIDE * SIDE + 2 * C + C * 3 * 9 * SIDE * SIDE)
    assert count_flops(net, {"x": x, "t": t}) == expected
    cnet, cx, cy = class_data(90)
    labels = (cx[:, 0] > 0).long()
    calib = [({"x": cx[i:i + 20], "y": cy[i:i + 20]}, labels[i:i + 20]) for i in range(0, 60, 20)]
    evals = [({"x": cx[60:], "y": cy[60:]}, labels[60:])]
    packed = torch.cat([cx, cy[:, None].float()], 1)
    calib_w = [(packed[i:i + 20], labels[i:i + 20]) for i in range(0, 60, 20)]
    methods = [("asym", "asym", True), ("actgrad", "actgrad", True)]
    kw = {"budgets": [0.5], "budget": "keep", "methods": methods, "calib_sizes": [30, 60], "verbose": False}
    res = compare_methods(cnet, calib, evals, **kw)
    res_w = compare_methods(PackedClassConditional(cnet), calib_w, [(packed[60:], labels[60:])], **kw)
    cols = ("n_calib", "label", "accuracy", "agreement", "params", "flops", "kept")
    assert [[r[c] for c in cols] for r in res["rows"]] == [[r[c] for c in cols] for r in res_w["rows"]]
    assert res["dense"]["flops"] == res_w["dense"]["flops"] > 0


def test_declared_pairs_are_checked_on_dict_batches():
    """pairs= with dict batches: the declared pair's checks run model(**batch) (every floating input moved for the
    check that the consumer reads the producer only), and a pair read through the conditioning term is refused."""
    net, x, y = class_data()
    batches = dict_batches(x, y, key="y", size=20)
    pruned, rep = nna.prune(net, batches, keep=0.5, method="layer", pairs=[nna.Pair("fc2", "out")])
    found, rep_found = nna.prune(net, batches, keep=0.5, method="layer")
    assert rep.layers[0].kept_units == rep_found.layers[1].kept_units
    with pytest.raises(ValueError, match="declared pair fc1->fc2: the consumer's input changes with the model's input"):
        nna.prune(net, batches, keep=0.5, method="layer", pairs=[nna.Pair("fc1", "fc2")])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_declared_pair_read_through_a_label_term_is_refused_even_when_the_checked_samples_share_a_label(dtype):
    """The check that the consumer reads the producer only moves integer inputs by rolling the samples; when every
    checked sample has the same label, rolling changed nothing, the term from the label went unseen, and pruning
    failed later with a shape mismatch instead of this refusal."""
    class FlagConditional(ClassConditional):  # a boolean flag selects one of two embeddings
        def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return super().forward(x, y.long(), scale)

    torch.manual_seed(0)
    x = torch.randn(40, FEATURES)
    net = (ClassConditional() if dtype == torch.int64 else FlagConditional()).eval()
    y = torch.full((40,), 2) if dtype == torch.int64 else torch.ones(40, dtype=torch.bool)
    with pytest.raises(ValueError, match="declared pair fc1->fc2: the consumer's input changes with the model's input"):
        nna.prune(net, [{"x": x, "y": y}], keep=0.5, method="layer", pairs=[nna.Pair("fc1", "fc2")])


def test_submod_prune_takes_a_user_function_whose_loaders_yield_dicts(tmp_path, monkeypatch, capsys):
    """`submod prune module:function` with (dict, labels) calibration and evaluation loaders prunes and evaluates
    the model with model(**batch)."""
    from submod.cli import main

    (tmp_path / "condmodels.py").write_text(
        "import torch\nfrom test_nn_multi_input import ClassConditional\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))\n"
        "    labels = (x[:, 0] > 0).long()\n"
        "    loader = [({'x': x[i:i + 40], 'y': y[i:i + 40]}, labels[i:i + 40]) for i in (0, 40)]\n"
        "    return ClassConditional().eval(), loader, loader\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["prune", "condmodels:build", "--keep", "0.5", "--method", "asym", "--out", "p.pt"]) == 0
    out = capsys.readouterr().out
    assert "method=asym" in out and "accuracy on the evaluation loader" in out
    pruned = nna.load_pruned(tmp_path / "p.pt", base_model=ClassConditional())
    assert pruned.fc1.out_features == pruned.proj.out_features == HIDDEN // 2
