"""Review of GramAccumulator's two storages: what a caller can do with the read-outs, copies and odd batches.

Both storages must behave the same: the means are read-only snapshots, a shallow copy is independent, every CPU
tensor torch storage takes is taken by numpy storage too, and a batch or device that cannot hold float64
statistics is refused with a ValueError that leaves the statistics as they were. Oracles: numpy float64 products
of the raw rows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from submod.sparse_regression import GramAccumulator

torch = pytest.importorskip("torch")

STORAGES = [None, "cpu"]


def rows(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 3)) + 5.0
    return A, A[:, :2] @ rng.standard_normal((2, 2)) + rng.standard_normal((n, 2))


def assert_statistics_of(acc: GramAccumulator, A: np.ndarray, Y: np.ndarray) -> None:
    """``acc`` holds exactly the statistics of the rows ``A, Y`` (numpy float64 oracle on the raw rows)."""
    assert acc.count == len(A)
    for got, want in ((acc.gram(), A.T @ A), (acc.cross(), A.T @ Y), (acc.mean_a, A.mean(0)),
                      (acc.mean_y, Y.mean(0))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert acc.y_norm2() == pytest.approx(float(np.sum(Y * Y)), rel=1e-12)


@pytest.mark.parametrize("device", STORAGES)
def test_means_are_read_only_snapshots_on_both_storages(device):
    """numpy storage used to hand out its live arrays: a write into ``acc.mean_a`` changed the statistics."""
    A, Y = rows()
    acc = GramAccumulator(3, 2, device=device)
    acc.update(A[:20], Y[:20])
    ma, my = acc.mean_a, acc.mean_y
    for arr in (ma, my):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1e6
    with pytest.raises(AttributeError):
        acc.mean_a = np.zeros(3)
    acc.update(A[20:], Y[20:])
    np.testing.assert_allclose(ma, A[:20].mean(0), rtol=1e-12)   # a snapshot: later batches leave it alone
    np.testing.assert_allclose(my, Y[:20].mean(0), rtol=1e-12, atol=1e-12)
    assert_statistics_of(acc, A, Y)


@pytest.mark.parametrize("device", STORAGES)
def test_a_shallow_copy_is_independent_on_both_storages(device):
    """copy.copy of numpy storage shared the co-moment arrays: updating the copy corrupted the original."""
    A, Y = rows(1)
    acc = GramAccumulator(3, 2, device=device)
    acc.update(A[:25], Y[:25])
    dup = copy.copy(acc)
    dup.update(A[25:], Y[25:])
    assert_statistics_of(acc, A[:25], Y[:25])
    assert_statistics_of(dup, A, Y)
