"""The ``submod`` command: ``select`` (here), ``demo`` and ``prune`` (nn_adapters), ``verify`` (verification)."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._atomic import atomic_path, check_file_path
from ._validation import as_float_array
from .selector import METRIC_OBJECTIVES, OBJECTIVES, build_objective


def load_matrix(path: str | os.PathLike, what: str = "data", *, allow_1d: bool = False) -> np.ndarray:
    """Load a float array from ``.npy``, ``.csv`` (comma-separated) or ``.txt`` (whitespace- or comma-separated).

    Text files may start with one header row; fields may be quoted (``"1.5"``). A first column with an empty
    header name that holds ``0, 1, ..., n-1`` is the row index that pandas' ``DataFrame.to_csv`` writes by
    default: it is dropped, with a ``UserWarning``, rather than read as a feature. ``what`` names the argument
    in error messages (e.g. ``"--data"``); the result is 2-D (items x features), or also 1-D with ``allow_1d``
    (e.g. a single target column).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} file {str(path)!r} does not exist; pass an existing .npy, .csv or .txt file.")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".csv", ".txt"):
        raise ValueError(f"{what} file {str(path)!r} must be .npy, .csv or .txt; got {suffix or 'no extension'}.")
    try:
        if suffix == ".npy":
            arr = _load_npy(p)
        else:
            arr = _load_text(p, "," if suffix == ".csv" else None, what)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {what} from {str(path)!r}: {exc}") from exc
    if not (arr.ndim == 2 or (allow_1d and arr.ndim == 1)):
        shape = "a 1-D or 2-D array" if allow_1d else "a 2-D array (items x features)"
        raise ValueError(f"{what} must be {shape}; got shape {arr.shape}.")
    if arr.ndim == 2 and arr.shape[1] == 0 and arr.shape[0] > 0:  # every item alike: select stopped at 0 items
        raise ValueError(f"{what} from {str(path)!r} has {arr.shape[0]} rows but no columns (features); pass an "
                         "items x features array.")
    return as_float_array(arr, what)  # numeric, real and finite, or a clear error


def _load_npy(p: Path) -> np.ndarray:
    """``np.load`` without pickles, with messages that fit a command line: numpy's own advise ``allow_pickle=``
    (for an object array, and for any file that is not .npy at all, e.g. a renamed .npz or CSV)."""
    with open(p, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError("it is not a .npy file (numpy.save writes those" + ("; this one is a zip archive, e.g. "
                         "numpy.savez's .npz: save the one array with numpy.save" if magic[:2] == b"PK" else "")
                         + ").")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise ValueError("it holds Python objects (an object array), which are not loaded, for safety; save a "
                         "numeric array, e.g. numpy.save(path, X.astype(float)).") from None


def _load_text(p: Path, delimiter: str | None, what: str = "data") -> np.ndarray:
    """``np.loadtxt`` with an optional header row (a first row that is not all numbers); ``delimiter=None``
    (``.txt``) also accepts commas. A numeric first row is data, never dropped as a header.

    The text is read as UTF-8, with or without the byte-order mark that spreadsheets write ("CSV UTF-8"): read
    with the mark, a numeric first row would start with ``\ufeff`` and be dropped as a header."""
    try:
        with open(p, encoding="utf-8-sig") as fh:
            first = fh.readline()
            for _ in fh:  # the whole file decodes, or the error below says so (not numpy's 'could not convert')
                pass
    except UnicodeDecodeError as exc:
        raise ValueError(f"it is not UTF-8 text (it holds the byte {exc.object[exc.start]:#04x}, e.g. a Latin-1 or "
                         "UTF-16 file); save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet) or as .npy.") from None
    errors: list[ValueError] = []
    for delim in ([delimiter] if delimiter is not None else [None, ","]):
        # fields may be quoted ("1.5", as spreadsheets and csv.QUOTE_ALL write them): numbers all the same
        fields = first.split() if delim is None else next(csv.reader([first], delimiter=delim), [])
        tokens = [t.strip().strip('"').strip() for t in fields]
        try:
            [float(t) for t in tokens if t]
            # an empty first name is a header too: pandas' to_csv writes ",0,1,2" over its unnamed row index
            skip = int(len(tokens) > 1 and tokens[0] == "")
        except ValueError:
            skip = 1
        try:
            with warnings.catch_warnings():  # an empty file: the error below says so, numpy's warning is noise
                warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
                arr = np.loadtxt(p, delimiter=delim, ndmin=2, skiprows=skip, encoding="utf-8-sig",
                                 quotechar='"')
        except ValueError as exc:
            errors.append(exc)
            continue
        if arr.size == 0:
            raise ValueError("the file holds no numbers" + (" (only a header row)" if skip else "") + "; pass a "
                             "file with one row per item.")
        if skip and tokens[0] == "" and arr.shape[1] > 1:
            if np.array_equal(arr[:, 0], np.arange(arr.shape[0])):
                warnings.warn(f"{what} file {str(p)!r}: the first column has no header name and holds 0, 1, ..., "
                              f"{arr.shape[0] - 1}, the row index that pandas' DataFrame.to_csv writes by default; "
                              "it is dropped, not read as a feature. Write the file with to_csv(path, index=False) "
                              "to silence this.", UserWarning, stacklevel=3)
                arr = arr[:, 1:]
            else:
                warnings.warn(f"{what} file {str(p)!r}: the first column has no header name; it is read as a "
                              "feature, but it may be a row index (pandas' to_csv writes one, unnamed, unless "
                              "index=False). Drop it from the file, or give it a name to silence this.",
                              UserWarning, stacklevel=3)
        return arr
    raise errors[0]


def seed_arg(text: str) -> int:
    """``--seed`` of every subcommand: a non-negative integer, refused by argparse before any work (numpy's own
    message, 'expected non-negative integer', came after it and named no option)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, e.g. 0; got {text!r}")
    return value


def write_json_atomic(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)


def result_payload(res, objective: str, data: str, metric: str | None = None,
                   n_neighbors: int | None = None) -> dict:
    cert = res.certificate
    return {
        "data": data,
        "objective": objective,
        "metric": metric,
        "n_neighbors": n_neighbors,
        "method": res.method,
        "selected": res.selected.tolist(),
        "gains": res.gains.tolist(),
        "values": res.values.tolist(),
        "value": res.value,
        "n_evaluations": res.n_evaluations,
        "wall_time_s": res.wall_time,
        "stopped_early": res.stopped_early,
        "certificate": None if cert is None else {
            "upper_bound_on_opt": cert.upper_bound,
            "kind": cert.kind,
            "gamma_lower": cert.gamma_lower,
            "prefix_size": cert.prefix_size,
            "proven_approximation_ratio": cert.ratio,
        },
    }


def _run_select(args: argparse.Namespace) -> int:
    import submod

    if args.data is None:
        from sklearn.datasets import load_digits

        X = load_digits().data
        source = "scikit-learn digits (1797 images, 64 pixels)"
    else:
        X = load_matrix(args.data)
        source = args.data
    if args.out:  # found now, not as a temporary file's name after the work
        check_file_path(args.out, "--out", "selection.json")
    f = build_objective(args.objective, X, args.metric, args.n_neighbors)
    res = submod.maximize(f, args.k, method=args.method, seed=args.seed)
    metric = args.metric if args.objective in METRIC_OBJECTIVES else None
    payload = result_payload(res, args.objective, source, metric, args.n_neighbors)
    if args.out:
        write_json_atomic(payload, args.out)
    knn = "" if args.n_neighbors is None else f" ({args.n_neighbors} nearest neighbours)"
    print(f"data: {source}; objective: {args.objective}{knn}; method: {args.method}; k = {args.k}")
    print(f"selected (pick order): {res.selected.tolist()}")
    if res.stopped_early:
        print(f"stopped early: selected {res.selected.size} of k = {args.k} items, since no remaining item adds "
              f"value to the {args.objective} objective (duplicate items, or items it cannot tell apart"
              + ("; coverage reads every non-zero entry as 'covers', so on real-valued data one item covers "
                 "everything" if args.objective == "coverage" else "") + ").")
    print("value curve F(S_t):", " ".join(f"{v:.4g}" for v in res.values))
    if res.certificate is not None:
        c = res.certificate
        print(f"certificate: OPT <= {c.upper_bound:.6g} ({c.kind}); this run reaches at least "
              f"{100 * c.ratio:.2f}% of the optimum (proven).")
    else:
        print("certificate: none (the objective is not declared submodular and no proven gamma was given).")
    print(f"{res.n_evaluations} gain evaluations in {res.wall_time:.3f} s" + (f"; wrote {args.out}" if args.out
                                                                              else ""))
    return 0


def package_version() -> str:
    """The version of the installed ``submod`` distribution; from a source tree without package metadata (not
    installed, run with ``PYTHONPATH``), the package's own ``submod.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("submod")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="submod", description="Weakly submodular subset selection with "
                                     "checkable guarantees, and data-efficient structured pruning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the installed version of submod and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sel = sub.add_parser("select", help="select k items from a data file (or the digits data) and certify",
                         description="Select k items (rows) maximizing a submodular objective; print the picks, "
                         "the value curve and the certificate, and optionally write them as JSON.")
    sel.add_argument("--data", help=".npy, .csv or .txt file (text: UTF-8, one optional header row), rows are "
                     "items (default: scikit-learn digits)")
    sel.add_argument("--objective", choices=OBJECTIVES, default="facility-location",
                     help="set function over the items (default facility-location); coverage reads the data as an "
                          "items x concepts incidence matrix (a non-zero entry means 'covers'), so it needs 0/1 "
                          "or count data, not real-valued features")
    sel.add_argument("--metric", default="sqeuclidean", choices=("sqeuclidean", "euclidean", "cosine"),
                     help=f"distance of the {' and '.join(METRIC_OBJECTIVES)} objectives (default sqeuclidean); "
                          "an error with the others")
    sel.add_argument("--n-neighbors", type=int, default=None, metavar="K",
                     help="facility-location: keep each item's K nearest items only (sparse, O(n K) memory; for "
                          "many items)")
    sel.add_argument("-k", type=int, default=10, help="number of items to select (default 10)")
    sel.add_argument("--method", choices=("greedy", "lazy", "stochastic"), default="lazy",
                     help="optimizer: exact greedy, lazy greedy or stochastic greedy (default lazy)")
    sel.add_argument("--seed", type=seed_arg, default=0, help="seed of --method stochastic (default 0)")
    sel.add_argument("--out", help="write the result as JSON to this path")
    sel.set_defaults(func=_run_select)
    for module in ("nn_adapters.cli", "verification.cli"):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # Only a missing optional dependency (e.g. torch) is tolerated; other errors surface.
            missing = getattr(exc, "name", None) or ""
            if missing.split(".")[0] not in ("torch", "transformers", "tqdm", "nn_adapters", "verification"):
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``submod`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # a closed pipe shows here, not as 'Exception ignored' when the interpreter exits
        return status
    except BrokenPipeError:  # the reader left (submod select ... | head -1): stop quietly, as other tools do
        if sys.stdout is not None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush finds no pipe
        return 1
    except (ValueError, OSError) as exc:  # bad input, or an unreadable input / unwritable output path
        print(f"submod {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
