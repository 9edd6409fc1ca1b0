"""Transformer pruning of Llama 4 text decoders (transformers 5): dense layers (gated FFN ``feed_forward``) and
mixture-of-experts layers whose router scores multiply the experts' input (``experts(x * s)``, every expert on every
token, the outputs summed as they are) beside an ungated shared expert; heads with the per-head ``qk_norm``. Tiny
randomly initialised models (no download).

Oracles: the unpruned model with the removed units' consumer rows / columns zeroed (no refit); numpy.linalg.lstsq
on activations written out here from the experts' weights, on the scaled inputs of the tokens the router sends to
each expert (read with hooks); the saved and reloaded model's outputs; greedy generation with and without the cache.
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
    ragged_token_batches,
    real_token_states,
    run_hooked,
    scale_matrices,
)
from torch import nn

from nn_adapters._transformer_blocks import find_blocks
from nn_adapters.transformer import prune_transformer

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, DENSE, EXPERTS, VOCAB = 16, 4, 2, 4, 24, 32, 4, 40
GROUP = HEADS // KV_HEADS


def build(lm: bool = False, experts: int = EXPERTS, top_k: int = 1) -> nn.Module:
    if int(transformers.__version__.split(".")[0]) < 5 or not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__}: Llama 4 experts of another layout")
    cfg = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, intermediate_size_mlp=DENSE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_local_experts=experts, num_experts_per_tok=top_k, interleave_moe_layer_step=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_chunk_size=16)
    torch.manual_seed(0)
    model = (transformers.Llama4ForCausalLM if lm else transformers.Llama4TextModel)(cfg).eval()
    return scale_matrices(model, 5.0)  # larger weights: pruning visibly changes the outputs


def test_blocks_are_found() -> None:
    assert [b.kind for b in find_blocks(build())] == ["hf_llama4", "hf_llama4_moe"]


@pytest.mark.parametrize("target", ["ffn", "heads", "all"])
def test_without_refit_equals_the_model_with_removed_units_zeroed(target: str) -> None:
    model, batches = build(), ragged_token_batches(VOCAB)
    pruned, report = prune_transformer(model, batches, keep=0.5, target=target, method="magnitude",
                                       reweight=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in report.units:
            ff = zeroed.get_submodule(u.block).feed_forward
            gone = sorted(set(range(u.n_units)) - set(u.kept))
            if u.stage == "heads":
                cols = [(g * GROUP + j) * HEAD_DIM + i for g in gone for j in range(GROUP) for i in range(HEAD_DIM)]
                zeroed.get_submodule(u.block).self_attn.o_proj.weight[:, cols] = 0.0
            elif u.expert is None:
                ff.down_proj.weight[:, gone] = 0.0
            elif u.expert == "shared":
                ff.shared_expert.down_proj.weight[:, gone] = 0.0
            else:  # experts store down_proj (E, I, H): a neuron is a row
                gu, dn = ff.experts.gate_up_proj[u.expert], ff.experts.down_proj[u.expert]
                score = gu[:, :INTER].pow(2).sum(0) + gu[:, INTER:].pow(2).sum(0) + dn.pow(2).sum(1)
                assert u.kept == sorted(torch.argsort(score, descending=True)[:INTER // 2].tolist())
                dn[gone, :] = 0.0
    if target != "heads":
        assert sorted({str(u.expert) for u in report.units if u.stage == "ffn"}) == ["0", "1", "2", "3", "None",
                                                                                    "shared"]
    for b in batches:
        torch.testing.assert_close(real_token_states(pruned, b), real_token_states(zeroed, b), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(real_token_states(pruned, b), real_token_states(model, b), atol=1e-3)


def test_expert_refit_is_lstsq_on_the_scaled_inputs_of_its_tokens() -> None:
    """Layer mode: expert ``e``'s rows are the real tokens the router scores above zero for it, its input ``s * x``
    (unweighted rows: its output enters the sum as it is)."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="layer", ridge=0.0)
    ff, ff_p = model.layers[1].feed_forward, pruned.layers[1].feed_forward
    seen: dict[str, list[torch.Tensor]] = {"x": [], "s": []}
    hooks = [ff.register_forward_pre_hook(lambda _m, a: seen["x"].append(a[0].reshape(-1, HIDDEN))),
             ff.router.register_forward_hook(lambda _m, _a, out: seen["s"].append(out[0]))]
    run_hooked([model], batches, hooks)
    for e in range(EXPERTS):
        rows = []
        for x, s, b in zip(seen["x"], seen["s"], batches, strict=True):
            tok = ((s[:, e] > 0) & b["attention_mask"].bool().reshape(-1)).nonzero().reshape(-1)
            z = (x[tok] * s[tok, e:e + 1]).double() @ ff.experts.gate_up_proj[e].detach().double()
            rows.append((F.silu(z[:, :INTER]) * z[:, INTER:]).numpy())
        a = np.concatenate(rows)
        y = a @ ff.experts.down_proj[e].detach().double().numpy()
        unit = next(u for u in report.units if u.expert == e)
        want = np.linalg.lstsq(a[:, unit.kept], y, rcond=None)[0]
        np.testing.assert_allclose(ff_p.experts.down_proj[e].detach().double().numpy(), want, rtol=1e-3,
                                   atol=1e-3)
        torch.testing.assert_close(ff_p.experts.gate_up_proj[e],
                                   ff.experts.gate_up_proj[e][:, unit.kept + [INTER + j for j in unit.kept]])


def test_asym_expert_targets_are_the_original_expert_on_the_original_input() -> None:
    """asym: rows from the pruned network (its inputs and scores, the dense first layer pruned), targets the
    original expert on the original network's input of the same token, scaled by the same score."""
    model, batches = build(), ragged_token_batches(VOCAB, n_batches=6)
    pruned, report = prune_transformer(model, batches, keep=0.5, target="ffn", method="asym", ridge=0.0)
    ff, ff_p = model.layers[1].feed_forward, pruned.layers[1].feed_forward
    seen: dict[str, list[torch.Tensor]] = {"x_o": [], "x_p": [], "s_p": []}
    hooks = [ff.register_forward_pre_hook(lambda _m, a: seen["x_o"].append(a[0].reshape(-1, HIDDEN))),
             ff_p.register_forward_pre_hook(lambda _m, a: seen["x_p"].append(a[0].reshape(-1, HIDDEN))),
             ff_p.router.register_forward_hook(lambda _m, _a, out: seen["s_p"].append(out[0]))]
    run_hooked([model, pruned], batches, hooks)
    gu, dn = ff.experts.gate_up_proj.detach().double(), ff.experts.down_proj.detach().double()

    def act(e: int, x: torch.Tensor) -> np.ndarray:
        z = x.double() @ gu[e]
        return (F.silu(z[:, :INTER]) * z[:, INTER:]).numpy()

    assert not torch.allclose(seen["x_o"][0], seen["x_p"][0], atol=1e-3)  # the first layer's pruning shows
    for e in range(EXPERTS):
        rows, targets = [], []
        for x_o, x_p, s, b in zip(seen["x_o"], seen["x_p"], seen["s_p"], batches, strict=True):
            tok = ((s[:, e] > 0) & b["attention_mask"].bool().reshape(-1)).nonzero().reshape(-1)
            rows.append(act(e, x_p[tok] * s[tok, e:e + 1]))
            targets.append(act(e, x_o[tok] * s[tok, e:e + 1]) @ dn[e].numpy())
        a, y = np.concatenate(rows), np.concatenate(targets)
        unit = next(u for u in report.units if u.expert == e)
        want = np.linalg.lstsq(a[:, unit.kept], y, rcond=None)[0]
        np.testing.assert_allclose(ff_p.experts.down_proj[e].detach().double().numpy(), want, rtol=1e-3,
                                   atol=1e-3)


def test_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="all")
    assert_reloads_and_generates(pruned, tmp_path / "m")
    assert report.spec["blocks"][1]["shared_intermediate_size"] == INTER // 2  # the shared expert: INTER wide


def llama4_mixture(x: np.ndarray, ff: nn.Module, keep: list[int] | tuple[int, ...], top_k: int) -> np.ndarray:
    """Llama 4's routed sum restricted to the experts ``keep``, written out in float64: the router's logits of the
    kept experts, each token's top ``top_k``, their sigmoid scores multiplying the token before the expert's
    ``down(silu(gate x) * up x)`` (experts stored transposed), the outputs added as they are."""
    keep = np.asarray(keep)
    logits = x @ ff.router.weight.detach().double().numpy()[keep].T
    top = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    out = np.zeros_like(x)
    gu, dn = ff.experts.gate_up_proj.detach().double().numpy(), ff.experts.down_proj.detach().double().numpy()
    for t in range(x.shape[0]):
        for j in top[t]:
            e = keep[j]
            z = (x[t] / (1.0 + np.exp(-logits[t, j]))) @ gu[e]
            h = F.silu(torch.from_numpy(z[:INTER])).numpy() * z[INTER:]
            out[t] += h @ dn[e]
    return out


def moe_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """The real tokens' rows of the mixture layer's input (float64)."""
    seen: list[torch.Tensor] = []
    hook = model.layers[1].feed_forward.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, HIDDEN)))
    run_hooked([model], batches, [hook])
    return torch.cat([x[b["attention_mask"].bool().reshape(-1)] for x, b in zip(seen, batches, strict=True)]
                     ).double().numpy()


def backward_elimination(err, n: int, n_keep: int) -> tuple[int, ...]:
    """Remove, one at a time, the expert whose removal leaves the least ``err(kept)``."""
    kept = tuple(range(n))
    while len(kept) > n_keep:
        kept = min((tuple(e for e in kept if e != j) for j in kept), key=err)
    return kept


@pytest.mark.parametrize(("experts", "top_k", "limit"), [(4, 1, 512), (6, 2, 512), (6, 2, 0), (8, 1, 0)])
def test_whole_experts_minimise_the_routed_error_of_inputs_scaled_by_the_scores(monkeypatch, experts: int,
                                                                               top_k: int, limit: int) -> None:
    """Whole experts of Llama 4's mixture: the router loses the removed experts' rows and scores the kept ones, the
    scores multiply the experts' inputs (an expert's output on a token depends on its own score alone, the same
    whichever experts are kept). The kept set is the optimum over every kept set of Llama 4's routed sum written
    out here (enumeration), or backward elimination over it (``EXHAUSTIVE_LIMIT`` 0), the reported error that
    sum's; the pruned model's experts compute that sum, and the refit lowers the error."""
    import nn_adapters._experts as experts_mod

    monkeypatch.setattr(experts_mod, "EXHAUSTIVE_LIMIT", limit)
    model, batches = build(experts=experts, top_k=top_k), ragged_token_batches(VOCAB, n_batches=4)
    ff = model.layers[1].feed_forward
    x = moe_inputs(model, batches)
    target = llama4_mixture(x, ff, range(experts), top_k)
    energy = float((target ** 2).sum())
    cache: dict[tuple[int, ...], float] = {}

    def err(keep: tuple[int, ...]) -> float:
        if keep not in cache:
            cache[keep] = float(((target - llama4_mixture(x, ff, keep, top_k)) ** 2).sum())
        return cache[keep]

    n_keep = experts // 2
    pruned, report = prune_transformer(model, batches, keep=0.5, target="experts", method="layer", reweight=False)
    (u,) = report.units
    want = (min(itertools.combinations(range(experts), n_keep), key=err) if limit
            else backward_elimination(err, experts, n_keep))
    assert u.search == ("exhaustive" if limit else "greedy") and tuple(u.kept) == want
    assert u.relative_error == pytest.approx(err(want) / energy, rel=1e-4)
    ff_p = pruned.layers[1].feed_forward
    assert ff_p.router.weight.shape[0] == ff_p.experts.gate_up_proj.shape[0] == n_keep
    seen: list[torch.Tensor] = []
    hook = ff_p.experts.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(n_keep, -1, HIDDEN).sum(0)))
    run_hooked([pruned], batches, [hook])
    got = torch.cat([y[b["attention_mask"].bool().reshape(-1)] for y, b in zip(seen, batches, strict=True)])
    np.testing.assert_allclose(got.double().numpy(), llama4_mixture(x, ff, want, top_k), rtol=1e-4, atol=1e-4)
    _, refit = prune_transformer(model, batches, keep=0.5, target="experts", method="layer")
    assert refit.units[0].kept == u.kept and refit.units[0].relative_error < u.relative_error


def test_whole_experts_save_reload_and_generation(tmp_path) -> None:
    model = build(lm=True, experts=6, top_k=2)
    pruned, report = prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="experts")
    assert report.spec["blocks"][1]["experts"] == 3
    assert_reloads_and_generates(pruned, tmp_path / "m")


def test_scores_that_depend_on_the_other_experts_picked_are_refused(monkeypatch) -> None:
    """A router whose dense scores are renormalised over the experts it picks (not Llama 4's own sigmoid): an
    expert's score, which scales its input, then depends on the others picked, so it cannot be read for every
    expert at once, and whole-expert pruning is refused (the neurons of the experts can still be pruned)."""
    def renormalised(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        top, idx = torch.topk(logits, self.top_k, dim=1)
        scores = torch.zeros_like(logits).scatter_(1, idx, top.softmax(dim=1))
        return scores, logits

    model = build(experts=6, top_k=2)
    monkeypatch.setattr(type(model.layers[1].feed_forward.router), "forward", renormalised)
    with pytest.raises(ValueError, match="score of an expert.*target='ffn'"):
        prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="experts")
    prune_transformer(model, ragged_token_batches(VOCAB), keep=0.5, target="ffn")
