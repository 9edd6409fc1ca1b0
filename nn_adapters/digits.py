"""The scikit-learn digits data set and the small CNN trained on it for ``submod demo`` (cached on disk).

The data ship with scikit-learn (1797 8x8 grey images, no download). The split is fixed (stratified 80/20, seed
0); pixels are scaled to [0, 1]. Training takes a few seconds on one CPU core; the trained weights are cached in
``$SUBMOD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/submod`` or ``~/.cache/submod``), written atomically with
:func:`nn_adapters.save_pruned`, and reloaded safely with ``torch.load(weights_only=True)``. The training loop
(:func:`train_classifier`) and the cache (:func:`cached_model`) serve the MNIST-1D benchmark's zoo model too.

Training runs in float64 so that the trained network, and every result measured on it, is the same on any machine:
in float32 the rounding of a convolution or a reduction depends on the CPU's vector instructions and on the number
of threads, and 30 epochs of training amplify those last-bit differences into a visibly different network (trained
in float32 on 1 and on 2 threads of one machine, the digits CNN kept 85.8% and 86.1% test accuracy after the same
magnitude pruning at 2x, 54.4% and 55.6% at 4x). In float64 the networks trained on 1 or 2 threads, or with AVX2
or AVX-512 kernels, differ by about 1e-14 in any weight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import zoo
from .io import load_pruned, save_pruned

__all__ = ["load_digits_split", "load_digits_fold", "train_classifier", "train_digits_cnn", "cached_model",
           "pretrained_digits_cnn", "accuracy", "cache_dir"]

_CACHE_VERSION = "v2"  # v2: trained in float64 (v1 networks depended on the machine)


def cache_dir() -> Path:
    """The user cache directory of submod (``$SUBMOD_CACHE_DIR``, else ``$XDG_CACHE_HOME/submod``, else
    ``~/.cache/submod``)."""
    if os.environ.get("SUBMOD_CACHE_DIR"):
        return Path(os.environ["SUBMOD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "submod"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images ``(N, 1, 8, 8)`` float32 in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0)[:, None], d.target


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)``: images ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels.

    Examples
    --------
    >>> Xtr, ytr, Xte, yte = load_digits_split()
    >>> tuple(Xtr.shape), tuple(Xte.shape)
    ((1437, 1, 8, 8), (360, 1, 8, 8))
    """
    from sklearn.model_selection import train_test_split

    X, y = _digits_arrays()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr).long(), torch.from_numpy(Xte), torch.from_numpy(yte).long())


def load_digits_fold(fold: int, n_folds: int = 5, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)`` for fold ``fold`` of a stratified ``n_folds``-fold split of all 1797
    images (shuffled with ``seed``): the test parts of the ``n_folds`` folds partition the data set, so a
    cross-validated benchmark tests on every image exactly once.

    Examples
    --------
    >>> sizes = [len(load_digits_fold(f)[2]) for f in range(5)]
    >>> sizes, sum(sizes)
    ([360, 360, 359, 359, 359], 1797)
    """
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise ValueError(f"fold must be an integer in [0, {n_folds}), got {fold!r}")
    X, y = _digits_arrays()
    tr, te = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(X, y))[fold]
    return (torch.from_numpy(X[tr]), torch.from_numpy(y[tr]).long(), torch.from_numpy(X[te]),
            torch.from_numpy(y[te]).long())


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (evaluated in eval mode, then restored)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            correct += int((model(X[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / len(X)


def train_classifier(model: nn.Module, Xtr: torch.Tensor, ytr: torch.Tensor, epochs: int = 30, seed: int = 0,
                     verbose: bool = False) -> nn.Module:
    """Train ``model`` in place on ``(Xtr, ytr)`` (cross-entropy, Adam with learning rate 3e-3 and weight decay
    1e-4, cosine schedule, mini-batches of 64 shuffled with ``seed``); return it in eval mode.

    The training runs in float64 (the model's floating-point parameters and buffers are converted for it and given
    back their dtype afterwards), so that the result does not depend on the machine's vector instructions or on
    the number of threads (see the module's docstring); it takes about twice the time of float32 training.

    Examples
    --------
    >>> import torch
    >>> from nn_adapters import zoo
    >>> X, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    >>> train_classifier(zoo.mnist1d_cnn(channels=(4, 4, 4)), X, y, epochs=1).training
    False
    """
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the model's floating-point parameters and buffers have several dtypes "
                         f"{sorted(map(str, dtypes))}: convert it to one (model.float()) before training")
    dtype = dtypes.pop() if dtypes else torch.float32
    model.double()
    try:  # the caller's model gets its dtype back even when the training fails
        Xtr = Xtr.double()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        n = len(Xtr)
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            total = 0.0
            for i in range(0, n, 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            sched.step()
            if verbose:
                print(f"epoch {ep + 1}/{epochs} loss {total / n:.4f}")
    finally:
        model.to(dtype)
    return model.eval()


def train_digits_cnn(epochs: int = 30, seed: int = 0, verbose: bool = False,
                     data: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Train :func:`nn_adapters.zoo.digits_cnn` with :func:`train_classifier` on ``data = (X, y)``, by default the
    training part of :func:`load_digits_split`."""
    Xtr, ytr = load_digits_split()[:2] if data is None else data
    torch.manual_seed(seed)
    return train_classifier(zoo.digits_cnn(), Xtr, ytr, epochs, seed, verbose)


def cached_model(path: Path, train: Callable[[], nn.Module], retrain: bool = False,
                 verbose: bool = False) -> tuple[nn.Module, dict]:
    """A trained zoo model, loaded from ``path`` or trained now by ``train()`` (and cached there atomically).

    Returns
    -------
    model : nn.Module
        In eval mode.
    info : dict
        ``path``, ``cached`` (bool), ``train_time_s``.
    """
    if path.exists() and not retrain:
        try:
            return load_pruned(path), {"path": str(path), "cached": True, "train_time_s": 0.0}
        except (ValueError, RuntimeError) as exc:  # a stale or corrupt cache entry: retrain below
            if verbose:
                print(f"ignoring unreadable cache {path}: {exc}")
    t0 = time.perf_counter()
    model = train()
    took = time.perf_counter() - t0
    try:
        save_pruned(model, path)
    except OSError as exc:  # read-only home: run without the cache
        if verbose:
            print(f"could not cache the model at {path}: {exc}")
    return model, {"path": str(path), "cached": False, "train_time_s": took}


def pretrained_digits_cnn(retrain: bool = False, verbose: bool = False) -> tuple[nn.Module, dict]:
    """The trained digits CNN, from the cache or trained now (see :func:`cached_model`)."""
    return cached_model(cache_dir() / f"digits_cnn-{_CACHE_VERSION}-seed0.pt",
                        lambda: train_digits_cnn(verbose=verbose), retrain, verbose)
