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

divided by the pair's mean weight over the first calibration batch (any constant factor leaves the selection, the
relative ridge and the refit unchanged). ``s_r`` is computed exactly from the basis vectors of the output when a
sample's output has at most :data:`EXACT_MAX` entries (a classifier's logits), else estimated with :data:`PROBES`
Rademacher probes (Hutchinson's estimator; its relative standard deviation per row is at most
``sqrt(2 / PROBES)``). One forward pass of the original model per batch, with gradients, and one backward pass per
probe give every pair's weights at once: the gradient at each consumer's output is read from a zero tensor added
to it (so no parameter needs ``requires_grad`` and no ``.grad`` of the caller's model is touched). Layer mode
computes them batch by batch, just before the batch's statistics, so its memory stays independent of the number of
samples; the sequential modes hold one weight per design row for the whole calibration set, as they hold the
activations.

The weights are those of the original network (its Jacobians), also for the sequential modes. They are empirical
importance weights: the selection's guarantees hold for the weighted objective, not for the model's output.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _conv
from ._data import batch_len, call, take
from .pairs import _tensors

__all__ = ["OutputSensitivity", "output_row_weights", "CHUNK", "EXACT_MAX", "PROBES"]

#: Largest number of output entries per sample for which the weights are computed exactly (one backward pass per
#: entry); above it :data:`PROBES` random probes estimate them.
EXACT_MAX = 16
#: Number of Rademacher probes (backward passes per batch) when the output is larger than :data:`EXACT_MAX`.
PROBES = 16
#: Samples per forward pass with gradients: a larger calibration batch is split (the graph kept for the backward
#: passes then holds at most this many samples' activations; eval mode, so samples do not interact).
CHUNK = 64


def _outputs(out: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output that depend on the inputs (:func:`nn_adapters.pairs._tensors`
    of them: a tensor, tuples, lists and mappings such as a ``ModelOutput``)."""
    return [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]


def _row_energy(consumer: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """``sum_c g^2`` per design row of ``consumer`` (its output channels summed): ``(N * positions,)``, in the
    order of :func:`nn_adapters._stats.design_rows` (sample-major, then output position)."""
    g = g.detach().to(torch.float64)
    if _conv.is_conv(consumer):
        return g.pow(2).sum(dim=1).reshape(-1)
    return g.pow(2).sum(dim=-1).reshape(-1)


class OutputSensitivity:
    """The output-sensitivity weights of every pair's design rows, batch by batch (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The original network, in eval mode; it is not modified (hooks are removed after each batch, no ``.grad``
        is set).
    consumers : dict
        Pair name -> consumer module name.
    seed : int
        Seed of the Rademacher probes.

    Each pair's weights are divided by their mean over the first batch, so that they are of order 1 (any constant
    factor leaves the selection, the relative ridge and the refit unchanged). A pair whose consumer's output does
    not reach the model's output on the first batch (sensitivity 0 on every row: the output does not depend on it)
    is left unweighted for every batch, and :attr:`notes` says so.
    """

    def __init__(self, model: nn.Module, consumers: dict[str, str], seed: int = 0) -> None:
        self.model = model
        self.consumers = dict(consumers)
        self.names = sorted(set(self.consumers.values()))
        self.gen = torch.Generator().manual_seed(int(seed))
        self.scale: dict[str, float | None] = {}  # pair -> 1 / mean weight of its first batch (None: unweighted)
        self.notes: list[str] = []
        self._batches = 0

    def batch(self, x: object) -> dict[str, list[torch.Tensor | None]]:
        """The weights of one calibration batch's design rows: per pair, one float64 tensor per call of its
        consumer (in call order), or ``None`` per call for a pair left unweighted."""
        n = batch_len(x)
        parts = [self._energies(take(x, slice(i, i + CHUNK))) for i in range(0, n, CHUNK)]
        # each call's rows are sample-major, so a call's rows over the chunks are the chunks' rows in order
        energy = {name: [torch.cat(calls) for calls in zip(*(part[name] for part in parts), strict=True)]
                  for name in self.names}
        out: dict[str, list[torch.Tensor | None]] = {}
        for pair, name in self.consumers.items():
            calls = energy[name]
            if pair not in self.scale:
                total = sum(float(e.sum()) for e in calls)
                rows = sum(e.numel() for e in calls)
                self.scale[pair] = rows / total if rows and total > 0 else None
                if self.scale[pair] is None:
                    self.notes.append(f"pair {pair}: the consumer's output does not reach the model's output on the "
                                      "first calibration batch (its output sensitivity is 0 there), so its rows are "
                                      "left unweighted.")
            c = self.scale[pair]
            out[pair] = [None] * len(calls) if c is None else [e * c for e in calls]
        self._batches += 1
        return out

    def _energies(self, x: object) -> dict[str, list[torch.Tensor]]:
        """``||J_r||_F^2`` of every design row, per consumer and call, from one forward and the probes' backward
        passes."""
        zeros: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}

        def hook_for(name: str):
            def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                z = torch.zeros_like(out, requires_grad=True)
                zeros[name].append(z)
                return out + z
            return hook

        handles = [self.model.get_submodule(n).register_forward_hook(hook_for(n)) for n in self.names]
        try:
            with torch.enable_grad():
                outs = _outputs(call(self.model, x))
        finally:
            for h in handles:
                h.remove()
        if not outs:
            raise ValueError("weighting='output' needs a model whose output holds floating-point tensors that depend "
                             "on the inputs (a tensor, or tuples/dicts of them); this model's output on calibration "
                             f"batch {self._batches} holds none.")
        leaves = [(n, z) for n in self.names for z in zeros[n]]
        sums = [torch.zeros(_rows(self.model.get_submodule(n), z), dtype=torch.float64, device=z.device)
                for n, z in leaves]
        per_sample = sum(o[0].numel() if o.dim() else 1 for o in outs)
        # the basis vectors are set in every sample at once, which is exact only where dim 0 counts the samples (not
        # for a sequence-first (T, N, C) output, whose dim 0 holds several entries of each sample)
        size = batch_len(x)
        exact = per_sample <= EXACT_MAX and all(o.dim() and o.shape[0] == size for o in outs)
        probes = per_sample if exact else PROBES
        for p in range(probes):
            vs = _basis(outs, p) if exact else [
                (torch.randint(0, 2, o.shape, generator=self.gen).to(o.device, o.dtype) * 2 - 1) for o in outs]
            grads = torch.autograd.grad(outs, [z for _, z in leaves], grad_outputs=vs,
                                        retain_graph=p + 1 < probes, allow_unused=True)
            for t, ((n, _), g) in enumerate(zip(leaves, grads, strict=True)):
                if g is not None:
                    sums[t] += _row_energy(self.model.get_submodule(n), g)
        energy: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        for (n, _), s in zip(leaves, sums, strict=True):
            energy[n].append(s if exact else s / probes)
        return energy


def output_row_weights(model: nn.Module, consumers: dict[str, str], batches: list,
                       seed: int = 0) -> tuple[dict[str, list[torch.Tensor | None]], list[str]]:
    """The weights of :class:`OutputSensitivity` for all ``batches`` at once (what the sequential modes read):
    per pair, one entry per consumer call over the batches in order, and the notes."""
    sens = OutputSensitivity(model, consumers, seed)
    out: dict[str, list[torch.Tensor | None]] = {p: [] for p in consumers}
    for x, _ in batches:
        for p, ws in sens.batch(x).items():
            out[p].extend(ws)
    return out, sens.notes


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
