"""A scikit-learn estimator that selects representative rows or informative columns with :func:`maximize`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._validation import as_float_array, check_k
from .base import SetFunction
from .objectives import _DISTANCE_METRICS, Coverage, FacilityLocation, FeatureBased, GraphCut, LogDeterminant
from .optimize import METHODS, SelectionResult, maximize

__all__ = ["SubmodularSelector"]

_OBJECTIVES = ("facility-location", "feature-based", "graph-cut", "log-determinant")
#: Objectives :func:`build_objective` builds from an items x features matrix (coverage reads it as incidence).
OBJECTIVES = (*_OBJECTIVES, "coverage")
#: Objectives whose similarity :func:`build_objective` computes with its ``metric`` (the others refuse a metric
#: other than the default).
METRIC_OBJECTIVES = ("facility-location", "graph-cut")


def _not_fitted_error(message: str) -> ValueError:
    """scikit-learn's ``NotFittedError`` when scikit-learn is installed (a ValueError and an AttributeError, which
    sklearn's tools expect), else a plain ValueError."""
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        return ValueError(message)
    return NotFittedError(message)


try:  # scikit-learn's base class gives tags, check_is_fitted, the HTML repr of pipelines; it is optional
    from sklearn.base import BaseEstimator as _EstimatorBase
except ImportError:  # pragma: no cover - scikit-learn is in the test and docs extras
    _EstimatorBase = object


def build_objective(name: str, X: np.ndarray, metric: str = "sqeuclidean",
                    n_neighbors: int | None = None) -> SetFunction:
    """The set function named ``name`` over the rows of ``X`` (see :data:`OBJECTIVES`); ``metric``: the distance of
    the :data:`METRIC_OBJECTIVES`; ``n_neighbors``: the sparse k-nearest-neighbour facility location (facility
    location only)."""
    if metric not in _DISTANCE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {_DISTANCE_METRICS}.")
    if metric != "sqeuclidean" and name not in METRIC_OBJECTIVES:
        raise ValueError(f"metric applies to the {' and '.join(METRIC_OBJECTIVES)} objectives only, not {name!r} "
                         f"(which does not use a distance); drop metric={metric!r} or choose one of "
                         f"{METRIC_OBJECTIVES}.")
    if n_neighbors is not None and name != "facility-location":
        raise ValueError(f"n_neighbors applies to the facility-location objective only, not {name!r}; drop it or "
                         "choose objective='facility-location'.")
    if name == "facility-location":
        return FacilityLocation(X, metric=metric, n_neighbors=n_neighbors)
    if name == "feature-based":
        return FeatureBased(X)
    if name == "graph-cut":
        return GraphCut(X, metric=metric)
    if name == "log-determinant":
        return LogDeterminant(X)
    if name == "coverage":
        return Coverage(X)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}.")


class SubmodularSelector(_EstimatorBase):
    """Select ``k`` representative samples (rows of ``X``) by maximizing a submodular objective built from ``X``.

    A scikit-learn style estimator (a ``BaseEstimator`` when scikit-learn is installed): ``fit`` runs
    :func:`submod.maximize`, ``get_support`` returns the boolean mask (or the indices) of the chosen rows and
    ``transform`` returns those rows. Fitted attributes end in ``_``. When no remaining row adds value (e.g.
    fewer than ``k`` distinct rows), greedy stops early and fewer than ``k`` rows are selected, with a
    ``UserWarning``; ``result_.stopped_early`` records it.

    Parameters
    ----------
    k : int
        Number of samples to select, ``0 <= k <= n_samples``. ``0`` selects nothing, as
        ``n_features_to_select=0`` does in :class:`SparseRegressionSelector` and ``k = 0`` in
        :func:`submod.maximize` (and ``k=0`` in scikit-learn's ``SelectKBest``): ``get_support()`` is all False,
        ``result_.certificate`` is exact (``OPT_0 = 0``) and ``transform`` returns an empty ``(0, n_features)``
        array with a ``UserWarning``.
    objective : {"facility-location", "feature-based", "graph-cut", "log-determinant"}, default
        "facility-location"
        How the set function is built from ``X`` (rows are items; feature-based needs ``X >= 0``).
    method : {"greedy", "lazy", "stochastic"}, default "lazy"
    metric : {"sqeuclidean", "euclidean", "cosine"}, default "sqeuclidean"
        Similarity for facility location and graph cut; another value with another objective is an error
        (it would be ignored).
    n_neighbors : int, optional
        Facility location only: keep each row's ``n_neighbors`` nearest rows (itself included) in a sparse
        similarity built without the ``n x n`` matrix (see :class:`FacilityLocation`); for many rows.
    seed : int, optional
        For stochastic greedy.

    Attributes
    ----------
    ranking_ : ndarray of int
        Selected row indices in pick order.
    result_ : SelectionResult
        The full optimizer result (gains, value curve, certificate).

    Examples
    --------
    >>> import numpy as np
    >>> from submod import SubmodularSelector
    >>> X = np.random.default_rng(0).standard_normal((100, 4))
    >>> sel = SubmodularSelector(k=5).fit(X)
    >>> sel.transform(X).shape
    (5, 4)
    >>> int(sel.get_support().sum())
    5

    With many rows, a sparse nearest-neighbour similarity keeps the memory at ``O(n * n_neighbors)``:

    >>> SubmodularSelector(k=5, n_neighbors=10).fit(X).ranking_.shape
    (5,)
    """

    def __init__(self, k: int, objective: str = "facility-location", method: str = "lazy",
                 metric: str = "sqeuclidean", seed: int | None = None, n_neighbors: int | None = None) -> None:
        self.k = k
        self.objective = objective
        self.method = method
        self.metric = metric
        self.seed = seed
        self.n_neighbors = n_neighbors

    def __repr__(self) -> str:
        defaults = {"objective": "facility-location", "method": "lazy", "metric": "sqeuclidean", "seed": None,
                    "n_neighbors": None}
        shown = [f"k={self.k!r}"] + [f"{name}={value!r}" for name, value in self.get_params().items()
                                     if name != "k" and defaults.get(name) != value]
        return f"SubmodularSelector({', '.join(shown)})"

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"k": self.k, "objective": self.objective, "method": self.method, "metric": self.metric,
                "seed": self.seed, "n_neighbors": self.n_neighbors}

    def set_params(self, **params: Any) -> SubmodularSelector:
        for name, value in params.items():
            if name not in self.get_params():
                raise ValueError(f"unknown parameter {name!r}; valid ones are {sorted(self.get_params())}.")
            setattr(self, name, value)
        return self

    def fit(self, X: ArrayLike, y: object = None) -> SubmodularSelector:
        """Select ``k`` rows of ``X``; ``y`` is ignored. A failed fit leaves the selector unfitted."""
        for name in ("n_samples_in_", "n_features_in_", "ranking_", "result_"):
            self.__dict__.pop(name, None)
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {_OBJECTIVES}.")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}.")
        Xa = as_float_array(X, "X", ndim=2)
        if Xa.shape[0] == 0:
            raise ValueError("X has no rows; pass at least one sample.")
        check_k(self.k, Xa.shape[0])
        f = build_objective(self.objective, Xa, self.metric, self.n_neighbors)
        result: SelectionResult = maximize(f, self.k, method=self.method, seed=self.seed)
        self.n_samples_in_ = Xa.shape[0]
        self.n_features_in_ = Xa.shape[1]
        self.ranking_ = result.selected
        self.result_ = result
        if result.stopped_early:
            warnings.warn(f"selected {result.selected.size} of k={self.k} rows: no remaining row adds value to the "
                          f"{self.objective} objective (duplicate rows, or rows it cannot tell apart), so greedy "
                          "stopped early.", UserWarning, stacklevel=2)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "ranking_"):
            raise _not_fitted_error("this SubmodularSelector is not fitted yet; call fit(X) first.")

    def get_support(self, indices: bool = False) -> np.ndarray:
        """Boolean mask of the selected rows, or their indices (in pick order) with ``indices=True``."""
        self._check_fitted()
        if indices:
            return self.ranking_.copy()
        mask = np.zeros(self.n_samples_in_, dtype=bool)
        mask[self.ranking_] = True
        return mask

    def transform(self, X: ArrayLike) -> np.ndarray:
        """The selected rows of ``X`` (in pick order); ``X`` must be the data passed to ``fit``."""
        self._check_fitted()
        Xa = np.asarray(X)
        if Xa.ndim != 2 or Xa.shape[0] != self.n_samples_in_:
            raise ValueError(f"transform expects the {self.n_samples_in_} rows passed to fit; got shape "
                             f"{Xa.shape}.")
        if self.ranking_.size == 0:  # k = 0, as scikit-learn's selectors warn when they select nothing
            warnings.warn("No rows were selected (k = 0): transform returns an array with no rows.", UserWarning,
                          stacklevel=2)
        return Xa[self.ranking_]

    def fit_transform(self, X: ArrayLike, y: object = None) -> np.ndarray:
        return self.fit(X, y).transform(X)
