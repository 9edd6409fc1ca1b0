"""verification: check the guarantees of weakly submodular selection on your own objective.

* :func:`submodularity_ratio` computes (``"exact"``), bounds from below (``"spectral"``, least squares), or
  bounds from above (``"sampled"``, ``"greedy-path"``) the submodularity ratio ``gamma_{U,k}``;
* :func:`check_guarantee` compares greedy, lazy and stochastic greedy with a brute-force optimum and the
  ``1 - exp(-gamma)`` (Das & Kempe 2011) and Bian et al. (2017) bounds;
* :func:`certify` gives a proven upper bound on the optimum from any run, refusing an unproven ``gamma``;
* :func:`error_decay` checks the exponential decay of the least-squares residual along the greedy path against
  the sound bounds and fits the empirical contraction factor;
* :func:`report` writes all of it as Markdown with PNG figures;
* :mod:`verification.strategies` builds random instances for property-based tests (hypothesis).

Every number says whether it is exact, a proven lower bound, a proven upper bound or an empirical estimate.
This package imports :mod:`submod` and never torch.
"""

from .certify import CertificateCheck, certify
from .decay import ErrorDecay, error_decay
from .guarantee import GuaranteeCheck, check_guarantee
from .ratio import RatioEstimate, submodularity_ratio
from .report import report

__all__ = ["CertificateCheck", "ErrorDecay", "GuaranteeCheck", "RatioEstimate", "certify", "check_guarantee",
           "error_decay", "report", "submodularity_ratio"]


def __getattr__(name: str) -> object:
    """``vf.strategies`` after a plain ``import verification as vf``: imported on first use, since it needs
    hypothesis (the ``test`` extra), which the rest of the package does not."""
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
