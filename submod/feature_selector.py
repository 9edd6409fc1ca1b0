"""A scikit-learn feature selector: forward regression (greedy least squares) over the columns of ``X``.

:class:`SparseRegressionSelector` builds the :class:`SparseRegression` objective of ``(X, y)`` (the explained
target energy of least squares on a subset of columns) and maximizes it with :func:`maximize`. Greedy is then
forward regression (Das & Kempe 2011; Elenberg et al. 2018): each pick is the column with the largest exact
increase of ``R^2``, not the largest correlation with the residual (orthogonal matching pursuit).

scikit-learn is optional: with it the selector is a ``BaseEstimator`` and a ``SelectorMixin`` (``transform``,
``inverse_transform``, ``get_support``, ``get_feature_names_out``, pipelines, grid search); without it ``fit``,
``get_support``, ``transform``, ``get_params`` and ``set_params`` still work on arrays.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from ._validation import as_float_array
from .certificates import SOUND_RATIO_KINDS, RatioBound
from .optimize import METHODS, SelectionResult, maximize
from .selector import _not_fitted_error
from .sparse_regression import SparseRegression

__all__ = ["SparseRegressionSelector"]


class _PlainSelector:
    """The parts of scikit-learn's ``BaseEstimator`` and ``SelectorMixin`` the selector needs, for installs
    without scikit-learn."""

    @classmethod
    def _param_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> _PlainSelector:
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"unknown parameter {name!r}; valid ones are {valid}.")
            setattr(self, name, value)
        return self

    def _get_support_mask(self) -> np.ndarray:  # pragma: no cover - defined by the subclass
        raise NotImplementedError

    def get_support(self, indices: bool = False) -> np.ndarray:
        mask = self._get_support_mask()
        return np.flatnonzero(mask) if indices else mask

    def transform(self, X: ArrayLike) -> np.ndarray:
        mask = self._get_support_mask()
        Xa = np.asarray(X)
        if Xa.ndim != 2 or Xa.shape[1] != mask.size:
            raise ValueError(f"X has shape {Xa.shape}, but the selector was fitted on {mask.size} features; pass "
                             f"an array of shape (n_samples, {mask.size}).")
        if not mask.any():  # as scikit-learn's SelectorMixin.transform
            warnings.warn("No features were selected: transform returns an array with no columns.", UserWarning,
                          stacklevel=2)
        return Xa[:, mask]

    def fit_transform(self, X: ArrayLike, y: ArrayLike | None = None) -> np.ndarray:
        return self.fit(X, y).transform(X)  # type: ignore[attr-defined]


try:  # scikit-learn is optional (it is in the test and docs extras)
    from sklearn.base import BaseEstimator as _EstimatorBase
    from sklearn.feature_selection import SelectorMixin as _SelectorBase
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides scikit-learn
    _SelectorBase = _PlainSelector  # type: ignore[assignment, misc]
    _EstimatorBase = object  # type: ignore[assignment, misc]
    _HAS_SKLEARN = False
else:
    _HAS_SKLEARN = True

try:  # scikit-learn >= 1.6: a function; older releases: the BaseEstimator._validate_data method
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - depends on the installed scikit-learn
    _sk_validate_data = None

#: Fitted attributes, removed at the start of every fit (a failed fit leaves the selector unfitted).
_FITTED = ("n_features_in_", "feature_names_in_", "n_features_to_select_", "support_", "ranking_", "r2_path_",
           "certificate_", "result_", "coef_", "intercept_")


class SparseRegressionSelector(_SelectorBase, _EstimatorBase):
    r"""Select the features (columns of ``X``) that best explain ``y`` by least squares: forward regression.

    ``fit(X, y)`` maximizes ``F(S) = ||y_c||^2 - min_{w, b} ||y - X_S w - b||^2`` (the explained target energy,
    :class:`SparseRegression`) over sets ``S`` of ``n_features_to_select`` features with :func:`maximize`. Exact
    greedy is forward regression: each pick is the feature with the largest increase of ``R^2`` given the features
    already picked, which is weakly submodular, so greedy is within ``1 - exp(-gamma)`` of the best subset
    (Das & Kempe 2011). Greedy stops early, with a ``UserWarning``, when no remaining feature adds anything
    (constant or duplicate columns, or more features than the rank of ``X``), so fewer features may be selected.

    A scikit-learn feature selector when scikit-learn is installed (``transform``, ``inverse_transform``,
    ``get_support``, ``get_feature_names_out``; usable in ``Pipeline`` and ``GridSearchCV``).

    Parameters
    ----------
    n_features_to_select : int, float or None, default None
        Number of features to select: an int ``>= 0``, a float in ``(0, 1]`` for that fraction of the features
        (rounded down, at least 1), or None for half of them (at least 1). With ``groups`` it counts groups, not
        columns. ``0`` selects nothing, as ``k = 0`` does in :class:`SubmodularSelector` and
        :func:`submod.maximize` (and ``k=0`` in scikit-learn's ``SelectKBest``): the model is the intercept
        alone, ``certificate_`` is exactly 0, and ``transform`` returns an empty ``(n_samples, 0)`` array with
        a ``UserWarning``.
    ridge : float, default 0.0
        Ridge penalty ``ridge * ||w||^2`` (never on the intercept); the scores are then those of least squares on
        the augmented design ``[X_c; sqrt(ridge) I]``, ``[y_c; 0]``.
    fit_intercept : bool, default True
        Centre ``X`` and ``y`` (fit an unpenalised intercept): the scores are ``R^2``. With False they are
        fractions of the raw ``||y||^2``.
    method : {"greedy", "lazy", "stochastic"}, default "greedy"
        Passed to :func:`maximize`. The objective is not submodular, so ``"lazy"`` evaluates every gain at each
        step (the same set as greedy) and lists any stale-bound violations it saw in ``result_.violations``;
        ``"stochastic"`` evaluates a random sample of candidates per step (faster on many features, a weaker
        guarantee in expectation).
    groups : None, int or sequence of sequences of int, default None
        Features that are selected together (e.g. the one-hot columns of a categorical variable): a list of
        disjoint column-index lists covering every column, or an int ``s`` for consecutive blocks of ``s``
        columns. ``n_features_to_select`` then counts groups and ``ranking_`` holds group indices.
    gamma_lower : float, RatioEstimate or callable, optional
        A *proven* lower bound on the submodularity ratio of the objective ``fit`` builds, which turns on the
        certificate (``certificate_``). A callable is called as ``gamma_lower(objective, k)`` at fit time, so the
        bound is computed on the data being fitted (e.g. each fold of a cross-validation); a float must have been
        proven for that same data. Never pass an estimate: with ``gamma = 1`` the "bound" can fall below the
        optimum of a least-squares problem, so ``1`` is refused (least squares is not submodular). A
        ``verification.RatioEstimate`` (returned, or returned by the callable) is checked as in
        :func:`submod.maximize`: kind ``"exact"`` or ``"lower bound"`` only. A bound of 0 (duplicate or constant
        columns make the spectral bound 0) certifies nothing: ``certificate_`` is then None.
    seed : int, optional
        Randomness of ``method="stochastic"``.

    Attributes
    ----------
    n_features_in_ : int
        Number of columns of ``X`` seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names of ``X`` when it was a DataFrame with string column names (scikit-learn only).
    n_features_to_select_ : int
        The budget (features, or groups) resolved from ``n_features_to_select``.
    support_ : ndarray of bool, shape (n_features,)
        Mask of the selected columns.
    ranking_ : ndarray of int
        The selected features (or groups) in pick order; ``ranking_[:j]`` is the selection with ``j`` picks.
    r2_path_ : ndarray of float, shape (n_picks,)
        ``r2_path_[j]``: fraction of ``||y_c||^2`` (summed over outputs) explained by the first ``j + 1`` picks,
        i.e. the training ``R^2`` of least squares on them (variance-weighted over outputs). With ``ridge > 0``
        the residual includes the penalty: ``1 - (||y_c - X_c w||^2 + ridge ||w||^2) / ||y_c||^2``; with
        ``fit_intercept=False`` nothing is centred (a fraction of the raw ``||y||^2``).
    certificate_ : float or None
        A proven upper bound on the best score (as in ``r2_path_``) any ``n_features_to_select_`` features (or
        groups) can reach, from ``result_.certificate`` (capped at 1); None when no bound is known, which is the
        case unless ``gamma_lower`` is given (the objective is not submodular), or ``n_features_to_select_`` is 0
        (the bound is then exactly 0).
    result_ : SelectionResult
        The full result of :func:`maximize` (raw values ``F``, gains, evaluations, violations, certificate).
    coef_ : ndarray, shape (n_features,) or (n_targets, n_features)
        Least-squares (ridge when ``ridge > 0``) weights refit on the selected features, over *all* features with
        zeros outside ``support_``, so ``X @ coef_.T + intercept_`` predicts ``y``. 1-D when ``y`` is.
    intercept_ : float or ndarray of shape (n_targets,)
        The refit intercept (0 when ``fit_intercept=False``).

    See Also
    --------
    SparseRegression : the objective, its nested greedy path and refit.
    SubmodularSelector : selects rows (representative samples) instead of features.
    sklearn.feature_selection.SequentialFeatureSelector : forward selection by cross-validated score.

    Examples
    --------
    >>> import numpy as np
    >>> from submod import SparseRegressionSelector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 8))
    >>> y = 3 * X[:, 2] - 2 * X[:, 5] + 1 + 0.01 * rng.standard_normal(200)
    >>> sel = SparseRegressionSelector(2).fit(X, y)
    >>> sel.ranking_.tolist(), sel.get_support(indices=True).tolist()
    ([2, 5], [2, 5])
    >>> sel.transform(X).shape
    (200, 2)
    >>> bool(sel.r2_path_[-1] > 0.999)
    True
    >>> np.round(sel.coef_[[2, 5]], 2).tolist(), round(float(sel.intercept_), 2)
    ([3.0, -2.0], 1.0)
    """

    def __init__(self, n_features_to_select: int | float | None = None, *, ridge: float = 0.0,
                 fit_intercept: bool = True, method: str = "greedy", groups: object = None,
                 gamma_lower: float | RatioBound | Callable[[SparseRegression, int], Any] | None = None,
                 seed: int | None = None) -> None:
        self.n_features_to_select = n_features_to_select
        self.ridge = ridge
        self.fit_intercept = fit_intercept
        self.method = method
        self.groups = groups
        self.gamma_lower = gamma_lower
        self.seed = seed

    # ----------------------------------------------------------------------------------------- tags
    def __sklearn_tags__(self):  # scikit-learn's Tags (only called when scikit-learn is installed)
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict[str, bool]:  # scikit-learn < 1.6
        return {"requires_y": True, "multioutput": True}

    # ----------------------------------------------------------------------------------------- fit
    def fit(self, X: ArrayLike, y: ArrayLike) -> SparseRegressionSelector:
        """Select features of ``X`` (n_samples, n_features) that explain ``y`` (n_samples,) or (n_samples,
        n_targets). A failed fit leaves the selector unfitted; ``X`` and ``y`` are never modified.

        Returns
        -------
        self
        """
        for name in _FITTED:
            self.__dict__.pop(name, None)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}.")
        if not isinstance(self.fit_intercept, (bool, np.bool_)):
            raise ValueError(f"fit_intercept must be True or False; got {self.fit_intercept!r}.")
        Xa, ya = self._validate_Xy(X, y)
        one_d = ya.ndim == 1
        f = SparseRegression(Xa, ya, ridge=self.ridge, groups=self.groups, fit_intercept=bool(self.fit_intercept))
        k = self._resolve_budget(f.n)
        gamma = self.gamma_lower(f, k) if callable(self.gamma_lower) else self.gamma_lower
        if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool) and gamma == 1:
            # maximize's message would say to set the objective's submodular attribute, which this selector builds
            # inside fit: the user can only change gamma_lower
            given = "gamma_lower(objective, k) returned 1" if callable(self.gamma_lower) else "gamma_lower=1"
            raise ValueError(f"{given}: that is the submodular online bound, and least squares is not submodular "
                             "(the 'bound' can fall below the best R^2). Pass a proven lower bound computed on the "
                             "data being fitted, gamma_lower=lambda f, k: verification.submodularity_ratio(f, k, "
                             "method='spectral'), or gamma_lower=None for no certificate_.")
        # a proven bound of 0 (e.g. duplicate columns) is sound but certifies nothing
        if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool) and gamma == 0:
            gamma = None
        elif getattr(gamma, "kind", None) in SOUND_RATIO_KINDS and getattr(gamma, "value", None) == 0:
            gamma = None
        result: SelectionResult = maximize(f, k, method=self.method, seed=self.seed, gamma_lower=gamma)

        y2 = f.y_norm2
        picked = result.selected
        cols = f.columns_of(picked)
        support = np.zeros(Xa.shape[1], dtype=bool)
        support[cols] = True
        M, bias = f.refit(picked)
        coef = np.zeros((f.n_targets, Xa.shape[1]))
        coef[:, cols] = M.T
        intercept = np.zeros(f.n_targets) if bias is None else bias

        self.n_features_to_select_ = k
        self.support_ = support
        self.ranking_ = picked
        self.r2_path_ = result.values / y2 if y2 > 0 else np.zeros_like(result.values)
        cert = result.certificate
        self.certificate_ = None if cert is None else (min(1.0, cert.upper_bound / y2) if y2 > 0 else 0.0)
        self.result_ = result
        self.coef_ = coef[0] if one_d else coef
        self.intercept_ = float(intercept[0]) if one_d else intercept
        if result.stopped_early:
            unit = "groups" if self.groups is not None else "features"
            if y2 == 0:
                why = "y is constant" if self.fit_intercept else "y is zero"
            elif result.value >= (1 - 1e-9) * y2:
                why = "y is fully explained"
            else:
                why = "the rest are constant, duplicates or in the span of the picks"
            warnings.warn(f"selected {picked.size} of n_features_to_select={k} {unit}: no remaining one explains "
                          f"any more of y ({why}), so greedy stopped early.", UserWarning, stacklevel=2)
        return self

    def _validate_Xy(self, X: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Float64 ``X`` (2-D) and ``y`` (1-D or 2-D) with matching rows; sets ``n_features_in_`` (and
        ``feature_names_in_`` for a DataFrame with scikit-learn)."""
        for name, arr in (("X", X), ("y", y)):
            if sp.issparse(arr):  # the same error with or without scikit-learn (whose own is a TypeError)
                raise ValueError(f"{name} must be a dense array; got a scipy sparse {type(arr).__name__}. Pass "
                                 f"{name}.toarray(): the selection works on the Gram matrix X^T X, which is dense "
                                 "anyway.")
        if _HAS_SKLEARN:
            kwargs: dict[str, Any] = {"multi_output": True, "y_numeric": True, "dtype": np.float64}
            if _sk_validate_data is not None:
                Xa, ya = _sk_validate_data(self, X, y, **kwargs)
            else:  # pragma: no cover - scikit-learn < 1.6
                Xa, ya = self._validate_data(X, y, **kwargs)
        else:
            if y is None:
                raise ValueError("SparseRegressionSelector requires y to be passed, but the target y is None; "
                                 "pass the targets the features should explain.")
            Xa = as_float_array(X, "X", 2)
            ya = as_float_array(y, "y", (1, 2))
            self.n_features_in_ = Xa.shape[1]
        Xa = np.asarray(Xa, dtype=np.float64)
        ya = np.asarray(ya, dtype=np.float64)
        if ya.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D (n_samples,) or 2-D (n_samples, n_targets); got shape {ya.shape}.")
        if ya.shape[0] != Xa.shape[0]:
            raise ValueError(f"X has {Xa.shape[0]} rows but y has {ya.shape[0]}; pass one target per sample.")
        if Xa.shape[0] == 0 or Xa.shape[1] == 0 or (ya.ndim == 2 and ya.shape[1] == 0):
            raise ValueError(f"X (shape {Xa.shape}) and y (shape {ya.shape}) need at least one sample, feature "
                             "and target.")
        return Xa, ya

    def _resolve_budget(self, n_units: int) -> int:
        """The number of features (or groups) to select, from ``n_features_to_select``."""
        k = self.n_features_to_select
        unit = "groups" if self.groups is not None else "features"
        if k is None:
            return max(1, n_units // 2)
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Real):
            raise ValueError(f"n_features_to_select must be an int >= 0, a float in (0, 1] or None; got {k!r}.")
        if isinstance(k, numbers.Integral):
            if not 0 <= int(k) <= n_units:
                where = f" in {n_units} groups" if self.groups is not None else ""
                raise ValueError(f"n_features_to_select={k} is out of range for X with n_features = "
                                 f"{self.n_features_in_}{where}; pass an int in [0, {n_units}] or a fraction in "
                                 "(0, 1].")
            return int(k)
        if not 0.0 < float(k) <= 1.0:
            raise ValueError(f"n_features_to_select={k} is a float outside (0, 1]; a float is a fraction of the "
                             f"{n_units} {unit}. Pass e.g. 0.5, or an int count.")
        return max(1, math.floor(float(k) * n_units))

    # ----------------------------------------------------------------------------------------- selection
    def _get_support_mask(self) -> np.ndarray:
        if not hasattr(self, "support_"):
            raise _not_fitted_error("this SparseRegressionSelector is not fitted yet; call fit(X, y) first.")
        return self.support_
