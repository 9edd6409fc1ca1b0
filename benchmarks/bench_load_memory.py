"""Loading a pruned transformer with ``load_pruned``: peak memory and time, this checkout against another.

A randomly initialised Llama (``transformers``, nothing downloaded; hidden width ``--hidden``, 1024 by default, 4
layers, 176 MiB of float32 weights) is pruned to half of its FFN neurons and key/value groups (``target="all"``,
magnitude without refit: the loading is what is measured) and saved with ``save_pruned``; fresh processes then load
it in two ways:

* ``instance``: ``load_pruned(directory, model)`` from the unpruned model (the trained original a user holds, built
  before the measurement). ``load_pruned`` used to deep-copy the instance (its weights too) before shrinking it;
  the copy's weights are now shape-only (``meta``) until the saved ones take their place.
* ``config``: ``load_pruned(directory)``, the architecture built from the saved ``config.json``. That build used to
  allocate and randomly initialise every weight of the unpruned model; it now makes shape-only parameters
  (buffers computed as usual).

The figures printed are the peak memory of the loading minus the memory in use before it, read from
``/proc/self/status`` after resetting the peak (Linux) and after reading every loaded tensor once (the saved
weights may be a file mapped in memory, which counts only once it is read), and the loading's wall time.

With ``--baseline-src DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/old 645e80b``) that code
loads the same directory in the same run, and the loaded models' outputs are checked to be the same.

Run:  python benchmarks/bench_load_memory.py [--hidden 1024] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _memory import baseline_options, run_child, sources

ROOT = Path(__file__).resolve().parents[1]
#: load_pruned(directory, unpruned instance), and load_pruned(directory) building the model from config.json
MODES = ("instance", "config")


def build(hidden: int):
    """The unpruned Llama (seeded: the same weights in every process) and a batch of token ids."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=4, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 256, head_dim=64)
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).eval(), token_ids()


def token_ids():
    """The batch of token ids the outputs are compared on."""
    import torch

    return torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))


def rss_mib(field: str) -> float:
    """This process's resident memory now (``VmRSS``) or its peak (``VmHWM``), in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark needs Linux")


def child(args: argparse.Namespace) -> None:
    """Load ``args.directory`` from a fresh unpruned instance; prints a JSON line (peak MiB, seconds, outputs)."""
    import torch

    from nn_adapters.transformer import load_pruned

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.mode == "instance":
        model, ids = build(args.hidden)
    else:  # nothing built before the loading; the model's code imported (as the instance's is)
        import transformers

        model, ids = None, token_ids()
        assert transformers.LlamaModel is not None
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the memory in use now
    before = rss_mib("VmRSS")
    t0 = time.perf_counter()
    loaded = load_pruned(args.directory, model)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # every loaded tensor read once: a file mapped in memory counts once it is read
        for t in (*loaded.parameters(), *loaded.buffers()):
            t.sum()
    mib = rss_mib("VmHWM") - before
    with torch.no_grad():
        out = loaded(input_ids=ids).last_hidden_state
    print(json.dumps({"mib": mib, "seconds": seconds, "out": out.flatten()[:64].tolist(),
                      "weights_mib": sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**20}))


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--hidden", type=int, default=1024)
    options.add_argument("--directory", type=Path, default=None, help=argparse.SUPPRESS)
    options.add_argument("--mode", choices=MODES, default="instance", help=argparse.SUPPRESS)
    args = baseline_options(options).parse_args()
    if args.child:
        child(args)
        return
    import torch

    sys.path.insert(0, str(ROOT))
    from nn_adapters.transformer import prune_transformer, save_pruned

    model, ids = build(args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        pruned, _ = prune_transformer(model, [{"input_ids": ids}], keep=0.5, target="all", method="magnitude",
                                      reweight=False)
        directory = Path(tmp) / "pruned"
        save_pruned(pruned, directory)
        with torch.no_grad():
            want = pruned(input_ids=ids).last_hidden_state.flatten()[:64]
        print(f"python {sys.version.split()[0]}; Llama, hidden width {args.hidden}, 4 layers; half of the FFN and "
              "key/value groups pruned; peak memory of load_pruned(directory, unpruned instance) ('instance') and "
              "of load_pruned(directory) ('config')")
        srcs = sources(args.baseline_src, ROOT)
        runs = {(mode, name): run_child(__file__, src, ["--hidden", str(args.hidden), "--directory", str(directory),
                                                        "--mode", mode], f"{name}, {mode}")
                for mode in MODES for name, src in srcs.items()}
    for (mode, name), r in runs.items():
        same = torch.allclose(torch.tensor(r["out"]), want, rtol=1e-5, atol=1e-6)
        print(f"{mode:8s} {name}: {r['mib']:.0f} MiB, {r['seconds']:.2f} s; outputs {'equal' if same else 'DIFFERENT'}"
              " to the pruned model's")
    unpruned = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"weights: {unpruned:.0f} MiB unpruned, {runs['config', 'this checkout']['weights_mib']:.0f} MiB loaded")
    for mode in MODES:
        if (mode, "baseline") in runs:
            old, new = runs[mode, "baseline"], runs[mode, "this checkout"]
            print(f"{mode}: baseline / this checkout: {old['mib'] / max(new['mib'], 1e-9):.2f}x the peak "
                  f"({old['mib'] - new['mib']:.0f} MiB less), {old['seconds'] / new['seconds']:.2f}x the time")


if __name__ == "__main__":
    main()
