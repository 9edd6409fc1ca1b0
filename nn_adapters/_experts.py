"""Whole-expert pruning of mixture-of-experts layers (``prune_transformer(..., target="experts")``).

A mixture's output on a token ``x`` is ``sum_j w_j y_{e_j}(x)`` over the experts ``e_j`` its router picks, with
routing weights ``w_j``. Removing experts removes their rows of the router, so every token is routed among the
experts kept: the routing changes, and the experts' weights do not. The experts kept in a layer are chosen to
minimise the routed output's squared error on the calibration tokens,

    err(K) = sum_t || T_t - sum_j w_j^K(x_t) y_{e_j^K(x_t)}(x_t) ||^2,

where ``(e^K, w^K)`` is the routing of the router restricted to the kept set ``K`` (computed by the model's own
router on its kept rows, so the objective is exactly what the pruned layer computes) and ``T_t`` the target of
the pruning mode: the original mixture's routed output on the original network's token (``layer``, ``asym``), or
on the pruned network's (``seq``). This is the reconstruction criterion of Lu et al. (2024), "Not All Experts are
Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models" (ACL), who enumerate
every kept set; here every kept set is enumerated when there are at most :data:`EXHAUSTIVE_LIMIT` of them (the
kept set is then optimal for the objective on the calibration tokens), and otherwise experts are removed one at a
time, each time the one whose removal increases the error least (backward elimination; no guarantee: ``err`` is
not known to be supermodular, as routing couples the experts).

The experts' outputs are computed for the (token, expert) pairs that some routing needs, cached up to
:data:`OUTPUT_CACHE_BYTES` (past it, computed again when needed), and their inner products kept per token
(:class:`PairProducts`); a kept set's error then costs one router call and ``k^2`` numbers per token whose routing
it changes, and a step of backward elimination, for a router that renormalises over each token's
top-k, one router call for all its candidates (:func:`search_kept`).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

#: Kept sets are enumerated when there are at most this many (e.g. every choice of 4, or of 6, of 8 experts).
EXHAUSTIVE_LIMIT = 512
#: How backward elimination evaluates a step's candidate removals (see :func:`search_kept`): ``"batched"`` (all of
#: them at once, from one routing among one more expert per token), ``"local"`` (the router called for each
#: candidate on the tokens routed to the removed expert) or ``"full"`` (the router called for each candidate on
#: every token); the search falls back from one to the next when its check fails. ``"local"`` and ``"full"`` are
#: the baselines of ``benchmarks/bench_expert_search.py``.
SEARCH = "batched"
#: Rows (token, removed expert) whose routings' errors are computed at once by the batched search: memory about
#: ``CANDIDATE_CHUNK * k * k * 24`` bytes.
CANDIDATE_CHUNK = 65536
#: Whether the enumeration of kept sets routes them all at once from each token's ranking of every expert (see
#: :func:`search_kept`); ``False`` calls the router on every kept set (the baseline of
#: ``benchmarks/bench_expert_search.py --enumerate``).
BATCHED_ENUMERATION = True
#: (kept set, token, ranked expert) entries the batched enumeration holds at once.
ENUMERATION_CHUNK = 1 << 22
#: Bytes of experts' outputs (one row of the hidden width per token and expert) :class:`ExpertOutputs` keeps; the
#: outputs past it are computed again when needed. With the whole search's outputs cached (about ``k + 5`` per
#: token for backward elimination), no output is computed twice; the bound keeps a long calibration run's memory
#: from growing with its tokens (hidden 2048, float32: 1 GiB holds about 16 outputs of 8,000 tokens).
OUTPUT_CACHE_BYTES = 1 << 30
#: Bytes of float64 experts' outputs gathered at once by the chunked reads (routed sums, norms, pair products).
GATHER_CHUNK_BYTES = 64 << 20


def _is_expert_count(name: str, module: nn.Module) -> bool:
    """Whether integer attribute ``name`` of ``module`` counts its experts (and so changes with their number)."""
    return "expert" in name or (isinstance(module, nn.Linear) and name == "out_features")


def _expert_dim(t: torch.Tensor | None, n_experts: int) -> int | None:
    """The dimension of ``t`` that runs over the experts: the first if it has ``n_experts`` entries, else the last
    if every other one has a single entry (ERNIE 4.5's ``(1, E)`` score-correction bias); ``None`` otherwise."""
    if t is None or t.dim() == 0:
        return None
    if t.shape[0] == n_experts:
        return 0
    if t.shape[-1] == n_experts and all(n == 1 for n in t.shape[:-1]):
        return t.dim() - 1
    return None


def drop_experts(module: nn.Module, n_experts: int, keep: torch.Tensor, recurse: bool = True) -> None:
    """Keep only experts ``keep`` (sorted original indices) in ``module``, in place: every parameter and buffer
    with a dimension over the experts (:func:`_expert_dim`) loses the other experts' entries, and every integer
    attribute counting the experts (``num_experts``, ``n_routed_experts``, a router Linear's ``out_features``)
    becomes ``len(keep)``; with ``recurse``, in the submodules of ``module`` too."""
    subs = list(module.modules()) if recurse else [module]
    for sub in subs:
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                dim = _expert_dim(t, n_experts)
                if dim is None:
                    continue
                rows = t.detach().index_select(dim, keep.to(t.device)).clone()
                store[name] = nn.Parameter(rows, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else rows
        for name, value in list(vars(sub).items()):
            if type(value) is int and value == n_experts and _is_expert_count(name, sub):
                setattr(sub, name, len(keep))


def sync_expert_count(model: nn.Module, mixtures: list[nn.Module], before: int, after: int) -> list[str]:
    """Outside the modules ``mixtures`` (whose own counts :func:`drop_experts` set), set every integer attribute of
    ``model``'s modules that counts the experts (``"expert"`` in its name, not a top-k or a shared or grouped
    count) and equals ``before`` to ``after``: the ``num_experts`` of a Hugging Face ``...ForCausalLM``, which its
    load-balancing loss (``output_router_logits=True``) reads. Returns the attributes set (``"path.name"``)."""
    inside = {id(m) for mix in mixtures for m in mix.modules()}
    done = []
    for path, sub in model.named_modules():
        if id(sub) in inside:
            continue
        for name, value in list(vars(sub).items()):
            if type(value) is int and value == before and "expert" in name and not any(
                    w in name for w in ("per_tok", "top", "shared", "group")):
                setattr(sub, name, after)
                done.append(f"{path}.{name}" if path else name)
    return done


def routing_of(out: Any, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(weights, experts)`` of a router's output: the tuple's integer tensor ``(n_tokens, k)`` and the
    floating tensor of the same shape (the last one); else, from a router that returns dense scores (Llama 4: a
    ``(n_tokens, E)`` tensor, its first such, positive on each token's ``k`` experts and zero elsewhere), those
    experts and scores (:func:`compact_routing`); ``None`` if the output has neither."""
    if not isinstance(out, (tuple, list)):
        return None
    ints = [t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2
            and t.shape[0] == n_tokens and t.dtype != torch.bool]
    if not ints:
        dense = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2
                 and t.shape[0] == n_tokens]
        if not dense or bool((dense[0] < 0).any()):
            return None
        scores = dense[0]
        experts = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        return compact_routing(scores, torch.where(scores > 0, experts, torch.full_like(experts, -1)))
    if len(ints) != 1:
        return None
    idx = ints[0]
    floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == idx.shape]
    return (floats[-1], idx) if floats else None


def compact_routing(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A routing recorded densely, ``(n_tokens, E)`` with expert ``-1`` (Llama 4's records: every expert, the
    unrouted ones marked), as ``(weights, experts)`` ``(n_tokens, k)`` of the routed ones, in increasing expert
    order; the routing as it is if no expert is marked; ``None`` if the tokens have different numbers of experts."""
    routed = idx >= 0
    if bool(routed.all()):
        return w, idx
    k = routed.sum(1)
    if idx.shape[0] and bool((k != k[0]).any()):
        return None
    cols = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)[:, :int(k[0]) if idx.shape[0] else 0]
    return w.gather(1, cols), idx.gather(1, cols)


def sorted_routing(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with each token's experts in increasing order (routings compared as sets)."""
    idx_s, order = idx.sort(dim=1)
    return w.gather(1, order), idx_s


def same_routing(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether routings ``a`` and ``b`` (``(weights, experts)``, ``(m, k)``) send every token to the same experts
    with the same weights, up to the rounding of the weights' dtype (in any order)."""
    (wa, ia), (wb, ib) = sorted_routing(*a), sorted_routing(*b)
    if ia.shape != ib.shape or not torch.equal(ia, ib.to(ia.device)):
        return False
    eps = max(torch.finfo(wa.dtype).eps, torch.finfo(wb.dtype).eps)
    return bool(torch.allclose(wa.double(), wb.double().to(wa.device), rtol=max(1e-5, 4 * eps), atol=max(1e-7, eps)))


def drop_column(w: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, rule: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing ``(weights, experts)`` ``(m, k)`` of rows ``(m, k + 1)`` without each row's column ``pos``
    ``(m,)``: the other weights as they are (``rule="keep"``), or scaled to the row's total weight
    (``"rescale"``: a router that renormalises its weights over each token's experts, times a constant)."""
    k = idx.shape[1] - 1
    cols = torch.arange(k, device=idx.device).expand(idx.shape[0], k)
    cols = cols + (cols >= pos.unsqueeze(1))
    wd = w.double()
    out = wd.gather(1, cols)
    if rule == "rescale":
        total = wd.sum(1)
        out = out * (total / (total - wd.gather(1, pos.unsqueeze(1)).squeeze(1))).unsqueeze(1)
    return out.to(w.dtype), idx.gather(1, cols)


def first_kept(w: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor, k: int, rule: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's routing among the kept sets ``kept`` (``(c, E)`` bool) from its ranking of experts ``(w, idx)``
    ``(n, R)`` (the router's order): its first ``k`` ranked experts that are kept, their weights as they are
    (``rule="keep"``) or scaled to the ranking's total weight (``"rescale"``, see :func:`drop_column`):
    ``(weights, experts)`` ``(c, n, k)``."""
    c, (n, r) = kept.shape[0], idx.shape
    inside = kept[:, idx.to(kept.device)]  # (c, n, R): whether each ranked expert is kept
    cols = torch.argsort((~inside).to(torch.int8), dim=2, stable=True)[..., :k]  # the first k kept, in rank order
    wd = w.double().unsqueeze(0).expand(c, n, r)
    out = wd.gather(2, cols)
    if rule == "rescale":
        out = out * (w.double().sum(1).unsqueeze(0) / out.sum(2)).unsqueeze(2)
    return out.to(w.dtype), idx.unsqueeze(0).expand(c, n, r).gather(2, cols)


class ExpertOutputs:
    """The outputs ``y_e(x_t)`` of the experts of ``blk`` on the token rows ``x``, computed on demand for the
    (token, expert) pairs asked for, and cached up to :data:`OUTPUT_CACHE_BYTES` (``cache_bytes``) in the dtype
    the experts compute them in (no rounding: float32 for a float32 model, half the memory of float64; read as
    float64). Past that bound, an output is computed again each time it is needed (the values are the same): the
    memory does not grow with the number of calibration tokens beyond the per-token tables (an index of ``E``
    integers a token), whatever the hidden width. ``computed`` counts the outputs computed (one per token and
    expert each time).

    With ``scale`` (``(n_tokens, E)``: a router whose score multiplies the expert's input, Llama 4's), the output of
    a pair is ``y_e(s_te x_t)``, ``s_te`` the score the router gives expert ``e`` on token ``t`` when it routes the
    token there (the same whichever other experts it routes to, or are kept); a routed sum then adds the outputs
    with weight 1 (:meth:`out_weights`)."""

    def __init__(self, blk: Any, x: torch.Tensor, scale: torch.Tensor | None = None,
                 cache_bytes: int | None = None) -> None:
        self.blk, self.x, self.scale = blk, x, scale
        self.cache_bytes = OUTPUT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.slot = torch.full((x.shape[0], blk.n_experts), -1, dtype=torch.long, device=x.device)
        self.buf = torch.empty(0, x.shape[1], dtype=x.dtype if x.is_floating_point() else torch.float64,
                               device=x.device)
        self.n = self.computed = 0

    def _store(self, tok: torch.Tensor, e: torch.Tensor, y: torch.Tensor) -> None:
        """Cache the outputs ``y`` of the pairs ``(tok, e)`` (each new), as many as fit in the bound."""
        if torch.promote_types(y.dtype, self.buf.dtype) != self.buf.dtype:  # wider than the buffer
            self.buf = self.buf.to(torch.promote_types(y.dtype, self.buf.dtype))
        row_bytes = self.x.shape[1] * self.buf.element_size()
        room = max(0, self.cache_bytes // max(1, row_bytes) - self.n)
        m = min(room, tok.numel())
        if m == 0:
            return
        need = self.n + m
        if need > self.buf.shape[0]:
            cap = max(1, self.cache_bytes // max(1, row_bytes))
            grown = torch.empty(min(cap, max(need, 2 * self.buf.shape[0])), self.x.shape[1], dtype=self.buf.dtype,
                                device=self.x.device)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:need] = y[:m]
        self.slot[tok[:m], e[:m]] = torch.arange(self.n, need, device=self.slot.device)
        self.n = need

    def gather(self, idx: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``(m, k, H)`` float64: the outputs of the experts ``idx`` ``(m, k)`` (original indices) on the token
        rows ``tokens`` ``(m,)`` (all of them, in order, by default); those not cached are computed (once each)
        and cached as far as the bound allows. Its result is as large as asked for: callers over many tokens ask
        in chunks (:meth:`mixture`, :meth:`norms`)."""
        if tokens is None:
            tokens = torch.arange(idx.shape[0], device=idx.device)
        rows = tokens.unsqueeze(1).expand_as(idx)
        pos = self.slot[rows, idx]
        out = torch.empty(*idx.shape, self.x.shape[1], dtype=torch.float64, device=self.x.device)
        hit = pos >= 0
        if bool(hit.any()):
            out[hit] = self.buf.index_select(0, pos[hit]).double()
        miss = ~hit
        if bool(miss.any()):
            n_tok = self.x.shape[0]
            pairs, inverse = torch.unique(idx[miss] * n_tok + rows[miss], return_inverse=True)  # each pair once
            tok, e = pairs % n_tok, pairs // n_tok
            fresh = None
            for ex in torch.unique(e).tolist():
                sel = (e == ex).nonzero().squeeze(1)
                y = self.blk.expert_out(ex, self.blk.expert_hidden(ex, self.inputs(ex, tok[sel]))).detach()
                if fresh is None:
                    fresh = torch.empty(pairs.numel(), self.x.shape[1], dtype=y.dtype, device=self.x.device)
                elif torch.promote_types(y.dtype, fresh.dtype) != fresh.dtype:
                    fresh = fresh.to(torch.promote_types(y.dtype, fresh.dtype))
                fresh[sel] = y
            self.computed += pairs.numel()
            self._store(tok, e, fresh)
            out[miss] = fresh.double()[inverse]
        return out

    def _chunk(self, k: int) -> int:
        """Token rows whose ``(rows, k, H)`` float64 outputs take about :data:`GATHER_CHUNK_BYTES`."""
        return max(1, GATHER_CHUNK_BYTES // max(1, 8 * k * self.x.shape[1]))

    def inputs(self, expert: int, tokens: torch.Tensor) -> torch.Tensor:
        """What ``expert`` reads on the token rows ``tokens``: the rows, times its scores where they scale the
        experts' inputs (``scale``)."""
        x = self.x[tokens]
        return x if self.scale is None else x * self.scale[tokens, expert].to(x.dtype).unsqueeze(1)

    def out_weights(self, w: torch.Tensor) -> torch.Tensor:
        """The weights of the experts' outputs in a routed sum of routing weights ``w``: ``w``, or ones where the
        routing weights scale the experts' inputs (``scale``)."""
        return w if self.scale is None else torch.ones_like(w)

    def mixture(self, w: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``(m, H)``: the routed sum ``sum_j w_j y_{idx_j}`` on the token rows ``tokens`` (all by default;
        float64; the weights :meth:`out_weights`), in chunks of tokens."""
        if tokens is None:
            tokens = torch.arange(idx.shape[0], device=idx.device)
        wd = self.out_weights(w).double()
        out = torch.empty(idx.shape[0], self.x.shape[1], dtype=torch.float64, device=self.x.device)
        step = self._chunk(idx.shape[1])
        for c in range(0, idx.shape[0], step):
            s = slice(c, c + step)
            out[s] = torch.bmm(wd[s].unsqueeze(1), self.gather(idx[s], tokens[s])).squeeze(1)
        return out

    def norms(self, idx: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` float64: the norms ``||y_{idx_tj}(x_t)||`` of the experts ``idx`` ``(n, k)`` on every token
        row, in chunks of tokens."""
        out = torch.empty(idx.shape, dtype=torch.float64, device=self.x.device)
        step = self._chunk(idx.shape[1])
        for c in range(0, idx.shape[0], step):
            tokens = torch.arange(c, min(c + step, idx.shape[0]), device=idx.device)
            out[c:c + step] = self.gather(idx[c:c + step], tokens).norm(dim=2)
        return out


class PairProducts:
    """Per token ``t``, the inner products ``<T_t, y_e(x_t)>`` and ``<y_e(x_t), y_f(x_t)>`` of the target and the
    outputs of the experts ``e``, ``f`` it has been routed to by some kept set so far, computed (from
    :class:`ExpertOutputs`) when an expert is first asked for on the token; the squared error of any routing among
    those experts is then ``||T_t||^2 - 2 sum_j w_j <T_t, y_j> + sum_jl w_j w_l <y_j, y_l>``: ``k^2`` numbers a
    token, whatever the hidden width. Each token's experts have local slots ``0, 1, ...`` (grown as needed), and
    ``experts[t, s]`` is the expert of slot ``s`` (``-1`` for none)."""

    def __init__(self, outs: ExpertOutputs, target: torch.Tensor) -> None:
        n, dev = target.shape[0], target.device
        self.outs, self.target = outs, target
        self.tt = target.square().sum(1)
        self.local = torch.full((n, outs.blk.n_experts), -1, dtype=torch.long, device=dev)
        self.count = torch.zeros(n, dtype=torch.long, device=dev)
        self._alloc(8)

    def _alloc(self, width: int) -> None:
        """(Re)allocate the per-token tables for ``width`` local slots, keeping what they hold."""
        n, dev, old = self.tt.shape[0], self.tt.device, getattr(self, "experts", None)
        experts = torch.full((n, width), -1, dtype=torch.long, device=dev)
        a = torch.zeros(n, width, dtype=torch.float64, device=dev)
        g = torch.zeros(n, width, width, dtype=torch.float64, device=dev)
        if old is not None:
            w0 = old.shape[1]
            experts[:, :w0], a[:, :w0], g[:, :w0, :w0] = old, self.a, self.g
        self.experts, self.a, self.g = experts, a, g

    def _add(self, tokens: torch.Tensor, idx: torch.Tensor) -> None:
        """Give every (token, expert) pair of ``tokens`` ``(m,)`` and ``idx`` ``(m, k)`` without one a local slot,
        and compute the products of every token that got one (with the target, and between all its experts) from
        its experts' outputs, in chunks of tokens."""
        pair_tok = tokens.unsqueeze(1).expand_as(idx)
        missing = self.local[pair_tok, idx] < 0
        if not bool(missing.any()):
            return
        n = self.tt.shape[0]
        code = torch.unique(idx[missing] * n + pair_tok[missing])  # each new pair once, sorted by expert then token
        tok, e = code % n, code // n
        order = torch.argsort(tok, stable=True)
        tok, e = tok[order], e[order]
        first = torch.searchsorted(tok, tok)  # the rank of each new pair among its token's new pairs
        slot = self.count[tok] + torch.arange(tok.numel(), device=tok.device) - first
        self.count.index_add_(0, tok, torch.ones_like(tok))
        if int(self.count.max()) > self.experts.shape[1]:
            self._alloc(max(int(self.count.max()), 2 * self.experts.shape[1]))
        self.local[tok, e] = slot
        self.experts[tok, slot] = e
        grown, n_new = torch.unique_consecutive(tok, return_counts=True)
        width, new_width = int(self.count[grown].max()), int(n_new.max())
        step = self.outs._chunk(width)
        for c in range(0, grown.numel(), step):
            t = grown[c:c + step]
            ex = self.experts[t, :width]
            used = ex >= 0
            y = self.outs.gather(torch.where(used, ex, ex[:, :1]), t) * used.unsqueeze(2)  # (c, width, H)
            # the token's new slots (its last n_new ones; padded with its last slot), against all its slots
            new = (self.count[t] - n_new[c:c + step]).unsqueeze(1) + torch.arange(new_width, device=t.device)
            new = torch.minimum(new, (self.count[t] - 1).unsqueeze(1))
            y_new = y.gather(1, new.unsqueeze(2).expand(-1, -1, y.shape[2]))  # (c, new_width, H)
            prod = torch.bmm(y_new, y.transpose(1, 2))  # (c, new_width, width)
            rows = t.unsqueeze(1).expand_as(new)
            self.a[rows, new] = torch.bmm(y_new, self.target[t].unsqueeze(2)).squeeze(2)
            self.g[rows, new, :width] = prod
            self.g[rows.unsqueeze(2), torch.arange(width, device=t.device), new.unsqueeze(2)] = prod

    def squared_errors(self, w: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(m,)``: ``||T_t - sum_j w_j y_{idx_j}(x_t)||^2`` for the token rows ``tokens`` (float64, >= 0)."""
        self._add(tokens, idx)
        loc = self.local[tokens.unsqueeze(1), idx]  # (m, k)
        t = tokens.unsqueeze(1)
        a = self.a[t, loc]
        g = self.g[t.unsqueeze(2), loc.unsqueeze(2), loc.unsqueeze(1)]  # (m, k, k)
        wd = w.double()
        err = self.tt[tokens] - 2.0 * (wd * a).sum(1) + torch.einsum("mk,mkl,ml->m", wd, g, wd)
        return err.clamp_min(0.0)


class RoutedError:
    """The squared error ``||T_t - sum_j w_j y_{e_j}(x_t)||^2`` per token of the routing among kept sets of
    experts (``route``: a :class:`RestrictedRouter`; ``outs``: the experts' outputs on the tokens; ``target``:
    ``T``), from the inner products of :class:`PairProducts`. A kept set's state is its routing and per-token
    errors; :meth:`moved` computes another set's from a state, recomputing the errors only of the tokens whose
    routing changed."""

    def __init__(self, route: RestrictedRouter, outs: ExpertOutputs, target: torch.Tensor) -> None:
        self.route, self.outs, self.target = route, outs, target
        self._products = PairProducts(outs, target).squared_errors

    def _sq(self, w: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The squared errors of the routing ``(w, idx)`` on the token rows ``tokens``."""
        return self._products(self.outs.out_weights(w), idx, tokens)

    def state(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights, experts, per-token squared errors)`` of the kept set ``keep``."""
        w, idx = self.route(keep)
        return w, idx, self._sq(w, idx, torch.arange(idx.shape[0], device=idx.device))

    def moved(self, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keep: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The state of ``keep`` from the state ``base`` of another kept set."""
        w, idx = self.route(keep)
        changed = ((idx != base[1]) | (w != base[0])).any(1).nonzero().squeeze(1)
        sq = base[2].clone()
        if changed.numel():
            sq[changed] = self._sq(w[changed], idx[changed], changed)
        return w, idx, sq

    def without(self, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keep: torch.Tensor, removed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The state of ``keep``, the experts of ``base`` but ``removed``, assuming that only the tokens routed to
        ``removed`` change their routing (the router is called on those alone): exact for a router whose routing
        of a token depends only on its own experts' scores, such as a renormalised top-k (see
        :func:`search_kept`)."""
        tokens = (base[1] == removed).any(1).nonzero().squeeze(1)
        w, idx, sq = base[0].clone(), base[1].clone(), base[2].clone()
        if tokens.numel():
            w_t, idx_t = self.route(keep, tokens)
            w[tokens], idx[tokens] = w_t.to(w.dtype), idx_t
            sq[tokens] = self._sq(w_t, idx_t, tokens)
        return w, idx, sq

    def extended(self, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keep: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """The routing of every token among the experts ``keep`` of the state ``base`` to one more expert than
        ``base``'s (its router with its top-k one larger), and the rule of :func:`drop_column` that gives
        ``base``'s routing back when each token's extra expert is dropped: ``(weights, experts, rule)``, or
        ``None`` where there is none (no top-k attribute, a token's experts not among its extended ones, neither
        rule), that is where the router does not rank the experts by a score of their own."""
        n, k = base[1].shape
        try:
            w2, idx2 = self.route(keep, top_k=(k, k + 1))
        except ValueError:
            return None
        if idx2.shape != (n, k + 1):
            return None
        idx2 = idx2.to(base[1].device)
        in_base = (idx2.unsqueeze(2) == base[1].unsqueeze(1)).any(2)  # (n, k + 1)
        if not bool((in_base.sum(1) == k).all()):
            return None
        extra = (~in_base).to(torch.int8).argmax(1)
        for rule in ("rescale", "keep"):
            if same_routing(drop_column(w2, idx2, extra, rule), base[:2]):
                return w2, idx2, rule
        return None

    def removal_deltas(self, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       ext: tuple[torch.Tensor, torch.Tensor, str]) -> torch.Tensor:
        """``(E,)`` float64: for each expert ``j``, the change of the summed squared error when ``j`` is removed
        from the kept set of state ``base``, each token routed to ``j`` re-routed as ``ext`` (:meth:`extended`)
        without ``j``, the others left as they are: every candidate removal of a step at once, ``k`` routings a
        token, in chunks of :data:`CANDIDATE_CHUNK`; ``+inf`` where a routing's error is not finite."""
        w2, idx2, rule = ext
        n, k = base[1].shape
        pos = (base[1].unsqueeze(2) == idx2.unsqueeze(1)).to(torch.int8).argmax(2).reshape(-1)  # (n k,)
        tok = torch.arange(n, device=idx2.device).repeat_interleave(k)
        removed = base[1].reshape(-1)
        delta = torch.zeros(self.route.n_experts, dtype=torch.float64, device=idx2.device)
        for c in range(0, n * k, CANDIDATE_CHUNK):
            t = tok[c:c + CANDIDATE_CHUNK]
            w, idx = drop_column(w2[t], idx2[t], pos[c:c + CANDIDATE_CHUNK], rule)
            delta.index_add_(0, removed[c:c + CANDIDATE_CHUNK], self._sq(w, idx, t) - base[2][t])
        return torch.where(torch.isfinite(delta), delta, torch.inf)

    def predicted(self, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  ext: tuple[torch.Tensor, torch.Tensor, str], removed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing of every token that :meth:`removal_deltas` assumed for the removal of ``removed``, and
        the token rows it changed: ``(weights, experts, rows)``."""
        w2, idx2, rule = ext
        rows = (base[1] == removed).any(1).nonzero().squeeze(1)
        w, idx = base[0].clone(), base[1].clone()
        if rows.numel():
            w_r, idx_r = drop_column(w2[rows], idx2[rows], (idx2[rows] == removed).to(torch.int8).argmax(1), rule)
            w[rows], idx[rows] = w_r.to(w.dtype), idx_r
        return w, idx, rows

    def ranking(self, full: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """Each token's ranking of every expert, ``(weights, experts, rule)`` ``(n, E)``: the router (all experts
        kept) with its top-k raised to every expert, in its own order or else by decreasing weight, whichever, with
        a rule of :func:`drop_column`, gives the routing of state ``full`` back from its first ``k``; ``None`` if
        none does (cached)."""
        if not hasattr(self, "_ranking"):
            self._ranking = None
            n, k = full[1].shape
            every = torch.arange(self.route.n_experts)
            try:
                w, idx = self.route(every, top_k=(k, self.route.n_experts))
            except ValueError:
                w = idx = None
            if idx is not None and idx.shape == (n, self.route.n_experts):
                idx = idx.to(full[1].device)
                by_weight = w.argsort(dim=1, descending=True, stable=True)
                for ww, ii in ((w, idx), (w.gather(1, by_weight), idx.gather(1, by_weight.to(idx.device)))):
                    kept = torch.ones(1, self.route.n_experts, dtype=torch.bool, device=ii.device)
                    rule = next((r for r in ("rescale", "keep")
                                 if same_routing(tuple(t[0] for t in first_kept(ww, ii, kept, k, r)), full[:2])),
                                None)
                    if rule is not None:
                        self._ranking = (ww, ii, rule)
                        break
        return self._ranking

    def subset_errors(self, rank: tuple[torch.Tensor, torch.Tensor, str], keeps: torch.Tensor, k: int
                      ) -> torch.Tensor:
        """``(c,)`` float64: the summed squared error of each kept set ``keeps`` ``(c, m)``, every token routed to
        its first ``k`` kept experts of its ranking ``rank`` (:meth:`ranking`), in chunks of
        :data:`ENUMERATION_CHUNK` entries; ``+inf`` where not finite."""
        w, idx, rule = rank
        n, e = idx.shape
        kept = torch.zeros(keeps.shape[0], e, dtype=torch.bool, device=idx.device)
        kept.scatter_(1, keeps.to(idx.device), True)
        step = max(1, ENUMERATION_CHUNK // max(1, n * e))
        out = torch.empty(keeps.shape[0], dtype=torch.float64, device=idx.device)
        tokens = torch.arange(n, device=idx.device)
        for c in range(0, keeps.shape[0], step):
            wk, ik = first_kept(w, idx, kept[c:c + step], k, rule)
            m = wk.shape[0]
            sq = self._sq(wk.reshape(m * n, k), ik.reshape(m * n, k), tokens.repeat(m))
            out[c:c + m] = sq.view(m, n).sum(1)
        return torch.where(torch.isfinite(out), out, torch.inf)


def _is_top_k(name: str) -> bool:
    """Whether integer attribute ``name`` of a router can be the number of experts it routes each token to."""
    return ("top" in name or "per_tok" in name or name in ("k", "moe_k", "n_activated_experts")) and (
        "group" not in name)


class RestrictedRouter:
    """Calls a mixture's router restricted to a kept set of experts, as the pruned layer would: a copy of the
    router whose per-expert rows are cut (:func:`drop_experts`), called with the router's recorded arguments (its
    per-expert tensor arguments, such as AFMoE's expert bias, cut the same way); the experts it returns are
    mapped back to the original indices."""

    def __init__(self, router: nn.Module, n_experts: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.router, self.n_experts, self.args, self.kwargs = router, n_experts, args, kwargs

    def _cut(self, value: Any, keep: torch.Tensor) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == self.n_experts:
            return value[keep.to(value.device)]
        return value

    def __call__(self, keep: torch.Tensor, tokens: torch.Tensor | None = None, top_k: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, experts)`` ``(m, k)`` of the routing among experts ``keep`` (sorted) of the token rows
        ``tokens`` (all by default). With ``top_k=(k, k2)``, a copy whose integer attributes equal to ``k`` and
        named as a top-k (``top_k``, ``num_experts_per_tok``...) are ``k2`` routes each token to ``k2`` experts;
        a ``ValueError`` if the router has no such attribute."""
        r = self.router
        if keep.numel() < self.n_experts or top_k is not None:  # a copy: the router itself stays whole
            r = copy.deepcopy(r)
            drop_experts(r, self.n_experts, keep)
        if top_k is not None:
            found = [(sub, name) for sub in r.modules() for name, v in vars(sub).items()
                     if type(v) is int and v == top_k[0] and _is_top_k(name)]
            if not found:
                raise ValueError(f"the router has no attribute holding its top-k ({top_k[0]})")
            for sub, name in found:
                setattr(sub, name, top_k[1])
        first = self.args[0]
        if tokens is not None:  # the rows asked for, in the layout recorded
            first = first.reshape(-1, first.shape[-1])[tokens].reshape(*first.shape[:-2], -1, first.shape[-1])
        args = [self._cut(a, keep) for a in (first, *self.args[1:])]
        kwargs = {k: self._cut(v, keep) for k, v in self.kwargs.items()}
        n_tokens = first.reshape(-1, first.shape[-1]).shape[0]
        try:
            out = r(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever the model's router raises, said with its reason
            raise ValueError(f"the router cannot route among {keep.numel()} of its {self.n_experts} experts "
                             f"({type(exc).__name__}: {exc})") from exc
        got = routing_of(out, n_tokens)
        if got is None:
            raise ValueError("the router's output has no (weights, experts) pair")
        w, idx = got
        return w, keep.to(idx.device)[idx]


def search_kept(errors: RoutedError, n_experts: int, n_keep: int) -> tuple[np.ndarray, float, str]:
    """The kept set of ``n_keep`` experts of least routed error: every set when there are at most
    :data:`EXHAUSTIVE_LIMIT` (all routed at once from each token's ranking where the router allows it:
    :func:`_best_of_size`), else backward elimination. Returns the kept experts (sorted), their error and how they
    were found (``"exhaustive"`` or ``"greedy"``). Ties go to the set found first (the lexicographically smallest
    removal).

    Backward elimination evaluates a step's candidate removals all at once where it can (:data:`SEARCH`
    ``"batched"``): a router that ranks the experts by a score of their own and renormalises the weights over each
    token's experts (Mixtral, Qwen3-MoE with ``norm_topk_prob``, DeepSeek-V3, GPT-OSS...) routes a token whose
    expert ``j`` is removed to its other experts and the next one in its ranking, with the weights rescaled to the
    same total; so one call of the router, with its top-k one larger (:meth:`RoutedError.extended`), gives every
    candidate's routing of every token (:func:`drop_column`), and their errors are computed together
    (:meth:`RoutedError.removal_deltas`): no call per candidate. Whether the router is of that kind is checked:
    dropping each token's extra expert must give the current routing back (which also tells whether the weights are
    rescaled or kept as they are, as sigmoid scores without renormalisation are), at the first step every
    candidate's routing must be the router's own (called on the tokens routed to the removed expert), and at every
    step the removal chosen is routed on every token and compared. The first time a check fails (no top-k attribute
    on the router: Gemma 4's is in its config; a softmax over all the kept experts without renormalisation:
    Qwen2-MoE's and OLMoE's default; PhiMoE's sparsemixer) the search goes on evaluating each candidate on the
    tokens routed to the removed expert alone (``"local"``: one router call on about ``k / E`` of the tokens),
    checking at every step, by routing every token for the removal chosen, that no other token's routing changed;
    the first time one did (a softmax over all the experts without renormalisation, group-limited routing), the
    step is redone, and the rest of the search, with every token routed for every candidate (``"full"``). Each
    step's state is the exact routing of every token, and the kept set's error is exact.
    """
    everything = np.arange(n_experts)
    full = errors.state(torch.as_tensor(everything))
    if n_keep >= n_experts:
        return everything, float(full[2].sum()), "exhaustive"
    if math.comb(n_experts, n_keep) <= EXHAUSTIVE_LIMIT:
        return (*_best_of_size(errors, full, n_experts, n_keep), "exhaustive")
    kept, err = elimination_path(errors, full, n_experts, n_keep)[-1]
    return kept, err, "greedy"


def _best_of_size(errors: RoutedError, full: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_experts: int,
                  n_keep: int) -> tuple[np.ndarray, float]:
    """The kept set of ``n_keep`` experts of least error, every one tried (the first found on ties): all at once
    from each token's ranking (:meth:`RoutedError.ranking`, :meth:`RoutedError.subset_errors`) where the router
    has one, checked on a few kept sets and on the one chosen against the router's own routing; else (or if a
    check fails) the router called on each kept set."""
    everything = np.arange(n_experts)
    # every kept set, in the lexicographic order of the sets removed (the reverse of the kept sets' order)
    combos = np.array(list(itertools.combinations(range(n_experts), n_keep))[::-1], dtype=np.int64)
    rank = errors.ranking(full) if BATCHED_ENUMERATION else None
    if rank is not None:
        k = full[1].shape[1]
        keeps = torch.as_tensor(combos)

        def assumed(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # the routing assumed for kept set i
            kept = torch.zeros(1, n_experts, dtype=torch.bool, device=rank[1].device)
            w, idx = first_kept(rank[0], rank[1], kept.index_fill_(1, keeps[i].to(kept.device), True), k, rank[2])
            return w[0], idx[0]

        sample = sorted({0, len(combos) // 3, 2 * len(combos) // 3, len(combos) - 1})
        if all(same_routing(errors.route(keeps[i]), assumed(i)) for i in sample):
            i = int(np.argmin(errors.subset_errors(rank, keeps, k).cpu().numpy()))
            exact = errors.moved(full, keeps[i])  # the router's own routing of the set chosen
            if same_routing(exact[:2], assumed(i)):
                return combos[i], float(exact[2].sum())
    best, best_err = everything, math.inf
    for keep in combos:
        err = float(errors.moved(full, torch.as_tensor(keep))[2].sum())
        if err < best_err:
            best, best_err = keep, err
    return best, best_err


def elimination_path(errors: RoutedError, full: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_experts: int,
                     n_min: int) -> list[tuple[np.ndarray, float]]:
    """Backward elimination from every expert (state ``full``) down to ``n_min`` kept: the kept experts and their
    error after each removal (``n_experts - n_min`` entries; see :func:`search_kept`)."""
    kept, state, mode, verified = list(range(n_experts)), full, SEARCH, False
    path: list[tuple[np.ndarray, float]] = []

    def others(i: int) -> torch.Tensor:  # the kept experts but the i-th
        return torch.as_tensor(kept[:i] + kept[i + 1:])

    while len(kept) > n_min:
        if mode == "batched":  # every candidate at once, from the routing among one more expert per token
            ext = errors.extended(state, torch.as_tensor(kept))
            if ext is not None and not verified:  # the first step: each candidate's routing from the router too
                verified = True
                for c, j in enumerate(kept):
                    w, idx, rows = errors.predicted(state, ext, j)
                    if rows.numel() and not same_routing(errors.route(others(c), rows), (w[rows], idx[rows])):
                        ext = None
                        break
            if ext is None:
                mode = "local"
            else:
                i = int(np.argmin(errors.removal_deltas(state, ext)[torch.as_tensor(kept)].cpu().numpy()))
                exact = errors.moved(state, others(i))  # every token re-routed: as the step assumed?
                if not same_routing(exact[:2], errors.predicted(state, ext, kept[i])[:2]):
                    mode = "local"
        if mode == "local":  # each candidate re-routes only the tokens routed to the expert it removes
            errs = [float(errors.without(state, others(c), j)[2].sum()) for c, j in enumerate(kept)]
            i = int(np.argmin(errs))
            chosen = errors.without(state, others(i), kept[i])
            exact = errors.moved(state, others(i))  # every token re-routed: were the others left as they were?
            if not same_routing(exact[:2], chosen[:2]):
                mode = "full"
        if mode == "full":  # a router that re-routes other tokens too: every token for every candidate, from now on
            states = [errors.moved(state, others(c)) for c in range(len(kept))]
            i = int(np.argmin([float(st[2].sum()) for st in states]))
            exact = states[i]
            del states
        state = exact
        del kept[i]
        path.append((np.asarray(kept), float(state[2].sum())))
    return path


def error_curve(errors: RoutedError, n_experts: int, n_min: int) -> np.ndarray:
    """``curve[m]``: the least routed error found with ``m`` experts kept, ``m = n_min..n_experts`` (every kept set
    of that size tried where there are at most :data:`EXHAUSTIVE_LIMIT`, else backward elimination's, which is
    run once for all sizes); below ``n_min`` (fewer experts than a token is routed to) a steep line, so that an
    allocation never goes there: what ``allocation="error-curve"`` splits the kept experts with."""
    everything = np.arange(n_experts)
    full = errors.state(torch.as_tensor(everything))
    curve = np.empty(n_experts + 1)
    curve[n_experts] = float(full[2].sum())
    path = None
    for m in range(n_experts - 1, n_min - 1, -1):
        if math.comb(n_experts, m) <= EXHAUSTIVE_LIMIT:
            curve[m] = _best_of_size(errors, full, n_experts, m)[1]
        else:
            path = path or elimination_path(errors, full, n_experts, n_min)
            curve[m] = path[n_experts - m - 1][1]
    step = (float(curve[n_min:].max()) + 1.0) * 1e6
    curve[:n_min] = curve[n_min] + step * np.arange(n_min, 0, -1)
    return curve
