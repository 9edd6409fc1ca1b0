"""The ``submod verify`` command: run every applicable check on an objective built from files, write a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from submod.cli import load_matrix, seed_arg

OBJECTIVES = ("sparse-regression", "facility-location", "feature-based", "coverage", "modular")

#: Exit status of ``submod verify`` when a guarantee that is a theorem, or a proven error bound, fails on the
#: instance (2 is bad input, as for every ``submod`` command; 0 is everything holds).
GUARANTEE_FAILED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand to the ``submod`` command line."""
    p = subparsers.add_parser(
        "verify", help="check greedy's guarantees on an objective and write a Markdown + PNG report",
        description="Build an objective from arrays (.npy, .csv or .txt), compute the submodularity ratio (exact, "
                    "proven lower bound, upper bounds), check the guarantees against brute force on small "
                    "ground sets, certify the optimum, and (least squares) check the exponential error decay. "
                    "The report says which statements are guaranteed and which are estimates.",
        epilog="exit status: 0 when every proven guarantee and bound holds on the instance; "
               f"{GUARANTEE_FAILED} when one fails (the report is written and says which: a defect in the objective, "
               "e.g. a value oracle that is not a function of the set, or in submod); 2 for bad input.  "
               "example: submod verify --data X.npy --objective sparse-regression --targets Y.npy -k 5 "
               "--out report_dir")
    p.add_argument("--data", required=True, type=Path,
                   help="array file: inputs A (n_samples x columns) for sparse-regression; item features for "
                        "facility-location / feature-based; incidence (items x concepts) for coverage; weights "
                        "for modular")
    p.add_argument("--objective", choices=OBJECTIVES, default="sparse-regression",
                   help="how the set function is built from --data (default sparse-regression)")
    p.add_argument("--targets", type=Path, help="targets Y for sparse-regression (rows like --data)")
    p.add_argument("-k", type=int, required=True, help="budget (number of units to keep)")
    p.add_argument("--out", type=Path, required=True, help="report directory (created if needed)")
    p.add_argument("--group-size", type=int, default=None,
                   help="sparse-regression: consecutive blocks of this many columns form one unit")
    p.add_argument("--ridge", type=float, default=0.0, help="sparse-regression: ridge penalty (default 0)")
    p.add_argument("--fit-intercept", action="store_true", help="sparse-regression: refit a bias")
    p.add_argument("--k-max", type=int, default=None,
                   help="sparse-regression: longest prefix of the error-decay curve (default min(n, max(2k, 10)))")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the sampled ratio (default 0)")
    p.add_argument("--samples", type=int, default=500, help="random pairs of the sampled ratio (default 500)")
    p.add_argument("--no-figures", action="store_true", help="write the Markdown only")
    p.set_defaults(func=run)


def build_objective(args: argparse.Namespace):
    """The :class:`submod.SetFunction` described by the command-line arguments."""
    import submod
    from submod.sparse_regression import SparseRegression

    # the command's own names in the messages (report() and SparseRegression say n_samples, out_dir, groups=)
    for flag, value in (("--group-size", args.group_size), ("--k-max", args.k_max), ("--samples", args.samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer; got {value}.")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file; pass a directory for the report (created if needed).")
    X = load_matrix(args.data, "--data", allow_1d=args.objective == "modular")  # modular: a weight vector
    if args.objective == "sparse-regression":
        if args.targets is None:
            raise ValueError("--objective sparse-regression needs --targets Y.npy (the outputs to reconstruct; "
                             "for self-reconstruction pass the --data file again).")
        Y = load_matrix(args.targets, "--targets", allow_1d=True)
        d = X.shape[1]
        if args.group_size is not None and d % args.group_size:
            divisors = [g for g in range(2, d) if d % g == 0]
            raise ValueError(f"--group-size {args.group_size} does not split the {d} columns of --data into blocks; "
                             f"pass a divisor of {d}" + (f" ({', '.join(map(str, divisors))})" if divisors else "")
                             + " or drop it (one unit per column).")
        if args.k_max is not None and args.k_max > d // (args.group_size or 1):
            raise ValueError(f"--k-max {args.k_max} exceeds the number of units ({d // (args.group_size or 1)}); "
                             "pass at most that.")
        return SparseRegression(X, Y, ridge=args.ridge, groups=args.group_size,
                                       fit_intercept=args.fit_intercept)
    # the least-squares options would be silently ignored by the other objectives: refuse them as --targets is
    unused = [flag for flag, given in (("--targets", args.targets is not None),
                                       ("--group-size", args.group_size is not None), ("--ridge", args.ridge != 0),
                                       ("--fit-intercept", args.fit_intercept),
                                       ("--k-max", args.k_max is not None)) if given]
    if unused:
        raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} only used with --objective "
                         f"sparse-regression (least squares and its error-decay curve), not {args.objective}; drop "
                         f"{'it' if len(unused) == 1 else 'them'}.")
    if args.objective == "facility-location":
        return submod.FacilityLocation(X)
    if args.objective == "feature-based":
        return submod.FeatureBased(X)
    if args.objective == "coverage":
        return submod.Coverage(X)
    if X.ndim == 2 and min(X.shape) > 1:  # one row or one column is a weight vector; a table is not
        raise ValueError(f"--objective modular takes one weight per item: a 1-D array, or a single row or column; "
                         f"got a {X.shape[0]} x {X.shape[1]} array. Pass the weight vector (e.g. one column of "
                         "this file saved on its own), or choose an objective that reads items x features.")
    return submod.Modular(np.ravel(X))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``submod verify``; returns the exit status: 0 when every proven guarantee and bound holds,
    :data:`GUARANTEE_FAILED` (3) when one fails (the report is still written), 2 for bad input."""
    from .report import report

    try:
        f = build_objective(args)
        rep = report(f, args.k, args.out, seed=args.seed, n_samples=args.samples, k_max=args.k_max,
                     figures=not args.no_figures, title=f"Verification report: {args.objective}")
    except ValueError as exc:
        print(f"submod verify: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rep.path}" + "".join(f"\nwrote {p}" for p in rep.figures))
    status = 0
    if rep.guarantee is not None and not rep.guarantee.all_hold:
        print("submod verify: FAILED: a guarantee that is a theorem failed on this instance; see the report.",
              file=sys.stderr)
        status = GUARANTEE_FAILED
    if rep.decay is not None and not rep.decay.all_hold:
        print("submod verify: FAILED: the measured error exceeds a proven bound; see the report.", file=sys.stderr)
        status = GUARANTEE_FAILED
    return status
