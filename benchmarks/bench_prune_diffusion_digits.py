"""Pruning a diffusion model's denoiser without fine-tuning: diffusers' UNet2DModel trained as a DDPM on digits.

A small ``diffusers.UNet2DModel`` (two resolutions, 32 and 64 channels, one resnet block per level, self-attention
at 4x4, GroupNorm(8, C)) is trained to predict the noise of scikit-learn's 8x8 digits (scaled to [-1, 1]) under
the DDPM forward process (Ho et al. 2020: 1000 steps, linear betas 1e-4 to 0.02, as diffusers' ``DDPMScheduler``),
on the 1437 training images of the demo's split, with a fixed seed, and cached in ``$SUBMOD_CACHE_DIR``.

For each keep fraction and seed, the denoiser is pruned from **unlabeled calibration samples**: ``--calib`` training
images (drawn with the seed), each noised at ``--draws`` random timesteps, given as ``{"sample", "timestep"}``
batches. What is pruned follows from the architecture: every resnet block's ``conv1`` by groups of its ``norm2``,
with the rows of its ``time_emb_proj``, and the time MLP's first Linear (the rest feeds residual sums, skips or
the attention). No fine-tuning. Measured on the 360 test images, each at 4 fixed (timestep, noise) draws:

* **fidelity**: ``||eps_pruned - eps_original||^2 / ||eps_original||^2``, the relative error of the pruned network's
  noise prediction against the unpruned one's (label-free: what the pruning aims at);
* **denoising loss**: ``mean ||eps_pruned - eps||^2`` against the true noise (the training objective), as a ratio to
  the unpruned network's loss on the same draws.

Methods: the submodular ones with the least-squares refit (asym, seq, layer) and the baselines under the same API
(random, weight norm and activation norm with the same refit; magnitude pruning without the refit, what
Torch-Pruning gives before fine-tuning). Prints mean +- std over seeds and ratios against weight norm + refit
measured in the same run. All figures are empirical estimates on this data set; no guarantee is involved.

Run:   python benchmarks/bench_prune_diffusion_digits.py [--seeds 3] [--calib 100] [--draws 4] [--keep 0.75 0.5 0.25]
       [--layer-errors]
Needs: pip install diffusers   (the ``diffusion`` extra)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import torch

import nn_adapters as nna
from nn_adapters.digits import cache_dir, load_digits_split
from submod._atomic import atomic_path

CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
              norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "UpBlock2D"))
TRAIN = dict(steps=3000, batch=64, lr=2e-3, seed=0)
T_STEPS = 1000
# (label, method, reweight, weighting)
METHODS = [("asym", "asym", True, "none"), ("seq", "seq", True, "none"), ("layer", "layer", True, "none"),
           ("asym, output weighting", "asym", True, "output"), ("seq, output weighting", "seq", True, "output"),
           ("layer, output weighting", "layer", True, "output"),
           ("random+refit", "random", True, "none"), ("weight_norm+refit", "weight_norm", True, "none"),
           ("act_norm+refit", "act_norm", True, "none"),
           ("act_norm+refit, output weighting", "act_norm", True, "output"),
           ("magnitude (no refit)", "weight_norm", False, "none")]
BASELINE = "weight_norm+refit"


def alphas_cumprod() -> torch.Tensor:
    """``prod_{s <= t} (1 - beta_s)`` of DDPM's linear schedule (betas 1e-4 ... 0.02 over 1000 steps)."""
    betas = torch.linspace(1e-4, 0.02, T_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def noised(x0: torch.Tensor, g: torch.Generator, abar: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One DDPM draw per image: ``({"sample": x_t, "timestep": t}, eps)``."""
    t = torch.randint(0, T_STEPS, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    return {"sample": a.sqrt() * x0 + (1 - a).sqrt() * eps, "timestep": t}, eps


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """Training and test digits of the demo's split, ``(N, 1, 8, 8)`` in [-1, 1]."""
    Xtr, _, Xte, _ = load_digits_split()
    return Xtr / 8.0 - 1.0, Xte / 8.0 - 1.0


def train(x: torch.Tensor, verbose: bool) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(TRAIN["seed"])
    model = diffusers.UNet2DModel(**CONFIG)
    g = torch.Generator().manual_seed(TRAIN["seed"])
    abar = alphas_cumprod()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=TRAIN["steps"])
    model.train()
    for step in range(TRAIN["steps"]):
        idx = torch.randint(0, len(x), (TRAIN["batch"],), generator=g)
        batch, eps = noised(x[idx], g, abar)
        loss = torch.nn.functional.mse_loss(model(**batch).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and step % 1000 == 0:
            print(f"  step {step}: loss {loss.item():.4f}")
    return model.eval()


def trained_unet(x: torch.Tensor, retrain: bool, verbose: bool) -> tuple[torch.nn.Module, float]:
    """The trained denoiser, from the cache or trained now (and cached atomically). Returns it and the training
    time (0 when cached)."""
    import diffusers

    key = hashlib.sha256(json.dumps([CONFIG, TRAIN, diffusers.__version__], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"ddpm_digits_unet_{key}.pt"
    if path.exists() and not retrain:
        torch.manual_seed(0)
        model = diffusers.UNet2DModel(**CONFIG)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    t0 = time.perf_counter()
    model = train(x, verbose)
    took = time.perf_counter() - t0
    try:
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    except OSError as exc:  # a read-only cache: run without it
        print(f"could not cache the trained model at {path}: {exc}")
    return model, took


def predict(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).sample for b in batches])


def layer_errors(model: torch.nn.Module, xtr: torch.Tensor, abar: torch.Tensor, args: argparse.Namespace,
                 test: list[dict[str, torch.Tensor]], ref: torch.Tensor) -> None:
    """Does the per-layer objective rank the selections as the output does? Greedy (``layer``) against the
    activation norm refitted from the same layer-mode statistics: relative error of each pair's refit on the
    calibration samples and cross-validated, then the fidelity of the whole network."""
    rng = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(xtr), generator=rng)[: args.calib]
    calib = [noised(xtr[pick], rng, abar)[0] for _ in range(args.draws)]
    reports = {}
    for label, method in (("greedy (layer)", "layer"), ("act_norm, layer refit", "act_norm")):
        kw = {"refit_from": "layer"} if method == "act_norm" else {}
        pruned, reports[label] = nna.prune(model, calib, keep=0.5, method=method, **kw)
        out = predict(pruned, test)
        print(f"{label}: fidelity error {float(((out - ref) ** 2).sum() / (ref ** 2).sum()):.4f}")
    print("\n| pair | greedy in-sample / cv | act_norm in-sample / cv |\n|---|---|---|")
    for a, b in zip(*(r.layers for r in reports.values()), strict=True):
        print(f"| {a.pair.split('->')[0]} | {a.relative_error:.4f} / {a.cv_relative_error:.4f} | "
              f"{b.relative_error:.4f} / {b.cv_relative_error:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=100, help="calibration images (each noised --draws times)")
    ap.add_argument("--draws", type=int, default=4, help="noise draws (timesteps) per calibration image")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--layer-errors", action="store_true",
                    help="only compare, per pair, the in-sample and cross-validated relative errors of greedy "
                         "selection and of the activation norm (both in layer mode, same refit), seed 0, keep 0.5")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    xtr, xte = images()
    model, took = trained_unet(xtr, args.retrain, verbose=True)
    how = f"trained in {took:.0f} s" if took else "cached"
    print(f"UNet2DModel, {sum(p.numel() for p in model.parameters())} parameters; {how}")

    abar = alphas_cumprod()
    g = torch.Generator().manual_seed(12345)
    test, test_eps = zip(*(noised(xte, g, abar) for _ in range(4)), strict=True)
    test_eps = torch.cat(test_eps)
    ref = predict(model, list(test))
    ref_loss = float(((ref - test_eps) ** 2).mean())
    print(f"unpruned denoising loss on the test draws: {ref_loss:.4f}")

    if args.layer_errors:
        layer_errors(model, xtr, abar, args, list(test), ref)
        return

    fid: dict[tuple[str, float], list[float]] = {}
    loss: dict[tuple[str, float], list[float]] = {}
    secs: dict[str, list[float]] = {}
    params: dict[float, str] = {}
    for seed in range(args.seeds):
        rng = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(xtr), generator=rng)[: args.calib]
        calib = [noised(xtr[pick], rng, abar)[0] for _ in range(args.draws)]
        for keep in args.keep:
            for label, method, reweight, weighting in METHODS:
                t0 = time.perf_counter()
                pruned, rep = nna.prune(model, calib, keep=keep, method=method, reweight=reweight, seed=seed,
                                        weighting=weighting)
                secs.setdefault(label, []).append(time.perf_counter() - t0)
                out = predict(pruned, list(test))
                fid.setdefault((label, keep), []).append(float(((out - ref) ** 2).sum() / (ref ** 2).sum()))
                loss.setdefault((label, keep), []).append(float(((out - test_eps) ** 2).mean()) / ref_loss)
                params[keep] = f"{rep.params_after / rep.params_before:.3f}"

    def table(title: str, d: dict[tuple[str, float], list[float]], digits: int) -> None:
        print(f"\n{title}\n")
        print("| method | " + " | ".join(f"keep {k} (params x{params[k]})" for k in args.keep) + " |")
        print("|---|" + "---|" * len(args.keep))
        for label, *_ in METHODS:
            cells = [f"{np.mean(d[label, k]):.{digits}f} +- {np.std(d[label, k]):.{digits}f}" for k in args.keep]
            print(f"| {label} | " + " | ".join(cells) + " |")

    table("Fidelity: relative error of the noise prediction vs the unpruned network (lower is better)", fid, 4)
    table("Denoising loss / unpruned loss (lower is better; 1 = unpruned)", loss, 3)
    print(f"\nRatios against {BASELINE}, same run (fidelity error: below 1 is better):")
    for label, *_ in METHODS:
        if label != BASELINE:
            r = [np.mean(fid[label, k]) / np.mean(fid[BASELINE, k]) for k in args.keep]
            print(f"  {label:22s} fidelity error x[{' '.join(f'{v:.2f}' for v in r)}]  (keep {args.keep})")
    base_t = np.median(secs[BASELINE])
    print("Pruning time, median s (ratio to " + BASELINE + "): " + ", ".join(
        f"{label} {np.median(v):.2f} (x{np.median(v) / base_t:.2f})" for label, v in secs.items()))


if __name__ == "__main__":
    main()
