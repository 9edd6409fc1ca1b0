"""Calibration data: normalise a tensor or an iterable of batches into a list of (inputs, labels or None)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def _dict_batch_error(what: str, batch: Mapping, one: bool = False) -> ValueError:
    """The error for a dict batch given to the MLP/CNN path, which calls ``model(x)`` with one tensor (``one``:
    the whole calibration data is this one dict)."""
    keys = list(batch)
    tensors = [k for k in keys if isinstance(batch[k], torch.Tensor)]
    d, tail = ("data", "") if one else ("b", " for b in loader]")
    head = "" if one else "["
    example = (f"{head}({d}[{tensors[0]!r}], {d}[{tensors[1]!r}]){tail}" if len(tensors) >= 2
               else f"{head}{d}[{tensors[0]!r}]{tail}" if tensors else "[(inputs, labels), ...]")
    return ValueError(f"{what} is a dict (keys {keys}); MLP/CNN pruning calls model(inputs) with one tensor, so pass "
                      f"tensors or (inputs, labels) pairs, e.g. {example}. A model that takes keyword inputs and "
                      "holds transformer blocks is pruned with target='ffn', 'heads' or 'all' "
                      "(nn_adapters.transformer).")


def as_batches(data: object, device: torch.device | None = None, batch_size: int = 256,
               name: str = "calibration_data", dtype: torch.dtype | None = None) -> list[Batch]:
    """Return the calibration data as a list of ``(inputs, labels)`` batches (labels may be ``None``).

    ``data`` is a tensor of inputs (split into batches of ``batch_size``), a ``(inputs, labels)`` tuple of two
    tensors, or an iterable of batches, each a tensor or an ``(inputs, labels[, ...])`` tuple/list (a ``DataLoader``
    over a ``TensorDataset`` gives these); numpy arrays are accepted wherever a tensor is (copied). A tuple of two
    tensors of the same shape is ambiguous (two batches of inputs, or inputs with targets of their own shape) and is
    refused: pass a list of batches or ``[(inputs, targets)]``. The batches are materialised once (calibration sets
    are small by design; the sequential methods read them several times). Batches may differ in sample shape (the
    caller checks that the model runs on each); within a batch it is one tensor's. Floating inputs are cast to
    ``dtype`` when given (the model's: ``torch.from_numpy`` gives float64), integer inputs (token ids) are left as
    they are; inputs are checked to be finite after the cast.
    """
    if data is None:
        raise ValueError(f"{name} is None; pass a tensor of inputs or an iterable of batches (e.g. a DataLoader "
                         "over a few hundred unlabeled samples).")
    data = _from_numpy(data)
    if isinstance(data, tuple):
        data = tuple(_from_numpy(v) for v in data)
    pair = isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
    if pair and data[0].ndim >= 2 and data[0].shape == data[1].shape:
        raise ValueError(f"{name} is a tuple of two tensors of the same shape {tuple(data[0].shape)}: two batches "
                         "of inputs, or inputs and targets of the same shape? Pass a list for batches "
                         "([x1, x2]) or a list holding one labelled batch ([(inputs, targets)]).")
    if isinstance(data, Mapping):  # iterating it would give its keys
        raise _dict_batch_error(name, data, one=True)
    if isinstance(data, torch.Tensor):
        chunks = [(x, None) for x in torch.split(data, batch_size)] if data.shape[0] > 0 else []
    elif pair and data[0].ndim >= 2 and data[1].ndim >= 1 and data[0].shape[0] == data[1].shape[0]:
        chunks = list(zip(torch.split(data[0], batch_size), torch.split(data[1], batch_size), strict=True))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        chunks = []
        for i, item in enumerate(data):
            item = _from_numpy(item)
            if isinstance(item, (tuple, list)):
                item = type(item)(_from_numpy(v) for v in item)
            if isinstance(item, torch.Tensor):
                chunks.append((item, None))
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
                chunks.append((item[0], y))
            elif isinstance(item, Mapping):
                raise _dict_batch_error(f"batch {i} of {name}", item)
            else:
                raise ValueError(f"batch {i} of {name} is a {type(item).__name__}; each batch must be a tensor or "
                                 "an (inputs, labels) pair of tensors.")
    else:
        raise ValueError(f"{name} must be a tensor or an iterable of batches; got {type(data).__name__}.")
    out: list[Batch] = []
    for i, (x, y) in enumerate(chunks):
        if x.ndim == 0 or x.shape[0] == 0:
            continue
        if x.is_inference():  # made under torch.inference_mode: a normal copy, usable where gradients are needed
            x = x.clone()
        if y is not None and y.is_inference():
            y = y.clone()
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"batch {i} of {name} contains NaN or infinite inputs; clean the data first.")
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
            if not torch.isfinite(x).all():
                raise ValueError(f"batch {i} of {name} overflows the model's {dtype}; rescale the inputs.")
        if device is not None:
            x = x.to(device)
            y = y.to(device) if y is not None else None
        out.append((x, y))
    if not out:
        raise ValueError(f"{name} holds no samples; pass at least one batch (a few hundred samples is typical).")
    return out


def _from_numpy(v: object) -> object:
    """A numpy array as a tensor (a copy: the caller's array is never shared); anything else as it is."""
    if isinstance(v, np.ndarray):
        if v.dtype == object or not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
            raise ValueError(f"calibration arrays must be numeric; got a numpy array of dtype {v.dtype}.")
        return torch.tensor(v)
    return v


def float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (``None`` if it has none): what inputs are cast to."""
    return next((q.dtype for q in model.parameters() if q.is_floating_point()), None)


def n_samples(batches: list[Batch]) -> int:
    return int(sum(x.shape[0] for x, _ in batches))


class FoldDealer:
    """Deals calibration samples into ``n_folds`` cross-validation folds: distinct samples round-robin, in the
    order they are dealt, and a copy of a sample to the fold of its first occurrence.

    A copy in another fold would be its own held-out sample, so repeated calibration samples would make the
    held-out error look like the in-sample one and the cross-validated ridge reward interpolation. Samples are
    compared by their bytes, shape and dtype.

    Examples
    --------
    >>> import torch
    >>> dealer = FoldDealer(2)
    >>> a, b = torch.zeros(3), torch.ones(3)
    >>> [dealer.fold(t) for t in (a, b, a, torch.full((3,), 2.0))]
    [0, 1, 0, 0]
    """

    def __init__(self, n_folds: int) -> None:
        self.n_folds = n_folds
        self._first: dict[bytes, int] = {}

    def fold(self, sample: torch.Tensor) -> int:
        """The fold of ``sample`` (any dtype and device)."""
        t = sample.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # the bytes of any dtype, bfloat16 too
        key = hashlib.blake2b(raw + repr((tuple(t.shape), str(t.dtype))).encode(), digest_size=16).digest()
        return self._first.setdefault(key, len(self._first)) % self.n_folds


def sample_folds(batches: list[Batch], n_folds: int) -> list[np.ndarray]:
    """The cross-validation fold of every calibration sample, per batch, as a :class:`FoldDealer` deals them."""
    dealer = FoldDealer(n_folds)
    out = []
    for x, _ in batches:
        host = x.detach().cpu()
        out.append(np.array([dealer.fold(host[i]) for i in range(x.shape[0])], dtype=np.int64))
    return out
