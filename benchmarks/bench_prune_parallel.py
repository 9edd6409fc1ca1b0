"""Layer-mode pruning with ``executor=`` against the serial loop, in the same run.

``nn_adapters.prune(model, x, keep=0.5, method="layer")`` (LayerInChange statistics, 5-fold cross-validated
ridges) of zoo models with random weights and Gaussian inputs: VGG-11 CIFAR (width 1/8, 64 images of 32 x 32)
and ResNet-56 (64 images of 16 x 16: its statistics on 32 x 32 images take minutes here); ``--quick``: VGG-11
width 1/16 and ResNet-20 width 8 on 32 images, one repeat. Five variants:

* ``serial``: the layers one after another in this process, numpy's BLAS on 2 threads (its default here);
* ``serial(BLAS 1)``: the same on one BLAS thread, which is what every job gets on an executor;
* ``threads(2)``: ``ThreadPoolExecutor(2)`` (``--thread-blas 1``: this process on one BLAS thread for the
  statistics pass too);
* ``processes(2)``: ``ProcessPoolExecutor(2)``, one BLAS thread per worker (threadpoolctl);
* ``dask(2x1)``: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` (worker processes) through
  ``client.get_executor()``.

torch runs the forward passes on 2 threads in every case. The pools are started (and their workers have imported
``nn_adapters``) before the timings, and one untimed call per model (a quarter of the inputs, a fixed ridge) comes
first. Every variant runs ``--repeats`` times, interleaved; printed are the median wall time of the whole call,
its split into the statistics (the one forward pass with hooks: serial, the same in every variant) and the rest
(every layer's selection, cross-validated ridges and refit, then the shrinking), and the medians of the
same-repeat ratios ``serial time / this time`` (above 1: faster than ``serial``), for the whole call and for the
rest alone. The script asserts that every run keeps the same units as the serial one. The load average is printed
before and after: on a shared machine the ratios move with it.

Run:  python benchmarks/bench_prune_parallel.py [--quick] [--images 64] [--repeats 3] [--models vgg11 resnet56]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import nn_adapters as nna
import nn_adapters.pruning as pruning
from nn_adapters import zoo

VARIANTS = ("serial", "serial(BLAS 1)", "threads(2)", "processes(2)", "dask(2x1)")


def _one_blas_thread() -> None:
    """Initializer of the worker processes: one BLAS thread each (two workers on two cores)."""
    threadpool_limits(1, user_api="blas")


class _StatsTimer:
    """Times the statistics pass (``nn_adapters.pruning._layer_stats``) of the calls made while it is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = pruning._layer_stats

    def __call__(self, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> _StatsTimer:
        pruning._layer_stats = self
        return self

    def __exit__(self, *exc: object) -> None:
        pruning._layer_stats = self._inner


def run(model: torch.nn.Module, x: torch.Tensor, executor: Executor | None, blas: int) -> tuple[float, float, list]:
    """One pruning call with ``blas`` BLAS threads in this process: (wall seconds, statistics seconds, kept units of
    every layer)."""
    with _StatsTimer() as timer, threadpool_limits(blas, user_api="blas"):
        start = time.perf_counter()
        _, report = nna.prune(model, x, keep=0.5, method="layer", executor=executor)
        wall = time.perf_counter() - start
    return wall, timer.seconds, [lr.kept_units for lr in report.layers]


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, pools: dict[str, tuple[Executor | None, int]],
          repeats: int) -> None:
    model.eval()
    n_pairs = len(nna.find_pairs(model, x[:2])[0])
    print(f"\n{name}: {x.shape[0]} calibration inputs of shape {tuple(x.shape[1:])}, {n_pairs} prunable pairs, "
          "keep=0.5, method='layer', ridge='cv'")
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    # untimed: the first call on a model pays for first touches (a cheaper one: fewer inputs, no cross-validation)
    nna.prune(model, x[:max(2, x.shape[0] // 4)], keep=0.5, method="layer", ridge=1e-3)
    kept = None
    for _ in range(repeats):
        for variant in VARIANTS:
            wall, stats_s, units = run(model, x, *pools[variant])
            times[variant].append((wall, stats_s))
            if kept is None:  # the first run is the serial one
                kept = units
            assert units == kept, f"{variant} kept other units than the serial run"
    serial = times["serial"]
    print(f"{'':<14} {'total s':>8} {'statistics s':>12} {'rest s':>7} {'ratio total':>11} {'ratio rest':>10}")
    for variant in VARIANTS:
        t = times[variant]
        ratio_total = [s[0] / v[0] for s, v in zip(serial, t)]
        ratio_rest = [(s[0] - s[1]) / (v[0] - v[1]) for s, v in zip(serial, t)]
        print(f"{variant:<14} {statistics.median(w for w, _ in t):>8.2f} {statistics.median(s for _, s in t):>12.2f} "
              f"{statistics.median(w - s for w, s in t):>7.2f} {statistics.median(ratio_total):>11.2f} "
              f"{statistics.median(ratio_rest):>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and inputs, one repeat (under 30 s)")
    parser.add_argument("--images", type=int, default=None, help="calibration inputs (default 64; --quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of every variant (default 3; --quick 1)")
    parser.add_argument("--models", nargs="+", choices=("vgg11", "resnet56"), default=["vgg11", "resnet56"],
                        help="which models (--quick: ResNet-20 for ResNet-56)")
    parser.add_argument("--thread-blas", type=int, choices=(1, 2), default=2,
                        help="BLAS threads of this process during the thread-pool variant's statistics pass "
                        "(default 2, numpy's default here, as in the other variants; the jobs run on one either way)")
    parser.add_argument("--size", type=int, default=16,
                        help="side of the ResNet's input images (default 16: its statistics on 32 x 32 images take "
                        "minutes; VGG-11 always takes 32)")
    args = parser.parse_args()
    images = args.images or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(2)
    blas = [f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"{os.cpu_count()} CPU cores; numpy {np.__version__} ({', '.join(blas)}); torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.2f} (1 min)")

    import distributed  # the Dask variant

    # each job carries its layer's statistics into Dask's task graph, which Dask warns about from 10 MB on
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)

    with ThreadPoolExecutor(2) as threads, ProcessPoolExecutor(2, initializer=_one_blas_thread) as procs, \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") \
            as cluster, distributed.Client(cluster) as client:
        client.run(_one_blas_thread)
        pools = {"serial": (None, 2), "serial(BLAS 1)": (None, 1), "threads(2)": (threads, args.thread_blas),
                 "processes(2)": (procs, 2), "dask(2x1)": (client.get_executor(), 2)}
        warm = torch.randn(16, 6)
        for pool in (threads, procs, pools["dask(2x1)"][0]):  # start the workers, import nn_adapters there
            nna.prune(zoo.mlp(6, [8, 8], 2), warm, keep=0.5, method="layer", executor=pool)
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        if "vgg11" in args.models:
            width = 1 / 16 if args.quick else 1 / 8
            x = torch.randn(images, 3, 32, 32, generator=g)
            bench(f"VGG-11 CIFAR, width {width}", zoo.vgg11_cifar(width=width), x, pools, repeats)
        if "resnet56" in args.models:
            net, label = (zoo.resnet20(width=8), "ResNet-20, width 8") if args.quick else (zoo.resnet56(), "ResNet-56")
            x = torch.randn(images, 3, args.size, args.size, generator=g)
            bench(label, net, x, pools, repeats)
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min) at the end")


if __name__ == "__main__":
    main()
