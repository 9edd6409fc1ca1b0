"""Constraints for :func:`submod.maximize` beyond the cardinality budget ``k``.

Each constraint validates itself against the ground set and hands the optimizer a small tracker that says which
candidates are still feasible. It also bounds the best total gain a feasible set can collect, which is what the
online certificates need (``OPT <= F(A) + sum of gains of the best feasible set``).
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType

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
    groups : array or sequence of shape (n,)
        Group label of each element. Either non-negative integers, or any hashable labels (strings such as layer
        names, tuples, ...; compared as dict keys are, so ``1`` and ``1.0`` name one group; a label not equal to
        itself, such as NaN, is refused). Integer labels need not be consecutive: with one int budget or a dict
        they may be any such integers (``[0, 10**12, 7]``); with an array of budgets they index it.
    budgets : int, array of shape (n_groups,) or dict
        Maximum number of picks per group. One int applies to every group present. A dict ``{label: budget}``
        must give every label present in ``groups`` a budget and name no other label (an unknown key is most
        likely a typo, so it is refused rather than ignored). An array, for integer labels only, sets the number
        of groups, ``n_groups = len(budgets)``; a group may have no element (its labels are then simply absent),
        but every label must be below ``len(budgets)``.

    Attributes
    ----------
    groups : array of shape (n,)
        The labels, read-only: int64 for integer labels, else an object array of the labels given.
    budgets : array of int64 of shape (n_groups,), or mapping
        For integer labels with an int or an array of budgets: the budget of each label ``0, ..., n_groups - 1``,
        the array given or the int repeated up to the largest label. The constraint itself stores one budget per
        label present (memory ``O(n)`` whatever the labels): this array is built when read, and with one int budget
        its length is the largest label plus one. Otherwise (a dict of budgets, or labels that are not integers): a
        read-only mapping ``{label: budget}`` over the labels present, in order of first appearance in ``groups``.

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

    Labels can be names, with a budget per name:

    >>> c = submod.PartitionMatroid(["fc1", "fc1", "fc2", "fc2"], budgets={"fc1": 2, "fc2": 0})
    >>> submod.maximize(f, 4, constraint=c).selected.tolist()
    [0, 1]
    >>> dict(c.budgets)
    {'fc1': 2, 'fc2': 0}
    """

    guarantee = "1/2 of the optimum for monotone submodular F (Fisher, Nemhauser & Wolsey 1978)."

    def __init__(self, groups: ArrayLike | Sequence[Hashable],
                 budgets: int | ArrayLike | Mapping[Hashable, int]) -> None:
        g = _label_array(groups)
        if np.issubdtype(g.dtype, np.integer):
            self._init_integer_labels(g, budgets)
        else:
            self._init_hashable_labels(g, budgets)

    def _init_integer_labels(self, g: np.ndarray, budgets: object) -> None:
        """Non-negative integer labels: one int, an array indexed by label, or a dict of budgets."""
        if g.min() < 0:
            raise ValueError("integer group labels must be non-negative (an array of budgets is indexed by them); "
                             "renumber them, e.g. with np.unique(groups, return_inverse=True)[1], or use other "
                             "labels such as strings.")
        if int(g.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"group labels must fit in int64 (at most {np.iinfo(np.int64).max}); got {g.max()}. "
                             "Renumber the groups, e.g. with np.unique(groups, return_inverse=True)[1].")
        # The groups present, and each element's position among them: the tracker and the bounds work on these,
        # so the memory is O(n) however large the labels are (one slot per label up to the largest was 8 TB for
        # a label of 10**12).
        labels, position = np.unique(g, return_inverse=True)
        n_labelled = int(labels[-1]) + 1
        self._budget_map: Mapping[Hashable, int] | None = None
        self._scalar_budget: int | None = None
        self._budget_array: np.ndarray | None = None
        if isinstance(budgets, Mapping):
            self._budget_map = _budget_mapping(budgets, labels.tolist())
            present = np.fromiter(self._budget_map.values(), dtype=np.int64, count=labels.size)
        else:
            b = np.asarray(budgets)
            if b.ndim == 0 and np.issubdtype(b.dtype, np.integer):
                if b < 0:
                    raise ValueError("budgets must be non-negative.")
                self._scalar_budget = int(b)
                present = np.full(labels.size, int(b), dtype=np.int64)
            else:
                if b.ndim != 1 or not np.issubdtype(b.dtype, np.integer):
                    raise ValueError(f"budgets must be an int, a dict {{label: budget}} or a 1-D array of integers, "
                                     f"one per group (labels reach {n_labelled - 1}, so at least {n_labelled}); "
                                     f"got {budgets!r}.")
                # More budgets than labels present is fine: the groups without elements (e.g. labels of a
                # subsample) simply allow no pick.
                if b.size < n_labelled:
                    raise ValueError(f"budgets has {b.size} entries but the group labels reach {n_labelled - 1}; "
                                     f"pass budgets with one per group ({n_labelled} or more), or an int for every "
                                     "group.")
                if np.any(b < 0):
                    raise ValueError("budgets must be non-negative.")
                self._budget_array = b.astype(np.int64)
                self._budget_array.flags.writeable = False
                present = self._budget_array[labels]
        self.groups = g.astype(np.int64)
        self.groups.flags.writeable = False
        self._labels = labels.astype(np.int64)
        self._position = position.reshape(-1).astype(np.int64)   # index into _labels of each element's group
        self._present_budgets = present                          # budget of each group present

    def _init_hashable_labels(self, g: np.ndarray, budgets: object) -> None:
        """Labels of any other kind (names): one int or a dict of budgets; groups numbered by first appearance."""
        index: dict[Hashable, int] = {}
        position = np.empty(g.size, dtype=np.int64)
        for i, label in enumerate(g):
            try:
                hash(label)
            except TypeError:
                raise ValueError(f"group label {label!r} (element {i}) is not hashable; labels must be hashable, "
                                 "such as ints, strings or tuples.") from None
            if label != label:
                raise ValueError(f"group label {label!r} (element {i}) is not equal to itself, so it cannot name a "
                                 "group; replace it (e.g. NaN by a string such as 'none').")
            position[i] = index.setdefault(label, len(index))
        labels = list(index)
        self._scalar_budget = None
        self._budget_array = None
        if isinstance(budgets, Mapping):
            self._budget_map = _budget_mapping(budgets, labels)
        elif _is_int(budgets):
            if budgets < 0:
                raise ValueError("budgets must be non-negative.")
            self._budget_map = MappingProxyType(dict.fromkeys(labels, int(budgets)))
        else:
            raise ValueError(f"with group labels that are not integers (such as {labels[0]!r}), budgets must be one "
                             f"int or a dict {{label: budget}}; an array of budgets indexes integer labels only. Got "
                             f"{budgets!r}.")
        self.groups = g
        self.groups.flags.writeable = False
        self._labels = np.empty(len(labels), dtype=object)
        for i, label in enumerate(labels):  # one by one: a tuple label must not become a row
            self._labels[i] = label
        self._position = position
        self._present_budgets = np.fromiter(self._budget_map.values(), dtype=np.int64, count=len(labels))

    @property
    def budgets(self) -> np.ndarray | Mapping[Hashable, int]:
        """The budget of each label: an array over ``0, ..., n_groups - 1`` or a mapping (read-only; see the
        class's Attributes)."""
        if self._budget_map is not None:
            return self._budget_map
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


def _is_int(x: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _label_array(groups: object) -> np.ndarray:
    """``groups`` as a 1-D array: integer dtype when every label is an integer (numpy's own reading, as before),
    else a new object array holding the labels as given (a list of tuples must not become a 2-D array, nor a mix of
    strings and ints all strings)."""
    bad = ValueError("groups must be a non-empty 1-D array or sequence with one label per element.")
    if isinstance(groups, (str, bytes)):
        raise bad
    if isinstance(groups, np.ndarray):
        if groups.ndim != 1 or groups.size == 0:
            raise bad
        if np.issubdtype(groups.dtype, np.integer):
            return groups
        items = groups.tolist()
    else:
        try:
            items = list(groups)
        except TypeError:
            raise bad from None
        if not items:
            raise bad
        try:
            g = np.asarray(items)
        except ValueError:  # ragged: tuples of several lengths
            g = None
        if g is not None and g.ndim == 1 and np.issubdtype(g.dtype, np.integer):
            return g
    out = np.empty(len(items), dtype=object)
    for i, label in enumerate(items):
        out[i] = label
    return out


def _budget_mapping(budgets: Mapping[Hashable, object], labels: list[Hashable]) -> Mapping[Hashable, int]:
    """A read-only ``{label: budget}`` over ``labels`` (the labels present, in order), checked: every label has a
    budget, no key names an absent label, every budget is a non-negative int."""
    missing = [lab for lab in labels if lab not in budgets]
    present = set(labels)
    unknown = [key for key in budgets if key not in present]
    if missing or unknown:
        def show(xs: list[Hashable]) -> str:
            return ", ".join(repr(x) for x in xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
        parts = ([f"no budget for label(s) {show(missing)}"] if missing else []) + \
            ([f"unknown label(s) {show(unknown)}, which no element has (a typo?)"] if unknown else [])
        raise ValueError(f"budgets does not match the labels in groups: {'; '.join(parts)}. Give a budget to every "
                         f"label present in groups (labels: {show(labels)}) and to no other label.")
    out = {}
    for lab in labels:
        b = budgets[lab]
        if not _is_int(b) or b < 0:
            raise ValueError(f"budgets[{lab!r}] must be a non-negative integer; got {b!r}.")
        out[lab] = int(b)
    return MappingProxyType(out)
