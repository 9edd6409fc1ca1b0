"""The report and the ``submod verify`` command, on the correlated least-squares instance with a suppressor pair
(issue 4 acceptance: gamma < 1, the gamma = 1 online bound shown invalid, plain lazy greedy's violation)."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest

import submod
from submod.sparse_regression import SparseRegression
from verification import report
from verification import strategies as vst
from verification.cli import register


@pytest.fixture(scope="module")
def suppressor_report(tmp_path_factory):
    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)
    out = tmp_path_factory.mktemp("rep")
    return f, report(f, 2, out, n_samples=200, n_seeds=3), out


def test_suppressor_report_shows_gamma_below_one_invalid_online_bound_and_lazy_violation(suppressor_report):
    f, rep, out = suppressor_report
    opt = max(f.value(list(T)) for T in itertools.combinations(range(f.n), 2))  # independent brute force
    exact = next(r for r in rep.ratios if r.kind == "exact")
    assert exact.value < 0.9
    assert rep.gamma_one_bound < opt * 0.9 and rep.gamma_one_invalid
    assert rep.certificate is not None and rep.certificate.upper_bound >= opt - 1e-9
    assert rep.lazy_violations and rep.lazy_violations[0][3] > rep.lazy_violations[0][2]
    with pytest.warns(submod.optimize.StaleBoundWarning):
        plain = submod.maximize(f, 2, method="lazy", lazy_fallback=False)
    assert plain.violations
    text = rep.path.read_text()
    assert "< 1" in text and "INVALID" in text and "stale-bound violation" in text
    assert "**estimate**" in text and "proven upper bound" in text.lower()
    assert sorted(p.name for p in out.iterdir()) == ["verify_decay.png", "verify_ratios.png", "verify_report.md"]
    for p in rep.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_submodular_function_has_no_gamma_one_warning(tmp_path):
    f = submod.FacilityLocation(np.random.default_rng(0).standard_normal((9, 2)))
    rep = report(f, 3, tmp_path, figures=False, n_samples=100, n_seeds=2)
    assert rep.gamma_one_bound is None and rep.certificate.gamma_lower == 1.0
    assert rep.decay is None and rep.figures == []
    assert rep.guarantee.all_hold
    assert "not a valid bound" not in rep.path.read_text()


def test_report_leaves_nothing_half_written(tmp_path, monkeypatch):
    import matplotlib.figure

    data = vst.suppressor_data()
    f = SparseRegression(data.A, data.Y)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        report(f, 2, tmp_path, n_samples=50, n_seeds=2)
    assert list(tmp_path.iterdir()) == []


def test_report_rejects_bad_out_dir(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        report(submod.Modular([1.0, 2.0]), 1, target)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="submod")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_verify_command_writes_report(tmp_path, capsys):
    data = vst.suppressor_data()
    np.save(tmp_path / "X.npy", data.A)
    np.save(tmp_path / "Y.npy", data.Y)
    args = _parser().parse_args(["verify", "--data", str(tmp_path / "X.npy"), "--objective", "sparse-regression",
                                 "--targets", str(tmp_path / "Y.npy"), "-k", "2", "--out", str(tmp_path / "rep"),
                                 "--samples", "100"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    text = (tmp_path / "rep" / "verify_report.md").read_text()
    assert "INVALID" in text and (tmp_path / "rep" / "verify_decay.png").exists()


def test_submod_main_dispatches_verify(tmp_path):
    from submod.cli import main

    np.save(tmp_path / "w.npy", np.array([[3.0, 1.0, 2.0, 0.5]]))
    rc = main(["verify", "--data", str(tmp_path / "w.npy"), "--objective", "modular", "-k", "2", "--out",
               str(tmp_path / "rep"), "--no-figures", "--samples", "50"])
    assert rc == 0
    text = (tmp_path / "rep" / "verify_report.md").read_text()
    assert "OPT_2 = 5 (**exact**" in text and "declared submodular: True" in text
    np.save(tmp_path / "w1.npy", np.array([3.0, 1.0, 2.0, 0.5]))  # the weights as a plain vector, as --help says
    assert main(["verify", "--data", str(tmp_path / "w1.npy"), "--objective", "modular", "-k", "2", "--out",
                 str(tmp_path / "rep1"), "--no-figures", "--samples", "50"]) == 0
    assert "OPT_2 = 5 (**exact**" in (tmp_path / "rep1" / "verify_report.md").read_text()


def test_verify_command_reports_bad_input(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.ones((5, 3)))
    parser = _parser()
    args = parser.parse_args(["verify", "--data", str(tmp_path / "X.npy"), "-k", "2", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "needs --targets" in capsys.readouterr().err
    args = parser.parse_args(["verify", "--data", str(tmp_path / "missing.npy"), "--objective", "modular", "-k",
                              "1", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plain_lazy_can_lose_silently_and_the_report_says_so(tmp_path):
    data = vst.lazy_trap_data()
    f = SparseRegression(data.A, data.Y)
    greedy = submod.maximize(f, 2)
    best = max(f.value(list(T)) for T in itertools.combinations(range(3), 2))
    assert greedy.value == pytest.approx(best)
    rep = report(f, 2, tmp_path, figures=False, n_samples=100, n_seeds=2)
    assert rep.lazy_value < 0.7 * rep.greedy_value and rep.lazy_violations == []
    text = rep.path.read_text()
    assert "not a proof" in text and "lost silently" in text


def test_verify_modular_refuses_a_table_instead_of_flattening_it(tmp_path, capsys):
    from submod.cli import main

    np.save(tmp_path / "t.npy", np.ones((50, 4)))
    assert main(["verify", "--data", str(tmp_path / "t.npy"), "--objective", "modular", "-k", "2", "--out",
                 str(tmp_path / "rep"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "one weight per item" in err and "50 x 4" in err
    assert not (tmp_path / "rep").exists()


def test_verify_command_on_underdetermined_least_squares(tmp_path, capsys):
    # the finding's file pair: 6 samples, 10 units (least squares is monotone; it exited with "not monotone")
    from submod.cli import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.standard_normal((6, 10)))
    np.save(tmp_path / "Y.npy", rng.standard_normal((6, 2)))
    assert main(["verify", "--data", str(tmp_path / "A.npy"), "--targets", str(tmp_path / "Y.npy"),
                 "--objective", "sparse-regression", "-k", "3", "--out", str(tmp_path / "rep"), "--no-figures",
                 "--samples", "50"]) == 0, capsys.readouterr().err
    assert "fewer samples (6) than columns (10)" in (tmp_path / "rep" / "verify_report.md").read_text()


@pytest.mark.parametrize("flag", ["--group-size", "--k-max"])
def test_verify_command_names_the_flag_of_a_non_positive_size(tmp_path, capsys, flag):
    """``--group-size 0`` used to answer 'groups=0 asks for consecutive blocks of 0 columns ... not a positive
    multiple of 0', and ``--k-max 0`` 'k_max must be ...': Python names the command-line user never typed."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.standard_normal((20, 4)))
    np.save(tmp_path / "Y.npy", rng.standard_normal((20, 1)))
    args = _parser().parse_args(["verify", "--data", str(tmp_path / "A.npy"), "--targets", str(tmp_path / "Y.npy"),
                                 "-k", "2", "--out", str(tmp_path / "rep"), "--no-figures", flag, "0"])
    assert args.func(args) == 2
    assert f"{flag} must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_groups_zero_is_refused_as_a_block_size():
    with pytest.raises(ValueError, match="block size .* must be a positive divisor"):
        SparseRegression(np.eye(4), np.ones((4, 1)), groups=0)


def test_report_on_a_function_declared_not_monotone_has_no_certificate(tmp_path):
    """certify refuses monotone=False (its bounds need monotone F); report writes the rest and says why there is
    no certificate, instead of printing one or failing."""
    f = submod.from_callable(lambda S: float(np.sqrt(len(S))), n=5, submodular=True, monotone=False)
    rep = report(f, 2, tmp_path, figures=False)
    assert rep.certificate is None
    assert "declared monotone=False" in rep.path.read_text()
