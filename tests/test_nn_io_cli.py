"""Tests of saving/loading pruned models, the ``demo`` and ``prune`` subcommands, and the digits helpers."""

from __future__ import annotations

import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch
from _torch_helpers import MIXTRAL_USER_MODULE
from torch import nn

import nn_adapters as nna
from nn_adapters import cli, demo, digits, zoo

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submod")
    cli.register(p.add_subparsers(dest="command"))
    return p


def test_save_load_roundtrip_zoo_model(tmp_path):
    net = zoo.digits_cnn().eval()
    x = torch.randn(64, 1, 8, 8)
    pruned, _ = nna.prune(net, x, compression=4.0, method="asym")
    path = nna.save_pruned(pruned, tmp_path / "m.pt")
    back = nna.load_pruned(path)
    assert [tuple(p.shape) for p in back.parameters()] == [tuple(p.shape) for p in pruned.parameters()]
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))
    assert [f for f in os.listdir(tmp_path)] == ["m.pt"]  # no temporary file left behind


def test_save_load_custom_model_needs_base_model(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    base = Net().eval()
    pruned, _ = nna.prune(base, torch.randn(40, 3), keep=0.5, method="seq")
    path = nna.save_pruned(pruned, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="base_model"):
        nna.load_pruned(path)
    back = nna.load_pruned(path, base_model=base)
    assert back.a.out_features == 4 and base.a.out_features == 8  # base copied, not modified
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))


def test_save_load_with_layer_subclasses(tmp_path):
    # The spec names the base class (Conv2d); the check compared it with the subclass's own name and refused.
    class MyConv(torch.nn.Conv2d):
        pass

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(MyConv(1, 8, 3, padding=1), torch.nn.ReLU(), MyConv(8, 8, 3, padding=1),
                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 3)).eval()

    x = torch.randn(40, 1, 6, 6)
    pruned, _ = nna.prune(build(), x, keep=0.5, method="layer")
    path = nna.save_pruned(pruned, tmp_path / "m.pt")
    again = nna.load_pruned(path, base_model=build())
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_save_load_keeps_dtype_and_file_permissions(tmp_path):
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).double().eval()
    x = torch.randn(64, 10, dtype=torch.float64)
    pruned, _ = nna.prune(net, x, keep=0.5)
    path = nna.save_pruned(pruned, tmp_path / "m.pt")
    back = nna.load_pruned(path, base_model=net)
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # as a plain open() would create it, not 0600


def test_load_keeps_the_weight_ties_of_layers_that_pruning_left_alone(tmp_path):
    """A language model's output layer often shares the token embedding's weight (pruning refuses pairs that hold
    a tied parameter, so ties are among layers it leaves alone). load_pruned rebuilt every layer and loaded the
    state dict with assign=True, which gave the output layer a parameter of its own: the tie was lost."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(10, 6)
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc2(torch.relu(self.fc1(self.tok(ids).mean(1)))))

    torch.manual_seed(0)
    net, ids = Tied().eval(), torch.randint(0, 10, (64, 5))
    pruned, _ = nna.prune(net, ids, keep=0.5)
    back = nna.load_pruned(nna.save_pruned(pruned, tmp_path / "tied"), base_model=Tied())
    assert back.head.weight is back.tok.weight
    with torch.no_grad():
        torch.testing.assert_close(back(ids), pruned(ids), rtol=0, atol=0)


def test_load_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"spec": "{}", "state_dict": Evil()}, fh)
    with pytest.raises(ValueError, match="not a model saved"):
        nna.load_pruned(bad)


def test_cli_prune_user_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(80, 10); y = torch.randint(0, 3, (80,))\n"
        "    loader = [(x[:40], y[:40]), (x[40:], y[40:])]\n"
        "    return zoo.mlp(10, [16, 16], 3).eval(), loader, loader\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = _parser().parse_args(["prune", "mymodels:build", "--compression", "2", "--method", "seq",
                                 "--out", "p.pt"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "method=seq" in out and "accuracy on the evaluation loader" in out
    assert nna.load_pruned(tmp_path / "p.pt")[1].out_features < 16
    # the names the transformer path uses work here too
    args = _parser().parse_args(["prune", "mymodels:build", "--compression", "2", "--method", "magnitude",
                                 "--allocation", "error-curve", "--out", "m.pt"])
    assert args.func(args) == 0
    assert "method=weight_norm" in capsys.readouterr().out
    # --weighting reaches prune(): the report says it
    args = _parser().parse_args(["prune", "mymodels:build", "--keep", "0.5", "--weighting", "output",
                                 "--out", "w.pt"])
    assert args.func(args) == 0
    assert "weighting=output" in capsys.readouterr().out
    args = _parser().parse_args(["prune", "mymodels"])
    with pytest.raises(ValueError, match="module:function"):
        args.func(args)


def test_cli_prune_reports_user_code_problems_and_leaves_the_model_alone(tmp_path, monkeypatch, capsys):
    from submod.cli import main

    (tmp_path / "usermods.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "torch.manual_seed(0)\n"
        "X = torch.randn(80, 10); Y = torch.randint(0, 3, (80,))\n"
        "MODEL = zoo.mlp(10, [16, 16], 3).train()\n"
        "def raises():\n    raise RuntimeError('no data here')\n"
        "def not_a_model():\n    return 'model', X\n"
        "def one_shot():\n    return MODEL, X, ((X[i:i + 20], Y[i:i + 20]) for i in range(0, 80, 20))\n"
        "def bad_labels():\n    return MODEL, X, [(X[:20], Y[:10])]\n"
        "def bad_eval_inputs():\n    return MODEL, X, [(X[:20, :7], Y[:20])]\n")
    (tmp_path / "broken.py").write_text("raise KeyError('at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, match in (("usermods:raises", "RuntimeError: no data here"), ("usermods:not_a_model", "nn.Module"),
                        ("broken:build", "importing 'broken' failed"), ("usermods:bad_labels", "labels"),
                        ("usermods:bad_eval_inputs", "the model failed on a batch of the evaluation loader")):
        assert main(["prune", spec, "--keep", "0.5", "--out", "x.pt"]) == 2  # one line, no traceback
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and err.count("\n") == 1
    os.mkdir("adir")
    assert main(["prune", "usermods:one_shot", "--keep", "0.5", "--out", "adir"]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["prune", "usermods:one_shot", "--keep", "0.5", "--out", "afile/sub/m.pt"]) == 2  # before pruning
    assert "which is a file, not a directory" in capsys.readouterr().err
    # a generator as evaluation loader is read once and serves both accuracies; the user's model keeps its mode
    assert main(["prune", "usermods:one_shot", "--keep", "0.5", "--out", "p.pt"]) == 0
    assert "accuracy on the evaluation loader" in capsys.readouterr().out
    import usermods
    assert usermods.MODEL.training and all(m.training for m in usermods.MODEL.modules())
    assert [m.out_features for m in usermods.MODEL if isinstance(m, torch.nn.Linear)] == [16, 16, 3]


def test_cli_prune_refuses_a_negative_seed_before_calling_the_user_function(tmp_path, monkeypatch, capsys):
    """numpy refused seed=-1 only once the statistics were collected, with 'expected non-negative integer' (no
    option named)."""
    from submod.cli import main

    (tmp_path / "seedmods.py").write_text("def build():\n    raise AssertionError('called the user function')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["prune", "seedmods:build", "--seed", "-1", "--out", "p.pt"])
    assert exc.value.code == 2
    assert "argument --seed: must be a non-negative integer" in capsys.readouterr().err


def test_demo_refuses_bad_sizes_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "pretrained_digits_cnn", lambda retrain=False: pytest.fail("loaded the model"))
    for kwargs, match in (({"calib_sizes": (-5,)}, "calibration sizes"), ({"calib_sizes": (5000,)}, "1437"),
                          ({"calib_sizes": (0,)}, "calibration sizes"), ({"compressions": (0.5,)}, ">= 1"),
                          ({"compressions": ()}, "at least one"),
                          ({"compressions": (2, 4, 2.0)}, "compressions lists 2 more than once"),
                          ({"calib_sizes": (50, 50)}, "calib_sizes lists 50 more than once")):
        with pytest.raises(ValueError, match=match):
            demo.run_demo(tmp_path / "out", verbose=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_demo_says_when_its_output_directory_is_a_file(tmp_path, monkeypatch):
    """It failed with '[Errno 17] File exists' or '[Errno 20] Not a directory' (after the checks of the sizes)."""
    monkeypatch.setattr(demo, "pretrained_digits_cnn", lambda retrain=False: pytest.fail("loaded the model"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="'.*afile' is a file; pass a directory"):
        demo.run_demo(tmp_path / "afile", verbose=False)
    with pytest.raises(ValueError, match="lies under '.*afile', which is a file"):
        demo.run_demo(tmp_path / "afile" / "sub" / "out", verbose=False)


def test_demo_writes_table_plot_and_report(tmp_path, monkeypatch):
    """The demo pipeline end to end on an untrained net (training is covered by the slow test)."""
    net = zoo.digits_cnn().eval()
    monkeypatch.setattr(demo, "pretrained_digits_cnn", lambda retrain=False: (net, {"path": "-", "cached": True,
                                                                                     "train_time_s": 0.0}))
    res = demo.run_demo(tmp_path / "out", compressions=(2, 8), calib_sizes=(50,),
                        methods=[("asym", "asym", True), ("magnitude (no refit)", "weight_norm", False)],
                        verbose=False)
    assert len(res["rows"]) == 4
    assert all(r["achieved"] >= r["compression"] for r in res["rows"])
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["accuracy_vs_compression.png", "report.md", "results.json"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["label"] == "asym"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| magnitude (no refit) |" in report
    # per-layer error curves of the asym runs, and verification numbers labelled with their kind
    assert "## Per-layer reconstruction error, asym" in report and "| 8x | 3->8 |" in report
    assert "(proven upper bound)" in report and "(proven lower bound)" in report and "(estimate)" in report
    assert (tmp_path / "out" / "accuracy_vs_compression.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_leaves_out_an_unreachable_compression_and_says_so(tmp_path, monkeypatch):
    net = zoo.digits_cnn().eval()
    monkeypatch.setattr(demo, "pretrained_digits_cnn", lambda retrain=False: (net, {"path": "-", "cached": True,
                                                                                     "train_time_s": 0.0}))
    res = demo.run_demo(tmp_path / "out", compressions=(2, 10000), calib_sizes=(50,),
                        methods=[("asym", "asym", True)], verbose=False)
    assert [r["compression"] for r in res["rows"]] == [2.0]
    assert res["verified"]["compression"] == 2.0  # the largest compression reached
    assert res["skipped"][0][0] == "asym at 10000x" and "not reachable: at most" in res["skipped"][0][1]
    assert "Left out: asym at 10000x (not reachable" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="no compression of .* is reachable"):
        demo.run_demo(tmp_path / "out2", compressions=(10000,), calib_sizes=(50,),
                      methods=[("asym", "asym", True)], verbose=False)


def test_digits_split_is_fixed_and_stratified():
    Xtr, ytr, Xte, yte = digits.load_digits_split()
    assert Xtr.shape == (1437, 1, 8, 8) and Xte.shape == (360, 1, 8, 8)
    assert float(Xtr.min()) >= 0.0 and float(Xtr.max()) <= 1.0
    assert torch.bincount(yte).min() >= 35


def test_digits_folds_partition_the_data_and_are_stratified():
    from sklearn.datasets import load_digits

    d = load_digits()

    def rows(X, y):  # images with their label, as a sorted multiset of rows
        r = np.hstack([X.reshape(len(X), -1).numpy() * 16.0, y.numpy()[:, None]]).round().astype(int)
        return r[np.lexsort(r.T[::-1])]

    everything = rows(torch.from_numpy(d.images.astype(np.float32) / 16.0), torch.from_numpy(d.target))
    tests = []
    for f in range(5):
        Xtr, ytr, Xte, yte = digits.load_digits_fold(f)
        assert Xte.shape[1:] == (1, 8, 8) and float(Xte.max()) <= 1.0
        np.testing.assert_array_equal(rows(torch.cat([Xtr, Xte]), torch.cat([ytr, yte])), everything)
        counts = np.bincount(yte.numpy(), minlength=10)
        assert np.abs(counts - np.bincount(d.target) / 5).max() < 1  # stratified: a fifth of each class
        tests.append((Xte, yte))
    np.testing.assert_array_equal(rows(torch.cat([t[0] for t in tests]), torch.cat([t[1] for t in tests])),
                                  everything)  # the test parts partition the data set
    with pytest.raises(ValueError, match="fold must be"):
        digits.load_digits_fold(5)
    with pytest.raises(ValueError, match="n_folds"):
        digits.load_digits_fold(0, n_folds=1)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBMOD_CACHE_DIR", str(tmp_path))
    assert digits.cache_dir() == tmp_path


@pytest.mark.slow
def test_demo_full_with_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMOD_CACHE_DIR", str(tmp_path / "cache"))
    args = _parser().parse_args(["demo", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["dense"]["accuracy"] > 0.95
    assert res["total_time_s"] < 300
    asym16 = [r for r in res["rows"] if r["label"] == "asym" and r["compression"] == 16.0 and r["n_calib"] == 100]
    mag16 = [r for r in res["rows"] if r["label"] == "magnitude (no refit)" and r["compression"] == 16.0
             and r["n_calib"] == 100]
    assert asym16[0]["accuracy"] > mag16[0]["accuracy"] + 0.3
    assert os.listdir(tmp_path / "cache") == [f"digits_cnn-{digits._CACHE_VERSION}-seed0.pt"]


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_save_pruned_of_a_wrapped_model_loads_back(tmp_path, wrap):
    """torch.compile and nn.DataParallel prefix every name (_orig_mod., module.): the file must describe the
    wrapped model, which load_pruned rebuilds from the zoo and which computes what the pruned model computes."""
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    pruned, _ = nna.prune(zoo.mlp(10, [16, 16], 3).eval(), x, keep=0.5, method="layer")
    expected = pruned(x)  # before wrapping: on a machine with a GPU, nn.DataParallel moves the module to it
    wrapped = torch.compile(pruned) if wrap == "compile" else nn.DataParallel(pruned)
    back = nna.load_pruned(nna.save_pruned(wrapped, tmp_path / "p.pt"))
    assert [m.out_features for m in back if isinstance(m, nn.Linear)] == [8, 8, 3]
    assert next(back.parameters()).device.type == "cpu"
    torch.testing.assert_close(back(x), expected, rtol=0, atol=0)


def test_cli_prune_transformer_asks_for_keep_or_compression(tmp_path, monkeypatch, capsys):
    """Without --keep the CLI's default --compression 4 (an MLP/CNN's) must not be blamed on the user: a transformer
    is refused with --keep and --compression named (and no 'compression=' the user never passed); with --keep it
    prunes and saves; with --compression 1.2 it keeps the one fraction that reaches it."""
    from submod.cli import main

    (tmp_path / "tmods.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)\n"
        "    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()\n"
        "    return enc, [torch.randn(4, 6, 16) for _ in range(3)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["prune", "tmods:build", "--out", "t.pt"]) == 2
    err = capsys.readouterr().err
    assert "--keep" in err and "--compression 1.5" in err and "compression=" not in err and err.count("\n") == 1
    assert not (tmp_path / "t.pt").exists()
    assert main(["prune", "tmods:build", "--keep", "0.5", "--out", "t.pt"]) == 0
    import tmods
    back = nna.load_pruned(tmp_path / "t.pt", tmods.build()[0])
    assert [layer.linear1.out_features for layer in back.layers] == [16, 16]
    assert main(["prune", "tmods:build", "--compression", "1.2", "--out", "c.pt"]) == 0
    original = tmods.build()[0]
    back = nna.load_pruned(tmp_path / "c.pt", tmods.build()[0])
    ratio = sum(p.numel() for p in original.parameters()) / sum(p.numel() for p in back.parameters())
    assert ratio >= 1.2 and len({layer.linear1.out_features for layer in back.layers}) == 1


def test_cli_prune_target_chooses_the_transformer_blocks_or_the_layer_pairs(tmp_path, monkeypatch, capsys):
    """A hybrid (a convolutional stem, then a transformer block on its positions): by default its FFN neurons are
    pruned; with --target layers the layer pairs found by tracing (the stem's conv1 -> conv2), and --compression
    is accepted, also by --compare."""
    from submod.cli import main

    (tmp_path / "hmods.py").write_text(
        "import torch\n"
        "class Hybrid(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv1, self.conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, padding=1)\n"
        "        self.block = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)\n"
        "        self.head = torch.nn.Linear(16, 3)\n"
        "    def forward(self, x):\n"
        "        h = self.conv2(torch.relu(self.conv1(x))).flatten(2).transpose(1, 2)\n"
        "        return self.head(self.block(h).mean(1))\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Hybrid().eval(), [torch.randn(8, 3, 4, 4) for _ in range(3)]\n"
        "def build_eval():\n"
        "    model, calib = build()\n"
        "    return model, calib, [(torch.randn(16, 3, 4, 4), torch.randint(0, 3, (16,)))]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import hmods

    assert main(["prune", "hmods:build", "--keep", "0.5", "--out", "ffn.pt"]) == 0
    back = nna.load_pruned(tmp_path / "ffn.pt", hmods.build()[0])
    assert (back.block.linear1.out_features, back.conv1.out_channels) == (16, 8)
    assert main(["prune", "hmods:build", "--target", "layers", "--compression", "1.1", "--out", "layers.pt"]) == 0
    back = nna.load_pruned(tmp_path / "layers.pt", hmods.build()[0])
    assert back.block.linear1.out_features == 32 and back.conv1.out_channels < 8
    assert main(["prune", "hmods:build_eval", "--compare", "--target", "layers", "--compression", "1.1",
                 "--methods", "asym", "weight_norm", "--report-dir", "cmp"]) == 0
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"asym", "weight_norm"}
    assert all(r["compression"] == 1.1 and r["achieved"] >= 1.1 for r in rows)
    # without --target the FFN neurons are compared, per keep fraction
    assert main(["prune", "hmods:build_eval", "--compare", "--keep", "0.5", "--methods", "asym",
                 "--report-dir", "cmp_ffn"]) == 0
    rows = json.loads((tmp_path / "cmp_ffn" / "results.json").read_text())["rows"]
    assert [r["keep"] for r in rows] == [0.5]


def test_save_pruned_to_a_directory_or_under_a_file_is_refused_up_front(tmp_path):
    """save_pruned(model, existing_dir) wrote the whole model to a temporary file in the directory's parent and
    then failed in os.replace with IsADirectoryError naming that temporary file; under a file it raised
    FileExistsError. Both are ValueErrors that say what to pass, and nothing is left behind."""
    pruned, _ = nna.prune(zoo.mlp(8, [16], 2), torch.randn(64, 8), keep=0.5, method="layer")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ValueError, match=r"is a directory; pass a file name such as .*pruned_model\.pt"):
        nna.save_pruned(pruned, target)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="which is a file, not a directory"):
        nna.save_pruned(pruned, tmp_path / "afile" / "sub" / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out"] and not any(target.iterdir())
    nna.save_pruned(pruned, target / "m.pt")  # the name the message suggests works
    assert nna.load_pruned(target / "m.pt")[1].out_features == 8


def test_cli_accuracy_counts_each_prediction_once_whatever_the_label_shape():
    # the model returns its input as class scores, so its predictions are x.argmax(-1), counted here by hand
    model = nn.Identity()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # predicts 0, 1, 2, 0
    y = torch.tensor([0, 1, 0, 2])  # 2 of 4 right
    assert cli._eval_accuracy(model, [(x, y)]) == 0.5
    # labels as a column (N, 1): compared as (N,) against (N,) they would broadcast to (N, N) (4 of 16 pairs agree
    # here, "accuracy" 150%)
    assert cli._eval_accuracy(model, [(x, y[:, None])]) == 0.5
    # one prediction per token (N, T, classes): the accuracy is over the N * T predictions, not N samples
    tokens = torch.stack([x, x.flip(0)])  # (2, 4, 3): predictions [0, 1, 2, 0] and [0, 2, 1, 0]
    labels = torch.stack([y, y])  # right: 2 of 4, then 1 of 4
    assert cli._eval_accuracy(model, [(tokens, labels)]) == 3 / 8
    with pytest.raises(ValueError, match=r"labels of the evaluation loader have shape \(4, 3\)"):
        cli._eval_accuracy(model, [(x, x)])


def test_demo_runs_each_repeated_size_once_and_says_so(monkeypatch, capsys):
    """'--compressions 2 4 2' ran (and tabulated) compression 2 twice, and '--calib 50 50' every run twice."""
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw))
    args = _parser().parse_args(["demo", "--compressions", "2", "4", "2.0", "--calib", "50", "100", "50",
                                 "--threads", "1"])
    assert args.func(args) == 0
    assert seen["compressions"] == [2.0, 4.0] and seen["calib_sizes"] == [50, 100]
    err = capsys.readouterr().err
    assert "--compressions lists 2 more than once" in err and "--calib lists 50 more than once" in err


@pytest.mark.parametrize(("budget", "values", "column"), [("--compression", ["2", "3", "2"], "compression"),
                                                        ("--keep", ["0.5", "0.5"], "keep")])
def test_cli_compare_runs_each_repeated_budget_once(tmp_path, monkeypatch, capsys, budget, values, column):
    """prune --compare with a repeated budget wrote one row per occurrence: the table and results.json held the
    same (budget, method) twice."""
    (tmp_path / "dupmodels.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x, y = torch.randn(120, 10), torch.randint(0, 3, (120,))\n"
        "    return zoo.mlp(10, [16, 16], 3).eval(), [(x[:80], y[:80])], [(x[80:], y[80:])]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = _parser().parse_args(["prune", "dupmodels:build", "--compare", budget, *values, "--methods", "asym",
                                 "--calib", "40", "40", "--report-dir", "rep"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "rep" / "results.json").read_text())["rows"]
    keys = [(r[column], r["label"], r.get("n_calib")) for r in rows]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {float(v) for v in values}
    err = capsys.readouterr().err
    assert f"{budget} lists {values[0]} more than once" in err and "--calib lists 40 more than once" in err


_NUMPY_DICT_MODULE = '''
import numpy as np
import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, src, src_key_padding_mask=None):
        return self.head(self.encoder(src, src_key_padding_mask=src_key_padding_mask).mean(1))


def data():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6, 16)), rng.integers(0, 3, 40)  # float64, as numpy makes them
    mask = np.zeros((40, 6), dtype=bool)
    mask[::3, -2:] = True
    return x, y, mask


def build():
    torch.manual_seed(0)
    x, y, mask = data()
    calib = [{"src": x[:24], "src_key_padding_mask": mask[:24]}]
    evals = [({"src": x[24:32], "src_key_padding_mask": mask[24:32]}, y[24:32]),
             ({"src": x[32:], "src_key_padding_mask": mask[32:]}, y[32:])]
    return Classifier().eval(), calib, evals
'''


def test_cli_prune_evaluates_numpy_batches_as_it_calibrates_on_them(tmp_path, monkeypatch, capsys):
    """Numpy arrays inside dict batches (a tokenizer's return_tensors='np') were accepted as calibration data but
    reached the model as numpy in the evaluation loader: 'the model failed on a batch of the evaluation loader
    (TypeError: ... must be Tensor, not numpy.ndarray)'."""
    (tmp_path / "npdict_models.py").write_text(_NUMPY_DICT_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import npdict_models

    model, _, _ = npdict_models.build()
    x, y, mask = npdict_models.data()
    with torch.no_grad():  # the oracle: the unpruned model called on float32 tensors by hand
        pred = model(torch.tensor(x[24:], dtype=torch.float32), torch.tensor(mask[24:])).argmax(-1).numpy()
    expected = float(np.mean(pred == y[24:]))
    args = _parser().parse_args(["prune", "npdict_models:build", "--keep", "0.5", "--out", "p.pt"])
    assert args.func(args) == 0
    assert f"accuracy on the evaluation loader: {100 * expected:.2f}% ->" in capsys.readouterr().out
    args = _parser().parse_args(["prune", "npdict_models:build", "--compare", "--keep", "0.5", "--methods", "asym",
                                 "--report-dir", "rep"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["asym"]


def test_cli_prune_keeps_a_fraction_per_stage(tmp_path, monkeypatch, capsys):
    """--keep-stage heads=0.5 with --target all --keep 0.75: half of the heads and three quarters of the FFN neurons
    go in every block (the saved model's sizes); malformed, unknown or MLP stages are refused in one line."""
    from submod.cli import main

    (tmp_path / "smods.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)\n"
        "    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()\n"
        "    return enc, [torch.randn(4, 6, 16) for _ in range(3)]\n"
        "def mlp():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "    return net, [torch.randn(16, 4)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["prune", "smods:build", "--target", "all", "--keep", "0.75", "--keep-stage", "heads=0.5",
                 "--out", "sdir"]) == 0  # heads pruned: saved as a directory
    import smods

    from nn_adapters.transformer import load_pruned
    back = load_pruned(tmp_path / "sdir", smods.build()[0])
    assert [(layer.linear1.out_features, layer.self_attn.num_heads) for layer in back.layers] == [(24, 2), (24, 2)]
    capsys.readouterr()
    for bad in (["smods:build", "--keep-stage", "heads"], ["smods:build", "--keep-stage", "attn=0.5"],
                ["smods:build", "--keep-stage", "heads=0.5", "heads=0.25"], ["smods:mlp", "--keep-stage", "ffn=0.5"],
                ["smods:build", "--keep-stage", "heads=0.5"]):  # heads with the default target ffn
        assert main(["prune", *bad, "--out", "bad.pt"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--keep-stage" in err or "target='all'" in err), err
    assert not (tmp_path / "bad.pt").exists()


def test_cli_saves_pruned_heads_and_experts_as_a_directory_that_loads(tmp_path, monkeypatch, capsys):
    """A transformer whose heads or experts are pruned, or that holds a mixture of experts, is saved by
    nn_adapters.transformer.save_pruned (a directory, default ./pruned_model; a Hugging Face model loads from its
    config.json and computes what the pruned model computed), which the single-file format refuses up front; an
    --out that is a file is refused before pruning."""
    from nn_adapters.transformer import load_pruned
    from submod.cli import main

    (tmp_path / "moemods.py").write_text(MIXTRAL_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "taken").write_text("x")
    assert main(["prune", "moemods:build", "--target", "experts", "--keep", "0.5", "--out", "taken"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["prune", "moemods:build", "--target", "experts", "--keep", "0.5"]) == 0
    assert "transformer.load_pruned" in capsys.readouterr().out
    import moemods
    model, data = moemods.build()
    pruned, _ = nna.prune(model, data, keep=0.5, target="experts")
    back = load_pruned(tmp_path / "pruned_model")
    assert [layer.mlp.experts.down_proj.shape[0] for layer in back.model.layers] == [4, 4]
    with torch.no_grad():
        torch.testing.assert_close(back(data[0]["input_ids"]).logits, pruned(data[0]["input_ids"]).logits)
    with pytest.raises(ValueError, match="mixtures of experts .* nn_adapters.transformer.save_pruned"):
        nna.save_pruned(pruned, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
