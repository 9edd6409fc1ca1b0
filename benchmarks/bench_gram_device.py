"""Throughput of ``submod.GramAccumulator``: torch storage on a device vs numpy storage on the host.

Run from the repository root::

    python benchmarks/bench_gram_device.py [--features 512 1536 3072] [--rows 100000] [--targets 256]
                                           [--device cpu] [--threads 0]

For every width ``d`` it streams ``--rows`` rows of ``d`` inputs and ``--targets`` targets, in chunks of the size the
pruning adapters use (``4,000,000 // d`` rows, ``--chunk`` to override), into two accumulators and reads the
statistics out once (``gram()``, ``cross()``, as the selection does):

* the baseline, numpy storage on the host: each chunk is a float64 tensor on ``--device`` that is copied to the
  host (``.cpu().numpy()``, free on the CPU) and accumulated with numpy (``A^T A`` is a symmetric BLAS product,
  ``syrk``), which is what nn_adapters does for a CPU model and did for every model before the device path;
* torch storage on ``--device`` (``GramAccumulator(d, m, device=...)``): the chunk stays where it is and the
  products run there (``addmm_``, a general matrix product: torch has no symmetric one).

It prints the seconds and rows per second of each and the ratio torch / numpy of the times (below 1: torch is
faster), measured in the same run on the same chunks, and the largest relative difference of the two Gram matrices.
``--device cuda`` needs a GPU; without one the script says so and exits. Chunks are drawn once (a few distinct
chunks, cycled) so that drawing random numbers is not timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from submod.sparse_regression import GramAccumulator

_CHUNK_ELEMS = 4_000_000  # as nn_adapters._stats: float64 elements of A per chunk


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(torch, device, d: int, m: int, rows: int, chunk: int, distinct: int = 4) -> dict:
    """Time both storages on the same chunks; return seconds and the largest relative Gram difference."""
    g = torch.Generator(device=device).manual_seed(d)
    pool = []
    for _ in range(distinct):
        a = torch.randn(chunk, d, generator=g, device=device, dtype=torch.float64) + 0.5
        pool.append((a, a[:, :m] * 0.5 + torch.randn(chunk, m, generator=g, device=device, dtype=torch.float64)))
    sizes = [chunk] * (rows // chunk) + ([rows % chunk] if rows % chunk else [])
    out = {}
    for name in ("numpy", "torch"):
        acc = GramAccumulator(d, m, device=device if name == "torch" else None)
        _sync(torch, device)
        t0 = time.perf_counter()
        for i, s in enumerate(sizes):
            a, y = pool[i % distinct]
            a, y = a[:s], y[:s]
            if name == "numpy":
                acc.update(a.cpu().numpy(), y.cpu().numpy())
            else:
                acc.update(a, y)
        G = acc.gram()
        acc.cross()
        _sync(torch, device)
        out[name] = time.perf_counter() - t0
        out["gram_" + name] = G
    ref = out.pop("gram_numpy")
    out["rel_diff"] = float(np.abs(out.pop("gram_torch") - ref).max() / np.abs(ref).max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, nargs="+", default=[512, 1536, 3072],
                        help="input widths d to measure (default 512 1536 3072)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows streamed per width (default 100000)")
    parser.add_argument("--targets", type=int, default=256, help="target columns m (default 256)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="rows per chunk (default 0: 4,000,000 // d, as the pruning adapters)")
    parser.add_argument("--device", default="cpu", help="torch device of the torch storage: cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: torch's default); numpy's BLAS threads follow its own "
                             "environment variables (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: the torch storage cannot be measured.")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no GPU on this machine (torch.cuda.is_available() is False); skipping. "
              "Run with --device cpu to compare torch on the CPU with numpy.")
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"rows={args.rows} targets={args.targets} device={device} ({where}), torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"{'d':>6} {'chunk':>6} {'numpy s':>9} {'torch s':>9} {'numpy rows/s':>13} {'torch rows/s':>13} "
          f"{'torch/numpy':>12} {'max rel diff':>13}")
    for d in args.features:
        chunk = args.chunk or max(1, _CHUNK_ELEMS // d)
        r = run(torch, device, d, args.targets, args.rows, chunk)
        print(f"{d:>6} {chunk:>6} {r['numpy']:>9.2f} {r['torch']:>9.2f} {args.rows / r['numpy']:>13,.0f} "
              f"{args.rows / r['torch']:>13,.0f} {r['torch'] / r['numpy']:>12.2f} {r['rel_diff']:>13.1e}")


if __name__ == "__main__":
    main()
