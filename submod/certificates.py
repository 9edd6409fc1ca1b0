"""Certified upper bounds on the optimum (``OPT``) from a run of greedy.

For any set ``A`` and a *proven lower* bound ``gamma`` on the submodularity ratio at ``L = A``,

    OPT_k <= F(A) + (1 / gamma) * (sum of the k largest marginal gains F(j | A)),

because ``F(OPT) <= F(OPT u A) = F(A) + F(OPT | A)`` (monotonicity) and ``gamma F(OPT | A) <= sum_{j in OPT}
F(j | A)`` (the definition of gamma). With ``gamma = 1`` this is the online bound of Leskovec et al. (KDD 2007),
valid only for submodular ``F``; on a non-submodular ``F`` it can fall below ``OPT`` (see docs/theory.rst), which is why
:func:`submod.maximize` only certifies functions declared submodular or given a proven ``gamma_lower`` (and any
function whose only feasible set is the empty one, e.g. at ``k = 0``, where ``OPT = F(empty)`` is known exactly).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol

from numpy.typing import ArrayLike

from ._validation import as_float_array
from .constraints import _top_sum

__all__ = ["Certificate", "online_bound"]


class RatioBound(Protocol):
    """What a certificate reads from a ratio estimate passed as ``gamma_lower`` (e.g.
    ``verification.RatioEstimate``): its number and what that number is (``"exact"``, ``"lower bound"``, ...)."""

    value: float
    kind: str


#: Kinds of a ratio estimate (``verification.RatioEstimate.kind``) that may be used in a certificate: the exact
#: ratio or a proven lower bound on it; an upper bound or an empirical estimate may lie above the true ratio.
SOUND_RATIO_KINDS = ("exact", "lower bound")

_HOW_TO_PROVE = ("Pass a proven lower bound: verification.submodularity_ratio(f, k, method='spectral') for a "
                 "submod.SparseRegression, or method='exact' on a small ground set.")


def _is_ratio_estimate(x: object) -> bool:
    """Whether ``x`` is a ratio estimate that says what it is (duck-typed: ``submod`` does not import
    ``verification``)."""
    return hasattr(x, "value") and hasattr(x, "kind")


def _sound_ratio_value(estimate: RatioBound, k: int, outside_U: str) -> float:
    """The number of a ratio estimate that a certificate of ``OPT_k`` may use, or a clear error.

    Only the kinds in :data:`SOUND_RATIO_KINDS`, computed for ``|S| >= k`` (the ratio decreases with ``k``), over the
    whole ground set (``U`` absent or None; else ``outside_U`` is the error), with a value in ``(0, 1]``."""
    kind, how = estimate.kind, getattr(estimate, "method", "unknown")
    if kind not in SOUND_RATIO_KINDS:
        raise ValueError(f"gamma_lower is an {kind} (method {how!r}); a certificate needs a proven LOWER bound on "
                         "the submodularity ratio (kind 'exact' or 'lower bound'): it divides the gains by gamma, "
                         "and an upper bound or an estimate may exceed the true ratio, which can put the 'bound' "
                         f"below the optimum (see the theory page, Certificates). {_HOW_TO_PROVE}")
    est_k = getattr(estimate, "k", None)
    if est_k is not None and est_k < k:
        raise ValueError(f"gamma_lower was computed for |S| <= {est_k} but the certificate bounds OPT_{k}; "
                         f"recompute it with k >= {k}.")
    if getattr(estimate, "U", None) is not None:
        raise ValueError(outside_U)
    g = estimate.value
    if isinstance(g, bool) or not isinstance(g, numbers.Real) or not (0.0 < float(g) <= 1.0):
        raise ValueError(f"the proven lower bound on gamma is {g!r}, which gives no certificate (it must be in "
                         "(0, 1]); the function may be degenerate (dead or duplicate units).")
    return float(g)


def online_bound(gains_at_A: ArrayLike, value_A: float, k: int, gamma_lower: float | RatioBound = 1.0) -> float:
    """Upper bound on ``OPT_k``: ``F(A) + (1 / gamma_lower) * (sum of the k largest gains at A)``.

    Sound only when ``F`` is monotone and ``gamma_lower`` is a *proven lower* bound on the submodularity ratio
    ``gamma_{A, k}`` (``1`` for submodular functions). Negative gains count as 0.

    Parameters
    ----------
    gains_at_A : array of shape (n,)
        Marginal gains ``F(j | A)`` of every element (0 for members of ``A``).
    value_A : float
        ``F(A)``.
    k : int
        Budget of the optimum being bounded, a non-negative integer (a Python or numpy int; a float such as
        ``2.0`` or a bool is refused). ``k`` larger than the number of gains counts every gain.
    gamma_lower : float or RatioEstimate, default 1.0
        A proven lower bound on gamma in ``(0, 1]``. A number is trusted as such (the caller's responsibility). A
        ratio estimate that says what it is, such as the ``verification.RatioEstimate`` that
        :func:`verification.submodularity_ratio` returns (any object with ``value`` and ``kind``), is used when
        its kind is ``"exact"`` or ``"lower bound"``, it was computed for ``|S| >= k`` and over the whole ground
        set (``U=None``); an ``"upper bound"`` (method ``"sampled"`` or ``"greedy-path"``) or an ``"estimate"``
        is refused, since it may exceed the true ratio and the "bound" could then fall below the optimum.

    Returns
    -------
    float
        The upper bound on ``OPT_k``.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> submod.online_bound([3.0, 1.0, 2.0, 0.0], value_A=10.0, k=2)
    15.0

    For a function that is not submodular (least squares), pass a proven lower bound on its ratio:

    >>> import verification as vf
    >>> A = np.random.default_rng(0).standard_normal((50, 4))
    >>> f = submod.SparseRegression(A, A @ np.array([1.0, 2.0, 0.0, 0.5]))
    >>> est = vf.submodularity_ratio(f, 2, method="spectral")
    >>> est.kind
    'lower bound'
    >>> bound = submod.online_bound(f.gains([]), 0.0, 2, gamma_lower=est)
    >>> bool(bound >= max(f.value([i, j]) for i in range(4) for j in range(i)))    # OPT_2, by brute force
    True
    >>> sampled = vf.submodularity_ratio(f, 2, method="sampled", seed=0)           # an upper bound: refused
    >>> submod.online_bound(f.gains([]), 0.0, 2, gamma_lower=sampled)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: gamma_lower is an upper bound (method 'sampled'); a certificate needs a proven LOWER bound ...
    """
    g = as_float_array(gains_at_A, "gains_at_A", ndim=1)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        # a float k reached np.partition (TypeError 'Partition index must be integer'), and True counted as 1 gain
        raise ValueError(f"k must be a non-negative integer (the budget of OPT_k); got {k!r} of type "
                         f"{type(k).__name__}. Pass int(k) if it holds a whole number.")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be non-negative; got {k}.")
    if _is_ratio_estimate(gamma_lower):
        gamma = _sound_ratio_value(gamma_lower, k, outside_U=(
            "gamma_lower was computed for sets L inside a given U, and online_bound cannot check that A lies in U. "
            "Compute it over the whole ground set (U=None), or, having checked that A is inside U, pass its value "
            "as a number (trusted as a proven lower bound)."))
    elif isinstance(gamma_lower, bool) or not isinstance(gamma_lower, numbers.Real):
        raise ValueError(f"gamma_lower must be a number in (0, 1] or a ratio estimate with value and kind, such as "
                         f"verification.submodularity_ratio(f, k, method='spectral'); got "
                         f"{type(gamma_lower).__name__}.")
    else:
        gamma = float(gamma_lower)
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"gamma_lower must be in (0, 1]; got {gamma_lower}.")
    return float(value_A) + _top_sum(g, k) / gamma


@dataclass(frozen=True)
class Certificate:
    """A proven upper bound on the optimum of the problem a run solved.

    Attributes
    ----------
    upper_bound : float
        ``OPT <= upper_bound`` (a proven upper bound, given the declared assumptions). When only the empty set is
        feasible (a budget ``k = 0``, or a constraint that admits no element) it is ``OPT = F(empty)`` itself,
        exact for every objective.
    value : float
        Value of the returned set.
    gamma_lower : float
        The proven lower bound on the submodularity ratio used (1 for submodular functions, and when only the
        empty set is feasible, whose exact bound uses no ratio).
    prefix_size : int
        Size of the greedy prefix at which the minimum over prefixes was attained.
    kind : str
        Plain statement of what the bound is and what it rests on: ``"proven upper bound on OPT: ..."``, or
        ``"exact: ..."`` when ``upper_bound`` is the optimum itself (only the empty set is feasible).
    """

    upper_bound: float
    value: float
    gamma_lower: float
    prefix_size: int
    kind: str

    @property
    def ratio(self) -> float:
        """Proven lower bound on ``value / OPT`` for this run (1.0 when the bound is 0)."""
        return 1.0 if self.upper_bound <= 0 else min(1.0, self.value / self.upper_bound)
