"""Specification of GramAccumulator's torch storage (the device path of the pruning statistics).

The development machine has no GPU, so the torch storage is exercised on the CPU (``device="cpu"``), and the
nn_adapters device path is forced on CPU models through the private switch ``_DEVICE_PATH_ON_CPU``. Oracles: the
numpy storage (whose own tests check it against one-shot statistics and lstsq), explicitly centred rows, and the
numpy path of the pruning adapters.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import submod
from submod.sparse_regression import GramAccumulator, SparseRegression

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fill(acc: GramAccumulator, A: np.ndarray, Y: np.ndarray, w: np.ndarray | None, sizes: list[int],
         as_tensor: bool) -> GramAccumulator:
    """Feed ``A, Y`` (and weights) to ``acc`` in batches of ``sizes`` rows, as tensors or numpy arrays."""
    conv = (lambda x: torch.as_tensor(x)) if as_tensor else (lambda x: x)
    lo = 0
    for s in sizes:
        acc.update(conv(A[lo:lo + s]), conv(Y[lo:lo + s]), None if w is None else conv(w[lo:lo + s]))
        lo += s
    assert lo == len(A)
    return acc


def assert_same_statistics(a: GramAccumulator, b: GramAccumulator, rtol: float = 1e-12) -> None:
    """Every read-out of ``a`` and ``b`` agrees to ``rtol`` relative to the largest entry."""
    assert (a.count, a.n_features, a.n_targets) == (b.count, b.n_features, b.n_targets)
    assert b.weight_sum == pytest.approx(a.weight_sum, rel=rtol)
    for centered in (False, True):
        for x, y in ((a.gram(centered), b.gram(centered)), (a.cross(centered), b.cross(centered)),
                     (a.gram_diagonal(centered), b.gram_diagonal(centered))):
            assert y.dtype == np.float64 and isinstance(y, np.ndarray)
            np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(np.abs(x).max(), 1e-300))
        assert b.y_norm2(centered) == pytest.approx(a.y_norm2(centered), rel=rtol)
    for x, y in ((a.mean_a, b.mean_a), (a.mean_y, b.mean_y)):
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(np.abs(x).max(), 1e-300))


SIZES = {
    "one batch": [300],
    "many small batches": [1, 2, 3] * 20 + [180],
    "empty batches": [0, 100, 0, 0, 150, 50, 0],
}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("as_tensor", [True, False])
def test_torch_storage_equals_numpy_storage(weighted, sizes, as_tensor):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 7)) * np.arange(1, 8) + 3.0
    Y = A[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((300, 4)) - 2.0
    w = rng.uniform(0.0, 2.0, 300) if weighted else None
    ref = fill(GramAccumulator(7, 4), A, Y, w, SIZES[sizes], False)
    got = fill(GramAccumulator(7, 4, device="cpu"), A, Y, w, SIZES[sizes], as_tensor)
    assert got.device == torch.device("cpu") and ref.device is None
    assert_same_statistics(ref, got)


def test_torch_storage_takes_any_float_dtype_and_accumulates_in_float64():
    rng = np.random.default_rng(1)
    A, Y = rng.standard_normal((200, 5)).astype(np.float32), rng.standard_normal((200, 2)).astype(np.float32)
    ref = fill(GramAccumulator(5, 2), A, Y, None, [64, 64, 72], False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        acc = GramAccumulator(5, 2, device="cpu")
        for lo in range(0, 200, 64):
            acc.update(torch.as_tensor(A[lo:lo + 64]).to(dtype), torch.as_tensor(Y[lo:lo + 64]).to(dtype))
        a64 = torch.as_tensor(A).to(dtype).double().numpy()
        np.testing.assert_allclose(acc.gram(), a64.T @ a64, rtol=1e-12)
        if dtype == torch.float32:
            assert_same_statistics(ref, acc)


def test_zero_weight_batches_count_rows_but_change_nothing():
    rng = np.random.default_rng(2)
    A, Y = rng.standard_normal((90, 4)), rng.standard_normal((90, 2))
    w = rng.uniform(0.5, 1.5, 90)
    w[30:60] = 0.0                                    # a whole batch of weight zero
    accs = [fill(GramAccumulator(4, 2, device=dev), A, Y, w, [30, 30, 30], dev is not None)
            for dev in (None, "cpu")]
    assert accs[1].count == 90
    assert_same_statistics(*accs)
    only_zero = GramAccumulator(4, 2, device="cpu")
    only_zero.update(torch.as_tensor(A[:5]), torch.as_tensor(Y[:5]), torch.zeros(5))
    assert only_zero.count == 5 and only_zero.weight_sum == 0.0
    with pytest.raises(ValueError, match="positive weight"):
        only_zero.to_objective()


def test_large_means_keep_the_centred_statistics_exact_on_both_storages():
    """The stability case: mean 1e8, spread 1 (raw sums lose every digit of the centred Gram matrix)."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((3000, 3)) + 1e8
    Y = A[:, :2] - 1e8 + 0.1 * rng.standard_normal((3000, 2))
    sizes = [128] * 23 + [56]
    Ac, Yc = A - A.mean(0), Y - Y.mean(0)
    scale = float(np.abs(Ac.T @ Ac).max())
    for acc in (fill(GramAccumulator(3, 2), A, Y, None, sizes, False),
                fill(GramAccumulator(3, 2, device="cpu"), A, Y, None, sizes, True)):
        np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, rtol=0, atol=1e-8 * scale)
        np.testing.assert_allclose(acc.cross(centered=True), Ac.T @ Yc, rtol=0, atol=1e-8 * scale)
        assert acc.to_objective(fit_intercept=True).value([0, 1]) == pytest.approx(
            SparseRegression(Ac, Yc).value([0, 1]), rel=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
def test_merge_across_storages(weighted):
    rng = np.random.default_rng(3)
    A, Y = rng.standard_normal((240, 6)) + 5.0, rng.standard_normal((240, 3))
    w = rng.uniform(0.0, 2.0, 240) if weighted else None
    whole = fill(GramAccumulator(6, 3), A, Y, w, [240], False)
    parts = {}
    for name, dev, rows in (("np", None, slice(0, 80)), ("t1", "cpu", slice(80, 160)), ("t2", "cpu", slice(160, 240))):
        parts[name] = fill(GramAccumulator(6, 3, device=dev), A[rows], Y[rows], None if w is None else w[rows],
                           [80], dev is not None)
    into_numpy = copy.deepcopy(parts["np"])
    into_numpy.merge(parts["t1"])
    into_numpy.merge(parts["t2"])
    into_torch = copy.deepcopy(parts["t1"])
    into_torch.merge(parts["np"])
    into_torch.merge(parts["t2"])
    assert into_numpy.device is None and into_torch.device == torch.device("cpu")
    assert_same_statistics(whole, into_numpy)
    assert_same_statistics(whole, into_torch)
    empty = GramAccumulator(6, 3, device="cpu")
    empty.merge(GramAccumulator(6, 3))              # nothing seen: a no-op
    empty.merge(parts["np"])                        # into an empty torch accumulator
    assert_same_statistics(parts["np"], empty)


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_objectives_and_greedy_selections_agree(fit_intercept):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12)) + 1.0
    Y = A @ rng.standard_normal((12, 3)) + rng.standard_normal((400, 3))
    w = rng.uniform(0.2, 1.0, 400)
    for weights in (None, w):
        ref = fill(GramAccumulator(12, 3), A, Y, weights, [100] * 4, False)
        got = fill(GramAccumulator(12, 3, device="cpu"), A, Y, weights, [50] * 8, True)
        for kwargs in ({}, {"ridge": 0.5, "groups": 3}):
            f, g = (acc.to_objective(fit_intercept=fit_intercept, **kwargs) for acc in (ref, got))
            for S in ([0], [1, 2], list(range(f.n))):
                assert g.value(S) == pytest.approx(f.value(S), rel=1e-10)
            rf, rg = submod.maximize(f, f.n // 2), submod.maximize(g, g.n // 2)
            assert rf.selected.tolist() == rg.selected.tolist()
            np.testing.assert_allclose(rg.values, rf.values, rtol=1e-10)
            Mf, bf = f.refit(rf.selected)
            Mg, bg = g.refit(rg.selected)
            np.testing.assert_allclose(Mg, Mf, rtol=1e-8, atol=1e-10)


def _bad_batches():
    nan_a = np.ones((4, 3))
    nan_a[1, 2] = np.nan
    inf_y = np.ones((4, 2))
    inf_y[:2, 0] = np.inf
    return {
        "A not 2-D": (np.ones(3), np.ones((3, 2)), None),
        "A 3-D": (np.ones((4, 3, 1)), np.ones((4, 2)), None),
        "Y 3-D": (np.ones((4, 3)), np.ones((4, 2, 1)), None),
        "wrong n_features": (np.ones((4, 2)), np.ones((4, 2)), None),
        "wrong n_targets": (np.ones((4, 3)), np.ones((4, 1)), None),
        "rows differ": (np.ones((4, 3)), np.ones((3, 2)), None),
        "NaN in A": (nan_a, np.ones((4, 2)), None),
        "inf in Y": (np.ones((4, 3)), inf_y, None),
        "NaN in A and Y 3-D": (nan_a, np.ones((4, 2, 1)), None),     # the first error wins on both storages
        "inf in Y and wrong n_features": (np.ones((4, 2)), inf_y, None),
        "complex A": (np.ones((4, 3)) * 1j, np.ones((4, 2)), None),
        "weights too short": (np.ones((4, 3)), np.ones((4, 2)), np.ones(3)),
        "weights 2-D": (np.ones((4, 3)), np.ones((4, 2)), np.ones((4, 1))),
        "negative weight": (np.ones((4, 3)), np.ones((4, 2)), np.array([1.0, -1.0, 1.0, 1.0])),
        "NaN weight": (np.ones((4, 3)), np.ones((4, 2)), np.array([1.0, np.nan, 1.0, 1.0])),
        "NaN weight and NaN in A": (nan_a, np.ones((4, 2)), np.array([1.0, np.nan, 1.0, 1.0])),
    }


@pytest.mark.parametrize("case", sorted(_bad_batches()))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_errors_are_identical_on_both_storages(case, as_tensor):
    A, Y, w = _bad_batches()[case]
    with pytest.raises(ValueError) as want:
        GramAccumulator(3, 2).update(A, Y, w)
    conv = (lambda x: None if x is None else torch.as_tensor(x)) if as_tensor else (lambda x: x)
    acc = GramAccumulator(3, 2, device="cpu")
    with pytest.raises(ValueError) as got:
        acc.update(conv(A), conv(Y), conv(w))
    assert str(got.value) == str(want.value)
    assert acc.count == 0 and acc.weight_sum == 0.0


def test_bad_devices_are_clear_errors():
    with pytest.raises(ValueError, match="not a torch device"):
        GramAccumulator(3, 1, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot keep the statistics on device cuda"):
            GramAccumulator(3, 1, device="cuda")


def test_read_outs_are_numpy_and_cached_until_the_next_change(monkeypatch):
    from submod import _gram_torch
    transfers = []
    real = _gram_torch.to_host
    monkeypatch.setattr(_gram_torch, "to_host", lambda t: transfers.append(1) or real(t))
    rng = np.random.default_rng(6)
    acc = GramAccumulator(4, 2, device="cpu")
    acc.update(torch.as_tensor(rng.standard_normal((20, 4))), torch.as_tensor(rng.standard_normal((20, 2))))
    for _ in range(3):
        acc.gram(), acc.cross(True), acc.y_norm2(), acc.mean_a, acc.to_objective(fit_intercept=True)
    assert len(transfers) == 4                       # means, Gram, cross term: once each
    with pytest.raises(ValueError):                  # the cached host copy cannot be changed by a caller
        acc.mean_a[0] = 1.0
    acc.update(torch.ones(3, 4), torch.ones(3, 2))
    acc.gram()
    assert len(transfers) == 8
    assert repr(acc) == "GramAccumulator(n_features=4, n_targets=2, count=23, device='cpu')"


def test_deepcopy_keeps_the_device_and_pickle_gives_numpy_storage():
    rng = np.random.default_rng(7)
    A, Y = rng.standard_normal((60, 4)), rng.standard_normal((60, 2))
    acc = fill(GramAccumulator(4, 2, device="cpu"), A[:40], Y[:40], None, [40], True)
    dup = copy.deepcopy(acc)
    assert dup.device == acc.device and dup._caa is not acc._caa
    loaded = pickle.loads(pickle.dumps(acc))
    assert loaded.device is None and isinstance(loaded._caa, np.ndarray) and loaded._caa.flags.writeable
    assert_same_statistics(acc, dup, rtol=0)
    assert_same_statistics(acc, loaded, rtol=0)
    for other in (dup, loaded, acc):                 # the copies are independent and keep working
        other.update(A[40:], Y[40:])
    assert_same_statistics(acc, dup)
    assert_same_statistics(acc, loaded)
    numpy_acc = fill(GramAccumulator(4, 2), A, Y, None, [60], False)
    assert_same_statistics(numpy_acc, pickle.loads(pickle.dumps(numpy_acc)), rtol=0)


def test_device_none_adopts_the_first_non_cpu_batch_device(monkeypatch):
    """No GPU here: a CPU tensor stands in for a GPU one by making the detection report its device."""
    from submod import _gram_torch
    meta = torch.empty(2, 3, device="meta")
    assert _gram_torch.non_cpu_device(np.ones(2), torch.ones(2), meta) == torch.device("meta")
    assert _gram_torch.non_cpu_device(np.ones(2), torch.ones(2), None) is None
    rng = np.random.default_rng(8)
    A, Y = rng.standard_normal((50, 3)), rng.standard_normal((50, 2))
    acc = GramAccumulator(3, 2)
    acc.update(torch.as_tensor(A[:20]), torch.as_tensor(Y[:20]))   # CPU tensors: numpy storage stays
    assert acc.device is None
    monkeypatch.setattr(_gram_torch, "non_cpu_device", lambda *xs: torch.device("cpu"))
    acc.update(torch.as_tensor(A[20:]), Y[20:])                     # "a GPU batch": the statistics move
    assert acc.device == torch.device("cpu") and isinstance(acc._caa, torch.Tensor)
    assert_same_statistics(fill(GramAccumulator(3, 2), A, Y, None, [20, 30], False), acc)


def test_numpy_storage_does_not_import_torch():
    code = ("import sys, numpy as np, submod, verification\n"
            "acc = submod.GramAccumulator(3, 1)\n"
            "acc.update(np.ones((4, 3)) + np.arange(3), np.arange(4.0), sample_weight=np.ones(4))\n"
            "other = submod.GramAccumulator(3, 1)\n"
            "other.update(np.eye(3), np.ones(3))\n"
            "acc.merge(other)\n"
            "acc.to_objective(fit_intercept=True, ridge=0.1).value([0])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------- nn_adapters
def test_update_folds_equals_per_fold_numpy_updates():
    from nn_adapters._stats import update_folds
    rng = np.random.default_rng(9)
    A, Y = rng.standard_normal((101, 5)) + 2.0, rng.standard_normal((101, 3))
    w = rng.uniform(0.0, 1.0, 101)
    fold = rng.integers(0, 4, 101)
    fold[fold == 2] = 1                                             # fold 2 gets no rows
    for weights in (None, w):
        ref = [GramAccumulator(5, 3) for _ in range(4)]
        for h, acc in enumerate(ref):
            sel = fold == h
            if sel.any():
                acc.update(A[sel], Y[sel], None if weights is None else weights[sel])
        got = [GramAccumulator(5, 3, device="cpu") for _ in range(4)]
        update_folds(got, torch.as_tensor(A), torch.as_tensor(Y),
                     None if weights is None else torch.as_tensor(weights), torch.as_tensor(fold))
        assert got[2].count == 0
        for r, g in zip(ref, got, strict=True):
            if r.count:
                assert_same_statistics(r, g)


def test_update_folds_errors():
    from nn_adapters._stats import update_folds
    accs = [GramAccumulator(2, 1, device="cpu") for _ in range(2)]
    a, y, fold = torch.ones(4, 2), torch.ones(4, 1), torch.tensor([0, 1, 0, 1])
    bad = a.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="^my message$"):
        update_folds(accs, bad, y, None, fold, nonfinite="my message")
    with pytest.raises(ValueError) as want:                          # the numpy path's per-fold error
        GramAccumulator(2, 1).update(bad[fold == 1].numpy(), y[fold == 1].numpy())
    with pytest.raises(ValueError) as got:
        update_folds(accs, bad, y, None, fold)
    assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="non-negative"):
        update_folds(accs, a, y, torch.tensor([1.0, -1.0, 1.0, 1.0]), fold)
    assert all(acc.count == 0 for acc in accs)
    big = torch.full((4, 2), 1e308, dtype=torch.float64)             # a sum overflows, every entry is finite
    update_folds(accs, big, y, None, fold)
    assert [acc.count for acc in accs] == [2, 2]


@pytest.fixture
def device_path(monkeypatch):
    """Send the statistics of CPU models through the device path (torch storage on the CPU); count its uses."""
    import nn_adapters._stats as stats
    import nn_adapters.transformer as tr
    calls = []
    real = stats.update_folds

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "update_folds", spy)
    monkeypatch.setattr(tr, "_update_folds", spy)
    monkeypatch.setattr(stats, "_DEVICE_PATH_ON_CPU", True)
    return calls


def _same_pruning(ref, got, rep_ref, rep_got, units: str) -> None:
    assert [getattr(r, units) for r in rep_ref] == [getattr(r, units) for r in rep_got]
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    assert sd_ref.keys() == sd_got.keys()
    for k in sd_ref:
        assert sd_got[k].shape == sd_ref[k].shape, k
        if sd_ref[k].is_floating_point():
            torch.testing.assert_close(sd_got[k], sd_ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_cnn_pruning_on_the_device_path_equals_the_numpy_path(method, request):
    from _torch_helpers import randomise_bn

    import nn_adapters as nna
    from nn_adapters import zoo
    net = randomise_bn(zoo.digits_cnn(channels=(6, 8), hidden=16))
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref, rep_ref = nna.prune(net, [x[:25], x[25:]], keep=0.5, method=method, ridge="cv")
    calls = request.getfixturevalue("device_path")
    got, rep_got = nna.prune(net, [x[:25], x[25:]], keep=0.5, method=method, ridge="cv")
    assert calls, "the device path was not taken"
    _same_pruning(ref, got, rep_ref.layers, rep_got.layers, "kept_units")
    for r, g in zip(rep_ref.layers, rep_got.layers, strict=True):
        assert g.ridge == r.ridge
        assert g.relative_error == pytest.approx(r.relative_error, rel=1e-6, abs=1e-12)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("name", ["2-D autoencoder", "1-D autoencoder"])
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_transposed_convolutions_on_the_device_path_equal_the_numpy_path(name, method, request):
    """Transposed consumers unfold their zero-stuffed input with torch on the device path: the same statistics."""
    from test_nn_conv_transpose import MODELS

    import nn_adapters as nna
    build, shape, _ = MODELS[name]
    net, x = build(), torch.rand(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, rep_ref = nna.prune(net, [x[:70], x[70:]], keep=0.5, method=method, ridge="cv")
    calls = request.getfixturevalue("device_path")
    got, rep_got = nna.prune(net, [x[:70], x[70:]], keep=0.5, method=method, ridge="cv")
    assert calls, "the device path was not taken"
    _same_pruning(ref, got, rep_ref.layers, rep_got.layers, "kept_units")


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=32, initializer_range=0.3)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _token_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 40, (6, 10), generator=g)
        lengths = torch.randint(3, 11, (6,), generator=g)
        mask = (torch.arange(10).view(1, -1) < lengths.view(-1, 1)).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("target", ["ffn", "heads"])
def test_transformer_pruning_on_the_device_path_equals_the_numpy_path(method, target, request):
    import nn_adapters as nna
    model, data = _tiny_bert(), _token_batches()
    ref, rep_ref = nna.prune(model, data, keep=0.5, target=target, method=method, ridge="cv")
    calls = request.getfixturevalue("device_path")
    got, rep_got = nna.prune(model, data, keep=0.5, target=target, method=method, ridge="cv")
    assert calls, "the device path was not taken"
    _same_pruning(ref, got, rep_ref.units, rep_got.units, "kept")
    for r, g in zip(rep_ref.units, rep_got.units, strict=True):
        assert g.ridge == r.ridge
        assert g.relative_error == pytest.approx(r.relative_error, rel=1e-6, abs=1e-12)


@pytest.mark.usefixtures("torch_one_thread")
def test_wanda_scores_on_the_device_path(request):
    import nn_adapters as nna
    model, data = _tiny_bert(), _token_batches()
    ref, rep_ref = nna.prune(model, data, keep=0.5, method="wanda", reweight=False)
    request.getfixturevalue("device_path")
    got, rep_got = nna.prune(model, data, keep=0.5, method="wanda", reweight=False)
    _same_pruning(ref, got, rep_ref.units, rep_got.units, "kept")


@pytest.mark.usefixtures("torch_one_thread")
def test_cpu_models_keep_numpy_statistics(monkeypatch):
    """No silent switch: on a CPU model no accumulator takes torch storage (nor adopts a device)."""
    import nn_adapters as nna
    from nn_adapters import zoo
    from nn_adapters._stats import PairStats, stats_device
    from nn_adapters.pairs import find_pairs

    moved = []
    real = GramAccumulator._move_to
    monkeypatch.setattr(GramAccumulator, "_move_to", lambda self, dev: moved.append(dev) or real(self, dev))
    net = zoo.mlp(12, [24, 16], 4).eval()
    x = torch.randn(80, 12)
    nna.prune(net, x, keep=0.5, method="asym", ridge="cv")
    nna.prune(_tiny_bert(), _token_batches(), keep=0.5, method="asym", ridge="cv")
    assert moved == []
    assert stats_device(torch.device("cpu")) is None
    pair = find_pairs(net, x[:2])[0][0]
    st = PairStats(pair, net.get_submodule(pair.consumer), folds=5)
    st.update(torch.randn(30, pair.n_units))
    assert st.device is None and all(isinstance(a._caa, np.ndarray) for a in st.fold_accs + [st.acc])


# --------------------------------------------------------------------------------------------- on a real GPU
# These run only where CUDA is available (the development machine has none): the same checks as above, with the
# model and the statistics really on the GPU, against the numpy path of the same model on the CPU.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_storage_equals_numpy_storage(weighted):
    rng = np.random.default_rng(5)
    A, Y = 3.0 + rng.standard_normal((700, 9)), rng.standard_normal((700, 2))
    w = rng.random(700) if weighted else None
    ref, got = GramAccumulator(9, 2), GramAccumulator(9, 2)
    for lo in range(0, 700, 128):
        sw = None if w is None else w[lo:lo + 128]
        ref.update(A[lo:lo + 128], Y[lo:lo + 128], sw)
        got.update(torch.as_tensor(A[lo:lo + 128], device="cuda"), torch.as_tensor(Y[lo:lo + 128], device="cuda"),
                   None if sw is None else torch.as_tensor(sw, device="cuda"))
    assert got.device is not None and got.device.type == "cuda"  # adopted from the first batch
    assert_same_statistics(ref, got)


@cuda
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_cnn_pruned_on_the_gpu_equals_the_cpu_pruning(method):
    from _torch_helpers import randomise_bn

    import nn_adapters as nna
    from nn_adapters import zoo
    net = randomise_bn(zoo.digits_cnn(channels=(6, 8), hidden=16)).double()  # float64: GPU and CPU kernels agree
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, rep_ref = nna.prune(net, [x[:25], x[25:]], keep=0.5, method=method, ridge="cv")
    got, rep_got = nna.prune(net.cuda(), [x[:25].cuda(), x[25:].cuda()], keep=0.5, method=method, ridge="cv")
    assert next(got.parameters()).device.type == "cuda"
    _same_pruning(ref, got.cpu(), rep_ref.layers, rep_got.layers, "kept_units")


@cuda
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_autoencoder_with_transposed_convolutions_pruned_on_the_gpu_equals_the_cpu_pruning(method):
    from test_nn_conv_transpose import MODELS

    import nn_adapters as nna
    build, shape, _ = MODELS["2-D autoencoder"]
    net, x = build(), torch.rand(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, rep_ref = nna.prune(net, [x[:70], x[70:]], keep=0.5, method=method, ridge="cv")
    got, rep_got = nna.prune(net.cuda(), [x[:70].cuda(), x[70:].cuda()], keep=0.5, method=method, ridge="cv")
    assert next(got.parameters()).device.type == "cuda"
    _same_pruning(ref, got.cpu(), rep_ref.layers, rep_got.layers, "kept_units")


@cuda
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_bert_pruned_on_the_gpu_equals_the_cpu_pruning(method):
    import nn_adapters as nna
    model, data = _tiny_bert().double(), _token_batches()
    ref, rep_ref = nna.prune(model, data, keep=0.5, target="all", method=method, ridge="cv")
    gpu_data = [{k: v.cuda() for k, v in b.items()} for b in data]
    got, rep_got = nna.prune(model.cuda(), gpu_data, keep=0.5, target="all", method=method, ridge="cv")
    _same_pruning(ref, got.cpu(), rep_ref.units, rep_got.units, "kept")
