"""Specification of ``GramAccumulator.update_blocks``: rows given block by block, each block zero outside its columns.

Oracle: the same rows written out in full (zeros outside each block's columns) and streamed with
:meth:`~submod.GramAccumulator.update`, whose own tests check it against one-shot statistics; and, for the
statistics themselves, numpy's products of the full design. Property-tested over random block layouts (overlapping
columns, empty blocks, blocks with no columns, weights, zero weights) on numpy storage, and on torch storage where
torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submod.sparse_regression import GramAccumulator


def _written_out(blocks: list[tuple], d: int) -> tuple[np.ndarray, np.ndarray]:
    """The full rows of ``blocks``: each block's entries in its columns, zero elsewhere."""
    A = [np.zeros((len(a), d)) for _, a, _ in blocks]
    for full, (cols, a, _) in zip(A, blocks, strict=True):
        full[:, cols] = a
    return np.vstack(A), np.vstack([y for _, _, y in blocks])


@st.composite
def block_batches(draw) -> tuple:
    """``(d, m, batches, weights)``: a few batches of 1-4 blocks with random column sets (any size, possibly empty
    and overlapping across blocks), 0-6 rows each, means far from zero, and optional non-negative weights."""
    d, m = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    weighted = draw(st.booleans())
    rng = np.random.default_rng(seed)
    batches, weights = [], []
    for _ in range(draw(st.integers(1, 3))):
        blocks, ws = [], []
        for _ in range(draw(st.integers(1, 4))):
            cols = rng.permutation(d)[:draw(st.integers(0, d))]
            rows = draw(st.integers(0, 6))
            blocks.append((cols, rng.standard_normal((rows, cols.size)) * 2 + rng.normal(0, 5, cols.size),
                           rng.standard_normal((rows, m)) + 3))
            ws.append(rng.integers(0, 3, rows).astype(float) if weighted else None)
        batches.append(blocks)
        weights.append(ws if weighted else None)
    return d, m, batches, weights


def _assert_same(a: GramAccumulator, b: GramAccumulator) -> None:
    assert (a.count, a.weight_sum) == pytest.approx((b.count, b.weight_sum), rel=1e-12)
    if b.weight_sum <= 0:
        return
    scale = max(1.0, float(np.abs(b.gram()).max()))
    for centered in (False, True):
        np.testing.assert_allclose(a.gram(centered), b.gram(centered), rtol=1e-9, atol=1e-9 * scale)
        np.testing.assert_allclose(a.cross(centered), b.cross(centered), rtol=1e-9, atol=1e-9 * scale)
        assert a.y_norm2(centered) == pytest.approx(b.y_norm2(centered), rel=1e-9, abs=1e-9 * scale)
    np.testing.assert_allclose(a.mean_a, b.mean_a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.mean_y, b.mean_y, rtol=1e-10, atol=1e-12)


def _check(data: tuple, device: object) -> None:
    d, m, batches, weights = data
    got, ref = GramAccumulator(d, m, device=device), GramAccumulator(d, m)
    for blocks, ws in zip(batches, weights, strict=True):
        got.update_blocks(blocks, ws)
        A, Y = _written_out(blocks, d)
        ref.update(A, Y, None if ws is None else np.concatenate(ws))
    _assert_same(got, ref)


@settings(max_examples=150)
@given(block_batches())
def test_blocks_equal_their_rows_written_out(data):
    _check(data, None)


@settings(max_examples=60)
@given(block_batches())
def test_blocks_equal_their_rows_written_out_on_torch_storage(data):
    pytest.importorskip("torch")
    _check(data, "cpu")


def test_statistics_equal_the_products_of_the_full_design():
    """A direct oracle: ``A^T A``, ``A^T Y`` and the centred versions of the written-out design, from numpy."""
    rng = np.random.default_rng(3)
    blocks = [(np.array([4, 0]), rng.standard_normal((5, 2)), rng.standard_normal((5, 2))),
              (np.array([1, 2, 3]), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))),
              (np.array([], dtype=int), np.zeros((3, 0)), rng.standard_normal((3, 2)))]
    acc = GramAccumulator(5, 2)
    acc.update_blocks(blocks)
    A, Y = _written_out(blocks, 5)
    np.testing.assert_allclose(acc.gram(), A.T @ A, atol=1e-12)
    np.testing.assert_allclose(acc.cross(), A.T @ Y, atol=1e-12)
    Ac, Yc = A - A.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, atol=1e-12)
    np.testing.assert_allclose(acc.cross(centered=True), Ac.T @ Yc, atol=1e-12)
    assert acc.y_norm2(centered=True) == pytest.approx(float((Yc ** 2).sum()))
    assert acc.count == 12


def test_large_means_keep_the_centred_statistics_accurate():
    """Each block is centred on its own mean and the blocks' means are combined by the pooled (within + between)
    formula, so means of 1e6 over a spread of 1 lose no more than the row-by-row update does."""
    rng = np.random.default_rng(4)
    blocks = [(np.array([0, 1]), 1e6 + rng.standard_normal((50, 2)), 1e6 + rng.standard_normal((50, 1))),
              (np.array([1, 2]), -1e6 + rng.standard_normal((40, 2)), 1e6 + rng.standard_normal((40, 1)))]
    acc = GramAccumulator(3, 1)
    acc.update_blocks(blocks)
    A, Y = _written_out(blocks, 3)
    Ac, Yc = A - A.mean(0), Y - Y.mean(0)  # exact enough in float64 here: the oracle centres the full rows once
    np.testing.assert_allclose(acc.gram(centered=True), Ac.T @ Ac, rtol=1e-9)
    np.testing.assert_allclose(acc.cross(centered=True), Ac.T @ Yc, rtol=1e-9)


def test_zero_weight_blocks_count_rows_but_change_nothing():
    acc = GramAccumulator(2, 1)
    acc.update_blocks([([0], np.ones((3, 1)), np.ones((3, 1)))], sample_weight=[np.zeros(3)])
    assert acc.count == 3 and acc.weight_sum == 0
    assert not acc.gram().any()


@pytest.mark.parametrize(("blocks", "weights", "message"), [
    ([([0, 1], np.ones((2, 3)), np.ones((2, 1)))], None, "its block lists 2 column indices"),
    ([([0, 0], np.ones((2, 2)), np.ones((2, 1)))], None, "repeated indices"),
    ([([0, 3], np.ones((2, 2)), np.ones((2, 1)))], None, "outside \\[0, 3\\)"),
    ([([[0, 1]], np.ones((2, 2)), np.ones((2, 1)))], None, "1-D list of column indices"),
    ([([0.5], np.ones((2, 1)), np.ones((2, 1)))], None, "integer indices"),
    ([([0], np.ones((2, 1)))], None, "tuple \\(columns, A_part, Y_part\\)"),
    ([3], None, "block 0 must be a tuple \\(columns, A_part, Y_part\\); got int"),
    ([([0], np.ones((2, 1)), np.ones((3, 1)))], None, "A_batch has 2 rows but Y_batch has 3"),
    ([([0], np.ones((2, 1)), np.ones((2, 2)))], None, "n_targets=1"),
    ([([0], np.array([[np.nan], [1.0]]), np.ones((2, 1)))], None, "NaN or infinite"),
    ([([0], np.ones((2, 1)), np.ones((2, 1)))], [None, None], "2 entries for 1 blocks"),
    ([([0], np.ones((2, 1)), np.ones((2, 1)))], [-np.ones(2)], "non-negative"),
])
def test_bad_blocks_are_clear_errors_and_change_nothing(blocks, weights, message):
    acc = GramAccumulator(3, 1)
    with pytest.raises(ValueError, match=message):
        acc.update_blocks(blocks, weights)
    assert acc.count == 0 and not acc.gram().any()
