"""Pruning a model on a GPU against the same pruning on the CPU, in the same run.

``nn_adapters.prune`` keeps the float64 statistics of a model on a GPU on that GPU (torch storage, see
docs/nn_adapters.rst, "Where the statistics are computed"); the selection and the refit run on the host. This
script prunes the same float32 model with the same calibration inputs twice, once on the CPU and once moved to
``--device`` (default ``cuda``), and prints for each case the median wall time over ``--repeats`` runs (after one
untimed warm-up run of each, which also pays CUDA's start-up), the ratio GPU time / CPU time (below 1: the GPU is
faster), the share of layers whose kept units are identical on both, and the largest difference of the two pruned
models' outputs on held-out inputs relative to the largest output of the CPU-pruned model.

Cases (random weights and Gaussian inputs or random tokens: only time and agreement are measured, not quality):

* ``vgg11``: VGG-11 (CIFAR variant, width ``--vgg-width``) on ``--images`` 32 x 32 images, asym at 4x compression;
* ``resnet56``: ResNet-56 (CIFAR variant) on ``--images`` 32 x 32 images, asym at 2x compression;
* ``bert``: a randomly initialised BERT with all-MiniLM-L6-v2's shape (6 layers, hidden 384, FFN 1536, 12 heads;
  needs ``transformers``), ``--sentences`` random token sequences of 48 tokens in batches of 64, half of the FFN
  neurons removed with asym (the setting of benchmarks/minilm.py).

The kept units can differ between the two devices where two candidates are within float32 rounding of each other
(the forward passes run in float32 on different hardware); the agreement columns say how often that happened.

Run:  python benchmarks/bench_prune_device.py [--device cuda] [--cases vgg11 resnet56 bert] [--repeats 3]
Without a GPU the script says so and exits.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import nn_adapters as nna
from nn_adapters import zoo


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: object, device: torch.device) -> object:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def _cnn_case(name: str, images: int, vgg_width: float) -> tuple[torch.nn.Module, list, list, dict, Callable]:
    torch.manual_seed(0)
    model = zoo.vgg11_cifar(width=vgg_width) if name == "vgg11" else zoo.resnet56()
    model.eval()
    x = torch.randn(images, 3, 32, 32)
    held_out = [torch.randn(64, 3, 32, 32)]
    kwargs = {"compression": 4.0 if name == "vgg11" else 2.0, "method": "asym"}
    return model, list(x.split(64)), held_out, kwargs, lambda m, b: m(b)


def _bert_case(sentences: int) -> tuple[torch.nn.Module, list, list, dict, Callable]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    model = BertModel(config, add_pooling_layer=False).eval()

    def batch(n: int) -> dict:
        ids = torch.randint(1000, 30000, (n, 48))
        mask = torch.ones(n, 48, dtype=torch.long)
        mask[n // 2:, 32:] = 0  # half of every batch padded after 32 tokens
        return {"input_ids": ids, "attention_mask": mask}

    calib = [batch(64) for _ in range(sentences // 64)]
    held_out = [batch(64)]
    kwargs = {"keep": 0.5, "target": "ffn", "method": "asym"}
    return model, calib, held_out, kwargs, lambda m, b: m(**b).last_hidden_state


def _kept(report: object) -> list[tuple[int, ...]]:
    if hasattr(report, "units"):  # transformer report: UnitRecord.kept is the list of kept units
        return [tuple(int(i) for i in r.kept) for r in report.units]
    return [tuple(int(i) for i in r.kept_units) for r in report.layers]


def run_case(name: str, device: torch.device, args: argparse.Namespace) -> str:
    if name == "bert":
        model, calib, held_out, kwargs, forward = _bert_case(args.sentences)
    else:
        model, calib, held_out, kwargs, forward = _cnn_case(name, args.images, args.vgg_width)
    cpu = torch.device("cpu")
    models = {cpu: model, device: copy.deepcopy(model).to(device)}
    data = {cpu: calib, device: [_to(b, device) for b in calib]}
    times: dict[torch.device, list[float]] = {cpu: [], device: []}
    results = {}
    for rep in range(args.repeats + 1):  # the first run of each device is an untimed warm-up
        for dev in (cpu, device):
            _sync(dev)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned, report = nna.prune(models[dev], data[dev], seed=0, **kwargs)
            _sync(dev)
            if rep:
                times[dev].append(time.perf_counter() - t0)
            results[dev] = (pruned, report)
    (p_cpu, r_cpu), (p_dev, r_dev) = results[cpu], results[device]
    same = sum(a == b for a, b in zip(_kept(r_cpu), _kept(r_dev), strict=True))
    n_layers = len(_kept(r_cpu))
    with torch.inference_mode():
        diffs, scale = [], []
        for b in held_out:
            o_cpu = forward(p_cpu, b)
            o_dev = forward(p_dev, _to(b, device)).to(cpu)
            diffs.append(float((o_dev - o_cpu).abs().max()))
            scale.append(float(o_cpu.abs().max()))
    t_cpu, t_dev = statistics.median(times[cpu]), statistics.median(times[device])
    return (f"{name:9s} {t_cpu:8.2f} {t_dev:8.2f} {t_dev / t_cpu:9.2f}   {same:3d} of {n_layers:3d}   "
            f"{max(diffs) / max(scale):.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the accelerator to compare with the CPU (default cuda)")
    parser.add_argument("--cases", nargs="+", choices=("vgg11", "resnet56", "bert"),
                        default=["vgg11", "resnet56", "bert"])
    parser.add_argument("--images", type=int, default=256, help="calibration images of the CNN cases (256)")
    parser.add_argument("--vgg-width", type=float, default=1.0, help="VGG-11 width multiplier (1.0)")
    parser.add_argument("--sentences", type=int, default=512, help="calibration sequences of the BERT case (512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per device, after one warm-up (3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        parser.error("--device must be an accelerator (cuda): the comparison is against the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to compare (run on a machine with one)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device} ({name}); "
          f"median of {args.repeats} runs after one warm-up")
    print("case       CPU s   device s  device/CPU  same kept sets  max output diff (relative)")
    for case in args.cases:
        print(run_case(case, device, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
