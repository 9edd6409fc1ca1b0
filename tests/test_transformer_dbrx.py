"""Transformer pruning of DBRX (``DbrxBlock``): the attention's query, key and value fused in ``Wqkv`` as three
blocks of unequal widths (every query head's rows, then the key heads', then the value heads'; grouped-query),
and a mixture whose experts' weights are stored flat, ``w1`` / ``v1`` / ``w2`` of ``(E I, H)``. Tiny randomly
initialised models (no download).

Oracles: the unpruned model with the removed units' consumer rows / columns zeroed (no refit), with the magnitude
scores written out from the flat tensors; numpy.linalg.lstsq on activations written out here from the experts'
weights, on the tokens the router sends to each expert, rows weighted by the routing weights, and on the attention
output projection's captured inputs; the saved and reloaded model's outputs; greedy generation with and without
the cache.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_helpers import (
    assert_reloads_and_generates,
    captured_input,
    ragged_token_batches,
    real_token_states,
    run_hooked,
    scale_matrices,
    zeroed_heads,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DbrxConfig") or int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: DBRX's experts of another layout", allow_module_level=True)

HIDDEN, HEADS, KV_HEADS, INTER, EXPERTS, VOCAB = 16, 4, 2, 24, 4, 40
HEAD_DIM, GROUP = HIDDEN // HEADS, HEADS // KV_HEADS


def build(lm: bool = False) -> nn.Module:
    cfg = transformers.DbrxConfig(
        d_model=HIDDEN, n_heads=HEADS, n_layers=2, max_seq_len=32, vocab_size=VOCAB, pad_token_id=0,
        attn_config={"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": INTER, "moe_num_experts": EXPERTS, "moe_top_k": 2})
    torch.manual_seed(0)
    model = (transformers.DbrxForCausalLM if lm else transformers.DbrxModel)(cfg)
    return scale_matrices(model, 4.0)  # larger weights: pruning visibly changes the outputs


def blocks(model: nn.Module) -> nn.ModuleList:
    return (model.transformer if hasattr(model, "transformer") else model).blocks


def per_expert(w: torch.Tensor) -> torch.Tensor:
    """A flat (E I, H) expert weight as (E, I, H)."""
    return w.view(EXPERTS, INTER, -1)


def test_blocks_are_found() -> None:
    assert [b.kind for b in find_blocks(build())] == ["hf_dbrx"] * 2


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    zeroed = zeroed_heads(model, report, GROUP * HEAD_DIM, "norm_attn_norm.attn.out_proj")
    with torch.no_grad():
        for u in report.units:
            if u.stage != "ffn":
                continue
            mlp = zeroed.get_submodule(u.block).ffn.experts.mlp
            w1, v1, w2 = (per_expert(getattr(mlp, n))[u.expert] for n in ("w1", "v1", "w2"))
            score = w1.pow(2).sum(1) + v1.pow(2).sum(1) + w2.pow(2).sum(1)
            assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
            w2[sorted(set(range(INTER)) - set(u.kept))] = 0.0  # expert e's down projection: x @ w2_e
    assert {u.stage for u in report.units} == ({"ffn", "heads"} if target == "all" else {target})
    attn, ex = blocks(pruned)[0].norm_attn_norm.attn, blocks(pruned)[0].ffn.experts
    if target != "ffn":
        assert attn.Wqkv.out_features == (HEADS + 2 * KV_HEADS) // 2 * HEAD_DIM
        assert (attn.num_heads, attn.num_key_value_heads, attn.hidden_size) == (HEADS // 2, KV_HEADS // 2,
                                                                                HIDDEN // 2)
    if target != "heads":
        assert ex.ffn_hidden_size == INTER // 2 and tuple(ex.mlp.w2.shape) == (EXPERTS * INTER // 2, HIDDEN)
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def test_magnitude_head_scores_read_the_value_block() -> None:
    """A key/value group whose value rows (third block of Wqkv) are large is kept though its query and key rows and
    output columns are the smallest; a group small in all four (but larger than the first's) goes."""
    model, data = build(), ragged_token_batches(VOCAB, n_batches=1)
    attn = blocks(model)[0].norm_attn_norm.attn
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    width = GROUP * HEAD_DIM
    with torch.no_grad():
        for g, small in ((0, 1e-3), (1, 2e-3)):
            attn.Wqkv.weight[g * width:(g + 1) * width] = small
            for start in (q, q + kv):
                attn.Wqkv.weight[start + g * HEAD_DIM:start + (g + 1) * HEAD_DIM] = small
            attn.out_proj.weight[:, g * width:(g + 1) * width] = small
        attn.Wqkv.weight[q + kv:q + kv + HEAD_DIM] = 10.0
    _, report = prune_transformer(model, data, keep={0: 0.5}, target="heads", method="magnitude", reweight=False)
    assert report.units[0].kept == [0]


def test_layer_refits_are_lstsq() -> None:
    """Layer mode, ridge 0: each expert's down projection is the routing-weighted least-squares fit on the real
    tokens routed to it (activations written out from w1 and v1), and out_proj the least-squares fit of its kept
    columns toward the unpruned outputs."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="all", method="layer", ridge=0.0,
                                       weighting="none")
    for i, (orig, mine) in enumerate(zip(blocks(model), blocks(pruned), strict=True)):
        seen: list[tuple] = []
        run_hooked([model], batches, [orig.ffn.experts.register_forward_pre_hook(
            lambda _m, a, seen=seen: seen.append(tuple(t.detach() for t in a[:3])))])
        mlp = orig.ffn.experts.mlp
        for e in range(EXPERTS):
            rows, weights = [], []
            for (x, idx, w), b in zip(seen, batches, strict=True):
                real = b["attention_mask"].bool().reshape(-1)
                tok, slot = ((idx == e) & real[:, None]).nonzero(as_tuple=True)
                x = x.reshape(-1, HIDDEN)[tok].double()
                rows.append((F.silu(x @ per_expert(mlp.w1)[e].double().T) * (x @ per_expert(mlp.v1)[e].double().T))
                            .detach().numpy())
                weights.append(w[tok, slot].double().abs().numpy())
            a, sw = np.concatenate(rows), np.concatenate(weights)
            y = a @ per_expert(mlp.w2)[e].detach().double().numpy()
            unit = next(u for u in report.units if u.expert == e and u.block.endswith(f".{i}"))
            want = np.linalg.lstsq(a[:, unit.kept] * sw[:, None], y * sw[:, None], rcond=None)[0]
            got = mine.ffn.experts.mlp.w2.view(EXPERTS, INTER // 2, HIDDEN)[e].detach().double().numpy()
            np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
        out = orig.norm_attn_norm.attn.out_proj
        a = torch.cat([captured_input(model, out, b)[b["attention_mask"].bool()] for b in batches]).double().numpy()
        heads = next(u for u in report.units if u.stage == "heads" and u.block.endswith(f".{i}"))
        cols = [g * GROUP * HEAD_DIM + j for g in heads.kept for j in range(GROUP * HEAD_DIM)]
        want = np.linalg.lstsq(a[:, cols], a @ out.weight.detach().double().numpy().T, rcond=None)[0].T
        np.testing.assert_allclose(mine.norm_attn_norm.attn.out_proj.weight.detach().double().numpy(), want,
                                   atol=2e-4, rtol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    pruned, report = prune_transformer(build(lm=True), ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert report.spec["blocks"][0]["kind"] == "hf_dbrx"
    assert_reloads_and_generates(copy.deepcopy(pruned), tmp_path / "m")


def dbrx_mixture(x: np.ndarray, ffn: nn.Module, keep: tuple[int, ...], top_k: int = 2) -> np.ndarray:
    """DBRX's routed sum restricted to the experts ``keep``, written out in float64: the softmax of the kept
    experts' router logits, the top ``top_k``, divided by their sum (``moe_normalize_expert_weights=1``: their
    1-norm), times each chosen expert's ``(silu(x w1^T) * (x v1^T)) w2`` (flat weights, ``INTER`` rows an expert)."""
    keep = np.asarray(keep)
    logits = x @ ffn.router.layer.weight.detach().double().numpy()[keep].T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, top, 1)
    w /= w.sum(1, keepdims=True)
    w1, v1, w2 = (per_expert(getattr(ffn.experts.mlp, n)).detach().double().numpy() for n in ("w1", "v1", "w2"))
    out = np.zeros_like(x)
    for j in range(top_k):
        for e in np.unique(top[:, j]):
            t, ex = top[:, j] == e, keep[e]
            h = F.silu(torch.from_numpy(x[t] @ w1[ex].T)).numpy() * (x[t] @ v1[ex].T)
            out[t] += w[t, j:j + 1] * (h @ w2[ex])
    return out


@pytest.mark.parametrize("limit", [512, 0])
def test_whole_experts_minimise_dbrxs_routed_error(monkeypatch, limit: int) -> None:
    """Whole experts of DBRX (flat expert weights, the routing in the mixture's route_tokens_to_experts): the kept
    pair of each mixture is the optimum over every pair of DBRX's routed sum written out here (or backward
    elimination's with enumeration off), its reported error that sum's, and the pruned model's experts compute it
    (their rows of w1, v1, w2 and of the router kept)."""
    import nn_adapters._experts as experts_mod

    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", limit)
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer", reweight=False)
    for i, (u, block) in enumerate(zip(report.units, blocks(model), strict=True)):
        ffn = block.ffn
        x = torch.cat([captured_input(model, ffn, b).reshape(*b["attention_mask"].shape, -1)[
            b["attention_mask"].bool()] for b in batches]).double().numpy()
        target = dbrx_mixture(x, ffn, tuple(range(EXPERTS)))
        errs = {keep: float(((target - dbrx_mixture(x, ffn, keep)) ** 2).sum())
                for keep in itertools.combinations(range(EXPERTS), 2)}
        if limit:
            want = min(errs, key=errs.get)
        else:
            three = min((tuple(e for e in range(EXPERTS) if e != j) for j in range(EXPERTS)),
                        key=lambda k: float(((target - dbrx_mixture(x, ffn, k)) ** 2).sum()))
            want = min((tuple(e for e in three if e != j) for j in three), key=errs.get)
        assert tuple(u.kept) == want and u.search == ("exhaustive" if limit else "greedy")
        assert u.relative_error == pytest.approx(errs[want] / float((target ** 2).sum()), rel=1e-4)
        mlp_p = blocks(pruned)[i].ffn
        assert mlp_p.router.layer.out_features == mlp_p.experts.num_experts == 2
        if i == 0:  # the first mixture reads the same tokens in both models
            seen: list[torch.Tensor] = []
            hook = mlp_p.experts.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out))
            run_hooked([pruned], batches, [hook])
            got = torch.cat([y[b["attention_mask"].bool()] for y, b in zip(seen, batches, strict=True)])
            np.testing.assert_allclose(got.double().numpy(), dbrx_mixture(x, ffn, want), rtol=1e-4, atol=1e-4)


def test_whole_experts_save_reload_and_generation(tmp_path) -> None:
    pruned, report = prune_transformer(build(lm=True), ragged_token_batches(VOCAB), keep=0.5, target="experts")
    assert [w["experts"] for w in report.spec["blocks"]] == [2, 2] and pruned.num_experts == 2
    assert_reloads_and_generates(pruned, tmp_path / "m")
