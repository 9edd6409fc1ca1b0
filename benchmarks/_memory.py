"""Helpers of the memory benchmarks: each measured run is a fresh Python process (its peak resident memory is its
own), which prints one JSON line; the code measured is that of the checkout on its ``PYTHONPATH``."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def parser(doc: str, tokens: list[int]) -> argparse.ArgumentParser:
    """The options both memory benchmarks take: ``--tokens`` (default ``tokens``), ``--hidden``, ``--baseline-src``
    and the hidden ``--child`` of the measured runs."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0])
    out.add_argument("--tokens", type=int, nargs="+", default=tokens)
    out.add_argument("--hidden", type=int, default=1024)
    return baseline_options(out)


def baseline_options(options: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of a benchmark that measures this checkout against another in fresh processes:
    ``--baseline-src DIR`` and the hidden ``--child`` of the measured runs."""
    options.add_argument("--baseline-src", type=Path, default=None,
                         help="a checkout of earlier code, measured in the same run")
    options.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return options


def sources(baseline: Path | None, root: Path) -> dict[str, Path]:
    """The checkouts measured: ``baseline`` (when given) then this one (``root``), by the names the tables print."""
    return {"this checkout": root} if baseline is None else {"baseline": baseline.resolve(), "this checkout": root}


def peak_mib() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, src: Path, argv: list[str], what: str) -> dict:
    """Run ``script --child argv`` in a fresh process with the code of ``src``; its last output line, as JSON."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, script, "--child", *argv], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{src} ({what}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_pruning(model, tokens: int, **options) -> dict:
    """Prune ``model`` (``prune_transformer(model, batches, keep=0.5, **options)``) from ``tokens`` calibration tokens
    (sequences of 256 random token ids below 1000, 8 a batch): the peak memory it added (MiB), its wall time, the
    model's weights (MiB) and the kept units and errors of its report."""
    import time

    import torch

    from nn_adapters.transformer import prune_transformer

    g = torch.Generator().manual_seed(0)
    n_seq = tokens // 256
    batches = [{"input_ids": torch.randint(0, 1000, (min(8, n_seq - b), 256), generator=g)}
               for b in range(0, n_seq, 8)]
    before = peak_mib()
    t0 = time.perf_counter()
    _, report = prune_transformer(model, batches, keep=0.5, **options)
    seconds = time.perf_counter() - t0
    return {"mib": peak_mib() - before, "seconds": seconds,
            "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "kept": [u.kept for u in report.units], "errors": [u.relative_error for u in report.units]}


def same_results(runs: list[dict], rtol: float = 1e-5) -> bool:
    """Whether every run kept the same units (``"kept"``) with the same errors (``"errors"``, to ``rtol``)."""
    ref = runs[0]
    return all(r["kept"] == ref["kept"] and len(r["errors"]) == len(ref["errors"])
               and all((a is None and b is None) or abs(a - b) <= rtol * max(abs(b), 1e-12)
                       for a, b in zip(r["errors"], ref["errors"], strict=True)) for r in runs)
