"""Structured pruning of transformer encoders: FFN neurons and attention heads, from unlabeled token batches.

For every block, the units are chosen and the consumer layer refitted by least squares so that the consumer's
output changes as little as possible (El Halabi, Srinivas and Lacoste-Julien, "Data-Efficient Structured Pruning
via Submodular Optimization", NeurIPS 2022), then the modules are physically shrunk:

* FFN: a unit is one intermediate neuron (``up -> activation -> down``, or the gated ``down(act(gate(x)) *
  up(x))`` of Llama-style decoders): one column of the down projection's input. Kept neurons keep their rows of
  ``up`` (and ``gate``); the down projection's weights and bias are refitted.
* Heads: a unit is one attention head: ``head_dim`` columns of the output projection's input (a group in
  :class:`submod.SparseRegression`). Kept heads keep their query/key/value rows; the output projection is refitted.

Statistics are float64 Gram matrices streamed token batch by token batch (optionally token-weighted, see
``weighting``) and handed to :meth:`submod.SparseRegression.from_gram`; padding tokens (``attention_mask == 0``
for Hugging Face models, ``src_key_padding_mask`` True, or for a float mask ``-inf`` or at most ``-1e4``, for
:class:`torch.nn.TransformerEncoderLayer`) are excluded; a mask with values outside its convention is refused.

Modes (``method``):

``"layer"``  (LayerInChange)
    Inputs and targets from the original network.
``"seq"``    (SeqInChange)
    Inputs from the network pruned so far; targets: the original consumer applied to those inputs.
``"asym"``   (AsymInChange, default)
    Inputs from the network pruned so far, targets from the original network, so that each refit also
    compensates the error made upstream.

Block inputs are cached once (the first block's inputs, from one forward pass of the model per batch) and
propagated block by block through the original and the pruned blocks: a bounded number of block forwards per
block, ``O(L)`` in total, never a full-model forward per layer. Layers of the stack that are not recognised
(a hybrid model's Mamba layers) are run as they are between the blocks, with the arguments the model called them
with, and reported in the report's ``skipped``.

Baselines under the same API (selection only; the refit, if ``reweight=True``, uses the statistics of the
``propagation`` mode, ``"asym"`` by default): ``"magnitude"`` (Torch-Pruning-style group L2 norm of the unit's
weights in the producer and consumer), ``"wanda"`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models": ``|W| * ||X||`` summed over the unit's consumer weights) and ``"random"``.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import inspect
import itertools
import json
import math
import numbers
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

import submod.sparse_regression
from submod import PartitionMatroid
from submod._atomic import atomic_dir
from submod._sr_threads import one_blas_thread as _one_blas_thread
from submod._validation import rng_from_seed

from ._data import FoldDealer, _from_numpy, float_dtype
from ._executor import LAYER_ONLY, OrderedJobs, check_executor
from ._experts import (
    ExpertOutputs,
    RestrictedRouter,
    RoutedError,
    compact_routing,
    search_kept,
    sorted_routing,
    sync_expert_count,
)
from ._experts import error_curve as expert_error_curve
from ._modes import (
    TensorGuard,
    copy_modes,
    eval_mode,
    meta_parameters,
    outside_inference_mode,
    own_tensors,
    shared_copy,
    tie_again,
    tie_groups,
    unwrap,
    weightless_copy,
)
from ._names import canonical_allocation, canonical_method
from ._stats import CV_FOLDS, CV_GRID
from ._stats import cv_ridge as _cv_ridge
from ._stats import ridge_refit as _ridge_refit
from ._stats import ridge_scale as _ridge_scale
from ._stats import stats_device as _stats_device
from ._stats import update_folds as _update_folds
from ._transformer_blocks import (
    BLOCK_OUTPUT,
    QUERY_HEADS,
    BranchSum,
    OpaqueLayer,
    PrunedMultiheadAttention,
    _Block,
    _get,
    _head_rows,
    _set,
    capture_inputs,
    disable_nested_fast_path,
    find_blocks,
    leading_input,
    link_opaque_layers,
    weight_of,
)
from .budget import UnreachableCompressionError
from .io import attn_implementation_of, restore_attn_implementation

__all__ = [
    "prune_transformer",
    "TransformerPruneReport",
    "UnitRecord",
    "save_pruned",
    "load_pruned",
    "export_pretrained",
    "PrunedMultiheadAttention",
    "GREEDY_METHODS",
    "BASELINE_METHODS",
    "allocate_units",
]

GREEDY_METHODS = ("asym", "seq", "layer")
BASELINE_METHODS = ("magnitude", "wanda", "random")
_TARGETS = ("ffn", "heads", "all", "experts")
#: Relative ridge of the greedy selection when ``ridge="cv"`` (the cross-validated ridge is the refit's): on
#: all-MiniLM-L6-v2 the units selected at this ridge on the calibration sentences did as well on held-out
#: sentences as units selected on those sentences themselves; the refit is what needs the held-out choice.
SELECTION_RIDGE = 1e-4
SPEC_FILE = "submod_pruning.json"
_SPEC_FORMAT = "submod.transformer-pruning"
#: The newest spec format this release reads: 2 records ``num_key_value_groups`` for the Llama-style blocks whose
#: query heads were removed within their groups (``head_unit="query"``); a spec without one is written as 1.
_SPEC_VERSION = 2


@dataclass
class UnitRecord:
    """What was done to one prunable stage (the FFN or the attention heads) of one block.

    ``relative_error`` is the least-squares residual of the consumer's target on the calibration tokens
    divided by the target's (centred) energy, for the kept units and refitted weights: a measured value on the
    calibration data (exact for that data, an empirical estimate for new data); ``None`` without refit.
    ``ridge`` is the refit's relative ridge; with ``ridge="cv"``, ``cv_relative_error`` is its cross-validated
    relative error over the calibration sentences (an empirical estimate of the error on new sentences). A stage
    of a block left as it is (it keeps every unit and its refit would reproduce its trained weights, see ``keep`` in
    :func:`prune_transformer`) records ``relative_error=0.0`` with ``reweight=True`` (exact) and ``ridge=None``.

    Attributes
    ----------
    block : str
        The block's module name (e.g. ``"encoder.layer.3"``).
    stage : str
        ``"ffn"`` (the intermediate neurons), ``"heads"`` (the attention heads), ``"cross"`` (the heads of a
        decoder layer's cross-attention) or ``"experts"`` (a mixture's whole experts, ``target="experts"``: units
        are experts, ``relative_error`` is the squared error of the mixture's routed output on the calibration
        tokens over the target's energy, after the refit with ``reweight=True``).
    n_units, n_kept : int
        Units of the stage before pruning, and kept.
    kept : list of int
        The kept units' indices in the original stage, sorted.
    relative_error : float or None
        See above.
    time_s : float
        Wall time spent on this stage (its selection, refit and shrinking; the shared forward passes are in
        ``TransformerPruneReport.wall_time``).
    ridge : float or None
        The refit's relative ridge (``None`` without refit, and for a stage left as it is).
    cv_relative_error : float or None
        The refit's cross-validated relative error with ``ridge="cv"``, else ``None``.
    expert : int, "shared" or None
        In a mixture-of-experts FFN, the expert this record is about (one record per expert, and one with
        ``"shared"`` for the shared expert of a mixture that has one; ``n_units`` and ``n_kept`` count that
        expert's neurons); ``None`` elsewhere.
    search : str or None
        For ``stage="experts"`` with a greedy method: ``"exhaustive"`` (every kept set was tried: the kept experts
        minimise the error on the calibration tokens) or ``"greedy"`` (backward elimination, above
        ``nn_adapters._experts.EXHAUSTIVE_LIMIT`` kept sets); ``None`` elsewhere.
    """

    block: str
    stage: str
    n_units: int
    n_kept: int
    kept: list[int]
    relative_error: float | None
    time_s: float
    ridge: float | None = None
    cv_relative_error: float | None = None
    expert: int | str | None = None
    search: str | None = None


@dataclass
class TransformerPruneReport:
    """Result of :func:`prune_transformer` (all counts exact; errors measured on the calibration tokens).

    Attributes
    ----------
    method, target, keep, reweight, seed, allocation
        The arguments of :func:`prune_transformer` the model was pruned with (``method`` in its canonical
        spelling).
    propagation : str or None
        Where a baseline's statistics came from (``"layer"`` or ``"asym"``); ``None`` for the greedy methods, whose
        ``method`` says it.
    units : list of UnitRecord
        One record per pruned stage of every block, in block order.
    params_before, params_after : int
        Parameters of the whole model before and after (exact).
    n_tokens : int
        Real calibration tokens the statistics were computed on.
    n_padding_excluded : int
        Padding tokens left out of the statistics.
    block_forwards : int
        Block forward passes run (``O(L)`` in the number of blocks for every mode).
    n_blocks : int
        Transformer blocks found.
    wall_time : float
        Seconds for the whole call.
    spec : dict
        The pruned sizes (per block: intermediate size, heads, head size, and the layout a reload needs), as
        :func:`save_pruned` writes them and :func:`load_pruned` applies them.
    skipped : list of (str, str)
        Layers of a stack of blocks (a ``ModuleList`` holding recognised blocks) that are not recognised
        themselves, with why: they are left whole (a hybrid model's layers of an unsupported kind) and, between
        blocks, run as they are to propagate the calibration inputs. Also said by a ``UserWarning`` during the
        call.
    """

    method: str
    target: str
    keep: float | dict[str, float]
    reweight: bool
    seed: int | None
    propagation: str | None
    units: list[UnitRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    n_tokens: int = 0
    n_padding_excluded: int = 0
    block_forwards: int = 0
    n_blocks: int = 0
    wall_time: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)
    allocation: str = "uniform"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """Parameter compression ``params_before / params_after`` of the whole model (exact)."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict:
        """The report as plain Python data (JSON-serialisable): every field, units and spec included, plus
        ``compression``; the same shape of answer as :meth:`nn_adapters.PruneReport.to_dict`.

        Returns
        -------
        dict
        """
        d = asdict(self)
        if isinstance(self.keep, Mapping):  # block indices or names; JSON object keys are strings
            d["keep"] = {str(b): float(f) for b, f in self.keep.items()}
        d["compression"] = self.compression
        return d

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [f"method={self.method} target={self.target} keep={self.keep} ({self.allocation}) "
                 f"reweight={self.reweight} "
                 f"tokens={self.n_tokens} (padding excluded: {self.n_padding_excluded}) "
                 f"params {self.params_before} -> {self.params_after} ({self.compression:.2f}x) "
                 f"time {self.wall_time:.1f}s, {self.block_forwards} block forwards for {self.n_blocks} blocks"]
        for u in self.units:
            err = "-" if u.relative_error is None else f"{u.relative_error:.4f}"
            if u.cv_relative_error is not None:
                err += f" (held-out est. {u.cv_relative_error:.4f}, ridge {u.ridge:.0e} by cv)"
            stage = u.stage if u.expert is None else f"{u.stage}[{u.expert}]"
            how = "" if u.search is None else f" ({u.search})"
            lines.append(f"  {u.block:<28} {stage:<5} kept {u.n_kept:>5}/{u.n_units:<5} rel.err {err}{how}")
        for name, why in self.skipped:
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


# ----------------------------------------------------------------------------------------------------------------
# validation and calibration capture
# ----------------------------------------------------------------------------------------------------------------

def _check_args(model: Any, keep: Any, target: Any, method: Any, propagation: Any, ridge: Any) -> tuple[str, str]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for f in (keep.values() if isinstance(keep, Mapping) else [keep]):
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0.0 < float(f) <= 1.0):
            raise ValueError(f"keep must be a fraction in (0, 1] of the units kept in every block, or a dict "
                             f"{{block name or index: fraction}} or {{stage: fraction}}, got {keep!r}; e.g. keep=0.5 "
                             "removes half of the neurons, keep={'encoder.layer.5': 0.75} prunes only that block, "
                             "keep={'heads': 0.75, 'ffn': 0.5} (target='all') a quarter of the heads and half of "
                             "the neurons")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    m = canonical_method(method, {})
    if m not in GREEDY_METHODS + BASELINE_METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {GREEDY_METHODS} (greedy selection) or "
                         f"{BASELINE_METHODS} (baselines)")
    if propagation not in GREEDY_METHODS:
        raise ValueError(f"propagation must be one of {GREEDY_METHODS}, got {propagation!r}")
    if ridge != "cv" and (isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not ridge >= 0
                          or not math.isfinite(ridge)):
        raise ValueError(f"ridge must be 'cv' (the refit's ridge chosen by cross-validation over the calibration "
                         f"sentences) or a finite number >= 0 (relative to the mean input variance), got {ridge!r}")
    return m, propagation


def _batches(calibration_data: Any, dtype: torch.dtype | None = None) -> list[Any]:
    """The calibration batches as a list, floating tensors cast to the model's ``dtype`` (ids left as they are)."""
    if calibration_data is None:
        raise ValueError("calibration_data is None: pass token batches (dicts of tensors, e.g. tokenizer "
                         "outputs with an attention_mask) or input tensors")
    calibration_data = _numpy_to_tensors(calibration_data)
    if isinstance(calibration_data, (torch.Tensor, Mapping)):
        calibration_data = [calibration_data]
    if not isinstance(calibration_data, Iterable):
        raise ValueError(f"calibration_data must be a batch or an iterable of batches, "
                         f"got {type(calibration_data).__name__}")
    if isinstance(calibration_data, (tuple, list)) and len(calibration_data) == 2:
        # one batch given as a pair instead of a list of batches: iterated, its second part would be fed to the
        # model as a batch of inputs of its own (labels as token ids, a mask as token ids or as features)
        pair = _pair_kind(calibration_data)
        if pair is not None:
            raise ValueError(f"calibration_data looks like one batch ({pair}), not a list of batches: it would be "
                             f"read as two batches, the second fed to the model as inputs. Pass a list of batches, "
                             f"e.g. [{{'input_ids': ids, 'attention_mask': mask}}] (dicts of the model's keyword "
                             f"arguments, as a tokenizer returns them) or [(inputs, labels)].")
    batches = [_numpy_to_tensors(b) for b in calibration_data]
    if not batches:
        raise ValueError("calibration_data is empty: pass at least one batch of unlabeled inputs")
    for i, b in enumerate(batches):
        pair = _pair_kind(b) if isinstance(b, (tuple, list)) else None
        if pair == "input_ids, attention_mask":
            raise ValueError(f"calibration batch {i} looks like (input_ids, attention_mask): a pair is read as "
                             "(inputs, labels), so the mask would reach neither the model nor the statistics. Pass "
                             "dicts, e.g. {'input_ids': ids, 'attention_mask': mask} as a tokenizer returns them.")
        if pair == "features, key padding mask":
            raise ValueError(f"calibration batch {i} looks like (features, key padding mask): a pair is read as "
                             "(inputs, labels), so the mask would reach neither the model nor the statistics and "
                             "the padding would be counted as tokens. Pass dicts of the model's keyword arguments, "
                             "e.g. {'src': x, 'src_key_padding_mask': mask} for torch.nn.TransformerEncoder.")
    return [_cast_floats(b, dtype) for b in batches] if dtype is not None else batches


def _pair_kind(b: tuple | list) -> str | None:
    """What a sequence whose first two items are tensors looks like: ``"input_ids, attention_mask"`` (integer ids
    and a 0/1 mask of their shape), ``"features, key padding mask"`` (``(batch, tokens, features)`` or
    ``(tokens, batch, features)`` floats and a boolean ``(batch, tokens)`` mask), ``"inputs, labels"`` (a second
    tensor with fewer dimensions and the first one's batch size), or ``None``."""
    if not (len(b) >= 2 and all(isinstance(t, torch.Tensor) for t in b[:2])):
        return None
    x, y = b[0], b[1]
    if (not x.is_floating_point() and y.shape == x.shape and not y.is_floating_point()
            and bool(((y == 0) | (y == 1)).all())):
        return "input_ids, attention_mask"
    if (x.is_floating_point() and x.ndim == 3 and y.dtype == torch.bool and y.ndim == 2
            and sorted(y.shape) == sorted(x.shape[:2])):
        return "features, key padding mask"
    if x.ndim >= 2 and 1 <= y.ndim < x.ndim and y.shape[0] == x.shape[0]:
        return "inputs, labels"
    return None


def _numpy_to_tensors(batch: Any) -> Any:
    """Numpy arrays in a batch (a tokenizer's ``return_tensors="np"``) as tensors (copies), also inside dicts,
    tuples and lists; anything else as it is. The model is called with tensors, as with any tokenizer output."""
    if isinstance(batch, np.ndarray):
        return _from_numpy(batch)
    if isinstance(batch, Mapping):
        return {k: _numpy_to_tensors(v) for k, v in batch.items()} if any(
            isinstance(v, np.ndarray) for v in batch.values()) else batch
    if isinstance(batch, (tuple, list)) and any(isinstance(v, np.ndarray) for v in batch):
        return type(batch)(_numpy_to_tensors(v) for v in batch)
    return batch


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return _call_model(model, batch[0])  # (inputs, labels): labels ignored
    raise ValueError(f"cannot feed a calibration batch of type {type(batch).__name__}: use a dict of tensors "
                     "(passed as keyword arguments), a tensor, or an (inputs, labels) pair")


def _token_mask(batch: Any, block: _Block, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    """(batch, tokens) bool mask of real (non-padding) tokens of a captured block input."""
    bf = block.batch_first("block")
    b, t = block.token_view(x).shape[:2] if bf else (x.shape[1], x.shape[0])  # a grid: its tokens
    inner = batch[0] if isinstance(batch, (tuple, list)) else batch
    if ctx["kwargs"].get("src_key_padding_mask") is not None:
        # the padding mask a torch.nn.TransformerEncoderLayer's attention applies: the model's own reading of the
        # batch, whatever the batch calls its mask and in whichever convention (a wrapper's forward(x,
        # attention_mask) may pass True for padding straight on)
        m = ctx["kwargs"]["src_key_padding_mask"]
        valid = ~m if m.dtype == torch.bool else _real_under_additive_mask(m)
    elif isinstance(inner, Mapping) and inner.get("attention_mask") is not None:
        m = torch.as_tensor(inner["attention_mask"])
        if m.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, tokens) with 1 for real tokens and 0 for padding, "
                             f"got shape {tuple(m.shape)}")
        other = m[(m != 0) & (m != 1)]
        if other.numel():
            raise ValueError(f"attention_mask must hold 1 for real tokens and 0 for padding (the Hugging Face "
                             f"convention, as a tokenizer returns it); it holds {_some_values(other)}. An additive "
                             "mask (0 for real tokens, -inf or a large negative for padding) would be read the "
                             "other way round: pass (mask == 0).long() for it.")
        valid = m != 0
    else:
        own = _block_padding(ctx, b, t)
        valid = torch.ones(b, t, dtype=torch.bool) if own is None else own
    if b != t and tuple(valid.shape) == (t, b):
        raise ValueError(f"the blocks receive their hidden states as (tokens, batch, features), {tuple(x.shape)}, "
                         f"while the batch's padding mask is (batch, tokens), {tuple(valid.shape)}: this model lays "
                         f"its tokens out otherwise than the {block.kind} adapter assumes, and is not supported by "
                         "the transformer adapter.")
    if valid.shape[0] == b and valid.shape[1] != t:
        # a mask over the model's inputs rather than the blocks' tokens: audio samples before the feature encoder, or
        # a sequence the model pads further itself (Longformer); the blocks' own mask tells their padding
        if valid.shape[1] < t:
            valid = _padded_by_model(valid, ctx, t)
        if valid.shape[1] != t:
            own = _block_padding(ctx, b, t)
            if own is not None:
                valid = own
            elif bool(valid.all()):  # no padding in the batch, and none in the blocks
                valid = torch.ones(b, t, dtype=torch.bool)
    if tuple(valid.shape) != (b, t):
        raise ValueError(f"padding mask of shape {tuple(valid.shape)} does not match the block input "
                         f"(batch {b}, tokens {t}), and the blocks receive no padding mask of their own to read the "
                         "padded tokens from. Pass an 'attention_mask' of (batch, tokens) for the blocks' tokens, or "
                         "batches without padding.")
    return valid.to(x.device)


def _block_padding(ctx: dict[str, Any], b: int, t: int) -> torch.Tensor | None:
    """The real tokens according to the (batch, 1 or heads, queries, tokens) attention mask a block receives (or a
    (batch, tokens) one of integers, 1 for real tokens), or ``None`` where it receives none, or one that hides
    nothing.

    The model builds it from a mask the batch passes under another name, or over its inputs rather than the
    blocks' tokens (audio samples). Padding the block hides must not enter the statistics: the mask is read when
    every query row hides the same tokens (a padding mask), or each real token sees a run of real tokens around
    itself (causal, a sliding window, block-diagonal segments), else refused."""
    # the block's attention-mask argument (Hugging Face layers take it by that name or right after the hidden
    # states), not other 4-D arguments such as MPNet's per-head position bias
    named = ctx["kwargs"].get("attention_mask")
    if (isinstance(named, torch.Tensor) and tuple(named.shape) == (b, t) and not named.is_floating_point()
            and bool(((named == 0) | (named == 1)).all())):
        return (named != 0).cpu()  # a (batch, tokens) mask of 1 for real tokens, by name (WavLM's layers get one)
    for m in (named, ctx["args"][0] if ctx["args"] else None):
        if not (isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[0] == b and m.shape[-1] == t):
            continue
        keep = m if m.dtype == torch.bool else m == 0
        if bool(keep.all()):
            continue
        if bool((keep == keep[:, :1, :1, :]).all()):
            return keep[:, 0, 0, :].cpu()
        banded = _causal_band_tokens(keep)
        if banded is not None:
            return banded.cpu()
        raise ValueError("the transformer blocks receive an attention mask that is not a plain padding mask, "
                         "and the calibration batches carry none under 'attention_mask' for their tokens, so padding "
                         "tokens cannot be told apart from real ones. Pass dict batches with an 'attention_mask' "
                         "entry (1 for real tokens, 0 for padding), as a tokenizer returns them.")
    return None


def _padded_by_model(valid: torch.Tensor, ctx: dict[str, Any], t: int) -> torch.Tensor:
    """The batch's padding mask ``valid`` extended to a block input of ``t`` tokens, where the model pads the
    sequence itself (Longformer to a multiple of its attention window, BigBird's block-sparse attention to a multiple
    of its block size): accepted only when the block's own mask agrees with ``valid`` on its tokens and hides every
    added one, otherwise ``valid`` is returned as it is (and refused). The block's mask is Longformer's 2-D additive
    ``attention_mask`` (0 for local attention, positive for global, a large negative for padding) or BigBird's
    ``to_mask`` ``(batch, 1, 1, tokens)`` of 1 for real tokens and 0 for padding."""
    b, n = valid.shape
    m = ctx["kwargs"].get("attention_mask")
    to = ctx["kwargs"].get("to_mask")
    if isinstance(m, torch.Tensor) and tuple(m.shape) == (b, t) and m.is_floating_point():
        real = (m >= 0).cpu()
    elif isinstance(to, torch.Tensor) and tuple(to.shape) == (b, 1, 1, t) and bool(((to == 0) | (to == 1)).all()):
        real = (to[:, 0, 0, :] != 0).cpu()
    else:
        return valid
    if bool((real[:, :n] == valid.cpu()).all()) and not bool(real[:, n:].any()):
        return real
    return valid


#: A float key padding mask is added to the attention scores: a value at or below this one hides the token (its
#: weight is below exp(-1e4) of a real token's), as ``-inf`` does.
_ADDITIVE_PADDING = -1e4


def _real_under_additive_mask(m: torch.Tensor) -> torch.Tensor:
    """Real tokens of a float ``src_key_padding_mask`` (added to the attention scores, as in
    :class:`torch.nn.MultiheadAttention`): 0 for a real token, ``-inf`` or at most ``_ADDITIVE_PADDING`` for
    padding. Any other value (a 1/0 mask of real tokens, a soft bias) leaves its token partly attended, so it is
    neither: refused, with the boolean mask to pass instead."""
    real, padded = m == 0, m <= _ADDITIVE_PADDING
    other = m[~(real | padded)]
    if other.numel():
        raise ValueError(f"a float src_key_padding_mask is added to the attention scores: 0 for a real token, -inf "
                         f"(or at most {_ADDITIVE_PADDING:g}) for padding; this one holds {_some_values(other)}, "
                         "which leave their tokens attended, so they are neither padding nor plainly real. Pass a "
                         "boolean mask, True for padding (for a mask with 1 for real tokens and 0 for padding: "
                         "mask == 0).")
    return real


def _some_values(values: torch.Tensor) -> str:
    """A few of ``values``, for an error message."""
    seen = torch.unique(values.detach().flatten().float().cpu())
    shown = ", ".join(f"{float(v):g}" for v in seen[:4])
    return f"{shown}{', ...' if seen.numel() > 4 else ''}"


def _causal_band_tokens(keep: torch.Tensor) -> torch.Tensor | None:
    """The real tokens of a ``(batch, heads, queries, tokens)`` boolean attention mask, or ``None``.

    A real query attends to itself, so the diagonal marks the real tokens; the mask is read only when every head
    sees the same tokens and each real query sees exactly a run of real tokens around itself: everything before it
    (a decoder's causal mask), its last few (a sliding window), or its own segment (a block-diagonal mask, as
    Pixtral's over the images it packs in one sequence). Padded queries' rows are not read. Any other mask gives
    ``None`` (the caller refuses it).
    """
    b, _, tq, t = keep.shape
    if tq != t or not bool((keep == keep[:, :1]).all()):
        return None
    k = keep[:, 0]
    valid = k.diagonal(dim1=1, dim2=2)
    pos = torch.arange(t, device=k.device)
    first = k.to(torch.int8).argmax(-1)  # the first key each query sees
    last = t - 1 - k.flip(-1).to(torch.int8).argmax(-1)  # and the last
    band = (pos.view(1, 1, t) >= first.unsqueeze(-1)) & (pos.view(1, 1, t) <= last.unsqueeze(-1))
    rows = valid.unsqueeze(-1)
    if bool(((k != band) & rows).any()) or bool((band & rows & ~valid.unsqueeze(1)).any()):
        return None
    return valid


def _capture_first_block(model: nn.Module, block: _Block, batches: list[Any],
                         blocks: list[_Block] | None = None) -> list[dict[str, Any]]:
    """One model forward per batch, stopped at the first block: its input, call context and token mask.

    Where ``blocks`` is given, the blocks take arguments of their own (:func:`_own_arguments`: T5's relative
    position bias, computed by the first block and handed on; each layer type's mask in a decoder mixing
    sliding-window and full attention): the forward runs to the last block and the context also holds every later
    block's arguments under ``"per_block"`` (by block name), which :func:`_fwd` hands to that block. Those
    arguments come from the unpruned model and have been checked not to depend on the hidden states.
    """
    cached: list[dict[str, Any]] = []
    later = list(blocks or [])[1:]
    for batch in batches:
        got: dict[str, Any] = {}

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], got: dict[str, Any] = got) -> None:
            args, kwargs = _block_call(block, args, kwargs)
            got["x"] = args[0].detach()
            got["ctx"] = _context(args, kwargs)
            if not later:
                raise _StopForward

        def later_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], blk: _Block,
                       got: dict[str, Any] = got) -> None:
            got.setdefault("per_block", {})[blk.name] = _context(*_block_call(blk, args, kwargs))
            if blk is later[-1]:
                raise _StopForward

        _run_hooked(model, batch, [(block.module, hook)] + [(b.module, partial(later_hook, blk=b)) for b in later])
        if "x" not in got:
            raise ValueError(f"the model's forward never reached its first transformer block {block.name!r}")
        if later:
            got["ctx"]["per_block"] = got.get("per_block", {})
        x = got["x"]
        if x.is_nested:
            raise ValueError("the first block received a nested tensor; disable the nested-tensor fast path "
                             "(nn.TransformerEncoder(enable_nested_tensor=False))")
        valid = _token_mask(batch, block, x, got["ctx"])
        cached.append({"x": x, "ctx": got["ctx"], "valid": valid})
    return cached


def _block_call(block: _Block, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block call's ``(args, kwargs)`` with the hidden states first in ``args``, as :meth:`_Block.forward`
    replays them; a ``torch.nn.TransformerEncoderLayer``'s are bound to its signature, so that masks passed
    positionally (``layer(x, None, kpm)``) are seen by name, like the keywords ``nn.TransformerEncoder`` passes."""
    if block.kind == "torch_encoder_layer":
        named = dict(inspect.signature(block.module.forward).bind(*args, **kwargs).arguments)
        return (named.pop("src"),), named
    return leading_input(block.module, args, kwargs)


def _run_hooked(model: nn.Module, batch: Any, hooks: list[tuple[nn.Module, Callable[..., Any]]]) -> None:
    """One forward of ``model`` on ``batch`` with the forward pre-hooks ``(module, hook)`` (keyword arguments
    passed), abandoned where a hook raises ``_StopForward``; the hooks are always removed."""
    handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in hooks]
    try:
        _call_model(model, batch)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _check_own_arguments(model: nn.Module, first: _Block, later: list[_Block], batch: Any,
                         seen: dict[str, dict[str, Any]]) -> None:
    """Blocks that take arguments of their own (T5, sliding-window layers among full-attention ones) are replayed
    in the pruned network with the arguments captured from the unpruned one, which is right only if those do not
    depend on the hidden states. Checked on one batch: with the first block's input changed (times 1.5, plus
    0.25), every later block must receive the same arguments (one more forward)."""
    again: dict[str, dict[str, Any]] = {}

    def change(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs = leading_input(m, args, kwargs)
        return (args[0] * 1.5 + 0.25, *args[1:]), kwargs

    def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], blk: _Block) -> None:
        again[blk.name] = _context(*_block_call(blk, args, kwargs))
        if blk is later[-1]:
            raise _StopForward

    _run_hooked(model, batch, [(first.module, change)] + [(b.module, partial(record, blk=b)) for b in later])
    for b in later:  # the stores the blocks write (_STREAM_STATES) change with them, and are replayed as such
        if not _same_value(_without_stream_states(again.get(b.name)), _without_stream_states(seen.get(b.name))):
            raise ValueError(f"block {b.name!r} ({type(b.module).__name__}) receives arguments that change with the "
                             "hidden states of the blocks before it, and the pruner would replay those of the "
                             "unpruned model: this model is not supported by the transformer adapter.")


def _same_value(a: Any, b: Any) -> bool:
    """Whether two captured block arguments are the same, looking into tuples, lists and dicts."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)
    return _same_argument(a, b)


#: Keyword arguments of block calls that hold a store which the blocks of one forward write and later blocks read:
#: Gemma 4's ``shared_kv_states``, where the last layers that compute their own keys and values leave them for the
#: later layers (``num_kv_shared_layers``) to reuse. Such a store is not an argument to replay as captured: the
#: blocks that write it are replayed before those that read it, and the pruned network, from its first changed
#: block on, writes and reads its own (:func:`_own_stream_states`).
_STREAM_STATES = frozenset({"shared_kv_states"})


def _context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's arguments besides its input, as :meth:`_Block.forward` replays them (caches dropped)."""
    return {"args": tuple(_no_cache(a) for a in args[1:]), "kwargs": {k: _no_cache(v, k) for k, v in kwargs.items()}}


def _without_stream_states(ctx: dict[str, Any] | None) -> dict[str, Any] | None:
    """A captured context without its :data:`_STREAM_STATES` (for comparisons)."""
    if ctx is None:
        return None
    return {**ctx, "kwargs": {k: v for k, v in ctx["kwargs"].items() if k not in _STREAM_STATES}}


def _own_stream_states(cache: list[dict[str, Any]]) -> None:
    """Give the pruned network its own stores (:data:`_STREAM_STATES`), as the original network's hold them now.

    Until a block changes, the pruned network is the original one and both run with the same context (and the
    same stores: the pruned network does not rerun the unchanged blocks, whose writes it reads). From the first
    changed block on, each writes its own: called then, each cached batch's ``"ctx"`` becomes a copy holding
    copies of the stores (the original network keeps its context as ``"octx"``)."""
    for entry in cache:
        if "octx" in entry:  # already apart (a decoder's, whose encoder states differ)
            continue
        ctx, memo = entry["ctx"], {}
        if not any(c["kwargs"].get(k) is not None for c in (ctx, *ctx.get("per_block", {}).values())
                   for k in _STREAM_STATES):
            continue

        def own(c: dict[str, Any], memo: dict[int, Any] = memo) -> dict[str, Any]:
            kw = dict(c["kwargs"])
            for k in _STREAM_STATES & kw.keys():
                if kw[k] is not None:  # one copy per store: the blocks of one forward share theirs
                    kw[k] = memo.setdefault(id(kw[k]), copy.copy(kw[k]))
            return {**c, "kwargs": kw}

        mine = own(ctx)
        if "per_block" in ctx:
            mine["per_block"] = {n: own(c) for n, c in ctx["per_block"].items()}
        entry.update(octx=ctx, ctx=mine)


def _no_cache(value: Any, name: str = "") -> Any:
    """A block argument as the cached context may reuse it: no key/value cache (a decoder's cache object would
    grow with every re-run of the block) and ``use_cache=False``."""
    if name == "use_cache":
        return False
    if name in ("past_key_value", "past_key_values", "layer_past") or (
            hasattr(value, "get_seq_length") and hasattr(value, "update")):
        return None
    return value


def _same_argument(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if a is b or a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: treat as the same object only
        return False


def _rows(t: torch.Tensor, valid: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """Token rows (n_valid, features) of a (batch, tokens, f) or (tokens, batch, f) activation, or of one with its
    tokens flattened, (batch * tokens, f) or (tokens * batch, f) (OPT's FFN)."""
    if t.dim() == 2 and t.shape[0] == valid.numel() and valid.dim() == 2:
        lead = tuple(valid.shape) if batch_first else tuple(reversed(valid.shape))
        t = t.reshape(*lead, t.shape[1])
    if not batch_first:
        t = t.transpose(0, 1)
    elif t.dim() > 3 and t.shape[0] == valid.shape[0] and t.shape[1:-1].numel() == valid.shape[1]:
        t = t.flatten(1, -2)  # a grid of tokens, (batch, height, width, features) (SAM's image encoder)
    if t.dim() < 3 or tuple(t.shape[:2]) != tuple(valid.shape):
        raise ValueError(f"an activation of shape {tuple(t.shape)} inside a transformer block does not have the "
                         f"(batch, tokens) = {tuple(valid.shape)} layout the block adapter assumes (e.g. an "
                         "attention that works in (tokens, batch, features)): this model is not supported")
    return t[valid]


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------

_NONFINITE = ("non-finite (NaN/inf) activations in the calibration statistics: check the model and the "
              "calibration inputs")


class _Problem:
    """The per-fold statistics of one stage's token-weighted least-squares problem and what is computed from them:
    the selection objective, the refit and its cross-validated ridge (the shared kernels of
    :mod:`nn_adapters._stats`).

    Rows ``t`` carry weights ``w_t`` and target columns are scaled by ``c`` (see ``weighting`` in
    :func:`prune_transformer`): the objective is ``sum_t w_t ||(y_t - M^T a_t - b) * c||^2``. Each fold is a
    weighted :class:`submod.GramAccumulator`. It holds no module and no buffer of the forward pass, so it pickles
    (to a process or Dask worker; the accumulators as numpy on the host, whatever their storage).
    """

    def __init__(self, folds: list[submod.GramAccumulator], col_scale: np.ndarray | None,
                 total: submod.GramAccumulator | None = None) -> None:
        self.folds = folds
        self.col_scale = col_scale
        self._total = total

    @property
    def total(self) -> submod.GramAccumulator:
        if self._total is None:
            tot = submod.GramAccumulator(self.folds[0].n_features, self.folds[0].n_targets,
                                         device=self.folds[0].device)
            for acc in self.folds:
                tot.merge(acc)
            self._total = tot
        return self._total

    def objective(self, ridge_rel: float, groups: list[np.ndarray] | None,
                  fit_intercept: bool) -> submod.sparse_regression.SparseRegression:
        lam = float(ridge_rel) * _ridge_scale(self.total, fit_intercept)
        return self.total.to_objective(ridge=lam, groups=groups, fit_intercept=fit_intercept)

    def refit(self, cols: np.ndarray, ridge: float | str, prior: np.ndarray | None,
              fit_intercept: bool) -> tuple[np.ndarray, np.ndarray | None, float, float, float | None]:
        """Consumer weights (n_cols, out) and bias of the weighted ridge fit on the columns ``cols`` (toward
        ``prior``, the original weights ``(c, m)``, when given); also the in-sample relative error, the relative
        ridge used and, with ``ridge="cv"``, the cross-validated relative error.

        The fit is solved on targets scaled by ``col_scale`` (the LayerNorm's ``|gamma|``), so the penalty on
        output ``i`` is ``lam * gamma_i^2 * ||M_i - prior_i||^2``: error and ridge are both measured after the
        LayerNorm's scale, and the cross-validation chooses ``lam`` in that space."""
        if self.col_scale is not None and prior is not None:
            prior = prior * self.col_scale
        cv_err = None
        if ridge == "cv":
            if len(self.folds) >= 2 and all(acc.weight_sum > 0 for acc in self.folds):
                lam, errs = _cv_ridge(self.folds, cols, CV_GRID, prior, intercept=fit_intercept)
                cv_err = float(errs.min())
            else:
                lam = SELECTION_RIDGE
        else:
            lam = float(ridge)
        m_rows, bias, rel = _ridge_refit(self.total, cols, lam, prior, intercept=fit_intercept)
        if self.col_scale is not None:
            m_rows = m_rows / self.col_scale
            bias = bias / self.col_scale
        return m_rows, (np.asarray(bias) if fit_intercept else None), rel, lam, cv_err


class _Stats(_Problem):
    """:class:`_Problem` fed batch by batch: sentences are dealt into :data:`CV_FOLDS` folds by
    :func:`_assign_folds` (round-robin, copies of a sentence with its first occurrence), so all tokens of a
    sentence stay in one fold; also the unweighted column sums of squares (for the Wanda scores)."""

    def __init__(self, n_features: int, n_targets: int, col_scale: torch.Tensor | None = None,
                 folds: int = 1, device: torch.device | None = None) -> None:
        # device: torch storage there (a GPU model, see nn_adapters._stats.stats_device); None: numpy on the host
        self.device = device
        super().__init__([submod.GramAccumulator(n_features, n_targets, device=device) for _ in range(max(1, folds))],
                         None if col_scale is None else col_scale.detach().to(torch.float64).cpu().numpy())
        if device is None:
            self._col_sq: np.ndarray | torch.Tensor = np.zeros(n_features)  # unweighted, for the Wanda scores
        else:
            self._col_sq = torch.zeros(n_features, dtype=torch.float64, device=device)
            self._col_scale_dev = None if col_scale is None else col_scale.detach().to(device, torch.float64)

    def problem(self) -> _Problem:
        """The statistics without the forward-pass side (the folds merged now, where they are)."""
        return _Problem(self.folds, self.col_scale, self.total)

    @property
    def col_sq(self) -> np.ndarray:
        """Unweighted sum of squares of every input column over the calibration tokens (for the Wanda scores)."""
        return self._col_sq if self.device is None else self._col_sq.cpu().numpy()

    def update(self, a: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, fold: torch.Tensor) -> None:
        if self.device is not None:  # torch storage: everything stays on the model's device
            a64 = a.detach().to(self.device, torch.float64)
            y64 = y.detach().to(self.device, torch.float64)
            if self._col_scale_dev is not None:
                y64 = y64 * self._col_scale_dev
            _update_folds(self.folds, a64, y64, w, fold % len(self.folds), nonfinite=_NONFINITE)
            self._col_sq += a64.square().sum(dim=0)
            self._total = None
            return
        a64 = a.detach().to(torch.float64).cpu().numpy()
        y64 = y.detach().to(torch.float64).cpu().numpy()
        if not (np.isfinite(a64).all() and np.isfinite(y64).all()):
            raise ValueError(_NONFINITE)
        if self.col_scale is not None:
            y64 = y64 * self.col_scale
        w64 = None if w is None else w.detach().to(torch.float64).cpu().numpy()
        fold = fold.cpu().numpy() % len(self.folds)
        with _one_blas_thread():  # no BLAS threads competing with torch's own on a small machine (see submod)
            for h, acc in enumerate(self.folds):
                sel = fold == h
                if sel.any():
                    acc.update(a64[sel], y64[sel], None if w64 is None else w64[sel])
        self._col_sq += np.einsum("ij,ij->j", a64, a64)
        self._total = None


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------

def _view(block: _Block, stage: str) -> tuple[_Block, str]:
    """The block and stage that carry out ``stage`` of ``block``: a decoder layer's cross-attention (``"cross"``)
    is the ``"heads"`` stage of the layer seen through its cross-attention (:attr:`_Block.cross`)."""
    return (block.cross, "heads") if stage == "cross" else (block, stage)


def _residual_entry(block: _Block, stage: str) -> tuple[nn.Module, int] | str | BranchSum | None:
    """:meth:`_Block.residual_input` of ``stage`` (through :func:`_view`)."""
    view, role = _view(block, stage)
    return view.residual_input(role)


def _is_branch(entry: Any) -> bool:
    """Whether a :meth:`_Block.residual_input` says the residual is a sum minus the stage's output (a parallel
    branch: the block output, or a :class:`BranchSum`)."""
    return entry == BLOCK_OUTPUT or isinstance(entry, BranchSum)


def _unit_columns(stage: str, block: _Block) -> tuple[int, list[np.ndarray] | None]:
    block, stage = _view(block, stage)
    if stage == "ffn":
        return block.ffn_units, None
    if stage == "experts":
        return block.n_experts, None
    d, h = block.head_unit_width, block.head_units
    return h, [np.arange(u * d, (u + 1) * d) for u in range(h)]


def _consumer_weight(stage: str, block: _Block) -> torch.Tensor:
    """The stage's consumer weight (out, in) in float64 as it acts on the residual stream: with a layer scale
    (DINOv2), output row ``i`` is multiplied by ``lambda_i``; with a norm after the consumer (Gemma 2 and 3, OLMo
    2), by that norm's gain ``g_i`` (its per-token factor is the same for every unit)."""
    block, stage = _view(block, stage)
    weight = weight_of(_consumer(block, stage)).detach()
    w = weight.double()
    scale = block.output_scale(stage)
    norm = block.output_norm(stage)
    if scale is None and norm is not None:
        scale = _norm_gains(norm, w.shape[0], weight)
    return w if scale is None else w * scale.detach().double().to(w.device).view(-1, 1)


def _magnitude_scores(stage: str, block: _Block) -> np.ndarray:
    """Torch-Pruning-style group importance: mean over the coupled layers (every producer of the FFN unit and
    the down projection; query, key, value and output projections of the head) of the unit's squared L2 norm.
    The consumer's weights are taken as they act on the residual stream (times a layer scale, if any)."""
    block, stage = _view(block, stage)
    with torch.no_grad():
        if stage == "ffn":
            units, parts = block.ffn_units, block.FFN_PARTS  # a fused gate-and-up projection: two row blocks
            s = sum(weight_of(p).double().pow(2).sum(1) + (0.0 if p.bias is None else p.bias.double().pow(2))
                    for p in block.producers).view(parts, units).sum(0)
            s = (s + _consumer_weight(stage, block).pow(2).sum(0)) / (len(block.producers) * parts + 1)
            return s.cpu().numpy()
        d, h = block.head_unit_width, block.head_units
        s = torch.zeros(h, dtype=torch.float64)
        for w in block.qkv_weights():  # a unit's rows are consecutive (a key/value group: more query than key rows)
            s += w.detach().double().pow(2).view(h, -1, w.shape[-1]).sum((1, 2)).cpu()
        s += _consumer_weight(stage, block).pow(2).view(-1, h, d).sum((0, 2)).cpu()
        return (s / 4).numpy()


def _top_units(scores: np.ndarray, k: int, parts: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` units of largest score (ties to the lower index); with ``parts`` (a label ``0 .. P - 1`` per
    unit), the ``k / P`` of largest score in each part."""
    if parts is None:
        return np.argsort(-scores, kind="stable")[:k]
    order = np.lexsort((-scores, parts))  # by part, then by decreasing score (stable: ties to the lower index)
    rank = np.arange(order.size) - np.searchsorted(parts[order], parts[order])
    return np.sort(order[rank < k // (int(parts.max()) + 1)])


def _wanda_scores(stage: str, block: _Block, stats: _Stats) -> np.ndarray:
    """Wanda-style structured score: sum over the unit's consumer weights of |W_ij| * ||X_j||_2 (``W`` as it acts
    on the residual stream: times a layer scale, if any)."""
    block, stage = _view(block, stage)
    w1 = _consumer_weight(stage, block).abs().sum(0).cpu().numpy()  # per input column
    per_col = w1 * np.sqrt(np.maximum(stats.col_sq, 0.0))
    if stage == "ffn":
        return per_col
    return per_col.reshape(block.head_units, block.head_unit_width).sum(1)


def _block_fractions(keep: float | Mapping[str | int, float], blocks: list[_Block],
                     unrecognised: tuple[str, ...] = ()) -> list[float]:
    """The kept fraction of every block: ``keep`` itself, or from ``{block name or index: fraction}`` (blocks not
    named keep every unit; an index counts the blocks, not the ``unrecognised`` layers of their stacks)."""
    if not isinstance(keep, Mapping) or all(k in _STAGE_KEYS for k in keep):  # one fraction, or one per stage
        return [1.0 if isinstance(keep, Mapping) else float(keep)] * len(blocks)
    names = [b.name for b in blocks]
    out = [1.0] * len(blocks)
    seen: set[int] = set()
    for key, f in keep.items():
        if isinstance(key, numbers.Integral) and not isinstance(key, bool) and 0 <= key < len(blocks):
            i = int(key)
        elif isinstance(key, str) and key in names:
            i = names.index(key)
        elif key in unrecognised:
            raise ValueError(f"keep names {key!r}, a layer the adapter does not recognise: it is run as it is, not "
                             f"pruned (see report.skipped); name blocks from {names} or index them "
                             f"0..{len(blocks) - 1}")
        else:
            raise ValueError(f"keep names an unknown block {key!r}: use a block name from {names} or an index "
                             f"0..{len(blocks) - 1}")
        if i in seen:
            raise ValueError(f"keep names block {names[i]!r} twice (by name and by index): name it once")
        seen.add(i)
        out[i] = float(f)
    return out


#: The stages a ``keep`` dict may name (``cross``: a decoder layer's cross-attention heads, as ``heads`` unless named;
#: ``shared``: a mixture's shared experts, as ``ffn`` unless named), and the targets that prune each.
_STAGE_KEYS = {"heads": ("heads", "all"), "cross": ("heads", "all"), "ffn": ("ffn", "all"),
               "shared": ("ffn", "all"), "experts": ("experts",)}


def _stage_keep(keep: Any, target: str) -> dict[str, float] | None:
    """``keep`` as ``{stage: fraction}`` if it is a dict of stage names (:data:`_STAGE_KEYS`), else ``None``;
    refused if it mixes stages with blocks, or names a stage ``target`` does not prune."""
    if not isinstance(keep, Mapping) or not keep:
        return None
    stages = [k for k in keep if isinstance(k, str) and k in _STAGE_KEYS]
    if not stages:
        return None
    if len(stages) < len(keep):
        raise ValueError(f"keep mixes stages ({', '.join(map(repr, stages))}) with blocks "
                         f"({', '.join(repr(k) for k in keep if k not in stages)}): give a fraction per stage, or "
                         "per block, not both")
    for k in stages:
        if target not in _STAGE_KEYS[k]:
            raise ValueError(f"keep names stage {k!r}, which target={target!r} does not prune: pass "
                             f"target={_STAGE_KEYS[k][-1]!r}, or leave {k!r} out")
    return {k: float(f) for k, f in keep.items()}


def _with_stage_keep(fraction: float | None, stage_keep: Mapping[str, float], target: str | None
                    ) -> dict[str, float]:
    """The per-stage ``keep`` of :func:`prune_transformer` for ``fraction`` in every stage that ``target`` (default
    ``"ffn"``) prunes (the heads and the FFN for ``"all"``) and ``stage_keep``'s fraction in the stages it names:
    what the CLI's ``--keep F --keep-stage STAGE=G`` asks for. Without ``fraction`` the stages not named keep
    every unit."""
    swept = [s for s in ("heads", "ffn", "experts") if (target or "ffn") in _STAGE_KEYS[s]]
    return {**{s: float(fraction) for s in swept if fraction is not None}, **stage_keep}


def _stage_fraction(stage_keep: dict[str, float] | None, block_fraction: float, stage: str) -> float:
    """The fraction of ``stage``'s units a block keeps: its block's, or from ``{stage: fraction}`` (a stage not
    named keeps every unit; ``cross`` follows ``heads`` and ``shared`` follows ``ffn`` unless named)."""
    if stage_keep is None:
        return block_fraction
    if stage not in stage_keep:
        stage = {"cross": "heads", "shared": "ffn"}.get(stage, stage)
    return stage_keep.get(stage, 1.0)


def _n_keep(keep: float, n_units: int, multiple: int = 1) -> int:
    """Units kept of ``n_units`` at fraction ``keep``: at least one, rounded up to a multiple of ``multiple``."""
    k = max(1, round(keep * n_units))
    return int(min(n_units, -(-k // multiple) * multiple))


def _hull_decrements(errors: np.ndarray) -> np.ndarray:
    """Per-unit error decrease along the lower convex hull of the points ``(k, errors[k])``, ``k = 0..n``.

    ``out[k]`` is the decrease credited to the ``(k+1)``-th unit: constant along each hull segment, hence
    non-increasing in ``k`` (the hull is convex). One monotone-chain pass, ``O(n)``.
    """
    e = np.asarray(errors, dtype=np.float64)
    hull = [0]
    for k in range(1, e.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (e[b] - e[a]) * (k - a) >= (e[k] - e[a]) * (b - a):  # b on or above the chord a -> k
                hull.pop()
            else:
                break
        hull.append(k)
    out = np.empty(e.size - 1)
    for a, b in zip(hull[:-1], hull[1:], strict=False):
        out[a:b] = (e[a] - e[b]) / (b - a)
    return out


def allocate_units(curves: list[np.ndarray], total: int, floors: list[int] | np.ndarray) -> np.ndarray:
    """Split ``total`` kept units across layers from their nested error curves (marginal-gain allocation).

    ``curves[l][k]`` is the error of layer ``l`` when it keeps ``k`` units (``k = 0..n_l``, a nested greedy
    path gives all of them at once). Each curve is replaced by its lower convex hull; starting from ``floors``,
    units are handed out one at a time to the layer whose (hull) error drops most, which is a sort of all the
    per-unit decrements. For convex curves this minimises ``sum_l curves[l][k_l]`` exactly subject to
    ``sum_l k_l = total`` and ``floors[l] <= k_l <= n_l`` (the classical marginal-allocation result, Fox 1966,
    "Discrete optimization via marginal analysis"); otherwise it is optimal for the hulls. Ties go to the lower
    layer index.

    Parameters
    ----------
    curves : list of 1-d arrays
        Non-negative errors, ``len(curves[l]) = n_l + 1``.
    total : int
        Units kept over all layers, ``sum(floors) <= total <= sum(n_l)``.
    floors : sequence of int
        Minimum units per layer, ``0 <= floors[l] <= n_l``.

    Returns
    -------
    numpy.ndarray of int64
        Units kept per layer; sums to ``total`` exactly.

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.array([4.0, 3.0, 2.0, 1.0, 0.0])    # one unit saves 1
    >>> steep = np.array([40.0, 10.0, 5.0, 2.0, 0.0])  # first units save much more
    >>> allocate_units([flat, steep], total=4, floors=[1, 1]).tolist()
    [1, 3]
    """
    floors = np.asarray(floors, dtype=np.int64)
    sizes = np.array([len(c) - 1 for c in curves], dtype=np.int64)
    if floors.shape != sizes.shape or (floors < 0).any() or (floors > sizes).any():
        raise ValueError(f"floors {floors.tolist()} must give one count in [0, n_l] per curve (n_l = "
                         f"{sizes.tolist()})")
    if not int(floors.sum()) <= total <= int(sizes.sum()):
        raise ValueError(f"total {total} must lie between sum(floors) = {int(floors.sum())} and the number of "
                         f"units {int(sizes.sum())}")
    dec = [_hull_decrements(c)[f:] for c, f in zip(curves, floors, strict=True)]
    layer = np.concatenate([np.full(d.size, i, dtype=np.int64) for i, d in enumerate(dec)])
    order = np.lexsort((layer, -np.concatenate(dec)))[: total - int(floors.sum())]
    return floors + np.bincount(layer[order], minlength=len(curves))


# ----------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Ridge:
    """The ridge option of :func:`prune_transformer`: a number, or ``"cv"`` (refit ridge by cross-validation)."""

    value: float | str
    prior: bool

    @property
    def selection(self) -> float:
        return SELECTION_RIDGE if self.value == "cv" else float(self.value)


def _assign_folds(cache: list[dict[str, Any]], block: _Block) -> None:
    """Deal the calibration sequences round-robin into :data:`CV_FOLDS` folds: ``fold`` holds the fold of every
    real token row (the order of :func:`_rows`), so all tokens of a sequence share a fold.

    Copies of a sequence (the same real tokens at the first block's input) go to the fold of its first
    occurrence (:class:`~nn_adapters._data.FoldDealer`); sequences that are all padding are not dealt.
    """
    bf = block.batch_first("block")
    dealer = FoldDealer(CV_FOLDS)
    for c in cache:
        valid = c["valid"]
        rows = (block.token_view(c["x"]) if bf else c["x"].transpose(0, 1)).detach().cpu()
        real = valid.cpu()
        # a sequence without real tokens (all padding) has no rows: it is not dealt, so that it shifts no fold
        seq = torch.as_tensor([dealer.fold(rows[i][real[i]]) if bool(real[i].any()) else 0
                               for i in range(valid.shape[0])], dtype=torch.long, device=valid.device)
        c["fold"] = seq[:, None].expand_as(valid)[valid]  # on the model's device, as the statistics
        c["seq_fold"] = seq


def _match_tokens(cache: list[dict[str, Any]], xs: list[torch.Tensor], block: _Block) -> None:
    """Make each cached batch's token mask and folds fit ``block``'s inputs ``xs``: between the stages of a
    hierarchical encoder (see :func:`_link_stages`) the number of tokens changes. Every token of a batch without
    padding is real at every stage, each in its sequence's fold; a padded batch keeps its mask only where the count
    does not change, since which merged token is padding is not known."""
    bf = block.batch_first("block")
    for c, x in zip(cache, xs, strict=True):
        t = block.token_view(x).shape[1] if bf else x.shape[0]
        if c["valid"].shape[1] == t:
            continue
        first = c.setdefault("first_tokens", (c["valid"], c["fold"]))
        if first[0].shape[1] == t:
            c["valid"], c["fold"] = first
        elif bool(first[0].all()):
            c["valid"] = torch.ones(first[0].shape[0], t, dtype=torch.bool, device=first[0].device)
            c["fold"] = c["seq_fold"][:, None].expand(-1, t).reshape(-1)
        else:
            raise ValueError(f"block {block.name!r} receives {t} tokens per sequence, the first block "
                             f"{first[0].shape[1]} (a hierarchical encoder merges tokens between its stages), and "
                             "the calibration batches have padding, whose place among the merged tokens is not "
                             "known: calibrate on batches without padding (images of one size, or sequences of "
                             "one length).")


@outside_inference_mode
def prune_transformer(
    model: nn.Module,
    calibration_data: Any,
    keep: float | Mapping[str | int, float] | None = None,
    target: str = "ffn",
    method: str = "asym",
    reweight: bool = True,
    seed: int | None = 0,
    *,
    propagation: str = "asym",
    ridge: float | str = "cv",
    refit_prior: str = "original",
    rule: str = "greedy",
    residual: bool = True,
    weighting: str = "layernorm",
    allocation: str = "uniform",
    min_keep: float = 0.1,
    executor: Executor | None = None,
    head_unit: str = "group",
    compression: float | None = None,
) -> tuple[nn.Module, TransformerPruneReport]:
    """Prune FFN neurons and/or attention heads of every transformer block; return a smaller copy.

    Parameters
    ----------
    model : torch.nn.Module
        A model containing a stack of transformer blocks applied one after another: Hugging Face encoder layers
        (BERT-style ``BertLayer`` and look-alikes, DeBERTa v1-v3, Longformer (FFN), FNet (FFN), MPNet, DistilBERT,
        ALBERT (layer mode: its layer is shared by the calls), the sentence embedders GTE, Nomic Embed, Jina Embeddings
        v3 and EmbeddingGemma 2, ESM C (FFN), wav2vec 2.0-family speech encoders, ViT, BEiT, DINOv2, DINOv3, AIMv2,
        Pixtral, CLIP; SAM's image encoder, ViTDet; Swin, Swin V2, SegFormer and PVT, their stages linked through the
        patch merging), Llama-style decoder layers (Llama, Mistral, Qwen2, Qwen3, Cohere, StarCoder2, StableLM: heads
        pruned as key/value groups; Gemma 2 and 3, OLMo 2 and 3 and EXAONE 4, whose norms after the attention and the
        FFN the refit accounts for; mixtures of experts stored as 3D tensors, such as Mixtral, Qwen3-MoE and, with a
        shared expert, Qwen2-MoE and GLM-4-MoE, whose experts each keep ``keep`` of their neurons; decoders with latent
        attention, DeepSeek-V2/V3 and MiniCPM3), BART-family encoder and decoder layers (BART, mBART, Marian, Pegasus,
        Whisper, XGLM...), OPT, GPT-2 (its ``Conv1D`` projections stay ``Conv1D``), GPT-Neo, GPT-J, CodeGen,
        GPT-NeoX (Pythia), Phi, BLOOM, Falcon, GPTBigCode (StarCoder) and MPT decoder layers, T5 blocks (heads:
        transformers >= 5), LFM2 or :class:`torch.nn.TransformerEncoderLayer` blocks (post-LN or ``norm_first=True``);
        the table of :doc:`/transformer` lists the layouts. An encoder-decoder model (its ``get_encoder()`` and
        ``get_decoder()`` holding every block) is pruned stack by stack: the encoder, then the decoder on the pruned
        encoder's states. Not modified (its modules are copied, its tensors read; the result holds its own).
    calibration_data : batch or iterable of batches
        Unlabeled inputs: dicts of tensors passed as keyword arguments (tokenizer outputs; the ``attention_mask`` marks
        padding), tensors, or ``(inputs, labels)`` pairs (labels ignored); numpy arrays (a tokenizer's
        ``return_tensors="np"``) are copied into tensors. Padding tokens never enter the statistics; where the mask
        covers the model's inputs rather than the blocks' tokens (audio samples before a speech encoder's feature
        encoder, or a sequence the model pads further, as Longformer and BigBird), the padding is read from the mask the
        model hands its blocks. Only magnitude or random pruning of plain FFNs without refit reads no data (``None``
        is then accepted); head pruning and the pruning of gated FFNs, or of FFNs with other parts between their
        projections (SegFormer's convolution), always check each block's unit layout on the first batch.
    keep : float or dict, default 0.5
        Fraction in (0, 1] of the units kept in every block (at least one unit is kept); with
        ``allocation="error-curve"``, the total over the blocks is the same and its split is chosen from data. A
        dict ``{block name or index: fraction}`` sets the fraction block by block (uniform allocation only); blocks
        it does not name keep every unit. A dict of stages ``{"heads": 0.75, "ffn": 0.5}`` sets the fraction stage
        by stage in every block (with ``target="all"``: a quarter of the heads and half of the neurons go; any
        allocation): ``"heads"``, ``"ffn"``, ``"experts"``, ``"cross"`` (a decoder layer's cross-attention heads, as
        ``"heads"`` unless named) and ``"shared"`` (a mixture's shared experts, as ``"ffn"`` unless named); a stage
        of the target it does not name keeps every unit. An index counts the recognised blocks (those of
        ``report.units``), not the layers of a hybrid stack that are run as they are (``report.skipped``). A block
        that keeps every unit is still refitted where the refit can change it: in ``asym`` mode after a changed
        block (the refit then compensates the error arriving from the pruned blocks before it), or with
        ``refit_prior="zero"``. Where the refit would return its trained weights exactly (``reweight=False``, or
        ``refit_prior="original"`` with the block's inputs those of the original network, or in ``seq`` mode whose
        targets are the block's own outputs) it is left as it is and its statistics are not gathered: pruning only
        the last blocks costs little for the blocks before them.
    target : {"ffn", "heads", "all", "experts"}
        Which units to prune. ``"heads"`` includes the heads of a BART-family decoder layer's cross-attention
        (stage ``"cross"``). With ``"all"`` the heads of a block are pruned first, then its FFN sees the pruned
        attention. ``"experts"``: whole experts of every mixture of experts (``keep`` is the fraction of its
        routed experts kept, at least the number each token is routed to; other blocks and shared experts are left
        as they are). The router loses the removed experts' rows and routes every token among the kept ones, as
        its forward does. The greedy methods keep the set that minimises the squared error of the mixture's routed
        output on the calibration tokens (the network and target of the mode, as for the neurons), trying every
        kept set when there are at most 512 (an optimum for that objective), else removing experts one at a time
        (backward elimination); ``"magnitude"`` keeps the experts of largest weight norm, ``"wanda"`` those of
        largest routed output mass ``sum_t w_t ||expert(x_t)||``. With ``reweight``, the kept experts' down
        projections are then refitted jointly to the same target (block coordinate passes, ``ridge`` and
        ``refit_prior`` as for the neurons). Always reads the calibration data; the router must return the
        routing its experts receive and run on fewer experts (checked; refused otherwise, e.g. DeepSeek-V3's
        group-limited routing with groups left too small). See :ref:`whole-expert pruning <expert-pruning>`.
    method : {"asym", "seq", "layer", "magnitude", "wanda", "random"}
        Greedy forward selection (:meth:`submod.SparseRegression.greedy_path`) in the given mode, or a baseline.
        The MLP/CNN path's names ``"weight_norm"`` and ``"act_norm"``, the paper's class names
        (``"AsymInChange"``, ...) and any letter case are accepted too; the report records the name above.
    reweight : bool
        Refit the consumer (down projection or attention output projection) weights and bias by least squares
        on the kept units. ``False`` keeps the original weights of the kept units.
    seed : int
        Seed of the ``"random"`` baseline (the greedy methods are deterministic).
    propagation : {"asym", "seq", "layer"}
        Statistics used by the baselines for the refit and the Wanda activation norms.
    ridge : "cv" or float, default "cv"
        Ridge added to the Gram matrices, relative to the mean diagonal of the centred Gram matrix of the
        consumer's inputs (guards dead and duplicate units, and regularises the refit). ``"cv"``: the greedy
        selection uses :data:`SELECTION_RIDGE` and the refit's ridge is chosen per block and stage by 5-fold
        cross-validation over the calibration sentences (all tokens of a sentence in one fold; held-out errors
        in closed form from per-fold statistics, see ``nn_adapters._stats.cv_ridge``); with fewer than 5
        calibration sequences it falls back to :data:`SELECTION_RIDGE` (``cv_relative_error`` is then ``None``
        in the report). A number fixes both.
    refit_prior : {"original", "zero"}, default "original"
        What the refit's ridge shrinks toward: the consumer's trained weights of the kept units (a Gaussian prior
        centred on the trained network, so that a strong ridge damps only the compensation for the removed units,
        the part estimated from the calibration tokens) or zero (ordinary ridge).
    rule : {"greedy", "omp"}
        Selection rule of the greedy path.
    residual : bool
        ``asym`` only: targets are the original residual sum minus the pruned network's residual input, so the
        refit also compensates the error carried by the residual stream.
    weighting : {"layernorm", "none"}
        ``"layernorm"``: measure the error after the post-LN LayerNorm that follows the stage (tokens weighted by
        ``1 / sigma_t^2``, output dimensions by ``gamma^2``); pre-LN blocks are not weighted. An RMS norm applied
        to the consumer's output before the sum (Gemma 2 and 3, OLMo 2) is part of the block's function, like a
        layer scale: its weights (token ``t`` by ``s_t^2``, channel ``i`` by ``g_i^2``) apply with either setting.
    allocation : {"uniform", "error-curve"}
        (``"error"``, the MLP/CNN path's earlier spelling, is accepted for ``"error-curve"``.)
        ``"uniform"``: every block keeps ``round(keep * n)`` units of each stage. ``"error-curve"``: the same
        total number of kept units per stage (exactly), split across blocks by :func:`allocate_units` from
        per-block error curves: a first pass over the original network computes, per block and stage, the
        layer-mode statistics (``weighting`` applied, absolute errors so that blocks are comparable) and one
        nested greedy path over all units, whose prefix errors give the error of every kept size. Costs one
        extra forward of each original block per batch, one more Gram matrix and one greedy path per block. With
        ``target="experts"``, the kept experts are split between the mixtures from each one's least routed error
        per number of experts kept (never fewer than it routes each token to). The experts of a mixture keep as
        many neurons each (``target="ffn"``): a mixture's curve is the sum of its experts' greedy curves (one path
        per expert), split in steps of one neuron an expert (of its unit multiple, where the experts' layout asks
        for one), its shared expert's neurons as a stage of their own. Heads kept evenly over parts (CodeGen's
        model-parallel blocks; query heads over key/value groups, ``head_unit="query"``) are split in steps of
        one head a part, from each block's curve of greedy errors under the per-part quota (one path per quota:
        ``q`` heads from each part, ``q = 1..`` heads a part). Units are traded only between blocks where they
        are of the same kind: dense FFNs beside mixtures (DeepSeek's first layers), or heads over different
        numbers of parts, are split among their own kind, each kind keeping its uniform total.
    min_keep : float
        ``allocation="error-curve"`` only: every block keeps at least ``ceil(min_keep * n)`` units of each stage
        (capped at its uniform count), in (0, 1].
    head_unit : {"group", "query"}, default "group"
        The attention unit of decoders with grouped-query attention (Llama-style layers: Llama, Mistral, Qwen2/3,
        the mixtures of experts...; Falcon's new decoder architecture). ``"group"``: a key/value head and the query
        heads that read it go together (the key/value cache shrinks too). ``"query"``: query heads, as many kept in
        every group (their number rounded up to a multiple of the groups; greedy under a partition matroid, the
        baselines' best of each group), every key and value head kept: finer steps, no smaller cache. Blocks
        without grouped-query attention are the same either way; a block with key/value groups that cannot lose
        query heads alone is refused with ``"query"``.
    compression : float, optional
        Instead of ``keep``: the whole model's parameter compression (parameters before / after, > 1) to reach by
        pruning the stages of ``target``: the largest fraction that, kept in every block and stage, removes enough;
        where several stages are pruned and a coarse one's last step removes more than needed, each stage then
        keeps a fraction of its own (at least that one), chosen by an exact search to keep the most parameters that
        still reach it (``report.keep``: ``{stage: fraction}``). Each block kind's parameters per unit (a neuron with
        its rows and column, a head or key/value group with its rows of the query, key and value projections and its
        output columns, a neuron in every expert, an expert) are measured by cutting one unit (one a part where heads
        are kept evenly) from a copy of the block that holds shapes only (``meta`` tensors), so the count is exact
        for the uniform allocation (``report.compression``: the ratio reached); ``allocation="error-curve"`` keeps
        the same number of units of each kind and so the same count where the blocks of a kind are alike. Refused
        if even one unit a stage would not reach it (the message gives the largest reachable); a ``UserWarning`` if
        the pruned model falls short (a cross-attention that the calibration batches never call keeps its heads).
    executor : concurrent.futures.Executor, optional
        Runs the stages' selection and refit in parallel in layer mode (``method="layer"``, or a baseline with
        ``propagation="layer"``), where every block's statistics come from the original network: a
        ``ThreadPoolExecutor``, a ``ProcessPoolExecutor`` or Dask's ``distributed.Client(...).get_executor()``.
        A block's jobs (greedy path, cross-validated refit ridge, refit) are submitted as soon as its statistics
        are complete, so they run while the forward passes of the next blocks gather theirs; a baseline's units
        are chosen here, in block order, and the blocks are shrunk here, in block order, once every block has been
        seen. The result is the same as without an executor (as for :func:`nn_adapters.prune`'s ``executor``;
        ``allocation="error-curve"``'s first pass runs here as without one). Refused (``ValueError``) in the
        ``asym`` and ``seq`` modes, whose statistics come from the blocks pruned before. See
        :ref:`parallel-layers`.

    Returns
    -------
    pruned : torch.nn.Module
        A physically smaller copy (sharing no tensor with ``model``), in the input model's training mode.
    report : TransformerPruneReport
        Kept units per block, relative reconstruction errors, parameter counts, timings and the pruning spec
        used by :func:`save_pruned`/:func:`load_pruned`.

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    >>> model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    >>> x = torch.randn(8, 10, 16)
    >>> pruned, report = prune_transformer(model, [x], keep=0.5, target="all")
    >>> [b["intermediate_size"] for b in report.spec["blocks"]], [b["num_heads"] for b in report.spec["blocks"]]
    ([16, 16], [2, 2])
    >>> pruned(x).shape
    torch.Size([8, 10, 16])

    Per block (by index or name; blocks not named keep every unit):

    >>> _, report = prune_transformer(model, [x], keep={1: 0.25})
    >>> [b["intermediate_size"] for b in report.spec["blocks"]]
    [32, 8]

    Per stage (here: a quarter of the heads and three quarters of the neurons go, in every block):

    >>> _, report = prune_transformer(model, [x], keep={"heads": 0.75, "ffn": 0.25}, target="all")
    >>> [(b["num_heads"], b["intermediate_size"]) for b in report.spec["blocks"]]
    [(3, 8), (3, 8)]

    A whole-model parameter ratio instead (the largest fraction kept in every block that reaches it; the
    parameters a unit holds are counted, so the ratio reached is exact). Here 4448 parameters, 33 a neuron (its
    row of linear1 with its bias, its column of linear2): at most 3558 left needs 27 neurons gone, 14 a block:

    >>> _, report = prune_transformer(model, [x], compression=1.25)
    >>> report.compression >= 1.25, [b["intermediate_size"] for b in report.spec["blocks"]]
    (True, [18, 18])

    In layer mode the blocks' selection and refit can run on an executor, with the same result:

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> _, serial = prune_transformer(model, [x], keep=0.5, method="layer")
    >>> with ThreadPoolExecutor(2) as pool:
    ...     _, parallel = prune_transformer(model, [x], keep=0.5, method="layer", executor=pool)
    >>> [u.kept for u in parallel.units] == [u.kept for u in serial.units]
    True
    """
    t_start = time.perf_counter()
    if compression is not None:
        if keep is not None:
            raise ValueError("pass keep= (the fraction of units kept in every block) or compression= (the whole "
                             "model's parameters before / after), not both")
        if (isinstance(compression, bool) or not isinstance(compression, numbers.Real)
                or not math.isfinite(compression) or not compression > 1.0):
            raise ValueError(f"compression must be a finite number > 1 (the model's parameters before / after "
                             f"pruning), got {compression!r}; e.g. compression=1.5")
    keep = 0.5 if keep is None else keep
    method, propagation = _check_args(model, keep, target, method, propagation, ridge)
    if refit_prior not in ("original", "zero"):
        raise ValueError(f"refit_prior must be 'original' (shrink the refit toward the trained weights) or 'zero' "
                         f"(ordinary ridge), got {refit_prior!r}")
    if weighting not in ("layernorm", "none"):
        raise ValueError(f"weighting must be 'layernorm' or 'none', got {weighting!r}")
    if rule not in ("greedy", "omp"):
        raise ValueError(f"rule must be 'greedy' or 'omp', got {rule!r}")
    rng_from_seed(seed)  # refused now, not by numpy after the statistics, in a message that names no argument
    allocation = canonical_allocation(allocation)
    if (isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Real)
            or not (0.0 < float(min_keep) <= 1.0)):
        raise ValueError(f"min_keep must be a fraction in (0, 1] (the per-block floor of allocation='error-curve'), "
                         f"got {min_keep!r}; e.g. min_keep=0.1")
    if isinstance(keep, Mapping) and _stage_keep(keep, target) is None and allocation != "uniform":
        raise ValueError("keep given per block (a dict) fixes the allocation: use allocation='uniform', or a single "
                         "keep fraction (or one per stage) with allocation='error-curve'")
    mode = method if method in GREEDY_METHODS else propagation
    check_executor(executor)
    if executor is not None and mode != "layer":
        raise ValueError(f"with {mode!r} statistics {LAYER_ONLY}: pass method='layer' (propagation='layer' for a "
                         "baseline), or no executor.")
    if head_unit not in ("group", "query"):
        raise ValueError(f"head_unit must be 'group' (a key/value head and its query heads) or 'query' (query "
                         f"heads, as many in every group), got {head_unit!r}")
    token = QUERY_HEADS.set(head_unit == "query")  # read where the blocks' attentions are prepared
    guard = TensorGuard(model)  # the original network is run on the caller's own tensors: never written
    try:
        pruned, report = _prune_model(model, calibration_data, keep, t_start, target=target, method=method,
                                      reweight=reweight, seed=seed, propagation=propagation, ridge=ridge,
                                      refit_prior=refit_prior, rule=rule, residual=residual, weighting=weighting,
                                      allocation=allocation, min_keep=min_keep, executor=executor,
                                      compression=compression)
    finally:
        QUERY_HEADS.reset(token)
    own_tensors(pruned, model)  # what was not pruned (embeddings, norms, the stages not pruned): copied now
    guard.check()
    if compression is not None and report.compression < compression * (1.0 - 1e-12):
        warnings.warn(f"compression={compression:g} was asked for, the pruned model reaches {report.compression:.4g} "
                      "(a cross-attention not called on the calibration batches keeps its heads, or blocks of one "
                      "kind of different sizes under allocation='error-curve'); pass a larger compression.",
                      UserWarning, stacklevel=2)
    return pruned, report


def _keep_for_compression(model: nn.Module, blocks: list[_Block], stages: list[str],
                          compression: float) -> float | dict[str, float]:
    """The ``keep`` of :func:`prune_transformer` that leaves at most ``params / compression`` parameters of
    ``model`` (``_n_keep`` rounding, as the budgets are), from each stage's parameters per unit (:func:`_unit_cost`,
    measured once per block kind and shape).

    First the largest fraction ``f`` that, kept in every block and stage, gets there. Where several stages are pruned
    (heads and FFN, a decoder's cross-attention, a mixture's shared expert), a coarse stage's last step can remove
    more than needed (one key/value group of two); the slack is then filled: each stage keeps a fraction of its own
    (at least ``f``), the fractions that keep the most parameters and still reach the compression
    (:func:`_fewest_removed`, seeded by raising the stages one at a time, each to its largest fraction that still
    reaches it, in every order). The result is ``{stage: fraction}`` where that changes a count, else ``f``."""
    costs, memo = [], {}
    for blk in blocks:
        for stage in _cost_stages(blk, stages):
            key = (type(blk), stage, tuple((n, tuple(p.shape)) for n, p in blk.module.named_parameters()))
            if key not in memo:
                memo[key] = _unit_cost(blk, stage)
            costs.append((stage, *memo[key]))
    return _compression_fractions(costs, _n_params(model), compression, stages)


#: Most settings (one kept count per stage) that the exact search of :func:`_fewest_removed` visits for
#: ``compression=``: far more than a model's stages give (a setting per jump of each stage's counts above the common
#: fraction); beyond it the best found so far stands.
FILL_NODES = 200_000


def _compression_fractions(costs: list[tuple[str, int, int, float]], before: int, compression: float,
                           stages: list[str]) -> float | dict[str, float]:
    """:func:`_keep_for_compression` from ``costs``, ``(stage, units, multiple, parameters per unit)`` of every
    block's stages, and ``before``, the model's parameters: arithmetic only."""
    budget = before / compression
    alike = Counter(costs)  # blocks of one kind and shape: one term

    def removed(fractions: Mapping[str, float]) -> float:
        return sum(times * c * (n - _n_keep(fractions[s], n, m)) for (s, n, m, c), times in alike.items())

    def reaches(fractions: Mapping[str, float]) -> bool:
        return before - removed(fractions) <= budget * (1.0 + 1e-12)

    def largest(fractions: dict[str, float], names: Iterable[str], lo: float) -> float:
        """The largest fraction >= ``lo`` of the stages ``names`` (all at once), the others as in ``fractions``, that
        reaches the compression (``lo`` itself is known to)."""
        def at(f: float) -> dict[str, float]:
            return {**fractions, **dict.fromkeys(names, f)}
        if reaches(at(1.0)):
            return 1.0
        hi = 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if reaches(at(mid)) else (lo, mid)
        return lo

    keys = list(dict.fromkeys(s for s, *_ in costs))
    if not reaches(dict.fromkeys(keys, 0.0)):
        after = before - removed(dict.fromkeys(keys, 0.0))
        ratio = before / after if after > 0 else math.inf
        most = math.floor(ratio * 1000) / 1000  # rounded down: the value printed is reachable
        raise UnreachableCompressionError(
            f"compression={compression:g} is out of reach by pruning target's stages ({', '.join(stages)}): keeping "
            f"one unit of each stage in every block gives {ratio:.6g}x; pass compression <= {most:g}"
            f"{'' if stages == ['heads', 'ffn'] else ', or a target that prunes more (target=all)'}.", most)
    uniform = largest({}, keys, 0.0)
    best, best_removed = None, removed(dict.fromkeys(keys, uniform))
    for order in itertools.permutations(keys):  # at most 4 stages: 24 orders of arithmetic
        fractions = dict.fromkeys(keys, uniform)
        for s in order:
            fractions[s] = largest(fractions, [s], uniform)
        if removed(fractions) < best_removed:
            best, best_removed = fractions, removed(fractions)
    exact = _fewest_removed(alike, keys, uniform, before - budget * (1.0 + 1e-12), best_removed)
    if exact is not None and reaches(exact) and removed(exact) < best_removed:
        best = dict(exact)
        for s in keys:  # each stage's largest fraction of its count (no larger count can reach: not optimal else)
            best[s] = largest(best, [s], best[s])
    return uniform if best is None else best


def _fewest_removed(alike: Mapping[tuple[str, int, int, float], int], keys: list[str], lo: float, need: float,
                    bound: float) -> dict[str, float] | None:
    """The fractions, one per stage of ``keys`` and none below ``lo``, that remove the fewest parameters while
    removing at least ``need``, if fewer than ``bound``; else ``None``.

    Each stage's settings are the distinct removals that its fractions in ``[lo, 1]`` give (fractions at the jumps of
    ``round(f n)`` and between them, the largest kept for each removal); the search is branch and bound over one
    setting per stage (the stage with most settings last, found by bisection), the lightest settings first: a
    setting is skipped when the later stages cannot make up the rest even at their heaviest, and the loop stops
    where the sum reaches the best found. Exact unless it visits :data:`FILL_NODES` settings, where the best found
    so far is returned (the caller keeps the stage-by-stage fill's when that is better)."""
    levels: dict[str, tuple[list[float], list[float]]] = {}
    for s in keys:
        terms = [(n, m, times * c) for (stage, n, m, c), times in alike.items() if stage == s]
        points = sorted({lo, 1.0} | {(k + 0.5) / n for n, _, _ in terms for k in range(n) if lo < (k + 0.5) / n < 1})
        middles = {0.5 * (a + b) for a, b in zip(points[:-1], points[1:], strict=False)}
        first: dict[float, float] = {}
        for f in sorted({*points, *middles}, reverse=True):  # the largest fraction of each removal comes first
            first.setdefault(sum(w * (n - _n_keep(f, n, m)) for n, m, w in terms), f)
        by_removal = sorted(first.items())
        levels[s] = ([r for r, _ in by_removal], [f for _, f in by_removal])
    order = sorted(keys, key=lambda s: len(levels[s][0]))
    heaviest = [0.0] * (len(order) + 1)  # what the stages from i on remove at the most (all at ``lo``)
    for i in range(len(order) - 1, -1, -1):
        heaviest[i] = heaviest[i + 1] + levels[order[i]][0][-1]
    best: dict[str, float] | None = None
    best_removed, visited = bound, 0

    def visit(i: int, total: float, chosen: dict[str, float]) -> None:
        nonlocal best, best_removed, visited
        removals, fractions = levels[order[i]]
        start = bisect.bisect_left(removals, need - total - heaviest[i + 1])
        if i == len(order) - 1:
            if start < len(removals) and total + removals[start] < best_removed:
                best, best_removed = {**chosen, order[i]: fractions[start]}, total + removals[start]
            return
        for j in range(start, len(removals)):
            if total + removals[j] >= best_removed or visited >= FILL_NODES:
                break
            visited += 1
            visit(i + 1, total + removals[j], {**chosen, order[i]: fractions[j]})

    visit(0, 0.0, {})
    return best


def _cost_stages(blk: _Block, stages: list[str]) -> list[str]:
    """The stages of ``blk`` that pruning ``stages`` cuts: its heads and a decoder layer's cross-attention heads,
    its FFN (a mixture's experts' neurons) and a mixture's shared expert, or its whole experts."""
    out = []
    if "heads" in stages and blk.has_heads:
        out += ["heads"] + (["cross"] if blk.cross is not None else [])
    if "ffn" in stages and blk.has_ffn:
        out += ["ffn"] + (["shared"] if blk.moe and blk.shared is not None else [])
    if "experts" in stages and blk.moe:
        out.append("experts")
    return out


def _unit_cost(blk: _Block, stage: str) -> tuple[int, int, float]:
    """``(units, multiple, parameters per unit)`` of ``stage`` of ``blk``: a copy of the block, prepared as the
    pruning prepares it, loses one unit (one of each part where heads are kept evenly over parts), and the
    parameters it loses are counted (rows, columns, per-head norms and biases alike). The copy holds its tensors on
    the ``meta`` device (shapes only, no memory); a block whose cut reads values is copied whole."""
    try:
        return _cut_one_unit(blk, stage, weightless_copy(blk.module, buffers=True))
    except Exception:  # noqa: BLE001 - a cut that reads the weights' values: the same on a real copy
        return _cut_one_unit(blk, stage, copy.deepcopy(blk.module))


def _cut_one_unit(blk: _Block, stage: str, module: nn.Module) -> tuple[int, int, float]:
    """:func:`_unit_cost` on ``module``, a copy of ``blk``'s module."""
    probe = type(blk)(blk.name, module)
    multiple = blk.unit_multiple  # the block's own (a probe runs its experts with the eager loop: any count)
    probe.for_probe()
    before = _n_params(probe.module)
    try:
        with torch.no_grad():
            if stage in ("heads", "cross"):
                view = probe if stage == "heads" else probe.cross
                view.prepare_heads()
                n, m = view.head_units, view.head_parts
                first = _part_firsts(view)
                if n > m:
                    view.shrink_heads(_without(first, n))
                removed = len(first)
            elif stage == "shared":
                view = probe.shared
                n, m, removed = view.ffn_units, 1, 1
                if n > 1:
                    view.shrink_ffn(torch.arange(1, n))
            elif stage == "experts":
                probe.prepare_ffn()
                n, m, removed = probe.n_experts, 1, 1
                if n > 1:
                    probe.drop_experts(torch.arange(1, n))
            else:  # a dense FFN, or one neuron of every expert of a mixture
                probe.prepare_ffn()
                n, m, removed = probe.ffn_units, multiple, 1
                if n > m:
                    probe.shrink_ffn(torch.arange(1, n))
    except ValueError as exc:
        raise ValueError(f"compression= cannot count what a unit of block {blk.name!r} ({stage}) holds: {exc}; "
                         "pass keep= instead") from exc
    return n, m, (before - _n_params(probe.module)) / removed


def _part_firsts(blk: _Block) -> np.ndarray:
    """The first head unit of each part of ``blk``'s heads (of the only part, for most blocks): what a check removes
    to take one unit of every part."""
    return np.flatnonzero(np.diff(blk.head_part_labels(), prepend=-1))


def _without(units: np.ndarray, n: int) -> torch.Tensor:
    """The units ``0..n-1`` but ``units``, sorted: the kept set once they go."""
    return torch.as_tensor(np.setdiff1d(np.arange(n), units))


def _needs_data(method: str, reweight: bool, allocation: str) -> bool:
    """Whether pruning with these options reads calibration statistics (else only the layouts are checked)."""
    return method in GREEDY_METHODS or bool(reweight) or method == "wanda" or allocation != "uniform"


def _prune_model(model: nn.Module, calibration_data: Any, keep: float | Mapping[str | int, float], t_start: float, *,
                 target: str, method: str, reweight: bool, seed: int | None, propagation: str, ridge: float | str,
                 refit_prior: str, rule: str, residual: bool, weighting: str, allocation: str, min_keep: float,
                 executor: Executor | None, original_data: list[Any] | None = None, stack: bool = False,
                 compression: float | None = None) -> tuple[nn.Module, TransformerPruneReport]:
    """:func:`prune_transformer` after its arguments are checked. ``original_data``: the original network's own
    calibration batches where they differ from ``calibration_data`` (a decoder's, whose encoder states come from
    the unpruned encoder there and from the pruned one in ``calibration_data``): the original blocks' forwards
    (the targets of asym mode, the statistics of layer mode) read their context from those. ``stack``: ``model``
    is one stack of an encoder-decoder, whose unrecognised layers the whole model's call has reported."""
    mode = method if method in GREEDY_METHODS else propagation
    needs_data = _needs_data(method, reweight, allocation) or target == "experts"  # the routing is checked
    stages = ["heads", "ffn"] if target == "all" else [target]

    # the pruned model reads the caller's tensors until its blocks get their own as they shrink (prune_transformer
    # copies what is still shared at the end): the peak holds the caller's weights and the pruned ones, not a copy
    work = shared_copy(model)
    blocks = find_blocks(work)
    experts_before = {b.n_experts for b in blocks if b.moe}
    if not blocks:
        raise ValueError("no transformer block found: supported are Hugging Face encoder layers (BERT-style BertLayer "
                         "and look-alikes such as RoBERTa, ELECTRA, MiniLM; ALBERT; DeBERTa v1-v3, Longformer, FNet, "
                         "MPNet, DistilBERT, GTE, Nomic Embed, Jina Embeddings v3, EmbeddingGemma 2, ESM C, wav2vec "
                         "2.0, HuBERT, WavLM, ViT, BEiT, DINOv2, DINOv3, AIMv2, Pixtral, CLIP, SAM, ViTDet, Swin, "
                         "SegFormer, PVT, ModernBERT and its decoder), BART-family layers (BART, mBART, Marian, "
                         "Pegasus, Whisper, XGLM...), T5 blocks, decoder layers (Llama-style: Llama, Mistral, Qwen2, "
                         "Qwen3, Phi-3, GLM, Granite, Nemotron, Cohere, StarCoder2, StableLM; mixtures of experts in "
                         "transformers 5: Mixtral, Qwen2/3-MoE, PhiMoE, OLMoE, GLM-4-MoE, ERNIE 4.5 MoE, EXAONE-MoE, "
                         "GraniteMoE, GPT-OSS, Llama 4, Aria, Cohere2-MoE, DBRX; latent attention: DeepSeek-V2/V3, "
                         "Mistral 4, MiniCPM3; LFM2, LFM3, Granite 4.0 hybrid, Qwen3.5, Qwen3-Next, Jamba, Falcon-H1, "
                         "NemotronH, Kimi Linear, RecurrentGemma; Gemma 2/3/4, AFMoE, Kolibri1, OLMo 2, GLM-4; OPT, "
                         "GPT-2, GPT-J, CodeGen, GPT-Neo, GPT-NeoX (Pythia), GPT-NeoX-Japanese, Persimmon, Phi, BLOOM, "
                         "Falcon, GPTBigCode (StarCoder), MPT) and torch.nn.TransformerEncoderLayer; see the table of "
                         "docs/transformer.rst. nn_adapters.prune(model, data, target='layers') prunes the Linear and "
                         "convolution pairs of other models.")
    others = link_opaque_layers(work, blocks)  # the layers between blocks that are run as they are
    if compression is not None:  # the fractions of every block (one for all stages, or one a stage) that reach it
        keep = _keep_for_compression(model, blocks, stages, float(compression))
    skipped = [] if stack else _unrecognised_layers(others, len(blocks))
    pair = _encoder_decoder_stacks(work, blocks)
    if pair is not None:  # T5, BART, Whisper...: the encoder, then the decoder on the pruned encoder's states
        options = dict(target=target, method=method, reweight=reweight, seed=seed, propagation=propagation,
                       ridge=ridge, refit_prior=refit_prior, rule=rule, residual=residual, weighting=weighting,
                       allocation=allocation, min_keep=min_keep, executor=executor)
        return _prune_encoder_decoder(model, work, blocks, pair, calibration_data, keep, options, t_start, skipped)
    for stage, has, what, other in (("heads", "has_heads", "attention heads", "ffn"),
                                    ("ffn", "has_ffn", "FFN", "heads")):
        if stages == [stage] and not any(getattr(b, has) for b in blocks):
            raise ValueError(f"target={stage!r}, but no block of this model has {what} (its blocks are "
                             f"{', '.join(sorted({b.kind for b in blocks}))}): prune target={other!r}.")
    if stages == ["experts"]:
        if not any(b.moe for b in blocks):
            raise ValueError(f"target='experts', but no block of this model is a mixture of experts (its blocks "
                             f"are {', '.join(sorted({b.kind for b in blocks}))}): prune target='ffn'.")
        for blk in blocks:
            if blk.moe:
                blk.prepare_ffn()  # the experts' layout, which their outputs are computed from
    # an FFN with several producers (gate and up) has its unit layout checked like the heads
    check_units = "ffn" in stages and any(b.ffn_units_checked for b in blocks)
    if "ffn" in stages:
        for blk in blocks:
            blk.prepare_ffn()
    # decoder layers whose cross-attention may lose heads too (if it is called: see _original_blocks)
    crossable = [b for b in blocks if b.cross is not None] if "heads" in stages else []
    if "heads" in stages:
        for blk in blocks:
            blk.prepare_heads()
            if QUERY_HEADS.get() and blk.has_heads and blk.head_unit_width > blk.value_dim and not blk.query_heads:
                raise ValueError(f"block {blk.name!r} ({blk.kind}): its attention units are key/value groups of "
                                 f"{blk.head_unit_width // blk.value_dim} query heads, which cannot be removed "
                                 "alone; pass head_unit='group'.")
        for blk in crossable:
            blk.cross.prepare_heads()
        disable_nested_fast_path(work)
    fractions = _block_fractions(keep, blocks, tuple(n for n, _ in others))
    stage_keep = _stage_keep(keep, target)
    keep = (stage_keep if stage_keep is not None else {b.name: f for b, f in zip(blocks, fractions, strict=True)}
            if isinstance(keep, Mapping) else float(keep))
    report = TransformerPruneReport(method=method, target=target, keep=keep, reweight=bool(reweight),
                                    seed=None if seed is None else int(seed),
                                    propagation=None if method in GREEDY_METHODS else propagation,
                                    params_before=_n_params(model), n_blocks=len(blocks), allocation=allocation,
                                    skipped=skipped)
    budgets = [{s: _n_keep(_stage_fraction(stage_keep, f, s), _unit_columns(s, blk)[0],
                           {"ffn": blk.unit_multiple, "heads": blk.head_parts}.get(s, 1)) for s in stages
                if s != "experts" or blk.moe} for f, blk in zip(fractions, blocks, strict=True)]
    for f, blk, budget in zip(fractions, blocks, budgets, strict=True):
        if "ffn" in stages and blk.moe and blk.shared is not None:  # a shared expert: the FFN's fraction
            budget["shared"] = _n_keep(_stage_fraction(stage_keep, f, "shared"), blk.shared.ffn_units)
        if blk in crossable:  # the cross-attention's heads: the self-attention's fraction
            budget["cross"] = _n_keep(_stage_fraction(stage_keep, f, "cross"), _unit_columns("cross", blk)[0])
    rng = np.random.default_rng(seed)
    counter = [0]

    stacks = sorted({b.name.rpartition(".")[0] for b in blocks})
    # said when the blocks do not chain, the usual reason then (CLIPModel's text and vision towers)
    stacks_note = "" if len(stacks) < 2 else (
        f" The model holds {len(stacks)} stacks of blocks ({', '.join(map(repr, stacks))}), e.g. the text and "
        "vision towers of CLIPModel: prune each stack's model on its own (prune_transformer(model.text_model, "
        "text_batches, ...), prune_transformer(model.vision_model, image_batches, ...)) and put them back. An "
        "encoder-decoder model is pruned stack by stack in one call when its get_encoder() and get_decoder() "
        "hold every block between them.")
    with torch.no_grad(), OrderedJobs(executor) as jobs:
        if needs_data:
            batches = _batches(calibration_data, float_dtype(model))
            originals = None if original_data is None else _batches(original_data, float_dtype(model))
            orig_blocks, cache, chain_calls, called = _original_blocks(
                model, batches if originals is None else originals, "heads" in stages, stacks_note, counter,
                check_units, bool(crossable), None if originals is None else batches)
            for blk, oblk in zip(blocks, orig_blocks, strict=True):  # the layers between stages, in this copy
                blk.before = tuple(OpaqueLayer(o.name, work.get_submodule(o.name), o.grid) for o in oblk.before)
            per_block = [[s for s in _with_cross(stages, b, called) if s != "experts" or b.moe] for b in blocks]
            uses = Counter(i for i, _ in chain_calls)  # a block called several times: one pruning for all calls
            if len(uses) < len(chain_calls):
                _check_shared_options(blocks[next(i for i, n in uses.items() if n > 1)], mode, allocation)
            shared: dict[int, dict[str, _Stats]] = {}  # their statistics, gathered over the calls so far
            _assign_folds(cache, blocks[0])
            report.n_tokens = int(sum(int(c["valid"].sum()) for c in cache))
            report.n_padding_excluded = int(sum(c["valid"].numel() for c in cache)) - report.n_tokens
            if report.n_tokens == 0:
                raise ValueError("the calibration batches contain no real token (attention mask all zero)")
            if allocation == "error-curve":
                budgets = _error_curve_budgets(orig_blocks, per_block, budgets, cache, counter, ridge, rule,
                                               weighting == "layernorm", float(min_keep))
            # the first block's inputs, held from now on by these lists only (each list drops a batch's states as
            # it moves on to the next block's)
            xo = [c.pop("x") for c in cache]
            xp = list(xo)
            # has an earlier block (or the encoder whose states it reads) been changed? then asym-mode inputs differ
            # from the original's
            changed = original_data is not None
            for j, (i, x_call) in enumerate(chain_calls):
                blk, oblk = blocks[i], orig_blocks[i]
                uses[i] -= 1  # the calls of this block still to come after this one
                if oblk.before:  # unrecognised layers between the previous block and this one: run as they are
                    same = xp is xo  # no change yet: the pruned network's inputs are the original's
                    xo = _step_over(oblk, xo, cache, counter, original=True)
                    if mode != "layer":
                        xp = xo if same else _step_over(blk, xp, cache, counter, original=False)
                _match_tokens(cache, xo, oblk)  # the masks of this stage (the first's after an error-curve pass)
                scale = float(x_call.nan_to_num().abs().max()) + 1.0
                if xo[0].shape != x_call.shape or not torch.allclose(xo[0], x_call, rtol=1e-4, atol=1e-5 * scale,
                                                                     equal_nan=True):
                    steps = [s.name for s in oblk.before]
                    between = (f" The layers between it and the previous block ({', '.join(steps[:4])}"
                               f"{', ...' if len(steps) > 4 else ''}) are not recognised and were run as they are, "
                               "with the arguments the model called them with." if steps else "")
                    raise ValueError(f"block {oblk.name!r} does not receive the previous block's output: only "
                                     "blocks applied one after another (an encoder stack) are supported; the "
                                     "model's forward must also be deterministic (ViTMAE's random masking: pass a "
                                     f"fixed noise= in the batches).{between}{stacks_note}")
                full = all(budgets[i][s] >= _unit_columns(s, blk)[0] for s in per_block[i]) and (
                    "shared" not in budgets[i] or budgets[i]["shared"] >= blk.shared.ffn_units)
                if full and (not reweight or (refit_prior == "original" and (mode != "asym" or not changed))):
                    # keeps every unit and its refit would return the trained weights exactly: leave it as it is
                    t0 = time.perf_counter()
                    xo_next = [_fwd(oblk, xo[b], _original_context(cache[b]), counter) for b in range(len(cache))]
                    if uses[i] == 0:
                        jobs.then(partial(_report_unchanged, report, blk, per_block[i], bool(reweight),
                                          time.perf_counter() - t0))
                elif i in shared or uses[i] > 0:  # layer mode: this call's statistics join the block's others
                    t0 = time.perf_counter()
                    xo_next, side = _original_pass(oblk, per_block[i], "layer", xo, cache, counter, False,
                                                   weighting == "layernorm", stats=shared.setdefault(i, {}))
                    if uses[i] == 0:  # its last call: one selection and refit for all of them
                        for s in per_block[i]:
                            _apply_selection(blk, s, method, bool(reweight), budgets[i][s], side["stats"][s],
                                             _Ridge(ridge, refit_prior == "original"), rule, rng, report, t0, jobs)
                        del shared[i]
                else:
                    if not changed:  # the pruned network departs from the original here: its own stores
                        _own_stream_states(cache)
                    changed = True
                    xo_next = _prune_block(blk, oblk, per_block[i], mode, method, bool(reweight), budgets[i],
                                           _Ridge(ridge, refit_prior == "original"), rule, rng, xo, xp, cache,
                                           counter, report, bool(residual), weighting == "layernorm", jobs)
                if mode != "layer" and j + 1 < len(chain_calls):  # pruned-network inputs of the next block
                    if not changed:
                        xp = xo_next
                    else:  # batch by batch in place: one batch's states of the two blocks held at a time
                        if xp is xo:
                            xp = list(xp)
                        xo = xo_next  # the original network's inputs of this block go first
                        for b in range(len(cache)):
                            xp[b] = _fwd(blk, xp[b], cache[b]["ctx"], counter)
                xo = xo_next
        else:
            if "heads" in stages or check_units:  # unit layouts are checked on the first batch, whatever the method
                if calibration_data is None or (isinstance(calibration_data, (list, tuple)) and not calibration_data):
                    what = "head pruning checks each block's head layout" if "heads" in stages else (
                        "this FFN's pruning checks each block's FFN unit layout")
                    raise ValueError(f"{what} on one calibration batch, also with method={method!r} and "
                                     "reweight=False: pass at least one batch")
                called = _original_blocks(model, _batches(calibration_data, float_dtype(model))[:1],
                                          "heads" in stages, stacks_note, counter, check_units, bool(crossable))[3]
            else:
                called = set()
            for i, blk in enumerate(blocks):
                for stage in _with_cross(stages, blk, called):
                    t0 = time.perf_counter()
                    if stage == "ffn" and blk.moe:
                        _apply_expert_selection(blk, method, False, budgets[i], None, _Ridge(ridge, False), rule,
                                                rng, report, t0, jobs)
                        continue
                    _apply_selection(blk, stage, method, False, budgets[i][stage], None,
                                     _Ridge(ridge, False), rule, rng, report, t0, jobs)
        jobs.finish()

    if "heads" in stages:  # blocks that kept every head get their original attention module type back
        for blk in blocks:
            blk.unprepare_heads()
        for blk in crossable:
            blk.cross.unprepare_heads()
        disable_nested_fast_path(work, like=model)
    if "experts" in stages:
        _sync_expert_counts(work, experts_before)
    copy_modes(model, work)  # the caller's train/eval mode, module by module
    report.params_after = _n_params(work)
    report.block_forwards = counter[0]
    report.spec = make_spec(work)
    report.wall_time = time.perf_counter() - t_start
    return work, report


def _unrecognised_layers(others: list[tuple[str, nn.Module]], n_blocks: int) -> list[tuple[str, str]]:
    """The layers left whole because they are not recognised, though they sit in a stack of blocks (``others``, a
    ``ModuleList`` holding recognised blocks: :func:`link_opaque_layers`), each with why; said by a
    ``UserWarning``. A hybrid model whose other layers are of a kind the adapter does not know (a state-space or
    linear-attention layer without a recognised FFN) is pruned in its recognised layers only, the others run as
    they are between them, which the caller should know."""
    skipped = [(name, f"{type(layer).__name__} is not a transformer block the adapter recognises (left whole)")
               for name, layer in others]
    if skipped:
        warnings.warn(f"{len(skipped)} of the {len(skipped) + n_blocks} layers of the model's stacks of blocks "
                      f"are not recognised and are left whole: {', '.join(n for n, _ in skipped[:4])}"
                      f"{', ...' if len(skipped) > 4 else ''} ({skipped[0][1].partition(' is ')[0]}); the others "
                      "are pruned. See report.skipped.", UserWarning, stacklevel=5)
    return skipped


def _encoder_decoder_stacks(model: nn.Module, blocks: list[_Block]) -> tuple[str, str] | None:
    """The paths of the encoder and the decoder of an encoder-decoder model (its ``get_encoder()`` and
    ``get_decoder()``: two disjoint submodules that hold every block between them, some each), or ``None``."""
    try:
        enc, dec = model.get_encoder(), model.get_decoder()
    except Exception:  # noqa: BLE001 - no such methods, or a model that has no encoder: not an encoder-decoder
        return None
    paths = {id(m): n for n, m in model.named_modules()}
    pe, pd = paths.get(id(enc)), paths.get(id(dec))
    if not pe or not pd or pe == pd or pe.startswith(pd + ".") or pd.startswith(pe + "."):
        return None
    n_enc = sum(b.name.startswith(pe + ".") for b in blocks)
    n_dec = sum(b.name.startswith(pd + ".") for b in blocks)
    return (pe, pd) if n_enc and n_dec and n_enc + n_dec == len(blocks) else None


def _stack_batches(model: nn.Module, path: str, batches: list[Any]) -> list[dict[str, Any]]:
    """The keyword arguments ``model`` calls its stack at ``path`` with, one dict per batch (a forward each,
    abandoned there), without key/value caches: the stack's own calibration batches."""
    stack = model.get_submodule(path)
    signature = inspect.signature(stack.forward)
    calls: list[dict[str, Any]] = []
    for batch in batches:
        got: dict[str, Any] = {}

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], got: dict[str, Any] = got) -> None:
            call: dict[str, Any] = {}
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    call.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    call[name] = value
                elif value:  # unnamed extra inputs cannot be replayed from a dict batch
                    raise ValueError(f"the model calls its {path!r} stack with {len(value)} unnamed extra "
                                     "positional inputs, which the stack-by-stack pruning cannot replay: prune "
                                     "the encoder and the decoder on their own (see docs/transformer.rst)")
            got["call"] = {k: _no_cache(v, k) for k, v in call.items()}
            raise _StopForward

        _run_hooked(model, batch, [(stack, hook)])
        if "call" not in got:
            raise ValueError(f"the model's forward never called its {path!r} stack on a calibration batch: pass "
                             "batches that run the whole model (for a sequence-to-sequence model, with "
                             "decoder_input_ids or labels)")
        calls.append(got["call"])
    return calls


def _prune_encoder_decoder(model: nn.Module, work: nn.Module, blocks: list[_Block], stacks: tuple[str, str],
                           calibration_data: Any, keep: float | Mapping[str | int, float], options: dict[str, Any],
                           t_start: float, skipped: list[tuple[str, str]]
                           ) -> tuple[nn.Module, TransformerPruneReport]:
    """Prune an encoder-decoder model stack by stack: the encoder on the inputs the model hands it, then the
    decoder on the inputs it hands the decoder with the pruned encoder in place (its pruned blocks' cross-attention
    reads the pruned encoder's states, which their refit then adapts to), while the decoder's original blocks read
    the unpruned encoder's states: asym mode's targets (and layer mode's statistics) are the original network's.
    The pruned blocks are put into ``work`` (a copy of ``model``), so weights shared outside the blocks (the
    embeddings) stay shared."""
    fractions = _block_fractions(keep, blocks)  # names and indices refer to the whole model's blocks
    batches = None if calibration_data is None else _batches(calibration_data, float_dtype(model))
    # the decoder's calls in the unpruned model (work is still unpruned): its original blocks read those encoder
    # states (asym targets, layer-mode statistics), its pruned blocks the pruned encoder's
    needs = _needs_data(options["method"], options["reweight"], options["allocation"])
    original = None if batches is None or not needs else _stack_batches(work, stacks[1], batches)
    reports = []
    for path in stacks:
        inside = [(b, f) for b, f in zip(blocks, fractions, strict=True) if b.name.startswith(path + ".")]
        part: float | dict[str, float] = (dict(keep) if _stage_keep(keep, options["target"]) is not None
                                          else {b.name[len(path) + 1:]: f for b, f in inside}
                                          if isinstance(keep, Mapping) else float(keep))
        stack_batches = None if batches is None else _stack_batches(work, path, batches)
        differ = path == stacks[1] and original is not None and stack_batches is not None and not all(
            o.keys() == c.keys() and all(_same_argument(o[k], c[k]) for k in o)
            for o, c in zip(original, stack_batches, strict=True))
        pruned, rep = _prune_model(model.get_submodule(path), stack_batches, part, time.perf_counter(),
                                   original_data=original if differ else None, stack=True, **options)
        for b, _ in inside:
            _set(work, b.name, pruned.get_submodule(b.name[len(path) + 1:]))
        reports.append((path, rep))
    copy_modes(model, work)  # the caller's train/eval mode, module by module
    first = reports[0][1]
    report = TransformerPruneReport(
        method=first.method, target=first.target,
        keep=(_stage_keep(keep, first.target) or {b.name: f for b, f in zip(blocks, fractions, strict=True)})
        if isinstance(keep, Mapping) else float(keep),
        reweight=first.reweight, seed=first.seed, propagation=first.propagation,
        units=[dataclasses.replace(u, block=f"{path}.{u.block}") for path, rep in reports for u in rep.units],
        params_before=_n_params(model), params_after=_n_params(work),
        n_tokens=sum(rep.n_tokens for _, rep in reports),
        n_padding_excluded=sum(rep.n_padding_excluded for _, rep in reports),
        block_forwards=sum(rep.block_forwards for _, rep in reports), n_blocks=len(blocks),
        spec=make_spec(work), allocation=first.allocation, skipped=skipped)
    report.wall_time = time.perf_counter() - t_start
    return work, report


def _report_unchanged(report: TransformerPruneReport, blk: _Block, stages: list[str], reweight: bool,
                      seconds: float) -> None:
    """Report the stages of a block left as it is (every unit kept, trained weights)."""
    for s in stages:
        n_units = _unit_columns(s, blk)[0]
        report.units.append(UnitRecord(block=blk.name, stage=s, n_units=n_units, n_kept=n_units,
                                       kept=list(range(n_units)), relative_error=0.0 if reweight else None,
                                       time_s=seconds))
        if s == "ffn" and blk.moe and blk.shared is not None:
            n_units = blk.shared.ffn_units
            report.units.append(UnitRecord(block=blk.name, stage=s, n_units=n_units, n_kept=n_units,
                                           kept=list(range(n_units)), relative_error=0.0 if reweight else None,
                                           time_s=0.0, expert="shared"))


def _error_curve_budgets(orig_blocks: list[_Block], per_block: list[list[str]], uniform: list[dict[str, int]],
                         cache: list[dict[str, Any]], counter: list[int], ridge: float | str, rule: str,
                         weighting: bool, min_keep: float) -> list[dict[str, int]]:
    """Per-block kept counts from the error curves of the original network (``allocation="error-curve"``), stage
    by stage over the blocks that have it (``per_block``: each block's stages), among the blocks whose units are of
    the same kind (:class:`_Curve`), each kind keeping its uniform total."""
    xo = [c["x"] for c in cache]
    sel = _Ridge(ridge, False).selection
    curves: dict[str, list[_Curve]] = {}
    for i, (oblk, stages) in enumerate(zip(orig_blocks, per_block, strict=True)):
        xo = _step_over(oblk, xo, cache, counter, original=True)
        _match_tokens(cache, xo, oblk)
        moe_ffn = oblk.moe and "ffn" in stages
        dense = [s for s in stages if s != "experts" and not (s == "ffn" and oblk.moe)]
        captured = moe_ffn or "experts" in stages
        xo_next, side = _original_pass(oblk, dense, "layer", xo, cache, counter, False, weighting,
                                       experts=captured, router="experts" in stages)
        for s in dense:
            n_units, groups = _unit_columns(s, oblk)
            f = side["stats"][s].objective(sel, groups, _consumer(oblk, s).bias is not None)
            if s == "heads" and oblk.head_parts > 1:  # heads kept evenly over parts: a curve per kept count a part
                curves.setdefault(s, []).append(_Curve(i, _balanced_curve(f, oblk.head_part_labels(), rule), 1,
                                                       oblk.head_parts, f"heads over {oblk.head_parts} parts"))
            else:
                curves.setdefault(s, []).append(_Curve(i, f.greedy_path(n_units, rule=rule).errors))
        if moe_ffn:  # every expert keeps as many neurons: the experts' curves summed, in steps of the unit multiple
            per_expert, shared_stats = _expert_stats(oblk, oblk, "layer", side["experts"], xo, cache, counter)
            total = np.zeros(oblk.ffn_units + 1)
            for e in range(oblk.n_experts):
                st = per_expert(e)  # one expert's statistics at a time; None: no token reaches it, no error
                if st is not None:
                    total += st.objective(sel, None, oblk.experts_bias).greedy_path(oblk.ffn_units, rule=rule).errors
            step = oblk.unit_multiple
            curves.setdefault("ffn", []).append(_Curve(i, total[::step], 1, step,
                                                       f"neurons of {oblk.n_experts} experts"))
            if shared_stats is not None and "shared" in uniform[i]:
                f = shared_stats.objective(sel, None, _consumer(oblk.shared, "ffn").bias is not None)
                curves.setdefault("shared", []).append(_Curve(i, f.greedy_path(oblk.shared.ffn_units,
                                                                               rule=rule).errors))
        if "experts" in stages:  # whole experts: the least routed error of each number of experts kept
            calls = side["experts"]
            _check_experts_sum(oblk, calls[0])
            top_k = int(_routing_rows(oblk, calls, cache)[1].shape[1])
            errors = _routed_error(oblk, oblk, "layer", calls, calls, cache)
            curves.setdefault("experts", []).append(_Curve(i, expert_error_curve(errors, oblk.n_experts, top_k),
                                                           top_k))
        xo = xo_next
    out: list[dict[str, int]] = [dict(u) for u in uniform]
    for s, found in curves.items():
        for kind in dict.fromkeys((c.step, c.kind) for c in found):  # marginal allocation trades like for like
            same = [c for c in found if (c.step, c.kind) == kind]
            ks = [uniform[c.block][s] // c.step for c in same]
            floors = [min(k, max(c.least, math.ceil(math.ceil(min_keep * (len(c.errors) - 1) * c.step) / c.step)))
                      for k, c in zip(ks, same, strict=True)]
            for c, k in zip(same, allocate_units([c.errors for c in same], sum(ks), floors), strict=True):
                out[c.block][s] = int(k) * c.step
    return out


@dataclass(frozen=True)
class _Curve:
    """A block's error curve for the error-curve allocation: ``errors[m]``, the error with ``m`` steps of ``step``
    units kept; ``least``, the fewest steps allowed; ``kind``, what a unit is (blocks are traded against each other
    only within a stage, step and kind: a dense FFN's neuron and a neuron of each of 8 experts, or heads kept over
    different numbers of parts, do not cost the same)."""

    block: int
    errors: np.ndarray
    least: int = 1
    step: int = 1
    kind: str = "units"


def _balanced_curve(f: submod.sparse_regression.SparseRegression, labels: np.ndarray, rule: str) -> np.ndarray:
    """``curve[q]``: the error of the greedy selection of ``q`` units from each part (``labels``: each unit's part,
    every part of the same size), ``q = 0..`` units a part: one greedy path under the partition matroid of quota
    ``q`` for each (they are not nested)."""
    n_parts = int(labels.max()) + 1
    per = labels.size // n_parts
    curve = np.empty(per + 1)
    curve[0] = f.y_norm2
    for q in range(1, per + 1):
        curve[q] = f.greedy_path(q * n_parts, rule=rule, constraint=PartitionMatroid(labels, q)).errors[-1]
    return curve


def _own_context(block: _Block, ctx: dict[str, Any]) -> dict[str, Any]:
    """The call context of ``block`` in a cached batch's context ``ctx``: its own arguments where the blocks take
    arguments of their own (see :func:`_capture_first_block`), else ``ctx``."""
    return ctx.get("per_block", {}).get(block.name, ctx)


def _fwd(block: _Block, x: torch.Tensor, ctx: dict[str, Any], counter: list[int]) -> torch.Tensor:
    counter[0] += 1
    return block.forward(x, _own_context(block, ctx))


def _step_over(block: _Block, xs: list[torch.Tensor], cache: list[dict[str, Any]], counter: list[int], *,
               original: bool) -> list[torch.Tensor]:
    """The inputs of ``block`` from the previous block's outputs ``xs`` (one per cached batch): through the
    unrecognised layers between the two (:attr:`_Block.before`), run as they are in the original network's call
    context (``original``) or the pruned network's."""
    for layer in block.before:
        xs = [_fwd(layer, x, _original_context(c) if original else c["ctx"], counter)
              for x, c in zip(xs, cache, strict=True)]
    return xs


def _original_blocks(model: nn.Module, batches: list[Any], heads: bool, stacks_note: str, counter: list[int],
                     check_units: bool = False, cross: bool = False, pruned_batches: list[Any] | None = None
                     ) -> tuple[list[_Block], list[dict[str, Any]], list[tuple[int, torch.Tensor]], set[str]]:
    """A copy of the unpruned model's blocks that reads the caller's weights (:func:`shared_copy`; attention
    prepared for head pruning when ``heads``), the first block's cached inputs for ``batches``, every block call
    on the first batch in the forward's order (the block's index and its input: a block the model calls several
    times comes back with each call; one full forward, which
    also checks that the blocks chain and, with ``heads``, their head layout; with ``check_units``, the FFN unit
    layout of the blocks that ask for it, :attr:`_Block.ffn_units_checked`), and, with ``cross``, the names of the
    decoder layers whose cross-attention that forward called (their cross-attention's head layout checked too): a
    decoder run without encoder states skips it, and its heads are then left as they are.

    With ``pruned_batches`` (the pruned network's batches, one per batch of ``batches``: a decoder's calls with
    the pruned encoder's states, its first block's inputs the same), each cached entry's ``"ctx"`` is the first
    block's context there and ``"octx"`` the original network's (see :func:`_original_context`)."""
    orig = shared_copy(model)  # the caller's weights, read only: no second copy of them
    orig_blocks = find_blocks(orig)
    link_opaque_layers(orig, orig_blocks)
    _link_stages(orig, orig_blocks, batches[0])
    # the blocks and the unrecognised layers between them, in the order they run
    members = [m for b in orig_blocks for m in (*b.before, b)]
    crossing = [b for b in orig_blocks if b.cross is not None] if heads and cross else []
    if heads:
        for blk in orig_blocks:
            blk.prepare_heads()
        for blk in crossing:
            blk.cross.prepare_heads()
        disable_nested_fast_path(orig)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    called: set[str] = set()
    handles = [_consumer(b, "cross").register_forward_pre_hook(lambda *_, name=b.name: called.add(name))
               for b in crossing]
    try:
        try:
            inputs, contexts, calls = _capture_chain(orig, members, batches[0])
        finally:
            for h in handles:
                h.remove()
        counter[0] += len(calls)  # that full forward ran every block (and layer between them)
        chain = [x for m, x in zip(members, inputs, strict=True) if not isinstance(m, OpaqueLayer)]
        index = {id(b): i for i, b in enumerate(orig_blocks)}
        # the blocks' calls in order: a block called several times (a shared layer) comes back with each input
        block_calls = [(index[id(members[m])], x) for m, x, _ in calls if not isinstance(members[m], OpaqueLayer)]
        _check_shared_calls(members, calls)
        own = _own_arguments(orig, members, batches[0], contexts, stacks_note)
        cache = _capture_first_block(orig, orig_blocks[0], batches, members if own else None)
        if heads:
            _check_head_layouts(orig_blocks, chain, cache[0]["ctx"], counter)
            _check_head_layouts([b.cross for b in crossing if b.name in called],
                                [x for b, x in zip(orig_blocks, chain, strict=True) if b.name in called],
                                cache[0]["ctx"], counter)
        if check_units:
            _check_ffn_units(orig_blocks, chain, cache[0]["ctx"], counter)
        if pruned_batches is not None:
            for entry, seen in zip(cache, _capture_first_block(orig, orig_blocks[0], pruned_batches,
                                                               members if own else None), strict=True):
                if not (torch.equal(entry["valid"], seen["valid"]) and torch.equal(entry["x"], seen["x"])):
                    raise ValueError("the decoder's first block receives other tokens or inputs with the pruned "
                                     "encoder than with the unpruned one: an encoder-decoder whose decoder inputs "
                                     "depend on its encoder is not supported; prune its stacks on their own")
                entry.update(octx=entry["ctx"], ctx=seen["ctx"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return orig_blocks, cache, block_calls, called


def _check_shared_options(blk: _Block, mode: str, allocation: str) -> None:
    """Refuse the options that have no meaning for a block the model calls several times (see
    :func:`_check_shared_calls`): in ``asym`` and ``seq`` modes its later calls would read a pruned network that
    contains the block being pruned; the error-curve allocation compares blocks called once."""
    if mode != "layer":
        raise ValueError(f"block {blk.name!r} is called several times in one forward of the model (a layer shared "
                         "by the stack, as ALBERT's): it is pruned once for all its calls, from the unpruned "
                         "network's statistics of every call, which is layer mode: pass method='layer' (or, for a "
                         "baseline, propagation='layer').")
    if allocation != "uniform":
        raise ValueError(f"block {blk.name!r} is called several times in one forward of the model: "
                         f"allocation={allocation!r} is not supported there; pass allocation='uniform'.")


def _check_shared_calls(members: list[_Block], calls: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> None:
    """A block the model calls several times in one forward (ALBERT's layer, applied ``num_hidden_layers`` times
    to its own outputs) is pruned once for all its calls, from the statistics of every call (``layer`` mode; see
    :func:`_prune_model`). Refused here where that is not what the model does: a layer between blocks called
    several times, or a block called with other arguments than at its first call."""
    seen: dict[int, dict[str, Any]] = {}
    for m, _, ctx in calls:
        if m in seen and isinstance(members[m], OpaqueLayer):
            raise ValueError(f"layer {members[m].name!r}, between transformer blocks, is called several times in "
                             "one forward of the model: this structure is not supported")
        if m in seen and not _same_value(ctx, seen[m]):
            raise ValueError(f"block {members[m].name!r} is called several times in one forward of the model, "
                             "with other arguments at each call: a block shared by several calls is pruned for "
                             "all of them only where they differ by their hidden states alone")
        seen.setdefault(m, ctx)


def _original_context(entry: dict[str, Any]) -> dict[str, Any]:
    """The call context the original blocks run in for one cached batch: its ``"octx"`` where the original
    network's differs from the pruned network's (a decoder's encoder states), else its ``"ctx"``."""
    return entry.get("octx", entry["ctx"])


def _with_cross(stages: list[str], blk: _Block, called: set[str]) -> list[str]:
    """The stages of ``blk``: ``stages`` without ``"heads"`` for a block without attention (a hybrid model's
    convolution layer), without ``"ffn"`` for a block without an FFN (NemotronH's attention layers), and with its
    cross-attention's heads (``"cross"``) after the self-attention's where heads are pruned and the layer's
    cross-attention is called (``called``, see :func:`_original_blocks`)."""
    if not blk.has_ffn:
        stages = [s for s in stages if s != "ffn"]
    if not blk.has_heads:
        return [s for s in stages if s != "heads"]
    if "heads" not in stages or blk.name not in called:
        return stages
    i = stages.index("heads") + 1
    return [*stages[:i], "cross", *stages[i:]]


def _check_head_layouts(blocks: list[_Block], inputs: list[torch.Tensor], ctx: dict[str, Any],
                        counter: list[int]) -> None:
    """Refuse blocks whose attention does not lay heads out as the adapter assumes (a per-head bias held outside
    the attention, a reshape to the model width, another token order), checked on one batch: without its first
    head, the shrunk block must compute what the block computes with that head's output-projection columns
    zeroed."""
    for blk, x in zip(blocks, inputs, strict=True):
        if blk.head_units >= 2 * blk.head_parts:  # a unit of each part can go (with one a part: never)
            _check_unit_removal(blk, x, ctx, counter, "heads")


def _check_ffn_units(blocks: list[_Block], inputs: list[torch.Tensor], ctx: dict[str, Any],
                     counter: list[int]) -> None:
    """Refuse FFNs (gated, or with other parts between their projections) whose units are not one row of every
    producer and one column of the down projection (an FFN that mixes the intermediate features before the down
    projection), checked on one batch: without its
    first unit, the shrunk block must compute what the block computes with that unit's down column zeroed."""
    for blk, x in zip(blocks, inputs, strict=True):
        if blk.ffn_units_checked and blk.ffn_units >= 2:
            _check_unit_removal(blk, x, ctx, counter, "ffn")


#: What the unit-removal check reports per stage: the layout assumed, and what fails to hold.
_REMOVAL_CHECK = {
    "heads": ("a head is removed", "its attention lays out heads differently. Prune target='ffn' on this model.",
              "removing a head does not act like zeroing its output-projection columns (a per-head bias outside the "
              "attention, or another head or token layout): its heads cannot be pruned this way. Prune "
              "target='ffn' on this model."),
    "ffn": ("an FFN unit is removed", "its FFN is laid out differently. This model's FFN cannot be pruned by the "
            "transformer adapter.",
            "removing row 0 of its gate and up projections does not act like zeroing column 0 of its down "
            "projection (an FFN that mixes its intermediate features): its FFN cannot be pruned by the "
            "transformer adapter."),
}


def _check_unit_removal(blk: _Block, x: torch.Tensor, ctx: dict[str, Any], counter: list[int], stage: str) -> None:
    """The block without its first unit of ``stage`` must compute what it computes with that unit's consumer
    columns zeroed (two forwards on a copy of the block)."""
    removed, fails, differs = _REMOVAL_CHECK[stage]
    parametrized = [f"{blk.name}.{n}" for n, m in blk.module.named_modules()
                    if parametrize.is_parametrized(m) or hasattr(m, "weight_g")]
    if parametrized:  # the check edits weights in place, which a parametrization recomputes: say that, not layout
        fails = differs = (f"its {', '.join(parametrized)} {'is' if len(parametrized) == 1 else 'are'} parametrized "
                           "(weight_norm / spectral_norm), and a parametrized weight cannot be edited in place. "
                           "Remove the parametrization before pruning (torch.nn.utils.parametrize."
                           "remove_parametrizations(module, 'weight'), or torch.nn.utils.remove_weight_norm).")
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:
        # in half precision, the rounding of the two computations alone can exceed the tolerance: compare in float32
        x, ctx = x.float(), _cast_floats(ctx, torch.float32)
    outs = []
    # the first head unit of each part (of the only part, for most blocks)
    first = _part_firsts(blk) if stage == "heads" else None
    for shrink in (False, True):
        probe = type(blk)(blk.name, copy.deepcopy(blk.module).to(x.dtype))
        probe.for_probe()
        try:  # cutting the unit's rows (projections of other widths than assumed) or the forward may fail
            with torch.no_grad():
                if stage == "heads" and shrink:
                    probe.shrink_heads(_without(first, probe.head_units))
                elif stage == "heads":
                    weight_of(probe.out_proj)[:, _head_rows(torch.as_tensor(first), probe.head_unit_width)] = 0.0
                elif shrink:
                    probe.drop_first_ffn_unit()
                else:
                    probe.zero_ffn_unit(0)
            outs.append(_fwd(probe, x, ctx, counter))
        except Exception as exc:  # noqa: BLE001 - any failure means the layout is not the one assumed
            raise ValueError(f"block {blk.name!r} ({type(blk.module).__name__}) has the parts of a {blk.kind} "
                             f"block, but it fails once {removed} ({type(exc).__name__}: {exc}): {fails}") from exc
    want, got = outs
    tol = 1e-4 * (1.0 + float(want.nan_to_num().abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=tol, equal_nan=True):
        raise ValueError(f"block {blk.name!r} ({type(blk.module).__name__}) has the parts of a {blk.kind} block, "
                         f"but {differs}")


def _check_branch_sum(blk: _Block, stage: str, x: torch.Tensor, ctx: dict[str, Any], counter: list[int]) -> None:
    """A stage whose output is taken to be summed straight into the block output (parallel attention and FFN), or
    into the input a :class:`BranchSum` names: zeroing its consumer's columns of the first unit must change that
    sum by exactly the change of the consumer output (times the layer scale, if any), checked on the first batch
    with two forwards of a copy. A look-alike that normalises, scales or feeds the branch on (a sequential block)
    is refused."""
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:  # compare in float32, as _check_unit_removal
        x, ctx = x.float(), _cast_floats(ctx, torch.float32)
    probe = type(blk)(blk.name, copy.deepcopy(blk.module).to(x.dtype))
    consumer = _consumer(probe, stage)
    entry = _residual_entry(probe, stage)
    at = {"sum": (entry.module, entry.index)} if isinstance(entry, BranchSum) else {}  # else the block output
    width = 1 if stage == "ffn" else probe.head_unit_width
    with torch.no_grad():
        before, got = capture_inputs({stage: consumer, **at}, lambda: _fwd(probe, x, ctx, counter))
        w = weight_of(consumer)
        change = -(got[stage][..., :width] @ w[:, :width].T)
        lam = _layer_scale(probe, stage, change)[0]
        if lam is not None:
            change = change * lam
        w[:, :width] = 0.0
        after, again = capture_inputs(at, lambda: _fwd(probe, x, ctx, counter))
    if at:
        before, after = got["sum"], again["sum"]
    seen = after - before
    change = change.reshape(seen.shape) if change.numel() == seen.numel() else change
    tol = 1e-4 * (1.0 + float(before.nan_to_num().abs().max()))
    if change.shape != seen.shape or not torch.allclose(seen, change, rtol=1e-4, atol=tol, equal_nan=True):
        consumer_name = "down projection" if stage == "ffn" else "attention output projection"
        where = "the input of " + type(entry.module).__name__ if at else "the block output"
        raise ValueError(f"block {blk.name!r} ({type(blk.module).__name__}) has the layout of a {blk.kind} block "
                         f"but does not compute like one: its {consumer_name}'s output is not added straight to "
                         f"{where} (a norm, scale or later sublayer after it?), so the refit would aim at the wrong "
                         "target. This model is not supported by the transformer adapter.")


def _capture_chain(model: nn.Module, blocks: list[_Block], batch: Any
                   ) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[tuple[int, torch.Tensor, dict[str, Any]]]]:
    """The input and the call context (the other arguments) of every block in one full forward of ``model`` on
    one batch, to check that the blocks chain and whether they share their arguments; and every call, in the order
    of the forward: ``(index in blocks, input, context)``. A block the model calls several times (ALBERT's shared
    layer) is represented by its first call in the first two lists."""
    calls: list[tuple[int, torch.Tensor, dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict, i: int, blk: _Block) -> None:
        args, kwargs = _block_call(blk, args, kwargs)
        calls.append((i, args[0].detach(), _context(args, kwargs)))

    handles = [b.module.register_forward_pre_hook(partial(hook, i=i, blk=b), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        _call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    first: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    for i, x, ctx in calls:
        first.setdefault(i, (x, ctx))
    missing = [b.name for i, b in enumerate(blocks) if i not in first]
    if missing:
        raise ValueError(f"the model's forward on the first calibration batch never calls {missing[0]!r}: its "
                         "structure is not supported")
    return [first[i][0] for i in range(len(blocks))], [first[i][1] for i in range(len(blocks))], calls


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a layer hands on: ``value`` itself, or the first element of a tuple or model output."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return value[0] if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor) else None


def _link_stages(model: nn.Module, blocks: list[_Block], batch: Any) -> None:
    """Link consecutive stacks of blocks through the layers that run between them, as a hierarchical vision
    encoder does (Swin: each stage's blocks, then its patch merging, which hands a quarter of the tokens, twice as
    wide, to the next stage's blocks). Those layers become the next stack's first block's :attr:`_Block.before`,
    run as they are, like the unrecognised layers inside a stack.

    Read from one forward of ``model`` on ``batch``: the modules called, whole, after the last block of a stack has
    returned and before the first block of the next is called (the outermost of them; not those that enclose the
    next stack). They are linked only where they form a chain: the first one takes the last block's output, each
    next one the previous one's output, and the next stack's first block the last one's. Otherwise (two towers of
    CLIP, run one after the other on their own inputs; a stage boundary computed outside modules) nothing is linked
    and the blocks' chaining check refuses the model as before."""
    starts = [i for i in range(1, len(blocks))
              if blocks[i].name.rpartition(".")[0] != blocks[i - 1].name.rpartition(".")[0] and not blocks[i].before]
    if not starts:
        return
    names = {id(m): n for n, m in model.named_modules()}
    inside = tuple(b.name + "." for b in blocks)
    watch = [m for n, m in model.named_modules() if n and not n.startswith(inside)
             and n not in {b.name for b in blocks}]
    ends = {id(blocks[i - 1].module): i for i in starts}
    begins = {id(blocks[i].module): i for i in starts}
    # per boundary: the last block's output, then (module, "in" / "out", first tensor) in call order, then the
    # next block's input; None once the next stack began before the last block returned
    seen: dict[int, list[Any]] = {}
    open_at: list[int | None] = [None]

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        i = begins.get(id(m))
        if i is not None:
            if open_at[0] == i:
                first = leading_input(m, args, kwargs)[0]
                seen[i].append(first[0] if first else None)
            open_at[0] = None
            return
        if open_at[0] is not None:
            first = leading_input(m, args, kwargs)[0]
            seen[open_at[0]].append((m, "in", first[0] if first else None))

    def post(m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        i = ends.get(id(m))
        if i is not None:
            seen[i] = [_first_tensor(out)]
            open_at[0] = i
        elif open_at[0] is not None:
            seen[open_at[0]].append((m, "out", _first_tensor(out)))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in {*watch, *(b.module for b in blocks)}]
    handles += [m.register_forward_hook(post) for m in {*watch, *(blocks[i - 1].module for i in starts)}]
    try:
        _call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    for i, events in seen.items():
        if len(events) < 2 or not isinstance(events[-1], torch.Tensor):
            continue  # the next stack was not called after this one
        x, steps, opened = events[0], [], []
        # modules entered here that do not return before the next stack begins enclose it (its stage): see through
        closing = {id(m) for m, what, _ in events[1:-1] if what == "out"}
        for m, what, t in events[1:-1]:
            if what == "in":
                opened.append((m, t))
            elif opened and opened[-1][0] is m:
                m_in, t_in = opened.pop()
                if not any(id(o) in closing for o, _ in opened):  # outermost: called whole between the stacks
                    steps.append((m_in, t_in, t))
        chained = x is not None and all(isinstance(t_in, torch.Tensor) and isinstance(t_out, torch.Tensor)
                                        for _, t_in, t_out in steps)
        layers = []
        for m, t_in, t_out in steps if chained else ():
            grid = _as_grid(x, t_in)
            if grid is None and (t_in.shape != x.shape or not torch.equal(t_in, x)):
                chained = False
                break
            layers.append(OpaqueLayer(names[id(m)], m, grid))
            x = t_out
        if chained and steps and x.shape == events[-1].shape and torch.equal(x, events[-1]):
            blocks[i].before = tuple(layers)


def _as_grid(x: torch.Tensor, image: torch.Tensor) -> tuple[int, int] | None:
    """``(height, width)`` where ``image`` is the tokens ``x`` laid out as an image (``(batch, height * width,
    features)`` as ``(batch, features, height, width)``), as SegFormer's stages hand them on; else ``None``."""
    if x.dim() != 3 or image.dim() != 4 or x.shape[0] != image.shape[0] or x.shape[2] != image.shape[1]:
        return None
    if x.shape[1] != image.shape[2] * image.shape[3]:
        return None
    laid = x.transpose(1, 2).reshape(image.shape)
    return (int(image.shape[2]), int(image.shape[3])) if torch.equal(laid, image) else None


def _own_arguments(model: nn.Module, blocks: list[_Block], batch: Any, contexts: list[dict[str, Any]],
                   note: str) -> bool:
    """Whether the blocks must be replayed with their own captured arguments: the layout says so (T5), or a later
    block is called with other arguments than the first (a decoder mixing sliding-window and full-attention
    layers, each type with its masks and rotary tables: Gemma 2 and 3, Qwen2 with ``max_window_layers``...).

    The replay hands each block the arguments captured from the unpruned model, which is right only if they do
    not depend on the hidden states: checked here on the first batch (:func:`_check_own_arguments`). A block fed
    by another stack (a decoder's ``encoder_hidden_states``) fails that check and is refused, with ``note``."""
    if not blocks[0].per_block_context and all(_same_value(c, contexts[0]) for c in contexts[1:]):
        return False
    try:
        _check_own_arguments(model, blocks[0], blocks[1:], batch, {b.name: c for b, c in zip(blocks, contexts,
                                                                                               strict=False)})
    except ValueError as exc:
        if blocks[0].per_block_context:
            raise
        differ = next(b for b, c in zip(blocks, contexts, strict=False) if not _same_value(c, contexts[0]))
        raise ValueError(f"block {differ.name!r} is called with other arguments than the first block, and they "
                         "change with the hidden states of the blocks before it (an input computed by the model "
                         "from another stack, such as a decoder's encoder_hidden_states): the pruner replays each "
                         "block with the arguments captured from the unpruned model, so such a stack is not "
                         f"supported.{note}") from exc
    return True


def _consumer(block: _Block, stage: str) -> nn.Linear:
    block, stage = _view(block, stage)
    return block.down if stage == "ffn" else block.out_proj


def _residual_rows(block: _Block, stage: str, got: dict[str, torch.Tensor], x: torch.Tensor,
                   valid: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    """Rows of the residual stream that the stage's consumer output is added to (``out``: the block output,
    ``y``: the consumer output rows, times the layer scale if any; read where the stage's output is summed
    straight into the block output)."""
    view, role = _view(block, stage)
    entry = view.residual_input(role)
    if entry == BLOCK_OUTPUT:
        if out is None:
            raise RuntimeError("the block output is needed for the residual of a parallel branch")
        res = _rows(block.token_view(out), valid, block.batch_first("block"))
    elif isinstance(entry, BranchSum):  # the sum the branch enters, minus the branch
        res = _rows(got["res_" + stage], valid, block.batch_first("block"))
    else:
        res = (_rows(block.token_view(x), valid, block.batch_first("block")) if entry is None
               else _rows(got["res_" + stage], valid, view.batch_first(role)))
    if y is not None and res.shape != y.shape:  # the consumer's output is not even as wide as the stream (MobileBERT)
        _refuse_layout(view, role, stage)
    if _is_branch(entry):
        return res - y.to(res.dtype)
    scale = view.residual_scale(role)
    return res if scale is None else res * scale


def _capture_map(block: _Block, stages: list[str], residual: bool) -> dict[str, Any]:
    mods: dict[str, Any] = {s: _consumer(block, s) for s in stages}
    if residual:
        for s in stages:
            entry = _residual_entry(block, s)
            if isinstance(entry, BranchSum):
                mods["res_" + s] = (entry.module, entry.index)
            elif entry is not None and entry != BLOCK_OUTPUT:
                mods["res_" + s] = entry
    return mods


def _norm_weights(block: _Block, stage: str, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row weights ``1 / sigma_t^2`` and column scales ``|gamma|`` of the post-LN LayerNorm that follows the stage.

    A LayerNorm output moves by about ``gamma_i / sigma_t`` per unit change of its input ``z_{t,i}``, so an error
    measured in the LayerNorm's output space weighs token ``t`` by ``1 / sigma_t^2`` and dimension ``i`` by
    ``gamma_i^2``. Without it, the few tokens and dimensions with massive activations (e.g. [CLS] in BERT) dominate
    the least-squares fit. Pre-LN blocks (no LayerNorm after the sum) are not weighted.
    """
    view, role = _view(block, stage)
    norm = view.post_norm(role)
    if norm is None:
        return None, None
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon  # DeBERTa's LayerNorm
    var = z.double().var(dim=1, unbiased=False) + eps
    scale = None
    if norm.weight is not None:
        g = norm.weight.detach().double().abs().cpu()
        scale = g.clamp_min(1e-6 * float(g.max()) + 1e-30)
    return 1.0 / var, scale


def _original_pass(oblk: _Block, stages: list[str], mode: str, xo: list[torch.Tensor],
                   cache: list[dict[str, Any]], counter: list[int], residual: bool,
                   weighting: bool, experts: bool = False, stats: dict[str, _Stats] | None = None,
                   router: bool = False, in_place: bool = False) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One forward of the original block per batch: its outputs (the next block's inputs) and, per stage, either
    the layer-mode statistics (``mode == "layer"``) or the targets and LayerNorm weights of the tokens. With
    ``experts`` (a mixture-of-experts block), ``side["experts"]`` holds :class:`_ExpertCapture` records of the same
    forwards (with the router's arguments if ``router``: whole-expert pruning), the experts' and mixture's
    outputs for the first batch only (its checks), and, in ``seq`` mode, only
    the first batch's record (``None`` for the others: seq mode reads the pruned network's). Layer mode adds to
    ``stats`` where given (a block called several times: the statistics of its calls so far). With ``in_place``
    each batch's outputs replace its inputs in ``xo`` (returned as the outputs) once the batch is done, so that the
    inputs of the batches done can go (the asym and seq modes read them no more).

    The targets of the asym mode are kept in float64 where they add the residual stream (the original residual sum,
    from which the pruned network's residual is subtracted later: the residual can be much larger than the
    consumer's output), else in the consumer output's dtype (read back in float64, the same values)."""
    need_res = residual or weighting
    orig_mods = _capture_map(oblk, stages, need_res)
    # the layout check reads the residual and the sums on the first batch only
    first_mods = {**_capture_map(oblk, stages, True), **_layout_probes(oblk, stages)}
    xo_next: list[torch.Tensor] = xo if in_place else []
    side: dict[str, Any] = {"stats": {} if stats is None else stats, "targets": {s: [] for s in stages},
                            "row_w": {s: [] for s in stages}, "col_scale": {s: None for s in stages},
                            "norm_scales": {s: [] for s in stages}, "experts": []}
    for b in range(len(cache)):
        with _ExpertCapture(oblk, router) if experts else contextlib.nullcontext() as cap:
            out, got = capture_inputs(first_mods if b == 0 else orig_mods,
                                      lambda b=b: _fwd(oblk, xo[b], _original_context(cache[b]), counter))
        if experts:
            record = cap.take(outputs=b == 0)
            side["experts"].append(record if b == 0 or mode != "seq" else None)
        valid = cache[b]["valid"]
        for s in stages:
            view, role = _view(oblk, s)
            a = _rows(view.consumer_rows(role, got[s], _own_context(oblk, _original_context(cache[b])), xo[b]),
                      valid, view.batch_first(role))
            y = orig_mods[s](a)
            lam = _layer_scale(oblk, s, y)[0]
            norm = view.output_norm(role)
            y_norm = None if norm is None else norm(y)
            norm_scales = None if norm is None else _token_scales(oblk, s, y, y_norm, check=b == 0)
            res = total = None
            if b == 0 or need_res:
                y_sum = y_norm if norm is not None else (y if lam is None else y * lam)
                res = _residual_rows(oblk, s, got, xo[b], valid, out, y_sum)
                total = y_sum + res  # the residual sum the stage's output enters
            if b == 0:
                _check_layout(oblk, s, total, got, out, valid)
                if _is_branch(view.residual_input(role)):
                    _check_branch_sum(oblk, s, xo[b], _original_context(cache[b]), counter)
            w = scale = None
            if weighting:
                w, scale = _norm_weights(oblk, s, total)
            if lam is not None or norm_scales is not None:
                # an error in the consumer output is lambda (or s_t g, after a norm) times that error in the sum
                gain = (lam if norm_scales is None else norm_scales[1]).detach().double().abs().cpu()
                gain = gain.clamp_min(1e-6 * float(gain.max()) + 1e-30)
                scale = gain if scale is None else scale * gain
            if norm_scales is not None:
                tok2 = norm_scales[0].square()
                w = tok2 if w is None else w * tok2
            side["col_scale"][s] = scale
            side["norm_scales"][s].append(norm_scales)
            if mode == "layer":
                if s not in side["stats"]:
                    side["stats"][s] = _Stats(a.shape[1], y.shape[1], side["col_scale"][s], CV_FOLDS,
                                              _stats_device(_consumer(oblk, s).weight.device))
                side["stats"][s].update(a, _centred(oblk, s, y), w, cache[b]["fold"])
            else:
                # the consumer output that would give the original sum on the pruned network's residual, which is
                # then subtracted: (original sum - residual) / lambda with a layer scale; in float64, as the
                # residual can be much larger than y (and 1 / lambda larger still)
                if mode == "asym":  # (seq mode's targets come from the pruned network)
                    inv = _inverse_gain(oblk, s, y, norm_scales)
                    side["targets"][s].append((y.double() + res.double() * (1.0 if inv is None else inv))
                                              if residual else y)
                side["row_w"][s].append(w)
        if in_place:
            xo_next[b] = out
        else:
            xo_next.append(out)
    return xo_next, side


def _layer_scale(block: _Block, stage: str, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The stage's layer scale ``lambda`` (``like``'s dtype and device) and its inverse in float64 (0 where
    ``|lambda|`` is below ``1e-6`` of its largest entry: those channels barely reach the sum and get no
    compensation; 1 / lambda overflows half precision)."""
    view, role = _view(block, stage)
    lam = view.output_scale(role)
    if lam is None:
        return None, None
    lam64 = lam.to(device=like.device, dtype=torch.float64)
    big = lam64.abs() > 1e-6 * float(lam64.abs().max())
    inv = torch.where(big, 1.0 / torch.where(big, lam64, torch.ones_like(lam64)), torch.zeros_like(lam64))
    return lam.to(device=like.device, dtype=like.dtype), inv


#: An RMS norm's gains are read from its output on this constant row: ``c / sqrt(c^2 + eps)`` is 1 to ``eps / 2e6``.
_GAIN_PROBE = 1e3


def _centres(norm: nn.Module | None) -> bool:
    """Whether the norm after a consumer subtracts each token's mean (a LayerNorm: Swin V2's). Its output depends
    on the consumer output only through the centred part, ``P y = y - mean(y)``, as ``g * P y / s + b``: the
    targets of that consumer are centred (:func:`_centred`) and the rest is read as an RMS norm's."""
    return isinstance(norm, nn.LayerNorm)


def _centred(block: _Block, stage: str, y: torch.Tensor) -> torch.Tensor:
    """The consumer targets ``y`` (rows) centred per token where the norm after the consumer is a LayerNorm (see
    :func:`_centres`): the fitted outputs are then centred too, and the selection objective weighs only what
    reaches the norm's output. The refit's least squares acts on each output column alike, so it commutes with
    the centring: the refitted layer normalises to what the fit of the uncentred targets would."""
    view, role = _view(block, stage)
    return y - y.mean(dim=1, keepdim=True) if _centres(view.output_norm(role)) else y


def _norm_gains(norm: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The ``width`` per-channel gains ``g`` (float64) of an RMS norm ``N(y) = g * y / sqrt(mean(y^2) + eps)``
    placed after a consumer, however the norm parametrizes them (Gemma's ``1 + weight``, OLMo's ``weight``); the
    probe row takes ``like``'s device and floating dtype. A LayerNorm's are its weight (ones without one)."""
    if _centres(norm):
        w = norm.weight
        return (torch.ones(width, dtype=torch.float64, device=like.device) if w is None
                else w.detach().double().reshape(-1).to(like.device))
    dtype = like.dtype if like.is_floating_point() else torch.float32
    probe = torch.full((1, width), _GAIN_PROBE, dtype=dtype, device=like.device)
    return norm(probe).detach().double().reshape(-1)


def _token_scales(block: _Block, stage: str, y: torch.Tensor, out: torch.Tensor,
                  check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the norm after the stage's consumer on the rows ``y`` (its output ``out``): per token
    ``s_t`` and per channel ``g`` (float64), with ``out_t = s_t * g * y_t`` (``s_t = 1 / rms(y_t)``), ``s_t`` fitted
    by least squares per row. A LayerNorm is read the same way on the centred rows, its bias apart:
    ``out_t - b = s_t * g * (y_t - mean(y_t))`` (see :func:`_centres`). With ``check`` (the first batch), a norm
    of neither form (another bias or offset) is refused. A row with ``g * y_t = 0`` gets the largest factor of the
    others."""
    view, role = _view(block, stage)
    norm = view.output_norm(role)
    g = _norm_gains(norm, y.shape[1], y)
    gy = _centred(block, stage, y.detach().double()) * g.to(y.device)
    out64 = out.detach().double()
    if _centres(norm) and norm.bias is not None:
        out64 = out64 - norm.bias.detach().double().to(out64.device)
    den = gy.pow(2).sum(1)
    ok = den > 0
    scales = torch.where(ok, (out64 * gy).sum(1) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    if check:
        tol = 1e-3 if torch.finfo(out.dtype).bits >= 32 else 3e-2
        err = (out64 - scales.unsqueeze(1) * gy).norm(dim=1)
        if bool((err > tol * out64.norm(dim=1) + 1e-12).any()) or bool((scales[ok] <= 0).any()):
            name = "FFN" if stage == "ffn" else "attention"
            raise ValueError(f"block {block.name!r} ({type(block.module).__name__}): the norm after its {name} output "
                             f"({type(block.output_norm(stage)).__name__}) is neither an RMS norm (a per-token "
                             "scale times per-channel gains, without mean subtraction or bias) nor an "
                             "nn.LayerNorm, which the refit's targets assume. This model is not supported by the "
                             "transformer adapter.")
    fill = scales[ok].max() if bool(ok.any()) else torch.ones((), dtype=scales.dtype, device=scales.device)
    return torch.where(ok, scales, fill), g


def _inverse_gain(block: _Block, stage: str, like: torch.Tensor,
                  norm_scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """How a change of the stage's residual sum maps back to a change of its consumer output (float64, to
    multiply ``like``'s rows with): ``1 / lambda`` per channel with a layer scale, ``1 / (s_t g_i)`` per token and
    channel with a norm after the consumer (``norm_scales = (s, g)`` from :func:`_token_scales`), or ``None``.
    Channels whose factor is below ``1e-6`` of the largest get 0 (no compensation)."""
    if norm_scales is None:
        return _layer_scale(block, stage, like)[1]
    tok, g = norm_scales
    g = g.to(like.device)
    big = g.abs() > 1e-6 * float(g.abs().max())
    inv_g = torch.where(big, 1.0 / torch.where(big, g, torch.ones_like(g)), torch.zeros_like(g))
    return inv_g.unsqueeze(0) / tok.to(like.device).unsqueeze(1)


def _layout_probes(block: _Block, stages: list[str]) -> dict[str, tuple[nn.Module, int]]:
    """Where each stage's residual sum ``consumer output + residual`` should reappear: the input of the LayerNorm
    after it (post-LN), the residual input of the FFN (pre-LN attention), or the block output (pre-LN FFN; or the
    input of :meth:`_Block.last_sum_probe` where the block does more after its last sum)."""
    probes = {}
    for s in stages:
        view, role = _view(block, s)
        norm = view.post_norm(role)
        if norm is not None:
            probes["sum_" + s] = (norm, 0)
        elif role == "heads" and view.heads_sum_input() is not None:
            probes["sum_" + s] = view.heads_sum_input()
        elif (role == "ffn" or not view.has_ffn) and view.last_sum_probe() is not None:
            probes["sum_" + s] = view.last_sum_probe()
    return probes


def _check_layout(block: _Block, stage: str, total: torch.Tensor, got: dict[str, torch.Tensor],
                  out: torch.Tensor, valid: torch.Tensor) -> None:
    """Refuse a block whose forward does not add the stage's consumer output to the residual it is recognised by
    (a look-alike layout with a layer scale, a gate or another sum), checked on the first batch."""
    block, stage_name = _view(block, stage)
    if _is_branch(block.residual_input(stage_name)):
        return  # the sum is read where it is, by construction: _check_branch_sum checks that it is one
    if "sum_" + stage in got:
        seen = _rows(got["sum_" + stage], valid, block.batch_first("block"))
    elif stage == "ffn" or not block.has_ffn:  # the last sublayer: its sum is the block output (over its factor)
        factor = block.output_factor()
        seen = _rows(block.token_view(out if factor is None else out / factor.to(out.dtype)), valid,
                     block.batch_first("block"))
    else:
        return
    if not (torch.isfinite(seen).all() and torch.isfinite(total).all()):
        return  # NaN / inf activations are reported, with the layer, by the statistics
    tol = 1e-4 * (1.0 + float(seen.abs().max()))
    if seen.shape != total.shape or not torch.allclose(total.to(seen.dtype), seen, rtol=1e-4, atol=tol):
        _refuse_layout(block, stage_name, stage)


def _refuse_layout(block: _Block, stage_name: str, stage: str) -> None:
    """Raise the ``ValueError`` of a block that has a known layout but does not compute like it."""
    where = "the input of the LayerNorm after it" if block.post_norm(stage_name) is not None else (
        "the block output" if stage == "ffn" or not block.has_ffn else "the residual stream entering the FFN")
    consumer = "down projection" if stage == "ffn" else "attention output projection"
    raise ValueError(f"block {block.name!r} ({type(block.module).__name__}) has the layout of a {block.kind} "
                     f"block but does not compute like one: its {consumer}'s output plus the residual is not "
                     f"{where} (an extra layer scale, gate or sum in its forward, or another token layout?), so "
                     "the refit would aim at the wrong target. This model is not supported by the transformer "
                     "adapter.")


def _prune_block(blk: _Block, oblk: _Block, stages: list[str], mode: str, method: str, reweight: bool,
                 budgets: dict[str, int], ridge: _Ridge, rule: str, rng: np.random.Generator, xo: list[torch.Tensor],
                 xp: list[torch.Tensor], cache: list[dict[str, Any]], counter: list[int],
                 report: TransformerPruneReport, residual: bool, weighting: bool,
                 jobs: OrderedJobs) -> list[torch.Tensor]:
    """Prune the stages of one block (the selection and refit as jobs of ``jobs``); return the original network's
    outputs of this block (next inputs)."""
    n_b = len(cache)
    residual = residual and mode == "asym"
    # one forward of the original block per batch: its outputs, the consumer targets (asym) or the consumer inputs
    # and targets (layer), and the LayerNorm weights of the tokens
    t0s = {s: time.perf_counter() for s in stages}
    dense = [s for s in stages if not (s == "ffn" and blk.moe) and s != "experts"]
    # in asym and seq modes the original network's inputs are not read after this pass: each batch's outputs take
    # its inputs' place in ``xo`` (unless the pruned network reads the same list: no block changed before)
    xo_next, side = _original_pass(oblk, dense, mode, xo, cache, counter, residual, weighting,
                                   experts=len(dense) < len(stages), router="experts" in stages,
                                   in_place=mode != "layer" and xp is not xo)
    stats: dict[str, _Stats] = side["stats"]
    targets, row_w, col_scale = side["targets"], side["row_w"], side["col_scale"]
    for s in stages:
        if s == "experts":  # whole experts: the routed sum of the kept ones
            t0 = time.perf_counter()
            _prune_experts(blk, oblk, mode, method, reweight, ridge, budgets[s], side["experts"],
                           xo if mode == "layer" else xp, cache, counter, rng, report, t0)
            continue
        if s not in dense:  # the experts of a mixture, after the heads of the same block
            t0 = time.perf_counter()
            expert_stats = _expert_stats(blk, oblk, mode, side["experts"], xp, cache, counter)
            _apply_expert_selection(blk, method, reweight, budgets, expert_stats, ridge, rule, rng, report, t0, jobs)
            continue
        t0 = t0s[s] if mode == "layer" else time.perf_counter()
        if mode != "layer":
            mods = _capture_map(blk, [s], residual)
            from_output = residual and _is_branch(_residual_entry(blk, s))  # needs the run past the consumer
            for b in range(n_b):
                valid = cache[b]["valid"]
                out_p, got = capture_inputs(mods, lambda b=b: _fwd(blk, xp[b], cache[b]["ctx"], counter),
                                            stop=blk.single_call() and not from_output)
                view, role = _view(blk, s)
                a = _rows(view.consumer_rows(role, got[s], _own_context(blk, cache[b]["ctx"]), xp[b]), valid,
                          blk.batch_first(s))
                if mode == "asym":
                    y, targets[s][b] = targets[s][b].double(), None  # each batch's targets go once read
                    if residual:
                        y_p = None
                        if from_output:
                            lam_p = _layer_scale(blk, s, a)[0]
                            y_p = mods[s](a) if lam_p is None else mods[s](a) * lam_p
                        res_p = _residual_rows(blk, s, got, xp[b], valid, out_p, y_p).double()
                        inv = _inverse_gain(oblk, s, res_p, side["norm_scales"][s][b])
                        y = y - (res_p if inv is None else res_p * inv)
                else:
                    y = mods[s](a)
                if s not in stats:
                    stats[s] = _Stats(a.shape[1], y.shape[1], col_scale[s], CV_FOLDS,
                                      _stats_device(_consumer(blk, s).weight.device))
                stats[s].update(a, _centred(blk, s, y), row_w[s][b], cache[b]["fold"])
            targets[s] = []
        _apply_selection(blk, s, method, reweight, budgets[s], stats[s], ridge, rule, rng, report, t0, jobs)
    return xo_next


def _apply_selection(blk: _Block, stage: str, method: str, reweight: bool, k: int, stats: _Stats | None,
                     ridge: _Ridge, rule: str, rng: np.random.Generator, report: TransformerPruneReport,
                     t0: float, jobs: OrderedJobs, owner: str | None = None, expert: str | None = None) -> None:
    """Choose the stage's units and refit its consumer (a job of ``jobs``: the baselines' units are chosen here,
    in block and stage order), then shrink the block and report, in that order too (the record names ``owner``
    and ``expert`` where given: a mixture's shared expert, pruned as a dense FFN)."""
    n_units, groups = _unit_columns(stage, blk)
    consumer = _consumer(blk, stage)
    parts = blk.head_part_labels() if stage == "heads" and blk.head_parts > 1 else None
    if method in GREEDY_METHODS:
        chosen = np.arange(n_units) if k >= n_units else None  # every unit kept: nothing to select
    elif method == "magnitude":
        chosen = _top_units(_magnitude_scores(stage, blk), k, parts)
    elif method == "wanda":
        chosen = _top_units(_wanda_scores(stage, blk, stats), k, parts)
    elif parts is None:
        chosen = rng.choice(n_units, size=k, replace=False)
    else:
        chosen = _top_units(rng.permutation(n_units).astype(float), k, parts)
    problem = None if stats is None or jobs.executor is None else stats.problem()
    w_orig = None
    if reweight and ridge.prior:  # the trained weights, centred like the targets where a LayerNorm follows
        w_orig = _centred(blk, stage, weight_of(consumer).detach().double().T).T.cpu().numpy()
    t_here = time.perf_counter() - t0

    def use(out: tuple[np.ndarray, tuple | None, float]) -> None:
        t1 = time.perf_counter()
        kept, fit, t_job = out
        weight = bias = rel_err = lam = cv_err = None
        if fit is not None:
            m_rows, b, rel_err, lam, cv_err = fit
            weight = torch.as_tensor(np.ascontiguousarray(m_rows.T))
            bias = None if b is None else torch.as_tensor(b)
        keep_t = torch.as_tensor(kept, dtype=torch.long)
        if stage == "ffn":
            blk.shrink_ffn(keep_t, weight, bias)
        else:
            _view(blk, stage)[0].shrink_heads(keep_t, weight, bias)
        report.units.append(UnitRecord(block=owner or blk.name, stage=stage, n_units=n_units, n_kept=k,
                                       kept=[int(j) for j in kept], relative_error=rel_err,
                                       time_s=t_here + t_job + time.perf_counter() - t1, ridge=lam,
                                       cv_relative_error=cv_err, expert=expert))

    jobs.add(f"the selection and refit of block {blk.name!r} ({stage})", _stage_job,
             (stats if problem is None else problem, groups, consumer.bias is not None, k, chosen, reweight, ridge,
              rule, w_orig, parts), use)


# ----------------------------------------------------------------------------------------------------------------
# mixture-of-experts FFNs
# ----------------------------------------------------------------------------------------------------------------

class _ExpertCapture:
    """Hooks, while in a ``with``, that record what a mixture's experts module is called with and returns, and what
    the whole mixture module (``mlp``) returns, during block forwards; :meth:`take` hands over one forward's record.
    """

    def __init__(self, blk: _Block, router: bool = False) -> None:
        self.blk, self.router = blk, router
        self.seen: list[tuple[Any, ...]] = []
        self.ffn: list[Any] = []
        self.shared_in: list[Any] = []
        self.router_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _ExpertCapture:
        mlp = _get(self.blk.module, self.blk.MLP)
        if self.blk.scores_on_input:
            # Llama 4: experts(x * scores) on every token; the record's routing is read from the router's scores
            # (zero outside a token's top experts) and its rows from the mixture module's input
            part: dict[str, Any] = {}
            router = _get(mlp, "router")
            self.handles += [
                mlp.register_forward_pre_hook(lambda _m, args: part.update(x=args[0])),
                router.register_forward_hook(lambda _m, _a, out: part.update(scores=out[0])),
                self.blk.experts.register_forward_hook(lambda _m, _a, out: self.seen.append(self._scored(part, out)))]
        else:
            def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
                bound = inspect.signature(m.forward).bind(*args, **kwargs)
                self.seen.append((*list(bound.arguments.values())[:3], out))

            self.handles.append(self.blk.experts.register_forward_hook(hook, with_kwargs=True))
        if isinstance(mlp, nn.Module):
            self.handles.append(mlp.register_forward_hook(lambda _m, _a, out: self.ffn.append(out)))
        router = self.blk.router if self.router else None
        if router is not None:  # what the router is called with (whole-expert pruning calls it again)
            self.handles.append(router.register_forward_pre_hook(
                lambda _m, args, kwargs: self.router_calls.append((args, kwargs)), with_kwargs=True))
        shared = self.blk.shared if self.blk.SHARED_OUTSIDE else None
        if shared is not None:  # beside the mixture: what it reads, checked against the experts' input
            self.handles.append(shared.module.register_forward_pre_hook(
                lambda _m, args: self.shared_in.append(args[0] if args else None)))
        return self

    @staticmethod
    def _scored(part: dict[str, Any], out: torch.Tensor) -> tuple[Any, ...]:
        """The record of an experts module called on scaled inputs: (token rows, routed experts (-1 elsewhere),
        scores, the experts' outputs summed per token)."""
        x, scores = part.get("x"), part.get("scores")
        if not isinstance(x, torch.Tensor) or not isinstance(scores, torch.Tensor):
            return (None, None, None, out)
        x = x.reshape(-1, x.shape[-1])
        experts = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        idx = torch.where(scores > 0, experts, torch.full_like(experts, -1))
        return (x, idx, scores, out.reshape(scores.shape[1], -1, out.shape[-1]).sum(0))

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self, outputs: bool = True) -> dict[str, torch.Tensor | None]:
        """The record of the forward just run, the tokens flattened to rows: ``x`` (the experts' input), ``idx``
        (routed experts), ``w`` (routing weights), ``out`` (the experts' output) and ``ffn_out`` (the mixture
        module's output, ``None`` if the block has none); the two outputs only if ``outputs`` (else ``None``); and
        ``shared_x``, the input of a shared expert beside the mixture module (:attr:`_HFMoEBlock.SHARED_OUTSIDE`),
        or ``None``; ``router``, the ``(args, kwargs)`` the router was called with when recorded (``router=True``;
        ``None`` otherwise, or unless called once)."""
        seen, ffn, shared_in, router_calls = self.seen, self.ffn, self.shared_in, self.router_calls
        self.seen, self.ffn, self.shared_in, self.router_calls = [], [], [], []
        if len(seen) != 1 or not all(isinstance(t, torch.Tensor) for t in seen[0]):
            raise ValueError(f"block {self.blk.name!r}: its experts module was called {len(seen)} times per block "
                             "forward, or not with (hidden_states, top_k_index, top_k_weights) tensors: this mixture "
                             "of experts is not supported by the transformer adapter (prune target='heads').")
        ffn_out = ffn[0][0] if len(ffn) == 1 and isinstance(ffn[0], tuple) else ffn[0] if len(ffn) == 1 else None
        xs, idx, w, e_out = seen[0]
        xs, e_out = xs.reshape(-1, xs.shape[-1]), e_out.reshape(-1, e_out.shape[-1])  # DBRX's come (batch, tokens, H)
        if not outputs:
            e_out = ffn_out = None
        sx = shared_in[0] if len(shared_in) == 1 and isinstance(shared_in[0], torch.Tensor) else None
        return {"x": xs, "idx": idx, "w": w, "out": e_out,
                "ffn_out": ffn_out.reshape(-1, ffn_out.shape[-1]) if isinstance(ffn_out, torch.Tensor) else None,
                "shared_x": None if sx is None else sx.reshape(-1, sx.shape[-1]),
                "router": router_calls[0] if len(router_calls) == 1 else None}


def _routed(idx: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, e: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The real token rows routed to expert ``e`` and their routing weights."""
    hit = (idx == e) & valid.reshape(-1, 1)
    tok, slot = hit.nonzero(as_tuple=True)
    return tok, weights[tok, slot]


def _shared_out(blk: _Block, x: torch.Tensor) -> torch.Tensor:
    """What a mixture's shared expert adds to its output on the token rows ``x``: its output, times the per-token
    factor of :meth:`_HFMoEBlock.shared_factor` if any."""
    shared = blk.shared
    y = shared.down(shared.hidden(x))
    c = blk.shared_factor(x)
    return y if c is None else y * c


def _expert_contribution(blk: _Block, e: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What expert ``e`` adds to the mixture's output on the token rows ``x`` routed to it with scores ``w``:
    ``w * expert(x)``, or ``expert(w * x)`` where the scores scale the input (Llama 4)."""
    w = w.to(x.dtype).unsqueeze(1)
    if blk.scores_on_input:
        return blk.expert_out(e, blk.expert_hidden(e, x * w))
    return blk.expert_out(e, blk.expert_hidden(e, x)) * w


def _check_experts_sum(blk: _Block, call: dict[str, torch.Tensor | None]) -> None:
    """Refuse experts whose output is not ``sum_j w_j expert_{e_j}(x)`` as :meth:`_HFMoEBlock.expert_hidden` and
    :meth:`_HFMoEBlock.expert_out` compute it (another activation split, biases, scores applied elsewhere), and a
    mixture whose output is not that sum plus the shared expert's output (times its gate, if any)."""
    x, idx, w, out, ffn_out = call["x"], call["idx"], call["w"], call["out"], call["ffn_out"]
    want = torch.zeros_like(out, dtype=torch.float64)
    everything = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for e in range(blk.n_experts):
        tok, we = _routed(idx, w, everything, e)
        if tok.numel():
            want.index_add_(0, tok, _expert_contribution(blk, e, x[tok], we).double())
    rel = 1e-4 if torch.finfo(out.dtype).bits >= 32 else 3e-2  # half precision: the kernels round differently
    tol = rel * (1.0 + float(out.detach().abs().max()))
    if want.shape != out.shape or not torch.allclose(want, out.double(), rtol=rel, atol=tol):
        raise ValueError(f"block {blk.name!r}: its experts ({type(blk.experts).__name__}) do not compute the "
                         "routing-weighted sum of act(gate(x)) * up(x) through each expert's down projection that "
                         "the expert adapter assumes; this model's FFN cannot be pruned by the transformer adapter "
                         "(prune target='heads').")
    if blk.shared is not None and blk.SHARED_OUTSIDE and not blk.SHARED_OWN_INPUT:
        sx = call.get("shared_x")
        if sx is None or sx.shape != x.shape or not torch.equal(sx, x):
            raise ValueError(f"block {blk.name!r}: its shared expert {blk.shared.name!r} beside the mixture module "
                             "does not read (once) the input the experts read, as the expert adapter assumes; this "
                             "model's FFN cannot be pruned by the transformer adapter (prune target='heads').")
    if ffn_out is None:
        return
    inside = blk.shared is not None and not blk.SHARED_OUTSIDE  # a shared expert inside the mixture module
    total = (out.double() + _shared_out(blk, x).double() if inside else out.double()) * blk.mixture_factor()
    tol = rel * (1.0 + float(ffn_out.detach().abs().max()))
    if total.shape != ffn_out.shape or not torch.allclose(total, ffn_out.double(), rtol=rel, atol=tol):
        shared = blk.shared if inside else None
        what = "the experts' output" if shared is None else (
            f"the experts' output plus its shared expert's ({shared.name.rsplit('.', 1)[-1]}) output"
            + (" times sigmoid(shared_expert_gate(x))" if blk.shared_factor(x[:1]) is not None else "")
            + ("" if blk.mixture_factor() == 1 else f", times {blk.mixture_factor():g}"))
        raise ValueError(f"block {blk.name!r}: its mixture module ({type(_get(blk.module, blk.MLP)).__name__}) "
                         f"does not return {what}, as the expert adapter assumes; this model's FFN cannot be "
                         "pruned by the transformer adapter (prune target='heads').")


def _expert_stats(blk: _Block, oblk: _Block, mode: str, orig_calls: list[dict[str, torch.Tensor | None] | None],
                  xp: list[torch.Tensor], cache: list[dict[str, Any]], counter: list[int]
                  ) -> tuple[Callable[[int], _Stats | None], _Stats | None]:
    """Statistics of a mixture-of-experts FFN: a function that gives expert ``e``'s (``None`` for an expert that no
    calibration token reaches), and the shared expert's (``None`` without one).

    An expert's rows are the real tokens routed to it, weighted by the square of their routing weight (the factor
    the expert's output enters the block output with); the shared expert's rows are every real token, weighted by
    the square of its gate (Qwen2-MoE), else 1. The inputs, routing and gates come from the network of ``mode``
    (the original one in ``layer`` mode, the pruned one otherwise); the targets are the expert's own output on its
    input (``layer``, ``seq``) or, in ``asym`` mode, the original expert's output on the original network's input
    of the same token. The shared residual stream is not compensated (``residual=`` applies to dense FFNs): each
    expert is fitted to itself. ``orig_calls``: the original block's records of :func:`_original_pass` (one per
    batch; in ``seq`` mode the first only).

    The experts' own records are kept for every batch (token rows, as the cached block inputs), and an expert's
    statistics are built when asked for: one expert's Gram matrices at a time, not all of them at once (a
    mixture's experts together hold as many neurons as several dense FFNs)."""
    mine: list[dict[str, torch.Tensor | None]] = []
    for b in range(len(cache)):
        valid, orig = cache[b]["valid"], orig_calls[b]
        if orig is not None and orig["x"].shape[0] != valid.numel():
            raise ValueError(f"block {blk.name!r}: its experts see {orig['x'].shape[0]} token rows for "
                             f"{valid.numel()} tokens: this mixture of experts is not supported by the "
                             "transformer adapter (prune target='heads').")
        if b == 0:
            _check_experts_sum(oblk, orig)
        if mode == "layer":
            mine.append(orig)
        else:
            with _ExpertCapture(blk) as cap:
                _fwd(blk, xp[b], cache[b]["ctx"], counter)
            mine.append(cap.take(outputs=False))
    src = oblk if mode == "layer" else blk
    device = _stats_device(next(blk.experts.parameters()).device)
    folds = []
    for c in cache:
        rows = torch.zeros(c["valid"].numel(), dtype=torch.long, device=c["valid"].device)
        rows[c["valid"].reshape(-1)] = c["fold"]
        folds.append(rows)

    def expert(e: int) -> _Stats | None:
        stats = None
        for b, call in enumerate(mine):
            tok, we = _routed(call["idx"], call["w"], cache[b]["valid"].to(call["idx"].device), e)
            if tok.numel() == 0:
                continue
            # scores on the input (Llama 4): the expert sees s * x, and its output enters the sum as it is;
            # else its output enters times s: rows weighted by s^2
            scale = we.to(call["x"].dtype).unsqueeze(1) if blk.scores_on_input else 1.0
            a = src.expert_hidden(e, call["x"][tok] * scale)
            y = (oblk.expert_out(e, oblk.expert_hidden(e, orig_calls[b]["x"][tok] * scale)) if mode == "asym"
                 else src.expert_out(e, a))
            if stats is None:
                stats = _Stats(a.shape[1], y.shape[1], None, CV_FOLDS, device)
            stats.update(a, y, None if blk.scores_on_input else we.double().square(),
                         folds[b][tok.to(folds[b].device)])
        return stats

    shared, shared_stats = src.shared, None
    if shared is not None:
        own = "shared_x" if blk.SHARED_OWN_INPUT else "x"  # the shared expert's input: its own, or the experts'
        for b, call in enumerate(mine):
            rows = cache[b]["valid"].reshape(-1).to(call["x"].device)
            xs = call[own][rows]
            a = shared.hidden(xs)
            if mode == "asym":
                o_shared = oblk.shared
                y = o_shared.down(o_shared.hidden(orig_calls[b][own][rows]))
            else:
                y = shared.down(a)
            c = src.shared_factor(xs)
            if shared_stats is None:
                shared_stats = _Stats(a.shape[1], y.shape[1], None, CV_FOLDS, device)
            shared_stats.update(a, y, None if c is None else c.reshape(-1).double().square(), cache[b]["fold"])
    return expert, shared_stats


def _expert_magnitude(blk: _Block, e: int) -> np.ndarray:
    """Torch-Pruning-style importance of expert ``e``'s neurons: the mean of the squared L2 norms of the unit's
    gate row (if gated), up row and down column (as :func:`_magnitude_scores` for a dense FFN)."""
    return (blk.expert_magnitude(e) / (blk.FFN_PARTS + 1)).cpu().numpy()


def _apply_expert_selection(blk: _Block, method: str, reweight: bool, budgets: dict[str, int],
                            stats: tuple[Callable[[int], _Stats | None], _Stats | None] | None, ridge: _Ridge,
                            rule: str, rng: np.random.Generator, report: TransformerPruneReport, t0: float,
                            jobs: OrderedJobs) -> None:
    """Choose ``budgets["ffn"]`` neurons in every expert of a mixture and refit its down projection (one job per
    expert), and ``budgets["shared"]`` neurons of its shared expert, if any (one more job, as a dense FFN); then
    shrink the block and report one record per expert (and one for the shared expert, ``expert="shared"``). An
    expert that no calibration token reaches keeps its largest neurons by weight magnitude and its trained weights
    (``relative_error`` ``None``)."""
    n_units, n_exp, k = blk.ffn_units, blk.n_experts, budgets["ffn"]
    per_expert, shared_stats = stats if stats is not None else ((lambda e: None), None)
    results: list[Any] = [None] * n_exp  # (kept, fit, seconds) per expert
    t_here = time.perf_counter() - t0
    for e in range(n_exp):
        st = per_expert(e)  # built now: with jobs run in place, one expert's statistics are held at a time
        if method in GREEDY_METHODS:
            chosen = np.arange(n_units) if k >= n_units else None
        elif method == "wanda" and st is not None:
            w1 = blk.expert_down_weight(e).detach().double().abs().sum(0).cpu().numpy()
            chosen = np.argsort(-(w1 * np.sqrt(np.maximum(st.col_sq, 0.0))), kind="stable")[:k]
        elif method in ("magnitude", "wanda"):
            chosen = np.argsort(-_expert_magnitude(blk, e), kind="stable")[:k]
        else:
            chosen = rng.choice(n_units, size=k, replace=False)
        if st is None:  # no token reached this expert: nothing to fit
            if chosen is None:
                chosen = np.argsort(-_expert_magnitude(blk, e), kind="stable")[:k]
            results[e] = (np.sort(chosen), None, 0.0)
            continue
        problem = st if jobs.executor is None else st.problem()
        w_orig = blk.expert_down_weight(e).detach().double().cpu().numpy() if reweight and ridge.prior else None
        jobs.add(f"the selection and refit of expert {e} of block {blk.name!r}", _stage_job,
                 (problem, None, blk.experts_bias, k, chosen, reweight, ridge, rule, w_orig),
                 partial(results.__setitem__, e))
        del st, problem

    def finish() -> None:
        t1 = time.perf_counter()
        kept = torch.as_tensor(np.stack([r[0] for r in results]), dtype=torch.long)
        weight = bias = None
        if any(r[1] is not None for r in results):  # refitted experts, the others' trained weights
            weight = torch.stack([torch.as_tensor(np.ascontiguousarray(r[1][0].T)) if r[1] is not None
                                  else _columns(blk.expert_down_weight(e), kept[e]).detach().double().cpu()
                                  for e, r in enumerate(results)])
            if blk.experts_bias:
                bias = torch.stack([torch.as_tensor(r[1][1]) if r[1] is not None
                                    else blk.expert_down_bias(e).detach().double().cpu()
                                    for e, r in enumerate(results)])
        blk.shrink_ffn(kept, weight, bias)
        t_each = (t_here + time.perf_counter() - t1) / n_exp
        for e, (kept_e, fit, t_job) in enumerate(results):
            report.units.append(UnitRecord(block=blk.name, stage="ffn", n_units=n_units, n_kept=k,
                                           kept=[int(j) for j in kept_e],
                                           relative_error=None if fit is None else fit[2], time_s=t_each + t_job,
                                           ridge=None if fit is None else fit[3],
                                           cv_relative_error=None if fit is None else fit[4], expert=e))

    jobs.then(finish)
    shared, k_shared = blk.shared, budgets.get("shared")
    if shared is not None and k_shared is not None:  # a dense gated FFN: the dense stage's selection and refit
        _apply_selection(shared, "ffn", method, reweight, k_shared, shared_stats, ridge, rule, rng, report,
                         time.perf_counter(), jobs, owner=blk.name, expert="shared")


def _real_rows(calls: list[dict[str, Any]], cache: list[dict[str, Any]], key: str) -> torch.Tensor:
    """The real tokens' rows of ``key`` (``"x"``, ``"idx"``, ``"w"``) of a mixture's records, batch after batch."""
    return torch.cat([call[key][c["valid"].reshape(-1).to(call[key].device)] for call, c in zip(calls, cache)])


def _expert_router(blk: _Block, calls: list[dict[str, Any]], cache: list[dict[str, Any]]) -> RestrictedRouter:
    """The router of ``blk`` restricted to kept sets of experts, called on the real tokens of every batch at once
    (the router input of each record, its real rows; a 3D input as one sequence); refused if the router is not
    called once per forward with a token per row, or does not return the routing the experts module receives."""
    refuse = (f"block {blk.name!r}: its mixture's router ({type(blk.router).__name__}) ")
    fix = " prune the neurons of every expert instead (target='ffn')."
    if blk.router is None or any(c["router"] is None for c in calls):
        raise ValueError(f"block {blk.name!r}: no router module (mlp.gate or mlp.router) called once per forward was "
                         f"found, which whole-expert pruning calls again on the kept experts' rows;{fix}")
    parts = []
    for call, c in zip(calls, cache):
        first = call["router"][0][0] if call["router"][0] else None
        if not isinstance(first, torch.Tensor) or first.reshape(-1, first.shape[-1]).shape[0] != c["valid"].numel():
            raise ValueError(f"{refuse}is not called with one row per token as its first argument, which "
                             f"whole-expert pruning assumes;{fix}")
        parts.append(first.reshape(-1, first.shape[-1])[c["valid"].reshape(-1).to(first.device)])
    rows = torch.cat(parts)
    args, kwargs = calls[0]["router"]
    route = RestrictedRouter(blk.routing, blk.n_experts, (rows.unsqueeze(0) if args[0].dim() == 3 else rows,
                                                         *args[1:]), kwargs)
    try:
        w, idx = route(torch.arange(blk.n_experts))
    except ValueError:
        w = idx = None
    want_w, want_idx = sorted_routing(*_routing_rows(blk, calls, cache))
    if idx is not None:
        w, idx = sorted_routing(w, idx)
    if idx is None or idx.shape != want_idx.shape or not torch.equal(idx.to(want_idx.device), want_idx) or not (
            torch.allclose(w.double().to(want_w.device), want_w.double(), rtol=1e-5, atol=1e-6)):
        raise ValueError(f"{refuse}does not return the (weights, experts) its experts module receives (the "
                         f"mixture changes the routing after the router), which whole-expert pruning assumes;{fix}")
    return route


def _routing_rows(blk: _Block, calls: list[dict[str, Any]], cache: list[dict[str, Any]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing ``(weights, experts)`` ``(n, k)`` of the real tokens of a mixture's records (Llama 4's, recorded
    over every expert, compacted to the routed ones)."""
    got = compact_routing(_real_rows(calls, cache, "w"), _real_rows(calls, cache, "idx"))
    if got is None:
        raise ValueError(f"block {blk.name!r}: its router sends the tokens to different numbers of experts, which "
                         "whole-expert pruning does not model; prune the neurons of every expert instead "
                         "(target='ffn').")
    return got


def _expert_outputs(blk: _Block, calls: list[dict[str, Any]], cache: list[dict[str, Any]],
                    route: RestrictedRouter) -> ExpertOutputs:
    """The experts' outputs of ``blk`` on the real tokens of ``calls``. Where the routing scores scale the experts'
    inputs (Llama 4), the score of every expert on every token, read from ``route`` routing each token to every
    expert, is what scales a pair's input; refused unless it gives the recorded routing's scores (a router whose
    score of an expert depends on the others it picks)."""
    x = _real_rows(calls, cache, "x")
    if not blk.scores_on_input:
        return ExpertOutputs(blk, x)
    w, idx = _routing_rows(blk, calls, cache)
    every = torch.arange(blk.n_experts)
    try:
        w_all, idx_all = route(every, top_k=(idx.shape[1], blk.n_experts))
    except ValueError:
        w_all = idx_all = None
    scale = None
    if idx_all is not None and idx_all.shape == (x.shape[0], blk.n_experts):
        scale = torch.zeros(idx_all.shape, dtype=w_all.dtype, device=x.device)
        scale.scatter_(1, idx_all.to(x.device), w_all.to(x.device))
    if scale is None or not torch.allclose(scale.gather(1, idx.to(x.device)).double(), w.double().to(x.device),
                                           rtol=1e-5, atol=1e-6):
        raise ValueError(f"block {blk.name!r}: its router's score of an expert, which scales the expert's input, "
                         "could not be read for every expert on every token (no top-k attribute, or a score that "
                         "depends on the other experts picked); prune the neurons of every expert instead "
                         "(target='ffn').")
    return ExpertOutputs(blk, x, scale)


def _routed_error(blk: _Block, oblk: _Block, mode: str, calls: list[dict[str, Any]],
                  orig_calls: list[dict[str, Any] | None], cache: list[dict[str, Any]]) -> RoutedError:
    """The routed error of kept sets of the experts of ``blk`` on the real tokens of ``calls`` (the records of the
    network of ``mode``), against the target of ``mode``: the original mixture's routed output on the original
    network's tokens (``orig_calls``) in ``asym`` mode, the unpruned mixture's on the same tokens otherwise."""
    route = _expert_router(blk, calls, cache)
    outs = _expert_outputs(blk, calls, cache, route)
    if mode == "asym":  # the original mixture's routed output on the original network's tokens
        orig = _expert_outputs(oblk, orig_calls, cache, _expert_router(oblk, orig_calls, cache))
        target = orig.mixture(*_routing_rows(oblk, orig_calls, cache))
    else:
        target = outs.mixture(*_routing_rows(blk, calls, cache))
    return RoutedError(route, outs, target)


def _prune_experts(blk: _Block, oblk: _Block, mode: str, method: str, reweight: bool, ridge: _Ridge, k: int,
                   orig_calls: list[dict[str, Any] | None], xs: list[torch.Tensor], cache: list[dict[str, Any]],
                   counter: list[int], rng: np.random.Generator, report: TransformerPruneReport, t0: float) -> None:
    """Remove whole experts of a mixture, keeping ``k`` (see :mod:`nn_adapters._experts`): the kept set that
    minimises the routed output's error on the calibration tokens (greedy methods; the inputs ``xs`` of the
    network of ``mode``, the targets of :func:`_expert_stats`'s modes), or the ``k`` experts of largest weight norm
    (``magnitude``), of largest routed output mass ``sum_t w_t ||y_e(x_t)||`` (``wanda``), or at random. The router
    loses the removed experts' rows and routes among the kept ones as its forward does; with ``reweight``, the
    kept experts' down projections are then refitted to the target (:func:`_refit_experts`). The pruned layer is
    checked on the first batch against the routed sum computed here."""
    n_exp = blk.n_experts
    _check_experts_sum(oblk, orig_calls[0])
    if mode == "layer":
        calls = orig_calls
    else:
        calls = []
        for b in range(len(cache)):
            with _ExpertCapture(blk, router=True) as cap:
                _fwd(blk, xs[b], cache[b]["ctx"], counter)
            calls.append(cap.take(outputs=False))
    errors = _routed_error(blk, oblk, mode, calls, orig_calls, cache)
    route, outs, target = errors.route, errors.outs, errors.target
    w_rec, idx_rec = _routing_rows(blk, calls, cache)
    top_k = int(idx_rec.shape[1])
    if k < top_k:
        raise ValueError(f"block {blk.name!r}: keep leaves {k} of its {n_exp} experts, fewer than the {top_k} each "
                         f"token is routed to: pass keep >= {top_k / n_exp:.4g}")
    energy = float(target.square().sum())
    how = None
    if method in GREEDY_METHODS:
        try:
            kept, err, how = search_kept(errors, n_exp, k)
        except ValueError as exc:  # a router that cannot work on fewer experts (grouped routing)
            raise ValueError(f"block {blk.name!r}: {exc}; prune the neurons of every expert instead "
                             "(target='ffn'), or keep more experts.") from exc
    else:
        if method == "magnitude":
            score = np.array([float(blk.expert_magnitude(e).sum()) for e in range(n_exp)])
        elif method == "wanda":
            mass = (outs.norms(idx_rec) * outs.out_weights(w_rec).double()).reshape(-1)
            score = torch.zeros(n_exp, dtype=torch.float64).index_add_(0, idx_rec.reshape(-1).cpu(),
                                                                       mass.cpu()).numpy()
        else:
            score = rng.permutation(n_exp).astype(float)
        kept = np.sort(np.argsort(-score, kind="stable")[:k])
        err = float(errors.state(torch.as_tensor(kept))[2].sum())
    keep = torch.as_tensor(kept, dtype=torch.long)
    w_k, idx_k = route(keep)
    n0 = int(cache[0]["valid"].sum())  # the pruned layer on the first batch computes the routed sum found here
    if reweight:
        folds = torch.cat([c["fold"] for c in cache])
        down, routed = _refit_experts(blk, keep, outs.x, w_k, torch.searchsorted(keep.to(idx_k.device), idx_k),
                                      target, folds, ridge, outs)
        err = float((target - routed).square_().sum())
    else:
        routed = outs.mixture(w_k[:n0], idx_k[:n0])
    blk.drop_experts(keep)
    if reweight:
        blk.shrink_ffn(torch.arange(blk.ffn_units), *down)
    with _ExpertCapture(blk) as cap:
        _fwd(blk, xs[0], cache[0]["ctx"] if mode != "layer" else _original_context(cache[0]), counter)
    out = cap.take()["out"]
    got = out[cache[0]["valid"].reshape(-1).to(outs.x.device)].double()
    want = routed[:n0]
    rel = 1e-4 if torch.finfo(out.dtype).bits >= 32 else 3e-2  # half precision: as _check_experts_sum
    if got.shape != want.shape or not torch.allclose(got, want, rtol=rel, atol=rel * (1.0 + float(want.abs().max()))):
        raise ValueError(f"block {blk.name!r}: with experts removed, its mixture ({type(blk.experts).__name__}) does "
                         "not compute the routed sum of the kept experts (a count of experts the adapter did not "
                         "update, or routing that depends on the number of experts, such as grouped routing); "
                         "prune the neurons of every expert instead (target='ffn').")
    report.units.append(UnitRecord(block=blk.name, stage="experts", n_units=n_exp, n_kept=int(keep.numel()),
                                   kept=[int(e) for e in kept], relative_error=err / energy if energy > 0 else 0.0,
                                   time_s=time.perf_counter() - t0, search=how))


#: Passes of the whole-expert refit: each refits every kept expert once, given the others' current weights.
EXPERT_REFIT_PASSES = 2


def _refit_experts(blk: _Block, keep: torch.Tensor, x: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                   target: torch.Tensor, folds: torch.Tensor, ridge: _Ridge, outs: ExpertOutputs | None = None
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Refit the down projections (and biases) of the experts ``keep`` of ``blk`` so that the mixture's routed
    output on the token rows ``x`` (routed to the kept experts' positions ``pos`` in ``keep``, with weights ``w``)
    approaches ``target``. Returns the new down weights ``(len(keep), H, I)`` and biases ``(len(keep), H)`` (or
    ``None``), as :meth:`_HFMoEBlock.shrink_ffn` takes them, and the refitted routed output (float64).

    The joint least-squares problem over every kept expert couples the experts that share a token; it is solved by
    block coordinate descent (:data:`EXPERT_REFIT_PASSES` passes over the experts): expert ``e``'s down projection
    is the weighted ridge fit, on the tokens routed to it, of ``(T_t - others_t) / w_te`` (rows weighted by
    ``w_te^2``), where ``others_t`` is what the token's other experts add with their current weights: each step
    minimises the joint squared error over that expert's weights (with the ridge of :meth:`_Problem.refit`: ``"cv"``
    over the calibration sentences, toward the trained weights with ``refit_prior="original"``). With ``outs``
    (the :class:`~nn_adapters._experts.ExpertOutputs` of the rows ``x``), each expert reads what it reads there
    and its output is weighted as there (Llama 4: the rows scaled by its scores, the output added with weight 1).
    """
    ids, units = keep.tolist(), blk.ffn_units
    if outs is not None:
        w = outs.out_weights(w)

    def hidden(e: int, tok: torch.Tensor) -> torch.Tensor:
        return blk.expert_hidden(ids[e], x[tok] if outs is None else outs.inputs(ids[e], tok))

    weight = [blk.expert_down_weight(e).detach().double().T.cpu().numpy() for e in ids]  # (I, H)
    bias = [None if not blk.experts_bias else blk.expert_down_bias(e).detach().double().cpu().numpy() for e in ids]
    prior = [m.copy() for m in weight] if ridge.prior else None
    # a token routed with weight 0 adds nothing to the objective (its row's weight is w^2): left out
    hits = [((pos == e) & (w != 0)).nonzero(as_tuple=True) for e in range(len(ids))]
    device = _stats_device(next(blk.experts.parameters()).device)

    def out(e: int, h: torch.Tensor, tok: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s weighted output on its tokens ``tok`` (slots ``slot``) from its hidden rows ``h``."""
        y = h.double() @ torch.as_tensor(weight[e], device=x.device)
        if bias[e] is not None:
            y = y + torch.as_tensor(bias[e], device=x.device)
        return y * w[tok, slot].double().unsqueeze(1)

    # the routed sum; each expert's share is computed again when it is refitted (one expert's tokens at a time:
    # nothing of tokens x top-k x hidden is held)
    total = torch.zeros(pos.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for e, (tok, slot) in enumerate(hits):
        total.index_add_(0, tok, out(e, hidden(e, tok), tok, slot))
    for _ in range(EXPERT_REFIT_PASSES):
        for e, (tok, slot) in enumerate(hits):
            if tok.numel() == 0:  # no calibration token reaches it: its trained weights
                continue
            h = hidden(e, tok)
            share = out(e, h, tok, slot)
            we = w[tok, slot].double()
            rest = target[tok] - total[tok] + share
            stats = _Stats(units, x.shape[1], None, CV_FOLDS, device)
            stats.update(h, rest / we.unsqueeze(1), we.square(), folds[tok.cpu()])
            fit = stats.refit(np.arange(units), ridge.value, None if prior is None else prior[e], blk.experts_bias)
            weight[e], bias[e] = fit[0], fit[1]
            total.index_add_(0, tok, out(e, h, tok, slot) - share)
    down = (torch.stack([torch.as_tensor(m.T) for m in weight]),
            torch.stack([torch.as_tensor(v) for v in bias]) if blk.experts_bias else None)
    return down, total


def _columns(weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return weight[:, cols.to(weight.device)]


def _stage_job(problem: _Problem | None, groups: list[np.ndarray] | None, has_bias: bool, k: int,
               chosen: np.ndarray | None, reweight: bool, ridge: _Ridge, rule: str,
               weight: np.ndarray | None, parts: np.ndarray | None = None) -> tuple[np.ndarray, tuple | None, float]:
    """The numerical work of one stage: the greedy selection of ``k`` units (unless ``chosen`` is given; with
    ``parts``, a part label per unit, as many from each part: greedy under a partition matroid) and the
    refit toward ``weight`` (the consumer's original weights, ``(out, in)``, or ``None`` for ordinary ridge).
    Returns the kept units (sorted), :meth:`_Problem.refit`'s result (``None`` without ``reweight``) and the
    seconds it took.

    A module-level function of picklable arguments, so that it can run on any executor (see
    :mod:`nn_adapters._executor`).
    """
    t0 = time.perf_counter()
    f = None
    if problem is not None and (reweight or chosen is None):
        f = problem.objective(ridge.selection, groups, has_bias)
    if chosen is None:
        constraint = None if parts is None else PartitionMatroid(parts, k // (int(parts.max()) + 1))
        chosen = np.asarray(f.greedy_path(k, rule=rule, constraint=constraint).selected[:k], dtype=np.int64)
    kept = np.sort(chosen)
    fit = None
    if reweight:
        cols = f.columns_of(kept)
        fit = problem.refit(cols, ridge.value, None if weight is None else weight[:, cols].T, has_bias)
    return kept, fit, time.perf_counter() - t0


def _sync_expert_counts(model: nn.Module, before: set[int]) -> None:
    """Where every mixture of ``model`` had ``before`` experts and now has the same smaller number, the model's
    own count of experts outside the mixtures follows (:func:`~nn_adapters._experts.sync_expert_count`: what the
    load-balancing loss of training with ``output_router_logits=True`` reads). Mixtures left with different numbers
    (``allocation="error-curve"``) leave it as it was: that loss concatenates the layers' router logits, which then
    have different widths, so it cannot be computed."""
    moe = [b for b in find_blocks(model) if b.moe]
    after = {b.n_experts for b in moe}
    if len(before) == 1 and len(after) == 1 and after != before:
        sync_expert_count(model, [b.module for b in moe], next(iter(before)), next(iter(after)))


def _n_params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------------
# saving and loading
# ----------------------------------------------------------------------------------------------------------------

def make_spec(model: nn.Module) -> dict[str, Any]:
    """The per-block sizes of a (pruned) model: what :func:`load_pruned` applies to a freshly built model."""
    blocks = [b.spec() for b in find_blocks(model)]
    version = 2 if any("num_key_value_groups" in b for b in blocks) else 1
    spec: dict[str, Any] = {"format": _SPEC_FORMAT, "version": version, "blocks": blocks}
    impl = attn_implementation_of(model)  # config.json does not keep it: without it a reload gets the default
    if impl is not None:
        spec["attn_implementation"] = impl
    return spec


_SPEC_KEYS = ("name", "kind", "intermediate_size", "num_heads", "head_dim")
#: What a block's spec may record besides its sizes that the weights' shapes do not show (absent from older specs).
_LAYOUT_KEYS = ("norm_first", "batch_first", "activation")


def apply_spec(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Shrink a freshly built model, in place, to the block sizes of ``spec`` (weights are left to be loaded).

    Refused with a ``ValueError``: a spec that is not one :func:`make_spec` writes, and a model whose blocks do not
    match it (other names, kinds or head widths, fewer units than the spec keeps, or, for
    :class:`torch.nn.TransformerEncoderLayer`, another ``norm_first``, ``batch_first`` or ReLU/GELU activation:
    differences the weights' shapes do not show).
    """
    blocks_ok = isinstance(spec, Mapping) and isinstance(spec.get("blocks"), list) and all(
        isinstance(w, Mapping) and all(k in w for k in _SPEC_KEYS)
        and all(isinstance(w[k], int) and not isinstance(w[k], bool) for k in _SPEC_KEYS[2:])
        for w in spec["blocks"])
    if not isinstance(spec, Mapping) or spec.get("format") != _SPEC_FORMAT:
        what = spec.get("format") if isinstance(spec, Mapping) else type(spec).__name__
        raise ValueError(f"not a pruning spec (format {what!r}); expected {_SPEC_FORMAT!r}, as save_pruned writes")
    if not isinstance(spec.get("version"), int) or spec["version"] > _SPEC_VERSION:
        raise ValueError(f"pruning spec version {spec.get('version')!r}: this release reads versions 1 to "
                         f"{_SPEC_VERSION}; load it with the release that saved it")
    if not blocks_ok:
        raise ValueError(f"damaged pruning spec: it must list blocks, each with {', '.join(_SPEC_KEYS[:2])} and "
                         f"integer {', '.join(_SPEC_KEYS[2:])}")
    blocks = find_blocks(model)
    wanted = spec["blocks"]
    if [b.name for b in blocks] != [w["name"] for w in wanted]:
        raise ValueError(f"the model's blocks {[b.name for b in blocks]} do not match the spec's "
                         f"{[w['name'] for w in wanted]}: build the same architecture as the pruned model's origin")
    origin = "pass an unpruned instance of the pruned model's origin (the same configuration)"
    for b, w in zip(blocks, wanted, strict=True):
        if w["kind"] != b.kind or w["head_dim"] != b.head_dim:
            raise ValueError(f"block {b.name}: spec kind/head_dim {w['kind']}/{w['head_dim']} do not match "
                             f"the model's {b.kind}/{b.head_dim}: {origin}")
        for key, have in (("intermediate_size", b.ffn_units), ("num_heads", b.num_heads)):
            if not (1 <= w[key] <= have or w[key] == have == 0):  # 0: a block without attention
                raise ValueError(f"block {b.name}: the spec has {key}={w[key]}, the model's block {have}; a pruned "
                                 f"block keeps between 1 and all of its units: {origin}")
        for key, have in b.spec().items():
            if key in _LAYOUT_KEYS and key in w and w[key] != have:
                raise ValueError(f"block {b.name}: saved with {key}={w[key]!r}, the model's block has {have!r}: "
                                 f"{origin}")
        problem = b.extra_sizes_problem(w)
        if problem is not None:
            raise ValueError(f"block {b.name}: {problem}: {origin}")
    experts_before = {b.n_experts for b in blocks if b.moe}
    with torch.no_grad():
        for b, w in zip(blocks, wanted, strict=True):
            b.plan_sizes(w)
            b.set_sizes(int(w["intermediate_size"]), int(w["num_heads"]))
            b.set_extra_sizes(w)
    _sync_expert_counts(model, experts_before)
    disable_nested_fast_path(model)
    return model


def save_pruned(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save a pruned transformer: its weights and a JSON spec of the per-block sizes.

    Hugging Face models are written with ``save_pretrained`` (``config.json`` + ``model.safetensors``); other
    models as a state dict (``weights.pt``, read back with ``torch.load(weights_only=True)``, no arbitrary
    pickle). The spec (``submod_pruning.json``) lists each block's intermediate size and number of heads. The
    directory is written under a temporary name and renamed into place, so nothing half-written is left. A model
    wrapped by ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` is saved as the model it wraps
    (the names :func:`load_pruned` rebuilds; wrap the loaded model again).

    Parameters
    ----------
    model : torch.nn.Module
        The pruned model (or a wrapper of it).
    directory : path-like
        A new or empty directory.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Examples
    --------
    >>> import tempfile, torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    >>> small, _ = prune_transformer(layer, [torch.randn(4, 5, 8)], keep=0.5, target="all")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_pruned(small, d + "/m")
    ...     fresh = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    ...     back = load_pruned(d + "/m", fresh)
    >>> back.linear1.out_features, back.self_attn.num_heads
    (8, 1)
    """
    model = unwrap(model)  # a wrapper's prefix (_orig_mod., module.) would not match the model load_pruned builds
    with atomic_dir(directory) as tmp:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            # transformers 5 renames some models' weights back to their legacy names on saving (ViT's
            # attention.q_proj -> attention.attention.query) unless told not to; load_pruned reads the module names
            own_names = "save_original_format" in inspect.signature(model.save_pretrained).parameters
            model.save_pretrained(tmp, **({"save_original_format": False} if own_names else {}))
        else:
            torch.save(model.state_dict(), tmp / "weights.pt")
        (tmp / SPEC_FILE).write_text(json.dumps(make_spec(model), indent=1))
    return Path(directory)


def load_pruned(directory: str | os.PathLike[str], model: nn.Module | None = None, *,
                attn_implementation: str | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`.

    ``model``: an unpruned instance of the original architecture (required for plain torch models; for Hugging
    Face models it is built from ``config.json`` when omitted, and optional top-level parts absent from the saved
    weights, such as the pooler of ``BertModel(add_pooling_layer=False)``, are set to ``None``). It is copied,
    never modified (the original trained model may be passed). The copy, or the build from ``config.json``, has
    parameters that are shapes only (``meta`` tensors: no memory, no random initialisation; its buffers are real,
    copied or computed as usual); it is shrunk to the saved sizes (``apply_spec``) and then receives the saved
    tensors (strict: every tensor must match; tied weights are tied again), so the peak memory is about the saved
    weights. A construction or a block shrinking that reads weight values falls back to real weights (a full copy
    of ``model``, or a randomly initialised build). No arbitrary pickle is executed. A Hugging Face model gets
    back the attention implementation it was saved with
    (``"eager"``, ``"sdpa"``, ...: the spec records it, as ``config.json`` does not), unless
    ``attn_implementation`` names another. See :func:`save_pruned` for an example.

    Parameters
    ----------
    directory : path-like
        A directory written by :func:`save_pruned`.
    model : torch.nn.Module, optional
        An unpruned instance of the original architecture (copied, not modified).
    attn_implementation : str, optional
        Hugging Face models: the attention implementation of the loaded model. Default: the saved model's,
        whatever ``model`` was built with.

    Returns
    -------
    torch.nn.Module
        A new model with the saved sizes and weights, in eval mode.

    Raises
    ------
    ValueError
        A directory without a valid spec (not JSON, another format or a newer version, damaged entries), or a
        model that is not the pruned model's origin: other blocks, fewer units than the spec keeps, weights of
        other shapes, or (:class:`torch.nn.TransformerEncoderLayer`) another ``norm_first``, ``batch_first`` or
        ReLU/GELU activation, or (Hugging Face) a configuration that computes differently from the saved
        ``config.json`` (activation, normalisation epsilon, position embeddings, ...), or an attention
        implementation that cannot be used here (e.g. ``"flash_attention_2"`` without its package: pass another
        ``attn_implementation``).
    """
    src = Path(directory)
    spec_path = src / SPEC_FILE
    if not spec_path.is_file():
        raise ValueError(f"{src} has no {SPEC_FILE}: it was not written by save_pruned")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec_path} is not valid JSON ({exc}): it was not written by save_pruned, or it has "
                         "been damaged") from exc
    built_here = model is None
    saved_impl = spec.get("attn_implementation") if isinstance(spec, Mapping) else None  # apply_spec checks the rest
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an unpruned torch.nn.Module of the original architecture; got "
                             f"{type(model).__name__}")
        # the caller's instance (possibly the trained original) stays as it is; its weights are not copied: the
        # saved ones replace them (buffers are, as a fresh build would compute them)
        original, model = model, weightless_copy(model)
        rebuild: Callable[[], nn.Module] | None = partial(copy.deepcopy, original)
        _check_config(src, model)
    else:
        if not (src / "config.json").is_file():
            raise ValueError("pass model=<a freshly built instance of the original architecture> to load a plain "
                             "torch model")
        import transformers  # lazy: only Hugging Face models need it

        archs = json.loads((src / "config.json").read_text()).get("architectures") or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class from {src / 'config.json'}: pass model=")
        model_cls = getattr(transformers, archs[0])
        # the model's own config class: AutoConfig of transformers 4 does not know every model type (4.40 has no
        # "clip_text_model", which CLIPTextModel's config.json names)
        config = (getattr(model_cls, "config_class", None) or transformers.AutoConfig).from_pretrained(src)
        impl = attn_implementation if attn_implementation is not None else saved_impl
        if isinstance(impl, str):  # built with it: older transformers releases cannot switch a built model
            config._attn_implementation = impl
        try:
            model = _build_from_config(model_cls, config)
            # a weightless build that cannot be shrunk is built again with real weights below
            rebuild = partial(model_cls, config) if any(p.is_meta for p in model.parameters()) else None
        except (ImportError, ValueError) as exc:
            if not isinstance(impl, str):
                raise
            raise ValueError(f"building {archs[0]} with attn_implementation={impl!r} failed ({exc}): install what "
                             "it needs, or pass another attn_implementation= ('sdpa' or 'eager').") from exc
    restore_attn_implementation(model, saved_impl, attn_implementation, spec_path)
    try:
        apply_spec(model, spec)
    except (NotImplementedError, RuntimeError):  # a block whose shrinking reads weight values, not on meta tensors
        if rebuild is None:
            raise
        model = rebuild()  # (a block adapter whose resizing reads weight values): real weights, copied or built
        restore_attn_implementation(model, saved_impl, attn_implementation, spec_path)
        apply_spec(model, spec)
    if (src / "weights.pt").is_file():
        state = torch.load(src / "weights.pt", weights_only=True, map_location="cpu")
    else:
        from safetensors.torch import load_file

        state = {}
        for fname in sorted(src.glob("*.safetensors")):
            state.update(load_file(fname))
    if built_here:
        # Optional top-level parts the saved model did not have (e.g. BertModel(add_pooling_layer=False) has no
        # pooler, which config.json does not record): drop them, as the saved model had them set to None. A part
        # whose weights are all tied to others (a causal LM's lm_head tied to the embeddings) is saved as those.
        fresh = list(model.state_dict())
        tied_fresh = _tied_keys(model)
        for child, _ in list(model.named_children()):
            keys = [k for k in fresh if k.startswith(child + ".")]
            if keys and not any(k in state for k in keys) and not all(k in tied_fresh for k in keys):
                setattr(model, child, None)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # the saved precision (e.g. float64), not the default of a freshly built model
        model.to(dtypes.pop())
    weightless = any(p.is_meta for p in model.parameters())
    if weightless:  # the saved tensors become the parameters (in the model's dtypes, as a copy into them would be)
        ties = tie_groups(model)
        own = model.state_dict(keep_vars=True)
        state = {k: t.to(own[k].dtype) if k in own else t for k, t in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=weightless)
    except RuntimeError as exc:  # tensors of other shapes: another model width, vocabulary, ...
        raise ValueError(f"saved weights do not fit the model: {exc}. Pass an unpruned instance of the pruned "
                         "model's origin (the same configuration).") from exc
    if weightless:
        tie_again(ties)
    tied = _tied_keys(model)
    unrecorded = [k for k in missing if _is_kept_heads(model, k)]  # a save that predates the kept_heads buffer
    for k in unrecorded:  # the module does not know which original heads it kept: masks must be for its own heads
        model.get_submodule(k.rpartition(".")[0]).kept_heads = None
    missing = [k for k in missing if k not in tied and k not in unrecorded]
    if missing or unexpected:
        raise ValueError(f"saved weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise ValueError(f"saved weights do not fit the model: nothing was loaded into {empty[:5]}. Pass an "
                         "unpruned instance of the pruned model's origin (the same configuration).")
    return model.eval()


#: The Hugging Face configuration entries that may hold each size of a block's spec (:func:`make_spec`), by the
#: spec's name: the ones of a model's configuration that hold the unpruned size are given the pruned one.
_CONFIG_SIZE_KEYS = {
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
                          "moe_intermediate_size", "ffn_hidden_size", "hidden_dim"),
    "num_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                  "decoder_attention_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "shared_intermediate_size": ("shared_expert_intermediate_size",),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}
#: Entries that may be ``None`` in a configuration, meaning a size derived from others (GPT-2's ``n_inner``: 4 x
#: the width): given the pruned size when no entry holds the unpruned one.
_DERIVED_SIZE_KEYS = {"intermediate_size": ("n_inner",)}


def export_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                      example_inputs: Mapping[str, Any] | None = None) -> Path:
    """Save a pruned Hugging Face model as a standard checkpoint that ``from_pretrained`` reads, when its
    configuration can express the pruned sizes.

    :func:`save_pruned` keeps the unpruned ``config.json`` and a spec of per-block sizes that only
    :func:`load_pruned` reads, since blocks may keep different numbers of units. When every block that had a size
    keeps the same pruned size (a uniform ``keep=``, as in most published pruned checkpoints), the configuration can
    say so instead: this writes the weights (``save_pretrained``) with a ``config.json`` whose entries that held the
    unpruned sizes hold the pruned ones (``intermediate_size`` or its model's name for it: ``n_inner``, ``ffn_dim``,
    ``d_ff``, ``encoder_ffn_dim``...; ``num_attention_heads`` and ``num_key_value_heads`` or theirs; the experts'
    counts and sizes), so that ``AutoModel.from_pretrained(directory)`` and the tools built on it load the pruned
    model as it is.

    Before the directory is moved into place, the export is checked by loading it the way a user would
    (``type(model).from_pretrained``): no weight may be missing, unexpected or of another shape; every weight must
    equal the pruned model's; every number the modules hold (head counts and dimensions, scalings, sizes) must be
    the pruned model's; and both models must give the same outputs on ``example_inputs`` (default: a batch of
    random token ids, images or waveforms built from the configuration, by the model's main input). Each check
    that fails is a ``ValueError`` naming what differs, and nothing is left on disk. That load costs the pruned
    model's memory once more. Optional parts the model was built without (the pooler of
    ``BertModel(add_pooling_layer=False)``) are not recorded by the config: load with the same argument.

    Parameters
    ----------
    model : torch.nn.Module
        A pruned Hugging Face model (``transformers.PreTrainedModel``), or a wrapper of one.
    directory : path-like
        A new or empty directory.
    example_inputs : mapping, optional
        Keyword arguments of the model's forward for the output comparison (e.g. one calibration batch); needed
        where no probe batch can be built (a model whose main input is not token ids, ``pixel_values`` or
        ``input_values``).

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    ValueError
        A model that is not a Hugging Face model; blocks that keep different numbers of units where their unpruned
        sizes were the same (non-uniform pruning: use :func:`save_pruned`); a configuration with no entry for a
        pruned size, or whose model computes sizes its own way (BERT derives the head width from the model width
        and head count, so its heads cannot be pruned in a standard checkpoint; FFN sizes can); a per-block record
        the standard model has no place for (MPNet's kept heads); any failed check above.

    Examples
    --------
    >>> import tempfile, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    >>> small, _ = prune_transformer(model, [{"input_ids": ids}], keep=0.5, target="all", method="magnitude")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = export_pretrained(small, d + "/llama-half")
    ...     back = transformers.AutoModelForCausalLM.from_pretrained(d + "/llama-half")
    >>> back.config.intermediate_size, back.config.num_attention_heads, back.config.num_key_value_heads
    (24, 2, 1)
    """
    model = unwrap(model)
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config") and hasattr(model, "from_pretrained")):
        raise ValueError(f"export_pretrained writes Hugging Face checkpoints; {type(model).__name__} is not a "
                         "transformers model: save it with save_pruned and load it with load_pruned")
    if example_inputs is not None and not isinstance(example_inputs, Mapping):
        raise ValueError(f"example_inputs must be a mapping of the model's forward arguments (e.g. one calibration "
                         f"batch, {{'input_ids': ..., 'attention_mask': ...}}); got {type(example_inputs).__name__}")
    changes = _pruned_config_entries(model)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        config = copy.deepcopy(model.config)  # (save_pretrained has recorded the architecture in it)
        for key, value in changes.items():
            setattr(config, key, value)
        config.save_pretrained(tmp)
        _check_export(model, tmp, example_inputs)
    return Path(directory)


def _pruned_config_entries(model: nn.Module) -> dict[str, int]:
    """The configuration entries of ``model`` (a pruned Hugging Face model, whose ``config`` still holds the unpruned
    sizes) that must change for its architecture to be built at the pruned sizes, with their new values."""
    before = {b["name"]: b for b in make_spec(_build_from_config(type(model), model.config))["blocks"]}
    after = make_spec(model)["blocks"]
    sizes: dict[str, dict[int, dict[int, list[str]]]] = {}  # quantity -> unpruned size -> pruned size -> blocks
    for block in after:
        was = before.get(block["name"])
        if was is None:
            raise ValueError(f"block {block['name']} is not a block of the architecture its config builds: the "
                             "model's structure was changed beyond pruning; save it with save_pruned")
        for key in _CONFIG_SIZE_KEYS:
            if key in block and key in was and block[key] != was[key]:
                sizes.setdefault(key, {}).setdefault(int(was[key]), {}).setdefault(int(block[key]), []).append(
                    block["name"])
    config, changes = model.config, {}
    for key, by_size in sizes.items():
        for old, new in by_size.items():
            if len(new) > 1:
                kept = "; ".join(f"{n} in {', '.join(blocks[:3])}{'...' if len(blocks) > 3 else ''}"
                                 for n, blocks in sorted(new.items()))
                raise ValueError(f"blocks with {key}={old} keep different sizes ({kept}): a config has one "
                                 "size for all of them. Prune with a uniform keep= (allocation='uniform'), or save "
                                 "with save_pruned and load with load_pruned")
            (value,) = new
            entries = [k for k in _CONFIG_SIZE_KEYS[key] if getattr(config, k, None) == old
                       and not isinstance(getattr(config, k), bool)]
            entries = entries or [k for k in _DERIVED_SIZE_KEYS.get(key, ()) if hasattr(config, k)
                                  and getattr(config, k) is None]
            if not entries:
                raise ValueError(f"{type(config).__name__} has no entry that holds {key}={old} (looked for "
                                 f"{', '.join(_CONFIG_SIZE_KEYS[key])}): the pruned size cannot be written in a "
                                 "standard config. Save with save_pruned and load with load_pruned")
            for k in entries:
                if changes.get(k, value) != value:
                    raise ValueError(f"the config entry {k} would need two values ({changes[k]} and {value}): save "
                                     "with save_pruned and load with load_pruned")
                changes[k] = value
    head_dims = {int(b["head_dim"]) for b in after if "head_dim" in b}
    if "num_heads" in sizes and len(head_dims) == 1 and getattr(config, "head_dim", None) is None:
        # a model that derives the head width from the width and the head count unless the config states it (Phi-3):
        # state it (a model that ignores it is refused by the checks of the export)
        changes["head_dim"] = head_dims.pop()
    return changes


def _check_export(model: nn.Module, directory: Path, example_inputs: Mapping[str, Any] | None) -> None:
    """Load ``directory`` as a user would and refuse (``ValueError``) anything that is not ``model``: weights
    missing, unexpected, of other shapes or values; other numbers held by the modules; other outputs."""
    import transformers

    why = ("the standard config cannot express this pruned model (a model that derives its head width from the model "
           "width and head count, as BERT, GPT-2 and BART do, cannot be given fewer heads of the same width in its "
           "config: prune target='ffn' for a standard checkpoint); save it with save_pruned and load it with "
           "load_pruned")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the loading report of a failed check is the error raised here
    try:
        impl = attn_implementation_of(model)
        loaded, info = type(model).from_pretrained(directory, output_loading_info=True, ignore_mismatched_sizes=True,
                                                   **({"attn_implementation": impl} if impl else {}))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the exported checkpoint does not load ({exc}): {why}") from exc
    finally:
        transformers.logging.set_verbosity(level)
    # optional top-level parts the pruned model was built without (BertModel(add_pooling_layer=False)): the config
    # does not record that, the user passes the same argument to from_pretrained
    missing = list(info.get("missing_keys", ()))
    info = {**info, "missing_keys": [k for k in missing if getattr(model, k.split(".")[0], 0) is not None]}
    problems = {k: sorted(map(_loading_entry, v)) for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:4])}{', ...' if len(v) > 4 else ''}"
                         for k, v in problems.items())
        raise ValueError(f"loading the exported checkpoint with from_pretrained reports {what}: {why}")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    loaded = (loaded.to(dtypes.pop()) if len(dtypes) == 1 else loaded).eval()
    have, want = loaded.state_dict(), model.state_dict()
    differ = [k for k, t in want.items() if k not in have or have[k].shape != t.shape or not torch.equal(have[k], t)]
    if differ:
        raise ValueError(f"the exported checkpoint loads other weights for {differ[:4]}: {why}")
    numbers = _module_numbers(loaded)
    differ = [f"{name} ({mine!r} pruned, {numbers.get(name)!r} loaded)" for name, mine in _module_numbers(model).items()
              if numbers.get(name, mine) != mine]
    if differ:
        raise ValueError(f"the exported checkpoint builds modules that hold other numbers: {', '.join(differ[:4])}: "
                         f"{why}")
    inputs = dict(example_inputs) if example_inputs is not None else _probe_inputs(model)
    with torch.no_grad(), eval_mode(model):  # (dropout off; every module's own mode given back)
        try:
            want_out = _first_tensor(model(**inputs))
        except Exception as exc:  # noqa: BLE001 - any failure: the probe batch does not fit this model
            raise ValueError(f"the pruned model does not run on the probe batch ({type(exc).__name__}: {exc}): pass "
                             "example_inputs= (keyword arguments of its forward, e.g. one calibration batch)") from exc
        got = _first_tensor(loaded(**inputs))
    if want_out is None:
        raise ValueError("the model's output holds no tensor first (logits or hidden states) to compare")
    eps = torch.finfo(want_out.dtype).eps if want_out.is_floating_point() else 0.0
    tol = 64 * eps * (1.0 + float(want_out.abs().max())) if want_out.numel() else 0.0
    if got is None or got.shape != want_out.shape or not torch.allclose(got, want_out, rtol=0.0, atol=tol,
                                                                        equal_nan=True):
        raise ValueError(f"the exported checkpoint computes other outputs than the pruned model: {why}")


def _loading_entry(entry: Any) -> str:
    """One entry of ``from_pretrained``'s loading report: a weight's name, or (name, saved shape, built shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        return f"{entry[0]} (saved {list(entry[1])}, built {list(entry[2])})"
    return str(entry)


def _module_numbers(model: nn.Module) -> dict[str, Any]:
    """Every public number, flag or tuple of numbers that a module of ``model`` holds as an attribute (head counts,
    head dimensions, scalings, sizes), by ``module.attribute``; the train/eval flag aside."""
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, (bool, int, float)) or (
                    isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)):
                out[f"{name}.{key}" if name else key] = value
    return out


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch for ``model``'s forward, built from its configuration by its main input: token ids (and
    decoder token ids for an encoder-decoder), images or waveforms; ``ValueError`` for other inputs."""
    config, main = model.config, getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab < 2:
            raise ValueError("the model's config has no vocabulary size for a probe batch: pass example_inputs=")
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids[:, :6]
        return out
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return {"pixel_values": torch.randn(2, int(getattr(config, "num_channels", 3)), h, w, generator=gen)}
    if main == "input_values":
        return {"input_values": torch.randn(2, 4000, generator=gen)}
    raise ValueError(f"no probe batch can be built for a model whose main input is {main!r}: pass example_inputs= "
                     "(keyword arguments of its forward, e.g. one calibration batch)")


#: Hugging Face configuration entries that change what a model computes without changing any weight's shape: a
#: model passed to :func:`load_pruned` must agree with the saved ``config.json`` on each that either records.
_COMPUTE_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation", "layer_norm_eps",
                 "layer_norm_epsilon", "rms_norm_eps", "norm_eps", "position_embedding_type", "rope_theta",
                 "rope_scaling", "is_decoder", "pre_norm", "sinusoidal_pos_embds", "qkv_bias", "scale_embedding")


def _build_from_config(model_cls: type, config: Any) -> nn.Module:
    """``model_cls(config)`` with ``meta`` parameters (:func:`~nn_adapters._modes.meta_parameters`: no memory for
    the weights and no time spent initialising them, the buffers computed as usual); built with real, randomly
    initialised weights instead when that build fails or leaves a buffer on ``meta`` (a construction that reads
    parameter values)."""
    try:
        with meta_parameters():
            model = model_cls(config)
    except (NotImplementedError, RuntimeError):  # e.g. .item() of a meta tensor while initialising
        return model_cls(config)
    return model_cls(config) if any(b.is_meta for b in model.buffers()) else model


def _check_config(src: Path, model: nn.Module) -> None:
    """Refuse a Hugging Face ``model`` whose configuration computes differently from the saved ``config.json``
    (another activation, normalisation epsilon, position embedding...): the weights would load and the outputs
    would be wrong."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not (src / "config.json").is_file():
        return
    try:
        saved = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src / 'config.json'} is not valid JSON ({exc}): it has been damaged") from exc
    have = cfg.to_dict()
    differ = [(k, saved[k], have[k]) for k in _COMPUTE_KEYS if k in saved and k in have and saved[k] != have[k]]
    if differ:
        what = ", ".join(f"{k}={a!r} saved, {b!r} in the model" for k, a, b in differ)
        raise ValueError(f"the model's configuration differs from the saved one ({what}): it would load the weights "
                         "and compute something else. Pass an unpruned instance of the pruned model's origin, or "
                         "omit model= to build it from the saved config.json.")


def _is_kept_heads(model: nn.Module, key: str) -> bool:
    """Whether the state-dict ``key`` is the ``kept_heads`` buffer of a :class:`PrunedMultiheadAttention`."""
    owner, _, leaf = key.rpartition(".")
    return leaf == "kept_heads" and isinstance(model.get_submodule(owner), PrunedMultiheadAttention)


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier parameter (tied weights are saved once); ``meta``
    parameters, which have no storage, are tied when they are the same tensor."""
    seen: dict[tuple[bool, int], str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = (p.is_meta, id(p) if p.is_meta else p.data_ptr())
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied
