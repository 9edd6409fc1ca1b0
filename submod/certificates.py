"""Certified upper bounds on the optimum (``OPT``) from a run of greedy.

For any set ``A`` and a *proven lower* bound ``gamma`` on the submodularity ratio at ``L = A``,

    OPT_k <= F(A) + (1 / gamma) * (sum of the k largest marginal gains F(j | A)),

because ``F(OPT) <= F(OPT u A) = F(A) + F(OPT | A)`` (monotonicity) and ``gamma F(OPT | A) <= sum_{j in OPT}
F(j | A)`` (the definition of gamma). With ``gamma = 1`` this is the online bound of Leskovec et al. (KDD 2007),
valid only for submodular ``F``; on a non-submodular ``F`` it can fall below ``OPT`` (see docs/theory.rst), which is why
:func:`submod.maximize` only certifies functions declared submodular or given a proven ``gamma_lower`` (and any
function at ``k = 0``, where ``OPT_0 = F(empty)`` is known exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

from numpy.typing import ArrayLike

from ._validation import as_float_array
from .constraints import _top_sum

__all__ = ["Certificate", "online_bound"]


def online_bound(gains_at_A: ArrayLike, value_A: float, k: int, gamma_lower: float = 1.0) -> float:
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
        Budget of the optimum being bounded.
    gamma_lower : float, default 1.0
        A proven lower bound on gamma in ``(0, 1]``.

    Examples
    --------
    >>> import submod
    >>> submod.online_bound([3.0, 1.0, 2.0, 0.0], value_A=10.0, k=2)
    15.0
    """
    g = as_float_array(gains_at_A, "gains_at_A", ndim=1)
    if not (0.0 < gamma_lower <= 1.0):
        raise ValueError(f"gamma_lower must be in (0, 1]; got {gamma_lower}.")
    if k < 0:
        raise ValueError(f"k must be non-negative; got {k}.")
    return float(value_A) + _top_sum(g, k) / gamma_lower


@dataclass(frozen=True)
class Certificate:
    """A proven upper bound on the optimum of the problem a run solved.

    Attributes
    ----------
    upper_bound : float
        ``OPT <= upper_bound`` (a proven upper bound, given the declared assumptions). For a budget ``k = 0`` it is
        ``OPT_0 = F(empty)`` itself, exact for every objective.
    value : float
        Value of the returned set.
    gamma_lower : float
        The proven lower bound on the submodularity ratio used (1 for submodular functions, and for ``k = 0``,
        whose exact bound uses no ratio).
    prefix_size : int
        Size of the greedy prefix at which the minimum over prefixes was attained.
    kind : str
        Plain statement of what the bound is and what it rests on: ``"proven upper bound on OPT: ..."``, or
        ``"exact: ..."`` when ``upper_bound`` is the optimum itself (``k = 0``).
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
