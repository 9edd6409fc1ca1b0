"""Options of the ``submod`` subcommands: each one does what its --help says, or is refused with a message."""

import numpy as np
import pytest

from submod.cli import main


@pytest.mark.parametrize("extra", [["--ridge", "1"], ["--group-size", "2"], ["--fit-intercept"], ["--k-max", "3"],
                                   ["--ridge", "1", "--fit-intercept"]])
def test_verify_refuses_least_squares_options_with_other_objectives(tmp_path, capsys, extra):
    """--ridge, --group-size, --fit-intercept and --k-max only act on sparse-regression; with another objective
    they were silently ignored (the report was about the function without them), while --targets was refused."""
    np.save(tmp_path / "X.npy", np.abs(np.random.default_rng(0).standard_normal((6, 4))))
    assert main(["verify", "--data", str(tmp_path / "X.npy"), "--objective", "facility-location", "-k", "2",
                 "--out", str(tmp_path / "rep"), "--no-figures", "--samples", "20", *extra]) == 2
    err = capsys.readouterr().err
    assert "only used with --objective sparse-regression" in err
    assert all(flag in err for flag in extra if flag.startswith("--"))
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("seed", ["-1", "x", "1.5"])
def test_seed_is_refused_by_the_parser_with_the_option_named(tmp_path, capsys, seed):
    """A negative --seed reached numpy, which said 'expected non-negative integer' (or, through submod.maximize,
    'seed must be None, ... or a numpy Generator', API terms) without naming --seed; verify had created the
    report directory by then."""
    np.save(tmp_path / "A.npy", np.random.default_rng(0).standard_normal((8, 3)))
    for argv in (["select", "-k", "2", "--method", "stochastic"],
                 ["verify", "--data", str(tmp_path / "A.npy"), "--targets", str(tmp_path / "A.npy"), "-k", "2",
                  "--out", str(tmp_path / "rep")]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--seed", seed])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --seed: must be a non-negative integer" in err and "Generator" not in err
    assert not (tmp_path / "rep").exists()
    assert main(["select", "-k", "2", "--method", "stochastic", "--seed", "3"]) == 0


def test_report_refuses_bad_k_and_seed_alike_and_before_creating_its_directory(tmp_path):
    """report(k=0) said 'at least 1' but report(k=-1) 'non-negative'; report(seed=-1) had created the directory,
    which the docstring says a bad call does not."""
    import submod
    import verification as vf

    f = submod.Modular(np.ones(4))
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            vf.report(f, k, tmp_path / "rep")
    with pytest.raises(ValueError, match="seed must be"):
        vf.report(f, 2, tmp_path / "rep", seed=-1)
    assert not (tmp_path / "rep").exists()


def test_a_closed_output_pipe_stops_quietly(tmp_path):
    """`submod select ... | head -1`: the reader leaves and the next print fails; that printed 'submod select:
    error: [Errno 32] Broken pipe' and exited 2 (or 'Exception ignored ... BrokenPipeError' at exit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((30, 3)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-m", "submod", "select", "--data", str(tmp_path / "X.npy"), "-k", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the command prints anything: every print meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert err == ""


@pytest.mark.parametrize(("extra", "needle"), [(["--samples", "0"], "--samples must be a positive integer"),
                                               (["--group-size", "3"], "pass a divisor of 8 (2, 4)"),
                                               (["--k-max", "9"], "--k-max 9 exceeds the number of units (8)"),
                                               (["--k-max", "5", "--group-size", "2"], "units (4)")])
def test_verify_errors_name_the_command_line_options(tmp_path, capsys, extra, needle):
    """The messages came from the API and named n_samples, k_max and groups=3 ('pass a list of column-index
    lists', which the command line cannot)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.standard_normal((12, 8)))
    np.save(tmp_path / "Y.npy", rng.standard_normal((12, 2)))
    assert main(["verify", "--data", str(tmp_path / "A.npy"), "--targets", str(tmp_path / "Y.npy"), "-k", "2",
                 "--out", str(tmp_path / "rep"), "--no-figures", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "n_samples" not in err and "k_max" not in err and "column-index lists" not in err
    assert not (tmp_path / "rep").exists()


def test_verify_says_when_out_is_a_file(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.ones(4))
    assert main(["verify", "--data", str(tmp_path / "w.npy"), "--objective", "modular", "-k", "2",
                 "--out", str(tmp_path / "w.npy")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "out_dir" not in err


def test_every_option_with_a_default_says_it_in_its_help():
    """A newcomer reads the defaults in --help: ``submod select --method`` (lazy), ``demo --compressions``
    (2 4 8 16), ``prune --method`` (asym) and ``--allocation`` (uniform), ``verify --objective``
    (sparse-regression), ``--ridge`` (0) and ``--samples`` (500) ran with a default that their help did not show,
    while every other option states its own."""
    import argparse

    from submod.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            flags = [s for s in action.option_strings if s.startswith("--")]
            if not flags or action.default in (None, False, argparse.SUPPRESS) or action.required:
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{command} {flags[0]} (default {action.default!r})")
    assert not silent, silent


def _pyproject_version() -> str:
    """The version line of pyproject.toml's [project] table (tomllib is not in Python 3.10)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def test_version_prints_the_package_version(capsys):
    """There was no --version: a user reporting a problem could not say which submod they ran."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"submod {_pyproject_version()}"


def test_version_from_a_source_tree_without_package_metadata(capsys, monkeypatch):
    """Run from a checkout that is not installed, importlib.metadata finds no 'submod'; the package's own
    __version__ (kept equal to pyproject.toml's) is printed instead of a traceback."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"submod {_pyproject_version()}"


def _order_dependent_oracle(S):
    """A user's bug: the weights 1..6 count only while S comes in ascending order (the value table enumerates sets
    that way); past the first element out of order each adds 0.01 (greedy adds its picks in pick order). Adding an
    element never lowers the value, in any order, so the function passes every monotonicity check; the table is
    modular, so gamma = 1 and OPT_3 = 6 + 5 + 4 = 15, but greedy picks 5 first (weight 6) and every later pick
    arrives out of order: it ends at 6.02, far below (1 - 1/e) OPT, which a true set function cannot do."""
    S = np.asarray(S)
    broken = np.flatnonzero(np.diff(S) <= 0)
    n_in_order = S.size if broken.size == 0 else int(broken[0]) + 1
    return float((S[:n_in_order] + 1.0).sum()) + 0.01 * (S.size - n_in_order)


def test_verify_exits_nonzero_when_a_guarantee_fails(tmp_path, capsys, monkeypatch):
    """verify printed 'WARNING: a guarantee ... failed' and exited 0, so a script or CI job could not see it."""
    import warnings

    import submod
    import verification.cli as vcli

    np.save(tmp_path / "w.npy", np.arange(1.0, 7.0))
    monkeypatch.setattr(vcli, "build_objective", lambda args: submod.from_callable(_order_dependent_oracle, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["verify", "--data", str(tmp_path / "w.npy"), "--objective", "modular", "-k", "3",
                       "--out", str(tmp_path / "rep"), "--no-figures", "--samples", "20"])
    assert status == vcli.GUARANTEE_FAILED and status not in (0, 1, 2)  # 2: bad input, 1: a closed pipe
    assert "FAILED" in capsys.readouterr().err
    assert (tmp_path / "rep" / "verify_report.md").exists()  # the report that says which bound failed is written


def test_verify_exits_zero_when_every_guarantee_holds(tmp_path, capsys):
    """A modular function: greedy is optimal, so every bound holds and the status stays 0."""
    np.save(tmp_path / "w.npy", np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0]))
    assert main(["verify", "--data", str(tmp_path / "w.npy"), "--objective", "modular", "-k", "3",
                 "--out", str(tmp_path / "rep"), "--no-figures", "--samples", "20"]) == 0
    assert "FAILED" not in capsys.readouterr().err


def test_verify_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 when every proven guarantee" in out and "3 when one fails" in out
