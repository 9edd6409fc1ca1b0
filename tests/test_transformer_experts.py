"""Whole-expert pruning of mixture-of-experts layers (``prune_transformer(..., target="experts")``): each mixture
keeps a fraction of its experts, the router loses the others' rows and routes every token among the kept ones;
tiny randomly initialised models (no download).

Oracles: Mixtral's mixture written out here in float64 (softmax of the router logits of the kept experts, top-k,
renormalised, the experts' SwiGLU), which the pruned model must compute, and from which the error of every kept set
is enumerated (the optimum the exhaustive search must find) or removed expert by expert (the backward elimination
the greedy search must reproduce); the experts modules' outputs read with hooks in the original and pruned models
(the reported error, for every family); weight norms and routed output masses computed here (the baselines); the
saved and reloaded model and greedy generation with and without the cache.
"""

from __future__ import annotations

import copy
import itertools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import assert_reloads_and_generates, ragged_token_batches, run_hooked
from test_transformer_moe import FAMILIES, VOCAB
from test_transformer_moe import build as build_moe
from torch import nn

import nn_adapters._experts as experts_mod
from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import allocate_units, apply_spec, make_spec, prune_transformer

transformers = pytest.importorskip("transformers")

EIGHT = dict(num_local_experts=8, num_experts=8, n_routed_experts=8, moe_num_experts=8)


def mixtral(lm: bool = False) -> nn.Module:
    return build_moe("mixtral", lm=lm, **EIGHT)


def data(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return ragged_token_batches(VOCAB, n_batches=n, b=4, t=9, seed=3)


def moe_blocks(model: nn.Module) -> list:
    return [b for b in find_blocks(model) if b.moe]


def real(batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The real tokens' rows of a (batch, tokens, H) or (tokens, H) tensor of a batch."""
    return x.reshape(-1, x.shape[-1])[batch["attention_mask"].reshape(-1).bool()]


def mlp_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    """Per mixture block, the real tokens' rows of its mixture module's input (float64)."""
    seen: list[list[torch.Tensor]] = [[] for _ in moe_blocks(model)]
    handles = [b.module.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
               for i, b in enumerate(moe_blocks(model))]
    run_hooked([model], batches, handles)
    return [torch.cat([real(bt, x) for bt, x in zip(batches, xs, strict=True)]).double().numpy() for xs in seen]


def mixture(x: np.ndarray, mlp: nn.Module, keep: list[int] | np.ndarray, top_k: int = 2,
            renormalise: bool = True) -> np.ndarray:
    """Mixtral's mixture restricted to the experts ``keep``, written out: the softmax of the kept experts' router
    logits, the top ``top_k``, renormalised (not: Qwen2-MoE's default), times each chosen expert's
    ``down(silu(gate x) * up x)``."""
    keep = np.asarray(keep)
    w_r = mlp.gate.weight.detach().double().numpy()[keep]
    gate_up = mlp.experts.gate_up_proj.detach().double().numpy()[keep]
    down = mlp.experts.down_proj.detach().double().numpy()[keep]
    logits = x @ w_r.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, top, 1)
    if renormalise:
        w /= w.sum(1, keepdims=True)
    half = gate_up.shape[1] // 2
    out = np.zeros_like(x)
    for j in range(top_k):
        for e in np.unique(top[:, j]):
            t = top[:, j] == e
            h = F.silu(torch.from_numpy(x[t] @ gate_up[e, :half].T)).numpy() * (x[t] @ gate_up[e, half:].T)
            out[t] += w[t, j:j + 1] * (h @ down[e].T)
    return out


def set_errors(x: np.ndarray, target: np.ndarray, mlp: nn.Module, n_keep: int) -> dict[tuple[int, ...], float]:
    """The squared error of every kept set of ``n_keep`` experts."""
    n = mlp.experts.down_proj.shape[0]
    return {keep: float(((target - mixture(x, mlp, keep)) ** 2).sum())
            for keep in itertools.combinations(range(n), n_keep)}


def backward_elimination(x: np.ndarray, target: np.ndarray, mlp: nn.Module, n_keep: int,
                         renormalise: bool = True, path: list | None = None) -> tuple[list[int], float]:
    """Remove, one at a time, the expert whose removal leaves the smallest error (each step's kept experts and
    error appended to ``path`` if given)."""
    kept = list(range(mlp.experts.down_proj.shape[0]))
    err = 0.0
    while len(kept) > n_keep:
        errs = [float(((target - mixture(x, mlp, [e for e in kept if e != j], renormalise=renormalise)) ** 2).sum())
                for j in kept]
        err = min(errs)
        kept.remove(kept[errs.index(err)])
        if path is not None:
            path.append((tuple(kept), err))
    return kept, err


def test_the_pruned_model_routes_among_the_kept_experts() -> None:
    """Without refit, the pruned model is the original one whose mixtures are Mixtral's mixture over the kept
    experts only."""
    model, batches = mixtral(), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", reweight=False)
    kept = [u.kept for u in report.units]
    assert [(u.stage, u.n_units, u.n_kept, len(u.kept)) for u in report.units] == [("experts", 8, 4, 4)] * 2
    assert [b.n_experts for b in moe_blocks(pruned)] == [4, 4]
    reference = copy.deepcopy(model)
    for blk, keep in zip(moe_blocks(reference), kept, strict=True):
        mlp = blk.module.mlp
        mlp.register_forward_hook(lambda m, args, _out, keep=keep: torch.from_numpy(mixture(
            args[0].reshape(-1, args[0].shape[-1]).double().numpy(), m, keep)).float().reshape(args[0].shape))
    with torch.no_grad():
        for b in batches:
            got, want = pruned(**b).last_hidden_state, reference(**b).last_hidden_state
            torch.testing.assert_close(real(b, got), real(b, want), atol=1e-4, rtol=1e-4)
    assert report.params_after < report.params_before


def test_layer_mode_finds_the_best_kept_set_of_every_mixture() -> None:
    """8 experts, 4 kept: all 70 kept sets are tried; the kept set of each block is the one of least error on the
    original network's tokens, and the reported relative error is that error over the target's energy."""
    model, batches = mixtral(), data()
    _, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer", reweight=False)
    for u, blk, x in zip(report.units, moe_blocks(model), mlp_inputs(model, batches), strict=True):
        target = mixture(x, blk.module.mlp, range(8))
        errs = set_errors(x, target, blk.module.mlp, 4)
        best = min(errs, key=errs.get)
        assert u.search == "exhaustive"
        assert tuple(u.kept) == best
        assert u.relative_error == pytest.approx(errs[best] / float((target ** 2).sum()), rel=1e-4)
        assert sorted(errs.values())[1] > errs[best] * (1 + 1e-6)  # no tie: the optimum is unique


def test_above_the_enumeration_limit_experts_are_removed_one_at_a_time(monkeypatch) -> None:
    """With enumeration off, the kept set is backward elimination's (written out here), and its error is at least
    the optimum over every kept set."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 0)
    model, batches = mixtral(), data()
    _, report = prune_transformer(model, batches, keep=0.375, target="experts", method="layer", reweight=False)
    for u, blk, x in zip(report.units, moe_blocks(model), mlp_inputs(model, batches), strict=True):
        mlp = blk.module.mlp
        target = mixture(x, mlp, range(8))
        kept, err = backward_elimination(x, target, mlp, 3)
        assert u.search == "greedy" and u.n_kept == 3
        assert u.kept == sorted(kept)
        energy = float((target ** 2).sum())
        assert u.relative_error == pytest.approx(err / energy, rel=1e-4)
        assert u.relative_error >= min(set_errors(x, target, mlp, 3).values()) / energy * (1 - 1e-6)


def counting_router_calls(monkeypatch) -> list[tuple[int, int | None]]:
    """Record each call of the restricted router: (tokens routed, top-k asked for or None)."""
    routed: list[tuple[int, int | None]] = []
    call = experts_mod.RestrictedRouter.__call__

    def counting(self, keep, tokens=None, top_k=None):
        n = self.args[0].reshape(-1, self.args[0].shape[-1]).shape[0] if tokens is None else len(tokens)
        routed.append((n, None if top_k is None else top_k[1]))
        return call(self, keep, tokens, top_k)

    monkeypatch.setattr(experts_mod.RestrictedRouter, "__call__", counting)
    return routed


def test_a_renormalised_router_is_searched_on_the_tokens_of_the_removed_expert(monkeypatch) -> None:
    """Mixtral's routing renormalises over each token's own top-2: a candidate removal re-routes only the tokens
    routed to the removed expert, so the local search calls the router on those (about a quarter of the tokens
    with 8 experts, top-2) for every candidate, and on every token once per step (the check)."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 0)
    monkeypatch.setattr(experts_mod, "SEARCH", "local")
    calls = counting_router_calls(monkeypatch)
    model, batches = mixtral(), data()
    _, report = prune_transformer(model, batches, keep=0.375, target="experts", method="layer", reweight=False)
    routed = [n for n, _ in calls]
    n_tokens = max(routed)
    steps, candidates = 5, sum(range(4, 9))  # 8 -> 3 experts: 8 + 7 + 6 + 5 + 4 candidate removals
    full_calls = sum(1 for r in routed if r == n_tokens)
    assert full_calls <= 3 * len(report.units) + steps * len(report.units)  # the checks, first states, final routing
    local = [r for r in routed if r < n_tokens]
    assert len(local) >= candidates * len(report.units) - 2  # a candidate whose expert routes every token: full
    assert sum(local) < 0.5 * n_tokens * candidates * len(report.units)


def test_a_renormalised_router_is_searched_batched_after_its_first_step(monkeypatch) -> None:
    """The default search evaluates a step's candidates at once, from the routing to top-3 among the kept experts:
    the router is called per candidate at the first step alone (to check the batched routings), then twice a step
    (the top-3 routing and the check of the removal chosen); its kept sets are the local search's and the backward
    elimination written out here, for Mixtral (softmax renormalised) and for Qwen3-MoE with and without
    renormalisation (the ``rescale`` and ``keep`` rules; Qwen3-MoE without it re-routes every token: not batched)."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 0)
    routed = counting_router_calls(monkeypatch)
    model, batches = mixtral(), data()
    _, report = prune_transformer(model, batches, keep=0.375, target="experts", method="layer", reweight=False)
    n_tokens = max(n for n, _ in routed)
    steps, first = 5, 8  # 8 -> 3 experts; the first step's 8 candidates routed one by one
    assert sum(1 for _, k in routed if k == 3) == steps * len(report.units)
    per_candidate = [n for n, k in routed if k is None and n < n_tokens]
    assert len(per_candidate) <= first * len(report.units)
    for u, blk, x in zip(report.units, moe_blocks(model), mlp_inputs(model, batches), strict=True):
        target = mixture(x, blk.module.mlp, range(8))
        assert u.kept == sorted(backward_elimination(x, target, blk.module.mlp, 3)[0])
    for norm in (True, False):
        model = build_moe("qwen3_moe", norm_topk_prob=norm, **EIGHT)
        got = {}
        for search in ("batched", "local", "full"):
            monkeypatch.setattr(experts_mod, "SEARCH", search)
            routed.clear()
            _, report = prune_transformer(model, batches, keep=0.375, target="experts", method="layer",
                                          reweight=False)
            got[search] = [(u.kept, u.relative_error) for u in report.units]
            if search == "batched":
                calls = list(routed)
        for search in ("local", "full"):  # the same kept sets; errors up to float32 rounding (the experts' outputs
            # are computed in float32 on batches of tokens that differ between the searches)
            assert [kept for kept, _ in got[search]] == [kept for kept, _ in got["batched"]]
            assert [e for _, e in got[search]] == pytest.approx([e for _, e in got["batched"]], rel=1e-6)
        n_tokens = max(n for n, _ in calls)
        per_candidate = [n for n, k in calls if k is None and n < n_tokens]
        if norm:  # per candidate at the first step alone
            assert len(per_candidate) <= first * len(report.units)
        else:  # the first step's check fails: every token for every candidate (after that step's local search)
            assert sum(1 for n, k in calls if k is None and n == n_tokens) >= sum(range(4, 9)) * len(report.units)


def test_a_router_that_reroutes_every_token_is_searched_on_every_token(monkeypatch) -> None:
    """Qwen2-MoE's default routing (softmax over the kept experts, top-2, not renormalised) changes every token's
    weights when any expert goes: backward elimination must route every token for every candidate (the search
    notices it at its first step), and its kept set is the one written out here."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 0)
    model, batches = build_moe("qwen2_moe", norm_topk_prob=False, **EIGHT), data()
    _, report = prune_transformer(model, batches, keep=0.375, target="experts", method="layer", reweight=False)
    for u, blk, x in zip(report.units, moe_blocks(model), mlp_inputs(model, batches), strict=True):
        mlp = blk.module.mlp
        target = mixture(x, mlp, range(8), renormalise=False)
        kept, err = backward_elimination(x, target, mlp, 3, renormalise=False)
        assert u.search == "greedy" and u.kept == sorted(kept)
        assert u.relative_error == pytest.approx(err / float((target ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("mode", ["asym", "seq"])
def test_later_blocks_route_the_pruned_networks_tokens(mode: str) -> None:
    """The second mixture's kept set is the best one for the tokens of the network pruned before it (its mixture
    input in the pruned model), against the original mixture on the original tokens (asym) or the unpruned
    mixture on the same tokens (seq)."""
    model, batches = mixtral(), data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", method=mode, reweight=False)
    mlp = moe_blocks(model)[1].module.mlp
    x_orig, x_pruned = mlp_inputs(model, batches)[1], mlp_inputs(pruned, batches)[1]
    assert not np.allclose(x_orig, x_pruned)
    target = mixture(x_orig, mlp, range(8)) if mode == "asym" else mixture(x_pruned, mlp, range(8))
    errs = set_errors(x_pruned, target, mlp, 4)
    best = min(errs, key=errs.get)
    assert tuple(report.units[1].kept) == best
    assert report.units[1].relative_error == pytest.approx(errs[best] / float((target ** 2).sum()), rel=1e-4)


def expert_outputs(model: nn.Module, batches: list[dict[str, torch.Tensor]], block: int) -> np.ndarray:
    """The real tokens' rows of what the experts module of the ``block``-th mixture returns (float64)."""
    experts = moe_blocks(model)[block].experts
    seen: list[torch.Tensor] = []
    handle = experts.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    run_hooked([model], batches, [handle])
    return torch.cat([real(b, y) for b, y in zip(batches, seen, strict=True)]).double().numpy()


def gpt_oss(lm: bool = False) -> nn.Module:
    from test_transformer_gpt_oss import build
    return build(lm=lm)


def gemma4(lm: bool = False) -> nn.Module:
    from test_transformer_sandwich import MOE, _gemma4
    return _gemma4(lm, **MOE)


def mla_moe() -> nn.Module:
    from test_transformer_mla import build
    return build("deepseek_v3")


def nemotron_h() -> nn.Module:
    from test_transformer_nemotron_h import build
    return build()


def granite_hybrid() -> nn.Module:
    from test_transformer_hybrid import build
    return build("granite4", experts=4)


def dbrx() -> nn.Module:
    from test_transformer_dbrx import build
    return build()


OTHERS = {"gpt_oss": lambda: gpt_oss(), "gemma4": lambda: gemma4(), "deepseek_v3": mla_moe,
          "nemotron_h": nemotron_h, "granite4_hybrid": granite_hybrid, "dbrx": dbrx}


@pytest.mark.filterwarnings("ignore:.*layers of the model's stacks of blocks are not recognised:UserWarning")
@pytest.mark.parametrize("reweight", [True, False])
@pytest.mark.parametrize("name", [*FAMILIES, *OTHERS])
def test_the_reported_error_is_what_the_pruned_mixture_changes(name: str, reweight: bool) -> None:
    """Every family: the first mixture reads the same tokens in both models, so its reported relative error (the
    search's, or after the refit) is the squared change of its experts' output on the real tokens (padding
    excluded) over the original's energy; and the pruned model keeps half of every mixture's experts."""
    model = OTHERS[name]() if name in OTHERS else build_moe(name, **EIGHT)
    batches = data()
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer",
                                       reweight=reweight)
    n = moe_blocks(model)[0].n_experts
    assert [b.n_experts for b in moe_blocks(pruned)] == [n // 2] * len(moe_blocks(model))
    before, after = expert_outputs(model, batches, 0), expert_outputs(pruned, batches, 0)
    first = report.units[0]
    assert first.block == moe_blocks(model)[0].name and first.stage == "experts"
    assert first.relative_error == pytest.approx(float(((before - after) ** 2).sum() / (before ** 2).sum()),
                                                 rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: build_moe("mixtral", lm=True, **EIGHT), id="mixtral"),
    pytest.param(lambda: build_moe("qwen2_moe", lm=True, **EIGHT), id="qwen2_moe-shared"),
    pytest.param(lambda: build_moe("ernie4_5_moe", lm=True, **EIGHT), id="ernie-1xE-bias"),
    pytest.param(lambda: build_moe("afmoe", lm=True, **EIGHT), id="afmoe-expert-bias-argument"),
    pytest.param(lambda: build_moe("glm4_moe", lm=True, **EIGHT), id="glm4_moe-sigmoid"),
    pytest.param(lambda: gpt_oss(True), id="gpt_oss-biases"),
    pytest.param(lambda: gemma4(True), id="gemma4-router-outside"),
])
def test_save_reload_and_generation(tmp_path, make) -> None:
    model = make()
    pruned, report = prune_transformer(model, data(2), keep=0.5, target="experts")
    assert all(u.n_kept == u.n_units // 2 for u in report.units)
    assert all(w["experts"] == u.n_kept for w, u in zip(
        [w for w in report.spec["blocks"] if "experts" in w], report.units, strict=True))
    assert_reloads_and_generates(pruned, tmp_path / "m")


def test_baselines_pick_by_weight_norm_routed_mass_or_seed() -> None:
    model, batches = mixtral(), data()
    blocks = moe_blocks(model)
    _, mag = prune_transformer(model, batches, keep=0.5, target="experts", method="magnitude")
    for u, blk in zip(mag.units, blocks, strict=True):
        ex = blk.experts
        norm = (ex.gate_up_proj.detach().double() ** 2).sum((1, 2)) + (ex.down_proj.detach().double() ** 2).sum((1, 2))
        assert u.kept == sorted(torch.argsort(norm, descending=True)[:4].tolist())
    for keep in (0.25, 0.5, 0.75):  # the top 2, 4 and 6 of the ranking
        pruned, wanda = prune_transformer(model, batches, keep=keep, target="experts", method="wanda")
        # each block's tokens in the network pruned before it (asym propagation, the default)
        for u, x, blk in zip(wanda.units, mlp_inputs(pruned, batches), blocks, strict=True):
            mlp = blk.module.mlp
            mass = [float(np.linalg.norm(mixture(x, mlp, [e], top_k=1), axis=1)
                          @ np.where(top_e(x, mlp) == e, routed_weights(x, mlp), 0.0).sum(1)) for e in range(8)]
            assert u.kept == sorted(np.argsort(mass)[::-1][:round(8 * keep)].tolist())
    runs = [prune_transformer(model, batches, keep=0.5, target="experts", method="random", seed=s)[1] for s in
            (0, 0, 1, 2)]
    assert [u.kept for u in runs[0].units] == [u.kept for u in runs[1].units]
    assert len({tuple(tuple(u.kept) for u in r.units) for r in runs}) > 1


def routed_weights(x: np.ndarray, mlp: nn.Module) -> np.ndarray:
    """Mixtral's top-2 routing weights of every token (renormalised softmax)."""
    logits = x @ mlp.gate.weight.detach().double().numpy().T
    p = np.exp(logits - logits.max(1, keepdims=True))
    top = np.argsort(-p, axis=1, kind="stable")[:, :2]
    w = np.take_along_axis(p, top, 1)
    return w / w.sum(1, keepdims=True)


def top_e(x: np.ndarray, mlp: nn.Module) -> np.ndarray:
    logits = x @ mlp.gate.weight.detach().double().numpy().T
    return np.argsort(-logits, axis=1, kind="stable")[:, :2]


def test_keeping_every_expert_changes_nothing_and_the_input_model_is_untouched() -> None:
    model, batches = mixtral(), data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune_transformer(model, batches, keep=1.0, target="experts")
    assert [(u.n_kept, u.relative_error) for u in report.units] == [(8, 0.0), (8, 0.0)]
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(pruned(**b).last_hidden_state, model(**b).last_hidden_state)
    prune_transformer(model, batches, keep=0.5, target="experts")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_keeping_fewer_experts_than_a_token_is_routed_to_is_refused() -> None:
    with pytest.raises(ValueError, match=r"keep leaves 1 of its 8 experts, fewer than the 2 .* pass keep >= 0\.25"):
        prune_transformer(mixtral(), data(1), keep=0.1, target="experts")


def test_models_without_mixtures_are_refused() -> None:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no block of this model is a mixture of experts .* target='ffn'"):
        prune_transformer(transformers.LlamaModel(cfg).eval(), data(1), target="experts")


@pytest.mark.parametrize("limit", [512, 0])
@pytest.mark.parametrize("keep", [0.375, 0.5])
def test_error_curve_allocation_splits_the_experts_by_their_error_curves(monkeypatch, keep: float,
                                                                         limit: int) -> None:
    """allocation="error-curve": the same total of kept experts as uniform, split by marginal allocation over each
    mixture's curve of least routed error per number kept (every kept set tried here, on the original network's
    tokens; never fewer than the 2 a token is routed to); each mixture then keeps its best set of that size. The
    first mixture's outputs are shrunk so that the split is not the uniform one. Enumeration off (``limit`` 0):
    the curve and the kept sets are backward elimination's."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", limit)
    model, batches = mixtral(), data()
    with torch.no_grad():  # the first mixture's errors 100x smaller: the second one deserves more experts
        moe_blocks(model)[0].experts.down_proj.mul_(0.1)
    _, report = prune_transformer(model, batches, keep=keep, target="experts", method="layer", reweight=False,
                                  allocation="error-curve")
    curves, best = [], []
    for blk, x in zip(moe_blocks(model), mlp_inputs(model, batches), strict=True):
        target = mixture(x, blk.module.mlp, range(8))
        if limit:
            errs = {m: set_errors(x, target, blk.module.mlp, m) for m in range(2, 9)}
            found = {m: (min(e, key=e.get), min(e.values())) for m, e in errs.items()}
        else:
            path: list = []
            backward_elimination(x, target, blk.module.mlp, 2, path=path)
            found = {8: (tuple(range(8)), 0.0), **{8 - j - 1: (tuple(sorted(k)), e) for j, (k, e) in enumerate(path)}}
        curve = np.array([0.0, 0.0] + [found[m][1] for m in range(2, 9)])
        curve[:2] = curve[2] + 1e9 * np.array([2.0, 1.0]) * (curve.max() + 1)
        curves.append(curve)
        best.append({m: found[m][0] for m in found})
    total = 2 * round(8 * keep)
    counts = allocate_units(curves, total, [2, 2]).tolist()
    assert [u.n_kept for u in report.units] == counts and sum(counts) == total and counts[1] > counts[0]
    assert [tuple(u.kept) for u in report.units] == [best[i][m] for i, m in enumerate(counts)]
    assert report.allocation == "error-curve"


@pytest.mark.parametrize("limit", [512, 0])
def test_an_expert_error_curve_holds_the_least_error_found_per_count(monkeypatch, limit: int) -> None:
    """From the routed count up, the curve is the least error over every kept set of each size (enumeration on) or
    backward elimination's path (off; on these tokens the path is not optimal at 2, 4 and 5 kept); below it, the
    curve falls faster than anywhere above, so that its lower convex hull passes through the routed count and an
    allocation's floor there is never undercut."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", limit)
    model, batches = mixtral(), ragged_token_batches(VOCAB, n_batches=3, b=4, t=9, seed=9)
    blk, x = moe_blocks(model)[0], mlp_inputs(model, batches)[0]
    mlp = blk.module.mlp
    target = mixture(x, mlp, range(8))
    outs = experts_mod.ExpertOutputs(blk, torch.from_numpy(x).float())
    router = experts_mod.RestrictedRouter(mlp.gate, 8, (torch.from_numpy(x).float(),), {})
    with torch.no_grad():  # as inside prune_transformer
        curve = experts_mod.error_curve(experts_mod.RoutedError(router, outs, torch.from_numpy(target)), 8, 2)
    path: list = []
    backward_elimination(x, target, mlp, 2, path=path)
    greedy = {8 - j - 1: e for j, (_, e) in enumerate(path)}
    for m in range(2, 8):
        want = min(set_errors(x, target, mlp, m).values()) if limit else greedy[m]
        assert curve[m] == pytest.approx(want, rel=1e-5)
    assert any(greedy[m] > min(set_errors(x, target, mlp, m).values()) * 1.001 for m in (2, 4, 5))
    drops = -np.diff(curve)
    assert curve[8] == pytest.approx(0.0, abs=1e-6)
    assert drops[0] > drops[2:].max() and drops[1] > drops[2:].max()


def test_grouped_routing_that_cannot_run_on_fewer_experts_is_refused() -> None:
    """DeepSeek-V3's group-limited routing scores each group by its two best experts: four groups of two lose it
    with half of the experts removed."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=24, moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=0, n_group=4, topk_group=2, q_lora_rank=8, kv_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.DeepseekV3Model(cfg).eval()
    with pytest.raises(ValueError, match=r"block 'layers\.0': the router cannot route among 4 of its 8 experts"):
        prune_transformer(model, data(1), keep=0.5, target="experts")


def test_a_mixture_that_changes_the_routing_after_its_router_is_refused() -> None:
    """A mixture module that halves the router's weights before its experts see them."""
    model = mixtral()

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, w, idx = self.gate(x)
        return self.experts(x, idx, w * 0.5).reshape(hidden_states.shape)

    for blk in moe_blocks(model):
        blk.module.mlp.forward = types.MethodType(forward, blk.module.mlp)
    with pytest.raises(ValueError, match=r"does not return the \(weights, experts\) its experts module receives"):
        prune_transformer(model, data(1), keep=0.5, target="experts")


def test_a_spec_with_more_experts_than_the_model_is_refused() -> None:
    model = mixtral()
    pruned, _ = prune_transformer(model, data(1), keep=0.5, target="experts")
    spec = make_spec(pruned)
    apply_spec(mixtral(), spec)  # the pruned sizes apply to a fresh model
    spec["blocks"][0]["experts"] = 9
    with pytest.raises(ValueError, match="the spec has experts=9, the model's block 8"):
        apply_spec(mixtral(), spec)


def test_a_removal_that_disagrees_with_the_selection_fails_the_first_batch_check(monkeypatch) -> None:
    """The safety net for a layout the adapter gets wrong: experts cut unlike the router's rows (here the experts
    module keeps other experts than the router) make the pruned mixture compute another sum than the one
    selected, which the first batch shows."""
    from nn_adapters import _transformer_blocks as tb

    def misaligned(self, keep: torch.Tensor) -> None:
        experts_mod.drop_experts(self.experts, self.n_experts, keep.flip(0))
        experts_mod.drop_experts(self.router, self.n_experts, keep)

    monkeypatch.setattr(tb._HFMoEBlock, "drop_experts", misaligned)
    with pytest.raises(ValueError, match="with experts removed, its mixture .* does not compute the routed sum"):
        prune_transformer(mixtral(), data(1), keep=0.5, target="experts")


def joint_refit(x: np.ndarray, target: np.ndarray, mlp: nn.Module, keep: list[int]) -> np.ndarray:
    """The kept experts' down projections ``(len(keep), H, I)`` of least squared error of the routed sum on the
    tokens ``x`` (Mixtral's routing among ``keep``), solved jointly by numpy.linalg.lstsq: token ``t`` routed to
    kept expert ``e`` with weight ``w`` contributes ``w * h_e(x_t)`` to expert ``e``'s block of columns."""
    keep = np.asarray(keep)
    gate_up = mlp.experts.gate_up_proj.detach().double().numpy()[keep]
    half = gate_up.shape[1] // 2
    logits = x @ mlp.gate.weight.detach().double().numpy()[keep].T
    p = np.exp(logits - logits.max(1, keepdims=True))
    top = np.argsort(-p, axis=1, kind="stable")[:, :2]
    w = np.take_along_axis(p, top, 1)
    w /= w.sum(1, keepdims=True)
    design = np.zeros((x.shape[0], len(keep) * half))
    for j in range(2):
        for e in range(len(keep)):
            t = top[:, j] == e
            h = F.silu(torch.from_numpy(x[t] @ gate_up[e, :half].T)).numpy() * (x[t] @ gate_up[e, half:].T)
            design[t, e * half:(e + 1) * half] += w[t, j:j + 1] * h
    assert np.linalg.matrix_rank(design) == design.shape[1]  # a unique solution
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    return solution.reshape(len(keep), half, -1).transpose(0, 2, 1)


def test_the_refit_converges_to_the_joint_least_squares_of_the_kept_experts(monkeypatch) -> None:
    """Without a ridge and with many passes, the block coordinate refit reaches the joint least-squares down
    projections of the kept experts (written out with lstsq), and the reported error is theirs."""
    monkeypatch.setattr("nn_adapters.transformer.EXPERT_REFIT_PASSES", 400)
    model, batches = mixtral(), data(10)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer", ridge=0.0)
    for u, blk, new, x in zip(report.units, moe_blocks(model), moe_blocks(pruned), mlp_inputs(model, batches),
                              strict=True):
        target = mixture(x, blk.module.mlp, range(8))
        want = joint_refit(x, target, blk.module.mlp, u.kept)
        got = new.experts.down_proj.detach().double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        refitted = mixture(x, _with_down(blk.module.mlp, u.kept, want), range(4))
        assert u.relative_error == pytest.approx(float(((target - refitted) ** 2).sum() / (target ** 2).sum()),
                                                 rel=1e-3)


def _with_down(mlp: nn.Module, keep: list[int], down: np.ndarray) -> nn.Module:
    """A copy of Mixtral's mixture module with only the experts ``keep``, their down projections ``down``."""
    m = copy.deepcopy(mlp)
    with torch.no_grad():
        m.gate.weight = nn.Parameter(m.gate.weight[keep])
        m.experts.gate_up_proj = nn.Parameter(m.experts.gate_up_proj[keep])
        m.experts.down_proj = nn.Parameter(torch.from_numpy(down).float())
    return m


@pytest.mark.parametrize("mode", ["layer", "asym"])
def test_each_refit_pass_lowers_the_error(monkeypatch, mode: str) -> None:
    """Each step of the refit minimises the joint squared error over one expert's weights (no ridge): the error
    never rises from pass to pass, starting from the removal's."""
    errors = []
    for passes in range(4):
        monkeypatch.setattr("nn_adapters.transformer.EXPERT_REFIT_PASSES", passes)
        _, report = prune_transformer(mixtral(), data(), keep=0.25, target="experts", method=mode, ridge=0.0,
                                      reweight=passes > 0)
        errors.append([u.relative_error for u in report.units])
    first = np.array(errors)[:, 0]  # the first block: the same tokens whatever the passes
    assert np.all(np.diff(first) <= 1e-9) and first[-1] < 0.9 * first[0]


def test_a_strong_ridge_pulls_the_refit_toward_the_trained_weights_or_toward_zero() -> None:
    model, batches = mixtral(), data()
    for prior in ("original", "zero"):
        pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", ridge=1e6, refit_prior=prior)
        for u, blk, new in zip(report.units, moe_blocks(model), moe_blocks(pruned), strict=True):
            trained = blk.experts.down_proj.detach()[u.kept]
            got = new.experts.down_proj.detach()
            if prior == "original":
                torch.testing.assert_close(got, trained, rtol=0, atol=1e-3 * float(trained.abs().max()))
            else:
                assert float(got.norm()) < 0.01 * float(trained.norm())


def test_layer_mode_on_an_executor_gives_the_serial_result() -> None:
    from concurrent.futures import ThreadPoolExecutor

    model, batches = mixtral(), data()
    serial, a = prune_transformer(model, batches, keep=0.5, target="experts", method="layer")
    with ThreadPoolExecutor(2) as pool:
        parallel, b = prune_transformer(model, batches, keep=0.5, target="experts", method="layer", executor=pool)
    assert [(u.block, u.kept, u.relative_error) for u in a.units] == [(u.block, u.kept, u.relative_error)
                                                                     for u in b.units]
    for p, q in zip(serial.parameters(), parallel.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tokens_routed_with_weight_zero_leave_the_refit_alone() -> None:
    """A routing weight of 0 (a saturated softmax, a sigmoid score at 0) gives its token's row the weight 0: the
    refit is the one without that token, not a division by zero."""
    from nn_adapters.transformer import _refit_experts, _Ridge

    blk = moe_blocks(mixtral())[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    pos = torch.stack([torch.arange(40) % 2, 2 + torch.arange(40) % 2], dim=1)  # experts 0/1 and 2/3
    w = torch.rand(40, 2, generator=g)
    target = torch.randn(40, 16, generator=g, dtype=torch.float64)
    keep, folds, ridge = torch.arange(4), torch.arange(40) % 5, _Ridge(1e-3, True)
    zero = w.clone()
    zero[0] = 0.0  # token 0 routed to experts 0 and 2, both with weight 0
    (down, _), _ = _refit_experts(blk, keep, x, zero, pos, target, folds, ridge)
    rows = torch.arange(1, 40)
    (down_without, _), _ = _refit_experts(blk, keep, x[rows], w[rows], pos[rows], target[rows], folds[rows], ridge)
    assert torch.isfinite(down).all()
    torch.testing.assert_close(down, down_without)


def test_a_bfloat16_mixture_is_pruned_in_its_dtype() -> None:
    """The first-batch check allows half precision's rounding (the experts sum in bfloat16); the refitted weights
    are stored in the model's dtype."""
    model = mixtral(lm=True).to(torch.bfloat16)
    pruned, report = prune_transformer(model, data(2), keep=0.5, target="experts")
    assert [u.n_kept for u in report.units] == [4, 4]
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.tensor([[3, 7, 11, 5]])).logits).all()


@pytest.mark.parametrize("cache_rows", [None, 0, 50])
def test_the_pair_products_give_every_routings_squared_error(cache_rows) -> None:
    """The search's errors from inner products (``||T||^2 - 2 w.a + w^T G w``) equal the squared error of the
    routed sum computed directly, for routings that reach every one of 16 experts on each token (the per-token
    tables grow past their first 8 slots), asked for in any order and on any subset of the tokens; the same with
    the experts' outputs cached without bound (each computed once), not at all, or up to 50 of them (the cache
    never holds more)."""
    blk = moe_blocks(build_moe("mixtral", num_local_experts=16, num_experts=16, n_routed_experts=16,
                               moe_num_experts=16))[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 16, generator=g)
    target = torch.randn(30, 16, generator=g, dtype=torch.float64)
    outs = experts_mod.ExpertOutputs(blk, x, cache_bytes=None if cache_rows is None else cache_rows * 16 * 4)
    products = experts_mod.PairProducts(outs, target)
    asked = set()
    for step in range(12):
        tokens = torch.randperm(30, generator=g)[:20] if step % 2 else torch.arange(30)
        idx = torch.stack([torch.randperm(16, generator=g)[:3] for _ in tokens])
        asked |= {(int(t), int(e)) for t, row in zip(tokens, idx) for e in row}
        w = torch.rand(len(tokens), 3, generator=g)
        want = torch.stack([(target[t] - sum(float(w[i, j]) * blk.expert_out(int(e), blk.expert_hidden(
            int(e), x[t:t + 1])).detach().double()[0] for j, e in enumerate(idx[i]))).square().sum()
            for i, t in enumerate(tokens.tolist())])  # float32 experts, one token at a time: their rounding
        torch.testing.assert_close(products.squared_errors(w, idx, tokens), want, rtol=1e-5, atol=1e-5)
        assert outs.n <= (len(asked) if cache_rows is None else cache_rows)
        assert outs.buf.shape[0] * outs.buf.element_size() * 16 <= outs.cache_bytes or cache_rows is None
    assert products.experts.shape[1] > 8 and int(products.count.max()) > 8
    if cache_rows is None:  # every output computed once
        assert outs.computed == outs.n == len(asked)
    else:  # those that did not fit, again when a token's products grew
        assert outs.n == min(cache_rows, len(asked)) and outs.computed > len(asked)
    # the experts' outputs are held as the experts compute them (float32 here), read as float64
    assert outs.buf.dtype == torch.float32
    idx = torch.tensor([[0, 5, 15]] * 30)
    want = torch.stack([blk.expert_out(e, blk.expert_hidden(e, x)).detach().double() for e in (0, 5, 15)], 1)
    torch.testing.assert_close(outs.gather(idx), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs.norms(idx), want.norm(dim=2), rtol=1e-6, atol=1e-6)
    weights = torch.rand(30, 3, generator=g)
    torch.testing.assert_close(outs.mixture(weights, idx), (want * weights.double().unsqueeze(2)).sum(1),
                               rtol=1e-6, atol=1e-6)


def test_a_negative_cache_bound_is_refused() -> None:
    blk = moe_blocks(build_moe("mixtral"))[0]
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        experts_mod.ExpertOutputs(blk, torch.zeros(3, 16), cache_bytes=-1)


def test_experts_then_their_neurons_prune_save_and_reload(tmp_path) -> None:
    """Whole experts removed, then half of the kept experts' neurons: the second call reads the pruned mixtures,
    and the saved model's spec rebuilds both cuts."""
    model, batches = mixtral(lm=True), data(2)
    fewer, _ = prune_transformer(model, batches, keep=0.5, target="experts")
    smaller, report = prune_transformer(fewer, batches, keep=0.5, target="ffn")
    assert [(w["experts"], w["intermediate_size"]) for w in report.spec["blocks"]] == [(4, 12), (4, 12)]
    assert [(u.expert, u.n_units, u.n_kept) for u in report.units] == [(e, 24, 12) for e in range(4)] * 2
    assert_reloads_and_generates(smaller, tmp_path / "m")


class ToyRouter(nn.Module):
    """A router written here: scores of the experts' rows (softmax, or sigmoid), the top ``top_k`` of them, then
    renormalised over the token's experts or not, times ``scale``; returns (scores, weights, experts)."""

    def __init__(self, n: int, h: int, top_k: int, kind: str, renormalise: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, h, generator=torch.Generator().manual_seed(n),
                                               dtype=torch.float64), requires_grad=False)
        self.top_k, self.num_experts, self.kind, self.renormalise, self.scale = top_k, n, kind, renormalise, scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = x @ self.weight.T
        p = logits.softmax(-1) if self.kind == "softmax" else logits.sigmoid()
        w, idx = p.topk(self.top_k, dim=-1)
        if self.renormalise:
            w = w / w.sum(-1, keepdim=True)
        return logits, w * self.scale, idx


def toy_errors(router: nn.Module, n_tokens: int = 200, h: int = 6) -> experts_mod.RoutedError:
    """The routed error of ``router``'s experts, each a fixed random linear map (``tanh`` first), on random tokens,
    against a random target (float64 throughout)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_tokens, h, generator=g, dtype=torch.float64)
    maps = torch.randn(router.num_experts, h, h, generator=g, dtype=torch.float64)
    blk = types.SimpleNamespace(n_experts=router.num_experts, expert_hidden=lambda e, rows: rows.tanh(),
                                expert_out=lambda e, hid: hid @ maps[e])
    target = torch.randn(n_tokens, h, generator=g, dtype=torch.float64)
    route = experts_mod.RestrictedRouter(router, router.num_experts, (x,), {})
    return experts_mod.RoutedError(route, experts_mod.ExpertOutputs(blk, x), target)


@pytest.mark.parametrize(("kind", "renormalise", "scale", "rule"), [
    ("softmax", True, 1.0, "rescale"), ("softmax", True, 2.5, "rescale"), ("sigmoid", True, 1.0, "rescale"),
    ("sigmoid", False, 2.5, "keep")])
def test_every_candidate_removals_error_at_once_equals_routing_each_one(kind: str, renormalise: bool, scale: float,
                                                                         rule: str) -> None:
    """A router that ranks the experts by their own scores (top-3 of 12): the batched search's change of error for
    each candidate removal, from the routing to top-4 alone, equals the router called on the kept experts but
    that one (every token), at several kept sets; the weights' rule is the one the router's definition implies
    (renormalised, times a constant: rescale; sigmoid scores as they are: keep)."""
    errors = toy_errors(ToyRouter(12, 6, 3, kind, renormalise, scale))
    kept = list(range(12))
    for drop in (None, 4, 9, 0):
        if drop is not None:
            kept.remove(drop)
        keep = torch.as_tensor(kept)
        state = errors.state(keep)
        ext = errors.extended(state, keep)
        assert ext is not None and ext[2] == rule
        deltas = errors.removal_deltas(state, ext)
        for j in kept:
            want = float(errors.state(torch.as_tensor([e for e in kept if e != j]))[2].sum() - state[2].sum())
            assert float(deltas[j]) == pytest.approx(want, rel=1e-9, abs=1e-12 * float(state[2].sum()))


def test_a_router_whose_weights_depend_on_every_kept_expert_is_not_batched(monkeypatch) -> None:
    """Softmax over the kept experts without renormalisation: removing an expert changes every token's weights,
    which the batched search's first-step check sees; the search then routes every token for every candidate,
    and keeps what the full search keeps; without a top-k attribute the batched search is not tried at all."""
    monkeypatch.setattr(experts_mod, "SEARCH", "batched")
    calls = counting_router_calls(monkeypatch)
    errors = toy_errors(ToyRouter(10, 6, 2, "softmax", renormalise=False))
    full = errors.state(torch.arange(10))
    path = experts_mod.elimination_path(errors, full, 10, 4)
    assert sum(1 for n, k in calls if k is None and n == 200) >= sum(range(5, 10))  # full from the second step
    monkeypatch.setattr(experts_mod, "SEARCH", "full")
    want = experts_mod.elimination_path(errors, full, 10, 4)
    assert [list(k) for k, _ in path] == [list(k) for k, _ in want]
    router = ToyRouter(10, 6, 2, "softmax", renormalise=True)
    router.k_best = router.__dict__.pop("top_k")
    monkeypatch.setattr(ToyRouter, "forward", lambda self, x: (x, *(x @ self.weight.T).softmax(-1).topk(
        self.k_best, dim=-1)))
    errors = toy_errors(router)
    assert errors.extended(errors.state(torch.arange(10)), torch.arange(10)) is None


@pytest.mark.filterwarnings("ignore:.*layers of the model's stacks of blocks are not recognised:UserWarning")
@pytest.mark.parametrize("name", [*FAMILIES, *OTHERS])
def test_every_family_batched_search_keeps_what_routing_every_token_keeps(monkeypatch, name: str) -> None:
    """Every family, backward elimination to half of the experts: the default search keeps the experts that
    routing every token for every candidate keeps, with the same error (float32 rounding of the experts' outputs
    apart); where the router renormalises each token's top-k (Mixtral, GPT-OSS's softmax of its top-k, DeepSeek-V3
    and ERNIE 4.5 with norm_topk_prob) its steps are batched. Likewise the enumeration of every kept set keeps
    what routing each set with the router keeps."""
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 0)
    batched = []
    deltas = experts_mod.RoutedError.removal_deltas
    monkeypatch.setattr(experts_mod.RoutedError, "removal_deltas",
                        lambda self, *a: batched.append(1) or deltas(self, *a))
    model = OTHERS[name]() if name in OTHERS else build_moe(name, **EIGHT)
    got = {}
    for search in ("batched", "full"):
        monkeypatch.setattr(experts_mod, "SEARCH", search)
        _, report = prune_transformer(model, data(), keep=0.5, target="experts", method="layer", reweight=False)
        got[search] = [(u.kept, u.relative_error) for u in report.units]
    assert [k for k, _ in got["batched"]] == [k for k, _ in got["full"]]
    assert [e for _, e in got["batched"]] == pytest.approx([e for _, e in got["full"]], rel=1e-6)
    n = moe_blocks(model)[0].n_experts
    if name in ("mixtral", "gpt_oss", "deepseek_v3", "ernie4_5_moe"):
        assert len(batched) == (n - n // 2) * len(report.units)
    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", 512)  # every kept set: at once, or the router on each
    for batched_sets in (True, False):
        monkeypatch.setattr(experts_mod, "BATCHED_ENUMERATION", batched_sets)
        _, report = prune_transformer(model, data(), keep=0.5, target="experts", method="layer", reweight=False)
        got[batched_sets] = [(u.kept, u.relative_error) for u in report.units]
    assert [k for k, _ in got[True]] == [k for k, _ in got[False]]
    assert [e for _, e in got[True]] == pytest.approx([e for _, e in got[False]], rel=1e-6)


def switch_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> float:
    """The load-balancing loss of the Switch Transformer (Fedus et al., 2022), as Mixtral's model card trains with
    it, written out: over the tokens of every layer, ``E * sum_e P_e * n_e / N``, ``P_e`` the mean softmax
    probability of expert ``e``, ``n_e`` the tokens whose top-k includes it, ``E`` the router's width."""
    logits = torch.cat([r.detach().reshape(-1, r.shape[-1]) for r in router_logits]).double().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    n_e = np.bincount(top.reshape(-1), minlength=p.shape[1])
    return float(p.shape[1] * (p.mean(0) * n_e / p.shape[0]).sum())


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "jamba", "gpt_oss"])
def test_the_pruned_model_trains_with_its_load_balancing_loss(tmp_path, name: str) -> None:
    """Training with ``output_router_logits=True`` after whole-expert pruning: the loss counts the kept experts
    (the Switch loss over the pruned routers' logits, written out here, as the unpruned model's is over all of
    them), before and after a save and reload; mixtures left with different numbers of experts leave the model's
    count as it was (that loss concatenates the layers' logits and cannot be computed)."""
    from nn_adapters.transformer import load_pruned, save_pruned

    model = gpt_oss(lm=True) if name == "gpt_oss" else build_moe(name, lm=True, **EIGHT)
    n = moe_blocks(model)[0].n_experts
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    top_k = int(model.config.num_experts_per_tok)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert float(out.aux_loss) == pytest.approx(switch_balance_loss(out.router_logits, top_k), rel=1e-5)
    pruned, _ = prune_transformer(model, data(), keep=0.5, target="experts")
    save_pruned(pruned, tmp_path / "m")
    for m in (pruned, load_pruned(tmp_path / "m")):
        m.train()
        out = m(input_ids=ids, labels=ids, output_router_logits=True)
        assert all(r.shape[-1] == n // 2 for r in out.router_logits)
        assert float(out.aux_loss.detach()) == pytest.approx(switch_balance_loss(out.router_logits, top_k), rel=1e-5)
        out.loss.backward()  # a training step's gradients
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad and p.dim() == 3)
    assert model.num_experts == n  # the input model is untouched
    if name == "mixtral":
        uneven = {moe_blocks(model)[0].name: 0.25, moe_blocks(model)[1].name: 0.5}
        pruned, _ = prune_transformer(model, data(), keep=uneven, target="experts")
        assert [b.n_experts for b in moe_blocks(pruned)] == [2, 4] and pruned.num_experts == n


@pytest.mark.parametrize(("kind", "renormalise", "scale"), [
    ("softmax", True, 1.0), ("softmax", True, 2.5), ("sigmoid", True, 1.0), ("sigmoid", False, 2.5)])
def test_every_kept_sets_error_at_once_equals_routing_each_one(monkeypatch, kind: str, renormalise: bool,
                                                              scale: float) -> None:
    """A router that ranks the experts by their own scores (top-3 of 7): the batched enumeration's error of every
    kept set of 4, from each token's ranking of the 7 experts alone, equals the router called on that set; the
    kept set and error it returns are those of trying each set with the router."""
    errors = toy_errors(ToyRouter(7, 6, 3, kind, renormalise, scale))
    full = errors.state(torch.arange(7))
    rank = errors.ranking(full)
    assert rank is not None
    keeps = torch.as_tensor(list(itertools.combinations(range(7), 4)))
    want = torch.stack([errors.state(keep)[2].sum() for keep in keeps])
    torch.testing.assert_close(errors.subset_errors(rank, keeps, 3), want, rtol=1e-9, atol=1e-9)
    got = experts_mod._best_of_size(errors, full, 7, 4)
    monkeypatch.setattr(experts_mod, "BATCHED_ENUMERATION", False)
    kept, err = experts_mod._best_of_size(errors, full, 7, 4)
    assert list(got[0]) == list(kept) == list(keeps[int(want.argmin())]) and got[1] == pytest.approx(err, rel=1e-12)


def test_an_enumeration_whose_weights_depend_on_every_kept_expert_routes_each_set(monkeypatch) -> None:
    """Softmax over the kept experts without renormalisation: each token's ranking gives the full set's routing
    back, but not a smaller set's weights, which the check of a few sets against the router sees: every kept set
    is then routed by the router, and the result is the per-set search's."""
    errors = toy_errors(ToyRouter(7, 6, 2, "softmax", renormalise=False))
    full = errors.state(torch.arange(7))
    assert errors.ranking(full) is not None  # the full set's routing is recovered ...
    calls = counting_router_calls(monkeypatch)
    got = experts_mod._best_of_size(errors, full, 7, 4)
    assert sum(1 for _, k in calls if k is None) >= 35  # ... but every one of the 35 kept sets is routed
    monkeypatch.setattr(experts_mod, "BATCHED_ENUMERATION", False)
    want = experts_mod._best_of_size(errors, full, 7, 4)
    assert list(got[0]) == list(want[0]) and got[1] == want[1]


@pytest.mark.parametrize("method", ["asym", "wanda"])
def test_the_cache_bound_and_the_chunks_change_nothing_but_the_work(monkeypatch, method: str) -> None:
    """Pruning 16-expert mixtures (backward elimination, with the refit) with the experts' outputs not cached at
    all and read 80 outputs at a time keeps the same experts with the same errors and gives the same model as
    with the default bound; and no read of the experts' outputs ever asks for more tokens than its chunk."""
    model, batches = build_moe("mixtral", **{k: 16 for k in EIGHT}), data(2)
    _, ref = prune_transformer(model, batches, keep=0.5, target="experts", method=method)
    want = prune_transformer(model, batches, keep=0.5, target="experts", method=method)[0]
    assert {u.search for u in ref.units} == ({"greedy"} if method == "asym" else {None})
    monkeypatch.setattr(experts_mod, "OUTPUT_CACHE_BYTES", 0)
    monkeypatch.setattr(experts_mod, "GATHER_CHUNK_BYTES", 8 * 16 * 80)  # 80 float64 outputs of width 16
    gather = experts_mod.ExpertOutputs.gather
    widest = []

    def checked(self, idx, tokens=None):
        assert self.n == 0 and self.x.shape[1] == 16
        widest.append(idx.numel())
        return gather(self, idx, tokens)

    monkeypatch.setattr(experts_mod.ExpertOutputs, "gather", checked)
    got, report = prune_transformer(model, batches, keep=0.5, target="experts", method=method)
    assert widest and max(widest) <= 80
    assert [u.kept for u in report.units] == [u.kept for u in ref.units]
    assert [u.relative_error for u in report.units] == pytest.approx([u.relative_error for u in ref.units],
                                                                     rel=1e-6)
    ids = torch.tensor([[3, 7, 11, 5, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).last_hidden_state, want(ids).last_hidden_state, rtol=1e-5, atol=1e-6)
