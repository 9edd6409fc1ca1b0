"""Where the held-out error of FFN pruning comes from on all-MiniLM-L6-v2: the selection or the refit?

For one block, the FFN's intermediate activations ``A`` (after GELU) and the down projection's targets
``Y = A W^T`` are captured on the calibration sentences and on the evaluation sentences of
``benchmarks/minilm.py`` (same split). Errors are the LayerNorm-weighted relative errors the pruner minimises
(tokens weighted by ``1 / sigma_t^2`` of the pre-LN sum, output dimensions by ``gamma^2``), always measured on the
*evaluation* tokens. The 2 x 2 table crosses where the units are selected (greedy forward regression) with where
the down projection is refitted: calibration or evaluation tokens. If selecting on the evaluation tokens (an
oracle) barely helps while refitting on them does, the selection generalises and the refit is what is
data-limited. A second table compares refit estimators for the units selected on the calibration tokens.

Run: ``python benchmarks/minilm_refit_diagnosis.py --block 5`` (about 1 minute on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minilm  # noqa: E402

import submod  # noqa: E402


def capture(model: torch.nn.Module, batches: list[dict], block: int) -> tuple[np.ndarray, np.ndarray]:
    """FFN activations (tokens, 1536) and LayerNorm token weights of ``block`` over the real tokens."""
    layer = model.encoder.layer[block]
    got: dict[str, list[torch.Tensor]] = {"a": [], "z": []}
    hooks = [layer.output.dense.register_forward_hook(lambda m, i, o: got["a"].append(i[0])),
             layer.output.LayerNorm.register_forward_hook(lambda m, i, o: got["z"].append(i[0]))]
    masks = []
    try:
        with torch.inference_mode():
            for b in batches:
                model(**b)
                masks.append(b["attention_mask"].bool())
    finally:
        for h in hooks:
            h.remove()
    A = torch.cat([a[m] for a, m in zip(got["a"], masks, strict=True)]).double().numpy()
    Z = torch.cat([z[m] for z, m in zip(got["z"], masks, strict=True)]).double()
    return A, (1.0 / (Z.var(-1, unbiased=False) + layer.output.LayerNorm.eps)).numpy()


class Weighted:
    """Centred, weighted statistics of one token set (targets scaled by ``gamma``)."""

    def __init__(self, A: np.ndarray, w: np.ndarray, Wg: np.ndarray) -> None:
        self.A, self.w, self.Y = A, w, A @ Wg
        self.mu, self.my = w @ A / w.sum(), w @ self.Y / w.sum()
        root = np.sqrt(w)[:, None]
        Ac, Yc = (A - self.mu) * root, (self.Y - self.my) * root
        self.G, self.B, self.yy = Ac.T @ Ac, Ac.T @ Yc, float((Yc ** 2).sum())
        self.scale = float(np.trace(self.G)) / self.G.shape[0]

    def select(self, k: int, ridge: float) -> np.ndarray:
        f = submod.SparseRegression.from_gram(self.G, self.B, self.yy, ridge=ridge * self.scale)
        return np.sort(f.greedy_path(k).selected[:k])

    def refit(self, S: np.ndarray, ridge: float, prior: np.ndarray | None = None, G: np.ndarray | None = None,
              B: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        G = self.G if G is None else G
        B = self.B if B is None else B
        GS = G[np.ix_(S, S)]
        M0 = np.zeros((S.size, B.shape[1])) if prior is None else prior
        M = M0 + np.linalg.solve(GS + ridge * self.scale * np.eye(S.size), B[S] - GS @ M0)
        return M, self.my - self.mu[S] @ M

    def error(self, S: np.ndarray, M: np.ndarray, b: np.ndarray) -> float:
        R = self.Y - (self.A[:, S] @ M + b)
        return float((self.w[:, None] * R ** 2).sum() / (self.w[:, None] * (self.Y - self.my) ** 2).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    sents = minilm.stdlib_sentences(0)
    model, tok = minilm.load_minilm()
    calib = minilm.tokenize(tok, sents[:args.n_calib], 64)
    evalb = minilm.tokenize(tok, sents[args.n_calib:args.n_calib + args.n_eval], 64)
    layer = model.encoder.layer[args.block]
    Wg = layer.output.dense.weight.detach().double().numpy().T * layer.output.LayerNorm.weight.detach().double().abs(
    ).numpy()
    cal, ev = Weighted(*capture(model, calib, args.block), Wg), Weighted(*capture(model, evalb, args.block), Wg)
    k = round(args.keep * Wg.shape[0])
    print(f"block {args.block}: keep {k} of {Wg.shape[0]} FFN neurons; calibration {cal.A.shape[0]} tokens, "
          f"evaluation {ev.A.shape[0]} tokens; relative errors on the evaluation tokens (ridge 1e-2, ordinary)")
    sel = {"calibration": cal.select(k, 1e-4), "evaluation": ev.select(k, 1e-4)}
    print(f"overlap of the two selections: {np.intersect1d(*sel.values()).size} of {k}")
    print("| selected on | refit on calibration | refit on evaluation (oracle) |\n|---|---|---|")
    for name, S in sel.items():
        print(f"| {name} | {ev.error(S, *cal.refit(S, 1e-2)):.4f} | {ev.error(S, *ev.refit(S, 1e-2)):.4f} |")
    S = sel["calibration"]
    print("\nrefit estimators on the calibration tokens, units selected there (relative ridge in brackets):")
    print("| refit | error on evaluation tokens |\n|---|---|")
    for r in (1e-4, 1e-2, 1e-1):
        print(f"| ordinary ridge ({r:g}) | {ev.error(S, *cal.refit(S, r)):.4f} |")
    for r in (1e-2, 1e-1, 3e-1):
        print(f"| ridge toward the trained weights ({r:g}) | {ev.error(S, *cal.refit(S, r, Wg[S])):.4f} |")
    for a in (0.05, 0.1, 0.2):  # Ledoit-Wolf-style: Y = A W exactly here, so the cross term follows the covariance
        G = (1 - a) * cal.G + a * np.diag(np.diag(cal.G))
        err = ev.error(S, *cal.refit(S, 0.0, None, G, G @ Wg))
        print(f"| covariance shrunk toward its diagonal ({a:g}) | {err:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
