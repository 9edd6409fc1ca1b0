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
