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


def _tensors(kind: str, A: np.ndarray, Y: np.ndarray) -> tuple:
    a, y = torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
    if kind == "bfloat16":
        return a.bfloat16(), y.bfloat16(), torch.ones(len(A), dtype=torch.bfloat16)
    if kind == "requires grad":
        return a.requires_grad_(), y.requires_grad_(), torch.ones(len(A), requires_grad=True)
    return (torch.as_tensor(A) > 5.0), y.int(), torch.ones(len(A), dtype=torch.bool)   # bool and int


@pytest.mark.parametrize("kind", ["bfloat16", "requires grad", "bool and int"])
@pytest.mark.parametrize("device", STORAGES)
def test_both_storages_take_every_cpu_tensor(device, kind):
    """numpy storage raised a raw TypeError (bfloat16) or RuntimeError (requires grad) where torch storage took
    the tensor: the class documents batches of any float dtype, numpy or torch."""
    A, Y = rows(2)
    a, y, w = _tensors(kind, A, Y)
    acc = GramAccumulator(3, 2, device=device)
    acc.update(a, y, w)
    acc.update(a, y)
    a64, y64 = a.detach().double().numpy(), y.detach().double().numpy()
    assert_statistics_of(acc, np.vstack([a64, a64]), np.vstack([y64, y64]))


def test_a_meta_batch_is_refused_and_the_statistics_survive():
    """device=None adopted the meta device of a batch: the statistics moved to tensors without data (lost), and
    the update then failed with NotImplementedError."""
    A, Y = rows(3)
    acc = GramAccumulator(3, 2)
    acc.update(A, Y)
    with pytest.raises(ValueError, match="meta"):
        acc.update(torch.ones(2, 3, device="meta"), torch.ones(2, 2, device="meta"))
    assert acc.device is None
    assert_statistics_of(acc, A, Y)
    with pytest.raises(ValueError, match="meta"):
        GramAccumulator(3, 2, device="meta")


def test_a_device_without_float64_is_a_clear_error(monkeypatch):
    """Apple's MPS has no float64: torch raises a TypeError there, which escaped the ValueError that names the
    fix (simulated: this machine has no MPS device)."""
    from submod import _gram_torch

    def no_float64(x, dev, copy=False):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64.")

    monkeypatch.setattr(_gram_torch, "tensor_on", no_float64)
    with pytest.raises(ValueError, match="cannot keep the statistics on device cpu"):
        GramAccumulator(3, 2, device="cpu")


def test_numpy_storage_words_tensor_errors_as_array_errors():
    """Reading tensors on the host must not change which error the numpy storage's checks raise."""
    from test_gram_device import _bad_batches

    for case, (A, Y, w) in sorted(_bad_batches().items()):
        with pytest.raises(ValueError) as want:
            GramAccumulator(3, 2).update(A, Y, w)
        acc = GramAccumulator(3, 2)
        with pytest.raises(ValueError) as got:
            acc.update(torch.as_tensor(A), torch.as_tensor(Y), None if w is None else torch.as_tensor(w))
        assert str(got.value) == str(want.value), case
        assert acc.count == 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_device_cuda_without_index_stays_on_the_gpu_it_started_on():
    """device="cuda" means the current GPU when the accumulator is built; a batch arriving after another GPU was
    made current must still be added where the statistics are (an unindexed device was resolved per batch)."""
    A, Y = rows(4)
    acc = GramAccumulator(3, 2, device="cuda")
    assert acc.device == torch.device("cuda", torch.cuda.current_device())
    first = torch.cuda.current_device()
    try:
        torch.cuda.set_device(1 - first)
        acc.update(torch.as_tensor(A[:20], device="cuda"), torch.as_tensor(Y[:20], device="cuda"))
        acc.update(A[20:], Y[20:])
    finally:
        torch.cuda.set_device(first)
    assert_statistics_of(acc, A, Y)
