"""``submod prune MODULE:FUNCTION --compare`` and ``nn_adapters.compare``: every method at every budget on a user's
model, with a table, a plot and a report (what ``submod demo`` does for the digits CNN)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _torch_helpers import user_module
from torch import nn

import nn_adapters as nna
from nn_adapters import cli, zoo
from nn_adapters.compare import compare_methods, write_comparison


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submod")
    cli.register(p.add_subparsers(dest="command"))
    return p


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 10, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1.5).long()) % 3  # learnable enough that accuracies differ from chance
    return x, y


def _net():
    torch.manual_seed(0)
    net = zoo.mlp(10, [24, 16], 3)
    x, y = _data(1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def test_every_row_is_the_pruning_it_names_measured_independently():
    net, (x, y) = _net(), _data(2)
    calib, evals = [(x[:100], y[:100])], [(x[100:150], y[100:150]), (x[150:], y[150:])]
    methods = [("asym", "asym", True), ("random+refit", "random", True), ("magnitude (no refit)", "weight_norm",
                                                                           False)]
    res = compare_methods(net, calib, evals, budgets=[2, 4], methods=methods, seed=3, verbose=False)
    assert [(r["compression"], r["label"]) for r in res["rows"]] == [(c, m[0]) for c in (2.0, 4.0) for m in methods]
    with torch.no_grad():
        base = net(x[100:]).argmax(1)
    assert res["dense"]["accuracy"] == pytest.approx(float((base == y[100:]).double().mean()))
    for r in res["rows"]:
        pruned, rep = nna.prune(net, calib, compression=r["compression"], method=r["method"],
                                reweight=r["reweight"], seed=3)
        with torch.no_grad():
            pred = pruned(x[100:]).argmax(1)
        assert r["accuracy"] == pytest.approx(float((pred == y[100:]).double().mean()))
        assert r["agreement"] == pytest.approx(float((pred == base).double().mean()))
        assert r["params"] == sum(p.numel() for p in pruned.parameters()) == rep.params_after
        assert r["achieved"] >= r["compression"]
        assert r["kept"] == [lr.kept for lr in rep.layers]
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [24, 16, 3]  # untouched


def test_calibration_sizes_prune_from_the_first_samples():
    net, (x, y) = _net(), _data(2)
    calib, evals = [(x[:50], y[:50]), (x[50:100], y[50:100])], [(x[100:], y[100:])]
    methods = [("asym", "asym", True), ("random+refit", "random", True)]
    res = compare_methods(net, calib, evals, budgets=[3], methods=methods, calib_sizes=[70, 20], verbose=False)
    assert [(r["n_calib"], r["label"]) for r in res["rows"]] == [(n, m[0]) for n in (20, 70) for m in methods]
    for n in (20, 70):  # the same as a run given only the first n samples
        alone = compare_methods(net, (x[:n], y[:n]), evals, budgets=[3], methods=methods, verbose=False)
        for r, a in zip([r for r in res["rows"] if r["n_calib"] == n], alone["rows"], strict=True):
            assert (r["accuracy"], r["agreement"], r["kept"]) == (a["accuracy"], a["agreement"], a["kept"])
            assert a["n_calib"] == n
    with pytest.raises(ValueError, match="integers from 1 to 100"):
        compare_methods(net, calib, evals, budgets=[3], methods=methods, calib_sizes=[0], verbose=False)


def test_unlabeled_calibration_leaves_out_the_labelled_baseline():
    net, (x, y) = _net(), _data(2)
    res = compare_methods(net, x[:100], [(x[100:], y[100:])], budgets=[2], verbose=False)
    assert "actgrad" not in {r["method"] for r in res["rows"]}
    assert res["skipped"] == [("actgrad", "the calibration batches have no labels")]
    assert {"asym", "seq", "layer", "random", "weight_norm", "act_norm"} <= {r["method"] for r in res["rows"]}


class _EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_a_transformer_is_compared_over_keep_fractions():
    torch.manual_seed(0)
    model = _EncoderClassifier().eval()
    x = torch.randn(40, 6, 16)
    y = torch.randint(0, 3, (40,))
    res = compare_methods(model, [x[:24]], [(x[24:], y[24:])], budgets=[0.5], budget="keep",
                          methods=[("asym", "asym", True), ("magnitude (no refit)", "magnitude", False)],
                          verbose=False)
    assert [r["label"] for r in res["rows"]] == ["asym", "magnitude (no refit)"]
    assert all(r["kept"] == [16, 16] and r["flops"] is None for r in res["rows"])  # 32 FFN neurons per block


def test_a_transformer_is_compared_over_compressions():
    """Each compression prunes the one fraction of the FFN neurons kept in every block that reaches it (the rows'
    parameters counted from the pruned models); one out of reach is left out with the largest reachable; a
    transformer's compression must exceed 1."""
    torch.manual_seed(0)
    model = _EncoderClassifier().eval()
    x = torch.randn(40, 6, 16)
    y = torch.randint(0, 3, (40,))
    dense = sum(p.numel() for p in model.parameters())
    res = compare_methods(model, [x[:24]], [(x[24:], y[24:])], budgets=[1.1, 1.3, 5.0],
                          methods=[("asym", "asym", True), ("magnitude (no refit)", "magnitude", False)],
                          verbose=False)
    assert [(r["compression"], r["label"]) for r in res["rows"]] == [
        (c, m) for c in (1.1, 1.3) for m in ("asym", "magnitude (no refit)")]
    for r in res["rows"]:
        assert dense / r["params"] >= r["compression"] and len(set(r["kept"])) == 1
        # one neuron more in every block would miss it (each neuron: a row of linear1 with its bias, a column of
        # linear2)
        assert dense / (r["params"] + 2 * (16 + 1 + 16)) < r["compression"]
    assert [why.startswith("not reachable: at most") for _, why in res["skipped"]] == [True, True]
    with pytest.raises(ValueError, match=r"numbers > 1 \(e.g. 1.25 1.5 2\)"):
        compare_methods(model, [x[:24]], [(x[24:], y[24:])], budgets=[1.0], verbose=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budgets": []}, "at least one budget"),
    ({"budgets": [0.5]}, "numbers >= 1"),
    ({"budgets": [1.5], "budget": "keep"}, r"fractions in \(0, 1\]"),
    ({"budgets": [2], "budget": "params"}, "'compression' or 'keep'"),
    ({"budgets": [2, 4, 2.0]}, "budgets lists 2 more than once"),
    ({"budgets": [0.5, 0.5], "budget": "keep"}, "budgets lists 0.5 more than once"),
    ({"budgets": [2], "calib_sizes": [50, 20, 50]}, "calib_sizes lists 50 more than once"),
])
def test_bad_budgets_are_refused_before_any_pruning(kwargs, match):
    net, (x, y) = _net(), _data(2)
    with pytest.raises(ValueError, match=match):
        compare_methods(net, x[:50], [(x[50:], y[50:])], verbose=False, **kwargs)


def test_write_comparison_writes_the_three_files_consistently(tmp_path):
    net, (x, y) = _net(), _data(2)
    res = compare_methods(net, [(x[:100], y[:100])], [(x[100:], y[100:])], budgets=[2, 4],
                          methods=[("asym", "asym", True), ("weight_norm+refit", "weight_norm", True)],
                          verbose=False)
    files = write_comparison(res, tmp_path / "out", title="mine")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    report = (tmp_path / "out" / "report.md").read_text()
    for r in res["rows"]:
        assert f"| {r['label']} |" in report
    row = next(r for r in res["rows"] if r["label"] == "asym" and r["compression"] == 4.0)
    assert f"{100 * row['accuracy']:.1f} ({100 * row['agreement']:.1f})" in report
    assert (tmp_path / "out" / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["accuracy_vs_budget.png", "report.md",
                                                                     "results.json"]  # no temporary file left
    assert files["report"] == str(tmp_path / "out" / "report.md")


def _user_module(tmp_path, monkeypatch, with_eval: bool = True) -> str:
    """A user module file with a build() function; a new module name each time (imports are cached)."""
    ret = "model, [(x[:100], y[:100])], [(x[100:], y[100:])]" if with_eval else "model, [(x[:100], y[:100])]"
    name = tmp_path.name.replace("-", "_").replace("[", "_").replace("]", "_")
    (tmp_path / f"cmp_{name}.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = zoo.mlp(10, [24, 16], 3).eval()\n"
        "    x, y = torch.randn(200, 10), torch.randint(0, 3, (200,))\n"
        f"    return {ret}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"cmp_{name}:build"


def test_cli_compare_prints_the_table_and_writes_the_report(tmp_path, monkeypatch, capsys):
    spec = _user_module(tmp_path, monkeypatch)
    before = torch.get_num_threads()
    args = _parser().parse_args(["prune", spec, "--compare", "--compression", "2", "3",
                                 "--methods", "asym", "magnitude", "--report-dir", "rep", "--threads", "1"])
    assert args.func(args) == 0
    assert torch.get_num_threads() == before  # --threads is restored for the caller
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    # magnitude is weight_norm here, with and without refit, as in the demo
    assert [(r["compression"], r["label"]) for r in saved["rows"]] == [
        (c, lab) for c in (2.0, 3.0) for lab in ("asym", "weight_norm+refit", "magnitude (no refit)")]
    for r in saved["rows"]:  # the printed table shows the saved numbers
        assert f"{100 * r['accuracy']:.1f}" in out and f"{r['params']}" in out
    assert not (tmp_path / "pruned_model.pt").exists()  # --compare saves no model


@pytest.mark.parametrize(("argv", "match"), [
    (["--compare"], "must return \\(model, calibration_loader, eval_loader\\)"),
    (["--compression", "2", "4"], "several budgets, methods or calibration sizes are for --compare"),
    (["--methods", "asym"], "several budgets, methods or calibration sizes are for --compare"),
    (["--calib", "50"], "several budgets, methods or calibration sizes are for --compare"),
    (["--compare", "--calib", "101"], "integers from 1 to 100"),
    (["--compare", "--methods", "bogus"], "unknown bogus"),
    (["--compare", "--no-reweight"],
     "drop --workers, --progress, --allocation, --weighting, --stats-memory-gib, --export-pretrained and "
     "--no-reweight"),
    (["--compare", "--export-pretrained"], "saves no model; drop .*--export-pretrained"),
    (["--export-pretrained"], "not a transformers model with transformer blocks: drop --export-pretrained"),
    (["--compare", "--weighting", "output"], "drop --workers, --progress, --allocation, --weighting"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--keep", "0.5", "--allocation", "error-curve"], "--allocation error-curve splits a --compression budget"),
])
def test_cli_compare_errors(tmp_path, monkeypatch, argv, match):
    spec = _user_module(tmp_path, monkeypatch, with_eval=argv != ["--compare"])
    # the calibration data of the user module is 100 labelled samples
    args = _parser().parse_args(["prune", spec, *argv])
    with pytest.raises(ValueError, match=match):
        args.func(args)


def test_an_unreachable_compression_is_left_out_and_said(tmp_path):
    # the other budgets still run; the row is missing and the report says why, with the largest reachable value
    net, (x, y) = _net(), _data(2)
    res = compare_methods(net, [(x[:100], y[:100])], [(x[100:], y[100:])], budgets=[2, 1000],
                          methods=[("asym", "asym", True)], verbose=False)
    assert [r["compression"] for r in res["rows"]] == [2.0]
    (what, why), = res["skipped"]
    assert what == "asym at 1000x" and why.startswith("not reachable: at most ")
    most = float(why.split("at most ")[1].rstrip("x"))
    params = sum(p.numel() for p in net.parameters())
    # keeping one unit in each of the two prunable layers of the 10-24-16-3 MLP (with refit biases): 10+1, 1+1,
    # then 1*1 + 1 weights and bias, 1*3 + 3: independently counted
    assert most == pytest.approx(params / ((10 + 1) + (1 + 1) + (3 + 3)), abs=0.01)
    write_comparison(res, tmp_path)
    assert "Left out: asym at 1000x (not reachable" in (tmp_path / "report.md").read_text()


def test_evaluation_reads_class_scores_from_a_tensor_or_logits():
    from types import SimpleNamespace

    class WithLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return SimpleNamespace(logits=self.net(x))

    class AsDict(WithLogits):
        def forward(self, x):
            return {"scores": self.net(x)}

    net, (x, y) = _net(), _data(2)
    with torch.no_grad():
        want = float((net(x).argmax(1) == y).double().mean())
    assert cli._eval_accuracy(net, [(x, y)]) == pytest.approx(want)
    assert cli._eval_accuracy(WithLogits(net), [(x[:50], y[:50]), (x[50:], y[50:])]) == pytest.approx(want)
    with pytest.raises(ValueError, match="needs the model to return class scores .* returned dict"):
        cli._eval_accuracy(AsDict(net), [(x, y)])


def test_cli_compare_refuses_method_instead_of_ignoring_it(tmp_path, monkeypatch, capsys):
    """``--compare --method seq`` ran every method and said nothing: --method was ignored. It is refused and the
    message names --methods; a plain prune still runs asym when --method is not given."""
    spec = _user_module(tmp_path, monkeypatch)
    args = _parser().parse_args(["prune", spec, "--compare", "--compression", "2", "--method", "seq",
                                 "--report-dir", "rep"])
    with pytest.raises(ValueError, match="--methods seq"):
        args.func(args)
    assert not (tmp_path / "rep").exists()
    args = _parser().parse_args(["prune", spec, "--compression", "2", "--out", "p.pt"])
    assert args.func(args) == 0
    assert "method=asym " in capsys.readouterr().out


def test_evaluation_data_that_is_not_batches_is_refused():
    net, (x, _) = _net(), _data(2)
    with pytest.raises(ValueError, match="iterable of \\(inputs, labels\\) batches.*got Tensor"):
        compare_methods(net, x[:50], x[50:], budgets=[2], verbose=False)


def test_a_stage_held_fixed_while_the_keep_fraction_of_the_others_is_swept():
    """stage_keep={"heads": 0.5} with target="all": at each budget b the heads keep half and the FFN keeps b, the
    same pruned models as nna.prune with keep={"heads": 0.5, "ffn": b} (their accuracies computed here by hand);
    a stage the target does not prune, an MLP, or compression budgets are refused before any pruning."""
    torch.manual_seed(0)
    model = _EncoderClassifier().eval()
    x = torch.randn(40, 6, 16)
    y = torch.randint(0, 3, (40,))
    calib, evals = [x[:24]], [(x[24:], y[24:])]
    methods = [("asym", "asym", True), ("magnitude (no refit)", "magnitude", False)]
    res = compare_methods(model, calib, evals, budgets=[0.75, 0.5], budget="keep", methods=methods,
                          target="all", stage_keep={"heads": 0.5}, verbose=False)
    assert res["stage_keep"] == {"heads": 0.5}
    assert [(r["keep"], r["label"]) for r in res["rows"]] == [(b, lab) for b in (0.75, 0.5) for lab, _, _ in methods]
    for r in res["rows"]:
        pruned, _ = nna.prune(model, calib, keep={"heads": 0.5, "ffn": r["keep"]}, target="all",
                              method=r["method"], reweight=r["reweight"])
        assert [(lay.linear1.out_features, lay.self_attn.num_heads) for lay in pruned.encoder.layers] == [
            (round(32 * r["keep"]), 2)] * 2
        with torch.no_grad():
            want = float((pruned(x[24:]).argmax(1) == y[24:]).double().mean())
        assert r["accuracy"] == pytest.approx(want)
        assert r["params"] == sum(p.numel() for p in pruned.parameters())
    with pytest.raises(ValueError, match="stage 'experts', which target='all' does not prune"):
        compare_methods(model, calib, evals, budgets=[0.5], budget="keep", target="all",
                        stage_keep={"experts": 0.5}, verbose=False)
    net, (xm, ym) = _net(), _data(2)
    for kwargs in ({"budget": "keep", "budgets": [0.5]}, {"budgets": [2.0]}):
        with pytest.raises(ValueError, match="transformer blocks and budget='keep'; drop stage_keep"):
            compare_methods(net, xm[:50], [(xm[50:], ym[50:])], stage_keep={"ffn": 0.5}, verbose=False, **kwargs)
    with pytest.raises(ValueError, match="attention unit of transformer blocks.*drop head_unit"):
        compare_methods(net, xm[:50], [(xm[50:], ym[50:])], budgets=[2.0], head_unit="query", verbose=False)


def _encoder_module(tmp_path, monkeypatch, name: str) -> None:
    """A user module ``name`` whose ``build()`` returns the encoder classifier, calibration and evaluation batches."""
    user_module(tmp_path, monkeypatch, name,
        "import torch\n"
        "from test_nn_compare import _EncoderClassifier\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x, y = torch.randn(40, 6, 16), torch.randint(0, 3, (40,))\n"
        "    return _EncoderClassifier().eval(), [x[:24]], [(x[24:], y[24:])]\n")


def test_cli_compare_with_a_stage_held_fixed(tmp_path, monkeypatch):
    """--compare --target all --keep 0.75 0.5 --keep-stage heads=0.5: the report says which stage is fixed and
    the rows keep half of the heads; with an MLP's --compression budgets --keep-stage is refused."""
    _encoder_module(tmp_path, monkeypatch, "encmods")
    args = _parser().parse_args(["prune", "encmods:build", "--compare", "--target", "all", "--keep", "0.75", "0.5",
                                 "--keep-stage", "heads=0.5", "--methods", "asym", "--report-dir", "rep"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert saved["stage_keep"] == {"heads": 0.5}
    assert [r["kept"] for r in saved["rows"]] == [[2, 24, 2, 24], [2, 16, 2, 16]]
    assert "Fixed per stage: heads keeps 0.5;" in (tmp_path / "rep" / "report.md").read_text()
    spec = _user_module(tmp_path, monkeypatch)
    args = _parser().parse_args(["prune", spec, "--compare", "--keep-stage", "ffn=0.5", "--report-dir", "rep2"])
    with pytest.raises(ValueError, match="drop --keep-stage"):
        args.func(args)
    assert not (tmp_path / "rep2").exists()


def test_cli_compare_a_transformer_over_compressions(tmp_path, monkeypatch):
    """--compare --compression 1.1 1.3 on a transformer: one row a compression, each pruned model (counted) at or
    past it; without --keep or --compression the message names both."""
    _encoder_module(tmp_path, monkeypatch, "encmods2")
    args = _parser().parse_args(["prune", "encmods2:build", "--compare", "--compression", "1.1", "1.3", "--methods",
                                 "asym", "--report-dir", "rep"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert saved["budget"] == "compression" and [r["compression"] for r in saved["rows"]] == [1.1, 1.3]
    assert all(saved["dense"]["params"] / r["params"] >= r["compression"] for r in saved["rows"])
    args = _parser().parse_args(["prune", "encmods2:build", "--compare", "--report-dir", "rep2"])
    with pytest.raises(ValueError, match="pass --keep .* or --compression"):
        args.func(args)
