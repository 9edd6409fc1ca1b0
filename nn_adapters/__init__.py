"""nn_adapters: structured pruning of PyTorch models from a few unlabeled samples.

Thin adapters between PyTorch and :mod:`submod`: find prunable layer pairs (:func:`find_pairs`), stream the
consumers' inputs into float64 statistics, select units with the greedy least-squares objective
(``submod.SparseRegression``), refit, and build a physically smaller model (:func:`prune`). Methods:
LayerInChange, SeqInChange and AsymInChange of El Halabi, Srinivas & Lacoste-Julien (NeurIPS 2022), plus the
random, weight-norm, activation-norm and ActGrad baselines under the same API.

Examples
--------
>>> import torch
>>> import nn_adapters as nna
>>> _ = torch.manual_seed(0)
>>> net = nna.zoo.mlp(20, [64, 64], 5)
>>> pruned, report = nna.prune(net, torch.randn(256, 20), compression=2.0, method="asym")
>>> report.compression >= 2.0
True
"""

from . import zoo
from .io import load_pruned, save_pruned
from .pairs import Pair, PrunablePair, find_pairs
from .pruning import BASELINE_METHODS, METHODS, SUBMODULAR_METHODS, LayerReport, PruneReport, prune

__all__ = [
    "BASELINE_METHODS", "LayerReport", "METHODS", "Pair", "PrunablePair", "PruneReport", "SUBMODULAR_METHODS",
    "find_pairs", "load_pruned", "prune", "save_pruned", "zoo",
]
