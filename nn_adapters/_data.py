"""Calibration data: normalise a tensor, a dict of keyword inputs or an iterable of batches into a list of
``(inputs, labels or None)``, where ``inputs`` is a tensor (``model(inputs)``) or a dict (``model(**inputs)``)."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

#: A batch's inputs: one tensor, called as ``model(inputs)``, or a dict of keyword inputs, ``model(**inputs)``.
Inputs = torch.Tensor | dict[str, object]
Batch = tuple[Inputs, torch.Tensor | None]

#: The values a dict batch may hold besides tensors: passed to every part of the batch as they are.
_CONSTANTS = (bool, int, float, complex, str, type(None))


def per_sample(value: object) -> bool:
    """Whether a value of a dict batch holds one entry per sample (a tensor with a dim 0), rather than a constant
    (a number, ``None``, a 0-dim tensor) passed as it is to every part of the batch."""
    return isinstance(value, torch.Tensor) and value.ndim >= 1


def batch_len(x: Inputs) -> int:
    """The number of samples of a batch's inputs: dim 0 of the tensor, or of every per-sample tensor of a dict."""
    if isinstance(x, Mapping):
        return next(int(v.shape[0]) for v in x.values() if per_sample(v))
    return int(x.shape[0])


def take(x: Inputs, index: slice | int | torch.Tensor) -> Inputs:
    """The samples ``index`` (a slice, an int: the first ``index`` samples, or an index tensor) of a batch's
    inputs: of the tensor, or of every per-sample tensor of a dict, the same samples of each (constants as they
    are)."""
    if isinstance(index, int):
        index = slice(0, index)
    if isinstance(x, Mapping):
        return {k: v[index] if per_sample(v) else v for k, v in x.items()}
    return x[index]


def call(model: nn.Module, x: Inputs) -> object:
    """``model(**x)`` for a dict of keyword inputs, ``model(x)`` for a tensor."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def sample_shape(x: Inputs) -> tuple:
    """What must agree between batches for their statistics to add up: the sample shape of the tensor, or
    ``(key, sample shape)`` of every per-sample tensor of a dict (a constant: ``(key, its type's name)``)."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]) if per_sample(v) else type(v).__name__) for k, v in x.items())
    return tuple(x.shape[1:])


def shape_text(x: Inputs) -> str:
    """The samples of a batch's inputs in words, for messages: ``"samples of shape (3, 8, 8)"``, or for a dict
    ``"inputs x: samples of shape (3, 8, 8) float32, t: samples of shape () int64"``."""
    if not isinstance(x, Mapping):
        return f"samples of shape {tuple(x.shape[1:])}"
    parts = [f"{k}: samples of shape {tuple(v.shape[1:])} {str(v.dtype).removeprefix('torch.')}" if per_sample(v)
             else f"{k}: {v!r}" for k, v in x.items()]
    return "inputs " + ", ".join(parts)


def _signature(model: nn.Module | None) -> inspect.Signature | None:
    if model is None:
        return None
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _dict_batch_error(what: str, batch: Mapping, model: nn.Module, unknown: list[str],
                      one: bool = False) -> ValueError:
    """The error for a dict batch whose keys are not all inputs of ``model.forward`` (``one``: the whole
    calibration data is this one dict): a dict is passed as ``model(**batch)``."""
    keys = list(batch)
    sig = _signature(model)
    names = [p.name for p in sig.parameters.values()] if sig is not None else []
    tensors = [k for k in keys if isinstance(batch[k], torch.Tensor)]
    inputs = [k for k in keys if k in names]
    d, tail = ("data", "") if one else ("b", " for b in loader]")
    head = "" if one else "["
    if inputs and len(tensors) > len(inputs):  # keyword inputs and a label: (dict, labels) pairs
        label = next(k for k in tensors if k not in inputs)
        example = f"{head}({{k: {d}[k] for k in {inputs!r}}}, {d}[{label!r}]){tail}"
    elif len(tensors) >= 2:
        example = f"{head}({d}[{tensors[0]!r}], {d}[{tensors[1]!r}]){tail}"
    else:
        example = f"{head}{d}[{tensors[0]!r}]{tail}" if tensors else "[(inputs, labels), ...]"
    return ValueError(f"{what} is a dict (keys {keys}), which is passed as model(**batch), and "
                      f"{type(model).__name__}.forward({', '.join(names)}) takes no input named "
                      f"{', '.join(map(repr, unknown))}; pass dicts of forward()'s inputs only ((dict, labels) pairs "
                      f"for labels), or tensors or (inputs, labels) pairs, e.g. {example}. A model that takes keyword "
                      "inputs and holds transformer blocks is pruned with target='ffn', 'heads' or 'all' "
                      "(nn_adapters.transformer).")


def _check_dict(what: str, batch: Mapping, model: nn.Module | None, one: bool = False) -> dict[str, object]:
    """A dict batch checked and copied (numpy arrays as tensors): string keys, tensors or constants as values,
    one number of samples for every per-sample tensor, and (with ``model``) the keys among ``model.forward``'s
    inputs, with every input that has no default."""
    out = {}
    for k, v in batch.items():
        if not isinstance(k, str):
            raise ValueError(f"{what} is a dict with the key {k!r}; a dict batch is passed as model(**batch), so its "
                             "keys must be the names (strings) of forward()'s inputs.")
        v = _from_numpy(v)
        if not isinstance(v, (torch.Tensor, *_CONSTANTS)):
            raise ValueError(f"{what}: input {k!r} is a {type(v).__name__}; a dict batch holds tensors (numpy "
                             "arrays), split along dim 0 with the samples, and numbers, strings or None, passed as "
                             "they are. Pass it as a tensor.")
        out[k] = v
    counts = {k: int(v.shape[0]) for k, v in out.items() if per_sample(v)}
    if not counts:
        raise ValueError(f"{what} is a dict (keys {list(out)}) without a tensor of samples; a dict batch holds the "
                         "model's keyword inputs, tensors whose dim 0 counts the samples.")
    if len(set(counts.values())) > 1:
        raise ValueError(f"{what} holds tensors of different numbers of samples ({counts}, dim 0 of each); every "
                         "tensor of a dict batch holds one entry per sample of the batch, in the same order.")
    sig = _signature(model)
    if sig is not None:
        params = list(sig.parameters.values())
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            unknown = [k for k in out if k not in named]
            if unknown:
                raise _dict_batch_error(what, out, model, unknown, one)
        for p in params:
            if p.default is inspect.Parameter.empty and p.name not in out and p.kind in (
                    p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                how = (" and cannot be passed by keyword (it is positional-only): wrap the model in a module whose "
                       "forward() takes it by name" if p.kind == p.POSITIONAL_ONLY else "; add it to every batch")
                raise ValueError(f"{what} gives no {p.name!r} (keys {list(out)}), an input of "
                                 f"{type(model).__name__}.forward({', '.join(sig.parameters)}) without a "
                                 f"default{how}.")
    return out


def _even_slices(n: int, batch_size: int) -> list[slice]:
    """``ceil(n / batch_size)`` consecutive slices of ``range(n)`` whose sizes differ by at most one (300 samples:
    150 and 150, not 256 and 44). A model whose traced graph fixed a decision on the batch size (diffusers'
    ``if x.shape[0] >= 64``) then sees the same decision in every batch of data given in one piece."""
    if n <= 0:
        return []
    k = -(-n // batch_size)
    base, extra = divmod(n, k)
    bounds = np.cumsum([0] + [base + 1] * extra + [base] * (k - extra))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def as_batches(data: object, device: torch.device | None = None, batch_size: int = 256,
               name: str = "calibration_data", dtype: torch.dtype | None = None,
               model: nn.Module | None = None) -> list[Batch]:
    """Return the calibration data as a list of ``(inputs, labels)`` batches (labels may be ``None``).

    ``data`` is a tensor of inputs (split into ``ceil(n / batch_size)`` batches whose sizes differ by at most one
    sample), a ``(inputs, labels)`` tuple of two
    tensors, or an iterable of batches, each a tensor or an ``(inputs, labels[, ...])`` tuple/list (a ``DataLoader``
    over a ``TensorDataset`` gives these); numpy arrays are accepted wherever a tensor is (copied). A tuple of two
    tensors of the same shape is ambiguous (two batches of inputs, or inputs with targets of their own shape) and is
    refused: pass a list of batches or ``[(inputs, targets)]``. The batches are materialised once (calibration sets
    are small by design; the sequential methods read them several times). Batches may differ in sample shape (the
    caller checks that the model runs on each); within a batch it is one tensor's. Floating inputs are cast to
    ``dtype`` when given (the model's: ``torch.from_numpy`` gives float64), integer inputs (token ids) are left as
    they are; inputs are checked to be finite after the cast.

    Inputs may also be dicts of keyword inputs, passed as ``model(**inputs)`` (a model with several inputs, a
    diffusion U-Net's ``forward(x, t)``): one dict for the whole data (split as a tensor is), a ``(dict, labels)``
    tuple, or batches that are dicts or ``(dict, labels)`` pairs. A dict holds tensors whose dim 0 counts the
    samples, one number of samples for all of them (every split takes the same samples of each), and constants
    (numbers, strings, ``None``, 0-dim tensors) passed as they are; every batch has the same keys. Its tensors are
    cast, moved and checked as a tensor batch is. With ``model``, the keys must be inputs of ``model.forward`` and
    include every input without a default.
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
    labelled_dict = (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Mapping)
                     and isinstance(data[1], torch.Tensor))
    if isinstance(data, Mapping) or labelled_dict:  # iterating it would give its keys, or the dict then the labels
        inputs = _check_dict(name, data[0] if labelled_dict else data, model, one=True)
        n = batch_len(inputs)
        y = data[1] if labelled_dict else None
        if y is not None and (y.ndim == 0 or y.shape[0] != n):
            raise ValueError(f"{name} is a (dict, labels) tuple with {n} samples of inputs and labels of shape "
                             f"{tuple(y.shape)}; pass one label per sample (dim 0).")
        chunks = [(take(inputs, s), None if y is None else y[s]) for s in _even_slices(n, batch_size)]
    elif isinstance(data, torch.Tensor):
        chunks = [(data[s], None) for s in _even_slices(data.shape[0], batch_size)]
    elif pair and data[0].ndim >= 2 and data[1].ndim >= 1 and data[0].shape[0] == data[1].shape[0]:
        chunks = [(data[0][s], data[1][s]) for s in _even_slices(data[0].shape[0], batch_size)]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        chunks = []
        for i, item in enumerate(data):
            item = _from_numpy(item)
            if isinstance(item, (tuple, list)):
                item = type(item)(_from_numpy(v) for v in item)
            if isinstance(item, torch.Tensor):
                chunks.append((item, None))
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], (torch.Tensor, Mapping)):
                x = _check_dict(f"batch {i} of {name}", item[0], model) if isinstance(item[0], Mapping) else item[0]
                y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
                chunks.append((x, y))
            elif isinstance(item, Mapping):
                chunks.append((_check_dict(f"batch {i} of {name}", item, model), None))
            else:
                raise ValueError(f"batch {i} of {name} is a {type(item).__name__}; each batch must be a tensor, an "
                                 "(inputs, labels) pair of tensors, or a dict of keyword inputs (model(**batch)).")
    else:
        raise ValueError(f"{name} must be a tensor or an iterable of batches; got {type(data).__name__}.")
    out: list[Batch] = []
    for i, (x, y) in enumerate(chunks):
        if isinstance(x, Mapping):
            if batch_len(x) == 0:
                continue
            if y is not None and (y.ndim == 0 or y.shape[0] != batch_len(x)):
                raise ValueError(f"batch {i} of {name} has {batch_len(x)} samples of inputs and labels of shape "
                                 f"{tuple(y.shape)}; pass one label per sample (dim 0).")
            x = {k: _prepared(v, i, name, dtype, device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        else:
            if x.ndim == 0 or x.shape[0] == 0:
                continue
            x = _prepared(x, i, name, dtype, device)
        if y is not None and y.is_inference():
            y = y.clone()
        if device is not None and y is not None:
            y = y.to(device)
        out.append((x, y))
    if not out:
        raise ValueError(f"{name} holds no samples; pass at least one batch (a few hundred samples is typical).")
    _check_same_form(out, name)
    return out


def _prepared(x: torch.Tensor, i: int, name: str, dtype: torch.dtype | None,
              device: torch.device | None) -> torch.Tensor:
    """One input tensor of batch ``i``: a normal copy if made under inference mode, checked finite, floating
    values cast to ``dtype``, moved to ``device``."""
    if x.is_inference():  # made under torch.inference_mode: a normal copy, usable where gradients are needed
        x = x.clone()
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"batch {i} of {name} contains NaN or infinite inputs; clean the data first.")
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
        if not torch.isfinite(x).all():
            raise ValueError(f"batch {i} of {name} overflows the model's {dtype}; rescale the inputs.")
    if device is not None:
        x = x.to(device)
    return x


def _check_same_form(batches: list[Batch], name: str) -> None:
    """Refuse batches that mix tensors and dicts, or dicts with different keys: the model is traced and checked
    once, for the first batch's inputs."""
    first = batches[0][0]
    for i, (x, _) in enumerate(batches[1:], start=1):
        if isinstance(x, Mapping) != isinstance(first, Mapping):
            kinds = ["a dict of keyword inputs" if isinstance(v, Mapping) else "a tensor" for v in (x, first)]
            raise ValueError(f"batch {i} of {name} is {kinds[0]} and batch 0 {kinds[1]}; pass every batch in one "
                             "form.")
        if isinstance(x, Mapping) and list(x) != list(first):
            raise ValueError(f"batch {i} of {name} has the keys {list(x)} and batch 0 {list(first)}; every dict "
                             "batch gives the same inputs, in the same order.")


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
    return int(sum(batch_len(x) for x, _ in batches))


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

    def fold(self, sample: torch.Tensor | Mapping[str, object]) -> int:
        """The fold of ``sample`` (any dtype and device), or of a sample of keyword inputs: a dict of its rows of
        a dict batch's tensors (and its constants), compared as the whole (the same image at another timestep is
        another sample)."""
        if isinstance(sample, Mapping):
            raw = b"".join(repr(k).encode() + (_bytes(v) if isinstance(v, torch.Tensor) else repr(v).encode())
                           for k, v in sample.items())
        else:
            raw = _bytes(sample)
        key = hashlib.blake2b(raw, digest_size=16).digest()
        return self._first.setdefault(key, len(self._first)) % self.n_folds


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes (any dtype, bfloat16 too), shape and dtype."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() + repr((tuple(t.shape), str(t.dtype))).encode()


def sample_folds(batches: list[Batch], n_folds: int) -> list[np.ndarray]:
    """The cross-validation fold of every calibration sample, per batch, as a :class:`FoldDealer` deals them (a
    dict batch's sample ``i`` is row ``i`` of each of its tensors, with its constants)."""
    dealer = FoldDealer(n_folds)
    out = []
    for x, _ in batches:
        if isinstance(x, Mapping):
            host = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
            rows = [{k: v[i] if per_sample(v) else v for k, v in host.items()} for i in range(batch_len(x))]
        else:
            host = x.detach().cpu()
            rows = [host[i] for i in range(x.shape[0])]
        out.append(np.array([dealer.fold(r) for r in rows], dtype=np.int64))
    return out
