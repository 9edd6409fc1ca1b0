"""Peak memory of streaming rows through ``submod.GramAccumulator``: 100,000 rows vs 1,000 rows.

Run from the repository root::

    python benchmarks/bench_accumulator_memory.py [--features 512] [--targets 128] [--batch 1000]

Each configuration runs in a fresh subprocess that generates batches of ``--batch`` rows on the fly (as a data
loader would) and feeds them to the accumulator, then builds the objective. Two measures of the peak are printed:
``tracemalloc`` (Python and numpy allocations, measured from the start of streaming) and the process's maximum
resident set size (``resource.getrusage``, whole process including the interpreter and libraries). The accumulator
is O(d^2 + d m) in memory, so the ratio 100,000 rows / 1,000 rows should be within 1.10.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tracemalloc
import numpy as np
from submod.sparse_regression import GramAccumulator

rows, d, m, batch = (int(x) for x in sys.argv[1:5])
rng = np.random.default_rng(0)
tracemalloc.start()
acc = GramAccumulator(d, m)
done = 0
while done < rows:
    b = min(batch, rows - done)
    A = rng.standard_normal((b, d))
    Y = A[:, :m] * 0.5 + rng.standard_normal((b, m))
    acc.update(A, Y)
    done += b
    del A, Y
f = acc.to_objective(fit_intercept=True)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": acc.count, "tracemalloc_peak": peak, "maxrss_kib": maxrss_kib}))
"""


def measure(rows: int, d: int, m: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(d), str(m), str(batch)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--targets", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    d, m, batch = args.features, args.targets, args.batch
    small = measure(1_000, d, m, batch)
    large = measure(100_000, d, m, batch)
    print(f"GramAccumulator memory: d={d} features, m={m} targets, batches of {batch} rows")
    for name, key, unit in (("tracemalloc peak", "tracemalloc_peak", 2 ** 20), ("max RSS", "maxrss_kib", 2 ** 10)):
        a, b = small[key] / unit, large[key] / unit
        print(f"    {name:17s}: {small['rows']:>7,d} rows {a:9.2f} MiB   {large['rows']:>7,d} rows {b:9.2f} MiB   "
              f"ratio {b / a:.3f}")
    dense = 100_000 * (d + m) * 8 / 2 ** 20
    print(f"    (holding the 100,000 rows in float64 would take {dense:.0f} MiB)")


if __name__ == "__main__":
    main()
