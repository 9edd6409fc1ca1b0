"""Output sensitivity of the consumers' outputs: the row weights of ``weighting="output"``.

The per-pair objective measures the change of the consumer's output, ``||Y - A M||^2`` summed over the design rows
(a sample, or a sample's output position for a convolution). What the user sees is the change of the *model's*
output, and an error at the consumer does not reach it equally from every row: a residual sum, a normalisation
that divides by a per-sample scale, a time-step-dependent gain in a diffusion U-Net, or a classifier that reads
some positions more than others amplify some rows and damp others. To first order the model's output moves by
``J_r e_r`` for an error ``e_r`` at row ``r`` (``J_r`` the Jacobian of the model's output with respect to the
consumer's output at that row), so its squared change is ``e_r^T J_r^T J_r e_r`` (the Gauss-Newton model of the
output's squared error, the label-free counterpart of the Fisher weighting of Optimal Brain Damage: LeCun, Denker
and Solla 1990; Hassibi and Stork 1993, "Optimal Brain Surgeon").

Keeping the objective a least-squares problem over shared rows (one Gram matrix for every output channel, so that
greedy selection, its guarantees and the refit are unchanged) keeps the row scale of that model and drops its
mixing of channels: row ``r`` gets the weight

    s_r = ||J_r||_F^2 = E_v ||J_r^T v||^2,   v with independent entries of mean 0 and variance 1,

normalised to mean 1 over the calibration rows of the pair. ``s_r`` is computed exactly from the basis vectors of
the output when a sample's output has at most :data:`EXACT_MAX` entries (a classifier's logits), else estimated
with :data:`PROBES` Rademacher probes (Hutchinson's estimator; its relative standard deviation per row is at most
``sqrt(2 / PROBES)``). One forward pass of the original model per batch, with gradients, and one backward pass per
probe give every pair's weights at once: the gradient at each consumer's output is read from a zero tensor added
to it (so no parameter needs ``requires_grad`` and no ``.grad`` of the caller's model is touched).

The weights are those of the original network (its Jacobians), also for the sequential modes. They are empirical
importance weights: the selection's guarantees hold for the weighted objective, not for the model's output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import _conv
from ._data import call

__all__ = ["output_row_weights", "EXACT_MAX", "PROBES"]

#: Largest number of output entries per sample for which the weights are computed exactly (one backward pass per
#: entry); above it :data:`PROBES` random probes estimate them.
EXACT_MAX = 16
#: Number of Rademacher probes (backward passes per batch) when the output is larger than :data:`EXACT_MAX`.
PROBES = 16


def _outputs(out: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output that depend on the inputs (tensors, tuples, lists, dicts)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.requires_grad else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _row_energy(consumer: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """``sum_c g^2`` per design row of ``consumer`` (its output channels summed): ``(N * positions,)``, in the
    order of :func:`nn_adapters._stats.design_rows` (sample-major, then output position)."""
    g = g.detach().to(torch.float64)
    if _conv.is_conv(consumer):
        return g.pow(2).sum(dim=1).reshape(-1)
    return g.pow(2).sum(dim=-1).reshape(-1)


def output_row_weights(model: nn.Module, consumers: dict[str, str], batches: list,
                       seed: int = 0) -> tuple[dict[str, list[torch.Tensor] | None], list[str]]:
    """The output-sensitivity weight of every design row of every pair (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The original network, in eval mode; it is not modified (hooks are removed on exit, no ``.grad`` is set).
    consumers : dict
        Pair name -> consumer module name.
    batches : list of (inputs, labels)
        The calibration batches, in the order the statistics will read them.
    seed : int
        Seed of the Rademacher probes.

    Returns
    -------
    weights : dict
        Pair name -> one float64 tensor per consumer call (in call order over the batches) with one weight per
        design row, normalised to mean 1 over all of the pair's rows; ``None`` for a pair whose consumer's output
        does not reach the model's output (its rows are left unweighted).
    notes : list of str
        What the caller should tell the user (pairs left unweighted).
    """
    names = sorted(set(consumers.values()))
    energy: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    zeros: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            z = torch.zeros_like(out, requires_grad=True)
            zeros[name].append(z)
            return out + z
        return hook

    gen = torch.Generator().manual_seed(int(seed))
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        for i, (x, _) in enumerate(batches):
            for n in names:
                zeros[n].clear()
            with torch.enable_grad():
                outs = _outputs(call(model, x))
                leaves = [(n, j, z) for n in names for j, z in enumerate(zeros[n])]
                if not outs:
                    raise ValueError("weighting='output' needs a model whose output holds floating-point tensors "
                                     "that depend on the inputs (a tensor, or tuples/dicts of them); this model's "
                                     f"output on calibration batch {i} holds none.")
                sums = [torch.zeros(_rows(model.get_submodule(n), z), dtype=torch.float64, device=z.device)
                        for n, _, z in leaves]
                per_sample = sum(o[0].numel() if o.dim() else 1 for o in outs)
                probes = per_sample if per_sample <= EXACT_MAX else PROBES
                for p in range(probes):
                    if per_sample <= EXACT_MAX:
                        vs = _basis(outs, p)
                    else:
                        vs = [(torch.randint(0, 2, o.shape, generator=gen).to(o.device, o.dtype) * 2 - 1)
                              for o in outs]
                    grads = torch.autograd.grad(outs, [z for _, _, z in leaves], grad_outputs=vs,
                                                retain_graph=p + 1 < probes, allow_unused=True)
                    for t, ((n, _, _), g) in enumerate(zip(leaves, grads, strict=True)):
                        if g is not None:
                            sums[t] += _row_energy(model.get_submodule(n), g)
                scale = 1.0 if per_sample <= EXACT_MAX else 1.0 / probes
                for (n, _, _), s in zip(leaves, sums, strict=True):
                    energy[n].append((s * scale).cpu())
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[torch.Tensor] | None] = {}
    notes = []
    for pair, n in consumers.items():
        total = sum(float(e.sum()) for e in energy[n])
        rows = sum(e.numel() for e in energy[n])
        if not total > 0 or rows == 0:
            out[pair] = None
            notes.append(f"pair {pair}: the consumer's output does not reach the model's output on the calibration "
                         "data (its output sensitivity is 0), so its rows are left unweighted.")
            continue
        mean = total / rows
        out[pair] = [e / mean for e in energy[n]]
    return out, notes


def _rows(consumer: nn.Module, out: torch.Tensor) -> int:
    """The number of design rows of one call of ``consumer`` whose output is ``out``."""
    if _conv.is_conv(consumer):
        return out.shape[0] * (out[0, 0].numel() if out.dim() > 2 else 1)
    return out.numel() // out.shape[-1]


def _basis(outs: list[torch.Tensor], j: int) -> list[torch.Tensor]:
    """The ``j``-th basis vector of one sample's output (all tensors of it flattened and concatenated), repeated
    for every sample of the batch."""
    vs = []
    for o in outs:
        v = torch.zeros_like(o)
        m = o[0].numel() if o.dim() else 1
        if 0 <= j < m:
            if o.dim():
                v.reshape(o.shape[0], -1)[:, j] = 1.0
            else:
                v.fill_(1.0)
        vs.append(v)
        j -= m
    return vs
