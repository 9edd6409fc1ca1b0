"""Proven upper bounds on the optimum from any run, with the submodularity ratio checked for soundness.

For a monotone ``F``, any set ``A`` and a *proven lower* bound ``gamma`` on ``gamma_{A,k}``,
``OPT_k <= F(A) + (1/gamma) * (sum of the k largest gains F(j|A))`` (Das & Kempe 2011; with ``gamma = 1`` the
online bound of Leskovec et al. 2007). Minimising over the prefixes of a run certifies greedy, lazy, stochastic
or any other output. ``OPT_k <= F(V)`` too.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

import submod
from submod import SetFunction
from submod._validation import as_index_array, check_k

from ._serialise import ResultDict
from .ratio import RatioEstimate

__all__ = ["CertificateCheck", "certify", "prefix_bounds"]

#: ``F(V)`` is added to the certificate automatically up to this ground-set size (one state with ``n`` adds).
FULL_SET_AUTO_N = 2000
#: Relative shortfall of a bound below ``F(selected)`` that is attributed to floating-point rounding.
_ROUNDING = 1e-9


@dataclass(frozen=True)
class CertificateCheck(ResultDict):
    """A proven upper bound on ``OPT_k`` and what it rests on.

    Attributes
    ----------
    upper_bound : float
        ``OPT_k <= upper_bound`` (a proven upper bound, given ``gamma_lower``). Never below ``value`` by rounding
        alone when the certified set fits the budget: a bound within ``1e-9 * |value|`` under ``value`` is lifted
        to ``value`` (``OPT_k >= F(selected)``); a larger shortfall is kept, since it shows that ``gamma_lower``
        or ``F`` breaks the assumptions of the bound.
    value : float
        ``F`` of the certified set.
    k : int
        The budget of ``OPT_k``.
    gamma_lower : float
        The proven lower bound on the submodularity ratio used.
    gamma_source : str
        Why ``gamma_lower`` is a proven lower bound.
    prefix_size : int
        The prefix at which the minimum is attained (``-1`` when ``F(V)`` is smaller).
    prefix_bounds : ndarray
        The bound at each prefix used.
    full_set_value : float or None
        ``F(V)`` when computed.
    cost : dict
        The work done: ``gain_evaluations`` (marginal gains computed) and ``seconds``.
    kind : str
        What ``upper_bound`` is, in the vocabulary of every number the library reports about a guarantee:
        ``"proven upper bound on OPT_k"``, or, for a budget ``k = 0`` given explicitly, ``"exact: ..."``
        (``upper_bound`` is then ``OPT_0 = F(empty)`` itself, as in :func:`submod.maximize`'s certificate).

    ``to_dict()`` returns these attributes and ``ratio`` as JSON-serialisable builtins (arrays as lists, a
    non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``).
    """

    upper_bound: float
    value: float
    k: int
    gamma_lower: float
    gamma_source: str
    prefix_size: int
    prefix_bounds: np.ndarray
    full_set_value: float | None
    cost: dict[str, float] = field(default_factory=dict)
    kind: str = "proven upper bound on OPT_k"

    _derived = ("ratio",)

    @property
    def ratio(self) -> float:
        """Proven lower bound on ``value / OPT_k`` (1.0 when the bound is 0)."""
        return 1.0 if self.upper_bound <= 0 else min(1.0, self.value / self.upper_bound)


def _resolve_gamma(f: SetFunction, gamma_lower: object, k: int, selected: np.ndarray) -> tuple[float, str, int]:
    """Return ``(gamma, source, usable prefixes)`` or raise a ValueError saying what to pass instead."""
    how = ("Pass a proven lower bound: verification.submodularity_ratio(f, k, U=result.selected, "
           "method='spectral') for a submod.SparseRegression, or method='exact' on a small ground set.")
    n_prefix = selected.size + 1
    if gamma_lower is None:
        if f.submodular:
            return 1.0, "f is declared submodular (gamma = 1)", n_prefix
        raise ValueError(f"{type(f).__name__} is not declared submodular, so gamma = 1 (the submodular online "
                         "bound) is not valid: on non-submodular functions it can fall below the optimum. " + how)
    if isinstance(gamma_lower, RatioEstimate):
        if not gamma_lower.sound_lower:
            raise ValueError(f"gamma_lower is an {gamma_lower.kind} (method {gamma_lower.method!r}); a certificate "
                             "needs a proven LOWER bound (kind 'exact' or 'lower bound'). " + how)
        if gamma_lower.k < k:
            raise ValueError(f"gamma_lower was computed for |S| <= {gamma_lower.k} but the certificate bounds "
                             f"OPT_{k}; recompute it with k >= {k}.")
        if gamma_lower.U is not None:
            inside = np.isin(selected, np.asarray(gamma_lower.U, dtype=np.int64))
            n_prefix = int(np.argmin(inside)) + 1 if not inside.all() else selected.size + 1
        g = float(gamma_lower.value)
        if not (0.0 < g <= 1.0):
            raise ValueError(f"the proven lower bound on gamma is {g:g}, which gives no certificate (it must be "
                             "in (0, 1]); the function may be degenerate (dead or duplicate units).")
        return g, f"{gamma_lower.kind} from verification.submodularity_ratio(method={gamma_lower.method!r})", \
            n_prefix
    if isinstance(gamma_lower, bool) or not isinstance(gamma_lower, numbers.Real):
        raise ValueError(f"gamma_lower must be None, a RatioEstimate or a number; got {type(gamma_lower).__name__}.")
    g = float(gamma_lower)
    if not (0.0 < g <= 1.0):
        raise ValueError(f"gamma_lower must be in (0, 1]; got {g}. " + how)
    if g == 1.0 and not f.submodular:
        raise ValueError(f"gamma_lower = 1 on {type(f).__name__}, which is not declared submodular: that is the "
                         "submodular online bound, invalid for non-submodular functions. If F is proven "
                         "submodular, set its submodular attribute to True; otherwise " + how[0].lower() + how[1:])
    return g, "number supplied by the caller as a proven lower bound (the caller's responsibility)", n_prefix


def prefix_bounds(f: SetFunction, selected: np.ndarray, k: int, gamma: float, n_prefix: int | None = None
                  ) -> tuple[np.ndarray, int]:
    """``F(A_t) + (1/gamma) * (sum of the k largest gains at A_t)`` for the prefixes ``A_t``, ``t < n_prefix``.

    Soundness is the caller's business (``gamma`` must be a proven lower bound). Returns the bounds and the
    number of gain evaluations.
    """
    n_prefix = selected.size + 1 if n_prefix is None else n_prefix
    state = f.init_state()
    out = np.empty(n_prefix)
    evals = 0
    for t in range(n_prefix):
        g = np.asarray(state.gains(), dtype=np.float64)
        evals += g.size
        out[t] = submod.online_bound(g, float(state.value), k, gamma)
        if t < selected.size:
            state.add(int(selected[t]))
    return out, evals


def certify(f: SetFunction, result: submod.SelectionResult | ArrayLike, gamma_lower: object = None, *,
            k: int | None = None, use_full_set: bool | None = None) -> CertificateCheck:
    r"""A proven upper bound on ``OPT_k``, minimised over the prefixes of ``result``.

    Parameters
    ----------
    f : submod.SetFunction
        Monotone set function; one declared ``monotone=False`` is refused (the bounds need monotonicity).
    result : submod.SelectionResult or array of int
        The run to certify (its pick order defines the prefixes). A run of :func:`submod.maximize` under a
        ``Knapsack`` or ``PartitionMatroid`` constraint is refused: the bound here is on ``OPT_k`` under a
        cardinality budget, which can be below that problem's optimum; the run's own ``certificate`` bounds it.
    gamma_lower : None, RatioEstimate or float
        A *proven lower* bound on ``gamma_{U,k}`` with ``U`` containing the prefixes used. ``None`` is accepted
        only for functions declared submodular (``gamma = 1``). A :class:`RatioEstimate` is accepted only if its
        kind is ``"exact"`` or ``"lower bound"``, with ``k`` at least the budget; when its ``U`` misses part of
        the run, only the prefixes inside ``U`` are used. A number is trusted as a proven lower bound, except
        ``1`` on a function not declared submodular, which is refused.
    k : int, optional
        Budget of ``OPT_k``; default the size of ``result`` (which must then hold an element: an empty run does
        not say its budget). ``k = 0`` given explicitly is answered exactly: a budget of 0 admits only the empty
        set, so ``upper_bound = OPT_0 = F(empty)`` with ``kind`` starting ``"exact"``, for every function (no
        gain, ``gamma_lower`` or monotonicity is used; a ``gamma_lower`` passed anyway must still be valid).
    use_full_set : bool, optional
        Also use ``OPT_k <= F(V)``; default when ``n <= 2000``.

    Returns
    -------
    CertificateCheck

    Raises
    ------
    ValueError
        When ``gamma_lower`` is not a proven lower bound (an upper bound, an estimate, or ``gamma = 1`` on a
        function that is not declared submodular), with the way to obtain one; when ``result`` is a run made under
        a knapsack or matroid constraint; when ``f`` is declared ``monotone=False`` (unless ``k = 0``); when
        ``k`` is not given and ``result`` is empty (a budget of 0 inferred from a run that selected nothing may
        be a mistake: pass ``k=``).

    Examples
    --------
    >>> import numpy as np
    >>> import submod, verification as vf
    >>> f = submod.Modular([3.0, 1.0, 2.0])
    >>> cert = vf.certify(f, submod.maximize(f, 2))
    >>> cert.upper_bound, cert.ratio
    (5.0, 1.0)
    >>> zero = vf.certify(f, submod.maximize(f, 0), k=0)    # OPT_0 = F(empty), exactly
    >>> zero.upper_bound, zero.kind.startswith("exact")
    (0.0, True)
    >>> g = submod.from_callable(lambda S: float(len(S) ** 2), n=3)
    >>> vf.certify(g, [0, 1])
    Traceback (most recent call last):
    ...
    ValueError: CallableFunction is not declared submodular, so gamma = 1 ...
    """
    start = time.perf_counter()
    if not isinstance(f, SetFunction):
        raise ValueError(f"f must be a submod.SetFunction; got {type(f).__name__}.")
    k_given = None if k is None else check_k(k, f.n)
    if not f.monotone and k_given != 0:  # OPT_0 = F(empty) needs no monotonicity
        # F(A) + (1/gamma) * (k largest gains) and F(V) bound OPT_k only through F(OPT) <= F(OPT u A): for a
        # non-monotone F both can fall below the optimum (the cut of one edge: both are 0, OPT_1 = 1)
        raise ValueError(f"{type(f).__name__} is declared monotone=False, and every bound certify computes "
                         "(F(A) + (1/gamma) * the k largest gains, and F(V)) holds for monotone functions only: on "
                         "a non-monotone F they can fall below the optimum. There is no certificate here; if F is "
                         "in fact monotone, declare it (monotone=True in submod.from_callable, or the class "
                         "attribute monotone = True).")
    constraint = getattr(result, "constraint", None) if isinstance(result, submod.SelectionResult) else None
    if constraint is not None:
        # The bound below is on OPT_k under a cardinality budget: for a knapsack or matroid run it can fall below
        # that problem's optimum (a knapsack optimum may hold more, cheaper elements than the run picked).
        raise ValueError(f"this run was made under a {type(constraint).__name__} constraint, and certify bounds "
                         "OPT_k under a cardinality budget only, which is not that problem's optimum. Use the run's "
                         "own result.certificate (maximize bounds the constrained optimum), or pass "
                         "result.selected to certify a bound on OPT_k explicitly.")
    raw = result.selected if isinstance(result, submod.SelectionResult) else result
    selected = as_index_array(raw, f.n, "result")
    if k_given == 0:
        return _budget_zero_check(f, selected, gamma_lower, start)
    kk = selected.size if k_given is None else k_given
    if kk == 0:
        # an empty run says nothing about its budget: reading it as k = 0 would answer OPT_0 = F(empty) for a
        # run whose budget was larger (greedy stops early when no gain is positive)
        raise ValueError("the run selected nothing, so its budget cannot be inferred from its size: pass k= the "
                         "budget to bound OPT_k (k=0 gives OPT_0 = F(empty) exactly).")
    gamma, source, n_prefix = _resolve_gamma(f, gamma_lower, kk, selected)
    bounds, evals = prefix_bounds(f, selected, kk, gamma, n_prefix)
    value = f.value(selected)
    full = None
    if use_full_set if use_full_set is not None else f.n <= FULL_SET_AUTO_N:
        full = f.value(np.arange(f.n))
    best = int(np.argmin(bounds))
    upper, prefix = float(bounds[best]), best
    if full is not None and full < upper:
        upper, prefix = float(full), -1
    if selected.size <= kk and upper < value <= upper + _ROUNDING * max(abs(value), abs(upper)):
        # OPT_k >= F(selected): a bound below it by rounding alone (F(V) or F(A_t) summed in another order than
        # F(selected), e.g. when the selection already explains everything) is lifted to it. A larger shortfall
        # is left visible: it means gamma_lower or F breaks the theorem's assumptions.
        upper = float(value)
    return CertificateCheck(upper_bound=upper, value=float(value), k=kk, gamma_lower=gamma, gamma_source=source,
                            prefix_size=prefix, prefix_bounds=bounds, full_set_value=full,
                            cost={"gain_evaluations": evals, "seconds": time.perf_counter() - start})


def _budget_zero_check(f: SetFunction, selected: np.ndarray, gamma_lower: object, start: float
                       ) -> CertificateCheck:
    """The answer for a budget ``k = 0`` given explicitly: ``OPT_0 = F(empty)``, exactly.

    A budget of 0 admits only the empty set, so its optimum is known without any gain, submodularity ratio or
    monotonicity (as :func:`submod.maximize`'s certificate at ``k = 0``). A ``gamma_lower`` passed anyway is
    still checked, so that a wrong one is reported as it would be for any other budget; ``gamma_lower`` is 1 in
    the answer: no gain is divided by a ratio, and ``gamma_{U,0} = 1`` by ``0/0 := 1``."""
    if gamma_lower is not None:
        _resolve_gamma(f, gamma_lower, 0, selected)
    empty = float(f.value(np.zeros(0, dtype=np.int64)))
    return CertificateCheck(upper_bound=empty, value=float(f.value(selected)), k=0, gamma_lower=1.0,
                            gamma_source="none needed: k = 0 admits only the empty set", prefix_size=0,
                            prefix_bounds=np.array([empty]), full_set_value=None,
                            cost={"gain_evaluations": 0, "seconds": time.perf_counter() - start},
                            kind="exact: OPT_0 = F(empty set), the only set a budget of k = 0 allows (no gain, "
                                 "submodularity ratio or monotonicity used)")
