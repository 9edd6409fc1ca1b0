"""Regenerate the figures of the verification tutorial (docs/tutorial_verify.rst).

Run from the repository root:  python docs/_static/verify_make_figures.py
Writes docs/_static/verify_layer_decay.png, verify_suppressor_decay.png, verify_suppressor_ratios.png and the
suppressor report's Markdown next to them (verify_suppressor_report.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import submod
import verification as vf
from verification.strategies import suppressor_data

HERE = Path(__file__).resolve().parent


def layer_instance(seed: int = 0) -> submod.SparseRegression:
    """A small ReLU layer: 48 hidden units feeding an 8-output consumer, 512 calibration samples."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((512, 16))
    W1 = rng.standard_normal((16, 48)) / 4.0
    A = np.maximum(X @ W1, 0.0)  # activations entering the consumer layer
    W2 = rng.standard_normal((48, 8))
    return submod.SparseRegression(A, A @ W2, fit_intercept=True)


def main() -> None:
    f = layer_instance()
    dec = vf.error_decay(f, 32)
    fig = dec.plot()
    fig.savefig(HERE / "verify_layer_decay.png")
    print("layer: lambda_min =", dec.lambda_min, "rho (estimate) =", dec.contraction, "all hold:", dec.all_hold)
    for b in dec.bounds:
        print(f"  {b.name:24s} at k=32: {b.values[-1] / dec.y_norm2:.3g} (measured {dec.relative_errors[-1]:.3g})")
    d = suppressor_data()
    rep = vf.report(submod.SparseRegression(d.A, d.Y), 2, HERE, prefix="verify_suppressor",
                    title="Verification report: suppressor instance")
    print("suppressor report:", rep.path, [p.name for p in rep.figures])


if __name__ == "__main__":
    main()
