"""Torch storage of :class:`submod.GramAccumulator`: the float64 statistics kept and updated on a torch device.

For a model on a GPU, copying every batch of activations to the host and forming ``A^T A`` there costs more than
the rest of pruning; this module keeps the running means and centred co-moments as float64 tensors on the batch's
device and applies the same pairwise (Chan, Golub & LeVeque) update as the numpy storage, with in-place ``addmm_``
and ``addr_`` so that no ``d x d`` temporary is made per batch and the peak memory does not depend on the number
of batches. Validation gives the numpy path's messages and costs one host synchronisation per batch (the sums that
prove the batch finite, fetched together with the weight sum).

It imports torch at import time and is imported only by an accumulator that keeps device storage, so that
``import submod`` never imports torch (torch is optional for :mod:`submod`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._validation import as_float_array, complex_message, ndim_message, nonfinite_message, width_message

F64 = torch.float64


def as_device(device: object) -> torch.device:
    """``device`` (a string or a :class:`torch.device`) as a :class:`torch.device`, with a clear error."""
    try:
        return torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu', 'cuda' or "
                         "torch.device('cuda:0'), or device=None for numpy storage on the host.") from exc


def non_cpu_device(*xs: object) -> torch.device | None:
    """The device of the first argument that is a torch tensor on a device other than the CPU, else ``None``."""
    for x in xs:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return None


def tensor_on(x: Any, dev: torch.device, copy: bool = False) -> torch.Tensor:
    """A float64 tensor on ``dev`` from a numpy array, a float or a tensor (a tensor already there is returned
    as it is unless ``copy``; numpy data are always copied)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=dev, dtype=F64, copy=copy)
    arr = np.asarray(x, dtype=np.float64)
    return torch.tensor(np.ascontiguousarray(arr) if arr.ndim else arr, dtype=F64, device=dev)


def state_to(dev: torch.device, ma: Any, my: Any, caa: Any, cay: Any, cyy: Any) -> tuple[torch.Tensor, ...]:
    """Private float64 tensors on ``dev`` holding the statistics ``(mean_a, mean_y, C_aa, C_ay, C_yy)``.

    Raises ``ValueError`` before anything is moved for a device that cannot hold them: the meta device (tensors
    without data: the statistics would be lost), a device torch was not built for, or one without float64
    (Apple's MPS, where torch raises ``TypeError``).
    """
    if dev.type == "meta":
        raise ValueError("cannot keep the statistics on the meta device: its tensors hold no data. Pass a device "
                         "that holds data (e.g. 'cpu', 'cuda') or device=None for numpy storage on the host.")
    try:
        return tuple(tensor_on(x, dev, copy=True) for x in (ma, my, caa, cay, cyy))
    except (RuntimeError, AssertionError, TypeError) as exc:  # "Torch not compiled with CUDA enabled", no float64
        raise ValueError(f"cannot keep the statistics on device {dev} ({exc}); pass an available device with "
                         "float64 (see torch.cuda.is_available()) or device=None for numpy storage on the "
                         "host.") from exc


def host_array(x: Any, name: str) -> Any:
    """A torch tensor as a numpy array on the host, for the checks of the numpy storage; other inputs as they are.

    The conversion goes through torch, so that every dtype torch has is taken (numpy has no bfloat16) and a tensor
    that requires grad is read without its graph, as torch storage does; complex tensors stay complex (and are
    refused by the checks with their usual message).
    """
    if not isinstance(x, torch.Tensor):
        return x
    try:
        t = x.detach().cpu()
        return (t if t.is_complex() else t.to(F64)).numpy()
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. a meta tensor: no data to copy
        raise ValueError(f"{name} is a tensor on device {x.device} with dtype {x.dtype} that cannot be read on "
                         f"the host ({exc}); pass a tensor that holds data (on the CPU or a GPU).") from exc


def to_host(t: torch.Tensor) -> np.ndarray:
    """A read-only float64 numpy copy of ``t`` (one device-to-host transfer)."""
    arr = t.detach().to("cpu", copy=True).numpy()
    arr.flags.writeable = False
    return arr


class _Checks:
    """The checks of :func:`submod._validation.as_float_array` on tensors, with the finiteness checks deferred.

    A finite sum proves every entry finite, so the sums of all inputs (and any extra scalars) are fetched in one
    host synchronisation by :meth:`finish`. An error found earlier first raises any pending finiteness error, so
    that the first error is the one the numpy path, which checks each input completely before the next, raises.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.pending: list[tuple[str, torch.Tensor]] = []

    def tensor(self, x: Any, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if isinstance(x, torch.Tensor):
            if x.is_complex():
                self.fail(complex_message(name))
            t = x.detach().to(device=self.dev, dtype=F64)
            if t.dim() not in allowed:
                self.fail(ndim_message(name, allowed, tuple(t.shape)))
            self.pending.append((name, t))
            return t
        try:
            arr = as_float_array(x, name, ndim)  # numpy input: checked completely on the host
        except ValueError:
            self.flush()
            raise
        return tensor_on(arr, self.dev)

    def flush(self) -> None:
        """Raise the first finiteness error among the pending tensors (extra synchronisations: error path)."""
        for name, t in self.pending:
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                raise ValueError(nonfinite_message(name, bad))
        self.pending.clear()

    def fail(self, message: str) -> None:
        self.flush()
        raise ValueError(message)

    def finish(self, *extra: torch.Tensor) -> list[float]:
        """Check the pending tensors and return the ``extra`` scalars, in one host synchronisation."""
        scalars = [t.sum() for _, t in self.pending] + list(extra)
        if not scalars:
            return []
        vals = torch.stack(scalars).tolist()
        k = len(self.pending)
        if not all(math.isfinite(v) for v in vals[:k]):
            self.flush()  # a non-finite sum of finite entries (overflow) passes, as in numpy
        self.pending.clear()
        return vals[k:]


def validate(acc: Any, A: Any, Y: Any, sample_weight: Any, width: int | None = None) -> tuple | None:
    """Checked float64 tensors on the accumulator's device, ``(a, y, w, rows, weight sum)``; ``None`` for an
    empty batch. The checks, their order and their messages are those of the numpy path (``width``: the columns
    of a block of ``update_blocks``)."""
    chk = _Checks(acc._device)
    a = chk.tensor(A, "A_batch", 2)
    y = chk.tensor(Y, "Y_batch", (1, 2))
    if y.dim() == 1:
        y = y[:, None]
    d, m = acc.n_features, acc.n_targets
    if width is not None and a.shape[1] != width:
        chk.fail(width_message(a.shape[1], width))
    if width is None and a.shape[1] != d:
        chk.fail(f"A_batch has {a.shape[1]} columns but the accumulator was built for n_features={d}; reshape "
                 f"the batch to (rows, {d}).")
    if y.shape[1] != m:
        chk.fail(f"Y_batch has {y.shape[1]} columns but the accumulator was built for n_targets={m}; reshape "
                 f"the batch to (rows, {m}).")
    if a.shape[0] != y.shape[0]:
        chk.fail(f"A_batch has {a.shape[0]} rows but Y_batch has {y.shape[0]}; pass matching rows.")
    nb = int(a.shape[0])
    if nb == 0:
        return None  # empty tensors are finite: nothing pending can fail
    if sample_weight is None:
        chk.finish()
        return a, y, None, nb, float(nb)
    w = chk.tensor(sample_weight, "sample_weight", 1)
    if w.shape[0] != nb:
        chk.fail(f"sample_weight has {w.shape[0]} entries but the batch has {nb} rows; pass one weight per row.")
    w_min, w_sum = chk.finish(w.min(), w.sum())
    if w_min < 0:
        raise ValueError("sample_weight must be non-negative (a weight per row of the least-squares problem).")
    return a, y, w, nb, w_sum


def add_rows(acc: Any, a: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, nb: int, wsum: float) -> None:
    """Add checked rows (float64 tensors on the accumulator's device; ``wsum``: the sum of ``w``, or ``nb``).

    No host synchronisation: everything the update branches on (``nb``, ``wsum``, the weight so far) is on the host.
    """
    if wsum <= 0.0:
        acc.count += nb  # rows of weight zero are seen but change no statistic
        return
    if w is None:
        ma, my = a.mean(dim=0), y.mean(dim=0)
        ac, yc = a - ma, y - my
    else:
        ma, my = (w @ a) / wsum, (w @ y) / wsum
        root = w.sqrt()[:, None]  # rows scaled by sqrt(w)
        ac, yc = (a - ma).mul_(root), (y - my).mul_(root)
    acc._caa.addmm_(ac.T, ac)  # C_aa += ac^T ac in place: no d x d temporary
    acc._cay.addmm_(ac.T, yc)
    yv = yc.reshape(-1)
    shift(acc, nb, wsum, ma, my, torch.dot(yv, yv))


def add_blocks(acc: Any, parts: list[tuple], nb: int, wsum: float) -> None:
    """Torch storage: add checked blocks in place, as ``GramAccumulator._add_blocks`` does for numpy storage (same
    formulas, on the accumulator's device; no host synchronisation)."""
    dev, d, m = acc._device, acc.n_features, acc.n_targets
    ma = torch.zeros(d, dtype=F64, device=dev)
    my = torch.zeros(m, dtype=F64, device=dev)
    live = []
    for cols, a, y, w, _, wp in parts:
        if wp > 0.0:
            mu, nu = (a.mean(dim=0), y.mean(dim=0)) if w is None else ((w @ a) / wp, (w @ y) / wp)
            idx = torch.as_tensor(cols, device=dev)
            ma.index_add_(0, idx, mu, alpha=wp)
            my.add_(nu, alpha=wp)
            live.append((idx, a, y, w, wp, mu, nu))
    ma /= wsum
    my /= wsum
    cyy = torch.zeros((), dtype=F64, device=dev)
    T = torch.empty(len(live), d, dtype=F64, device=dev)
    S = torch.empty(len(live), m, dtype=F64, device=dev)
    for j, (idx, a, y, w, wp, mu, nu) in enumerate(live):
        ac, yc = a - mu, y - nu
        da, dy = a - ma[idx], y - my
        if w is not None:
            root = w.sqrt()[:, None]
            ac, yc = ac.mul_(root), yc.mul_(root)
            da, dy = da.mul_(w[:, None]), dy.mul_(w[:, None])
        acc._caa.index_put_((idx[:, None], idx[None, :]), ac.T @ ac, accumulate=True)
        acc._cay.index_put_((idx,), ac.T @ yc, accumulate=True)
        yv = yc.reshape(-1)
        cyy += torch.dot(yv, yv)
        T[j] = ma * -wp
        T[j, idx] = da.sum(dim=0)
        S[j] = dy.sum(dim=0)
    scale = torch.tensor([p[4] for p in live], dtype=F64, device=dev).rsqrt()[:, None]
    T.mul_(scale)
    S.mul_(scale)
    acc._caa.addmm_(T.T, T)
    acc._cay.addmm_(T.T, S)
    sv = S.reshape(-1)
    shift(acc, nb, wsum, ma, my, cyy + torch.dot(sv, sv))


def merge(acc: Any, nb: int, wb: float, ma: Any, my: Any, caa: Any, cay: Any, cyy: Any) -> None:
    """Add the centred statistics of other rows (numpy arrays or tensors on any device)."""
    dev = acc._device
    acc._caa.add_(tensor_on(caa, dev))
    acc._cay.add_(tensor_on(cay, dev))
    shift(acc, nb, wb, tensor_on(ma, dev), tensor_on(my, dev), tensor_on(cyy, dev))


def shift(acc: Any, nb: int, wb: float, ma: torch.Tensor, my: torch.Tensor, cyy: torch.Tensor) -> None:
    """The pairwise update's corrections for the difference of the means, after the co-moments were added."""
    wa = acc.weight_sum
    wt = wa + wb
    da = ma - acc._ma
    dy = my - acc._my
    if wa > 0:
        f = wa * wb / wt
        acc._caa.addr_(da, da, alpha=f)  # in-place rank-1 corrections
        acc._cay.addr_(da, dy, alpha=f)
        acc._cyy += cyy + f * torch.dot(dy, dy)
    else:
        acc._cyy += cyy
    acc._ma.add_(da, alpha=wb / wt)
    acc._my.add_(dy, alpha=wb / wt)
    acc.count += nb
    acc.weight_sum = wt
