"""Constraints for :func:`submod.maximize` beyond the cardinality budget ``k``.

Each constraint validates itself against the ground set and hands the optimizer a small tracker that says which
candidates are still feasible. It also bounds the best total gain a feasible set can collect, which is what the
online certificates need (``OPT <= F(A) + sum of gains of the best feasible set``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._validation import as_float_array, frozen

__all__ = ["Constraint", "Knapsack", "PartitionMatroid"]


class Constraint:
    """Base class of constraints; see :class:`Knapsack` and :class:`PartitionMatroid`."""

    guarantee: str = ""

    def _check(self, n: int) -> None:
        raise NotImplementedError

    def _tracker(self, n: int) -> _Tracker:
        raise NotImplementedError

    def _max_total_gain(self, gains: np.ndarray, k: int) -> float:
        """Largest total of ``max(gains, 0)`` over a relaxation of the feasible sets of size <= k."""
        raise NotImplementedError

    def _max_picks(self, n: int) -> int:
        """Most elements a feasible set can hold (``n`` unless the constraint says fewer)."""
        return n


class _Tracker:
    def __init__(self, n: int) -> None:
        self.allowed = np.ones(n, dtype=bool)

    def add(self, j: int) -> None:
        self.allowed[j] = False


def _top_sum(values: np.ndarray, k: int) -> float:
    """Sum of the ``k`` largest of ``max(values, 0)`` (clipping commutes with taking the largest)."""
    v = np.asarray(values, dtype=np.float64)
    if k <= 0 or v.size == 0:
        return 0.0
    top = v if k >= v.size else np.partition(v, v.size - k)[v.size - k:]
    return float(np.maximum(top, 0.0).sum())


class Cardinality(Constraint):
    """At most ``k`` elements (the default constraint; pass ``k`` to :func:`submod.maximize`)."""

    guarantee = "1 - 1/e for monotone submodular F (Nemhauser, Wolsey & Fisher 1978); 1 - exp(-gamma) for " \
                "gamma-weakly submodular F (Das & Kempe 2011)."

    def _check(self, n: int) -> None:
        return None

    def _tracker(self, n: int) -> _Tracker:
        return _Tracker(n)

    def _max_total_gain(self, gains: np.ndarray, k: int) -> float:
        return _top_sum(gains, k)


class Knapsack(Constraint):
    r"""Knapsack constraint ``sum_{j in S} costs[j] <= budget``.

    :func:`submod.maximize` runs cost-benefit greedy (largest gain per unit cost among affordable elements) and
    returns the better of its set and the best affordable singleton. For monotone submodular ``F`` this is at
    least ``(1 - 1/e) / 2`` of the optimum (Krause & Guestrin 2005; Leskovec et al. 2007).

    Parameters
    ----------
    costs : array of shape (n,)
        Positive costs.
    budget : float
        Non-negative budget.

    Examples
    --------
    >>> import submod
    >>> f = submod.Modular([5.0, 4.0, 3.0])
    >>> res = submod.maximize(f, None, constraint=submod.Knapsack([3.0, 1.0, 1.0], budget=2.0))
    >>> sorted(res.selected.tolist())
    [1, 2]
    """

    guarantee = "(1 - 1/e) / 2 of the optimum for monotone submodular F (cost-benefit greedy with the " \
                "best-singleton fix; Krause & Guestrin 2005, Leskovec et al. 2007)."

    def __init__(self, costs: ArrayLike, budget: float) -> None:
        c = as_float_array(costs, "costs", ndim=1)
        if np.any(c <= 0):
            raise ValueError("knapsack costs must be positive; give free elements a tiny positive cost.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
            raise ValueError(f"budget must be a number (the largest total cost allowed); got {budget!r}.")
        if not np.isfinite(budget) or budget < 0:
            raise ValueError(f"budget must be a finite non-negative number; got {budget}.")
        self.costs = frozen(c)
        self.budget = float(budget)

    def _check(self, n: int) -> None:
        if self.costs.size != n:
            raise ValueError(f"Knapsack has {self.costs.size} costs but the ground set has {n} elements; "
                             "pass one cost per element.")

    def _tracker(self, n: int) -> _KnapsackTracker:
        return _KnapsackTracker(self)

    def _max_total_gain(self, gains: np.ndarray, k: int) -> float:
        # Two relaxations of "at most k items within the budget", each an upper bound on the best feasible total:
        # the fractional knapsack (LP relaxation, no count limit) and the k largest gains (no budget); the
        # smaller one is the bound.
        g = np.maximum(gains, 0.0)
        pos = np.flatnonzero(g > 0)
        if pos.size == 0 or self.budget <= 0:
            return 0.0
        order = pos[np.argsort(-g[pos] / self.costs[pos], kind="stable")]
        cum = np.cumsum(self.costs[order])
        whole = int(np.searchsorted(cum, self.budget, side="right"))  # items that fit entirely
        total = float(g[order[:whole]].sum())
        if whole < order.size:
            room = self.budget - (float(cum[whole - 1]) if whole else 0.0)
            total += room / float(self.costs[order[whole]]) * float(g[order[whole]])
        return min(total, _top_sum(g, k))


class _KnapsackTracker(_Tracker):
    def __init__(self, c: Knapsack) -> None:
        super().__init__(c.costs.size)
        self.costs = c.costs
        self.remaining = c.budget
        # Room for the rounding of the running subtraction only: relative to the budget, so that tiny costs
        # (1e-13 each) are held to their budget as large ones are.
        self.tol = 1e-12 * c.budget
        self.allowed &= self.costs <= self.remaining

    def add(self, j: int) -> None:
        self.allowed[j] = False
        self.remaining -= self.costs[j]
        self.allowed &= self.costs <= self.remaining + self.tol


class PartitionMatroid(Constraint):
    r"""Partition matroid: at most ``budgets[g]`` elements from each group ``g``.

    Greedy is a 1/2-approximation for monotone submodular ``F`` (Fisher, Nemhauser & Wolsey 1978). Pruning uses
    it for per-layer budgets when all layers share one ground set.

    Parameters
    ----------
    groups : array of shape (n,)
        Non-negative integer group label of each element. Labels need not be consecutive: with one int budget
        they may be any such integers (``[0, 10**12, 7]``); with an array of budgets they index it.
    budgets : int or array of shape (n_groups,)
        Maximum number of picks per group (one int applies to every group present). An array sets the number of
        groups, ``n_groups = len(budgets)``; a group may have no element (its labels are then simply absent),
        but every label must be below ``len(budgets)``.

    Attributes
    ----------
    groups : array of int64, shape (n,)
        The labels, read-only.
    budgets : array of int64, shape (n_groups,)
        The budget of each label ``0, ..., n_groups - 1``: the array given, or the int repeated up to the largest
        label. The constraint itself stores one budget per label present (memory ``O(n)`` whatever the labels):
        this array is built when read, and with one int budget its length is the largest label plus one.

    Examples
    --------
    >>> import submod
    >>> f = submod.Modular([5.0, 4.0, 3.0, 1.0])
    >>> c = submod.PartitionMatroid(groups=[0, 0, 1, 1], budgets=1)
    >>> submod.maximize(f, 4, constraint=c).selected.tolist()
    [0, 2]
    >>> c = submod.PartitionMatroid(groups=[10**12, 10**12, 3, 3], budgets=1)   # no slot per label up to 10**12
    >>> submod.maximize(f, 4, constraint=c).selected.tolist()
    [0, 2]
    """

    guarantee = "1/2 of the optimum for monotone submodular F (Fisher, Nemhauser & Wolsey 1978)."

    def __init__(self, groups: ArrayLike, budgets: int | ArrayLike) -> None:
        g = np.asarray(groups)
        if g.ndim != 1 or g.size == 0:
            raise ValueError("groups must be a non-empty 1-D array with one label per element.")
        if not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError("group labels must be non-negative integers.")
        if int(g.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"group labels must fit in int64 (at most {np.iinfo(np.int64).max}); got {g.max()}. "
                             "Renumber the groups, e.g. with np.unique(groups, return_inverse=True)[1].")
        # The groups present, and each element's position among them: the tracker and the bounds work on these,
        # so the memory is O(n) however large the labels are (one slot per label up to the largest was 8 TB for
        # a label of 10**12).
        labels, position = np.unique(g, return_inverse=True)
        n_labelled = int(labels[-1]) + 1
        b = np.asarray(budgets)
        if b.ndim == 0 and np.issubdtype(b.dtype, np.integer):
            if b < 0:
                raise ValueError("budgets must be non-negative.")
            self._scalar_budget: int | None = int(b)
            self._budget_array: np.ndarray | None = None
            present = np.full(labels.size, int(b), dtype=np.int64)
        else:
            if b.ndim != 1 or not np.issubdtype(b.dtype, np.integer):
                raise ValueError(f"budgets must be an int or a 1-D array of integers, one per group (labels reach "
                                 f"{n_labelled - 1}, so at least {n_labelled}); got {budgets!r}.")
            # More budgets than labels present is fine: the groups without elements (e.g. labels of a subsample)
            # simply allow no pick.
            if b.size < n_labelled:
                raise ValueError(f"budgets has {b.size} entries but the group labels reach {n_labelled - 1}; pass "
                                 f"budgets with one per group ({n_labelled} or more), or an int for every group.")
            if np.any(b < 0):
                raise ValueError("budgets must be non-negative.")
            self._scalar_budget = None
            self._budget_array = b.astype(np.int64)
            self._budget_array.flags.writeable = False
            present = self._budget_array[labels]
        self.groups = g.astype(np.int64)
        self.groups.flags.writeable = False
        self._labels = labels.astype(np.int64)
        self._position = position.reshape(-1).astype(np.int64)   # index into _labels of each element's group
        self._present_budgets = present                          # budget of each group present

    @property
    def budgets(self) -> np.ndarray:
        """The budget of each label ``0, ..., n_groups - 1`` (read-only; see the class's Attributes)."""
        if self._budget_array is not None:
            return self._budget_array
        out = np.full(int(self._labels[-1]) + 1, self._scalar_budget, dtype=np.int64)
        out.flags.writeable = False
        return out

    def _check(self, n: int) -> None:
        if self.groups.size != n:
            raise ValueError(f"PartitionMatroid has {self.groups.size} group labels but the ground set has {n} "
                             "elements; pass one label per element.")

    def _tracker(self, n: int) -> _PartitionTracker:
        return _PartitionTracker(self)

    def _max_picks(self, n: int) -> int:
        sizes = np.bincount(self._position, minlength=self._labels.size)
        return int(np.minimum(sizes, self._present_budgets).sum())  # the matroid's rank

    def _max_total_gain(self, gains: np.ndarray, k: int) -> float:
        g = np.maximum(gains, 0.0)
        keep = np.zeros(g.size, dtype=bool)
        order = np.lexsort((-g, self._position))                  # by group, then by decreasing gain
        grp = self._position[order]
        first = np.searchsorted(grp, grp, side="left")            # position of each group's first element
        rank = np.arange(order.size) - first                      # rank of the gain inside its group
        keep[order] = rank < self._present_budgets[grp]
        return _top_sum(g[keep], k)


class _PartitionTracker(_Tracker):
    def __init__(self, c: PartitionMatroid) -> None:
        super().__init__(c.groups.size)
        self.groups = c._position
        self.left = c._present_budgets.copy()
        self.allowed &= self.left[self.groups] > 0

    def add(self, j: int) -> None:
        self.allowed[j] = False
        grp = self.groups[j]
        self.left[grp] -= 1
        if self.left[grp] <= 0:
            self.allowed[self.groups == grp] = False
