"""The set-function interface: values, and incremental states that give many marginal gains at once.

A :class:`SetFunction` ``F`` on the ground set ``V = {0, ..., n-1}`` is normalised (``F(empty) = 0``). Optimizers
never call ``F.value`` in their hot loop: they ask ``F.init_state()`` for a :class:`GainState` that holds the
current set ``S`` and returns the marginal gains ``F(j | S) = F(S + j) - F(S)`` of a whole array of candidates in
one vectorised call, then ``add(j)``.

Subclasses declare two facts that optimizers and certificates rely on:

``submodular``
    ``True`` only when ``F`` is *proven* submodular (diminishing returns). Lazy greedy trusts stale gains and the
    online certificate uses ``gamma = 1`` only for such functions.
``monotone``
    ``True`` when gains are non-negative. Optimizers report any negative gain they observe.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from ._validation import as_float_array, as_index_array, check_ground_set_size, gains_array

__all__ = ["SetFunction", "GainState", "from_callable", "CallableFunction", "WeightedSum"]


class GainState(ABC):
    """Incremental state of a set function at a current set ``S``.

    Attributes
    ----------
    selected : list of int
        The current set, in the order elements were added.
    value : float
        ``F(S)``.
    """

    #: ``True`` when the state keeps every current gain, so that :meth:`gains` is a copy: lazy greedy's bookkeeping
    #: would then cost more than the exact scan it saves, and :func:`submod.maximize` runs the exact scan instead.
    _kept_gains = False

    def __init__(self, n: int) -> None:
        self.n = n
        self.selected: list[int] = []
        self.value = 0.0
        self._in_set = np.zeros(n, dtype=bool)

    @property
    def in_set(self) -> np.ndarray:
        """Boolean mask of the current set (read-only view)."""
        view = self._in_set.view()
        view.flags.writeable = False
        return view

    @abstractmethod
    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        """Marginal gains ``F(j | S)`` of ``candidates`` (an int array; ``None`` means all ``n`` elements).

        The gain computed for one candidate does not depend on which other candidates are in the batch, so
        lazy and exact greedy see the same numbers. Gains of elements already in ``S`` are 0.
        """

    def add(self, j: int) -> None:
        """Add element ``j`` to the current set."""
        j = int(j)
        if self._in_set[j]:
            raise ValueError(f"element {j} is already in the set")
        self._add(j)
        self._in_set[j] = True
        self.selected.append(j)

    @abstractmethod
    def _add(self, j: int) -> None:
        """Update the statistics for adding ``j`` and set ``self.value``."""

    def _all(self, candidates: np.ndarray | None) -> np.ndarray:
        return np.arange(self.n) if candidates is None else np.asarray(candidates, dtype=np.int64)

    def _of(self, values: np.ndarray, candidates: np.ndarray | None) -> np.ndarray:
        """A fresh array of ``values`` at ``candidates`` (all elements when ``None``: a copy, not a gather)."""
        return values.copy() if candidates is None else values[candidates]

    def _zero_in_set(self, out: np.ndarray, candidates: np.ndarray | None) -> np.ndarray:
        """Set the gains of candidates already in the set to 0 (in place) and return ``out``."""
        out[self._in_set if candidates is None else self._in_set[candidates]] = 0.0
        return out


class SetFunction(ABC):
    """Base class of normalised set functions on ``{0, ..., n-1}``.

    Subclass it and implement :meth:`init_state` (and, if you can do better than replaying the state,
    :meth:`value`). Set ``submodular = True`` only when your function is proven submodular.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> class Count(submod.SetFunction):
    ...     submodular = True
    ...     def init_state(self):
    ...         return _CountState(self.n)
    >>> class _CountState(submod.GainState):
    ...     def gains(self, candidates=None):
    ...         c = self._all(candidates)
    ...         return (~self._in_set[c]).astype(float)
    ...     def _add(self, j):
    ...         self.value += 1.0
    >>> Count(5).value([0, 3])
    2.0
    """

    submodular: bool = False
    monotone: bool = True

    def __init__(self, n: int) -> None:
        self.n = check_ground_set_size(n)

    @abstractmethod
    def init_state(self) -> GainState:
        """Return a fresh :class:`GainState` at the empty set."""

    def value(self, S: Iterable[int] | ArrayLike) -> float:
        """``F(S)`` for a set of indices ``S`` (any order; a boolean mask is accepted)."""
        idx = as_index_array(S, self.n)
        state = self.init_state()
        for j in idx:
            state.add(int(j))
        return float(state.value)

    def gains(self, S: Iterable[int] | ArrayLike, candidates: ArrayLike | None = None) -> np.ndarray:
        """Marginal gains ``F(j | S)`` of ``candidates`` (default: all elements) at the set ``S``."""
        idx = as_index_array(S, self.n)
        state = self.init_state()
        for j in idx:
            state.add(int(j))
        cand = None if candidates is None else as_index_array(candidates, self.n, "candidates")
        return np.asarray(state.gains(cand), dtype=np.float64)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> SetFunction:
        """The objective on the sub-ground-set ``indices``: element ``t`` of the result is ``indices[t]``.

        The exact restriction satisfies ``f.restrict(idx).value(S) == f.value(idx[S])`` (up to rounding), so greedy
        on it is greedy on ``f`` over the candidates ``idx``: this is what the parts of
        :func:`submod.maximize_distributed` run. ``local=True`` asks for the cheaper *local* objective of GreeDi
        (Mirzasoleiman et al. 2013) where a class has one (:class:`FacilityLocation`: only the items of the part are
        represented); classes whose exact restriction is already cheap ignore it.

        The base class has no restriction: a subclass that should run in :func:`submod.maximize_distributed`
        implements ``restrict(self, indices, *, local=False)`` returning a :class:`SetFunction` on
        ``len(indices)`` elements with ``value(S) == self.value(indices[S])``. It should copy only what the
        candidates need (a block of a similarity, rows of a feature matrix): the result is sent to a worker.

        Parameters
        ----------
        indices : array of int
            Distinct elements of ``{0, ..., n-1}``, at least one, in the order the restricted ground set uses.
        local : bool, default False
            Ask for the local objective (see above).

        Returns
        -------
        SetFunction

        Examples
        --------
        >>> import submod
        >>> f = submod.Modular([3.0, 1.0, 2.0, 5.0])
        >>> g = f.restrict([3, 0])
        >>> g.n, g.value([0]), g.value([0, 1]) == f.value([3, 0])
        (2, 5.0, True)
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement restrict(indices): to run it in maximize_distributed, "
            "implement restrict(self, indices, *, local=False) -> SetFunction, returning the function on the "
            "elements indices (value(S) == self.value(indices[S])), or use submod.maximize.")

    def _restrict_indices(self, indices: ArrayLike) -> np.ndarray:
        """``indices`` checked for :meth:`restrict`: distinct, in range, at least one."""
        idx = as_index_array(indices, self.n, "indices")
        if idx.size == 0:
            raise ValueError("restrict needs at least one index: a set function's ground set is not empty.")
        return idx

    def __add__(self, other: SetFunction) -> WeightedSum:
        if not isinstance(other, SetFunction):
            return NotImplemented
        return WeightedSum([self, other], [1.0, 1.0])

    def __radd__(self, other: object) -> SetFunction:
        """``0 + f`` is ``f``, so that the built-in ``sum([f, g, ...])`` (which starts from 0) adds set functions.

        Only a zero is accepted, as for Python's numbers: ``F + c`` with a constant ``c != 0`` would not be
        normalised (``F(empty) = c``).
        """
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, weight: float) -> WeightedSum:
        return WeightedSum([self], [weight])

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class WeightedSum(SetFunction):
    r"""Non-negative weighted sum of set functions, ``F(S) = sum_i w_i F_i(S)``.

    Submodular if every term is; monotone if every term is (the weights are non-negative).

    Parameters
    ----------
    functions : sequence of SetFunction
        Terms on the same ground set.
    weights : sequence of float, optional
        Non-negative weights (default all ones).

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> f = submod.Modular([1.0, 2.0, 3.0]) + 2.0 * submod.Modular([0.0, 1.0, 0.0])
    >>> f.value([1, 2])
    7.0
    >>> sum([submod.Modular([1.0, 0.0, 0.0]), submod.Modular([0.0, 2.0, 0.0])]).value([0, 1])  # 0 + f + g
    3.0
    """

    def __init__(self, functions: Sequence[SetFunction], weights: Sequence[float] | None = None) -> None:
        functions = list(functions)
        if not functions:
            raise ValueError("WeightedSum needs at least one function.")
        for f in functions:
            if not isinstance(f, SetFunction):
                raise ValueError(f"WeightedSum terms must be SetFunction instances; got {type(f).__name__}.")
        n = functions[0].n
        if any(f.n != n for f in functions):
            raise ValueError(f"all terms must share one ground set; got sizes {[f.n for f in functions]}.")
        w = np.ones(len(functions)) if weights is None else as_float_array(weights, "weights").ravel()
        if w.shape != (len(functions),):
            raise ValueError(f"got {len(functions)} functions but {w.size} weights; pass one weight per term.")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative (a negative weight breaks monotonicity "
                             "and submodularity).")
        # Flatten nested sums so that ``f + g + h`` is one level.
        flat_f: list[SetFunction] = []
        flat_w: list[float] = []
        for f, wi in zip(functions, w, strict=True):
            if isinstance(f, WeightedSum):
                flat_f.extend(f.functions)
                flat_w.extend(float(wi) * f.weights)
            else:
                flat_f.append(f)
                flat_w.append(float(wi))
        super().__init__(n)
        self.functions = flat_f
        self.weights = np.asarray(flat_w)
        self.submodular = all(f.submodular for f in flat_f)
        self.monotone = all(f.monotone for f in flat_f)

    def init_state(self) -> GainState:
        return _WeightedSumState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> WeightedSum:
        """The weighted sum of the terms' restrictions (see :meth:`SetFunction.restrict`)."""
        idx = self._restrict_indices(indices)
        terms = [f.restrict(idx, local=True) if local else f.restrict(idx) for f in self.functions]
        return WeightedSum(terms, self.weights)


class _WeightedSumState(GainState):
    def __init__(self, f: WeightedSum) -> None:
        super().__init__(f.n)
        self._states = [g.init_state() for g in f.functions]
        self._w = f.weights

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        size = self.n if candidates is None else len(candidates)
        out = np.zeros(size)
        for w, s in zip(self._w, self._states, strict=True):
            # each term checked on its own: a scalar or a (1,) answer would broadcast into every candidate's gain
            out += w * gains_array(s.gains(candidates), size, candidates)
        return out

    def _add(self, j: int) -> None:
        for s in self._states:
            s.add(j)
        self.value = float(sum(w * s.value for w, s in zip(self._w, self._states, strict=True)))


class CallableFunction(SetFunction):
    """A set function given by a value oracle; see :func:`from_callable`."""

    def __init__(self, value: Callable[[np.ndarray], float], n: int, submodular: bool = False,
                 monotone: bool = True) -> None:
        if not callable(value):
            raise ValueError(f"value must be callable as value(S) -> float; got {type(value).__name__}.")
        super().__init__(n)
        self._oracle = value
        self.submodular = bool(submodular)
        self.monotone = bool(monotone)
        self._offset = self._call(np.zeros(0, dtype=np.int64))  # normalises F(empty) to 0

    def _call(self, S: np.ndarray) -> float:
        v = self._oracle(S.copy())  # the oracle's own array: sorting or editing it cannot corrupt the caller's set
        try:
            v = float(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the value oracle must return a real number; got {v!r}.") from exc
        if not np.isfinite(v):
            raise ValueError(f"the value oracle returned {v} for S = {S.tolist()}; it must be finite.")
        return v

    def value(self, S: Iterable[int] | ArrayLike) -> float:
        return self._call(as_index_array(S, self.n)) - self._offset

    def init_state(self) -> GainState:
        return _CallableState(self)

    def restrict(self, indices: ArrayLike, *, local: bool = False) -> CallableFunction:
        """The oracle called on ``indices[S]`` (exact; it pickles when the oracle does)."""
        idx = self._restrict_indices(indices)
        return CallableFunction(_RestrictedOracle(self._oracle, idx), idx.size, submodular=self.submodular,
                                monotone=self.monotone)


class _RestrictedOracle:
    """``value(indices[S])``: a value oracle on a sub-ground-set (a class, not a closure, so that it pickles)."""

    def __init__(self, oracle: Callable[[np.ndarray], float], indices: np.ndarray) -> None:
        self.oracle = oracle
        self.indices = indices

    def __call__(self, S: np.ndarray) -> float:
        return self.oracle(self.indices[np.asarray(S, dtype=np.int64)])


class _CallableState(GainState):
    def __init__(self, f: CallableFunction) -> None:
        super().__init__(f.n)
        self._f = f

    def gains(self, candidates: np.ndarray | None = None) -> np.ndarray:
        cand = self._all(candidates)
        base = np.asarray(self.selected, dtype=np.int64)
        out = np.zeros(cand.size)
        buf = np.empty(base.size + 1, dtype=np.int64)
        buf[:-1] = base
        for i, j in enumerate(cand):
            if self._in_set[j]:
                continue
            buf[-1] = j
            out[i] = self._f._call(buf) - self._f._offset - self.value
        return out

    def _add(self, j: int) -> None:
        self.value = self._f._call(np.asarray(self.selected + [j], dtype=np.int64)) - self._f._offset


def from_callable(value: Callable[[np.ndarray], float], n: int, submodular: bool = False,
                  monotone: bool = True) -> CallableFunction:
    """Wrap a value oracle ``value(S) -> float`` as a :class:`SetFunction`.

    ``S`` is passed as an int64 array of indices. The function is normalised by subtracting ``value([])``.
    Gains are computed with one oracle call per candidate (the only option for a black box); subclass
    :class:`SetFunction` for a vectorised state.

    Parameters
    ----------
    value : callable
        The oracle.
    n : int
        Ground-set size.
    submodular : bool, default False
        Declare the function submodular. Only do so when it is proven: lazy greedy and the online
        certificate trust this flag.
    monotone : bool, default True
        Declared monotonicity; optimizers still report any negative gain they see.

    Examples
    --------
    >>> import numpy as np
    >>> import submod
    >>> f = submod.from_callable(lambda S: float(np.sqrt(len(S))), n=4, submodular=True)
    >>> round(f.value([0, 1, 2, 3]), 3)
    2.0
    """
    return CallableFunction(value, n, submodular=submodular, monotone=monotone)
