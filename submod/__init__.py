"""submod: weakly submodular subset selection with checkable guarantees.

The package gives set functions with fast incremental gains (:class:`SetFunction`, the classic objectives and
the least-squares :class:`SparseRegression` behind structured pruning), one optimizer entry point
(:func:`maximize`: exact, lazy and stochastic greedy under cardinality, knapsack and partition-matroid
constraints), partitioned greedy for large ground sets on any ``concurrent.futures`` executor
(:func:`maximize_distributed`) and certificates that bound the optimum.
"""

from .base import CallableFunction, GainState, SetFunction, WeightedSum, from_callable
from .certificates import Certificate, online_bound
from .constraints import Knapsack, PartitionMatroid
from .distributed import DistributedInfo, maximize_distributed
from .feature_selector import SparseRegressionSelector
from .objectives import Coverage, FacilityLocation, FeatureBased, GraphCut, LogDeterminant, Modular
from .optimize import DEFAULT_EPS, METHODS, NonMonotoneWarning, SelectionResult, StaleBoundWarning, maximize
from .selector import SubmodularSelector
from .sparse_regression import GramAccumulator, RegressionPath, SparseRegression

__version__ = "0.1.0"

__all__ = [
    "CallableFunction", "Certificate", "Coverage", "DEFAULT_EPS", "DistributedInfo", "FacilityLocation",
    "FeatureBased", "GainState", "GramAccumulator", "GraphCut", "Knapsack", "LogDeterminant", "METHODS", "Modular",
    "NonMonotoneWarning", "PartitionMatroid", "RegressionPath", "SelectionResult", "SetFunction", "SparseRegression",
    "SparseRegressionSelector", "StaleBoundWarning", "SubmodularSelector", "WeightedSum", "from_callable", "maximize",
    "maximize_distributed", "online_bound",
]
