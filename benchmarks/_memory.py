"""Helpers of the memory benchmarks: each measured run is a fresh Python process (its peak resident memory is its
own), which prints one JSON line; the code measured is that of the checkout on its ``PYTHONPATH``."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


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


def same_results(runs: list[dict], rtol: float = 1e-5) -> bool:
    """Whether every run kept the same units (``"kept"``) with the same errors (``"errors"``, to ``rtol``)."""
    ref = runs[0]
    return all(r["kept"] == ref["kept"] and len(r["errors"]) == len(ref["errors"])
               and all((a is None and b is None) or abs(a - b) <= rtol * max(abs(b), 1e-12)
                       for a, b in zip(r["errors"], ref["errors"], strict=True)) for r in runs)
