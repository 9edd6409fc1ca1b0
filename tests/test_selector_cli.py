"""The scikit-learn face and the ``submod select`` command."""

import json
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits

import submod
from submod.cli import main


def test_selector_matches_maximize_and_follows_the_estimator_protocol():
    X = load_digits().data[:300]
    sel = submod.SubmodularSelector(k=8, method="greedy").fit(X)
    res = submod.maximize(submod.FacilityLocation(X), 8)
    np.testing.assert_array_equal(sel.ranking_, res.selected)
    np.testing.assert_array_equal(sel.get_support(indices=True), res.selected)
    assert sel.get_support().sum() == 8 and sel.get_support()[res.selected].all()
    np.testing.assert_array_equal(sel.transform(X), X[res.selected])
    assert sel.get_params()["k"] == 8 and sel.set_params(k=3).k == 3


def test_selector_works_with_scikit_learn_tools():
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.validation import check_is_fitted

    try:  # scikit-learn >= 1.6
        from sklearn.utils import get_tags
    except ImportError:  # older releases read the tags through a method
        def get_tags(est):
            return est._get_tags()

    X = load_digits().data[:200]
    sel = submod.SubmodularSelector(k=5)
    assert get_tags(sel) is not None and clone(sel).get_params() == sel.get_params()
    pipe = make_pipeline(StandardScaler(), sel).fit(X)
    check_is_fitted(pipe[-1])  # raised AttributeError (no __sklearn_tags__) before
    assert "SubmodularSelector" in pipe._repr_html_()
    assert pipe.transform(X).shape == (5, 64)


def test_selector_warns_when_it_selects_fewer_rows_than_asked():
    X = np.repeat(np.eye(3), 4, axis=0)  # 3 distinct rows
    with pytest.warns(UserWarning, match="selected 3 of k=5 rows"):
        sel = submod.SubmodularSelector(k=5).fit(X)
    assert sel.transform(X).shape == (3, 3) and sel.result_.stopped_early


@pytest.mark.parametrize("objective", ["facility-location", "feature-based", "graph-cut", "log-determinant"])
def test_selector_objectives(objective):
    X = np.abs(np.random.default_rng(0).standard_normal((40, 3)))
    assert submod.SubmodularSelector(k=4, objective=objective).fit_transform(X).shape == (4, 3)


def test_selector_errors():
    with pytest.raises(ValueError, match="not fitted"):
        submod.SubmodularSelector(k=2).get_support()
    with pytest.raises(ValueError, match="unknown objective"):
        submod.SubmodularSelector(k=2, objective="nope").fit(np.ones((3, 2)))
    with pytest.raises(ValueError, match="exceeds"):
        submod.SubmodularSelector(k=5).fit(np.ones((3, 2)))
    with pytest.raises(ValueError, match="unknown parameter"):
        submod.SubmodularSelector(k=2).set_params(K=3)
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):  # what scikit-learn's tools expect of an unfitted estimator
        submod.SubmodularSelector(k=2).transform(np.ones((3, 2)))
    sel = submod.SubmodularSelector(k=2).fit(np.eye(4))
    with pytest.raises(ValueError, match="exceeds"):
        sel.set_params(k=9).fit(np.eye(4))
    with pytest.raises(NotFittedError):  # a failed re-fit does not leave the previous selection in place
        sel.get_support()
    assert repr(submod.SubmodularSelector(k=3, method="greedy")) == "SubmodularSelector(k=3, method='greedy')"


def test_select_command_on_digits_writes_json(tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["select", "-k", "5", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    X = load_digits().data
    res = submod.maximize(submod.FacilityLocation(X), 5, method="lazy")
    assert payload["selected"] == res.selected.tolist()
    assert payload["values"] == pytest.approx(res.values.tolist())
    assert payload["certificate"]["upper_bound_on_opt"] >= payload["value"]
    assert "certificate: OPT <=" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_select_command_reads_files(tmp_path, suffix):
    X = np.abs(np.random.default_rng(1).standard_normal((30, 4)))
    path = tmp_path / f"X{suffix}"
    np.save(path, X) if suffix == ".npy" else np.savetxt(path, X, delimiter=",")
    out = tmp_path / "r.json"
    assert main(["select", "--data", str(path), "-k", "3", "--objective", "feature-based", "--method", "greedy",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["selected"] == submod.maximize(submod.FeatureBased(X), 3).selected.tolist()


def test_select_command_reports_bad_input(tmp_path, capsys):
    assert main(["select", "--data", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    assert main(["select", "--data", str(tmp_path / "x.npy"), "-k", "9"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_load_matrix_formats_and_errors(tmp_path):
    """One loader for both CLIs: .npy, .csv (optional header), .txt (whitespace or commas), 1-D only on request."""
    from submod.cli import load_matrix

    X = np.arange(6.0).reshape(3, 2)
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "x.csv").write_text("a,b\n0,1\n2,3\n4,5\n")
    (tmp_path / "x.txt").write_text("0 1\n2 3\n4 5\n")
    (tmp_path / "c.txt").write_text("0,1\n2,3\n4,5\n")
    for name in ("x.npy", "x.csv", "x.txt", "c.txt"):
        np.testing.assert_array_equal(load_matrix(tmp_path / name), X)
    np.save(tmp_path / "y.npy", np.arange(3.0))
    assert load_matrix(tmp_path / "y.npy", "--targets", allow_1d=True).shape == (3,)
    with pytest.raises(ValueError, match="--data must be a 2-D array"):
        load_matrix(tmp_path / "y.npy", "--data")
    # A numeric first row is data: a ragged file is an error, not a file whose first row is dropped as a header.
    for name, text, match in (("x.json", "[]", "must be .npy, .csv or .txt"),
                              ("bad.csv", "a,b\n1,x\n", "could not read data"),
                              ("ragged.csv", "1,2,3\n4,5\n6,7\n", "could not read data"),
                              ("ragged.txt", "1 2 3\n4 5\n6 7\n", "could not read data")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_matrix(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        load_matrix(tmp_path / "missing.npy")
    np.save(tmp_path / "complex.npy", np.ones((3, 2)) * (1 + 1j))
    with pytest.raises(ValueError, match="must be real"):  # not silently cast to its real part
        load_matrix(tmp_path / "complex.npy")


def test_select_command_reports_an_unwritable_output_path(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.eye(4))
    assert main(["select", "--data", str(tmp_path / "x.npy"), "-k", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and ".tmp" not in err  # it named the hidden temporary file before
    (tmp_path / "file").write_text("")
    assert main(["select", "--data", str(tmp_path / "x.npy"), "-k", "2",
                 "--out", str(tmp_path / "file" / "picks.json")]) == 2
    assert "error" in capsys.readouterr().err


def _knn_similarity_by_brute_force(X: np.ndarray, k: int) -> np.ndarray:
    """Dense K = max(D) - D (squared Euclidean) with each row keeping itself and its k-1 nearest other rows."""
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    K = D.max() - D
    keep = np.zeros_like(K, dtype=bool)
    for i in range(len(X)):
        others = [j for j in np.argsort(D[i], kind="stable") if j != i]  # ties to the smaller index
        keep[i, [i, *others[:k - 1]]] = True
    return np.where(keep, K, 0.0)


def test_selector_and_select_command_take_n_neighbors(tmp_path, capsys):
    import scipy.sparse as sp
    X = np.random.default_rng(7).standard_normal((60, 3))
    oracle = submod.maximize(submod.FacilityLocation(similarity=sp.csr_matrix(_knn_similarity_by_brute_force(X, 6))),
                             5, method="lazy")
    sel = submod.SubmodularSelector(k=5, n_neighbors=6).fit(X)
    assert sel.ranking_.tolist() == oracle.selected.tolist()
    assert sel.get_params()["n_neighbors"] == 6 and "n_neighbors=6" in repr(sel)
    path, out = tmp_path / "X.npy", tmp_path / "r.json"
    np.save(path, X)
    assert main(["select", "--data", str(path), "-k", "5", "--n-neighbors", "6", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["selected"] == oracle.selected.tolist()
    assert payload["n_neighbors"] == 6 and payload["metric"] == "sqeuclidean"
    assert "6 nearest neighbours" in capsys.readouterr().out


def test_n_neighbors_is_refused_for_objectives_without_it(capsys):
    with pytest.raises(ValueError, match="facility-location objective only"):
        submod.SubmodularSelector(k=2, objective="graph-cut", n_neighbors=3).fit(np.ones((5, 2)))
    assert main(["select", "-k", "2", "--objective", "log-determinant", "--n-neighbors", "3"]) == 2
    assert "facility-location objective only" in capsys.readouterr().err


def test_metric_is_refused_for_objectives_without_it_and_checked_always(tmp_path, capsys):
    X = np.abs(np.random.default_rng(0).standard_normal((20, 3)))
    for objective in ("log-determinant", "feature-based"):
        with pytest.raises(ValueError, match="metric applies to the facility-location and graph-cut objectives"):
            submod.SubmodularSelector(k=2, objective=objective, metric="cosine").fit(X)
    for objective in ("facility-location", "log-determinant"):
        with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
            submod.SubmodularSelector(k=2, objective=objective, metric="manhattan").fit(X)
    # the metric objectives take it; the default is accepted everywhere
    assert submod.SubmodularSelector(k=2, objective="graph-cut", metric="cosine").fit(X).ranking_.size == 2
    assert submod.SubmodularSelector(k=2, objective="log-determinant").fit(X).ranking_.size == 2
    path = tmp_path / "x.npy"
    np.save(path, X)
    capsys.readouterr()
    assert main(["select", "--data", str(path), "-k", "2", "--objective", "log-determinant",
                 "--metric", "cosine"]) == 2
    assert "metric applies to the facility-location and graph-cut objectives only" in capsys.readouterr().err


def test_select_command_says_when_it_stopped_early(tmp_path, capsys):
    # real-valued data: every entry is non-zero, so for coverage the first item covers every concept
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((10, 4)))
    assert main(["select", "--data", str(path), "-k", "3", "--objective", "coverage"]) == 0
    out = capsys.readouterr().out
    assert "stopped early: selected 1 of k = 3 items" in out and "non-zero entry" in out
    assert main(["select", "--data", str(path), "-k", "3"]) == 0
    assert "stopped early" not in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "a,b,c\n"])
def test_select_command_says_a_text_file_holds_no_data(tmp_path, capsys, text):
    """An empty file, or one with a header row only, is named as such in the error, without numpy's 'input
    contained no data' warning leaking to the user before it."""
    path = tmp_path / "empty.csv"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked warning fails the test
        assert main(["select", "--data", str(path), "-k", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds no numbers" in err and "empty.csv" in err


def test_load_matrix_keeps_the_first_row_of_a_utf8_bom_file(tmp_path):
    """Spreadsheets' 'CSV UTF-8' starts with a byte-order mark; a numeric first row after it is data, not a header
    (it was dropped, so a 3-row file loaded as 2 rows)."""
    from submod.cli import load_matrix

    rows = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    for name, sep in (("x.csv", ","), ("x.txt", " ")):
        (tmp_path / name).write_bytes(("\ufeff" + "\n".join(sep.join(f"{v:g}" for v in r) for r in rows) + "\n")
                                      .encode("utf-8"))
        np.testing.assert_array_equal(load_matrix(tmp_path / name), rows)
    (tmp_path / "h.csv").write_bytes("\ufeffa,b,c\n1,2,3\n".encode("utf-8"))  # a header row after the mark
    np.testing.assert_array_equal(load_matrix(tmp_path / "h.csv"), [[1.0, 2.0, 3.0]])


def test_select_command_names_a_text_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("caf\xe9,b\n1,2\n3,4\n".encode("latin-1"))
    assert main(["select", "--data", str(path), "-k", "1"]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "0xe9" in err and "codec" not in err


def test_load_matrix_names_npy_files_it_cannot_read_without_advising_allow_pickle(tmp_path):
    """numpy's messages ('This file contains pickled (object) data ... allow_pickle=', 'Object arrays cannot be
    loaded when allow_pickle=False') advise an option the command line does not have; a CSV or an .npz renamed
    to .npy got the pickle advice too."""
    from submod.cli import load_matrix

    (tmp_path / "csv.npy").write_text("1,2\n3,4\n")
    with open(tmp_path / "zip.npy", "wb") as fh:
        np.savez(fh, a=np.ones(3))
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    for name, match in (("csv.npy", "it is not a .npy file"), ("zip.npy", "zip archive"),
                        ("obj.npy", "holds Python objects")):
        with pytest.raises(ValueError, match=match) as exc:
            load_matrix(tmp_path / name)
        assert "allow_pickle" not in str(exc.value)


def test_select_command_refuses_data_without_columns(tmp_path, capsys):
    """A (5, 0) array has no features: select 'stopped early' with 0 items and exit status 0."""
    np.save(tmp_path / "x.npy", np.zeros((5, 0)))
    assert main(["select", "--data", str(tmp_path / "x.npy"), "-k", "2"]) == 2
    assert "no columns" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [None, ["a", "b", "c"]])
def test_load_matrix_drops_the_row_index_pandas_writes(tmp_path, columns):
    """df.to_csv(path) writes an unnamed row index 0..n-1 as the first column (header ',a,b,c', or ',0,1,2' for
    unnamed columns): it was read as a feature (or, under ',0,1,2', the header was read as a data row with an
    empty field). The file's features are those of the DataFrame."""
    pd = pytest.importorskip("pandas")
    X = np.random.default_rng(0).random((6, 3))
    pd.DataFrame(X, columns=columns).to_csv(tmp_path / "x.csv")
    from submod.cli import load_matrix

    with pytest.warns(UserWarning, match="row index .* is dropped"):
        np.testing.assert_array_equal(load_matrix(tmp_path / "x.csv"), X)
    pd.Series(X[:, 0]).to_csv(tmp_path / "y.csv")  # a target column saved from a Series
    with pytest.warns(UserWarning, match="row index .* is dropped"):
        np.testing.assert_array_equal(load_matrix(tmp_path / "y.csv", allow_1d=True).ravel(), X[:, 0])
    if columns is not None:  # written without the index: read as it is, nothing to warn about (unnamed columns
        # would give the header '0,1,2', a numeric first row, which is data by the loader's documented rule)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pd.DataFrame(X, columns=columns).to_csv(tmp_path / "plain.csv", index=False)
            np.testing.assert_array_equal(load_matrix(tmp_path / "plain.csv"), X)


def test_load_matrix_keeps_a_first_column_that_is_not_a_default_index(tmp_path):
    """A named first column 0..n-1 is data; an unnamed one that is not 0..n-1 (the index of a filtered DataFrame)
    is kept as a feature, with a warning that it may be an index."""
    from submod.cli import load_matrix

    (tmp_path / "named.csv").write_text("id,a\n0,1.5\n1,2.5\n2,3.5\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_matrix(tmp_path / "named.csv"), [[0, 1.5], [1, 2.5], [2, 3.5]])
    (tmp_path / "filtered.csv").write_text(",a\n3,1.5\n7,2.5\n8,3.5\n")
    with pytest.warns(UserWarning, match="no header name; it is read as a feature"):
        np.testing.assert_array_equal(load_matrix(tmp_path / "filtered.csv"), [[3, 1.5], [7, 2.5], [8, 3.5]])


def test_load_matrix_reads_quoted_numbers(tmp_path):
    """Quoted fields are valid CSV (spreadsheets and csv.QUOTE_ALL write "1.5"); numpy said 'could not convert
    string '"1.5"' to float64', and a quoted numeric first row was dropped as a header."""
    import csv

    from submod.cli import load_matrix

    X = np.random.default_rng(1).random((4, 3))
    with open(tmp_path / "q.csv", "w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerow(["a", "b, with a comma", "c"])
        w.writerows([[repr(float(v)) for v in row] for row in X])
    np.testing.assert_array_equal(load_matrix(tmp_path / "q.csv"), X)
    (tmp_path / "nohead.csv").write_text('"1.5","2"\n"3",4\n')  # a quoted numeric first row is data
    np.testing.assert_array_equal(load_matrix(tmp_path / "nohead.csv"), [[1.5, 2.0], [3.0, 4.0]])
    (tmp_path / "q.txt").write_text('"x" "y"\n"1.5" "2"\n3 "4"\n')
    np.testing.assert_array_equal(load_matrix(tmp_path / "q.txt"), [[1.5, 2.0], [3.0, 4.0]])
    (tmp_path / "text.csv").write_text('a,b\n"1.5","x"\n')  # a quoted word is still not a number
    with pytest.raises(ValueError, match="could not read data"):
        load_matrix(tmp_path / "text.csv")
