"""Memoised values of a set function on the subsets of a small ground set, indexed by bitmask.

Bit ``j`` of a mask stands for element ``j``. Values are filled by a depth-first walk of the subset lattice: at
each set ``T`` one vectorised ``GainState.gains`` call gives ``F(T + j)`` for every admissible child at once, so
the cost is one gains call per internal node (plus replaying ``T`` into a fresh state), not one call per set.
"""

from __future__ import annotations

import time

import numpy as np

from submod import SetFunction

#: Largest ground set for which a value table (``2**n`` float64 entries) may be built.
MAX_TABLE_N = 20


def popcount(masks: np.ndarray) -> np.ndarray:
    """Number of set bits of each (non-negative, < 2**32) mask; SWAR bit counting, works on numpy 1.x too.

    Examples
    --------
    >>> popcount(np.array([0, 1, 3, 255, 2**20 - 1])).tolist()
    [0, 1, 2, 8, 20]
    """
    x = np.asarray(masks, dtype=np.int64)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def mask_of(S: np.ndarray | list[int]) -> int:
    """Bitmask of a set of indices."""
    m = 0
    for j in S:
        m |= 1 << int(j)
    return m


def members(mask: int, n: int) -> np.ndarray:
    """Indices in a bitmask, increasing."""
    return np.array([j for j in range(n) if mask >> j & 1], dtype=np.int64)


def bit_matrix(masks: np.ndarray, n: int) -> np.ndarray:
    """Boolean matrix ``(len(masks), n)``: element ``j`` in mask ``i``."""
    return ((np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(n)) & 1).astype(bool)


class ValueTable:
    """``F`` on every subset ``T`` with ``|T \\ inside| <= max_outside`` (all subsets by default).

    Attributes
    ----------
    values : ndarray of shape (2**n,)
        ``F(T)`` at index ``mask(T)``; ``nan`` for subsets outside the family.
    gain_evaluations, state_updates : int
        Cost counters (candidate gains computed; elements added to states while replaying).
    seconds : float
        Time spent building the table.
    """

    def __init__(self, f: SetFunction, inside: int | None = None, max_outside: int | None = None) -> None:
        n = f.n
        if n > MAX_TABLE_N:
            raise ValueError(f"a value table over all subsets needs 2**n entries; n = {n} exceeds the limit "
                             f"{MAX_TABLE_N}. Use a sampled or spectral method for larger ground sets.")
        start = time.perf_counter()
        self.f = f
        self.n = n
        full = (1 << n) - 1
        inside = full if inside is None else inside
        max_out = n if max_outside is None else max_outside
        self.values = np.full(1 << n, np.nan)
        self.values[0] = 0.0
        self.gain_evaluations = 0
        self.state_updates = 0
        stack = [(0, -1)]  # (mask, largest element): children add larger elements only, so each set once
        while stack:
            mask, last = stack.pop()
            cand = np.arange(last + 1, n, dtype=np.int64)
            out_count = int(popcount(np.array([mask & ~inside]))[0])
            if out_count >= max_out:
                cand = cand[(inside >> cand) & 1 == 1]
            if cand.size == 0:
                continue
            state = f.init_state()
            for j in members(mask, n):
                state.add(int(j))
            self.state_updates += int(popcount(np.array([mask]))[0])
            g = np.asarray(state.gains(cand), dtype=np.float64)
            self.gain_evaluations += cand.size
            base = float(state.value)
            child = mask | (1 << cand)
            self.values[child] = base + g
            stack.extend((int(c), int(j)) for c, j in zip(child, cand, strict=True))
        self.seconds = time.perf_counter() - start

    def __call__(self, mask: int | np.ndarray) -> float | np.ndarray:
        return self.values[mask]
