"""Sparse k-nearest-neighbour facility location from features: build + lazy greedy against apricot and submodlib.

Problem: X = sklearn make_blobs(n, n_features=20, centers=20, cluster_std=2.0, random_state=0), Euclidean
distances, each item keeping its 10 nearest candidates (itself included), k = 100 picks, for n = 10,000, 20,000
and 50,000. A time is building the objective from X plus one lazy-greedy call (both also printed apart).

* submod: ``FacilityLocation(X, metric="euclidean", n_neighbors=10)`` + ``maximize(f, 100, method="lazy")``.
* apricot: ``FacilityLocationSelection(100, metric="euclidean", n_neighbors=9, optimizer="lazy")``: apricot
  adds the item itself, so 9 keeps the same 10 entries per row. apricot 0.6.1's own ``n_neighbors`` path fails with
  recent scikit-learn (int64 sparse indices against its numba int32 signature); the script then builds the graph
  as apricot does (``KNeighborsTransformer``, ``max - data``), passes it precomputed with int32 indices and says so.
* submodlib: ``FacilityLocationFunction(n, mode="sparse", data=X, metric="euclidean", num_neighbors=10)`` +
  ``maximize(budget=100, optimizer="LazyGreedy")``.
* submod dense: ``FacilityLocation(X, metric="euclidean")`` (the n x n matrix) where n <= --dense-max-n.

The conventions differ (see the ``FacilityLocation`` docstring): apricot's candidate covers its own neighbours (our
graph transposed) and shifts by the largest kept distance; submodlib uses exp(-d / p) and a symmetrised graph. So
every selection is also evaluated on OUR objective (value ratio peer / submod), and on the peer's where it is easy
(apricot's graph as a ``FacilityLocation(similarity=...)``, submodlib's ``evaluate``). Time ratios are peer seconds
/ submod seconds, measured in the same run.

Run:  python benchmarks/bench_fl_knn.py [--sizes 10000 20000 50000] [--n-neighbors 10] [--k 100]
      [--dense-max-n 20000] [--no-peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

import numpy as np
import scipy.sparse as sp

import submod


def problem(n: int) -> np.ndarray:
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n_samples=n, n_features=20, centers=20, cluster_std=2.0, random_state=0)
    return X


def clock(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def ours(X: np.ndarray, nn: int, k: int) -> dict:
    t_build, f = clock(lambda: submod.FacilityLocation(X, metric="euclidean", n_neighbors=nn))
    t_select, res = clock(lambda: submod.maximize(f, k, method="lazy"))
    return {"build": t_build, "select": t_select, "seconds": t_build + t_select, "selected": res.selected, "f": f}


def ours_dense(X: np.ndarray, k: int) -> dict:
    t_build, f = clock(lambda: submod.FacilityLocation(X, metric="euclidean"))
    t_select, res = clock(lambda: submod.maximize(f, k, method="lazy"))
    return {"build": t_build, "select": t_select, "seconds": t_build + t_select, "selected": res.selected, "f": f}


def apricot_graph(X: np.ndarray, nn: int) -> sp.csr_matrix:
    """apricot's similarity for ``n_neighbors=nn - 1`` (its ``_calculate_pairwise_distances``), int32 indices."""
    from sklearn.neighbors import KNeighborsTransformer

    G = KNeighborsTransformer(n_neighbors=nn - 1, metric="euclidean").fit_transform(X)
    return sp.csr_matrix((G.data.max() - G.data, G.indices.astype(np.int32), G.indptr.astype(np.int32)),
                         shape=G.shape)


def apricot_run(X: np.ndarray, nn: int, k: int) -> dict:
    from apricot import FacilityLocationSelection

    def own():
        return FacilityLocationSelection(k, metric="euclidean", n_neighbors=nn - 1, optimizer="lazy",
                                         verbose=False).fit(X).ranking

    note = "own n_neighbors path"
    try:
        seconds, ranking = clock(own)
        graph = None
    except TypeError:  # apricot 0.6.1 + scikit-learn >= 1.x: int64 graph indices against numba's int32
        note = "graph built as apricot does, passed precomputed (its n_neighbors path fails here)"
        t_graph, graph = clock(lambda: apricot_graph(X, nn))
        t_fit, ranking = clock(lambda: FacilityLocationSelection(k, metric="precomputed", optimizer="lazy",
                                                                 verbose=False).fit(graph).ranking)
        seconds = t_graph + t_fit
    if graph is None:
        graph = apricot_graph(X, nn)
    return {"seconds": seconds, "selected": np.asarray(ranking), "note": note, "graph": graph}


def submodlib_run(X: np.ndarray, nn: int, k: int) -> dict:
    from submodlib import FacilityLocationFunction

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            obj = FacilityLocationFunction(n=X.shape[0], mode="sparse", data=X, metric="euclidean", num_neighbors=nn)
            picks = obj.maximize(budget=k, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                                 verbose=False, show_progress=False)
        return obj, np.array([j for j, _ in picks])

    seconds, (obj, selected) = clock(run)
    return {"seconds": seconds, "selected": selected, "obj": obj, "note": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000], help="ground-set sizes n")
    parser.add_argument("--n-neighbors", type=int, default=10, help="entries kept per item, itself included")
    parser.add_argument("--k", type=int, default=100, help="items to select")
    parser.add_argument("--dense-max-n", type=int, default=20_000,
                        help="also time the dense build (n x n float64) up to this n")
    parser.add_argument("--no-peers", action="store_true", help="time submod only")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    nn, k = args.n_neighbors, args.k
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"k = {k} picks, {nn} neighbours per item (itself included), make_blobs with 20 features; "
          f"load average {load:.1f} at the start")
    print(f"{'n':>7}  {'run':<16}{'build s':>9}{'select s':>10}{'total s':>9}{'peer/submod':>13}"
          f"{'f_ours ratio':>14}{'f_theirs ratio':>16}")
    out: list[dict] = []
    for n in args.sizes:
        X = problem(n)
        mine = ours(X, nn, k)
        f = mine["f"]
        base = f.value(mine["selected"])
        rows = [("submod knn", mine, 1.0, None)]
        if n <= args.dense_max_n:
            dense = ours_dense(X, k)
            # the kNN selection on the dense objective, against dense greedy: what sparsifying costs in quality
            ratio_dense = dense["f"].value(mine["selected"]) / dense["f"].value(dense["selected"])
            rows.append(("submod dense", dense, f.value(dense["selected"]) / base, ratio_dense))
            del dense["f"]
        if not args.no_peers:
            for name, run in (("apricot lazy", apricot_run), ("submodlib lazy", submodlib_run)):
                try:
                    peer = run(X, nn, k)
                except ImportError:
                    print(f"({name.split()[0]} not installed: skipped)")
                    continue
                if "graph" in peer:
                    theirs = submod.FacilityLocation(similarity=peer.pop("graph").T)   # candidate rows -> columns
                    mine_theirs = theirs.value(mine["selected"])
                    theirs_ratio = theirs.value(peer["selected"]) / mine_theirs
                else:
                    obj = peer.pop("obj")
                    theirs_ratio = obj.evaluate(set(peer["selected"].tolist())) / \
                        obj.evaluate(set(mine["selected"].tolist()))
                rows.append((name, peer, f.value(peer["selected"]) / base, theirs_ratio))
        for name, row, ours_ratio, theirs_ratio in rows:
            b = f"{row['build']:>9.2f}{row['select']:>10.2f}" if "build" in row else f"{'':>9}{'':>10}"
            theirs_txt = f"{theirs_ratio:>16.6f}" if theirs_ratio is not None else f"{'':>16}"
            print(f"{n:>7}  {name:<16}{b}{row['seconds']:>9.2f}{row['seconds'] / mine['seconds']:>12.2f}x"
                  f"{ours_ratio:>14.6f}{theirs_txt}")
            out.append({"n": n, "run": name, "seconds": row["seconds"], "build": row.get("build"),
                        "select": row.get("select"), "time_ratio": row["seconds"] / mine["seconds"],
                        "value_ratio_ours": ours_ratio, "value_ratio_theirs": theirs_ratio,
                        "note": row.get("note", ""), "selected": row["selected"].tolist()})
        notes = {r.get("note") for _, r, _, _ in rows if r.get("note")}
        for note in notes:
            print(f"         apricot: {note}")
    print("\npeer/submod: total seconds / submod knn total seconds (same run). f_ours ratio: f(selection) / "
          "f(submod knn selection) on submod's kNN objective. f_theirs ratio: the same on the peer's own "
          "objective (for 'submod dense': f_dense(submod knn selection) / f_dense(dense selection)).")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
