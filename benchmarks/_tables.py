"""Table printing shared by the pruning benchmark scripts (run from ``benchmarks/`` or the repository root)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def print_accuracy_table(acc: Mapping[tuple[str, float], Sequence[float]], labels: Iterable[str],
                         compressions: Sequence[float], width: int, column: int) -> tuple[dict, dict, str]:
    """Print test accuracy in % as mean +- population std over seeds, one row per label (``width`` characters)
    and one column (``column`` characters) per compression; return the means and standard deviations (fractions),
    keyed like ``acc``, and the header line for further tables with the same columns."""
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    std = {k: float(np.std(v)) for k, v in acc.items()}
    head = f"{'method':<{width}}" + "".join(f"{f'{c:g}x':>{column}}" for c in compressions)
    print("\ntest accuracy %, mean +- std over seeds (population std, ddof=0)\n" + head)
    for label in labels:
        print(f"{label:<{width}}" + "".join(f"{100 * mean[(label, c)]:>{column - 7}.1f} +-"
                                           f"{100 * std[(label, c)]:>4.1f}" for c in compressions))
    return mean, std, head


def print_method_rows(acc: Mapping[str, Sequence[float]], secs: Mapping[str, Sequence[float]], ours: str,
                      baselines: Iterable[str], width: int) -> None:
    """One row per label: test accuracy in % as mean +- std over seeds and the mean pruning time; then ``ours``'s
    mean accuracy as a ratio to each baseline's (the same run)."""
    for label, a in acc.items():
        print(f"    {label:<{width}}{100 * np.mean(a):7.2f} +- {100 * np.std(a):5.2f}   "
              f"(pruning {np.mean(secs[label]):.2f} s)")
    ratios = ", ".join(f"{np.mean(acc[ours]) / np.mean(acc[b]):.3f}x {b}" for b in baselines)
    print(f"    {ours} / baselines (mean accuracy ratios, same run): {ratios}")
